//! The event store: append with optimistic concurrency, load an aggregate, read the global
//! stream, query by promoted key.
//!
//! One public type, [`EventStore`], whatever the backend: the backend is chosen at connect
//! time from the URL (`postgres://` or `sqlite:`), so user code does not change with it.
//! Every backend decision is taken in [`backend`]; the drivers are `postgres` and `sqlite`.

pub(crate) mod append;
pub(crate) mod backend;
#[cfg(feature = "postgres")]
mod connect;
mod execute;
pub(crate) mod log;
mod migrations;
pub(crate) mod model;
pub(crate) use self::model::{GlobalPosition, Partition};
#[cfg(feature = "postgres")]
mod postgres;
#[cfg(feature = "postgres")]
mod postgres_sql;
pub(crate) mod row;
pub(crate) mod signals;
#[cfg(feature = "sqlite")]
mod sqlite;
#[cfg(feature = "sqlite")]
mod sqlite_tx;
mod status;
mod stream;
mod transaction;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

use self::append::AppendRules;
use self::backend::Backend;
pub use self::backend::{Connection, DatabasePool};
pub use self::log::{ParkedEvent, RelayLag, Requeue, RunningTransaction, StreamMark};
pub use self::model::{
    ExpectedSequence, PARTITIONS, SchemaName, StoreConfig, StoredSnapshot, StreamPosition,
};
use self::row::PageQuery;
use self::signals::Signals;
pub use self::status::{Migrations, PartitionStatus, ProjectionStatus, StoreStatus};
pub use self::stream::{EventStream, RecordStream, StoredRecord};
pub use self::transaction::Transaction;
use crate::{DomainEvent, EventEnvelope, EventError, IntoKeyValue, telemetry};

pub(crate) struct Inner {
    pub(crate) backend: Backend,
    pub(crate) config: StoreConfig,
    /// Wakes this process's relays after a commit and tells receipts what they published.
    pub(crate) signals: Arc<Signals>,
}

/// The event store. Cheap to clone: clones share one connection pool.
///
/// ```no_run
/// # async fn demo() -> Result<(), edupulse_events::EventError> {
/// use edupulse_events::{EventStore, StoreConfig};
/// let store = EventStore::connect("postgres://app@127.0.0.1/app", StoreConfig::default()).await?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventStore {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for EventStore {
    // Never prints connection options: they hold the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStore")
            .field("backend", &self.inner.backend.name())
            .field("schema", &self.inner.config.schema.as_str())
            .finish_non_exhaustive()
    }
}

impl EventStore {
    /// Connects to the database named by `url`: `postgres://…` for PostgreSQL, or
    /// `sqlite://path/to/file.db` / `sqlite::memory:` for the embedded backend (see the
    /// crate docs for what differs).
    ///
    /// The URL is never logged or put in an error message: it may hold a password.
    ///
    /// # Errors
    /// [`EventError::Config`] for a URL that cannot be parsed or has an unsupported scheme,
    /// or an invalid configuration;
    /// [`EventError::Connect`] when the PostgreSQL server cannot be reached or refuses the
    /// user or the database (within 5 s, at once when the port is closed or the host
    /// unknown); [`EventError::Database`] for the SQLite file.
    pub async fn connect(url: &str, config: StoreConfig) -> Result<Self, EventError> {
        config.check()?;
        let backend = Backend::connect(url, &config).await?;
        Ok(Self::with_backend(backend, config))
    }

    /// Uses an existing pool, for example the application's own. A SQLite pool should be
    /// opened as [`connect`](Self::connect) opens one: WAL journal, a busy timeout, foreign
    /// keys on.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid configuration.
    pub fn from_pool(pool: impl Into<DatabasePool>, config: StoreConfig) -> Result<Self, EventError> {
        config.check()?;
        Ok(Self::with_backend(Backend::from_pool(pool.into(), &config), config))
    }

    fn with_backend(backend: Backend, config: StoreConfig) -> Self {
        Self { inner: Arc::new(Inner { backend, config, signals: Arc::default() }) }
    }

    /// The store's database pool, for the application's own queries.
    pub fn pool(&self) -> DatabasePool {
        self.inner.backend.pool()
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.config.max_message_bytes
    }

    /// Creates the schema if needed and applies the embedded migrations
    /// (`migrations/postgres`, or `migrations/sqlite`). Safe to run from several processes
    /// at once.
    ///
    /// # Errors
    /// [`EventError::Migration`] when a migration fails; [`EventError::Database`] when the
    /// schema cannot be created.
    pub async fn migrate(&self) -> Result<(), EventError> {
        self.inner.backend.migrate(&self.inner.config.schema).await
    }

    /// Starts a transaction: append events to one or several aggregates, do your own
    /// writes, and commit them all at once.
    ///
    /// # Errors
    /// [`EventError::Database`] when no connection can be had.
    pub async fn begin(&self) -> Result<Transaction, EventError> {
        let tx = self.inner.backend.begin().await?;
        Ok(Transaction::new(tx, self.inner.signals.clone(), self.max_message_bytes()))
    }

    /// Appends events to one aggregate in a transaction of its own.
    ///
    /// # Errors
    /// As [`Transaction::append`].
    pub async fn append<E: DomainEvent>(
        &self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected: impl Into<ExpectedSequence>,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        let envelopes = EventEnvelope::wrap_all(aggregate_type, aggregate_id, events);
        let rules = AppendRules::new(self.max_message_bytes());
        let appended = self.inner.backend.append_alone(expected.into(), envelopes, &rules).await;
        let appended = telemetry::conflicts(appended)?;
        telemetry::appended(appended.envelopes.len());
        self.inner.signals.wake();
        Ok(appended.envelopes)
    }

    /// Appends events on a connection the caller manages with sqlx, in its own transaction
    /// (`Connection::Postgres(&mut *tx)`). Same rules as [`Transaction::append_envelopes`].
    /// The store's relays find the events within their poll interval after the caller's
    /// COMMIT (a commit through the store wakes them at once).
    ///
    /// # Errors
    /// As [`Transaction::append`].
    pub async fn append_in<E: DomainEvent>(
        &self,
        conn: Connection<'_>,
        expected: impl Into<ExpectedSequence>,
        envelopes: Vec<EventEnvelope<E>>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        let rules = AppendRules::new(self.max_message_bytes());
        let appended = telemetry::conflicts(
            self.inner.backend.append_in(conn, expected.into(), envelopes, &rules).await,
        )?;
        telemetry::appended(appended.envelopes.len());
        Ok(appended.envelopes)
    }

    /// The current sequence of an aggregate: the number of its events, 0 when it has none.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn current_sequence(&self, aggregate_id: Uuid) -> Result<i64, EventError> {
        self.inner.backend.current_sequence(aggregate_id).await
    }

    /// Saves a snapshot, unless a newer one of the same state version is stored.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), EventError> {
        self.inner.backend.save_snapshot(snapshot).await
    }

    /// The stored snapshot of an aggregate, if any.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn snapshot(&self, aggregate_id: Uuid) -> Result<Option<StoredSnapshot>, EventError> {
        self.inner.backend.load_snapshot(aggregate_id).await
    }

    /// A projection's saved checkpoint; `None` before the first save.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn checkpoint(&self, name: &str) -> Result<Option<StreamPosition>, EventError> {
        self.inner.backend.load_checkpoint(name).await
    }

    /// The number of events in the global stream after `position`, of any type: a
    /// projection's backlog when `position` is its checkpoint (counted, so it takes a moment
    /// on a large store).
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn events_after(&self, position: StreamPosition) -> Result<u64, EventError> {
        self.inner.backend.count_after(position).await
    }

    /// One aggregate's events with a sequence of at least `from_sequence` (1 for all),
    /// decoded and upcast, in order, read page by page as the stream is polled.
    ///
    /// An event that cannot be decoded is an `Err` item naming its global position; the
    /// stream goes on after it, so the caller chooses to stop or skip.
    pub fn load<E: DomainEvent>(&self, aggregate_id: Uuid, from_sequence: i64) -> EventStream<E> {
        let after = StreamPosition { transaction_id: 0, global_position: from_sequence.saturating_sub(1) };
        self.stream(PageQuery::Aggregate(aggregate_id), after)
    }

    /// The global stream for projections: every event after `from`, decoded and upcast,
    /// ordered and resumable, read page by page as it is polled (back-pressure).
    ///
    /// The stream ends when it has caught up; call [`EventStream::follow`] to keep
    /// polling for new events instead. After each item, [`EventStream::position`] is the
    /// checkpoint to save.
    ///
    /// # Why events are ordered by transaction
    ///
    /// PostgreSQL hands out an identity value when a row is inserted, not when it commits:
    /// position 101 can commit after 102, and a reader of `position > last` would skip 101
    /// for ever. Each row records its transaction id, and the stream reads only rows whose
    /// transaction is older than every transaction still running
    /// (`transaction_id < pg_snapshot_xmin(pg_current_snapshot())`), in
    /// `(transaction_id, global_position)` order. Nothing can be inserted below that
    /// horizon any more, so the order is final and nothing is skipped.
    ///
    /// One aggregate's events stay in sequence order even when the transaction ids disagree
    /// (a transaction that took its id early, by a write of its own, can append the next
    /// event after a younger one committed the previous): each event records the greater of
    /// its transaction's id and the one recorded with the aggregate's previous event, never
    /// less than its own, so the horizon rule above still holds for it. The cost: a write
    /// transaction that stays open holds back readers until it ends (only readers; writers
    /// are not blocked). Keep write transactions short.
    pub fn stream_all<E: DomainEvent>(&self, from: StreamPosition) -> EventStream<E> {
        self.stream(PageQuery::All { event_types: None }, from)
    }

    /// Events whose promoted key `key` (an `#[event(key)]` field) equals `value`, in global
    /// position order, found through the keys index without reading payloads. Only event
    /// types `E` accepts are returned.
    pub fn events_by_key<E: DomainEvent>(&self, key: &str, value: impl IntoKeyValue) -> EventStream<E> {
        let event_types = E::ACCEPTED_TYPES.iter().map(|t| (*t).to_owned()).collect();
        let query = PageQuery::Key { name: key.to_owned(), value: value.key_value(), event_types };
        self.stream(query, StreamPosition::START)
    }

    /// The global stream as recorded, not decoded: every event after `from` as a
    /// [`WireEnvelope`](crate::wire::WireEnvelope), in the order of
    /// [`stream_all`](Self::stream_all). For tools that do not know the event types.
    pub fn records(&self, from: StreamPosition) -> RecordStream {
        RecordStream::new(
            self.inner.backend.clone(),
            self.inner.config.page_size,
            PageQuery::All { event_types: None },
            from,
        )
    }

    /// One aggregate's events as recorded, from `from_sequence` (1 for all), in order.
    pub fn aggregate_records(&self, aggregate_id: Uuid, from_sequence: i64) -> RecordStream {
        let after = StreamPosition { transaction_id: 0, global_position: from_sequence.saturating_sub(1) };
        RecordStream::new(
            self.inner.backend.clone(),
            self.inner.config.page_size,
            PageQuery::Aggregate(aggregate_id),
            after,
        )
    }

    /// The stream position of the event at `global_position` (`None` when there is no such
    /// event): [`stream_all`](Self::stream_all) or [`records`](Self::records) from it read
    /// what follows that event in stream order; with `global_position` one less, from the
    /// event itself.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn position_of(&self, global_position: i64) -> Result<Option<StreamPosition>, EventError> {
        self.inner.backend.position_of(global_position).await
    }

    /// Asks the runner of projection `name` to rebuild it: the checkpoint becomes
    /// [`StreamPosition::REBUILD`], and the runner's next batch (of
    /// [`catch_up`](crate::ProjectionRunner::catch_up) or `run`) empties the read model with
    /// [`Projection::reset`](crate::Projection::reset) and applies every event again, as
    /// [`rebuild`](crate::ProjectionRunner::rebuild) does. A batch in flight finds its
    /// checkpoint moved and applies nothing. For tools that do not have the projection's
    /// code (`edupulse projection reset`). Returns `false` when no projection of that name has
    /// a checkpoint.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn request_rebuild(&self, name: &str) -> Result<bool, EventError> {
        self.inner.backend.request_rebuild(name).await
    }

    /// The applied and pending migrations.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn migrations(&self) -> Result<Migrations, EventError> {
        self.inner.backend.migrations(&self.inner.config.schema).await
    }

    /// The store at a glance, for operators: migrations, counts, each relay partition's
    /// and each projection's checkpoint and backlog, publication's lag and what holds it
    /// back. Counts are exact (`count(*)`), so this takes a moment on a large store.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn status(&self) -> Result<StoreStatus, EventError> {
        self.inner.backend.status(&self.inner.config.schema).await
    }

    fn stream<E: DomainEvent>(&self, query: PageQuery, from: StreamPosition) -> EventStream<E> {
        EventStream::new(self.inner.backend.clone(), self.inner.config.page_size, query, from)
    }
}

impl EventStore {
    /// How far publication is behind: pending and parked events, the oldest pending
    /// event's age and, when the horizon holds events back, the transaction holding it.
    ///
    /// It counts from the relays' saved checkpoints, which a running relay writes at most
    /// every [`RelayConfig::checkpoint_interval`](crate::RelayConfig::checkpoint_interval):
    /// events acknowledged since the last save (and already reported by
    /// [`Receipt::published`](crate::Receipt::published)) still count as pending until then.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn relay_lag(&self) -> Result<RelayLag, EventError> {
        let lag = self.inner.backend.relay_lag().await?;
        telemetry::publisher_lag(lag.pending, lag.oldest_pending_age, lag.lost.len());
        Ok(lag)
    }

    /// Asks the relays to send again what their streams lost: every partition found with a
    /// stream holding less than it acknowledged ([`RelayLag::lost`]) is repaired by the relay
    /// holding it, at its next check (within [`RelayConfig::stream_check_interval`](crate::RelayConfig::stream_check_interval)),
    /// which then publishes the partition again. Returns how many (partition, stream) pairs
    /// were asked; 0 when no stream lost anything.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn request_republish_lost(&self) -> Result<u64, EventError> {
        self.inner.backend.request_repair().await
    }

    /// The parked events, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn parked_events(&self, limit: u32) -> Result<Vec<ParkedEvent>, EventError> {
        self.inner.backend.parked_list(i64::from(limit)).await
    }

    /// Re-queues parked aggregates once the cause of the refusal is fixed: the relay
    /// holding their partition publishes their parked events again, in order, then their
    /// aggregates flow again. Returns the number of aggregates re-queued.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn requeue_parked(&self, which: Requeue) -> Result<u64, EventError> {
        let positions = match &which {
            Requeue::All => None,
            Requeue::Positions(positions) => Some(positions.as_slice()),
        };
        let requeued = self.inner.backend.requeue(positions).await?;
        self.inner.signals.wake();
        Ok(requeued)
    }
}

impl EventStore {
    /// Whether the relays' checkpoints are past every one of `written`.
    pub(crate) async fn relay_covers(
        &self,
        written: &[(Partition, StreamPosition)],
    ) -> Result<bool, EventError> {
        Ok(self.relay_covers_each(written).await?.into_iter().all(|covered| covered))
    }

    /// For each of `written`, whether the saved checkpoints of the relays have passed it.
    pub(crate) async fn relay_covers_each(
        &self,
        written: &[(Partition, StreamPosition)],
    ) -> Result<Vec<bool>, EventError> {
        let mut partitions: Vec<Partition> = written.iter().map(|(p, _)| *p).collect();
        partitions.sort_unstable();
        partitions.dedup();
        let checkpoints: HashMap<Partition, StreamPosition> =
            self.inner.backend.checkpoints_of(&partitions).await?.into_iter().collect();
        Ok(written.iter().map(|(p, position)| checkpoints.get(p).is_some_and(|c| c >= position)).collect())
    }

    /// The parked events among `positions`.
    pub(crate) async fn parked_among(&self, positions: &[i64]) -> Result<Vec<ParkedEvent>, EventError> {
        self.inner.backend.parked_among(positions).await
    }
}
