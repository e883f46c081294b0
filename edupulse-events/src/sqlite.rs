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
//! - Relays coordinate through in-process locks and wake-ups: run them in the process that
//!   owns the database file.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
};
use sqlx::{Row, Sqlite};
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

use crate::outbox::PARTITIONS;
use crate::postgres::{ClaimedRow, LagRow};
use crate::store::{
    Appended, ExpectedSequence, OutboxTarget, Prepared, StoreConfig, StreamPosition, prepare_append, refusal,
};
use crate::stream::{PageQuery, StoredRow, stored_row};
use crate::{DomainEvent, EventEnvelope, EventError, KeyValue};

static MIGRATOR: Migrator = sqlx::migrate!("../migrations/sqlite");

/// A transaction on the embedded store.
pub(crate) type SqliteTransaction = sqlx::Transaction<'static, Sqlite>;

/// The columns of a stored row; the position doubles as the stream's transaction id.
macro_rules! columns {
    () => {
        "e.global_position, e.global_position AS transaction_id, e.event_id, e.aggregate_type, e.aggregate_id, \
         e.sequence, e.event_type, e.schema_version, e.payload, e.metadata, e.occurred_at, e.recorded_at"
    };
}

pub(crate) struct SqliteBackend {
    pub(crate) pool: SqlitePool,
    partition_locks: Vec<Mutex<()>>,
    /// Bumped after every commit that wrote outbox rows; relays wait on it.
    wakeup: watch::Sender<u64>,
}

impl SqliteBackend {
    pub(crate) async fn connect(url: &str, config: &StoreConfig) -> Result<Self, EventError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|_| EventError::Config("the SQLite URL cannot be parsed".into()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        let partition_locks = (0..PARTITIONS).map(|_| Mutex::new(())).collect();
        Ok(Self { pool, partition_locks, wakeup: watch::Sender::new(0) })
    }

    pub(crate) async fn migrate(&self) -> Result<(), EventError> {
        MIGRATOR.run(&self.pool).await.map_err(|e| EventError::Config(format!("migration failed: {e}")))
    }

    /// A write transaction: `BEGIN IMMEDIATE` takes the write lock at once, so a
    /// transaction that reads before it writes cannot fail to upgrade its lock later.
    pub(crate) async fn begin(&self) -> Result<SqliteTransaction, EventError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    pub(crate) fn notify_outbox(&self) {
        self.wakeup.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn subscribe_outbox(&self) -> watch::Receiver<u64> {
        self.wakeup.subscribe()
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
        max_message_bytes: usize,
        outbox: Option<OutboxTarget<'_>>,
    ) -> Result<Appended<E>, EventError> {
        let Some(Prepared { aggregate_id, aggregate_type, rows, count: n }) =
            prepare_append(&envelopes, expected, max_message_bytes)?
        else {
            return Ok(Appended { envelopes, rows: Vec::new(), older_pending: false });
        };
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
            .bind(n)
            .bind(aggregate_id)
            .bind(&aggregate_type)
            .bind(expected.as_i64())
            .fetch_optional(&mut *conn)
            .await?;
        let Some(version) = version else {
            let stream: Option<(String, i64)> =
                sqlx::query_as("SELECT aggregate_type, version FROM streams WHERE aggregate_id = ?1")
                    .bind(aggregate_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            return Err(refusal(aggregate_id, &aggregate_type, expected, stream));
        };
        let older_pending = match &outbox {
            Some(_) => {
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM outbox WHERE aggregate_id = ?1)")
                    .bind(aggregate_id)
                    .fetch_one(&mut *conn)
                    .await?
            }
            None => false,
        };
        let recorded_at = Utc::now();
        let mut sequence = version - n;
        for (i, (envelope, row)) in envelopes.iter_mut().zip(&rows).enumerate() {
            sequence += 1;
            let position: i64 = sqlx::query_scalar(
                "INSERT INTO events (event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, \
                     payload, metadata, keys, occurred_at, recorded_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING global_position",
            )
            .bind(row.event_id)
            .bind(&aggregate_type)
            .bind(aggregate_id)
            .bind(sequence)
            .bind(row.event_type)
            .bind(row.schema_version)
            .bind(&row.payload)
            .bind(&row.metadata)
            .bind(&row.keys)
            .bind(row.occurred_at)
            .bind(recorded_at)
            .fetch_one(&mut *conn)
            .await?;
            envelope.sequence = sequence;
            envelope.global_position = Some(position);
            envelope.recorded_at = Some(recorded_at);
            if let Some(target) = &outbox {
                let subject = target
                    .subjects
                    .get(i)
                    .ok_or_else(|| EventError::Config("one subject per event".into()))?;
                sqlx::query(
                    "INSERT INTO outbox (global_position, event_id, aggregate_id, sequence, subject, partition, \
                         created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .bind(position)
                .bind(row.event_id)
                .bind(aggregate_id)
                .bind(sequence)
                .bind(subject)
                .bind(target.partition)
                .bind(recorded_at)
                .execute(&mut *conn)
                .await?;
            }
        }
        Ok(Appended { envelopes, rows, older_pending })
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

    pub(crate) async fn save_snapshot(&self, snapshot: &crate::StoredSnapshot) -> Result<(), EventError> {
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
    ) -> Result<Option<crate::StoredSnapshot>, EventError> {
        let row: Option<(Uuid, String, i64, i64, String)> = sqlx::query_as(
            "SELECT aggregate_id, aggregate_type, sequence, state_version, state FROM snapshots WHERE aggregate_id = ?1",
        )
        .bind(aggregate_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(aggregate_id, aggregate_type, sequence, state_version, state)| crate::StoredSnapshot {
            aggregate_id,
            aggregate_type,
            sequence,
            state_version: u32::try_from(state_version).unwrap_or(0),
            state,
        }))
    }

    pub(crate) async fn outbox_partitions(&self, up_to: i64) -> Result<Vec<i32>, EventError> {
        Ok(sqlx::query_scalar("SELECT DISTINCT partition FROM outbox WHERE global_position <= ?1")
            .bind(up_to)
            .fetch_all(&self.pool)
            .await?)
    }

    /// The highest global position written so far (0 for an empty store).
    pub(crate) async fn high_water(&self) -> Result<i64, EventError> {
        Ok(sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM events")
            .fetch_one(&self.pool)
            .await?)
    }

    /// The in-process claimer lock of a partition, if free.
    pub(crate) fn try_lock_partition(&self, partition: i32) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        let index = usize::try_from(partition).ok()?;
        self.partition_locks.get(index)?.try_lock().ok()
    }

    pub(crate) async fn outbox_claim(
        &self,
        partition: i32,
        limit: i64,
        up_to: i64,
    ) -> Result<Vec<ClaimedRow>, EventError> {
        let sql = concat!(
            "SELECT o.subject, ",
            columns!(),
            " FROM outbox o JOIN events e ON e.global_position = o.global_position \
             WHERE o.partition = ?1 AND o.global_position <= ?3 ORDER BY o.global_position LIMIT ?2"
        );
        let rows = sqlx::query(sql).bind(partition).bind(limit).bind(up_to).fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok(ClaimedRow { subject: r.try_get("subject")?, row: stored_row(r)? }))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(EventError::from)
    }

    pub(crate) async fn outbox_finish(
        &self,
        acked: &[i64],
        failed: &[i64],
        errors: &[String],
    ) -> Result<(), EventError> {
        if acked.is_empty() && failed.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for position in acked {
            sqlx::query("DELETE FROM outbox WHERE global_position = ?1")
                .bind(position)
                .execute(&mut *tx)
                .await?;
        }
        let now = Utc::now();
        for (position, error) in failed.iter().zip(errors) {
            sqlx::query(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, last_attempt_at = ?3 \
                 WHERE global_position = ?1",
            )
            .bind(position)
            .bind(error)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn outbox_lag(&self) -> Result<LagRow, EventError> {
        let (pending, oldest, max_attempts): (i64, Option<DateTime<Utc>>, Option<i32>) =
            sqlx::query_as("SELECT count(*), min(created_at), max(attempts) FROM outbox")
                .fetch_one(&self.pool)
                .await?;
        let last_error: Option<String> = sqlx::query_scalar(
            "SELECT last_error FROM outbox WHERE last_error IS NOT NULL ORDER BY last_attempt_at DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        let oldest_seconds = oldest.map(|t| (Utc::now() - t).num_milliseconds() as f64 / 1000.0);
        Ok(LagRow { pending, oldest_seconds, max_attempts, last_error })
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
            PageQuery::Key { filter, event_types } => {
                let Some((name, value)) = filter.as_object().and_then(|o| o.iter().next()) else {
                    return Ok(Vec::new());
                };
                let path = format!("$.{}", serde_json::Value::from(name.as_str()));
                let types = serde_json::Value::from(event_types.clone()).to_string();
                let value: KeyValue = serde_json::from_value(value.clone())
                    .map_err(|e| EventError::Config(format!("invalid key value: {e}")))?;
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
                    KeyValue::Text(t) => query.bind(t),
                    KeyValue::Integer(i) => query.bind(i),
                    KeyValue::Bool(b) => query.bind(i64::from(b)),
                };
                query.fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(stored_row).collect::<Result<_, sqlx::Error>>().map_err(EventError::from)
    }
}
