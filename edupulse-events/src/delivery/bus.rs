//! The commit-then-publish bus: events are written with the caller's own writes in one
//! transaction, and a [`LogRelay`] publishes them from the log once they committed.
//!
//! Nothing but the COMMIT is on the write path (and an in-process wake-up of the relay):
//! the events table is the only record of what is to be published. Guarantees, from the
//! relay: an event is published only if its transaction committed (the relay reads only
//! committed rows), and no committed event is lost (the relay's checkpoint passes an event
//! only once the broker acknowledged it, or parked it). A crash after COMMIT, a broker
//! outage or a relay dying mid-batch leave the checkpoint behind, and a relay publishes
//! from there later; re-sends carry the same `Nats-Msg-Id`, so JetStream drops them inside
//! its duplicate window.

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use tracing::Instrument;
use tracing::field::Empty;

use crate::broker::Publisher;
use crate::delivery::outstanding::Outstanding;
use crate::delivery::relay::{LogRelay, RelayConfig};
use crate::store::signals::Written;
use crate::store::{Connection, EventStore, ExpectedSequence, RelayLag, StreamPosition, Transaction};
use crate::{DomainEvent, EventEnvelope, EventError, telemetry, validate_subject_token};

/// Settings of an [`EventBus`]: `BusConfig::default()`, then the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BusConfig {
    /// Append the aggregate id as a last subject token (`courses.LessonPublished.<id>`),
    /// so consumers can subscribe to one aggregate (default false).
    pub aggregate_id_in_subject: bool,
    /// Run a [`LogRelay`] as a background task of the bus, started by the first commit
    /// (default true): a service that commits also publishes. Turn it off when standalone
    /// relays publish (see the `log_relay` example).
    pub background_relay: bool,
    /// The background relay's settings.
    pub relay: RelayConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self { aggregate_id_in_subject: false, background_relay: true, relay: RelayConfig::default() }
    }
}

setters!(BusConfig {
    with_aggregate_id_in_subject => aggregate_id_in_subject: bool,
    with_background_relay => background_relay: bool,
    with_relay => relay: RelayConfig,
});

/// Commits events with the caller's writes; a relay publishes them.
///
/// ```no_run
/// # use edupulse_events::*;
/// # async fn demo(bus: EventBus, id: Uuid, event: impl DomainEvent) -> Result<(), EventError> {
/// let committed = bus
///     .commit(async |tx| {
///         tx.append("lesson", id, 0, [event]).await?;
///         Ok::<_, EventError>(())
///     })
///     .await?;
/// // Only when the caller must know: wait until JetStream acknowledged the events.
/// committed.published().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventBus {
    shared: Arc<Shared>,
}

struct Shared {
    store: EventStore,
    publisher: Arc<dyn Publisher>,
    config: BusConfig,
    relay: OnceLock<RelayTask>,
    /// What this bus committed and its process's relays have not published yet.
    outstanding: Outstanding,
}

/// The background relay: a stop switch and its task.
struct RelayTask {
    stop: watch::Sender<bool>,
    handle: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last clone of the bus is gone: the relay finishes its batch and stops.
        if let Some(task) = self.relay.get() {
            task.stop.send_replace(true);
        }
        let unpublished = self.outstanding.current(&self.store.inner.signals).len();
        if unpublished > 0 {
            tracing::warn!(
                unpublished,
                "bus dropped with {unpublished} committed event(s) not yet published: they stay in the \
                 store's log, and the next relay on this store publishes them (`edupulse status` shows \
                 the backlog); end with `EventBus::close` to publish them before the process exits"
            );
        }
    }
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus")
            .field("store", &self.shared.store)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl EventBus {
    /// A bus writing to `store`; its background relay publishes through `publisher`.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid relay configuration.
    pub fn new(
        store: EventStore,
        publisher: Arc<dyn Publisher>,
        config: BusConfig,
    ) -> Result<Self, EventError> {
        config.relay.check()?;
        let outstanding = Outstanding::default();
        Ok(Self {
            shared: Arc::new(Shared { store, publisher, config, relay: OnceLock::new(), outstanding }),
        })
    }

    /// The store.
    pub fn store(&self) -> &EventStore {
        &self.shared.store
    }

    /// Runs `work` in a new transaction and commits it. The relay publishes the appended
    /// events from the log; the returned [`Committed`] holds `work`'s value and a
    /// [`Receipt`] to wait for that when the caller needs to.
    ///
    /// When `work` returns an error (or panics), the transaction is rolled back and nothing
    /// is published.
    ///
    /// # Errors
    /// The error of `work`; [`EventError::TransactionAborted`] when PostgreSQL had aborted
    /// the transaction; [`EventError::Database`] (converted) when BEGIN or COMMIT fails.
    ///
    /// Runs in a `tracing` span `edupulse.commit` with the number of `events` committed and
    /// the `traceparent` of the first event that carries one.
    pub async fn commit<T, Err>(
        &self,
        work: impl AsyncFnOnce(&mut BusTransaction) -> Result<T, Err>,
    ) -> Result<Committed<T>, Err>
    where
        Err: From<EventError>,
    {
        let span = tracing::info_span!("edupulse.commit", events = Empty, traceparent = Empty);
        self.commit_traced(work).instrument(span).await
    }

    async fn commit_traced<T, Err>(
        &self,
        work: impl AsyncFnOnce(&mut BusTransaction) -> Result<T, Err>,
    ) -> Result<Committed<T>, Err>
    where
        Err: From<EventError>,
    {
        let shared = &self.shared;
        let mut tx = shared.store.begin().await?;
        tx.subjects.aggregate_id_token = shared.config.aggregate_id_in_subject;
        if let Some(broker_limit) = shared.publisher.max_payload() {
            tx.max_message_bytes = tx.max_message_bytes.min(broker_limit);
        }
        let mut bus_tx = BusTransaction { tx };
        let value = match work(&mut bus_tx).await {
            Ok(value) => value,
            Err(e) => {
                if let Err(rollback) = bus_tx.tx.rollback().await {
                    tracing::warn!(error = %rollback, "bus: rollback failed; the connection is discarded");
                }
                return Err(e);
            }
        };
        let written = bus_tx.tx.commit_written().await?;
        telemetry::committed();
        tracing::Span::current().record("events", written.len());
        if !written.is_empty() {
            if shared.config.background_relay {
                shared.outstanding.add(&written, &shared.store.inner.signals);
            }
            self.start_relay();
        }
        Ok(Committed { value, receipt: Receipt { store: shared.store.clone(), written: written.into() } })
    }

    /// Starts the background relay, once, when configured.
    fn start_relay(&self) {
        let shared = &self.shared;
        if !shared.config.background_relay || shared.relay.get().is_some() {
            return;
        }
        shared.relay.get_or_init(|| {
            let (stop, mut stopped) = watch::channel(false);
            let relay =
                LogRelay::new(shared.store.clone(), shared.publisher.clone(), shared.config.relay.clone());
            let handle = tokio::spawn(async move {
                let shutdown = async move {
                    // An error means the bus is gone: stop as well.
                    let _ = stopped.wait_for(|stop| *stop).await;
                };
                if let Err(e) = relay.run(shutdown).await {
                    tracing::error!(error = %e, "bus: the background relay cannot run; nothing is published");
                }
            });
            RelayTask { stop, handle: Mutex::new(Some(handle)) }
        });
    }

    /// Closes the bus gracefully: first waits, at most `timeout`, until every event this
    /// bus committed is published (acknowledged by the broker, or parked), by its
    /// background relay or by any other relay of the store; then stops the background
    /// relay as [`shutdown`](EventBus::shutdown) does. What a process commits before it
    /// exits is published before it exits: end a command-line tool, a batch job or a
    /// service's `main` with it.
    ///
    /// Events still unpublished when `timeout` runs out (a broker outage, a partition held
    /// by another process's relay that is behind) stay in the store's log for the next
    /// relay; the returned [`Closed`] counts them, and a warning says so. A bus without a
    /// background relay ([`BusConfig::background_relay`] off) leaves publishing to
    /// standalone relays and keeps no account of it: its `close` returns at once.
    ///
    /// ```no_run
    /// # use edupulse_events::*;
    /// # async fn demo(bus: EventBus) -> Result<(), EventError> {
    /// let closed = bus.close(std::time::Duration::from_secs(10)).await?;
    /// assert_eq!(closed.unpublished, 0, "everything committed was published");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`EventError::Database`] when the store cannot be asked what was published.
    pub async fn close(&self, timeout: Duration) -> Result<Closed, EventError> {
        let shared = &self.shared;
        let signals = &shared.store.inner.signals;
        let waiting = shared.outstanding.current(signals);
        if !waiting.is_empty() {
            self.start_relay();
            signals.wake();
        }
        let receipt = Receipt { store: shared.store.clone(), written: waiting.clone().into() };
        let in_time = match tokio::time::timeout(timeout, receipt.published()).await {
            Ok(Ok(()) | Err(EventError::Parked { .. })) => true,
            Ok(Err(e)) => return Err(e),
            Err(_) => false,
        };
        // At the timeout: what neither this process's relays nor the saved checkpoints of
        // any relay account for.
        let mut left = if in_time { Vec::new() } else { shared.outstanding.current(signals) };
        if !left.is_empty() {
            let covered = shared.store.relay_covers_each(&left).await?;
            left = left.into_iter().zip(covered).filter(|(_, covered)| !covered).map(|(w, _)| w).collect();
        }
        let parked = if waiting.is_empty() {
            0
        } else {
            let positions: Vec<i64> = waiting.iter().map(|(_, p)| p.global_position).collect();
            shared.store.parked_among(&positions).await?.len()
        };
        self.shutdown().await;
        shared.outstanding.clear();
        let published = waiting.len().saturating_sub(left.len() + parked);
        let closed = Closed { published, parked, unpublished: left.len() };
        if closed.unpublished > 0 {
            tracing::warn!(
                unpublished = closed.unpublished,
                "bus closed with {} committed event(s) not published within {timeout:?}: they stay in the \
                 store's log for the next relay on this store",
                closed.unpublished
            );
        }
        Ok(closed)
    }

    /// Stops the background relay after its current batch and waits for it; commits after
    /// this are published by other relays only. Events committed but not yet published
    /// stay in the log for the next relay: [`close`](EventBus::close) publishes them first.
    pub async fn shutdown(&self) {
        let Some(task) = self.shared.relay.get().or_else(|| {
            // Never started: make sure no later commit starts it.
            let (stop, _) = watch::channel(true);
            self.shared.relay.get_or_init(|| RelayTask { stop, handle: Mutex::new(None) });
            None
        }) else {
            return;
        };
        task.stop.send_replace(true);
        let handle = task.handle.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(handle) = handle
            && let Err(e) = handle.await
        {
            tracing::warn!(error = %e, "bus: the background relay ended abnormally");
        }
    }

    /// How far publication is behind the log; see [`EventStore::relay_lag`].
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn lag(&self) -> Result<RelayLag, EventError> {
        self.shared.store.relay_lag().await
    }
}

/// What [`EventBus::close`] did with the events the bus had committed and not yet seen
/// published when it was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Closed {
    /// Acknowledged by the broker before the timeout.
    pub published: usize,
    /// Refused by the broker for good and parked (see `edupulse parked`).
    pub parked: usize,
    /// Still unpublished at the timeout: in the store's log, for the next relay.
    pub unpublished: usize,
}

/// What [`EventBus::commit`] returns: the closure's value and the commit's [`Receipt`].
#[derive(Debug)]
pub struct Committed<T> {
    /// What the closure returned.
    pub value: T,
    /// Where the committed events are, to wait for their publication.
    pub receipt: Receipt,
}

impl<T> Committed<T> {
    /// The closure's value.
    pub fn into_value(self) -> T {
        self.value
    }

    /// Waits until the broker acknowledged every event of the commit, then returns the
    /// closure's value; see [`Receipt::published`].
    ///
    /// # Errors
    /// As [`Receipt::published`].
    pub async fn published(self) -> Result<T, EventError> {
        self.receipt.published().await?;
        Ok(self.value)
    }
}

/// The events a commit wrote, by partition and stream position.
#[derive(Debug, Clone)]
pub struct Receipt {
    store: EventStore,
    written: Written,
}

/// How often a receipt asks the database when no relay of this process reports progress.
const RECEIPT_POLL: Duration = Duration::from_millis(50);

impl Receipt {
    /// The stream positions of the committed events (empty when the commit appended none).
    pub fn positions(&self) -> impl Iterator<Item = StreamPosition> + '_ {
        self.written.iter().map(|(_, position)| *position)
    }

    /// Waits until the broker acknowledged every event of the commit: at once after the
    /// acknowledgement when a relay of this process published them, within about 50 ms
    /// when a relay of another process did. It waits as long as publication does (a broker
    /// outage, no relay running): bound it with `tokio::time::timeout` when needed.
    ///
    /// # Errors
    /// [`EventError::Parked`] when the broker refused one of the events for good;
    /// [`EventError::Database`].
    pub async fn published(&self) -> Result<(), EventError> {
        if self.written.is_empty() {
            return Ok(());
        }
        let signals = &self.store.inner.signals;
        let (waiter, mut done) = oneshot::channel();
        signals.notify_when_done(self.written.clone(), waiter);
        loop {
            tokio::select! {
                published = &mut done => {
                    if published.is_ok() && !signals.parked_any() {
                        return Ok(());
                    }
                    break;
                }
                () = tokio::time::sleep(RECEIPT_POLL) => {
                    if self.store.relay_covers(&self.written).await? {
                        break;
                    }
                }
            }
        }
        let positions: Vec<i64> = self.positions().map(|p| p.global_position).collect();
        match self.store.parked_among(&positions).await?.into_iter().next() {
            Some(parked) => Err(EventError::Parked {
                event_id: parked.event_id,
                global_position: parked.global_position,
                reason: parked.reason,
            }),
            None => Ok(()),
        }
    }
}

/// The transaction handed to [`EventBus::commit`]'s closure.
pub struct BusTransaction {
    tx: Transaction,
}

impl fmt::Debug for BusTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusTransaction").field("prefix", &self.tx.subjects.prefix).finish_non_exhaustive()
    }
}

impl BusTransaction {
    /// Puts `tokens` in front of the subjects of the events appended after this call, for
    /// example a tenant: `["tenant-42"]` gives `tenant-42.courses.LessonPublished`.
    ///
    /// Each token is checked: values from users never widen a subscription or publish
    /// where nobody expects.
    ///
    /// # Errors
    /// [`EventError::InvalidSubject`] for an empty token or one with `.`, `*`, `>`,
    /// whitespace, control or non-ASCII characters.
    pub fn subject_prefix(&mut self, tokens: &[&str]) -> Result<(), EventError> {
        for token in tokens {
            validate_subject_token(token)?;
        }
        self.tx.subjects.prefix = if tokens.is_empty() { None } else { Some(tokens.join(".")) };
        Ok(())
    }

    /// Appends events to one aggregate; see [`Transaction::append`].
    ///
    /// # Errors
    /// As [`Transaction::append`]; [`EventError::InvalidSubject`] when a subject would be
    /// invalid (nothing is written then).
    pub async fn append<E: DomainEvent>(
        &mut self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected: impl Into<ExpectedSequence>,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        self.tx.append(aggregate_type, aggregate_id, expected, events).await
    }

    /// Appends prepared envelopes; see [`Transaction::append_envelopes`].
    ///
    /// # Errors
    /// As [`append`](BusTransaction::append).
    pub async fn append_envelopes<E: DomainEvent>(
        &mut self,
        expected: impl Into<ExpectedSequence>,
        envelopes: Vec<EventEnvelope<E>>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        self.tx.append_envelopes(expected, envelopes).await
    }

    /// The database connection of the transaction, for the caller's own writes; see
    /// [`Transaction::connection`].
    pub fn connection(&mut self) -> Connection<'_> {
        self.tx.connection()
    }
}
