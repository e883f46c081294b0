//! The PostgreSQL backend: the store's operations on a pool or a connection (the statements
//! themselves are in `postgres_sql`).
//!
//! Every statement binds its values as parameters. The only text put into SQL is the schema
//! name, validated by [`SchemaName`] and quoted as an identifier.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, Postgres};
use sqlx::{AssertSqlSafe, Connection, Row};
use uuid::Uuid;

use crate::store::GlobalPosition;
use crate::store::Partition;
use crate::store::append::{AppendRules, Appended, EncodedRow, Prepared, prepare_append, refusal};
use crate::store::connect;
use crate::store::log::{
    LogRow, MarkRow, Page, ParkedEvent, ParkedRow, RelayLagRow, RunningTransaction, StreamMark,
};
use crate::store::migrations::{MigrationFile, migrator};
use crate::store::postgres_sql::Queries;
use crate::store::row::{PageQuery, StoredRow, stored_row};
use crate::store::status::{Migrations, PartitionStatus, ProjectionStatus};
use crate::store::{ExpectedSequence, SchemaName, StoreConfig, StoredSnapshot, StreamPosition};
use crate::{DomainEvent, EventEnvelope, EventError};

/// Pooled connections idle at least this long are pinged before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// `migrations/postgres`, file by file (`store::migrations` tests that the list is the folder).
pub(crate) const MIGRATION_FILES: &[MigrationFile] = &[
    (1, "event store", include_str!("../../migrations/postgres/0001_event_store.sql")),
    (2, "snapshots", include_str!("../../migrations/postgres/0002_snapshots.sql")),
    (
        3,
        "stream transaction order",
        include_str!("../../migrations/postgres/0003_stream_transaction_order.sql"),
    ),
    (4, "delivery from log", include_str!("../../migrations/postgres/0004_delivery_from_log.sql")),
    (5, "relay stream marks", include_str!("../../migrations/postgres/0005_relay_stream_marks.sql")),
    (6, "payload as written", include_str!("../../migrations/postgres/0006_payload_as_written.sql")),
];

static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| migrator(MIGRATION_FILES));

/// A transaction on the store's pool.
pub(crate) type PgTransaction = sqlx::Transaction<'static, Postgres>;

pub(crate) struct PgBackend {
    pub(crate) pool: PgPool,
    sql: Queries,
    /// The first key of the partition advisory locks: a hash of the schema name.
    lock_class: i32,
}

impl PgBackend {
    /// Connects: one connection first, so that a refused port, a wrong password or a
    /// missing database is reported at once and by cause, not as the pool's timeout.
    pub(crate) async fn connect(url: &str, config: &StoreConfig) -> Result<Self, EventError> {
        let options = connect::postgres_options(url)?;
        connect::check_postgres(&options).await?;
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
                        Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        Ok(Self::new(pool, &config.schema))
    }

    pub(crate) fn new(pool: PgPool, schema: &SchemaName) -> Self {
        // FNV-1a: stable across processes and versions, unlike `DefaultHasher`.
        let hash = format!("edupulse.relay.{}", schema.as_str())
            .bytes()
            .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
        let lock_class = i32::from_ne_bytes(hash.to_ne_bytes());
        Self { pool, sql: Queries::new(schema), lock_class }
    }

    pub(crate) async fn save_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
        position: StreamPosition,
    ) -> Result<(), EventError> {
        sqlx::query(self.sql.state.checkpoint_save.clone())
            .bind(name)
            .bind(position.transaction_id)
            .bind(position.global_position)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn load_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<StreamPosition>, EventError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as(self.sql.state.checkpoint_load.clone()).bind(name).fetch_optional(conn).await?;
        Ok(row.map(|(transaction_id, global_position)| StreamPosition { transaction_id, global_position }))
    }

    pub(crate) async fn lock_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<StreamPosition, EventError> {
        sqlx::query(self.sql.state.checkpoint_init.clone()).bind(name).execute(&mut *conn).await?;
        let (transaction_id, global_position): (i64, i64) =
            sqlx::query_as(self.sql.state.checkpoint_lock.clone()).bind(name).fetch_one(&mut *conn).await?;
        Ok(StreamPosition { transaction_id, global_position })
    }

    pub(crate) async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), EventError> {
        sqlx::query(self.sql.state.snapshot_save.clone())
            .bind(snapshot.aggregate_id)
            .bind(&snapshot.aggregate_type)
            .bind(snapshot.sequence)
            .bind(
                i32::try_from(snapshot.state_version)
                    .map_err(|_| EventError::Config("state version too large".into()))?,
            )
            .bind(&snapshot.state)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn load_snapshot(
        &self,
        aggregate_id: Uuid,
    ) -> Result<Option<StoredSnapshot>, EventError> {
        let row: Option<(Uuid, String, i64, i32, String)> =
            sqlx::query_as(self.sql.state.snapshot_load.clone())
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

    pub(crate) async fn migrate(&self, schema: &SchemaName) -> Result<(), EventError> {
        // A connection of its own: `search_path` is changed for the migrator and must not
        // leak into the pool.
        let options = self.pool.connect_options();
        let mut conn = PgConnection::connect_with(&options).await?;
        let quoted = format!("\"{}\"", schema.as_str());
        let create = sqlx::raw_sql(AssertSqlSafe(format!("CREATE SCHEMA IF NOT EXISTS {quoted}")));
        if let Err(e) = create.execute(&mut conn).await {
            // Two processes creating the schema at once: one loses with a duplicate error.
            let duplicate =
                e.as_database_error().and_then(|d| d.code()).is_some_and(|c| c == "42P06" || c == "23505");
            if !duplicate {
                return Err(e.into());
            }
        }
        sqlx::raw_sql(AssertSqlSafe(format!("SET search_path TO {quoted}"))).execute(&mut conn).await?;
        // `run_direct`, not `run`: awaiting sqlx's `run` makes this future `!Send`
        // ("implementation of `Acquire` is not general enough"), so a service could not
        // spawn `EventStore::migrate`.
        MIGRATOR
            .run_direct(None, &mut conn, false)
            .await
            .map_err(|source| EventError::Migration { backend: "PostgreSQL", source })?;
        conn.close().await?;
        Ok(())
    }

    pub(crate) async fn current_sequence(&self, aggregate_id: Uuid) -> Result<i64, EventError> {
        let n: i64 = sqlx::query_scalar(self.sql.append.current_sequence.clone())
            .bind(aggregate_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    pub(crate) async fn append<E: DomainEvent>(
        &self,
        conn: &mut PgConnection,
        expected: ExpectedSequence,
        mut envelopes: Vec<EventEnvelope<E>>,
        rules: &AppendRules<'_>,
    ) -> Result<Appended<E>, EventError> {
        let Some(prepared) = prepare_append(&envelopes, expected, rules)? else {
            return Ok(Appended { envelopes, partition: Partition::new(0), positions: Vec::new() });
        };
        let stored = match self.insert(conn, &prepared, expected).await {
            Ok(stored) => stored,
            Err(e) if is_unique_violation(&e, "events_aggregate_sequence_key") => {
                // Only reachable when rows were written around the store; the transaction
                // is aborted, so read the committed sequence on another connection.
                let actual = self.current_sequence(prepared.aggregate_id).await?;
                let (aggregate_id, expected) = (prepared.aggregate_id, expected.as_i64());
                return Err(EventError::Concurrency { aggregate_id, expected, actual });
            }
            Err(e) => return Err(e.into()),
        };
        if stored.is_empty() {
            let (id, kind) = (prepared.aggregate_id, &prepared.aggregate_type);
            return Err(self.explain_refusal(conn, id, kind, expected).await);
        }
        if stored.len() != envelopes.len() {
            return Err(EventError::Config(format!(
                "the store wrote {} of {} events; the transaction must be rolled back",
                stored.len(),
                envelopes.len()
            )));
        }
        let mut positions = Vec::with_capacity(stored.len());
        for (envelope, (sequence, position, recorded_at)) in envelopes.iter_mut().zip(stored) {
            envelope.sequence = sequence;
            envelope.global_position = Some(position.global_position);
            envelope.recorded_at = Some(recorded_at);
            positions.push(position);
        }
        Ok(Appended { envelopes, partition: prepared.partition, positions })
    }

    /// The append's one statement: bumps the stream row when it is at `expected` and
    /// inserts the events; returns their sequences, positions and record times in sequence
    /// order, none when the stream row was not at `expected`.
    async fn insert(
        &self,
        conn: &mut PgConnection,
        prepared: &Prepared,
        expected: ExpectedSequence,
    ) -> Result<Vec<(i64, StreamPosition, DateTime<Utc>)>, sqlx::Error> {
        let rows = &prepared.rows;
        let column = |f: fn(&EncodedRow) -> &str| rows.iter().map(f).collect::<Vec<&str>>();
        let existing = matches!(expected, ExpectedSequence::Exactly(n) if n > 0);
        let sql = if existing { self.sql.append.existing.clone() } else { self.sql.append.new.clone() };
        let stored_rows = sqlx::query(sql)
            .bind(prepared.aggregate_id)
            .bind(&prepared.aggregate_type)
            .bind(expected.as_i64())
            .bind(prepared.count)
            .bind(rows.iter().map(|r| r.event_id).collect::<Vec<Uuid>>())
            .bind(column(|r| r.event_type))
            .bind(rows.iter().map(|r| r.schema_version).collect::<Vec<i32>>())
            .bind(column(|r| &r.payload))
            .bind(column(|r| &r.metadata))
            .bind(column(|r| &r.keys))
            .bind(rows.iter().map(|r| r.occurred_at).collect::<Vec<DateTime<Utc>>>())
            .bind(column(|r| &r.subject))
            .fetch_all(&mut *conn)
            .await?;
        let mut stored = stored_rows
            .iter()
            .map(|row| {
                let position = StreamPosition {
                    transaction_id: row.try_get("transaction_id")?,
                    global_position: row.try_get("global_position")?,
                };
                Ok((row.try_get("sequence")?, position, row.try_get("recorded_at")?))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        stored.sort_unstable_by_key(|(sequence, _, _)| *sequence);
        Ok(stored)
    }

    /// Why an append wrote nothing: a concurrency conflict, or a stream of another type.
    async fn explain_refusal(
        &self,
        conn: &mut PgConnection,
        aggregate_id: Uuid,
        aggregate_type: &str,
        expected: ExpectedSequence,
    ) -> EventError {
        let state: Result<Option<(String, i64)>, sqlx::Error> =
            sqlx::query_as(self.sql.append.stream_state.clone())
                .bind(aggregate_id)
                .fetch_optional(&mut *conn)
                .await;
        match state {
            Err(e) => e.into(),
            Ok(stream) => refusal(aggregate_id, aggregate_type, expected, stream),
        }
    }

    /// The last row of the global stream below the transaction horizon, if any.
    pub(crate) async fn stream_head(&self) -> Result<Option<StreamPosition>, EventError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as(self.sql.read.stream_head.clone()).fetch_optional(&self.pool).await?;
        Ok(row.map(|(transaction_id, global_position)| StreamPosition { transaction_id, global_position }))
    }

    /// The events of the global stream after `after`, of any type.
    pub(crate) async fn count_after(&self, after: StreamPosition) -> Result<u64, EventError> {
        let n: i64 = sqlx::query_scalar(self.sql.read.count_after.clone())
            .bind(after.transaction_id)
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
            PageQuery::Aggregate(id) => {
                sqlx::query(self.sql.read.aggregate_page.clone())
                    .bind(id)
                    .bind(after.global_position)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            PageQuery::All { event_types: None } => {
                sqlx::query(self.sql.read.all_page.clone())
                    .bind(after.transaction_id)
                    .bind(after.global_position)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            PageQuery::All { event_types: Some(types) } => {
                sqlx::query(self.sql.read.all_page_typed.clone())
                    .bind(after.transaction_id)
                    .bind(after.global_position)
                    .bind(limit)
                    .bind(types)
                    .fetch_all(&self.pool)
                    .await?
            }
            PageQuery::Key { value: None, .. } => Vec::new(),
            PageQuery::Key { name, value: Some(value), event_types } => {
                // The containment the GIN index answers: `keys @> {"name": value}`.
                let filter = serde_json::json!({ name.as_str(): value });
                sqlx::query(self.sql.read.key_page.clone())
                    .bind(filter.to_string())
                    .bind(after.global_position)
                    .bind(limit)
                    .bind(event_types)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(stored_row).collect::<Result<_, sqlx::Error>>().map_err(EventError::from)
    }
}

/// The relay's statements. A relay runs them on its lease: the one connection whose session
/// holds its partitions' advisory locks, so that a relay whose session ended (and whose
/// partitions another relay may now hold) can no longer move their checkpoints.
impl PgBackend {
    /// A connection of its own, outside the pool, for a relay's session locks. Its
    /// checkpoint writes do not wait for the WAL flush: losing the last one in a crash
    /// only means re-sending a batch, which the broker drops as duplicates.
    pub(crate) async fn relay_lease(&self) -> Result<PgConnection, EventError> {
        let mut conn = self.pool.acquire().await?.detach();
        sqlx::raw_sql("SET synchronous_commit TO off").execute(&mut conn).await?;
        Ok(conn)
    }

    /// Takes the free ones of `partitions`; returns those taken.
    pub(crate) async fn relay_lock(
        &self,
        conn: &mut PgConnection,
        partitions: &[Partition],
    ) -> Result<Vec<Partition>, EventError> {
        Ok(sqlx::query_scalar(self.sql.relay.lock.clone())
            .bind(self.lock_class)
            .bind(partitions)
            .fetch_all(conn)
            .await?)
    }

    pub(crate) async fn relay_checkpoints(
        &self,
        conn: &mut PgConnection,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, StreamPosition)>, EventError> {
        let rows: Vec<(Partition, i64, i64)> =
            sqlx::query_as(self.sql.relay.checkpoints.clone()).bind(partitions).fetch_all(conn).await?;
        Ok(rows
            .into_iter()
            .map(|(p, transaction_id, global_position)| {
                (p, StreamPosition { transaction_id, global_position })
            })
            .collect())
    }

    pub(crate) async fn relay_page(
        &self,
        conn: &mut PgConnection,
        after: StreamPosition,
        limit: i64,
        max_bytes: usize,
        partitions: &[Partition],
    ) -> Result<Page, EventError> {
        let rows = sqlx::query(self.sql.relay.page.clone())
            .bind(after.transaction_id)
            .bind(after.global_position)
            .bind(limit)
            .bind(partitions)
            .fetch(conn)
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

    pub(crate) async fn relay_save(
        &self,
        conn: &mut PgConnection,
        checkpoints: &[(Partition, StreamPosition)],
        parked: &[ParkedRow],
    ) -> Result<(), EventError> {
        let column = |f: fn(&ParkedRow) -> i64| parked.iter().map(f).collect::<Vec<i64>>();
        sqlx::query(self.sql.relay.save.clone())
            .bind(checkpoints.iter().map(|(p, _)| *p).collect::<Vec<Partition>>())
            .bind(checkpoints.iter().map(|(_, c)| c.transaction_id).collect::<Vec<i64>>())
            .bind(checkpoints.iter().map(|(_, c)| c.global_position).collect::<Vec<i64>>())
            .bind(parked.iter().map(|r| r.global_position).collect::<Vec<GlobalPosition>>())
            .bind(parked.iter().map(|r| r.event_id).collect::<Vec<Uuid>>())
            .bind(parked.iter().map(|r| r.aggregate_id).collect::<Vec<Uuid>>())
            .bind(column(|r| r.sequence))
            .bind(parked.iter().map(|r| r.partition).collect::<Vec<Partition>>())
            .bind(parked.iter().map(|r| r.blocked_by.map(GlobalPosition::get)).collect::<Vec<Option<i64>>>())
            .bind(parked.iter().map(|r| r.attempts).collect::<Vec<i32>>())
            .bind(parked.iter().map(|r| r.reason.as_str()).collect::<Vec<&str>>())
            .execute(conn)
            .await?;
        Ok(())
    }

    /// The aggregates with parked events in `partitions`, with their first parked event.
    pub(crate) async fn parked_heads(
        &self,
        conn: &mut PgConnection,
        partitions: &[Partition],
    ) -> Result<Vec<(Uuid, i64)>, EventError> {
        Ok(sqlx::query_as(self.sql.parked.heads.clone()).bind(partitions).fetch_all(conn).await?)
    }

    /// The parked events of re-queued aggregates in `partitions`, each aggregate in order.
    pub(crate) async fn parked_requeued(
        &self,
        conn: &mut PgConnection,
        partitions: &[Partition],
    ) -> Result<Vec<LogRow>, EventError> {
        let rows = sqlx::query(self.sql.parked.requeued.clone()).bind(partitions).fetch_all(conn).await?;
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

    pub(crate) async fn parked_delete(
        &self,
        conn: &mut PgConnection,
        positions: &[i64],
    ) -> Result<(), EventError> {
        sqlx::query(self.sql.parked.delete.clone()).bind(positions).execute(conn).await?;
        Ok(())
    }

    pub(crate) async fn parked_refused_again(
        &self,
        conn: &mut PgConnection,
        aggregate_id: Uuid,
        position: i64,
        reason: &str,
    ) -> Result<(), EventError> {
        sqlx::query(self.sql.parked.refused_again.clone())
            .bind(aggregate_id)
            .bind(position)
            .bind(reason)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn relay_lag(&self) -> Result<RelayLagRow, EventError> {
        let row = sqlx::query(self.sql.relay.lag.clone()).fetch_one(&self.pool).await?;
        Ok(RelayLagRow {
            pending: row.try_get(0)?,
            oldest_pending_seconds: row.try_get(1)?,
            held_back: row.try_get(2)?,
            parked: row.try_get(3)?,
        })
    }

    /// The stream marks of `partitions`.
    pub(crate) async fn marks_load(
        &self,
        conn: &mut PgConnection,
        partitions: &[Partition],
    ) -> Result<Vec<StreamMark>, EventError> {
        let rows = sqlx::query(self.sql.marks.load.clone()).bind(partitions).fetch_all(conn).await?;
        Ok(rows.iter().map(StreamMark::from_row).collect::<Result<_, _>>()?)
    }

    /// Sets the acknowledged sequences of `(partition, stream)`s.
    pub(crate) async fn marks_save(
        &self,
        conn: &mut PgConnection,
        marks: &[MarkRow<'_>],
    ) -> Result<(), EventError> {
        sqlx::query(self.sql.marks.save.clone())
            .bind(marks.iter().map(|m| m.partition).collect::<Vec<Partition>>())
            .bind(marks.iter().map(|m| m.stream).collect::<Vec<&str>>())
            .bind(marks.iter().map(|m| m.sequence).collect::<Vec<i64>>())
            .bind(marks.iter().map(|m| m.event_id).collect::<Vec<Option<Uuid>>>())
            .execute(conn)
            .await?;
        Ok(())
    }

    /// Marks a partition's stream behind (holding up to `held`), or clears it (`None`).
    pub(crate) async fn marks_behind(
        &self,
        conn: &mut PgConnection,
        partition: Partition,
        stream: &str,
        held: Option<i64>,
    ) -> Result<(), EventError> {
        sqlx::query(self.sql.marks.behind.clone())
            .bind(partition)
            .bind(stream)
            .bind(held)
            .execute(conn)
            .await?;
        Ok(())
    }

    /// The marks of streams found behind.
    pub(crate) async fn marks_lost(&self) -> Result<Vec<StreamMark>, EventError> {
        let rows = sqlx::query(self.sql.marks.lost.clone()).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(StreamMark::from_row).collect::<Result<_, _>>()?)
    }

    /// Asks the relays to send what their streams lost again; returns the marks asked.
    pub(crate) async fn marks_request(&self) -> Result<u64, EventError> {
        Ok(sqlx::query(self.sql.marks.request.clone()).execute(&self.pool).await?.rows_affected())
    }

    pub(crate) async fn oldest_write(&self) -> Result<Option<RunningTransaction>, EventError> {
        let row: Option<(i32, String, String, Option<f64>)> =
            sqlx::query_as(self.sql.relay.oldest_write.clone()).fetch_optional(&self.pool).await?;
        Ok(row.map(|(pid, application_name, state, age)| RunningTransaction {
            pid,
            application_name,
            state,
            age: Duration::try_from_secs_f64(age.unwrap_or(0.0)).unwrap_or_default(),
        }))
    }

    pub(crate) async fn parked_list(&self, limit: i64) -> Result<Vec<ParkedEvent>, EventError> {
        let rows = sqlx::query(self.sql.parked.list.clone()).bind(limit).fetch_all(&self.pool).await?;
        parked_events(&rows)
    }

    pub(crate) async fn parked_among(&self, positions: &[i64]) -> Result<Vec<ParkedEvent>, EventError> {
        let rows = sqlx::query(self.sql.parked.among.clone()).bind(positions).fetch_all(&self.pool).await?;
        parked_events(&rows)
    }

    /// The checkpoints of `partitions`, on a pooled connection.
    pub(crate) async fn checkpoints_of(
        &self,
        partitions: &[Partition],
    ) -> Result<Vec<(Partition, StreamPosition)>, EventError> {
        self.relay_checkpoints(&mut *self.pool.acquire().await?, partitions).await
    }
}

impl PgBackend {
    /// The migrations recorded in the schema (none before the first `migrate`).
    pub(crate) async fn migrations(&self, schema: &SchemaName) -> Result<Migrations, EventError> {
        let table = format!("\"{}\"._sqlx_migrations", schema.as_str());
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(table)
            .fetch_one(&self.pool)
            .await?;
        let applied = if exists {
            sqlx::query_scalar(self.sql.status.migrations.clone()).fetch_all(&self.pool).await?
        } else {
            Vec::new()
        };
        Ok(Migrations::of(MIGRATOR.iter().map(|m| m.version), applied))
    }

    /// Events, aggregates and the highest global position.
    pub(crate) async fn counts(&self) -> Result<(i64, i64, i64), EventError> {
        Ok(sqlx::query_as(self.sql.status.counts.clone()).fetch_one(&self.pool).await?)
    }

    pub(crate) async fn partitions(&self) -> Result<Vec<PartitionStatus>, EventError> {
        let rows: Vec<(i32, i64, i64, Option<f64>, i64)> =
            sqlx::query_as(self.sql.status.partitions.clone()).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(PartitionStatus::from_row).collect())
    }

    pub(crate) async fn projections(&self) -> Result<Vec<ProjectionStatus>, EventError> {
        let rows: Vec<(String, i64, i64, Option<f64>, i64)> =
            sqlx::query_as(self.sql.status.projections.clone()).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(ProjectionStatus::from_row).collect())
    }

    pub(crate) async fn request_rebuild(&self, name: &str) -> Result<bool, EventError> {
        let done =
            sqlx::query(self.sql.status.request_rebuild.clone()).bind(name).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    pub(crate) async fn position_of(
        &self,
        global_position: i64,
    ) -> Result<Option<StreamPosition>, EventError> {
        let tx: Option<i64> = sqlx::query_scalar(self.sql.status.position_of.clone())
            .bind(global_position)
            .fetch_optional(&self.pool)
            .await?;
        Ok(tx.map(|transaction_id| StreamPosition { transaction_id, global_position }))
    }
}

fn parked_events(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<ParkedEvent>, EventError> {
    rows.iter()
        .map(|r| {
            let age: Option<f64> = r.try_get("age")?;
            ParkedEvent::from_row(r, Duration::try_from_secs_f64(age.unwrap_or(0.0)).unwrap_or_default())
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(EventError::from)
}

impl PgBackend {
    /// Marks parked aggregates for re-publishing: those of `positions`, or all.
    pub(crate) async fn requeue(&self, positions: Option<&[i64]>) -> Result<u64, EventError> {
        let done = match positions {
            Some(positions) => {
                sqlx::query(self.sql.parked.requeue.clone()).bind(positions).execute(&self.pool).await?
            }
            None => sqlx::query(self.sql.parked.requeue_all.clone()).execute(&self.pool).await?,
        };
        Ok(done.rows_affected())
    }
}

impl PgBackend {
    /// Fails when PostgreSQL has aborted the transaction on `conn` (a statement failed in
    /// it): its COMMIT would be answered with ROLLBACK, which sqlx reports as success. Also
    /// fails when the transaction no longer sees every event it appended (`written`, by
    /// position): the caller ended it on the raw connection (a ROLLBACK of its own,
    /// perhaps followed by a BEGIN), and a COMMIT now would commit something else or nothing.
    ///
    /// One round trip: any statement but COMMIT and ROLLBACK is refused with SQLSTATE 25P02
    /// in an aborted transaction, and positions are never handed out twice. The transaction
    /// is left for the caller to roll back (dropping it does).
    pub(crate) async fn ensure_not_aborted(
        &self,
        conn: &mut PgConnection,
        written: &[i64],
    ) -> Result<(), EventError> {
        let probe = sqlx::query_scalar::<_, i64>(self.sql.append.visible.clone()).bind(written);
        match probe.fetch_one(conn).await {
            Ok(seen) if usize::try_from(seen).ok() != Some(written.len()) => {
                Err(EventError::TransactionAborted)
            }
            Ok(_) => Ok(()),
            Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("25P02") => {
                Err(EventError::TransactionAborted)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn is_unique_violation(error: &sqlx::Error, constraint: &str) -> bool {
    error
        .as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23505") && d.constraint() == Some(constraint))
}

// Partitions bind as the `int4[]` they are, global positions as `int8[]`.
impl sqlx::postgres::PgHasArrayType for Partition {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        <i32 as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}

impl sqlx::postgres::PgHasArrayType for GlobalPosition {
    fn array_type_info() -> sqlx::postgres::PgTypeInfo {
        <i64 as sqlx::postgres::PgHasArrayType>::array_type_info()
    }
}
