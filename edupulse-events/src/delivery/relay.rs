//! The relay: publishes the store's log to the broker.
//!
//! The events table is the one log. A relay reads it the way a projection does: the rows
//! past its checkpoint and below the transaction horizon, in `(transaction id, position)`
//! order. It publishes them pipelined with `Nats-Msg-Id` = event id, awaits the
//! acknowledgements, and saves its checkpoint once per batch. After a crash it re-sends at
//! most the batch after its checkpoint, and the broker drops those copies inside its
//! duplicate window.
//!
//! **Partitions.** Each event is stored with its partition, a hash of its aggregate id
//! ([`PARTITIONS`] of them), and each partition has its own checkpoint. A relay publishes
//! only the partitions it holds: on PostgreSQL through advisory *session* locks taken on a
//! connection of its own (its lease), so that it holds no transaction while it waits on the
//! broker, and never holds the horizon back itself. Several relays, in one process or
//! many, share the partitions; the others stand by and take a partition over within
//! [`RelayConfig::takeover_interval`] of its holder's death (PostgreSQL ends a dead
//! client's session, and with it the locks). The checkpoints are written over the lease,
//! so a relay whose session ended cannot move them any more.
//!
//! **Order.** A relay sends an aggregate's next event only after the broker acknowledged
//! the previous one (the [`Publisher`] contract), so the broker never holds an aggregate's
//! event before an earlier one, even when an acknowledgement fails mid-batch; a
//! partition's checkpoint never passes an event that is neither acknowledged nor parked.
//!
//! **Poison.** An event the broker refuses ([`EventError::Refused`]) is retried with
//! backoff; after [`RelayConfig::max_attempts`] refusals it is parked (a table, with the
//! refusal) and its aggregate's later events are parked behind it, so that nothing else
//! waits and the aggregate is never published out of order. Re-queue parked aggregates
//! with [`EventStore::requeue_parked`] once the cause is fixed. Failures that are not the
//! message's (a timeout, a lost connection, no stream) are retried without limit.
//!
//! **Lost messages.** A relay checks that the broker's streams still hold what they
//! acknowledged; a partition whose stream lost acknowledged messages (deleted, restored
//! from an older copy, a server that lost power before syncing) is held and reported until
//! what was lost is sent again, on request or on its own
//! ([`RelayConfig::republish_lost`]). See `delivery/lost.rs`. Nothing is handed to the
//! broker on a connection whose streams were not checked: the check is compared with the
//! connection right before each batch goes out, not only before its page is read (the
//! connection may be made again meanwhile, to a server back from an older copy).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tracing::Instrument;
use uuid::Uuid;

use crate::broker::Publisher;
use crate::delivery::lost::{self, StreamWatch};
use crate::delivery::message;
use crate::delivery::republish::{self, Republished};
use crate::event::wire::{OutgoingMessage, headers};
use crate::store::PARTITIONS;
use crate::store::backend::Lease;
use crate::store::log::{LogRow, MarkRow, Page, ParkedRow};
use crate::store::row::StoredRow;
use crate::store::{EventStore, RelayLag, StreamPosition};
use crate::{BrokerErrorKind, EventError, telemetry};

/// Settings of a [`LogRelay`]: `RelayConfig::default()`, then the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Rows read and published per batch at most (default 5 000). An aggregate's events go
    /// one acknowledgement round trip each, so a larger batch holds more aggregates in
    /// flight: measured in BENCHMARKS.md.
    pub batch_size: u32,
    /// Bytes of payload and metadata read per batch at most (default 16 MiB): what bounds
    /// a batch's memory when events are large (a batch holds at least one event).
    pub max_batch_bytes: usize,
    /// How often to look for new events when no commit of this process woke the relay
    /// (default 100 ms): commits of other processes are published within about this long.
    pub poll_interval: Duration,
    /// How often a relay tries to take partitions nobody holds (default 1 s): a standby
    /// takes over a dead relay's partitions within about this long.
    pub takeover_interval: Duration,
    /// The partitions this relay may hold (default all: `0..64`). Give several relays
    /// disjoint ranges to share the work, or the same range for standbys.
    pub partitions: Range<i32>,
    /// The shortest time between two checkpoint saves (default 100 ms): a batch's
    /// checkpoints are saved after it, unless the last save is more recent. After a crash
    /// the next holder re-sends at most what was published since the last save, and the
    /// broker drops the copies inside its duplicate window. Zero saves after every batch.
    pub checkpoint_interval: Duration,
    /// Refusals before an event is parked (default 5).
    pub max_attempts: u32,
    /// First delay after a failure (default 100 ms); doubled after each, with jitter.
    pub min_backoff: Duration,
    /// Longest delay between retries (default 30 s).
    pub max_backoff: Duration,
    /// How often the relay checks that the broker's streams still hold what they
    /// acknowledged (default 10 s); also when it takes partitions and after each
    /// reconnection to the broker.
    pub stream_check_interval: Duration,
    /// Send again, without being asked, what a stream lost (default off: the partition is
    /// held and reported until an operator runs `edupulse republish --lost`, or calls
    /// [`EventStore::request_republish_lost`], having looked at why it was lost).
    pub republish_lost: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 5_000,
            max_batch_bytes: 16 << 20,
            poll_interval: Duration::from_millis(100),
            takeover_interval: Duration::from_secs(1),
            partitions: 0..PARTITIONS,
            checkpoint_interval: Duration::from_millis(100),
            max_attempts: 5,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            stream_check_interval: Duration::from_secs(10),
            republish_lost: false,
        }
    }
}

setters!(RelayConfig {
    with_batch_size => batch_size: u32,
    with_max_batch_bytes => max_batch_bytes: usize,
    with_poll_interval => poll_interval: Duration,
    with_takeover_interval => takeover_interval: Duration,
    with_partitions => partitions: Range<i32>,
    with_checkpoint_interval => checkpoint_interval: Duration,
    with_max_attempts => max_attempts: u32,
    with_min_backoff => min_backoff: Duration,
    with_max_backoff => max_backoff: Duration,
    with_stream_check_interval => stream_check_interval: Duration,
    with_republish_lost => republish_lost: bool,
});

impl RelayConfig {
    /// An invalid setting, as an error.
    pub(crate) fn check(&self) -> Result<(), EventError> {
        let problem = if self.batch_size == 0 || self.max_batch_bytes == 0 {
            Some("batch_size and max_batch_bytes must be at least 1".to_owned())
        } else if self.partitions.start < 0 || self.partitions.end > PARTITIONS || self.partitions.is_empty()
        {
            Some(format!("partitions {:?} must be a non-empty range within 0..{PARTITIONS}", self.partitions))
        } else if self.max_attempts == 0 {
            Some("max_attempts must be at least 1".to_owned())
        } else if self.poll_interval.is_zero()
            || self.takeover_interval.is_zero()
            || self.stream_check_interval.is_zero()
        {
            Some("poll_interval, takeover_interval and stream_check_interval must be above zero".to_owned())
        } else if self.min_backoff.is_zero() || self.max_backoff < self.min_backoff {
            Some("min_backoff must be above zero and at most max_backoff".to_owned())
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(EventError::Config(format!("relay configuration: {p}"))))
    }

    /// The delay before retry number `tries` (from 1): capped exponential, with jitter.
    fn backoff(&self, tries: u32) -> Duration {
        let base =
            self.min_backoff.saturating_mul(1 << tries.saturating_sub(1).min(16)).min(self.max_backoff);
        let random = (Uuid::now_v7().as_u128() & 0xffff) as f64 / 65536.0;
        base.mul_f64(0.5 + random)
    }
}

/// What one pass of a relay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayPass {
    /// Events the broker acknowledged.
    pub published: u64,
    /// Events parked (refused for good, or waiting behind one that was).
    pub parked: u64,
    /// Events that failed and will be retried.
    pub failed: u64,
    /// Events not sent: they wait for their retry, or behind a failed one.
    pub waiting: u64,
    /// Partitions the relay held.
    pub partitions: u32,
    /// The last page was full: more events are waiting.
    pub more: bool,
}

/// Publishes the store's log to the broker: see the module docs. Runs as a background task
/// of the [`EventBus`](crate::EventBus) by default, or on its own (a process that only
/// publishes); any number of relays share the partitions.
pub struct LogRelay {
    store: EventStore,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    /// Failed events' attempts, kept from one run to the next (`run_once`).
    failing: Mutex<HashMap<i64, Failing>>,
}

impl std::fmt::Debug for LogRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogRelay").field("store", &self.store).field("config", &self.config).finish()
    }
}

impl LogRelay {
    /// A relay publishing `store`'s log through `publisher`.
    pub fn new(store: EventStore, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Self {
        Self { store, publisher, config, failing: Mutex::default() }
    }

    /// How far publication is behind; see [`EventStore::relay_lag`].
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn lag(&self) -> Result<RelayLag, EventError> {
        self.store.relay_lag().await
    }

    /// Sends the events from global position `from` to `to` (both included; without `to`, to
    /// the end of the readable stream) to the broker again, in stream order, `batch_size` at
    /// a time: for a stream that lost messages (deleted, or restored from an older backup).
    /// No checkpoint moves. Events the stream still holds inside its duplicate window are
    /// dropped by the broker and counted as [`Republished::duplicates`]; outside it they are
    /// stored a second time. Run it while no relay publishes newer events of the same
    /// aggregates, or the stream holds them before the republished ones.
    ///
    /// # Errors
    /// [`EventError::Config`] when `from` or `to` names no event; [`EventError::Database`];
    /// [`EventError::Broker`] at the first event the broker does not take, naming its position
    /// (the ones before it were sent).
    pub async fn republish(&self, from: i64, to: Option<i64>) -> Result<Republished, EventError> {
        self.config.check()?;
        let batch = usize::try_from(self.config.batch_size).unwrap_or(usize::MAX);
        republish::republish(&self.store, &*self.publisher, from, to, batch).await
    }

    /// Takes the free partitions, publishes everything below the horizon, and lets the
    /// partitions go. For tools and tests; [`run`](Self::run) keeps going.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid configuration; [`EventError::Database`].
    /// Broker failures are not errors here but [`RelayPass::failed`].
    pub async fn run_once(&self) -> Result<RelayPass, EventError> {
        self.config.check()?;
        let mut worker = Worker::new(self);
        worker.take_partitions().await?;
        let mut total = RelayPass::default();
        loop {
            let pass = worker.drain().await?;
            total.published += pass.published;
            total.parked += pass.parked;
            total.failed += pass.failed;
            total.partitions = pass.partitions;
            if !pass.more || (pass.published == 0 && (pass.failed > 0 || pass.waiting > 0)) {
                break;
            }
        }
        worker.release().await;
        worker.keep_failures();
        Ok(total)
    }

    /// Publishes until `shutdown` completes. A commit of this process wakes it at once;
    /// otherwise it looks every [`RelayConfig::poll_interval`]. Database and broker
    /// failures are logged and retried with capped backoff. When `shutdown` completes, the
    /// batch in progress finishes (at most one acknowledgement timeout; a backlog is not
    /// drained first, nor a repair of lost messages finished), its checkpoints are saved, and
    /// the partitions are free.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid configuration; nothing else: failures are
    /// retried.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), EventError> {
        self.config.check()?;
        let mut worker = Worker::new(self);
        let mut wake = self.store.inner.signals.subscribe();
        tokio::pin!(shutdown);
        let mut failures = 0_u32;
        // After a wake-up, look again soon: the commit may still be above the horizon (an
        // older transaction is finishing).
        let mut soon = Duration::from_millis(1);
        let stopping = worker.stopping.clone();
        loop {
            let outcome = {
                let round = worker.round();
                tokio::pin!(round);
                tokio::select! {
                    outcome = &mut round => outcome,
                    () = &mut shutdown => {
                        // The page or repair batch in progress finishes; nothing after it.
                        stopping.store(true, Ordering::Relaxed);
                        if let Err(e) = round.await {
                            tracing::warn!(error = %e, "relay: last pass failed while stopping");
                        }
                        break;
                    }
                }
            };
            let wait = match outcome {
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "relay: pass failed; partitions released, retrying");
                    worker.release().await;
                    self.config.backoff(failures)
                }
                Ok(pass) if pass.published == 0 && (pass.failed > 0 || pass.waiting > 0) => {
                    // Nothing went out: wait for the next retry, not for the next page.
                    failures += 1;
                    worker.next_retry().unwrap_or_else(|| self.config.backoff(failures))
                }
                Ok(pass) => {
                    failures = 0;
                    if pass.published > 0 {
                        tracing::debug!(published = pass.published, parked = pass.parked, "relay: published");
                    }
                    if pass.more {
                        Duration::ZERO
                    } else {
                        let wait = soon.min(self.config.poll_interval);
                        soon = soon.saturating_mul(2);
                        worker.next_retry().map_or(wait, |retry| retry.min(wait))
                    }
                }
            };
            let wait = worker.until_takeover().map_or(wait, |t| t.min(wait));
            let wait = worker.until_save().map_or(wait, |t| t.max(Duration::from_millis(1)).min(wait));
            if wait.is_zero() {
                continue;
            }
            let woken = tokio::select! {
                () = &mut shutdown => break,
                changed = wake.changed() => changed.is_ok(),
                () = tokio::time::sleep(wait) => false,
            };
            if woken {
                soon = Duration::from_millis(1);
            }
        }
        worker.release().await;
        Ok(())
    }
}

/// The span of one batch sent to the broker: `edupulse.publish_batch`, its size, positions
/// and the `traceparent` of its first event that carries one.
fn batch_span(messages: &[OutgoingMessage]) -> tracing::Span {
    let traceparent = messages.iter().find_map(|m| {
        m.headers.iter().find(|(name, _)| *name == headers::TRACEPARENT).map(|(_, v)| v.as_str())
    });
    tracing::info_span!(
        "edupulse.publish_batch",
        events = messages.len(),
        first_position = messages.first().map(|m| m.global_position),
        last_position = messages.last().map(|m| m.global_position),
        traceparent,
    )
}

/// An event that failed and waits for its next attempt.
struct Failing {
    partition: i32,
    position: StreamPosition,
    /// Refusals so far (parked at `max_attempts`).
    refusals: u32,
    /// Failures of any kind so far (the backoff).
    tries: u32,
    retry_at: Instant,
}

/// One page of the log, ready to publish: the rows' identities, and the messages of those
/// that are sent.
struct RowMeta {
    partition: i32,
    position: StreamPosition,
    /// The position of the row before it in the page (or where the page started).
    previous: StreamPosition,
    aggregate_id: Uuid,
    event_id: Uuid,
    sequence: i64,
    recorded_at: DateTime<Utc>,
}

impl RowMeta {
    fn of(row: &StoredRow, partition: i32, previous: StreamPosition) -> Self {
        Self {
            partition,
            position: position_of(row),
            previous,
            aggregate_id: row.aggregate_id,
            event_id: row.event_id,
            sequence: row.sequence,
            recorded_at: row.recorded_at,
        }
    }
}

/// How often a relay saves the checkpoints of partitions that had no event in a batch.
const FULL_SAVE_EVERY: Duration = Duration::from_secs(1);

/// How often a relay sets the publisher lag gauges (a count of the pending events).
const LAG_EVERY: Duration = Duration::from_secs(10);

/// What publishing a page left to save.
struct PageOutcome {
    /// Events parked.
    parked: Vec<ParkedRow>,
    /// The partitions that had events in the page.
    touched: HashSet<i32>,
}

/// A relay's state while it runs.
struct Worker<'a> {
    relay: &'a LogRelay,
    lease: Option<Lease>,
    /// The partitions held, ascending.
    held: Vec<i32>,
    checkpoints: HashMap<i32, StreamPosition>,
    /// The checkpoints as last saved.
    saved: HashMap<i32, StreamPosition>,
    /// Partitions with events published since the last save.
    unsaved: HashSet<i32>,
    last_save: Option<Instant>,
    last_full_save: Option<Instant>,
    /// Aggregates with parked events, and the position of their first.
    blocked: HashMap<Uuid, i64>,
    failing: HashMap<i64, Failing>,
    /// Acknowledged events past their partition's checkpoint (a failure before them holds
    /// it back): not sent again.
    acked_beyond: HashMap<i64, (i32, StreamPosition)>,
    last_takeover: Option<Instant>,
    /// When the lag gauges were last set.
    last_lag: Option<Instant>,
    /// What the broker's streams acknowledged to the held partitions.
    streams: StreamWatch,
    /// Set when the relay is asked to stop: a drain stops after the page in progress, a
    /// repair after the batch in progress.
    stopping: Arc<AtomicBool>,
    /// What the streams hold of events old enough to have been sent before the duplicate
    /// window (see `verify_aged`).
    aged: Aged,
}

/// What the streams were found to hold of the events older than half their duplicate window.
#[derive(Debug, Default)]
struct Aged {
    /// When the streams were read, from what time, for which partitions.
    read_at: Option<Instant>,
    since: Option<DateTime<Utc>>,
    partitions: HashSet<i32>,
    /// The event ids found.
    held: HashSet<Uuid>,
    /// The page being sent: events recorded before this are looked up in `held`.
    cutoff: Option<DateTime<Utc>>,
}

impl<'a> Worker<'a> {
    fn new(relay: &'a LogRelay) -> Self {
        Self {
            relay,
            lease: None,
            held: Vec::new(),
            checkpoints: HashMap::new(),
            saved: HashMap::new(),
            unsaved: HashSet::new(),
            last_save: None,
            last_full_save: None,
            blocked: HashMap::new(),
            failing: std::mem::take(&mut *relay.failing.lock().unwrap_or_else(PoisonError::into_inner)),
            acked_beyond: HashMap::new(),
            last_takeover: None,
            last_lag: None,
            streams: StreamWatch::default(),
            stopping: Arc::default(),
            aged: Aged::default(),
        }
    }

    /// Whether the streams were checked on the connection to the broker as it is now: read
    /// right before anything is handed to the publisher (which sends on the connection it
    /// finds), since a check made before a page was read may be of an earlier connection.
    fn connection_checked(&self) -> bool {
        self.streams.verified(self.relay.publisher.connection_epoch())
    }

    /// Whether the relay was asked to stop.
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Hands the failed events' attempts back to the relay, for its next run.
    fn keep_failures(&mut self) {
        let failing = std::mem::take(&mut self.failing);
        *self.relay.failing.lock().unwrap_or_else(PoisonError::into_inner) = failing;
    }

    fn config(&self) -> &RelayConfig {
        &self.relay.config
    }

    /// Takes free partitions when due, publishes, and saves checkpoints left unsaved once
    /// their interval has passed.
    async fn round(&mut self) -> Result<RelayPass, EventError> {
        if self.until_takeover().is_some_and(|t| t.is_zero()) {
            self.take_partitions().await?;
        }
        let pass = self.drain().await?;
        if self.until_save().is_some_and(|t| t.is_zero()) {
            self.flush().await?;
        }
        if self.last_lag.is_none_or(|at| at.elapsed() >= LAG_EVERY) {
            self.last_lag = Some(Instant::now());
            // Sets the lag gauges; a failure here is the next round's to report.
            if let Err(e) = self.relay.store.relay_lag().await {
                tracing::debug!(error = %e, "relay: cannot read the lag");
            }
        }
        Ok(pass)
    }

    /// How long until the checkpoints published since the last save are due; `None` when
    /// there are none.
    fn until_save(&self) -> Option<Duration> {
        let unsaved = self.checkpoints.iter().any(|(p, c)| self.saved.get(p).is_none_or(|s| s < c));
        if !unsaved {
            return None;
        }
        Some(
            self.last_save
                .map_or(Duration::ZERO, |at| self.config().checkpoint_interval.saturating_sub(at.elapsed())),
        )
    }

    /// How long until the relay next tries to take partitions; `None` when it holds all
    /// it may.
    fn until_takeover(&self) -> Option<Duration> {
        if self.held.len() == self.config().partitions.len() {
            return None;
        }
        Some(match self.last_takeover {
            None => Duration::ZERO,
            Some(at) => self.config().takeover_interval.saturating_sub(at.elapsed()),
        })
    }

    /// How long until the next failed event may be retried.
    fn next_retry(&self) -> Option<Duration> {
        let now = Instant::now();
        self.failing.values().filter(|f| f.retry_at > now).map(|f| f.retry_at - now).min()
    }

    /// Takes the free partitions of the configured range, with their checkpoints and
    /// parked aggregates.
    async fn take_partitions(&mut self) -> Result<(), EventError> {
        self.last_takeover = Some(Instant::now());
        let wanted: Vec<i32> = self.config().partitions.clone().filter(|p| !self.held.contains(p)).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let lease = match &mut self.lease {
            Some(lease) => lease,
            None => self.lease.insert(self.relay.store.inner.backend.lease().await?),
        };
        let taken = lease.lock(&wanted).await?;
        if taken.is_empty() {
            return Ok(());
        }
        let checkpoints = lease.checkpoints(&taken).await?;
        self.blocked.extend(lease.parked_heads(&taken).await?);
        self.streams.load(lease.marks(&taken).await?);
        self.relay.store.inner.signals.advance(&checkpoints, false);
        self.saved.extend(checkpoints.iter().copied());
        self.checkpoints.extend(checkpoints);
        self.held.extend(taken.iter().copied().filter(|p| self.checkpoints.contains_key(p)));
        self.held.sort_unstable();
        tracing::info!(partitions = ?taken, "relay: partitions taken");
        Ok(())
    }

    /// Lets every partition go (closing the lease's session frees its locks).
    async fn release(&mut self) {
        if let Err(e) = self.flush().await {
            tracing::debug!(error = %e, "relay: last checkpoints not saved; the next holder re-reads from older ones");
        }
        if let Some(lease) = self.lease.take() {
            lease.close().await;
        }
        self.held.clear();
        self.checkpoints.clear();
        self.saved.clear();
        self.unsaved.clear();
        self.last_save = None;
        self.last_full_save = None;
        self.blocked.clear();
        self.acked_beyond.clear();
        self.last_takeover = None;
        self.streams.clear();
        self.aged = Aged::default();
    }

    /// Publishes the held partitions' events below the horizon, page by page.
    async fn drain(&mut self) -> Result<RelayPass, EventError> {
        let mut pass =
            RelayPass { partitions: u32::try_from(self.held.len()).unwrap_or(0), ..RelayPass::default() };
        if self.held.is_empty() {
            return Ok(pass);
        }
        let limit = i64::from(self.config().batch_size);
        let mut after: Option<StreamPosition> = None;
        let mut stops = Stops::default();
        let mut excluded = HashSet::new();
        let mut requeued = self.blocked.is_empty();
        loop {
            // Before each page: after a reconnection (the broker may have restarted without
            // what it acknowledged), when taking partitions, and every so often.
            let epoch = self.relay.publisher.connection_epoch();
            if self.streams.due(epoch, self.config().stream_check_interval) {
                self.check_streams().await?;
            }
            if !self.streams.verified(epoch) {
                // Not checked on this connection yet (the broker does not answer): wait.
                pass.waiting += 1;
                pass.more = false;
                break;
            }
            // Partitions whose stream lost messages are not read: nothing newer goes out
            // before the lost ones are sent again, and their checkpoints stay. One left out
            // stays out for the rest of the pass (pages already read passed its rows by).
            for partition in self.streams.behind() {
                if excluded.insert(partition)
                    && let Some(&checkpoint) = self.checkpoints.get(&partition)
                {
                    stops.hold(partition, checkpoint);
                }
                // What was acknowledged past its checkpoint may be what the stream lost: once
                // repaired, the partition sends it again from the checkpoint, in order.
                self.acked_beyond.retain(|_, (p, _)| *p != partition);
            }
            let active: Vec<i32> = self.held.iter().copied().filter(|p| !excluded.contains(p)).collect();
            if !std::mem::replace(&mut requeued, true) {
                // Once per pass, before the pages, and only once the streams were checked.
                self.republish_requeued(&active, &mut pass).await?;
            }
            let from = after.or_else(|| active.iter().filter_map(|p| self.checkpoints.get(p)).min().copied());
            let Some(from) = from else {
                pass.more = false;
                break;
            };
            let Page { rows, cut } = self.page(from, limit, &active).await?;
            let Some(end) = rows.last().map(|r| position_of(&r.row)) else {
                pass.more = false;
                break;
            };
            if !self.verify_aged(&rows).await {
                // The broker does not answer what it holds: the page waits.
                pass.waiting += 1;
                pass.more = false;
                break;
            }
            pass.more = cut || i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
            let before = pass;
            let page = self.publish_page(rows, from, &mut stops, &mut pass).await;
            telemetry::relayed(
                pass.published - before.published,
                pass.failed - before.failed,
                pass.parked - before.parked,
            );
            self.settle(end, &stops.stuck, page).await?;
            after = Some(end);
            // Nothing went out while something failed or waits for its retry: the broker is
            // likely in trouble, so the next pages wait for the next pass.
            let nothing_acked = pass.published == before.published
                && (pass.failed > before.failed || pass.waiting > before.waiting);
            if !pass.more || nothing_acked || self.stopping() {
                break;
            }
        }
        Ok(pass)
    }

    /// Publishes one page; returns the events it parked and the partitions it touched.
    async fn publish_page(
        &mut self,
        rows: Vec<LogRow>,
        start: StreamPosition,
        stops: &mut Stops,
        pass: &mut RelayPass,
    ) -> PageOutcome {
        let mut page = PageOutcome { parked: Vec::new(), touched: HashSet::new() };
        let (sent, messages) = self.messages_of(rows, start, stops, pass, &mut page);
        if !messages.is_empty() && !self.connection_checked() {
            // The connection to the broker was made again while the page was read: the
            // server may have come back without what it acknowledged, and these would land
            // after the hole. They wait for the check, as when the broker is down; the
            // partitions' checkpoints stay before them.
            tracing::info!(
                events = sent.len(),
                "relay: the connection to the broker was made again since its streams were checked; \
                 the page waits for the next check"
            );
            for meta in &sent {
                stops.halt(meta);
            }
            pass.waiting += u64::try_from(sent.len()).unwrap_or(u64::MAX);
            return page;
        }
        self.streams.batch_starts();
        let outcomes = if messages.is_empty() {
            Vec::new()
        } else {
            self.relay.publisher.publish(&messages).instrument(batch_span(&messages)).await
        };
        // One clock reading for the batch: its acknowledgements came back together.
        let acked_at = Utc::now();
        let outcomes = sent.into_iter().zip(outcomes.into_iter().chain(std::iter::repeat_with(|| {
            Err(EventError::broker_message(BrokerErrorKind::Other, "the publisher returned no outcome"))
        })));
        for (meta, outcome) in outcomes {
            if stops.halted.contains(&meta.aggregate_id) {
                // An earlier event of the aggregate failed: this one waits for it.
                stops.hold(meta.partition, meta.previous);
                continue;
            }
            match outcome {
                Ok(receipt) => {
                    self.streams.acknowledged(meta.partition, meta.event_id, &receipt);
                    pass.published += 1;
                    telemetry::publish_latency((acked_at - meta.recorded_at).as_seconds_f64());
                    self.failing.remove(&meta.position.global_position);
                    self.acked_beyond.insert(meta.position.global_position, (meta.partition, meta.position));
                }
                Err(error) => self.settle_failure(&meta, &error, stops, &mut page.parked, pass),
            }
        }
        page
    }

    /// The page's rows that are to be sent now, with their messages. The others are passed
    /// (already published), parked behind their aggregate's parked event, or held back
    /// behind a failed one or until their retry.
    fn messages_of(
        &mut self,
        rows: Vec<LogRow>,
        start: StreamPosition,
        stops: &mut Stops,
        pass: &mut RelayPass,
        page: &mut PageOutcome,
    ) -> (Vec<RowMeta>, Vec<OutgoingMessage>) {
        let now = Instant::now();
        let (mut sent, mut messages) = (Vec::new(), Vec::new());
        let mut previous = start;
        for LogRow { partition, subject, row } in rows {
            let meta = RowMeta::of(&row, partition, previous);
            previous = meta.position;
            page.touched.insert(partition);
            let checkpoint = self.checkpoints.get(&partition).copied();
            if checkpoint.is_none_or(|c| meta.position <= c)
                || self.acked_beyond.contains_key(&meta.position.global_position)
            {
                continue;
            }
            if self.aged.cutoff.is_some_and(|cutoff| row.recorded_at < cutoff)
                && self.aged.held.contains(&row.event_id)
            {
                // Sent before and still in the stream: sending it again now, past the
                // duplicate window, would store it twice.
                continue;
            }
            if let Some(&head) = self.blocked.get(&meta.aggregate_id) {
                let reason = format!("waits behind parked event at position {head}");
                page.parked.push(park(&meta, Some(head), 0, reason));
                pass.parked += 1;
                continue;
            }
            let retry_later =
                self.failing.get(&meta.position.global_position).is_some_and(|f| f.retry_at > now);
            if stops.halted.contains(&meta.aggregate_id) || retry_later {
                pass.waiting += u64::from(retry_later);
                stops.halt(&meta);
                continue;
            }
            match message::outgoing(row, subject) {
                Ok(message) => {
                    messages.push(message);
                    sent.push(meta);
                }
                Err(e) => {
                    // Settled now, so that the aggregate's later events are not sent.
                    let message = format!("cannot be made a message: {e}");
                    let error = EventError::Refused { message, source: Some(Box::new(e)) };
                    self.settle_failure(&meta, &error, stops, &mut page.parked, pass);
                }
            }
        }
        (sent, messages)
    }

    /// Settles an event that failed: parked once refused `max_attempts` times (its
    /// aggregate's later events then park behind it), else held back for its retry with
    /// its aggregate's later events, its partition's checkpoint before it.
    fn settle_failure(
        &mut self,
        meta: &RowMeta,
        error: &EventError,
        stops: &mut Stops,
        parked: &mut Vec<ParkedRow>,
        pass: &mut RelayPass,
    ) {
        if let Some(row) = self.failed(meta, error) {
            self.blocked.insert(meta.aggregate_id, meta.position.global_position);
            parked.push(row);
            pass.parked += 1;
        } else {
            stops.halt(meta);
            pass.failed += 1;
        }
    }

    /// Records a failed attempt; returns the parked row when the event is refused for good.
    fn failed(&mut self, meta: &RowMeta, error: &EventError) -> Option<ParkedRow> {
        let refused = error.is_refusal();
        let key = meta.position.global_position;
        let entry = self.failing.entry(key).or_insert(Failing {
            partition: meta.partition,
            position: meta.position,
            refusals: 0,
            tries: 0,
            retry_at: Instant::now(),
        });
        entry.tries += 1;
        entry.refusals += u32::from(refused);
        if refused && entry.refusals >= self.relay.config.max_attempts {
            let attempts = i32::try_from(entry.refusals).unwrap_or(i32::MAX);
            self.failing.remove(&key);
            tracing::error!(
                event_id = %meta.event_id,
                position = key,
                attempts,
                %error,
                "relay: event refused by the broker, parked; its aggregate's later events wait behind it"
            );
            return Some(park(meta, None, attempts, error.to_string()));
        }
        let tries = entry.tries;
        entry.retry_at = Instant::now() + self.relay.config.backoff(tries);
        tracing::warn!(event_id = %meta.event_id, position = key, tries, %error, "relay: publish failed, will retry");
        None
    }

    /// Moves the checkpoints past what this page settled and saves them with the parked
    /// events; tells this process's committers.
    async fn settle(
        &mut self,
        end: StreamPosition,
        stuck: &HashMap<i32, StreamPosition>,
        page: PageOutcome,
    ) -> Result<(), EventError> {
        let PageOutcome { parked, touched } = page;
        let moved = self.advance(end, stuck);
        if moved.is_empty() && parked.is_empty() {
            return Ok(());
        }
        let signals = &self.relay.store.inner.signals;
        if parked.is_empty() {
            // Acknowledged: tell the committers before the checkpoint is written.
            signals.advance(&moved, false);
        }
        self.unsaved.extend(touched);
        // Checkpoints are saved once per batch, but not more often than every
        // `checkpoint_interval`: a write per commit would cost the committers (measured: a
        // third of their throughput at one event per commit). A crash re-sends what the
        // unsaved stretch published, and the broker drops the copies. Parked events are
        // saved at once, with the checkpoints that pass them.
        let interval = self.relay.config.checkpoint_interval;
        if !parked.is_empty() || self.last_save.is_none_or(|at| at.elapsed() >= interval) {
            self.save_due(&parked).await?;
        }
        if !parked.is_empty() {
            self.relay.store.inner.signals.advance(&moved, true);
        }
        Ok(())
    }

    /// Moves each held partition's checkpoint to `end`, or to where the pass is stuck in
    /// it; forgets what the checkpoints passed. Returns the checkpoints that moved.
    fn advance(
        &mut self,
        end: StreamPosition,
        stuck: &HashMap<i32, StreamPosition>,
    ) -> Vec<(i32, StreamPosition)> {
        let mut moved = Vec::new();
        for partition in &self.held {
            let target = stuck.get(partition).copied().unwrap_or(end);
            if let Some(checkpoint) = self.checkpoints.get_mut(partition)
                && target > *checkpoint
            {
                *checkpoint = target;
                moved.push((*partition, target));
            }
        }
        let checkpoints = &self.checkpoints;
        let passed = |partition: &i32, position: &StreamPosition| {
            checkpoints.get(partition).is_none_or(|c| position <= c)
        };
        self.acked_beyond.retain(|_, (partition, position)| !passed(partition, position));
        self.failing.retain(|_, f| !passed(&f.partition, &f.position));
        moved
    }

    /// Saves `parked` with the checkpoints due: those of the partitions that had events
    /// since the last save, and the others (moved only because a batch passed them by) at
    /// most once a second, or all of them with parked events.
    async fn save_due(&mut self, parked: &[ParkedRow]) -> Result<(), EventError> {
        let everything =
            !parked.is_empty() || self.last_full_save.is_none_or(|at| at.elapsed() >= FULL_SAVE_EVERY);
        let due: Vec<(i32, StreamPosition)> = self
            .checkpoints
            .iter()
            .filter(|(p, c)| {
                (everything || self.unsaved.contains(p)) && self.saved.get(p).is_none_or(|s| s < c)
            })
            .map(|(p, c)| (*p, *c))
            .collect();
        if !due.is_empty() || !parked.is_empty() {
            self.save(&due, parked).await?;
            self.saved.extend(due);
        }
        self.unsaved.clear();
        self.last_save = Some(Instant::now());
        if everything {
            self.last_full_save = Some(Instant::now());
        }
        Ok(())
    }

    /// Saves every checkpoint that moved since it was last saved.
    async fn flush(&mut self) -> Result<(), EventError> {
        let due: Vec<(i32, StreamPosition)> = self
            .checkpoints
            .iter()
            .filter(|(p, c)| self.saved.get(p).is_none_or(|s| s < c))
            .map(|(p, c)| (*p, *c))
            .collect();
        if !due.is_empty() {
            self.save(&due, &[]).await?;
            self.saved.extend(due);
        }
        self.unsaved.clear();
        self.last_save = Some(Instant::now());
        Ok(())
    }

    /// Publishes the parked events of re-queued aggregates of `partitions` again, each
    /// aggregate in order; an aggregate all of whose parked events went out flows again.
    async fn republish_requeued(
        &mut self,
        partitions: &[i32],
        pass: &mut RelayPass,
    ) -> Result<(), EventError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let lease = self.lease.as_mut().ok_or_else(no_lease)?;
        let rows = lease.requeued(partitions).await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut metas = Vec::with_capacity(rows.len());
        let mut messages = Vec::with_capacity(rows.len());
        // Refused again, with the position and the reason; or failed otherwise (retried).
        let mut refused: HashMap<Uuid, (i64, String)> = HashMap::new();
        let mut failed: HashSet<Uuid> = HashSet::new();
        for LogRow { subject, row, .. } in rows {
            let (aggregate_id, position) = (row.aggregate_id, row.global_position);
            if refused.contains_key(&aggregate_id) {
                continue;
            }
            match message::outgoing(row, subject) {
                Ok(message) => {
                    metas.push((aggregate_id, position));
                    messages.push(message);
                }
                Err(e) => {
                    refused.insert(aggregate_id, (position, format!("cannot be made a message: {e}")));
                }
            }
        }
        // An aggregate refused before sending anything keeps its later events back.
        let (metas, messages): (Vec<_>, Vec<_>) =
            metas.into_iter().zip(messages).filter(|((a, _), _)| !refused.contains_key(a)).unzip();
        if !self.connection_checked() {
            // Made again since the streams were checked: the next pass, once they are.
            return Ok(());
        }
        let outcomes = self.relay.publisher.publish(&messages).await;
        let mut acked = Vec::new();
        for ((aggregate_id, position), outcome) in metas.into_iter().zip(outcomes) {
            if failed.contains(&aggregate_id) || refused.contains_key(&aggregate_id) {
                continue;
            }
            match outcome {
                Ok(_) => acked.push(position),
                Err(EventError::Refused { message, .. }) => {
                    refused.insert(aggregate_id, (position, message));
                }
                Err(e) => {
                    tracing::warn!(error = %e, position, "relay: re-queued event not published, will retry");
                    failed.insert(aggregate_id);
                }
            }
        }
        pass.published += u64::try_from(acked.len()).unwrap_or(0);
        let held = &self.held;
        let lease = self.lease.as_mut().ok_or_else(no_lease)?;
        lease.unpark(&acked).await?;
        for (aggregate_id, (position, reason)) in &refused {
            lease.refused_again(*aggregate_id, *position, reason).await?;
        }
        self.blocked = lease.parked_heads(held).await?;
        Ok(())
    }

    async fn page(
        &mut self,
        after: StreamPosition,
        limit: i64,
        partitions: &[i32],
    ) -> Result<Page, EventError> {
        let max_bytes = self.config().max_batch_bytes;
        let lease = self.lease.as_mut().ok_or_else(no_lease)?;
        lease.page(after, limit, max_bytes, partitions).await
    }

    async fn save(
        &mut self,
        checkpoints: &[(i32, StreamPosition)],
        parked: &[ParkedRow],
    ) -> Result<(), EventError> {
        let lease = self.lease.as_mut().ok_or_else(no_lease)?;
        lease.save(checkpoints, parked).await?;
        let marks = self.streams.unsaved();
        let rows: Vec<MarkRow<'_>> = marks
            .iter()
            .map(|(partition, stream, sequence, event_id)| MarkRow {
                partition: *partition,
                stream,
                sequence: *sequence,
                event_id: *event_id,
            })
            .collect();
        lease.save_marks(&rows).await?;
        self.streams.saved(&marks);
        Ok(())
    }

    /// Before a page is sent: an event recorded longer ago than half the streams' duplicate
    /// window may have been sent already, longer ago than the window (by a relay that died
    /// before saving its checkpoint, or in an attempt whose acknowledgement never came,
    /// before a long outage or a partition held for lost messages), and the stream would
    /// store it again. So the streams are read (headers only) for those events' partitions,
    /// from a little before the oldest of them; the events they hold are not sent again.
    /// A reading serves the pages after it for a quarter of the window. `false` when the
    /// broker does not answer.
    async fn verify_aged(&mut self, rows: &[LogRow]) -> bool {
        self.aged.cutoff = None;
        let Some(window) = self.streams.duplicate_window() else { return true };
        let half = chrono::TimeDelta::from_std(window / 2).unwrap_or_default();
        let cutoff = Utc::now() - half;
        let aged = rows.iter().filter(|r| r.row.recorded_at < cutoff);
        let Some(oldest) = aged.clone().map(|r| r.row.recorded_at).min() else { return true };
        let partitions: HashSet<i32> = aged.map(|r| r.partition).collect();
        let since = oldest - half;
        let fresh = self.aged.read_at.is_some_and(|at| at.elapsed() < window / 4)
            && self.aged.since.is_some_and(|read_from| read_from <= since)
            && partitions.is_subset(&self.aged.partitions);
        if !fresh {
            let wanted: Vec<i32> = partitions.iter().copied().collect();
            let mut held = HashSet::new();
            for stream in self.streams.streams() {
                match self.read_stream(&stream, &wanted, Some(since)).await {
                    Reading::Holds(_, _, found) => held.extend(found.events),
                    Reading::NoStream => {}
                    Reading::NoAnswer => return false,
                }
            }
            tracing::info!(
                partitions = wanted.len(),
                held = held.len(),
                "relay: events older than half the duplicate window looked up in the stream before sending"
            );
            self.aged =
                Aged { read_at: Some(Instant::now()), since: Some(since), partitions, held, cutoff: None };
        }
        self.aged.cutoff = Some(cutoff);
        true
    }

    /// Checks the held partitions' streams; repairs those asked for (or all, with
    /// `republish_lost`).
    async fn check_streams(&mut self) -> Result<(), EventError> {
        let publisher = &*self.relay.publisher;
        let lease = self.lease.as_mut().ok_or_else(no_lease)?;
        self.streams.check(publisher, lease, &self.held).await?;
        // One read of each stream, and one pass over the log, serve every partition
        // repaired on it.
        let mut by_stream: HashMap<Arc<str>, Vec<i32>> = HashMap::new();
        for (partition, stream) in self.streams.to_repair(self.relay.config.republish_lost) {
            by_stream.entry(stream).or_default().push(partition);
        }
        for (stream, partitions) in by_stream {
            if self.stopping() {
                return Ok(());
            }
            // What is sent again goes out on the connection the streams were checked and read
            // on, or not at all (see `lost::resend`).
            let epoch = publisher.connection_epoch();
            if !self.streams.verified(epoch) {
                return Ok(());
            }
            let Reading::Holds(last, subjects, held) = self.read_stream(&stream, &partitions, None).await
            else {
                continue;
            };
            self.repair(&partitions, &stream, last, epoch, subjects, &held).await?;
        }
        Ok(())
    }

    /// What `stream` holds of `partitions`' events (stored since `since`, when given): its
    /// last sequence, its subjects and the event ids (headers only).
    async fn read_stream(
        &self,
        stream: &Arc<str>,
        partitions: &[i32],
        since: Option<DateTime<Utc>>,
    ) -> Reading {
        let publisher = &*self.relay.publisher;
        let postponed = |e: &EventError| {
            tracing::warn!(stream = &**stream, error = %e, "relay: cannot read what the stream holds; later");
        };
        let (last, subjects) = match publisher.stream_state(stream).await {
            Ok(Some(state)) => (state.last_sequence, state.subjects),
            Ok(None) => return Reading::NoStream,
            Err(e) => {
                postponed(&e);
                return Reading::NoAnswer;
            }
        };
        // Which of the partitions the stream holds anything of, noted as it is read.
        let holding = Mutex::new(HashSet::new());
        let wanted = |aggregate_id: Uuid| {
            let partition = crate::store::model::partition_of(aggregate_id);
            let wanted = partitions.contains(&partition);
            if wanted {
                holding.lock().unwrap_or_else(PoisonError::into_inner).insert(partition);
            }
            wanted
        };
        // A long read gives way to a stop: the next holder reads again.
        let read = publisher.held_events(stream, last, since, &wanted);
        let stopped = async {
            while !self.stopping() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let held = tokio::select! {
            held = read => held,
            () = stopped => return Reading::NoAnswer,
        };
        match held {
            Ok(held) => {
                let holding = holding.into_inner().unwrap_or_else(PoisonError::into_inner);
                Reading::Holds(
                    last,
                    subjects,
                    Held { events: held.into_iter().collect(), partitions: holding },
                )
            }
            Err(e) => {
                postponed(&e);
                Reading::NoAnswer
            }
        }
    }

    /// Sends again what `stream` lost of `partitions`' events (see `delivery/lost.rs`),
    /// given what it holds up to its `last` sequence, read on connection `epoch`: one pass
    /// over the log for all of them.
    async fn repair(
        &mut self,
        partitions: &[i32],
        stream: &Arc<str>,
        last: u64,
        epoch: u64,
        subjects: Vec<String>,
        held: &Held,
    ) -> Result<(), EventError> {
        let partitions: Vec<(i32, StreamPosition)> =
            partitions.iter().filter_map(|p| self.checkpoints.get(p).map(|c| (*p, *c))).collect();
        if partitions.is_empty() {
            return Ok(());
        }
        let publisher = &*self.relay.publisher;
        let batch = (i64::from(self.relay.config.batch_size), self.relay.config.max_batch_bytes);
        let lease = self.lease.as_mut().ok_or_else(no_lease)?;
        let loss = lost::Loss {
            partitions,
            held: &held.events,
            holding: &held.partitions,
            held_up_to: last,
            epoch,
            subjects,
            parked: &self.blocked,
            stop: &self.stopping,
        };
        match lost::resend(lease, publisher, loss, batch).await {
            Ok(None) => {
                tracing::info!(
                    stream = &**stream,
                    "relay: stopping; the repair is finished by the next holder"
                );
                Ok(())
            }
            Ok(Some(resent)) => {
                let mut repaired: Vec<(i32, lost::Resent)> = resent.into_iter().collect();
                repaired.sort_by_key(|(partition, _)| *partition);
                for (partition, resent) in repaired {
                    tracing::warn!(
                        partition,
                        stream = &**stream,
                        resent = resent.events,
                        still_held = held.events.len(),
                        "relay: sent again what the stream lost; the partition is published again"
                    );
                    self.streams.repaired(lease, partition, stream, &resent).await?;
                }
                Ok(())
            }
            Err(EventError::Database(e)) => Err(EventError::Database(e)),
            Err(e) => {
                tracing::warn!(stream = &**stream, error = %e, "relay: repair failed; retried at the next check");
                Ok(())
            }
        }
    }
}

/// A reading of what a stream holds.
enum Reading {
    /// Its last sequence, its subjects, and what it holds of the partitions asked about.
    Holds(u64, Vec<String>, Held),
    /// The broker has no such stream.
    NoStream,
    /// The broker did not answer, or could not read it to its end.
    NoAnswer,
}

/// What a stream holds of the partitions a relay repairs: the event ids, and the partitions
/// it holds any event of.
struct Held {
    events: HashSet<Uuid>,
    partitions: HashSet<i32>,
}

/// What a pass stopped: aggregates with an event that failed or waits for its retry (their
/// later events wait too), and per partition the checkpoint it may not pass in this pass.
#[derive(Default)]
struct Stops {
    halted: HashSet<Uuid>,
    stuck: HashMap<i32, StreamPosition>,
}

impl Stops {
    /// Stops `meta`'s aggregate, and its partition's checkpoint before it.
    fn halt(&mut self, meta: &RowMeta) {
        self.halted.insert(meta.aggregate_id);
        self.hold(meta.partition, meta.previous);
    }

    /// Keeps a partition's checkpoint at or before `position` for the rest of the pass: an
    /// event after it failed or waits. The lowest such position wins, whatever the order in
    /// which they are found (an event found waiting while building the page, then an
    /// earlier one whose publish failed).
    fn hold(&mut self, partition: i32, position: StreamPosition) {
        self.stuck.entry(partition).and_modify(|held| *held = (*held).min(position)).or_insert(position);
    }
}

fn no_lease() -> EventError {
    EventError::Config("the relay holds no partitions of this store".into())
}

fn position_of(row: &StoredRow) -> StreamPosition {
    StreamPosition { transaction_id: row.transaction_id, global_position: row.global_position }
}

fn park(meta: &RowMeta, blocked_by: Option<i64>, attempts: i32, reason: String) -> ParkedRow {
    ParkedRow {
        global_position: meta.position.global_position,
        event_id: meta.event_id,
        aggregate_id: meta.aggregate_id,
        sequence: meta.sequence,
        partition: meta.partition,
        blocked_by,
        attempts,
        reason,
    }
}
