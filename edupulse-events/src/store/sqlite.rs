//! The embedded backend: the same store on SQLite (bundled, a file or `sqlite::memory:`),
//! so that examples and tests of domain logic need no server.
//!
//! What differs from PostgreSQL, and why it is still correct:
//! - One writer at a time: store transactions start with `BEGIN IMMEDIATE`, so appends
//!   serialise on the database lock and a lost race is found by the same stream-row check.
//!   Positions are handed out in commit order, so the global stream is read by position.
//! - No schemas: `StoreConfig::schema` is ignored; use one database file per store.
//! - Keys are matched with `json_extract` on a scan of the event-type index, not a GIN
//!   index: fine for embedded volumes.
//! - Relays coordinate through in-process partition locks: run them in the process that
//!   owns the database file.

use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use crate::store::PARTITIONS;
use crate::store::Partition;
use crate::store::append::{AppendRules, Appended, EncodedRow, Prepared, prepare_append, refusal};
use crate::store::log::{LogRow, MarkRow, Page, ParkedEvent, ParkedRow, RelayLagRow, StreamMark};
use crate::store::migrations::{MigrationFile, migrator};
use crate::store::row::{PageQuery, StoredRow, stored_row};
use crate::store::status::{Migrations, PartitionStatus, ProjectionStatus};
use crate::store::{ExpectedSequence, StoreConfig, StoredSnapshot, StreamPosition};
use crate::{DomainEvent, EventEnvelope, EventError, KeyValue};

/// `migrations/sqlite`, file by file (`store::migrations` tests that the list is the folder).
pub(crate) const MIGRATION_FILES: &[MigrationFile] = &[
    (1, "event store", include_str!("../../migrations/sqlite/0001_event_store.sql")),
    (2, "snapshots", include_str!("../../migrations/sqlite/0002_snapshots.sql")),
    (3, "delivery from log", include_str!("../../migrations/sqlite/0003_delivery_from_log.sql")),
    (4, "relay stream marks", include_str!("../../migrations/sqlite/0004_relay_stream_marks.sql")),
];

const MARK_COLUMNS: &str =
    "partition, stream, sequence, behind_since, held_sequence, repair_requested, event_id";

static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(MIGRATION_FILES));

pub(crate) use crate::store::sqlite_tx::SqliteTransaction;

/// The columns of a stored row; the position doubles as the stream's transaction id.
macro_rules! columns {
    () => {
        "e.global_position, e.global_position AS transaction_id, e.event_id, e.aggregate_type, e.aggregate_id, \
         e.sequence, e.event_type, e.schema_version, e.payload, e.metadata, e.occurred_at, e.recorded_at, e.subject"
    };
}

/// The database file `file` could not be opened: named, with the likely fix.
fn open_error(file: &std::path::Path, e: sqlx::Error) -> EventError {
    let hint = match file.parent() {
        Some(folder) if !folder.as_os_str().is_empty() && !folder.is_dir() => format!(
            "the folder {} does not exist: create it, or name a file in a folder that does",
            folder.display()
        ),
        _ => "check that the file can be created, read and written there by this process".to_owned(),
    };
    crate::connect::connect_error("SQLite", &file.display().to_string(), crate::ConnectCause::Other, hint, e)
}

pub(crate) struct SqliteBackend {
    pub(crate) pool: SqlitePool,
    /// One holder per partition among this process's relays.
    partition_locks: Vec<Arc<Mutex<()>>>,
}

impl SqliteBackend {
    pub(crate) async fn connect(url: &str, config: &StoreConfig) -> Result<Self, EventError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|_| EventError::Config("the SQLite URL cannot be parsed".into()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let file = options.get_filename().to_path_buf();
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await
            .map_err(|e| open_error(&file, e))?;
        Ok(Self::new(pool))
    }

    /// Uses an existing pool.
    pub(crate) fn new(pool: SqlitePool) -> Self {
        let partition_locks = (0..PARTITIONS).map(|_| Arc::new(Mutex::new(()))).collect();
        Self { pool, partition_locks }
    }

    pub(crate) async fn migrate(&self) -> Result<(), EventError> {
        // `run_direct` on a connection, not `run` on the pool: see `PgBackend::migrate`.
        let mut conn = self.pool.acquire().await?;
        MIGRATOR
            .run_direct(None, &mut *conn, false)
            .await
            .map_err(|source| EventError::Migration { backend: "SQLite", source })
    }

    /// A write transaction ([`SqliteTransaction`]).
    pub(crate) async fn begin(&self) -> Result<SqliteTransaction, EventError> {
        SqliteTransaction::begin(&self.pool).await
    }

    pub(crate) async fn current_sequence(&self, aggregate_id: Uuid) -> Result<i64, EventError> {
        let version: Option<i64> = sqlx::query_scalar("SELECT version FROM streams WHERE aggregate_id = ?1")
            .bind(aggregate_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(version.unwrap_or(0))
    }

    pub(crate) async fn append<E: DomainEvent>(
        &self,
        conn: &mut SqliteConnection,
        expected: ExpectedSequence,
        mut envelopes: Vec<EventEnvelope<E>>,
        rules: &AppendRules<'_>,
    ) -> Result<Appended<E>, EventError> {
        let Some(prepared) = prepare_append(&envelopes, expected, rules)? else {
            return Ok(Appended { envelopes, partition: Partition::new(0), positions: Vec::new() });
        };
        let version = bump_stream(conn, &prepared, expected).await?;
        let recorded_at = Utc::now();
        let mut positions = Vec::with_capacity(prepared.rows.len());
        for (i, (envelope, row)) in envelopes.iter_mut().zip(&prepared.rows).enumerate() {
            let sequence = version - prepared.count + 1 + i64::try_from(i).unwrap_or(i64::MAX);
            let position = match insert_event(conn, &prepared, row, sequence, recorded_at).await {
                Ok(position) => position,
                // Only reachable when rows were written around the store, as on PostgreSQL:
                // the aggregate already has an event at this sequence.
                Err(EventError::Database(e)) if is_sequence_taken(&e) => {
                    let (aggregate_id, expected) = (prepared.aggregate_id, expected.as_i64());
                    let actual: Option<i64> =
                        sqlx::query_scalar("SELECT max(sequence) FROM events WHERE aggregate_id = ?1")
                            .bind(aggregate_id)
                            .fetch_one(&mut *conn)
                            .await?;
                    let actual = actual.unwrap_or(sequence).max(sequence);
                    return Err(EventError::Concurrency { aggregate_id, expected, actual });
                }
                Err(e) => return Err(e),
            };
            envelope.sequence = sequence;
            envelope.global_position = Some(position);
            envelope.recorded_at = Some(recorded_at);
            positions.push(StreamPosition { transaction_id: position, global_position: position });
        }
        Ok(Appended { envelopes, partition: prepared.partition, positions })
    }

    pub(crate) async fn save_checkpoint(
        &self,
        conn: &mut SqliteConnection,
        name: &str,
        position: StreamPosition,
    ) -> Result<(), EventError> {
        sqlx::query(
            "INSERT INTO checkpoints (name, transaction_id, global_position, updated_at) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (name) DO UPDATE SET transaction_id = excluded.transaction_id, \
                 global_position = excluded.global_position, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(position.transaction_id)
        .bind(position.global_position)
        .bind(Utc::now())
        .execute(conn)
        .await?;
        Ok(())
    }

    pub(crate) async fn load_checkpoint(
        &self,
        conn: &mut SqliteConnection,
        name: &str,
    ) -> Result<Option<StreamPosition>, EventError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as("SELECT transaction_id, global_position FROM checkpoints WHERE name = ?1")
                .bind(name)
                .fetch_optional(conn)
                .await?;
        Ok(row.map(|(transaction_id, global_position)| StreamPosition { transaction_id, global_position }))
    }

    /// The checkpoint, created at the start if missing. The transaction already holds the
    /// database's write lock (`BEGIN IMMEDIATE`).
    pub(crate) async fn lock_checkpoint(
        &self,
        conn: &mut SqliteConnection,
        name: &str,
    ) -> Result<StreamPosition, EventError> {
        sqlx::query(
            "INSERT INTO checkpoints (name, transaction_id, global_position, updated_at) VALUES (?1, 0, 0, ?2) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(Utc::now())
        .execute(&mut *conn)
        .await?;
        Ok(self.load_checkpoint(conn, name).await?.unwrap_or(StreamPosition::START))
    }

    pub(crate) async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), EventError> {
        sqlx::query(
            "INSERT INTO snapshots (aggregate_id, aggregate_type, sequence, state_version, state, taken_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (aggregate_id) DO UPDATE SET sequence = excluded.sequence, \
                 state_version = excluded.state_version, state = excluded.state, taken_at = excluded.taken_at \
             WHERE snapshots.sequence < excluded.sequence OR snapshots.state_version <> excluded.state_version",
        )
        .bind(snapshot.aggregate_id)
        .bind(&snapshot.aggregate_type)
        .bind(snapshot.sequence)
        .bind(i64::from(snapshot.state_version))
        .bind(&snapshot.state)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn load_snapshot(
        &self,
        aggregate_id: Uuid,
    ) -> Result<Option<StoredSnapshot>, EventError> {
        let row: Option<(Uuid, String, i64, i64, String)> = sqlx::query_as(
            "SELECT aggregate_id, aggregate_type, sequence, state_version, state FROM snapshots WHERE aggregate_id = ?1",
        )
        .bind(aggregate_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(aggregate_id, aggregate_type, sequence, state_version, state)| StoredSnapshot {
            aggregate_id,
            aggregate_type,
            sequence,
            state_version: u32::try_from(state_version).unwrap_or(0),
            state,
        }))
    }

    /// The last committed row of the global stream, if any (one writer: positions follow
    /// commit order, and the stream's transaction id is the position).
    pub(crate) async fn stream_head(&self) -> Result<Option<StreamPosition>, EventError> {
        let row: Option<(i64,)> =
            sqlx::query_as("SELECT global_position FROM events ORDER BY global_position DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(position,)| StreamPosition { transaction_id: position, global_position: position }))
    }

    /// The events of the global stream after `after`, of any type.
    pub(crate) async fn count_after(&self, after: StreamPosition) -> Result<u64, EventError> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE global_position > ?1")
            .bind(after.global_position)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(crate) async fn fetch_page(
        &self,
        query: &PageQuery,
        after: StreamPosition,
        limit: i64,
    ) -> Result<Vec<StoredRow>, EventError> {
        let rows = match query {
            PageQuery::Aggregate(id) => sqlx::query(concat!(
                "SELECT ",
                columns!(),
                " FROM events e WHERE e.aggregate_id = ?1 AND e.sequence > ?2 ORDER BY e.sequence LIMIT ?3"
            ))
            .bind(id)
            .bind(after.global_position)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?,
            PageQuery::All { event_types } => {
                let types = event_types.as_ref().map(|t| serde_json::Value::from(t.clone()).to_string());
                sqlx::query(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM events e WHERE e.global_position > ?1 \
                     AND (?3 IS NULL OR e.event_type IN (SELECT value FROM json_each(?3))) \
                     ORDER BY e.global_position LIMIT ?2"
                ))
                .bind(after.global_position)
                .bind(limit)
                .bind(types)
                .fetch_all(&self.pool)
                .await?
            }
            PageQuery::Key { value: None, .. } => Vec::new(),
            PageQuery::Key { name, value: Some(value), event_types } => {
                let path = format!("$.{}", serde_json::Value::from(name.as_str()));
                let types = serde_json::Value::from(event_types.clone()).to_string();
                let query = sqlx::query(concat!(
                    "SELECT ",
                    columns!(),
                    " FROM events e WHERE e.global_position > ?1 \
                     AND e.event_type IN (SELECT value FROM json_each(?3)) AND json_extract(e.keys, ?4) = ?5 \
                     ORDER BY e.global_position LIMIT ?2"
                ))
                .bind(after.global_position)
                .bind(limit)
                .bind(types)
                .bind(path);
                let query = match value {
                    KeyValue::Uuid(u) => query.bind(u.to_string()),
                    KeyValue::Text(t) => query.bind(t.as_str()),
                    KeyValue::Integer(i) => query.bind(*i),
                    KeyValue::Bool(b) => query.bind(i64::from(*b)),
                };
                query.fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(stored_row).collect::<Result<_, sqlx::Error>>().map_err(EventError::from)
    }
}

/// Moves the aggregate's stream row on by the append's events when it is at `expected`
/// (creating it for a new aggregate); returns the new version, or why nothing was written.
async fn bump_stream(
    conn: &mut SqliteConnection,
    prepared: &Prepared,
    expected: ExpectedSequence,
) -> Result<i64, EventError> {
    let sql = match expected {
        ExpectedSequence::Exactly(e) if e > 0 => {
            "UPDATE streams SET version = version + ?1 \
             WHERE aggregate_id = ?2 AND aggregate_type = ?3 AND version = ?4 RETURNING version"
        }
        _ => {
            "INSERT INTO streams (aggregate_id, aggregate_type, version) VALUES (?2, ?3, ?1) \
             ON CONFLICT (aggregate_id) DO UPDATE SET version = streams.version + ?1 \
             WHERE streams.aggregate_type = ?3 AND (?4 < 0 OR streams.version = ?4) RETURNING version"
        }
    };
    let version: Option<i64> = sqlx::query_scalar(sql)
        .bind(prepared.count)
        .bind(prepared.aggregate_id)
        .bind(&prepared.aggregate_type)
        .bind(expected.as_i64())
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(version) = version {
        return Ok(version);
    }
    let stream: Option<(String, i64)> =
        sqlx::query_as("SELECT aggregate_type, version FROM streams WHERE aggregate_id = ?1")
            .bind(prepared.aggregate_id)
            .fetch_optional(&mut *conn)
            .await?;
    Err(refusal(prepared.aggregate_id, &prepared.aggregate_type, expected, stream))
}

/// A unique violation of the events' (aggregate, sequence).
fn is_sequence_taken(error: &sqlx::Error) -> bool {
    error.as_database_error().is_some_and(|d| {
        d.kind() == sqlx::error::ErrorKind::UniqueViolation && d.message().contains("events.sequence")
    })
}

/// Writes one event row; returns its position.
async fn insert_event(
    conn: &mut SqliteConnection,
    prepared: &Prepared,
    row: &EncodedRow,
    sequence: i64,
    recorded_at: DateTime<Utc>,
) -> Result<i64, EventError> {
    let position = sqlx::query_scalar(
        "INSERT INTO events (event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, \
             payload, metadata, keys, occurred_at, recorded_at, subject, partition) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) RETURNING global_position",
    )
    .bind(row.event_id)
    .bind(&prepared.aggregate_type)
    .bind(prepared.aggregate_id)
    .bind(sequence)
    .bind(row.event_type)
    .bind(row.schema_version)
    .bind(&row.payload)
    .bind(&row.metadata)
    .bind(&row.keys)
    .bind(row.occurred_at)
    .bind(recorded_at)
    .bind(&row.subject)
    .bind(prepared.partition)
    .fetch_one(&mut *conn)
    .await?;
    Ok(position)
}

/// The relay's statements on SQLite: positions follow commit order, so a page is the held
/// partitions' rows past the lowest checkpoint by position; partitions are held through
/// in-process locks.
impl SqliteBackend {
    /// Takes the free ones of `partitions`: the guards hold them until dropped.
    pub(crate) fn relay_lock(&self, partitions: &[Partition]) -> Vec<(Partition, OwnedMutexGuard<()>)> {
        partitions
            .iter()
            .filter_map(|&p| {
                let lock = self.partition_locks.get(p.index()?)?;
                Some((p, Arc::clone(lock).try_lock_owned().ok()?))
            })
            .collect()
    }

    pub(crate) async fn relay_checkpoints(
        &self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, StreamPosition)>, EventError> {
        let rows: Vec<(Partition, i64)> = sqlx::query_as(
            "SELECT partition, global_position FROM relay_checkpoints \
             WHERE partition IN (SELECT value FROM json_each(?1))",
        )
        .bind(json_list(partitions))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(p, g)| (p, StreamPosition { transaction_id: g, global_position: g }))
            .collect())
    }

    pub(crate) async fn relay_page(
        &self,
        after: StreamPosition,
        limit: i64,
        max_bytes: usize,
        partitions: &[Partition],
    ) -> Result<Page, EventError> {
        let partitions = json_list(partitions);
        let rows = sqlx::query(concat!(
            "SELECT e.partition, ",
            columns!(),
            " FROM events e WHERE e.global_position > ?1 AND e.subject IS NOT NULL \
             AND e.partition IN (SELECT value FROM json_each(?3)) ORDER BY e.global_position LIMIT ?2"
        ))
        .bind(after.global_position)
        .bind(limit)
        .bind(partitions)
        .fetch(&self.pool)
        .map(|r| {
            let r = r?;
            Ok(LogRow {
                partition: r.try_get("partition")?,
                subject: r.try_get("subject")?,
                row: stored_row(&r)?,
            })
        });
        Page::collect(rows, max_bytes).await
    }

    /// Parks the refused events and moves the checkpoints, in one transaction.
    pub(crate) async fn relay_save(
        &self,
        checkpoints: &[(Partition, StreamPosition)],
        parked: &[ParkedRow],
    ) -> Result<(), EventError> {
        let mut tx = self.begin().await?;
        let now = Utc::now();
        for row in parked {
            sqlx::query(
                "INSERT INTO parked_events (global_position, event_id, aggregate_id, sequence, partition, blocked_by, \
                     attempts, reason, parked_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
                 ON CONFLICT (global_position) DO NOTHING",
            )
            .bind(row.global_position)
            .bind(row.event_id)
            .bind(row.aggregate_id)
            .bind(row.sequence)
            .bind(row.partition)
            .bind(row.blocked_by)
            .bind(row.attempts)
            .bind(&row.reason)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        for (partition, position) in checkpoints {
            sqlx::query(
                "UPDATE relay_checkpoints SET transaction_id = ?2, global_position = ?2, updated_at = ?3 \
                 WHERE partition = ?1 AND global_position < ?2",
            )
            .bind(partition)
            .bind(position.global_position)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn parked_heads(
        &self,
        partitions: &[Partition],
    ) -> Result<Vec<(Uuid, i64)>, EventError> {
        Ok(sqlx::query_as(
            "SELECT aggregate_id, global_position FROM parked_events \
             WHERE partition IN (SELECT value FROM json_each(?1)) AND blocked_by IS NULL",
        )
        .bind(json_list(partitions))
        .fetch_all(&self.pool)
        .await?)
    }

    pub(crate) async fn parked_requeued(&self, partitions: &[Partition]) -> Result<Vec<LogRow>, EventError> {
        let rows = sqlx::query(concat!(
            "SELECT p.partition, ",
            columns!(),
            " FROM parked_events p JOIN events e ON e.global_position = p.global_position \
             WHERE p.partition IN (SELECT value FROM json_each(?1)) AND p.aggregate_id IN ( \
                 SELECT aggregate_id FROM parked_events WHERE requeued <> 0) \
             ORDER BY p.aggregate_id, p.sequence"
        ))
        .bind(json_list(partitions))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(LogRow {
                    partition: r.try_get("partition")?,
                    subject: r.try_get("subject")?,
                    row: stored_row(r)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(EventError::from)
    }

    pub(crate) async fn parked_delete(&self, positions: &[i64]) -> Result<(), EventError> {
        let list = serde_json::Value::from(positions.to_vec()).to_string();
        sqlx::query("DELETE FROM parked_events WHERE global_position IN (SELECT value FROM json_each(?1))")
            .bind(list)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn parked_refused_again(
        &self,
        aggregate_id: Uuid,
        position: i64,
        reason: &str,
    ) -> Result<(), EventError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE parked_events SET blocked_by = NULL, requeued = 0, attempts = attempts + 1, reason = ?2 \
             WHERE global_position = ?1",
        )
        .bind(position)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE parked_events SET blocked_by = ?2, requeued = 0 WHERE aggregate_id = ?1 AND global_position <> ?2",
        )
        .bind(aggregate_id)
        .bind(position)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The stream marks of `partitions`.
    pub(crate) async fn marks_load(&self, partitions: &[Partition]) -> Result<Vec<StreamMark>, EventError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MARK_COLUMNS} FROM relay_stream_marks WHERE partition IN (SELECT value FROM json_each(?1)) \
             ORDER BY partition, stream"
        )))
        .bind(json_list(partitions))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(StreamMark::from_row).collect::<Result<_, _>>()?)
    }

    /// Sets the acknowledged sequences of `(partition, stream)`s.
    pub(crate) async fn marks_save(&self, marks: &[MarkRow<'_>]) -> Result<(), EventError> {
        let mut tx = self.begin().await?;
        for mark in marks {
            sqlx::query(
                "INSERT INTO relay_stream_marks (partition, stream, sequence, event_id) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (partition, stream) DO UPDATE SET sequence = excluded.sequence, \
                     event_id = excluded.event_id, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            )
            .bind(mark.partition)
            .bind(mark.stream)
            .bind(mark.sequence)
            .bind(mark.event_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Marks a partition's stream behind (holding up to `held`), or clears it (`None`).
    pub(crate) async fn marks_behind(
        &self,
        partition: Partition,
        stream: &str,
        held: Option<i64>,
    ) -> Result<(), EventError> {
        sqlx::query(
            "UPDATE relay_stream_marks SET \
                 behind_since = CASE WHEN ?3 IS NULL THEN NULL ELSE coalesce(behind_since, ?4) END, \
                 held_sequence = ?3, repair_requested = repair_requested AND ?3 IS NOT NULL, updated_at = ?4 \
             WHERE partition = ?1 AND stream = ?2",
        )
        .bind(partition)
        .bind(stream)
        .bind(held)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The marks of streams found behind.
    pub(crate) async fn marks_lost(&self) -> Result<Vec<StreamMark>, EventError> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MARK_COLUMNS} FROM relay_stream_marks WHERE behind_since IS NOT NULL ORDER BY stream, partition"
        )))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(StreamMark::from_row).collect::<Result<_, _>>()?)
    }

    /// Asks the relays to send what their streams lost again; returns the marks asked.
    pub(crate) async fn marks_request(&self) -> Result<u64, EventError> {
        let done =
            sqlx::query("UPDATE relay_stream_marks SET repair_requested = 1 WHERE behind_since IS NOT NULL")
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected())
    }

    pub(crate) async fn relay_lag(&self) -> Result<RelayLagRow, EventError> {
        let (pending, oldest): (i64, Option<DateTime<Utc>>) = sqlx::query_as(
            "SELECT count(*), min(e.recorded_at) FROM events e JOIN relay_checkpoints c ON c.partition = e.partition \
             WHERE e.subject IS NOT NULL AND e.global_position > c.global_position",
        )
        .fetch_one(&self.pool)
        .await?;
        let parked: i64 =
            sqlx::query_scalar("SELECT count(*) FROM parked_events").fetch_one(&self.pool).await?;
        let seconds = |t: DateTime<Utc>| (Utc::now() - t).num_milliseconds() as f64 / 1000.0;
        Ok(RelayLagRow { pending, oldest_pending_seconds: oldest.map(seconds), held_back: 0, parked })
    }

    pub(crate) async fn parked_list(&self, limit: i64) -> Result<Vec<ParkedEvent>, EventError> {
        let rows = sqlx::query(
            "SELECT global_position, event_id, aggregate_id, sequence, partition, blocked_by, attempts, reason, \
                 requeued, parked_at FROM parked_events ORDER BY global_position LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        parked_events(&rows)
    }

    pub(crate) async fn parked_among(&self, positions: &[i64]) -> Result<Vec<ParkedEvent>, EventError> {
        let rows = sqlx::query(
            "SELECT global_position, event_id, aggregate_id, sequence, partition, blocked_by, attempts, reason, \
                 requeued, parked_at FROM parked_events \
             WHERE global_position IN (SELECT value FROM json_each(?1)) ORDER BY global_position",
        )
        .bind(serde_json::Value::from(positions.to_vec()).to_string())
        .fetch_all(&self.pool)
        .await?;
        parked_events(&rows)
    }
}

impl SqliteBackend {
    /// The migrations recorded in the database (none before the first `migrate`).
    pub(crate) async fn migrations(&self) -> Result<Migrations, EventError> {
        let exists: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
        )
        .fetch_one(&self.pool)
        .await?;
        let applied = if exists > 0 {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        Ok(Migrations::of(MIGRATOR.iter().map(|m| m.version), applied))
    }

    /// Events, aggregates and the highest global position.
    pub(crate) async fn counts(&self) -> Result<(i64, i64, i64), EventError> {
        Ok(sqlx::query_as(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM streams), \
                 (SELECT coalesce(max(global_position), 0) FROM events)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    pub(crate) async fn partitions(&self) -> Result<Vec<PartitionStatus>, EventError> {
        let rows: Vec<(i32, i64, i64, Option<f64>, i64)> = sqlx::query_as(
            "SELECT c.partition, c.transaction_id, c.global_position, \
                 (julianday('now') - julianday(c.updated_at)) * 86400.0, \
                 (SELECT count(*) FROM events e WHERE e.partition = c.partition AND e.subject IS NOT NULL \
                     AND e.global_position > c.global_position) \
             FROM relay_checkpoints c ORDER BY c.partition",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(PartitionStatus::from_row).collect())
    }

    pub(crate) async fn projections(&self) -> Result<Vec<ProjectionStatus>, EventError> {
        let rows: Vec<(String, i64, i64, Option<f64>, i64)> = sqlx::query_as(
            "SELECT c.name, c.transaction_id, c.global_position, \
                 (julianday('now') - julianday(c.updated_at)) * 86400.0, \
                 (SELECT count(*) FROM events e WHERE e.global_position > c.global_position) \
             FROM checkpoints c ORDER BY c.name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(ProjectionStatus::from_row).collect())
    }

    pub(crate) async fn request_rebuild(&self, name: &str) -> Result<bool, EventError> {
        let done = sqlx::query(
            "UPDATE checkpoints SET transaction_id = -1, global_position = -1, updated_at = ?2 WHERE name = ?1",
        )
        .bind(name)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(crate) async fn position_of(
        &self,
        global_position: i64,
    ) -> Result<Option<StreamPosition>, EventError> {
        // The position doubles as the stream's transaction id.
        let tx: Option<i64> =
            sqlx::query_scalar("SELECT global_position FROM events WHERE global_position = ?1")
                .bind(global_position)
                .fetch_optional(&self.pool)
                .await?;
        Ok(tx.map(|transaction_id| StreamPosition { transaction_id, global_position }))
    }
}

fn parked_events(rows: &[sqlx::sqlite::SqliteRow]) -> Result<Vec<ParkedEvent>, EventError> {
    rows.iter()
        .map(|r| {
            let parked_at: DateTime<Utc> = r.try_get("parked_at")?;
            ParkedEvent::from_row(r, (Utc::now() - parked_at).to_std().unwrap_or_default())
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(EventError::from)
}

impl SqliteBackend {
    pub(crate) async fn requeue(&self, positions: Option<&[i64]>) -> Result<u64, EventError> {
        let done =
            match positions {
                Some(positions) => sqlx::query(
                    "UPDATE parked_events SET requeued = 1 WHERE blocked_by IS NULL AND aggregate_id IN ( \
                         SELECT aggregate_id FROM parked_events \
                         WHERE global_position IN (SELECT value FROM json_each(?1)))",
                )
                .bind(serde_json::Value::from(positions.to_vec()).to_string())
                .execute(&self.pool)
                .await?,
                None => {
                    sqlx::query("UPDATE parked_events SET requeued = 1 WHERE blocked_by IS NULL")
                        .execute(&self.pool)
                        .await?
                }
            };
        Ok(done.rows_affected())
    }
}

/// A list of partitions as the JSON array `json_each` reads.
fn json_list(partitions: &[Partition]) -> String {
    serde_json::Value::from(partitions.iter().map(|p| p.number()).collect::<Vec<i32>>()).to_string()
}
