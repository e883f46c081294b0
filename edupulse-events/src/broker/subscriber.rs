//! Typed consumers: a durable consumer (JetStream's, or the in-process broker's) that
//! yields decoded, upcast events, different aggregates at once and each aggregate in order
//! (the rules are on [`Subscriber`]). What differs between the brokers is in `consumer.rs`.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

#[cfg(feature = "nats")]
use async_nats::jetstream;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use uuid::Uuid;

use crate::broker::consumer::{Batch, Consumer, Received, Settle};
use crate::broker::durable::DurableSettings;
use crate::broker::lanes::{Held, Lanes};
use crate::broker::memory::InMemoryBroker;
use crate::broker::pulls::{Pulled, Pulls};
use crate::broker::recovery::Recovery;
pub use crate::broker::subscriber_config::{
    PoisonReport, SubscriberConfig, SubscriberStats, UnknownEventPolicy,
};
use crate::event::wire::{self, headers};
use crate::telemetry::SubscriberMetrics;
use crate::{BoxError, DomainEvent, EventEnvelope, EventError};

type PoisonHook = Arc<dyn Fn(&PoisonReport) + Send + Sync>;

/// A durable consumer of events of `E` (a struct or a derived enum): a JetStream pull
/// consumer ([`Subscriber::new`]), or one of the in-process broker ([`Subscriber::in_memory`],
/// the embedded default: the same rules, within the process; it has an example).
///
/// Delivery rules of [`Subscriber::run`]:
/// - **Ordered concurrency.** Messages of different aggregates are handled at once (up to
///   [`SubscriberConfig::max_concurrency`]); an aggregate's messages one after the other,
///   in stream order, retries included: while one waits for its retry, the aggregate's
///   later messages wait too (neither handled nor acknowledged).
/// - A message is acknowledged after the handler succeeds. A failure is retried after
///   `nak_delay`, in this process; after `max_deliver` attempts a failing ("poison") message
///   is terminated and reported, never retried forever and never dropped silently, and its
///   aggregate's later messages go on. A handler that panics counts as a failed attempt: the
///   panic is caught, so one bad message never stops the subscriber.
/// - Messages of event types the consumer does not know are acknowledged and counted, or
///   refused, by [`UnknownEventPolicy`].
/// - At most `max_in_flight` messages are held (fetched and not yet settled): a slow
///   handler slows the pull, and memory stays bounded. Held messages are kept from being
///   redelivered by "in progress" acknowledgements.
/// - Shutdown lets the running handlers finish, then hands the waiting messages back to the
///   server (each aggregate's in order), which redelivers them first to the next consumer.
/// - After a crash, the server redelivers what was not acknowledged only once `ack_wait`
///   has passed, when newer messages of the same aggregates may be there already. So a run
///   that starts while the consumer has unacknowledged messages handles nothing until they
///   are back: it holds what it pulls, each aggregate's in stream order, until every message
///   delivered before its start is acknowledged or held by it (at most `ack_wait` and two
///   seconds; then it warns and goes on). Order across a crash therefore holds when the
///   crashed instance is restarted, or when all instances of the consumer start again. An
///   instance that keeps running while another one crashes cannot know what the crashed one
///   held: it may handle a newer message of an aggregate before the crashed one's comes back.
///   And a message whose handler finished but whose acknowledgement was lost is handled
///   again. A handler that must never see an aggregate's event twice or out of order keeps
///   the last `sequence` it applied (as projections do, in the same transaction).
pub struct Subscriber<E> {
    consumer: Consumer,
    config: SubscriberConfig,
    stats: Arc<SubscriberStats>,
    metrics: SubscriberMetrics,
    on_poison: Option<PoisonHook>,
    _event: PhantomData<fn() -> E>,
}

impl<E> fmt::Debug for Subscriber<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscriber").field("config", &self.config).field("stats", &self.stats).finish()
    }
}

impl<E: DomainEvent> Subscriber<E> {
    /// Creates the durable consumer, or binds to it and brings its settings in line with
    /// `config`.
    ///
    /// The settings the subscriber owns are the filter subject, `ack_wait`, `max_deliver`,
    /// `max_ack_pending` (from `max_in_flight`), explicit acknowledgement and delivery of
    /// the whole stream. When an existing durable consumer differs in the ones the server can
    /// change in place, it is updated (its progress is kept), so a changed `max_deliver`
    /// takes effect on the next deployment instead of being silently ignored. Settings the
    /// subscriber does not own (a description, a back-off list) are left as they are.
    /// Instances that share a durable name should share its settings: the last one started
    /// sets them for all.
    ///
    /// # Errors
    /// - [`EventError::Config`] for an invalid filter or durable name, for an existing
    ///   consumer that is a push consumer or differs in a setting the server cannot change in
    ///   place (its deliver or acknowledgement policy), and when the server refuses the
    ///   update: delete the durable consumer (its progress is lost) or choose another name;
    /// - [`EventError::Broker`] when the stream does not exist or the server cannot be
    ///   reached.
    #[cfg(feature = "nats")]
    pub async fn new(jetstream: &jetstream::Context, config: SubscriberConfig) -> Result<Self, EventError> {
        config.check()?;
        let consumer = crate::broker::jetstream_durable::open(jetstream, &config).await?;
        Ok(Self::with(Consumer::JetStream(Box::new(consumer)), config))
    }

    /// A durable consumer of the in-process broker `broker` (the embedded default), with
    /// the same settings and rules as on JetStream: created, or bound to and given
    /// `config`'s settings (its progress kept). `config.stream` is not looked at (the
    /// broker has one stream).
    ///
    /// What it cannot keep: the broker and its consumers live as long as the process, so
    /// nothing survives a restart (neither the messages nor the consumer's progress), and
    /// "after a crash" means after a subscriber of the process stopped without handing its
    /// messages back (its future dropped): they come back once `ack_wait` has passed, as
    /// on JetStream.
    ///
    /// ```
    /// use edupulse_events::{InMemoryBroker, Subscriber, SubscriberConfig, Uuid};
    /// # use edupulse_events::DomainEvent;
    /// # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, DomainEvent)]
    /// # #[event(context = "courses")]
    /// # struct LessonPublished { #[event(aggregate_id)] lesson_id: Uuid }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), edupulse_events::EventError> {
    /// let broker = InMemoryBroker::new();
    /// let subscriber = Subscriber::<LessonPublished>::in_memory(&broker, SubscriberConfig::new("EDUPULSE", "billing"))?;
    /// // Until the future given as `shutdown` completes (here: at once).
    /// subscriber.run(async |envelope| { println!("{}", envelope.event.lesson_id); Ok(()) }, async {}).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid setting or filter.
    pub fn in_memory(broker: &InMemoryBroker, config: SubscriberConfig) -> Result<Self, EventError> {
        config.check()?;
        let settings = DurableSettings {
            filter: config.filter_subject.as_ref().map(|f| f.split('.').map(str::to_owned).collect()),
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
            max_ack_pending: config.max_in_flight,
        };
        broker.durable(&config.durable_name, settings);
        let consumer = Consumer::Memory(broker.clone(), config.durable_name.clone());
        Ok(Self::with(consumer, config))
    }

    fn with(consumer: Consumer, config: SubscriberConfig) -> Self {
        let metrics = SubscriberMetrics::new(&config.durable_name);
        Self { consumer, config, stats: Arc::default(), metrics, on_poison: None, _event: PhantomData }
    }

    /// Calls `hook` for every message given up on (in addition to a `tracing` error).
    #[must_use]
    pub fn on_poison(mut self, hook: impl Fn(&PoisonReport) + Send + Sync + 'static) -> Self {
        self.on_poison = Some(Arc::new(hook));
        self
    }

    /// The counters.
    pub fn stats(&self) -> &SubscriberStats {
        &self.stats
    }

    /// Handles messages until `shutdown` completes: decodes and upcasts each, calls
    /// `handler`, acknowledges on success,
    /// retries a failure after `nak_delay`, terminates and reports after `max_deliver`
    /// attempts; different aggregates at once, each aggregate's messages in stream order.
    ///
    /// `handler` is called concurrently (it is an `AsyncFn`: keep shared state behind a
    /// lock or in the database). A panic of `handler` (or of an upcaster) is caught and
    /// treated as a failure of that attempt, counted in [`SubscriberStats::retried`] or,
    /// after the last attempt, in [`SubscriberStats::poisoned`] with the panic message in
    /// the [`PoisonReport`]. `handler` is called again after its panic, so it must not
    /// leave its own state half-updated (the panic is caught with `AssertUnwindSafe`). This
    /// needs the default `panic = "unwind"`; with `panic = "abort"` the process ends.
    ///
    /// # Errors
    /// [`EventError::Broker`] when the message stream cannot be opened.
    pub async fn run<H>(&self, handler: H, shutdown: impl Future<Output = ()>) -> Result<(), EventError>
    where
        H: AsyncFn(EventEnvelope<E>) -> Result<(), BoxError>,
    {
        let max_in_flight = self.config.max_in_flight;
        let mut lanes = Lanes::new(self.config.max_concurrency.min(max_in_flight));
        let mut running = FuturesUnordered::new();
        let mut pulls = Pulls::default();
        let mut pulling = Pulling::default();
        let (stopping, stopped) = watch::channel(false);
        let mut progress = tokio::time::interval(self.config.ack_wait / 3);
        progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut recovery = Recovery::begin(&self.consumer, self.config.ack_wait).await;
        let mut recovery_check = tokio::time::interval(RECOVERY_CHECK);
        tokio::pin!(shutdown);
        loop {
            while recovery.is_none()
                && let Some(delivery) = lanes.start()
            {
                let (stopped, handler) = (stopped.clone(), &handler);
                running.push(async move {
                    self.handle(handler, &delivery, stopped).await;
                    delivery
                });
            }
            let capacity = max_in_flight + recovery.as_ref().map_or(0, Recovery::extra_room);
            let room = capacity.saturating_sub(lanes.held() + pulls.outstanding());
            if pulls.has_room()
                && room >= (max_in_flight / 4).max(1)
                && let Some(wait) = self.refill(&mut pulls, room, &mut pulling).await?
            {
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
            tokio::select! {
                () = &mut shutdown => break,
                Some(done) = running.next(), if !running.is_empty() => {
                    lanes.finish(done.key());
                    // Those that finished meanwhile too: one turn of the loop for all.
                    while let Some(Some(done)) = running.next().now_or_never() {
                        lanes.finish(done.key());
                    }
                }
                pulled = pulls.next(), if pulls.is_open() => receive(pulled, &mut pulls, &mut lanes),
                _ = progress.tick() => self.keep_held(&lanes).await,
                _ = recovery_check.tick(), if recovery.is_some() => {
                    if let Some(wait) = &recovery && wait.is_over(&self.consumer, lanes.held()).await {
                        recovery = None;
                    }
                }
            }
        }
        let _ = stopping.send(true);
        self.hand_back(&mut lanes, &mut running, pulls).await;
        Ok(())
    }

    /// Opens a pull request for `room` messages. After a failure, `Some` wait before the
    /// next attempt; a failure of the first pull is the caller's error (the consumer cannot
    /// be read at all).
    async fn refill(
        &self,
        pulls: &mut Pulls,
        room: usize,
        state: &mut Pulling,
    ) -> Result<Option<Duration>, EventError> {
        match self.pull(room).await {
            Ok(batch) => {
                pulls.add(batch, room);
                *state = Pulling { failures: 0, pulled_once: true };
                Ok(None)
            }
            Err(e) if !state.pulled_once => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "subscriber: pull failed; retrying");
                state.failures += 1;
                Ok(Some(backoff(state.failures)))
            }
        }
    }

    /// A pull request for at most `count` messages, open for a second.
    async fn pull(&self, count: usize) -> Result<Batch, EventError> {
        self.consumer.pull(count, PULL_EXPIRES).await
    }

    /// Keeps the held messages from being redelivered while they wait or run.
    async fn keep_held(&self, lanes: &Lanes<Delivery>) {
        for delivery in lanes.all() {
            self.ack(&delivery.message, Settle::Progress).await;
        }
    }

    /// At shutdown: the running handlers finish their attempt (a failure goes back to the
    /// server at once), then the waiting messages go back, each aggregate's in order, then
    /// those of the open pull request as they arrive: the server redelivers them first, in
    /// that order, to the next consumer.
    async fn hand_back<F>(&self, lanes: &mut Lanes<Delivery>, running: &mut FuturesUnordered<F>, pulls: Pulls)
    where
        F: Future<Output = Arc<Delivery>>,
    {
        while let Some(done) = running.next().await {
            lanes.finish(done.key());
        }
        for delivery in lanes.take_waiting() {
            self.ack(&delivery.message, Settle::Nak(None)).await;
        }
        for message in pulls.drain().await {
            self.ack(&message, Settle::Nak(None)).await;
        }
    }

    /// Handles one message to the end: acknowledged, terminated, or (at shutdown) handed
    /// back; a failed attempt is retried here after `nak_delay`, so that the aggregate's
    /// later messages keep waiting behind it.
    async fn handle<H>(&self, handler: &H, delivery: &Delivery, mut stopped: watch::Receiver<bool>)
    where
        H: AsyncFn(EventEnvelope<E>) -> Result<(), BoxError>,
    {
        let message = &delivery.message;
        let (mut attempt, stream_sequence) = (delivery.delivered, delivery.sequence);
        let event_type = message.header(headers::EVENT_TYPE).map(str::to_owned);
        if let Some(event_type) = &event_type
            && !E::accepts(event_type)
        {
            self.unknown(message, stream_sequence, attempt, event_type).await;
            return;
        }
        loop {
            let error = match self.attempt(handler, message).await {
                Ok(()) => {
                    self.stats.handled.fetch_add(1, Ordering::Relaxed);
                    self.metrics.handled.increment(1);
                    self.ack(message, Settle::Ack).await;
                    return;
                }
                Err(error) => error,
            };
            if attempt >= self.config.max_deliver {
                self.give_up(message, stream_sequence, attempt, event_type, error).await;
                return;
            }
            tracing::warn!(stream_sequence, attempt, %error, "subscriber: handler failed; retrying later");
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            self.metrics.retried.increment(1);
            // Neither the `watch::Ref` of `borrow` nor the one `wait_for` returns may live
            // across an await: it holds a lock guard, which would make `run`'s future (and
            // so any task spawning it) not `Send`. Copy the flag; drop the `Ref` at once.
            let stop = *stopped.borrow();
            if stop {
                self.ack(message, Settle::Nak(None)).await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.nak_delay) => attempt += 1,
                () = stopped.wait_for(|stop| *stop).map(drop) => {
                    self.ack(message, Settle::Nak(None)).await;
                    return;
                }
            }
        }
    }

    /// One attempt: decode, upcast and handle. A panic in the handler (or in an upcaster)
    /// is a failed attempt like an error: caught here, it neither unwinds through `run` nor
    /// stops the subscriber.
    async fn attempt<H>(&self, handler: &H, message: &Received) -> Result<(), String>
    where
        H: AsyncFn(EventEnvelope<E>) -> Result<(), BoxError>,
    {
        let attempt = async {
            let envelope = wire::decode_message::<E>(message.payload()).map_err(|e| e.to_string())?;
            handler(envelope).await.map_err(|e| e.to_string())
        };
        match AssertUnwindSafe(attempt).catch_unwind().await {
            Ok(outcome) => outcome,
            Err(payload) => {
                Err(format!("panicked while decoding or handling the event: {}", panic_message(&*payload)))
            }
        }
    }

    /// A message of an event type the consumer does not know, settled by the policy.
    async fn unknown(&self, message: &Received, stream_sequence: u64, deliveries: i64, event_type: &str) {
        match self.config.unknown_events {
            UnknownEventPolicy::Ack => {
                self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                self.ack(message, Settle::Ack).await;
            }
            UnknownEventPolicy::Refuse => {
                let error = format!("unknown event type `{event_type}` refused by policy");
                self.give_up(message, stream_sequence, deliveries, Some(event_type.to_owned()), error).await;
            }
        }
    }

    async fn give_up(
        &self,
        message: &Received,
        stream_sequence: u64,
        deliveries: i64,
        event_type: Option<String>,
        error: String,
    ) {
        let report = PoisonReport {
            stream_sequence,
            subject: message.subject().to_owned(),
            event_type,
            deliveries,
            error,
        };
        tracing::error!(?report, "subscriber: message terminated");
        self.stats.poisoned.fetch_add(1, Ordering::Relaxed);
        self.metrics.poisoned.increment(1);
        self.ack(message, Settle::Term).await;
        if let Some(hook) = &self.on_poison
            && std::panic::catch_unwind(AssertUnwindSafe(|| hook(&report))).is_err()
        {
            tracing::error!(stream_sequence, "subscriber: the poison hook panicked");
        }
    }

    async fn ack(&self, message: &Received, how: Settle) {
        message.settle(how).await;
    }
}

/// How long a pull request stays open on the server (and the longest a shutdown waits for
/// the messages it still brings).
const PULL_EXPIRES: Duration = Duration::from_secs(1);

/// How often a subscriber that waits for a previous run's messages looks whether they are
/// back.
const RECOVERY_CHECK: Duration = Duration::from_millis(200);

/// Whether pulling has worked yet, and how often it failed in a row since.
#[derive(Default)]
struct Pulling {
    failures: u32,
    pulled_once: bool,
}

/// Takes in `first` and the messages the pull requests already received: one turn of the
/// run loop for all of them.
fn receive(first: Pulled, pulls: &mut Pulls, lanes: &mut Lanes<Delivery>) {
    let mut pulled = Some(first);
    while let Some(next) = pulled.take() {
        match next {
            Pulled::Ended => {}
            Pulled::Failed(e) => tracing::warn!(error = %e, "subscriber: pull failed; retrying"),
            // A redelivery of a message still held: the held copy settles it.
            Pulled::Message(message) => {
                drop(lanes.push(Delivery::new(message)));
                pulled = pulls.next().now_or_never();
            }
        }
    }
}

/// The wait before pull attempt number `failures` (from 1): 100 ms doubling to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100)
        .saturating_mul(1 << failures.saturating_sub(1).min(6))
        .min(Duration::from_secs(5))
}

/// A message held by the subscriber, with its lane: the aggregate id header, or the subject
/// for a message without one.
struct Delivery {
    message: Received,
    key: Lane,
    sequence: u64,
    /// Deliveries so far, this one included (the server's count).
    delivered: i64,
}

/// What orders a message: its aggregate, or its subject when it names none.
#[derive(Clone, PartialEq, Eq, Hash)]
enum Lane {
    Aggregate(Uuid),
    Subject(String),
}

impl Delivery {
    fn new(message: Received) -> Self {
        let aggregate = message.header(headers::AGGREGATE_ID);
        let key = match aggregate.and_then(|id| Uuid::parse_str(id).ok()) {
            Some(id) => Lane::Aggregate(id),
            None => Lane::Subject(message.subject().to_owned()),
        };
        let (delivered, sequence) = message.delivery();
        Self { message, key, sequence, delivered }
    }
}

impl Held for Delivery {
    type Key = Lane;

    fn key(&self) -> &Lane {
        &self.key
    }

    fn sequence(&self) -> u64 {
        self.sequence
    }
}

/// The text of a panic's payload (`panic!` with a literal or a formatted message).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}
