//! Typed consumers: a durable JetStream pull consumer that yields decoded, upcast events,
//! different aggregates at once and each aggregate in order (the rules are on
//! [`Subscriber`]).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::Batch;
use async_nats::jetstream::consumer::{self, FromConsumer, PullConsumer, pull};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use async_nats::jetstream::{self, AckKind};
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::watch;
use uuid::Uuid;

use crate::broker::lanes::{Held, Lanes};
use crate::broker::pulls::{Pulled, Pulls};
use crate::broker::recovery::Recovery;
use crate::event::subject::validate_filter;
use crate::event::wire::{self, headers};
use crate::telemetry::SubscriberMetrics;
use crate::{BoxError, BrokerErrorKind, DomainEvent, EventEnvelope, EventError};

/// What to do with a message whose event type the consumer does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownEventPolicy {
    /// Acknowledge it and count it in [`SubscriberStats::unknown`]: the consumer is not
    /// interested (the default).
    Ack,
    /// Terminate it and report it like a poison message: every event on these subjects
    /// should be known.
    Refuse,
}

/// Settings of a [`Subscriber`]: [`SubscriberConfig::new`], then the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriberConfig {
    /// The JetStream stream to consume.
    pub stream: String,
    /// The durable consumer's name: the server remembers its progress.
    pub durable_name: String,
    /// Only subjects matching this filter (default: every subject of the stream).
    pub filter_subject: Option<String>,
    /// Deliveries before a failing message is terminated (default 5).
    pub max_deliver: i64,
    /// Delay before a failed message is redelivered (default 1 s).
    pub nak_delay: Duration,
    /// How long the server waits for an acknowledgement before redelivering (default 30 s).
    pub ack_wait: Duration,
    /// Messages fetched and not yet settled at once: the memory bound (default 256; the
    /// server's `max_ack_pending` for the consumer).
    pub max_in_flight: usize,
    /// Messages handled at once, each of another aggregate (default 64; at most
    /// `max_in_flight` run, as only those are held).
    pub max_concurrency: usize,
    /// Unknown event types (default [`UnknownEventPolicy::Ack`]).
    pub unknown_events: UnknownEventPolicy,
}

impl SubscriberConfig {
    /// Defaults for a durable consumer `durable_name` of `stream`.
    pub fn new(stream: impl Into<String>, durable_name: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable_name: durable_name.into(),
            filter_subject: None,
            max_deliver: 5,
            nak_delay: Duration::from_secs(1),
            ack_wait: Duration::from_secs(30),
            max_in_flight: 256,
            max_concurrency: 64,
            unknown_events: UnknownEventPolicy::Ack,
        }
    }
}

setters!(SubscriberConfig {
    with_max_deliver => max_deliver: i64,
    with_nak_delay => nak_delay: Duration,
    with_ack_wait => ack_wait: Duration,
    with_max_in_flight => max_in_flight: usize,
    with_max_concurrency => max_concurrency: usize,
    with_unknown_events => unknown_events: UnknownEventPolicy,
});

impl SubscriberConfig {
    /// Only subjects matching `filter` (a subject, `*` and `>` wildcards allowed).
    #[must_use]
    pub fn with_filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = Some(filter.into());
        self
    }

    /// An invalid setting, as an error.
    fn check(&self) -> Result<(), EventError> {
        if self.max_deliver < 1
            || self.max_in_flight == 0
            || self.max_concurrency == 0
            || self.ack_wait.is_zero()
        {
            return Err(EventError::Config(
                "subscriber configuration: max_deliver, max_in_flight and max_concurrency must be at least 1, \
                 ack_wait above zero"
                    .into(),
            ));
        }
        if let Some(filter) = &self.filter_subject {
            validate_filter(filter)?;
        }
        Ok(())
    }
}

/// A message given up on: terminated after its last delivery, or refused.
#[derive(Debug, Clone)]
pub struct PoisonReport {
    /// The message's sequence in the stream.
    pub stream_sequence: u64,
    /// Its subject.
    pub subject: String,
    /// Its event type header, if any.
    pub event_type: Option<String>,
    /// How often it was delivered.
    pub deliveries: i64,
    /// The last error.
    pub error: String,
}

/// Counters of a subscriber.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Messages handled and acknowledged.
    pub handled: AtomicU64,
    /// Failed attempts that were negatively acknowledged for redelivery.
    pub retried: AtomicU64,
    /// Messages terminated and reported.
    pub poisoned: AtomicU64,
    /// Messages of unknown event types acknowledged under [`UnknownEventPolicy::Ack`].
    pub unknown: AtomicU64,
}

type PoisonHook = Arc<dyn Fn(&PoisonReport) + Send + Sync>;

/// A durable JetStream pull consumer of events of `E` (a struct or a derived enum).
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
    consumer: PullConsumer,
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

/// A failed JetStream request of the subscriber, its kind from the client's, the client's
/// error as the source.
fn broker<K>(what: &str, e: async_nats::error::Error<K>) -> EventError
where
    K: ErrorKindOf + Clone + fmt::Debug + fmt::Display + PartialEq + Send + Sync + 'static,
{
    let kind = e.kind().broker_kind();
    EventError::broker(kind, format!("{what}: {e}"), e)
}

/// The stream `name` could not be opened: named, and the fix when it does not exist.
fn stream_error(name: &str, e: async_nats::error::Error<GetStreamErrorKind>) -> EventError {
    let missing = matches!(e.kind(), GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
    if missing {
        let message = format!(
            "no stream `{name}` on the NATS server: the publishing service creates it at start-up \
             (`NatsPublisher::ensure_stream(&StreamSpec::new(\"{name}\", [\"<context>.>\"]))`), or \
             `SubscriberConfig::stream` names another stream"
        );
        return EventError::broker(BrokerErrorKind::NoStream, message, e);
    }
    broker(&format!("cannot open the stream `{name}`"), e)
}

/// What kind of broker failure an async-nats error kind is.
trait ErrorKindOf {
    fn broker_kind(&self) -> BrokerErrorKind;
}

impl ErrorKindOf for GetStreamErrorKind {
    fn broker_kind(&self) -> BrokerErrorKind {
        match self {
            Self::JetStream(e) if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND => {
                BrokerErrorKind::NoStream
            }
            Self::JetStream(_) => BrokerErrorKind::Api,
            Self::Request => BrokerErrorKind::Unavailable,
            _ => BrokerErrorKind::Other,
        }
    }
}

impl ErrorKindOf for ConsumerErrorKind {
    fn broker_kind(&self) -> BrokerErrorKind {
        match self {
            Self::TimedOut => BrokerErrorKind::TimedOut,
            Self::Request => BrokerErrorKind::Unavailable,
            Self::JetStream(_) => BrokerErrorKind::Api,
            _ => BrokerErrorKind::Other,
        }
    }
}

impl ErrorKindOf for ConsumerInfoErrorKind {
    fn broker_kind(&self) -> BrokerErrorKind {
        match self {
            Self::TimedOut => BrokerErrorKind::TimedOut,
            Self::StreamNotFound => BrokerErrorKind::NoStream,
            Self::Request | Self::NoResponders | Self::Offline => BrokerErrorKind::Unavailable,
            Self::JetStream(_) => BrokerErrorKind::Api,
            _ => BrokerErrorKind::Other,
        }
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
    pub async fn new(jetstream: &jetstream::Context, config: SubscriberConfig) -> Result<Self, EventError> {
        config.check()?;
        let stream =
            jetstream.get_stream(&config.stream).await.map_err(|e| stream_error(&config.stream, e))?;
        let in_flight = i64::try_from(config.max_in_flight).unwrap_or(i64::MAX);
        let wanted = pull::Config {
            durable_name: Some(config.durable_name.clone()),
            filter_subject: config.filter_subject.clone().unwrap_or_default(),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            max_deliver: config.max_deliver,
            max_ack_pending: in_flight,
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        };
        let name = &config.durable_name;
        let consumer = match stream.consumer_info(name).await {
            Ok(info) => match reconcile(name, info.config, &wanted)? {
                None => stream.get_consumer(name).await.map_err(|e| {
                    EventError::broker(BrokerErrorKind::Other, format!("cannot bind to the consumer: {e}"), e)
                })?,
                Some(updated) => {
                    tracing::info!(consumer = %name, "subscriber: updating the durable consumer's settings");
                    stream.create_consumer(updated).await.map_err(|e| refused_update(name, e))?
                }
            },
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => {
                stream.create_consumer(wanted).await.map_err(|e| broker("cannot create the consumer", e))?
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::InvalidName => {
                return Err(EventError::Config(format!("invalid durable consumer name `{name}`: {e}")));
            }
            Err(e) => return Err(broker("cannot read the consumer", e)),
        };
        let metrics = SubscriberMetrics::new(&config.durable_name);
        Ok(Self { consumer, config, stats: Arc::default(), metrics, on_poison: None, _event: PhantomData })
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
        self.consumer.batch().max_messages(count).expires(PULL_EXPIRES).messages().await.map_err(|e| {
            EventError::broker(BrokerErrorKind::Unavailable, format!("cannot pull messages: {e}"), e)
        })
    }

    /// Keeps the held messages from being redelivered while they wait or run.
    async fn keep_held(&self, lanes: &Lanes<Delivery>) {
        for delivery in lanes.all() {
            self.ack(&delivery.message, AckKind::Progress).await;
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
            self.ack(&delivery.message, AckKind::Nak(None)).await;
        }
        for message in pulls.drain().await {
            self.ack(&message, AckKind::Nak(None)).await;
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
        let event_type =
            message.headers.as_ref().and_then(|h| h.get(headers::EVENT_TYPE)).map(|v| v.as_str().to_owned());
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
                    self.ack(message, AckKind::Ack).await;
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
                self.ack(message, AckKind::Nak(None)).await;
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(self.config.nak_delay) => attempt += 1,
                () = stopped.wait_for(|stop| *stop).map(drop) => {
                    self.ack(message, AckKind::Nak(None)).await;
                    return;
                }
            }
        }
    }

    /// One attempt: decode, upcast and handle. A panic in the handler (or in an upcaster)
    /// is a failed attempt like an error: caught here, it neither unwinds through `run` nor
    /// stops the subscriber.
    async fn attempt<H>(&self, handler: &H, message: &jetstream::Message) -> Result<(), String>
    where
        H: AsyncFn(EventEnvelope<E>) -> Result<(), BoxError>,
    {
        let attempt = async {
            let envelope = wire::decode_message::<E>(&message.payload).map_err(|e| e.to_string())?;
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
    async fn unknown(
        &self,
        message: &jetstream::Message,
        stream_sequence: u64,
        deliveries: i64,
        event_type: &str,
    ) {
        match self.config.unknown_events {
            UnknownEventPolicy::Ack => {
                self.stats.unknown.fetch_add(1, Ordering::Relaxed);
                self.ack(message, AckKind::Ack).await;
            }
            UnknownEventPolicy::Refuse => {
                let error = format!("unknown event type `{event_type}` refused by policy");
                self.give_up(message, stream_sequence, deliveries, Some(event_type.to_owned()), error).await;
            }
        }
    }

    async fn give_up(
        &self,
        message: &jetstream::Message,
        stream_sequence: u64,
        deliveries: i64,
        event_type: Option<String>,
        error: String,
    ) {
        let report = PoisonReport {
            stream_sequence,
            subject: message.subject.to_string(),
            event_type,
            deliveries,
            error,
        };
        tracing::error!(?report, "subscriber: message terminated");
        self.stats.poisoned.fetch_add(1, Ordering::Relaxed);
        self.metrics.poisoned.increment(1);
        self.ack(message, AckKind::Term).await;
        if let Some(hook) = &self.on_poison
            && std::panic::catch_unwind(AssertUnwindSafe(|| hook(&report))).is_err()
        {
            tracing::error!(stream_sequence, "subscriber: the poison hook panicked");
        }
    }

    async fn ack(&self, message: &jetstream::Message, kind: AckKind) {
        // A lost acknowledgement means a redelivery, which handlers must tolerate anyway.
        if let Err(e) = message.ack_with(kind).await {
            tracing::warn!(error = %e, "subscriber: acknowledgement failed");
        }
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
    message: jetstream::Message,
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
    fn new(message: jetstream::Message) -> Self {
        let aggregate = message.headers.as_ref().and_then(|h| h.get(headers::AGGREGATE_ID));
        let key = match aggregate.and_then(|id| Uuid::parse_str(id.as_str()).ok()) {
            Some(id) => Lane::Aggregate(id),
            None => Lane::Subject(message.subject.to_string()),
        };
        let (delivered, sequence) = message.info().map_or((1, 0), |i| (i.delivered, i.stream_sequence));
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

/// Compares an existing durable consumer with the wanted settings: `None` when the settings
/// the subscriber owns are equal, else the existing configuration with those settings
/// replaced (everything else kept), to send as an update.
fn reconcile(
    name: &str,
    existing: consumer::Config,
    wanted: &pull::Config,
) -> Result<Option<pull::Config>, EventError> {
    if existing.deliver_subject.is_some() {
        return Err(EventError::Config(format!(
            "the durable consumer `{name}` is a push consumer; a subscriber needs a pull consumer: \
             delete it or choose another durable name"
        )));
    }
    // The server refuses to change these in place; say so before asking it.
    let fixed = [
        ("deliver policy", existing.deliver_policy != wanted.deliver_policy),
        ("acknowledgement policy", existing.ack_policy != wanted.ack_policy),
    ];
    if let Some((setting, _)) = fixed.iter().find(|(_, differs)| *differs) {
        return Err(EventError::Config(format!(
            "the durable consumer `{name}` exists with another {setting}, which the server cannot \
             change in place: delete the consumer (its progress is lost) or choose another durable name"
        )));
    }
    if existing.filter_subject == wanted.filter_subject
        && existing.ack_wait == wanted.ack_wait
        && existing.max_deliver == wanted.max_deliver
        && existing.max_ack_pending == wanted.max_ack_pending
    {
        return Ok(None);
    }
    let updated = consumer::Config {
        filter_subject: wanted.filter_subject.clone(),
        ack_wait: wanted.ack_wait,
        max_deliver: wanted.max_deliver,
        max_ack_pending: wanted.max_ack_pending,
        ..existing
    };
    pull::Config::try_from_consumer_config(updated)
        .map(Some)
        .map_err(|e| EventError::Config(format!("the durable consumer `{name}` cannot be updated: {e}")))
}

/// The server refused to update an existing consumer: a request it answers with an error
/// is a setting it cannot change (a configuration problem), anything else the broker's.
fn refused_update(name: &str, error: ConsumerError) -> EventError {
    match error.kind() {
        ConsumerErrorKind::JetStream(e) if e.code() == 400 => EventError::Config(format!(
            "the server refuses to update the durable consumer `{name}` ({e}): delete the consumer \
             (its progress is lost) or choose another durable name"
        )),
        _ => broker("cannot update the consumer", error),
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
