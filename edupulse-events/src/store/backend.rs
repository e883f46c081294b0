//! The backend seam: the one place that decides between PostgreSQL and SQLite.
//!
//! Everything above it (the store's API, transactions, streams, the relay's log access)
//! calls the methods here; only this file matches on the backend. A transaction and a
//! relay's lease carry their backend with them, so no pair of values of different backends
//! can meet. A third backend is a driver file and a variant in each enum below.
//!
//! Each backend is built with its feature (`postgres`, `sqlite`): the other's variants,
//! arms and imports are left out, so a build with one holds none of the other's driver.

use std::collections::HashMap;
use std::sync::Arc;

#[cfg(feature = "postgres")]
use sqlx::postgres::{PgConnection, PgPool};
#[cfg(feature = "sqlite")]
use sqlx::sqlite::{SqliteConnection, SqlitePool};
#[cfg(feature = "sqlite")]
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use crate::store::GlobalPosition;
use crate::store::Partition;
use crate::store::append::{AppendRules, Appended};
#[cfg(feature = "postgres")]
use crate::store::log::RunningTransaction;
use crate::store::log::{LogRow, MarkRow, Page, ParkedEvent, ParkedRow, RelayLag, StreamMark};
#[cfg(feature = "postgres")]
use crate::store::postgres::{PgBackend, PgTransaction};
use crate::store::row::{PageQuery, StoredRow};
#[cfg(feature = "sqlite")]
use crate::store::sqlite::{SqliteBackend, SqliteTransaction};
use crate::store::status::{Migrations, StoreStatus};
use crate::store::{ExpectedSequence, SchemaName, StoreConfig, StoredSnapshot, StreamPosition};
use crate::{DomainEvent, EventEnvelope, EventError};

/// The database of a store, for the application's own queries: match on it to use the
/// backend's sqlx pool. Cheap to clone (sqlx pools are handles).
///
/// Deliberately not `#[non_exhaustive]`: a match names every backend, so a new backend is
/// a compile error in the code that must handle it, not a silent fall-through.
#[derive(Debug, Clone)]
pub enum DatabasePool {
    /// A PostgreSQL pool.
    #[cfg(feature = "postgres")]
    Postgres(PgPool),
    /// The embedded SQLite pool.
    #[cfg(feature = "sqlite")]
    Sqlite(SqlitePool),
}

#[cfg(feature = "postgres")]
impl From<PgPool> for DatabasePool {
    fn from(pool: PgPool) -> Self {
        Self::Postgres(pool)
    }
}

#[cfg(feature = "sqlite")]
impl From<SqlitePool> for DatabasePool {
    fn from(pool: SqlitePool) -> Self {
        Self::Sqlite(pool)
    }
}

/// A connection in a transaction of the store, for the caller's own writes, or one the
/// caller manages with sqlx and hands to [`EventStore::append_in`](crate::EventStore::append_in).
/// Exhaustive, like [`DatabasePool`].
#[derive(Debug)]
pub enum Connection<'a> {
    /// A PostgreSQL connection (`&mut *tx` of a sqlx transaction).
    #[cfg(feature = "postgres")]
    Postgres(&'a mut PgConnection),
    /// A SQLite connection of the embedded backend.
    #[cfg(feature = "sqlite")]
    Sqlite(&'a mut SqliteConnection),
}

/// A store's database driver.
#[derive(Clone)]
pub(crate) enum Backend {
    #[cfg(feature = "postgres")]
    Postgres(Arc<PgBackend>),
    #[cfg(feature = "sqlite")]
    Sqlite(Arc<SqliteBackend>),
}

/// An open transaction, with its driver.
pub(crate) enum Tx {
    #[cfg(feature = "postgres")]
    Postgres(Arc<PgBackend>, PgTransaction),
    #[cfg(feature = "sqlite")]
    Sqlite(Arc<SqliteBackend>, SqliteTransaction),
}

/// How a relay holds its partitions, with its driver.
pub(crate) enum Lease {
    /// A session holding advisory locks; the relay's statements run on it.
    #[cfg(feature = "postgres")]
    Postgres(Arc<PgBackend>, PgConnection),
    /// In-process locks.
    #[cfg(feature = "sqlite")]
    Sqlite(Arc<SqliteBackend>, Vec<(Partition, OwnedMutexGuard<()>)>),
}

/// A database whose driver this build left out.
#[cfg(not(all(feature = "postgres", feature = "sqlite")))]
fn missing_feature(database: &str, feature: &str) -> EventError {
    EventError::Config(format!(
        "{database} support is not built in: enable the `{feature}` feature of edupulse-events"
    ))
}

impl Backend {
    /// Opens the database named by `url`: `postgres://` or `postgresql://`, or `sqlite:`.
    pub(crate) async fn connect(url: &str, config: &StoreConfig) -> Result<Self, EventError> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme).unwrap_or_default();
        match scheme {
            #[cfg(feature = "postgres")]
            "postgres" | "postgresql" => Ok(Self::Postgres(Arc::new(PgBackend::connect(url, config).await?))),
            #[cfg(feature = "sqlite")]
            _ if url.starts_with("sqlite:") => {
                Ok(Self::Sqlite(Arc::new(SqliteBackend::connect(url, config).await?)))
            }
            #[cfg(not(feature = "postgres"))]
            "postgres" | "postgresql" => Err(missing_feature("PostgreSQL", "postgres")),
            #[cfg(not(feature = "sqlite"))]
            _ if url.starts_with("sqlite:") => Err(missing_feature("SQLite", "sqlite")),
            _ => Err(EventError::Config(format!(
                "unsupported database URL scheme {scheme:?}: expected `postgres://` or `sqlite:`"
            ))),
        }
    }

    /// Uses an existing pool.
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))] // SQLite has no schema
    pub(crate) fn from_pool(pool: DatabasePool, config: &StoreConfig) -> Self {
        match pool {
            #[cfg(feature = "postgres")]
            DatabasePool::Postgres(pool) => Self::Postgres(Arc::new(PgBackend::new(pool, &config.schema))),
            #[cfg(feature = "sqlite")]
            DatabasePool::Sqlite(pool) => Self::Sqlite(Arc::new(SqliteBackend::new(pool))),
        }
    }

    /// Whether the store is on PostgreSQL (it has a schema).
    fn is_postgres(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => true,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(_) => false,
        }
    }

    /// The backend's name, for `Debug` output.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(_) => "postgres",
            #[cfg(feature = "sqlite")]
            Self::Sqlite(_) => "sqlite",
        }
    }

    pub(crate) fn pool(&self) -> DatabasePool {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => DatabasePool::Postgres(pg.pool.clone()),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => DatabasePool::Sqlite(sq.pool.clone()),
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))] // SQLite has no schema
    pub(crate) async fn migrate(&self, schema: &SchemaName) -> Result<(), EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.migrate(schema).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.migrate().await,
        }
    }

    pub(crate) async fn begin(&self) -> Result<Tx, EventError> {
        Ok(match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => Tx::Postgres(pg.clone(), pg.pool.begin().await?),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => Tx::Sqlite(sq.clone(), sq.begin().await?),
        })
    }

    /// Appends in a transaction of its own: on PostgreSQL one statement, which is atomic
    /// without BEGIN and COMMIT round trips.
    pub(crate) async fn append_alone<E: DomainEvent>(
        &self,
        expected: ExpectedSequence,
        envelopes: Vec<EventEnvelope<E>>,
        rules: &AppendRules<'_>,
    ) -> Result<Appended<E>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.append(&mut *pg.pool.acquire().await?, expected, envelopes, rules).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => {
                let mut tx = sq.begin().await?;
                let appended = sq.append(&mut tx, expected, envelopes, rules).await?;
                tx.commit().await?;
                Ok(appended)
            }
        }
    }

    /// Appends on a connection the caller manages.
    pub(crate) async fn append_in<E: DomainEvent>(
        &self,
        conn: Connection<'_>,
        expected: ExpectedSequence,
        envelopes: Vec<EventEnvelope<E>>,
        rules: &AppendRules<'_>,
    ) -> Result<Appended<E>, EventError> {
        match (self, conn) {
            #[cfg(feature = "postgres")]
            (Self::Postgres(pg), Connection::Postgres(conn)) => {
                pg.append(conn, expected, envelopes, rules).await
            }
            #[cfg(feature = "sqlite")]
            (Self::Sqlite(sq), Connection::Sqlite(conn)) => sq.append(conn, expected, envelopes, rules).await,
            #[allow(unreachable_patterns)] // with one backend built, every connection is its own
            (store, _) => Err(EventError::Config(format!(
                "append_in: the connection is not of this store's database ({})",
                store.name()
            ))),
        }
    }

    pub(crate) async fn current_sequence(&self, aggregate_id: Uuid) -> Result<i64, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.current_sequence(aggregate_id).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.current_sequence(aggregate_id).await,
        }
    }

    pub(crate) async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.save_snapshot(snapshot).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.save_snapshot(snapshot).await,
        }
    }

    pub(crate) async fn load_snapshot(
        &self,
        aggregate_id: Uuid,
    ) -> Result<Option<StoredSnapshot>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.load_snapshot(aggregate_id).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.load_snapshot(aggregate_id).await,
        }
    }

    pub(crate) async fn load_checkpoint(&self, name: &str) -> Result<Option<StreamPosition>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.load_checkpoint(&mut *pg.pool.acquire().await?, name).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.load_checkpoint(&mut *sq.pool.acquire().await?, name).await,
        }
    }

    pub(crate) async fn stream_head(&self) -> Result<Option<StreamPosition>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.stream_head().await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.stream_head().await,
        }
    }

    pub(crate) async fn count_after(&self, after: StreamPosition) -> Result<u64, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.count_after(after).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.count_after(after).await,
        }
    }

    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))] // SQLite has no schema
    pub(crate) async fn migrations(&self, schema: &SchemaName) -> Result<Migrations, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.migrations(schema).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.migrations().await,
        }
    }

    /// The store's status; the PostgreSQL schema is named, SQLite has none. Before the
    /// first migration, only the migrations (the tables are not there).
    pub(crate) async fn status(&self, schema: &SchemaName) -> Result<StoreStatus, EventError> {
        let status = StoreStatus {
            backend: self.name(),
            schema: self.is_postgres().then(|| schema.as_str().to_owned()),
            migrations: self.migrations(schema).await?,
            events: 0,
            aggregates: 0,
            last_position: 0,
            partitions: Vec::new(),
            projections: Vec::new(),
            lag: RelayLag::default(),
        };
        if status.migrations.applied.is_empty() {
            return Ok(status);
        }
        let ((events, aggregates, last_position), partitions, projections) = match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => (pg.counts().await?, pg.partitions().await?, pg.projections().await?),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => (sq.counts().await?, sq.partitions().await?, sq.projections().await?),
        };
        let lag = self.relay_lag().await?;
        Ok(StoreStatus { events, aggregates, last_position, partitions, projections, lag, ..status })
    }

    pub(crate) async fn request_rebuild(&self, name: &str) -> Result<bool, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.request_rebuild(name).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.request_rebuild(name).await,
        }
    }

    pub(crate) async fn position_of(
        &self,
        global_position: i64,
    ) -> Result<Option<StreamPosition>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.position_of(global_position).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.position_of(global_position).await,
        }
    }

    pub(crate) async fn fetch_page(
        &self,
        query: &PageQuery,
        after: StreamPosition,
        limit: i64,
    ) -> Result<Vec<StoredRow>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.fetch_page(query, after, limit).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.fetch_page(query, after, limit).await,
        }
    }

    /// The backlog, and on PostgreSQL the transaction holding the horizon when events are
    /// held back.
    pub(crate) async fn relay_lag(&self) -> Result<RelayLag, EventError> {
        let (row, oldest) = match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => {
                let row = pg.relay_lag().await?;
                let oldest: Option<RunningTransaction> =
                    if row.held_back > 0 { pg.oldest_write().await? } else { None };
                (row, oldest)
            }
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => (sq.relay_lag().await?, None),
        };
        let lost = self.lost_marks().await?;
        Ok(RelayLag { lost, ..row.with_oldest_write(oldest) })
    }

    /// The marks of streams found holding less than they acknowledged.
    pub(crate) async fn lost_marks(&self) -> Result<Vec<StreamMark>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.marks_lost().await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.marks_lost().await,
        }
    }

    /// Asks the relays holding partitions whose stream lost messages to send them again.
    pub(crate) async fn request_repair(&self) -> Result<u64, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.marks_request().await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.marks_request().await,
        }
    }

    pub(crate) async fn parked_list(&self, limit: i64) -> Result<Vec<ParkedEvent>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.parked_list(limit).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.parked_list(limit).await,
        }
    }

    pub(crate) async fn parked_among(&self, positions: &[i64]) -> Result<Vec<ParkedEvent>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.parked_among(positions).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.parked_among(positions).await,
        }
    }

    pub(crate) async fn requeue(&self, positions: Option<&[i64]>) -> Result<u64, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.requeue(positions).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.requeue(positions).await,
        }
    }

    /// The saved checkpoints of `partitions` (read without a lease).
    pub(crate) async fn checkpoints_of(
        &self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, StreamPosition)>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => pg.checkpoints_of(partitions).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => sq.relay_checkpoints(partitions).await,
        }
    }

    /// A lease holding no partitions yet (on PostgreSQL, its own session).
    pub(crate) async fn lease(&self) -> Result<Lease, EventError> {
        Ok(match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg) => Lease::Postgres(pg.clone(), pg.relay_lease().await?),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq) => Lease::Sqlite(sq.clone(), Vec::new()),
        })
    }
}

impl Tx {
    pub(crate) fn backend_name(&self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(..) => "postgres",
            #[cfg(feature = "sqlite")]
            Self::Sqlite(..) => "sqlite",
        }
    }

    pub(crate) async fn append<E: DomainEvent>(
        &mut self,
        expected: ExpectedSequence,
        envelopes: Vec<EventEnvelope<E>>,
        rules: &AppendRules<'_>,
    ) -> Result<Appended<E>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, tx) => pg.append(tx, expected, envelopes, rules).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, tx) => sq.append(tx, expected, envelopes, rules).await,
        }
    }

    pub(crate) fn connection(&mut self) -> Connection<'_> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(_, tx) => Connection::Postgres(tx),
            #[cfg(feature = "sqlite")]
            Self::Sqlite(_, tx) => Connection::Sqlite(&mut *tx),
        }
    }

    pub(crate) async fn save_checkpoint(
        &mut self,
        name: &str,
        position: StreamPosition,
    ) -> Result<(), EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, tx) => pg.save_checkpoint(tx, name, position).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, tx) => sq.save_checkpoint(tx, name, position).await,
        }
    }

    pub(crate) async fn load_checkpoint(&mut self, name: &str) -> Result<Option<StreamPosition>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, tx) => pg.load_checkpoint(tx, name).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, tx) => sq.load_checkpoint(tx, name).await,
        }
    }

    pub(crate) async fn lock_checkpoint(&mut self, name: &str) -> Result<StreamPosition, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, tx) => pg.lock_checkpoint(tx, name).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, tx) => sq.lock_checkpoint(tx, name).await,
        }
    }

    /// Commits; on PostgreSQL, when a statement may have failed, first makes sure the
    /// transaction was not aborted (PostgreSQL answers COMMIT of an aborted one with
    /// ROLLBACK, which sqlx reports as success).
    ///
    /// `written` are the positions of the events appended in the transaction. On SQLite
    /// the transaction checks itself ([`SqliteTransaction`]).
    #[cfg_attr(not(feature = "postgres"), allow(unused_variables))] // SQLite has no schema
    pub(crate) async fn commit(self, may_be_aborted: bool, written: &[i64]) -> Result<(), EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, mut tx) => {
                if may_be_aborted {
                    pg.ensure_not_aborted(&mut tx, written).await?;
                }
                tx.commit().await?;
            }
            #[cfg(feature = "sqlite")]
            Self::Sqlite(_, tx) => tx.commit().await?,
        }
        Ok(())
    }

    pub(crate) async fn rollback(self) -> Result<(), EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(_, tx) => tx.rollback().await?,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(_, tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

impl Lease {
    /// Takes those of `wanted` that no other relay holds; returns them.
    pub(crate) async fn lock(&mut self, wanted: &[Partition]) -> Result<Vec<Partition>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.relay_lock(conn, wanted).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, held) => {
                let guards = sq.relay_lock(wanted);
                let taken = guards.iter().map(|(p, _)| *p).collect();
                held.extend(guards);
                Ok(taken)
            }
        }
    }

    /// The checkpoints of `partitions` (created at the log's start when missing).
    pub(crate) async fn checkpoints(
        &mut self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, StreamPosition)>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.relay_checkpoints(conn, partitions).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.relay_checkpoints(partitions).await,
        }
    }

    /// The parked aggregates of `partitions`, with the position of their first parked event.
    pub(crate) async fn parked_heads(
        &mut self,
        partitions: &[Partition],
    ) -> Result<HashMap<Uuid, GlobalPosition>, EventError> {
        let heads = match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.parked_heads(conn, partitions).await?,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.parked_heads(partitions).await?,
        };
        Ok(heads.into_iter().map(|(aggregate, head)| (aggregate, GlobalPosition::new(head))).collect())
    }

    /// The next page of `partitions` after `after`, below the horizon.
    pub(crate) async fn page(
        &mut self,
        after: StreamPosition,
        limit: i64,
        max_bytes: usize,
        partitions: &[Partition],
    ) -> Result<Page, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.relay_page(conn, after, limit, max_bytes, partitions).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.relay_page(after, limit, max_bytes, partitions).await,
        }
    }

    /// The parked events of re-queued aggregates of `partitions`, in order.
    pub(crate) async fn requeued(&mut self, partitions: &[Partition]) -> Result<Vec<LogRow>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.parked_requeued(conn, partitions).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.parked_requeued(partitions).await,
        }
    }

    /// Forgets parked events that were published after all.
    pub(crate) async fn unpark(&mut self, positions: &[GlobalPosition]) -> Result<(), EventError> {
        let positions: Vec<i64> = positions.iter().map(|p| p.get()).collect();
        let positions = positions.as_slice();
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.parked_delete(conn, positions).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.parked_delete(positions).await,
        }
    }

    /// Parks a re-queued aggregate again, from `position`, refused for `reason`.
    pub(crate) async fn refused_again(
        &mut self,
        aggregate_id: Uuid,
        position: GlobalPosition,
        reason: &str,
    ) -> Result<(), EventError> {
        let position = position.get();
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.parked_refused_again(conn, aggregate_id, position, reason).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.parked_refused_again(aggregate_id, position, reason).await,
        }
    }

    /// The stream marks of `partitions`.
    pub(crate) async fn marks(&mut self, partitions: &[Partition]) -> Result<Vec<StreamMark>, EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.marks_load(conn, partitions).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.marks_load(partitions).await,
        }
    }

    /// Saves acknowledged stream sequences.
    pub(crate) async fn save_marks(&mut self, marks: &[MarkRow<'_>]) -> Result<(), EventError> {
        if marks.is_empty() {
            return Ok(());
        }
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.marks_save(conn, marks).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.marks_save(marks).await,
        }
    }

    /// Records that `stream` holds only up to `held` of what it acknowledged to `partition`,
    /// or (`None`) that it holds everything again.
    pub(crate) async fn mark_behind(
        &mut self,
        partition: Partition,
        stream: &str,
        held: Option<i64>,
    ) -> Result<(), EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.marks_behind(conn, partition, stream, held).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.marks_behind(partition, stream, held).await,
        }
    }

    /// Saves checkpoints and parks events, in one statement.
    pub(crate) async fn save(
        &mut self,
        checkpoints: &[(Partition, StreamPosition)],
        parked: &[ParkedRow],
    ) -> Result<(), EventError> {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(pg, conn) => pg.relay_save(conn, checkpoints, parked).await,
            #[cfg(feature = "sqlite")]
            Self::Sqlite(sq, _) => sq.relay_save(checkpoints, parked).await,
        }
    }

    /// Lets every partition go: the session ends (PostgreSQL frees its locks either way),
    /// or the in-process locks are dropped.
    pub(crate) async fn close(self) {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(_, conn) => {
                let _ = sqlx::Connection::close(conn).await;
            }
            #[cfg(feature = "sqlite")]
            Self::Sqlite(..) => {}
        }
    }
}
