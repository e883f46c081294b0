//! The outbox relay: publishes what the bus committed but the broker has not acknowledged.
//!
//! Ordering across several relays: outbox rows carry a partition (a hash of the aggregate
//! id, [`PARTITIONS`] of them). A claimer holds the partition's advisory lock for its
//! transaction, claims the partition's oldest rows by deleting them (`DELETE … RETURNING`),
//! publishes them in position order and commits; when the broker refuses any, the claim is
//! rolled back to a savepoint, only the acknowledged rows are deleted and the failures are
//! recorded. One claimer per partition at a time, so one aggregate's events are never
//! reordered, whatever the number of relays; `SKIP LOCKED` alone would let two relays
//! interleave an aggregate.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sqlx::postgres::PgListener;
use uuid::Uuid;

use crate::EventError;
use crate::postgres::ClaimedRow;
use crate::publisher::Publisher;
use crate::store::{Backend, EventStore};
use crate::wire::{self, OutgoingMessage};

/// The number of outbox partitions: the most relays that can publish at once.
pub const PARTITIONS: i32 = 64;

/// The partition of an aggregate.
pub(crate) fn partition_of(aggregate_id: Uuid) -> i32 {
    // `as` is exact: the remainder is below 64.
    (aggregate_id.as_u128() % PARTITIONS as u128) as i32
}

/// What one pass over a partition did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayPass {
    /// Events the broker acknowledged.
    pub published: u64,
    /// Events the broker did not acknowledge (left pending, attempt recorded).
    pub failed: u64,
    /// Partitions skipped because another claimer held them.
    pub busy_partitions: u32,
}

impl RelayPass {
    fn add(&mut self, other: Self) {
        self.published += other.published;
        self.failed += other.failed;
        self.busy_partitions += other.busy_partitions;
    }
}

/// The outbox's backlog, for monitoring.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxLag {
    /// Events committed but not yet acknowledged by the broker.
    pub pending: i64,
    /// Age of the oldest pending event.
    pub oldest_age: Option<Duration>,
    /// The most attempts any pending event has had.
    pub max_attempts: i32,
    /// The newest error recorded on a pending event.
    pub last_error: Option<String>,
}

/// Claims and publishes outbox rows; shared by the bus (right after commit) and the relay.
pub(crate) struct Claimer {
    pub(crate) store: EventStore,
    pub(crate) publisher: Arc<dyn Publisher>,
    pub(crate) batch_size: i64,
}

/// The outcome of publishing one claimed batch.
struct Published {
    acked: Vec<i64>,
    failed: Vec<i64>,
    errors: Vec<String>,
}

impl Claimer {
    /// Publishes a partition's pending rows at positions up to `up_to` until none are left or
    /// the broker fails.
    pub(crate) async fn drain_partition(&self, partition: i32, up_to: i64) -> Result<RelayPass, EventError> {
        let mut pass = RelayPass::default();
        loop {
            let (claimed, published) = match &self.store.inner.backend {
                Backend::Postgres(pg) => {
                    let mut tx = pg.pool.begin().await?;
                    if !pg.lock_partition(&mut tx, partition).await? {
                        pass.busy_partitions += 1;
                        return Ok(pass);
                    }
                    // The claim deletes the rows; when the broker refuses any of them, all
                    // come back and only the acknowledged ones are deleted again.
                    pg.savepoint(&mut tx).await?;
                    let claimed = pg.outbox_claim(&mut tx, partition, self.batch_size, up_to).await?;
                    let count = claimed.len();
                    let published = self.publish(claimed).await;
                    if !published.failed.is_empty() {
                        pg.rollback_to_savepoint(&mut tx).await?;
                        pg.outbox_delete(&mut tx, &published.acked).await?;
                        pg.outbox_failed(&mut tx, &published.failed, &published.errors).await?;
                    }
                    tx.commit().await?;
                    (count, published)
                }
                Backend::Sqlite(sq) => {
                    let Some(_claimer) = sq.try_lock_partition(partition) else {
                        pass.busy_partitions += 1;
                        return Ok(pass);
                    };
                    let claimed = sq.outbox_claim(partition, self.batch_size, up_to).await?;
                    let count = claimed.len();
                    let published = self.publish(claimed).await;
                    sq.outbox_finish(&published.acked, &published.failed, &published.errors).await?;
                    (count, published)
                }
            };
            pass.published += published.acked.len() as u64;
            pass.failed += published.failed.len() as u64;
            if let Some(error) = published.errors.first() {
                tracing::warn!(
                    partition,
                    failed = published.failed.len(),
                    %error,
                    "outbox: publish failed, events stay pending"
                );
                return Ok(pass);
            }
            if i64::try_from(claimed).unwrap_or(i64::MAX) < self.batch_size {
                return Ok(pass);
            }
        }
    }

    /// Publishes claimed rows in order; sorts the outcomes into acknowledged and failed.
    async fn publish(&self, claimed: Vec<ClaimedRow>) -> Published {
        let mut out = Published { acked: Vec::new(), failed: Vec::new(), errors: Vec::new() };
        let mut messages: Vec<OutgoingMessage> = Vec::with_capacity(claimed.len());
        for claimed in claimed {
            let position = claimed.row.global_position;
            match wire::outgoing(claimed.row, claimed.subject) {
                Ok(message) => messages.push(message),
                Err(e) => {
                    out.failed.push(position);
                    out.errors.push(e.to_string());
                }
            }
        }
        if messages.is_empty() {
            return out;
        }
        let outcomes = self.publisher.publish(&messages).await;
        for (message, outcome) in messages.iter().zip(outcomes) {
            match outcome {
                Ok(_) => out.acked.push(message.global_position),
                Err(e) => {
                    out.failed.push(message.global_position);
                    out.errors.push(e.to_string());
                }
            }
        }
        out
    }
}

/// Settings of an [`OutboxRelay`].
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows claimed and published per round trip (default 500).
    pub batch_size: u32,
    /// How often to look for pending rows when no notification arrives (default 1 s).
    /// LISTEN/NOTIFY wakes the relay at once after a commit; polling is the safety net.
    pub poll_interval: Duration,
    /// First delay after a failed publish (default 100 ms); doubled after each failure.
    pub min_backoff: Duration,
    /// Longest delay between retries (default 30 s).
    pub max_backoff: Duration,
    /// Partitions drained at once by this relay (default 4).
    pub concurrency: usize,
    /// How long a running relay leaves new rows to the bus that committed them (default 1 s).
    ///
    /// Right after COMMIT the bus publishes its events itself; a relay pass that claimed them
    /// in that moment would publish them a second time (JetStream drops the copy) and make
    /// the aggregate's next commit wait for the relay. So [`run`](OutboxRelay::run)'s own
    /// passes (polls, and the passes that follow one that published) claim only rows that
    /// were already written this long ago. The pass after a notification (a bus asking for
    /// help: a failed publish, older events pending, or `publish_after_commit = false`) and
    /// [`run_once`](OutboxRelay::run_once) claim every row. Zero claims every row always.
    pub settle_time: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            concurrency: 4,
            settle_time: Duration::from_secs(1),
        }
    }
}

/// Republishes whatever the broker did not acknowledge, in order per aggregate, until shut
/// down. Run one or several (in this process or others): see the module docs for why they
/// never reorder an aggregate's events.
pub struct OutboxRelay {
    claimer: Claimer,
    config: RelayConfig,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("store", &self.claimer.store)
            .field("config", &self.config)
            .finish()
    }
}

impl OutboxRelay {
    /// A relay for `store`'s outbox, publishing through `publisher`.
    pub fn new(store: EventStore, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Self {
        let batch_size = i64::from(config.batch_size.max(1));
        Self { claimer: Claimer { store, publisher, batch_size }, config }
    }

    /// One pass: drains every partition with pending rows that no other claimer holds.
    ///
    /// # Errors
    /// [`EventError::Database`]; broker failures are not errors here but
    /// [`RelayPass::failed`], the events staying pending.
    pub async fn run_once(&self) -> Result<RelayPass, EventError> {
        self.pass(i64::MAX).await
    }

    /// A pass over the rows at positions up to `up_to`. Claiming a prefix of the positions
    /// keeps each aggregate in order: a row is never published before a lower one left out.
    async fn pass(&self, up_to: i64) -> Result<RelayPass, EventError> {
        let mut partitions = match &self.claimer.store.inner.backend {
            Backend::Postgres(pg) => pg.outbox_partitions(up_to).await?,
            Backend::Sqlite(sq) => sq.outbox_partitions(up_to).await?,
        };
        // Start at a random partition, so that several relays spread out.
        let offset = (Uuid::now_v7().as_u128() as usize) % partitions.len().max(1);
        partitions.rotate_left(offset);
        // Several partitions at once: each has its own claimer lock, so order per aggregate
        // holds, and the broker's acknowledgements of one overlap the database work of another.
        let mut passes = futures_util::stream::iter(partitions)
            .map(|partition| self.claimer.drain_partition(partition, up_to))
            .buffer_unordered(self.config.concurrency.max(1));
        let mut total = RelayPass::default();
        while let Some(pass) = passes.next().await {
            total.add(pass?);
        }
        Ok(total)
    }

    /// The backlog: pending events, the oldest one's age, attempts and the last error.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn lag(&self) -> Result<OutboxLag, EventError> {
        outbox_lag(&self.claimer.store).await
    }

    /// Runs until `shutdown` completes: drains, then waits for a notification or the poll
    /// interval; after a failure, waits with capped exponential backoff and jitter. A pass
    /// in progress finishes before the relay stops (at most one acknowledgement timeout).
    ///
    /// # Errors
    /// None in practice: database and broker failures are logged and retried.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), EventError> {
        let mut wakeup = match &self.claimer.store.inner.backend {
            Backend::Postgres(pg) => match listen(pg).await {
                Ok(listener) => Wakeup::Listen(listener),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay: LISTEN failed, polling only");
                    Wakeup::Poll
                }
            },
            Backend::Sqlite(sq) => Wakeup::InProcess(sq.subscribe_outbox()),
        };
        tokio::pin!(shutdown);
        let mut backoff = self.config.min_backoff;
        let mut marks = VecDeque::new();
        // The first pass takes every row: whatever is there was left by a stopped process.
        let mut take_all = true;
        loop {
            let result = match self.settled_mark(&mut marks).await {
                Ok(settled) => self.pass(if take_all { i64::MAX } else { settled }).await,
                Err(e) => Err(e),
            };
            take_all = false;
            let wait = match result {
                Ok(pass) if pass.failed > 0 => {
                    // The retry takes every row again, however young.
                    take_all = true;
                    let wait = jitter(backoff);
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    wait
                }
                Ok(pass) if pass.published > 0 => {
                    backoff = self.config.min_backoff;
                    if let Ok(lag) = self.lag().await {
                        tracing::info!(
                            published = pass.published,
                            pending = lag.pending,
                            "outbox relay: published"
                        );
                    }
                    Duration::ZERO
                }
                Ok(_) => {
                    backoff = self.config.min_backoff;
                    self.config.poll_interval
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay: pass failed");
                    take_all = true;
                    let wait = jitter(backoff);
                    backoff = (backoff * 2).min(self.config.max_backoff);
                    wait
                }
            };
            if wait.is_zero() {
                continue;
            }
            let notified = async {
                match &mut wakeup {
                    Wakeup::Listen(listener) => {
                        if listener.recv().await.is_err() {
                            // The listener reconnects on the next call; meanwhile poll.
                            tokio::time::sleep(wait).await;
                        }
                    }
                    Wakeup::InProcess(receiver) => {
                        if receiver.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    Wakeup::Poll => std::future::pending::<()>().await,
                }
            };
            // After a failure, a notification must not cut the backoff short.
            let failing = backoff > self.config.min_backoff;
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(wait) => {}
                // A bus asks for help: take its rows now, however young.
                () = notified, if !failing => take_all = true,
            }
        }
    }

    /// Notes the store's highest position now and returns the highest one noted at least
    /// [`settle_time`](RelayConfig::settle_time) ago (0 when there is none yet): the rows up to
    /// it are no longer the committing bus's business.
    async fn settled_mark(&self, marks: &mut VecDeque<(Instant, i64)>) -> Result<i64, EventError> {
        let settle = self.config.settle_time;
        if settle.is_zero() {
            return Ok(i64::MAX);
        }
        let now = Instant::now();
        let mark = match &self.claimer.store.inner.backend {
            Backend::Postgres(pg) => pg.high_water().await?,
            Backend::Sqlite(sq) => sq.high_water().await?,
        };
        marks.push_back((now, mark));
        let Some(cutoff) = now.checked_sub(settle) else { return Ok(0) };
        // Keep the newest mark at least `settle` old, and every newer one.
        while marks.get(1).is_some_and(|&(at, _)| at <= cutoff) {
            marks.pop_front();
        }
        Ok(match marks.front() {
            Some(&(at, mark)) if at <= cutoff => mark,
            _ => 0,
        })
    }
}

/// How a running relay learns that a commit wrote outbox rows.
enum Wakeup {
    Listen(PgListener),
    InProcess(tokio::sync::watch::Receiver<u64>),
    Poll,
}

async fn listen(pg: &crate::postgres::PgBackend) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(&pg.pool).await?;
    listener.listen(&pg.channel).await?;
    Ok(listener)
}

/// Deletes acknowledged rows and records failed attempts, each in its own statement.
pub(crate) async fn outbox_finish(
    store: &EventStore,
    acked: &[i64],
    failed: &[i64],
    errors: &[String],
) -> Result<(), EventError> {
    match &store.inner.backend {
        Backend::Postgres(pg) => pg.outbox_finish(acked, failed, errors).await,
        Backend::Sqlite(sq) => sq.outbox_finish(acked, failed, errors).await,
    }
}

pub(crate) async fn outbox_lag(store: &EventStore) -> Result<OutboxLag, EventError> {
    let lag = match &store.inner.backend {
        Backend::Postgres(pg) => pg.outbox_lag().await?,
        Backend::Sqlite(sq) => sq.outbox_lag().await?,
    };
    Ok(OutboxLag {
        pending: lag.pending,
        oldest_age: lag.oldest_seconds.map(|s| Duration::from_secs_f64(s.max(0.0))),
        max_attempts: lag.max_attempts.unwrap_or(0),
        last_error: lag.last_error,
    })
}

/// `base` scaled by a random factor in [0.5, 1.5).
fn jitter(base: Duration) -> Duration {
    let random = (Uuid::now_v7().as_u128() & 0xffff) as f64 / 65536.0;
    base.mul_f64(0.5 + random)
}
