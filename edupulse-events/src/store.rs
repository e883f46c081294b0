//! The event store: append with optimistic concurrency, load an aggregate, read the global
//! stream, query by promoted key.
//!
//! One public type, [`EventStore`], whatever the backend: the backend is chosen at connect
//! time from the URL (today `postgres://`), so user code does not change with it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::SqliteConnection;
use uuid::Uuid;

use crate::deliverable::{DEFAULT_MAX_MESSAGE_BYTES, check_event};
use crate::postgres::{PgBackend, PgTransaction};
use crate::relay::{Signals, partition_of};
use crate::sqlite::{SqliteBackend, SqliteTransaction};
use crate::stream::{EventStream, PageQuery};
use crate::{DomainEvent, EventEnvelope, EventError, IntoKeyValue, validate_subject};

/// The sequence an append expects the aggregate's stream to be at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedSequence {
    /// Append whatever the stream's sequence is (no concurrency check).
    Any,
    /// The stream must be at exactly this sequence; 0 means the aggregate has no events yet.
    Exactly(i64),
}

impl From<i64> for ExpectedSequence {
    fn from(sequence: i64) -> Self {
        Self::Exactly(sequence)
    }
}

impl ExpectedSequence {
    /// As stored procedures see it: -1 for `Any`.
    pub(crate) fn as_i64(self) -> i64 {
        match self {
            Self::Any => -1,
            Self::Exactly(n) => n,
        }
    }
}

/// A place in the global stream, from which [`EventStore::stream_all`] resumes.
///
/// The global stream is ordered by the writing transaction, then by position: events of a
/// transaction are read only once every older transaction has finished, so an event that
/// commits late with a lower position is never skipped (see [`EventStore::stream_all`]).
/// Save both numbers as a projection's checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamPosition {
    /// The writing transaction's id (PostgreSQL `xid8`).
    pub transaction_id: i64,
    /// The event's global position.
    pub global_position: i64,
}

impl StreamPosition {
    /// The start of the stream.
    pub const START: Self = Self { transaction_id: 0, global_position: 0 };
}

/// An aggregate's state after `sequence` events, as stored: a cache that spares replaying
/// the whole history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The aggregate.
    pub aggregate_id: Uuid,
    /// Its type.
    pub aggregate_type: String,
    /// The sequence of the last event folded into `state`.
    pub sequence: i64,
    /// The version of the state's shape; a snapshot of another version is ignored.
    pub state_version: u32,
    /// The state as JSON.
    pub state: String,
}

/// A validated SQL schema name: 1 to 63 characters, lowercase ASCII letters, digits and `_`,
/// not starting with a digit and not `pg_…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Checks a schema name.
    ///
    /// # Errors
    /// [`EventError::Config`] when the name is not a plain lowercase identifier.
    pub fn new(name: impl Into<String>) -> Result<Self, EventError> {
        let name = name.into();
        let valid_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let starts_ok = name.bytes().next().is_some_and(|b| !b.is_ascii_digit());
        if !valid_chars || !starts_ok || name.len() > 63 || name.starts_with("pg_") {
            return Err(EventError::Config(format!(
                "invalid schema name {name:?}: use 1 to 63 lowercase ASCII letters, digits and `_`, \
                 not starting with a digit or `pg_`"
            )));
        }
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Pooled PostgreSQL connections idle at least this long are pinged before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// How the store is set up.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The schema holding the store's tables (default `edupulse`).
    pub schema: SchemaName,
    /// The most connections the store's own pool opens (default 10).
    pub max_connections: u32,
    /// How many rows one page of a stream reads (default 500).
    pub page_size: u32,
    /// The largest message an event may become, headers included (default 1 MiB, NATS'
    /// default `max_payload`). Appends refuse larger events before writing anything: the
    /// broker would refuse them at every attempt. The bus also applies the broker's own
    /// limit when it is lower.
    pub max_message_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            schema: SchemaName("edupulse".into()),
            max_connections: 10,
            page_size: 500,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl StoreConfig {
    /// The default configuration with another schema.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid schema name.
    pub fn with_schema(schema: &str) -> Result<Self, EventError> {
        Ok(Self { schema: SchemaName::new(schema)?, ..Self::default() })
    }
}

// One of each lives behind an `Arc` per store: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Backend {
    Postgres(PgBackend),
    Sqlite(SqliteBackend),
}

pub(crate) struct Inner {
    pub(crate) backend: Backend,
    pub(crate) config: StoreConfig,
    /// Wakes this process's relays after a commit and tells receipts what they published.
    pub(crate) signals: Signals,
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
        let backend = match self.inner.backend {
            Backend::Postgres(_) => "postgres",
            Backend::Sqlite(_) => "sqlite",
        };
        f.debug_struct("EventStore")
            .field("backend", &backend)
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
    /// [`EventError::Config`] for a URL that cannot be parsed or has an unsupported scheme;
    /// [`EventError::Connect`] when the PostgreSQL server cannot be reached or refuses the
    /// user or the database (within 5 s, at once when the port is closed or the host
    /// unknown); [`EventError::Database`] for the SQLite file.
    pub async fn connect(url: &str, config: StoreConfig) -> Result<Self, EventError> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme).unwrap_or_default();
        match scheme {
            "postgres" | "postgresql" => {
                let options = crate::connect::postgres_options(url)?;
                // One connection first: a refused port, a wrong password or a missing
                // database is reported at once and by cause, not as the pool's timeout.
                crate::connect::check_postgres(&options).await?;
                let pool = PgPoolOptions::new()
                    .max_connections(config.max_connections)
                    .acquire_timeout(Duration::from_secs(10))
                    // A connection back in the pool a moment ago is not pinged (a round trip
                    // before every BEGIN: about 140 µs of a 1.2 ms commit, measured); one idle
                    // for a while, which a server restart or a dropped link may have killed, is.
                    .test_before_acquire(false)
                    .before_acquire(|conn, meta| {
                        Box::pin(async move {
                            if meta.idle_for >= PING_IF_IDLE_FOR {
                                sqlx::Connection::ping(conn).await?;
                            }
                            Ok(true)
                        })
                    })
                    .connect_with(options)
                    .await?;
                Ok(Self::from_pg_pool(pool, config))
            }
            _ if url.starts_with("sqlite:") => {
                let backend = SqliteBackend::connect(url, &config).await?;
                let backend = Backend::Sqlite(backend);
                Ok(Self { inner: Arc::new(Inner { backend, config, signals: Signals::default() }) })
            }
            _ => Err(EventError::Config(format!(
                "unsupported database URL scheme {scheme:?}: expected `postgres://` or `sqlite:`"
            ))),
        }
    }

    /// Uses an existing PostgreSQL pool, for example the application's own.
    pub fn from_pg_pool(pool: PgPool, config: StoreConfig) -> Self {
        let backend = Backend::Postgres(PgBackend::new(pool, &config.schema));
        Self { inner: Arc::new(Inner { backend, config, signals: Signals::default() }) }
    }

    /// The PostgreSQL pool, for the application's own queries.
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.inner.backend {
            Backend::Postgres(pg) => Some(&pg.pool),
            Backend::Sqlite(_) => None,
        }
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
    /// [`EventError::Database`] when a migration fails.
    pub async fn migrate(&self) -> Result<(), EventError> {
        match &self.inner.backend {
            Backend::Postgres(pg) => pg.migrate(&self.inner.config.schema).await,
            Backend::Sqlite(sq) => sq.migrate().await,
        }
    }

    /// Starts a transaction: append events to one or several aggregates, do your own
    /// writes, and commit them all at once.
    ///
    /// # Errors
    /// [`EventError::Database`] when no connection can be had.
    pub async fn begin(&self) -> Result<Transaction, EventError> {
        let inner = match &self.inner.backend {
            Backend::Postgres(pg) => TxInner::Postgres(pg.pool.begin().await?),
            Backend::Sqlite(sq) => TxInner::Sqlite(sq.begin().await?),
        };
        Ok(Transaction {
            store: self.clone(),
            inner,
            may_be_aborted: false,
            written: Vec::new(),
            subjects: SubjectRule::default(),
            max_message_bytes: self.max_message_bytes(),
        })
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
        match &self.inner.backend {
            // One statement is atomic on its own: no BEGIN/COMMIT round trips.
            Backend::Postgres(pg) => {
                let mut conn = pg.pool.acquire().await?;
                let rules = AppendRules::new(self.max_message_bytes());
                let appended = pg.append(&mut conn, expected.into(), envelopes, &rules).await?;
                self.inner.signals.wake();
                Ok(appended.envelopes)
            }
            Backend::Sqlite(_) => {
                let mut tx = self.begin().await?;
                let stored = tx.append_envelopes(expected, envelopes).await?;
                tx.commit().await?;
                Ok(stored)
            }
        }
    }

    /// Appends events inside a PostgreSQL transaction the caller manages with sqlx (pass
    /// `&mut *tx`). Same rules as [`Transaction::append_envelopes`].
    ///
    /// # Errors
    /// As [`Transaction::append`].
    pub async fn append_in_pg<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        expected: impl Into<ExpectedSequence>,
        envelopes: Vec<EventEnvelope<E>>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        match &self.inner.backend {
            Backend::Postgres(pg) => {
                let rules = AppendRules::new(self.max_message_bytes());
                Ok(pg.append(conn, expected.into(), envelopes, &rules).await?.envelopes)
            }
            Backend::Sqlite(_) => Err(EventError::Config("append_in_pg needs a PostgreSQL store".into())),
        }
    }

    /// The current sequence of an aggregate: the number of its events, 0 when it has none.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn current_sequence(&self, aggregate_id: Uuid) -> Result<i64, EventError> {
        match &self.inner.backend {
            Backend::Postgres(pg) => pg.current_sequence(aggregate_id).await,
            Backend::Sqlite(sq) => sq.current_sequence(aggregate_id).await,
        }
    }

    /// Saves a snapshot, unless a newer one of the same state version is stored.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), EventError> {
        match &self.inner.backend {
            Backend::Postgres(pg) => pg.save_snapshot(snapshot).await,
            Backend::Sqlite(sq) => sq.save_snapshot(snapshot).await,
        }
    }

    /// The stored snapshot of an aggregate, if any.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn snapshot(&self, aggregate_id: Uuid) -> Result<Option<StoredSnapshot>, EventError> {
        match &self.inner.backend {
            Backend::Postgres(pg) => pg.load_snapshot(aggregate_id).await,
            Backend::Sqlite(sq) => sq.load_snapshot(aggregate_id).await,
        }
    }

    /// A projection's saved checkpoint; `None` before the first save.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn checkpoint(&self, name: &str) -> Result<Option<StreamPosition>, EventError> {
        match &self.inner.backend {
            Backend::Postgres(pg) => pg.load_checkpoint(&mut *pg.pool.acquire().await?, name).await,
            Backend::Sqlite(sq) => sq.load_checkpoint(&mut *sq.pool.acquire().await?, name).await,
        }
    }

    /// One aggregate's events with a sequence of at least `from_sequence` (1 for all),
    /// decoded and upcast, in order, read page by page as the stream is polled.
    ///
    /// An event that cannot be decoded is an `Err` item naming its global position; the
    /// stream goes on after it, so the caller chooses to stop or skip.
    pub fn load<E: DomainEvent>(&self, aggregate_id: Uuid, from_sequence: i64) -> EventStream<E> {
        let after = StreamPosition { transaction_id: 0, global_position: from_sequence.saturating_sub(1) };
        EventStream::new(self.clone(), PageQuery::Aggregate(aggregate_id), after)
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
        EventStream::new(self.clone(), PageQuery::All { event_types: None }, from)
    }

    /// Events whose promoted key `key` (an `#[event(key)]` field) equals `value`, in global
    /// position order, found through the keys index without reading payloads. Only event
    /// types `E` accepts are returned.
    pub fn events_by_key<E: DomainEvent>(&self, key: &str, value: impl IntoKeyValue) -> EventStream<E> {
        let filter = match value.key_value() {
            Some(v) => serde_json::json!({ key: v }),
            None => serde_json::Value::Null,
        };
        let types = E::ACCEPTED_TYPES.iter().map(|t| (*t).to_owned()).collect();
        EventStream::new(self.clone(), PageQuery::Key { filter, event_types: types }, StreamPosition::START)
    }
}

pub(crate) enum TxInner {
    Postgres(PgTransaction),
    Sqlite(SqliteTransaction),
}

/// A database transaction of the store: appends and the caller's own writes commit or roll
/// back together. Dropping it without [`commit`](Transaction::commit) rolls it back.
pub struct Transaction {
    store: EventStore,
    inner: TxInner,
    /// A statement may have failed in this transaction: one of ours returned an error, or
    /// the caller had the raw connection. PostgreSQL then may have aborted the transaction,
    /// and answers COMMIT with ROLLBACK, which sqlx reports as success: `commit` asks first.
    may_be_aborted: bool,
    /// The stream positions of the events appended in this transaction, with their
    /// partitions: what a receipt waits for.
    written: Vec<(i32, StreamPosition)>,
    /// How the events' subjects are made (the bus sets a prefix).
    pub(crate) subjects: SubjectRule,
    /// The largest message an event may become (the store's limit, or the broker's).
    pub(crate) max_message_bytes: usize,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Transaction {
    /// Appends `events` to the aggregate `aggregate_id` of kind `aggregate_type`, in one
    /// statement, if its stream is at `expected`. The events get the sequences that follow,
    /// fresh UUID v7 ids and `occurred_at` = now; the stored envelopes are returned.
    ///
    /// Several appends in one transaction (to one or several aggregates, each with its own
    /// expected sequence) commit all together or not at all.
    ///
    /// # Errors
    /// - [`EventError::Concurrency`] when the stream is not at `expected`, with the actual
    ///   sequence. The transaction is still usable, but the usual answer is to roll back,
    ///   reload and decide again;
    /// - [`EventError::Config`] when an event names another aggregate in its
    ///   `#[event(aggregate_id)]` field, or the aggregate exists with another type;
    /// - [`EventError::Serialization`], [`EventError::Database`].
    pub async fn append<E: DomainEvent>(
        &mut self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected: impl Into<ExpectedSequence>,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        let envelopes = EventEnvelope::wrap_all(aggregate_type, aggregate_id, events);
        self.append_envelopes(expected, envelopes).await
    }

    /// Appends prepared envelopes (with their own ids, times and metadata, for example
    /// [`EventEnvelope::caused_by`]). All must name the same aggregate.
    ///
    /// # Errors
    /// As [`append`](Transaction::append).
    pub async fn append_envelopes<E: DomainEvent>(
        &mut self,
        expected: impl Into<ExpectedSequence>,
        envelopes: Vec<EventEnvelope<E>>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        let rules = AppendRules { max_message_bytes: self.max_message_bytes, subjects: &self.subjects };
        let appended = match (&self.store.inner.backend, &mut self.inner) {
            (Backend::Postgres(pg), TxInner::Postgres(tx)) => {
                pg.append(tx, expected.into(), envelopes, &rules).await
            }
            (Backend::Sqlite(sq), TxInner::Sqlite(tx)) => {
                sq.append(tx, expected.into(), envelopes, &rules).await
            }
            _ => Err(EventError::Config("the transaction belongs to another backend".into())),
        };
        let appended = self.note(appended)?;
        self.written.extend(appended.positions.iter().map(|position| (appended.partition, *position)));
        Ok(appended.envelopes)
    }

    /// Remembers that a statement of this transaction failed.
    fn note<T>(&mut self, result: Result<T, EventError>) -> Result<T, EventError> {
        if result.is_err() {
            self.may_be_aborted = true;
        }
        result
    }

    /// The store this transaction writes to.
    pub fn store(&self) -> &EventStore {
        &self.store
    }

    /// The PostgreSQL connection of this transaction, for the caller's own writes.
    ///
    /// A statement that fails aborts a PostgreSQL transaction, even when its error is
    /// ignored: [`commit`](Transaction::commit) then returns
    /// [`EventError::TransactionAborted`]. Run a statement that may fail, and whose failure
    /// you want to ignore, inside a `SAVEPOINT` and roll back to it.
    pub fn pg_connection(&mut self) -> Option<&mut PgConnection> {
        self.may_be_aborted = true;
        match &mut self.inner {
            TxInner::Postgres(tx) => Some(&mut **tx),
            TxInner::Sqlite(_) => None,
        }
    }

    /// The SQLite connection of this transaction (embedded backend), for the caller's own
    /// writes.
    pub fn sqlite_connection(&mut self) -> Option<&mut SqliteConnection> {
        self.may_be_aborted = true;
        match &mut self.inner {
            TxInner::Sqlite(tx) => Some(&mut **tx),
            TxInner::Postgres(_) => None,
        }
    }

    /// Saves a projection's checkpoint in this transaction, so that it commits together
    /// with the read-model changes it accounts for: each event's effect applies exactly
    /// once, whenever the process stops.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn save_checkpoint(&mut self, name: &str, position: StreamPosition) -> Result<(), EventError> {
        let result = match (&self.store.inner.backend, &mut self.inner) {
            (Backend::Postgres(pg), TxInner::Postgres(tx)) => pg.save_checkpoint(tx, name, position).await,
            (Backend::Sqlite(sq), TxInner::Sqlite(tx)) => sq.save_checkpoint(tx, name, position).await,
            _ => Err(EventError::Config("the transaction belongs to another backend".into())),
        };
        self.note(result)
    }

    /// A projection's checkpoint as this transaction sees it; `None` before the first save.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn checkpoint(&mut self, name: &str) -> Result<Option<StreamPosition>, EventError> {
        let result = match (&self.store.inner.backend, &mut self.inner) {
            (Backend::Postgres(pg), TxInner::Postgres(tx)) => pg.load_checkpoint(tx, name).await,
            (Backend::Sqlite(sq), TxInner::Sqlite(tx)) => sq.load_checkpoint(tx, name).await,
            _ => Err(EventError::Config("the transaction belongs to another backend".into())),
        };
        self.note(result)
    }

    /// A projection's checkpoint, locked until the transaction ends (created at the start
    /// of the stream if missing): what a projection runner compares before applying a batch.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn checkpoint_for_update(&mut self, name: &str) -> Result<StreamPosition, EventError> {
        let result = match (&self.store.inner.backend, &mut self.inner) {
            (Backend::Postgres(pg), TxInner::Postgres(tx)) => pg.lock_checkpoint(tx, name).await,
            (Backend::Sqlite(sq), TxInner::Sqlite(tx)) => sq.lock_checkpoint(tx, name).await,
            _ => Err(EventError::Config("the transaction belongs to another backend".into())),
        };
        self.note(result)
    }

    /// Commits everything written in the transaction.
    ///
    /// A transaction that PostgreSQL aborted (a statement failed in it, even one whose
    /// error was ignored) is not committed: PostgreSQL answers its COMMIT with ROLLBACK.
    /// That is an error here, never a silent success.
    ///
    /// # Errors
    /// [`EventError::TransactionAborted`] when the transaction had been aborted;
    /// [`EventError::Database`] when COMMIT fails (for a lost connection, the outcome is
    /// unknown: the transaction may or may not have committed). Nothing is committed in the
    /// first case.
    pub async fn commit(self) -> Result<(), EventError> {
        self.commit_written().await.map(drop)
    }

    /// Commits, wakes this process's relays when events were written, and returns the
    /// written events' partitions and stream positions.
    pub(crate) async fn commit_written(self) -> Result<Vec<(i32, StreamPosition)>, EventError> {
        let appended = !self.written.is_empty();
        match self.inner {
            TxInner::Postgres(mut tx) => {
                if self.may_be_aborted {
                    crate::postgres::ensure_not_aborted(&mut tx, appended).await?;
                }
                tx.commit().await?;
            }
            TxInner::Sqlite(tx) => tx.commit().await?,
        }
        if appended {
            self.store.inner.signals.wake();
        }
        Ok(self.written)
    }

    /// Rolls everything back.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn rollback(self) -> Result<(), EventError> {
        match self.inner {
            TxInner::Postgres(tx) => tx.rollback().await?,
            TxInner::Sqlite(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

/// How the subjects of an append's events are made: the event's own subject, after an
/// optional prefix (a tenant), with the aggregate id as a last token when asked.
#[derive(Debug, Clone, Default)]
pub(crate) struct SubjectRule {
    /// Validated tokens joined by `.`.
    pub(crate) prefix: Option<String>,
    pub(crate) aggregate_id_token: bool,
}

impl SubjectRule {
    /// The subject of `envelope`'s message, validated.
    fn subject_of<E: DomainEvent>(&self, envelope: &EventEnvelope<E>) -> Result<String, EventError> {
        let mut subject = match &self.prefix {
            Some(prefix) => format!("{prefix}.{}", envelope.event.subject()),
            None => envelope.event.subject().to_owned(),
        };
        if self.aggregate_id_token {
            subject.push('.');
            subject.push_str(&envelope.aggregate_id.to_string());
        }
        validate_subject(&subject)?;
        Ok(subject)
    }
}

/// What an append checks its events against.
pub(crate) struct AppendRules<'a> {
    /// The largest message an event may become.
    pub(crate) max_message_bytes: usize,
    pub(crate) subjects: &'a SubjectRule,
}

static DEFAULT_SUBJECTS: SubjectRule = SubjectRule { prefix: None, aggregate_id_token: false };

impl AppendRules<'static> {
    /// The event's own subjects, within `max_message_bytes`.
    pub(crate) fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes, subjects: &DEFAULT_SUBJECTS }
    }
}

/// What an append stored.
pub(crate) struct Appended<E> {
    /// The envelopes with their sequences, positions and record times.
    pub(crate) envelopes: Vec<EventEnvelope<E>>,
    /// The aggregate's partition.
    pub(crate) partition: i32,
    /// Where each event is in the global stream, in the same order.
    pub(crate) positions: Vec<StreamPosition>,
}

/// One event ready for the events table, encoded once for any backend.
pub(crate) struct EncodedRow {
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'static str,
    pub(crate) schema_version: i32,
    pub(crate) payload: String,
    pub(crate) metadata: String,
    pub(crate) keys: String,
    pub(crate) occurred_at: chrono::DateTime<chrono::Utc>,
    /// The subject the relay publishes it on.
    pub(crate) subject: String,
}

/// An append, checked and encoded, before any backend sees it.
pub(crate) struct Prepared {
    pub(crate) aggregate_id: Uuid,
    pub(crate) aggregate_type: String,
    pub(crate) rows: Vec<EncodedRow>,
    /// The number of events, as SQL binds it.
    pub(crate) count: i64,
    /// The aggregate's partition.
    pub(crate) partition: i32,
}

/// Checks and encodes an append for any backend; `None` when there is nothing to append.
pub(crate) fn prepare_append<E: DomainEvent>(
    envelopes: &[EventEnvelope<E>],
    expected: ExpectedSequence,
    rules: &AppendRules<'_>,
) -> Result<Option<Prepared>, EventError> {
    let Some(first) = envelopes.first() else { return Ok(None) };
    if let ExpectedSequence::Exactly(n) = expected
        && n < 0
    {
        return Err(EventError::Config(format!(
            "expected sequence {n} is negative: use 0 for a new aggregate"
        )));
    }
    let aggregate_id = first.aggregate_id;
    let aggregate_type = first.aggregate_type.clone();
    let rows = encode_rows(envelopes, aggregate_id, &aggregate_type, rules)?;
    let count =
        i64::try_from(rows.len()).map_err(|_| EventError::Config("too many events in one append".into()))?;
    Ok(Some(Prepared { aggregate_id, aggregate_type, rows, count, partition: partition_of(aggregate_id) }))
}

/// Encodes the envelopes of one append, checking that they all belong to one aggregate.
fn encode_rows<E: DomainEvent>(
    envelopes: &[EventEnvelope<E>],
    aggregate_id: Uuid,
    aggregate_type: &str,
    rules: &AppendRules<'_>,
) -> Result<Vec<EncodedRow>, EventError> {
    envelopes
        .iter()
        .map(|envelope| {
            check_aggregate(envelope, aggregate_id, aggregate_type)?;
            let subject = rules.subjects.subject_of(envelope)?;
            let encoded = envelope.event.encode()?;
            let event_type = encoded.event_type;
            let serialization = |source| EventError::Serialization { event_type, source };
            let schema_version = i32::try_from(encoded.schema_version).map_err(|_| {
                EventError::Config(format!(
                    "schema version {} does not fit the store",
                    encoded.schema_version
                ))
            })?;
            let keys: std::collections::BTreeMap<&str, _> =
                encoded.keys.iter().map(|k| (k.name, &k.value)).collect();
            let row = EncodedRow {
                event_id: envelope.event_id,
                event_type,
                schema_version,
                payload: String::from(encoded.payload.get()),
                metadata: serde_json::to_string(&envelope.metadata).map_err(serialization)?,
                keys: serde_json::to_string(&keys).map_err(serialization)?,
                occurred_at: envelope.occurred_at,
                subject,
            };
            check_event(envelope, &row, rules.max_message_bytes)?;
            Ok(row)
        })
        .collect()
}

fn check_aggregate<E: DomainEvent>(
    envelope: &EventEnvelope<E>,
    aggregate_id: Uuid,
    aggregate_type: &str,
) -> Result<(), EventError> {
    if envelope.aggregate_id != aggregate_id || envelope.aggregate_type != aggregate_type {
        return Err(EventError::Config(format!(
            "one append writes to one aggregate: {} {} and {aggregate_type} {aggregate_id} are both in it",
            envelope.aggregate_type, envelope.aggregate_id
        )));
    }
    if let Some(own) = envelope.event.aggregate_id()
        && own != aggregate_id
    {
        return Err(EventError::Config(format!(
            "event `{}` names aggregate {own} in its `#[event(aggregate_id)]` field but is appended to {aggregate_id}",
            envelope.event.event_type()
        )));
    }
    Ok(())
}

/// Why an append wrote nothing, from the stream row as it is now.
pub(crate) fn refusal(
    aggregate_id: Uuid,
    aggregate_type: &str,
    expected: ExpectedSequence,
    stream: Option<(String, i64)>,
) -> EventError {
    match stream {
        Some((stored_type, _)) if stored_type != aggregate_type => EventError::Config(format!(
            "aggregate {aggregate_id} is a `{stored_type}`, not a `{aggregate_type}`: one id, one aggregate type"
        )),
        Some((_, actual)) => EventError::Concurrency { aggregate_id, expected: expected.as_i64(), actual },
        None => EventError::Concurrency { aggregate_id, expected: expected.as_i64(), actual: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["edupulse", "a", "_x", "t_0123456789abcdef"] {
            assert!(SchemaName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Edupulse", "1abc", "a-b", "a b", "a;drop", "pg_catalog", "\"x\"", &"a".repeat(64)] {
            assert!(matches!(SchemaName::new(bad), Err(EventError::Config(_))), "{bad}");
        }
    }
}
