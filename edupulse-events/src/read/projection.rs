//! Projections: read models built from the store's global stream, exactly once.
//!
//! A [`ProjectionRunner`] reads a batch of events after the projection's checkpoint, then in
//! ONE database transaction applies them to the read model and saves the new checkpoint.
//! A crash at any point rolls back both, so each event's effect is applied exactly once.
//! The checkpoint row is locked in that transaction and compared with the position the batch
//! was read from: two runners of the same projection never apply a batch twice, and a
//! [`rebuild`](ProjectionRunner::rebuild) beside a running runner never applies an event twice.
//!
//! A runner reads only the event types of `E`: the store is shared with other bounded
//! contexts, whose events the database filters out while the checkpoint still moves past
//! them. A row of one of `E`'s own types that does not decode stops the runner, by default.

use std::future::Future;
use std::marker::PhantomData;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tracing::Instrument;

use crate::store::{EventStore, StreamPosition, Transaction};
use crate::{BoxError, DomainEvent, EventEnvelope, EventError, telemetry};

/// How often a catch-up behind counts its backlog for the lag gauge.
const LAG_EVERY: Duration = Duration::from_secs(5);

/// A read model fed by events of `E`.
///
/// ```
/// use edupulse_events::prelude::*;
/// use edupulse_events::{BoxError, Transaction};
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
/// # #[event(context = "courses")]
/// # pub struct LessonPublished { #[event(aggregate_id)] pub lesson_id: Uuid, pub author: String }
///
/// /// How many lessons each author published.
/// struct LessonsPerAuthor;
///
/// impl Projection<LessonPublished> for LessonsPerAuthor {
///     fn name(&self) -> &str {
///         "lessons-per-author"
///     }
///
///     // In the runner's transaction, with the checkpoint: each event applied exactly once.
///     async fn apply(&self, tx: &mut Transaction, event: &EventEnvelope<LessonPublished>) -> Result<(), BoxError> {
///         let sql = "INSERT INTO lessons_per_author (author, lessons) VALUES ($1, 1) \
///                    ON CONFLICT (author) DO UPDATE SET lessons = lessons_per_author.lessons + 1";
///         edupulse_events::execute!(tx.connection(), sql, &event.event.author)?;
///         Ok(())
///     }
///
///     async fn reset(&self, tx: &mut Transaction) -> Result<(), BoxError> {
///         edupulse_events::execute!(tx.connection(), "DELETE FROM lessons_per_author")?;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = EventStore::connect("sqlite::memory:", StoreConfig::default()).await?;
/// store.migrate().await?;
/// let mut tx = store.begin().await?;
/// edupulse_events::execute!(tx.connection(), "CREATE TABLE lessons_per_author (author TEXT PRIMARY KEY, lessons BIGINT NOT NULL)")?;
/// let lesson_id = Uuid::now_v7();
/// tx.append("lesson", lesson_id, 0, [LessonPublished { lesson_id, author: "ada".into() }]).await?;
/// tx.commit().await?;
///
/// // Once here; `run(shutdown)` catches up, then follows new events until shutdown.
/// let applied = ProjectionRunner::new(store, LessonsPerAuthor).catch_up().await?;
/// assert_eq!(applied, 1);
/// # Ok(())
/// # }
/// ```
pub trait Projection<E: DomainEvent>: Send + Sync {
    /// The checkpoint's name: unique per projection, stable across deployments.
    fn name(&self) -> &str;

    /// Applies one event to the read model, inside the runner's transaction (match on
    /// [`Transaction::connection`](crate::Transaction::connection) for its sqlx connection).
    ///
    /// Returns any error, as a [`Subscriber`](crate::Subscriber)'s handler does: the
    /// runner returns an [`EventError`] as it is, and wraps any other in
    /// [`EventError::Handler`] with the projection's name and the event's position.
    fn apply(
        &self,
        tx: &mut Transaction,
        event: &EventEnvelope<E>,
    ) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Empties the read model before a rebuild. The default does nothing.
    fn reset(&self, tx: &mut Transaction) -> impl Future<Output = Result<(), BoxError>> + Send {
        let _ = tx;
        async { Ok(()) }
    }
}

/// What to do with an event that cannot be decoded (unknown type, newer version, corrupt).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndecodablePolicy {
    /// Stop with the error; the checkpoint stays before the event (the default).
    Stop,
    /// Log it and move the checkpoint past it.
    Skip,
}

/// Runs a [`Projection`]: catch up, follow, rebuild.
pub struct ProjectionRunner<E, P> {
    store: EventStore,
    projection: P,
    /// Events applied per transaction when following live events (default 100), and the
    /// first batch of a catch-up.
    pub batch_size: usize,
    /// The largest batch (default 10 000): while a catch-up finds full batches it
    /// quadruples the batch up to this, so a backlog costs few commits; the first batch that
    /// is not full brings it back to `batch_size`.
    pub max_batch_size: usize,
    /// How often to look for new events when following (default 200 ms).
    pub poll_interval: Duration,
    /// Undecodable events of `E`'s own types (default [`UndecodablePolicy::Stop`]).
    pub on_undecodable: UndecodablePolicy,
    /// Read the events of every type, not only those `E` accepts (default `false`). An
    /// event of a type `E` does not know is then an undecodable event under
    /// [`on_undecodable`](ProjectionRunner::on_undecodable): for a projection that must
    /// notice event types a newer deployment added.
    pub all_event_types: bool,
    _event: PhantomData<fn() -> E>,
}

impl<E, P> std::fmt::Debug for ProjectionRunner<E, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("batch_size", &self.batch_size)
            .field("max_batch_size", &self.max_batch_size)
            .field("poll_interval", &self.poll_interval)
            .field("on_undecodable", &self.on_undecodable)
            .field("all_event_types", &self.all_event_types)
            .finish_non_exhaustive()
    }
}

impl<E: DomainEvent, P: Projection<E>> ProjectionRunner<E, P> {
    /// A runner of `projection` on `store`.
    pub fn new(store: EventStore, projection: P) -> Self {
        Self {
            store,
            projection,
            batch_size: 100,
            max_batch_size: 10_000,
            poll_interval: Duration::from_millis(200),
            on_undecodable: UndecodablePolicy::Stop,
            all_event_types: false,
            _event: PhantomData,
        }
    }

    /// The projection.
    pub fn projection(&self) -> &P {
        &self.projection
    }

    /// Applies every event after the checkpoint, batch by batch, until caught up; returns
    /// how many it applied. Events of types outside `E` are passed over (unless
    /// [`all_event_types`](ProjectionRunner::all_event_types)), and the checkpoint ends
    /// after the last event of the store, whatever its type.
    ///
    /// # Errors
    /// [`EventError::Database`], the projection's own errors, and undecodable events under
    /// [`UndecodablePolicy::Stop`] (a typed decode error naming the row's global position;
    /// the checkpoint stays before it). Nothing of the failed batch is applied.
    pub async fn catch_up(&self) -> Result<u64, EventError> {
        self.catch_up_reporting(&mut |_| {}).await
    }

    /// Catches up as [`catch_up`](Self::catch_up) does, calling `report` after each batch.
    async fn catch_up_reporting(&self, report: &mut (dyn FnMut(u64) + Send)) -> Result<u64, EventError> {
        if self.batch_size == 0 || self.max_batch_size < self.batch_size {
            return Err(EventError::Config(
                "projection runner: batch_size must be at least 1 and at most max_batch_size".into(),
            ));
        }
        let mut applied = 0;
        let mut size = self.batch_size;
        let mut lag_set: Option<Instant> = None;
        loop {
            match self.apply_batch(size).await? {
                Batch::CaughtUp => {
                    telemetry::projection_lag(self.projection.name(), 0);
                    return Ok(applied);
                }
                Batch::Applied { applied: n, full, checkpoint } => {
                    applied += n;
                    report(applied);
                    if full && lag_set.is_none_or(|at| at.elapsed() >= LAG_EVERY) {
                        lag_set = Some(Instant::now());
                        telemetry::projection_lag(
                            self.projection.name(),
                            self.store.events_after(checkpoint).await?,
                        );
                    }
                    size =
                        if full { size.saturating_mul(4).min(self.max_batch_size) } else { self.batch_size };
                }
                Batch::Raced => size = self.batch_size,
                Batch::Rebuild => {
                    tracing::info!(
                        projection = self.projection.name(),
                        "projection: rebuilding, as requested"
                    );
                    self.reset_read_model().await?;
                    size = self.batch_size;
                }
            }
        }
    }

    /// Catches up, then keeps following new events until `shutdown` completes.
    ///
    /// # Errors
    /// As [`catch_up`](ProjectionRunner::catch_up).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), EventError> {
        tokio::pin!(shutdown);
        loop {
            let applied = tokio::select! {
                () = &mut shutdown => return Ok(()),
                applied = self.catch_up() => applied?,
            };
            if applied == 0 {
                tokio::select! {
                    () = &mut shutdown => return Ok(()),
                    () = tokio::time::sleep(self.poll_interval) => {}
                }
            }
        }
    }

    /// Empties the read model, resets the checkpoint and rebuilds from the first event,
    /// logging its progress (events applied, rate, events left) every few seconds.
    ///
    /// Safe beside runners of the same projection: the checkpoint row is locked before the
    /// read model is emptied, so a runner in the middle of a batch commits first and
    /// [`Projection::reset`] removes that batch's effects too; the runner's next batch then
    /// finds the checkpoint moved and reads again. No event is applied twice.
    ///
    /// # Errors
    /// As [`catch_up`](ProjectionRunner::catch_up).
    pub async fn rebuild(&self) -> Result<u64, EventError> {
        self.reset_read_model().await?;
        let total = self.store.events_after(StreamPosition::START).await?;
        let mut progress = RebuildProgress::new(self.projection.name(), total);
        let applied = self.catch_up_reporting(&mut |applied| progress.report(applied)).await?;
        progress.done(applied);
        Ok(applied)
    }

    /// Empties the read model and moves the checkpoint to the start, together.
    async fn reset_read_model(&self) -> Result<(), EventError> {
        let mut tx = self.store.begin().await?;
        // Without the lock first, `reset` would not see the rows of a batch a runner has
        // written but not yet committed; they would survive it and be applied again from
        // the start.
        tx.checkpoint_for_update(self.projection.name()).await?;
        self.projection.reset(&mut tx).await.map_err(|e| self.handler_error(None, e))?;
        tx.save_checkpoint(self.projection.name(), StreamPosition::START).await?;
        tx.commit().await
    }

    /// The projection's own error as it is when it is an [`EventError`] (a database error
    /// keeps its variant), else wrapped with the projection's name and the position.
    fn handler_error(&self, position: Option<i64>, error: BoxError) -> EventError {
        match error.downcast::<EventError>() {
            Ok(own) => *own,
            Err(source) => EventError::Handler { name: self.projection.name().to_owned(), position, source },
        }
    }

    /// Reads at most `size` events after the checkpoint and applies them with the new
    /// checkpoint in one transaction.
    async fn apply_batch(&self, size: usize) -> Result<Batch, EventError> {
        let name = self.projection.name();
        let from = self.store.checkpoint(name).await?.unwrap_or(StreamPosition::START);
        if from == StreamPosition::REBUILD {
            return Ok(Batch::Rebuild);
        }
        let limit = u32::try_from(size).unwrap_or(u32::MAX);
        let mut stream = self.store.stream_all::<E>(from).page_size(limit);
        if !self.all_event_types {
            stream = stream.only_known_types();
        }
        let mut batch = Vec::new();
        let mut last = from;
        while batch.len() < size {
            let Some(item) = stream.next().await else {
                // The end: the stream's position is now past the other types' events too.
                last = stream.position();
                break;
            };
            last = stream.position();
            match item {
                Ok(envelope) => batch.push(Some(envelope)),
                Err(e) if e.is_undecodable_event() && self.on_undecodable == UndecodablePolicy::Skip => {
                    tracing::warn!(projection = name, error = %e, "projection: skipping an undecodable event");
                    batch.push(None);
                }
                Err(e) => return Err(e),
            }
        }
        if last == from {
            return Ok(Batch::CaughtUp);
        }
        let traceparent = batch.iter().flatten().find_map(|e| e.metadata.traceparent.as_deref());
        let span = tracing::info_span!(
            "edupulse.projection_batch",
            projection = name,
            events = batch.len(),
            last_position = last.global_position,
            traceparent,
        );
        if !self.apply_and_save(&batch, from, last).instrument(span).await? {
            return Ok(Batch::Raced);
        }
        let applied = batch.iter().filter(|e| e.is_some()).count();
        Ok(Batch::Applied { applied: applied as u64, full: batch.len() >= size, checkpoint: last })
    }

    /// Applies `batch` and moves the checkpoint from `from` to `last`, in one transaction;
    /// `false` when another runner moved the checkpoint first (nothing applied).
    async fn apply_and_save(
        &self,
        batch: &[Option<EventEnvelope<E>>],
        from: StreamPosition,
        last: StreamPosition,
    ) -> Result<bool, EventError> {
        let name = self.projection.name();
        let mut tx = self.store.begin().await?;
        // Lock the checkpoint and make sure nobody moved it since the batch was read.
        if tx.checkpoint_for_update(name).await? != from {
            tx.rollback().await?;
            return Ok(false);
        }
        for envelope in batch.iter().flatten() {
            self.projection
                .apply(&mut tx, envelope)
                .await
                .map_err(|e| self.handler_error(envelope.global_position, e))?;
        }
        tx.save_checkpoint(name, last).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// The outcome of one batch.
enum Batch {
    /// Nothing after the checkpoint.
    CaughtUp,
    /// This many events applied (skipped undecodable ones and other types not counted);
    /// `full`: the batch was as large as asked, more may follow; `checkpoint`: where it ended.
    Applied { applied: u64, full: bool, checkpoint: StreamPosition },
    /// Another runner moved the checkpoint first; read again.
    Raced,
    /// A rebuild was requested (the checkpoint is [`StreamPosition::REBUILD`]).
    Rebuild,
}

/// A rebuild's progress, logged every few seconds.
struct RebuildProgress<'a> {
    name: &'a str,
    total: u64,
    started: Instant,
    last: Instant,
}

impl<'a> RebuildProgress<'a> {
    /// How often a rebuild logs its progress.
    const EVERY: Duration = Duration::from_secs(5);

    fn new(name: &'a str, total: u64) -> Self {
        let now = Instant::now();
        tracing::info!(projection = name, events = total, "projection: rebuilding");
        Self { name, total, started: now, last: now }
    }

    fn report(&mut self, applied: u64) {
        if self.last.elapsed() < Self::EVERY {
            return;
        }
        self.last = Instant::now();
        let rate = applied as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let remaining = self.total.saturating_sub(applied);
        tracing::info!(
            projection = self.name,
            applied,
            remaining,
            rate = format!("{rate:.0} events/s"),
            eta = format!("{:.0} s", remaining as f64 / rate.max(1.0)),
            "projection: rebuilding"
        );
    }

    fn done(&self, applied: u64) {
        let elapsed = self.started.elapsed();
        tracing::info!(
            projection = self.name,
            applied,
            seconds = elapsed.as_secs_f64(),
            "projection: rebuilt"
        );
    }
}
