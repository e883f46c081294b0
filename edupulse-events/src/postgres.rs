//! The PostgreSQL backend: the SQL of the store, built once per schema.
//!
//! Every statement binds its values as parameters. The only text put into SQL is the schema
//! name, validated by [`SchemaName`] and quoted as an identifier.

use chrono::{DateTime, Utc};
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use sqlx::{AssertSqlSafe, Connection, Row, SqlSafeStr, SqlStr};
use uuid::Uuid;

use crate::store::{
    Appended, ExpectedSequence, OutboxTarget, Prepared, SchemaName, StreamPosition, prepare_append, refusal,
};
use crate::stream::{PageQuery, StoredRow, stored_row};
use crate::{DomainEvent, EventEnvelope, EventError};

static MIGRATOR: Migrator = sqlx::migrate!("../migrations/postgres");

/// A transaction on the store's pool.
pub(crate) type PgTransaction = sqlx::Transaction<'static, Postgres>;

const EVENT_COLUMNS: &str = "e.global_position, e.transaction_id, e.event_id, e.aggregate_type, e.aggregate_id, \
     e.sequence, e.event_type, e.schema_version, e.payload::text AS payload, e.metadata::text AS metadata, \
     e.occurred_at, e.recorded_at";

const COLUMNS: &str = "global_position, transaction_id, event_id, aggregate_type, aggregate_id, sequence, \
     event_type, schema_version, payload::text AS payload, metadata::text AS metadata, occurred_at, recorded_at";

/// The writing transaction's id, as the `bigint` the tables store.
const XACT_ID: &str = "pg_current_xact_id()::text::bigint";

/// The transaction horizon: the oldest transaction still running. Rows recorded below it
/// can no longer be joined by a late commit, so the global stream reads only those.
const HORIZON: &str = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

/// The store's statements for one schema.
struct Queries {
    append_new: SqlStr,
    append_existing: SqlStr,
    append_new_outbox: SqlStr,
    append_existing_outbox: SqlStr,
    stream_state: SqlStr,
    current_sequence: SqlStr,
    load_page: SqlStr,
    all_page: SqlStr,
    all_page_typed: SqlStr,
    key_page: SqlStr,
    outbox_partitions: SqlStr,
    older_pending: SqlStr,
    high_water: SqlStr,
    stream_head: SqlStr,
    outbox_claim: SqlStr,
    outbox_delete: SqlStr,
    outbox_failed: SqlStr,
    outbox_lag: SqlStr,
    checkpoint_save: SqlStr,
    checkpoint_load: SqlStr,
    checkpoint_init: SqlStr,
    checkpoint_lock: SqlStr,
    snapshot_save: SqlStr,
    snapshot_load: SqlStr,
}

impl Queries {
    fn new(schema: &SchemaName) -> Self {
        // Safe: `SchemaName` admits only `[a-z0-9_]`, and it is quoted besides.
        let s = format!("\"{}\"", schema.as_str());
        let events_insert = format!(
            "INSERT INTO {s}.events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
                 schema_version, payload, metadata, keys, occurred_at, transaction_id) \
             SELECT e.event_id, $2, $1, bump.version - $4 + e.ord, e.event_type, e.schema_version, \
                 e.payload::jsonb, e.metadata::jsonb, e.keys::jsonb, e.occurred_at, bump.last_transaction_id \
             FROM bump CROSS JOIN unnest($5::uuid[], $6::text[], $7::int4[], $8::text[], $9::text[], \
                 $10::text[], $11::timestamptz[]) WITH ORDINALITY \
                 AS e(event_id, event_type, schema_version, payload, metadata, keys, occurred_at, ord) \
             ORDER BY e.ord"
        );
        // A new stream (expected 0) or any sequence: insert the stream row, or bump it when
        // the expectation holds. A lost race returns no row, never an error.
        // The stream row also carries the transaction id recorded with the aggregate's last
        // event: the events get the greater of it and their own transaction's id, so one
        // aggregate's events never go backwards in the global stream's (transaction id,
        // position) order (migration 0003 says why).
        let bump_new = format!(
            "WITH bump AS ( \
                 INSERT INTO {s}.streams AS st (aggregate_id, aggregate_type, version, last_transaction_id) \
                 VALUES ($1, $2, $4, {XACT_ID}) \
                 ON CONFLICT (aggregate_id) DO UPDATE SET version = st.version + $4, \
                     last_transaction_id = greatest(st.last_transaction_id, {XACT_ID}) \
                 WHERE st.aggregate_type = $2 AND ($3 < 0 OR st.version = $3) \
                 RETURNING st.version, st.last_transaction_id)"
        );
        // An existing stream at an exact sequence.
        let bump_existing = format!(
            "WITH bump AS ( \
                 UPDATE {s}.streams SET version = version + $4, \
                     last_transaction_id = greatest(last_transaction_id, {XACT_ID}) \
                 WHERE aggregate_id = $1 AND aggregate_type = $2 AND version = $3 \
                 RETURNING version, last_transaction_id)"
        );
        // With the bus: the outbox rows in the same statement, and whether older events of
        // the aggregate are still pending (the statement's snapshot predates its own rows).
        let with_outbox = format!(
            ", ins AS ({events_insert} RETURNING global_position, sequence, recorded_at, event_id), \
             ob AS (INSERT INTO {s}.outbox (global_position, event_id, aggregate_id, sequence, subject, partition) \
                 SELECT ins.global_position, ins.event_id, $1, ins.sequence, o.subject, $13 FROM ins \
                 JOIN unnest($12::text[]) WITH ORDINALITY AS o(subject, ord) \
                 ON ins.sequence = (SELECT version FROM bump) - $4 + o.ord) \
             SELECT ins.global_position, ins.sequence, ins.recorded_at, \
                 EXISTS (SELECT 1 FROM {s}.outbox p WHERE p.partition = $13 AND p.aggregate_id = $1) AS older_pending \
             FROM ins"
        );
        let plain = format!(" {events_insert} RETURNING global_position, sequence, recorded_at");
        let sql = |text: String| AssertSqlSafe(text).into_sql_str();
        Self {
            append_new: sql(format!("{bump_new}{plain}")),
            append_existing: sql(format!("{bump_existing}{plain}")),
            append_new_outbox: sql(format!("{bump_new}{with_outbox}")),
            append_existing_outbox: sql(format!("{bump_existing}{with_outbox}")),
            stream_state: sql(format!(
                "SELECT aggregate_type, version FROM {s}.streams WHERE aggregate_id = $1"
            )),
            current_sequence: sql(format!(
                "SELECT coalesce((SELECT version FROM {s}.streams WHERE aggregate_id = $1), 0)"
            )),
            load_page: sql(format!(
                "SELECT {COLUMNS} FROM {s}.events WHERE aggregate_id = $1 AND sequence > $2 \
                 ORDER BY sequence LIMIT $3"
            )),
            all_page: sql(format!(
                "SELECT {COLUMNS} FROM {s}.events \
                 WHERE (transaction_id, global_position) > ($1, $2) \
                   AND transaction_id < {HORIZON} \
                 ORDER BY transaction_id, global_position LIMIT $3"
            )),
            all_page_typed: sql(format!(
                "SELECT {COLUMNS} FROM {s}.events \
                 WHERE (transaction_id, global_position) > ($1, $2) \
                   AND transaction_id < {HORIZON} \
                   AND event_type = ANY($4) \
                 ORDER BY transaction_id, global_position LIMIT $3"
            )),
            key_page: sql(format!(
                "SELECT {COLUMNS} FROM {s}.events \
                 WHERE keys @> $1::text::jsonb AND global_position > $2 AND event_type = ANY($4) \
                 ORDER BY global_position LIMIT $3"
            )),
            older_pending: sql(format!(
                "SELECT EXISTS (SELECT 1 FROM {s}.outbox \
                 WHERE partition = $1 AND aggregate_id = $2 AND sequence < $3)"
            )),
            outbox_partitions: sql(format!(
                "SELECT DISTINCT partition FROM {s}.outbox WHERE global_position <= $1"
            )),
            high_water: sql(format!("SELECT coalesce(max(global_position), 0) FROM {s}.events")),
            // A backward scan of the stream-order index that stops at the newest row whose
            // transaction is older than every running one.
            stream_head: sql(format!(
                "SELECT transaction_id, global_position FROM {s}.events \
                 WHERE transaction_id < {HORIZON} \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1"
            )),
            // Claims by deleting: one write per row instead of a row lock and then a delete.
            // No `FOR UPDATE`: the partition's advisory lock keeps other relays out, and a row
            // the bus is deleting at the same moment is waited for and then skipped. Runs
            // after a savepoint, so a failed publish puts every row back. `= ANY(ARRAY(…))`
            // keeps the plan on the indexes whatever the statistics say (with `IN (…)` and
            // fresh statistics PostgreSQL hashes the whole outbox for every batch).
            outbox_claim: sql(format!(
                "WITH claimed AS ( \
                     DELETE FROM {s}.outbox WHERE global_position = ANY(ARRAY( \
                         SELECT global_position FROM {s}.outbox \
                         WHERE partition = $1 AND global_position <= $3 \
                         ORDER BY global_position LIMIT $2)) \
                     RETURNING global_position, subject) \
                 SELECT o.subject, {EVENT_COLUMNS} FROM claimed o \
                 JOIN {s}.events e ON e.global_position = o.global_position \
                 ORDER BY o.global_position"
            )),
            // Never waits: a row a relay has claimed is left to it (it publishes a duplicate,
            // which JetStream drops, and deletes the row itself).
            outbox_delete: sql(format!(
                "DELETE FROM {s}.outbox WHERE global_position IN ( \
                     SELECT global_position FROM {s}.outbox WHERE global_position = ANY($1) \
                     FOR UPDATE SKIP LOCKED)"
            )),
            outbox_failed: sql(format!(
                "UPDATE {s}.outbox o SET attempts = o.attempts + 1, last_error = f.error, last_attempt_at = now() \
                 FROM unnest($1::bigint[], $2::text[]) AS f(position, error) WHERE o.global_position = f.position"
            )),
            outbox_lag: sql(format!(
                "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8, max(attempts), \
                     (SELECT last_error FROM {s}.outbox WHERE last_error IS NOT NULL \
                      ORDER BY last_attempt_at DESC LIMIT 1) \
                 FROM {s}.outbox"
            )),
            checkpoint_save: sql(format!(
                "INSERT INTO {s}.checkpoints (name, transaction_id, global_position) VALUES ($1, $2, $3) \
                 ON CONFLICT (name) DO UPDATE SET transaction_id = excluded.transaction_id, \
                     global_position = excluded.global_position, updated_at = now()"
            )),
            checkpoint_load: sql(format!(
                "SELECT transaction_id, global_position FROM {s}.checkpoints WHERE name = $1"
            )),
            checkpoint_init: sql(format!(
                "INSERT INTO {s}.checkpoints (name, transaction_id, global_position) VALUES ($1, 0, 0) \
                 ON CONFLICT (name) DO NOTHING"
            )),
            snapshot_save: sql(format!(
                "INSERT INTO {s}.snapshots AS sn (aggregate_id, aggregate_type, sequence, state_version, state) \
                 VALUES ($1, $2, $3, $4, $5::text::jsonb) \
                 ON CONFLICT (aggregate_id) DO UPDATE SET sequence = excluded.sequence, \
                     state_version = excluded.state_version, state = excluded.state, taken_at = now() \
                 WHERE sn.sequence < excluded.sequence OR sn.state_version <> excluded.state_version"
            )),
            snapshot_load: sql(format!(
                "SELECT aggregate_id, aggregate_type, sequence, state_version, state::text \
                 FROM {s}.snapshots WHERE aggregate_id = $1"
            )),
            checkpoint_lock: sql(format!(
                "SELECT transaction_id, global_position FROM {s}.checkpoints WHERE name = $1 FOR UPDATE"
            )),
        }
    }
}

pub(crate) struct PgBackend {
    pub(crate) pool: PgPool,
    sql: Queries,
    /// The LISTEN/NOTIFY channel that wakes relays.
    pub(crate) channel: String,
    /// The first key of the partition advisory locks: a hash of the schema name.
    lock_class: i32,
}

/// A row claimed from the outbox: its subject and the stored event.
pub(crate) struct ClaimedRow {
    pub(crate) subject: String,
    pub(crate) row: StoredRow,
}

/// The outbox's backlog.
pub(crate) struct LagRow {
    pub(crate) pending: i64,
    pub(crate) oldest_seconds: Option<f64>,
    pub(crate) max_attempts: Option<i32>,
    pub(crate) last_error: Option<String>,
}

impl PgBackend {
    pub(crate) fn new(pool: PgPool, schema: &SchemaName) -> Self {
        let mut channel = format!("edupulse_outbox_{}", schema.as_str());
        channel.truncate(63);
        // FNV-1a: stable across processes and versions, unlike `DefaultHasher`.
        let hash = format!("edupulse.outbox.{}", schema.as_str())
            .bytes()
            .fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
        let lock_class = i32::from_ne_bytes(hash.to_ne_bytes());
        Self { pool, sql: Queries::new(schema), channel, lock_class }
    }

    /// Wakes the relays: events were committed and left in the outbox.
    pub(crate) async fn notify_outbox(&self) -> Result<(), EventError> {
        sqlx::query("SELECT pg_notify($1, '')").bind(&self.channel).execute(&self.pool).await?;
        Ok(())
    }

    pub(crate) async fn save_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
        position: StreamPosition,
    ) -> Result<(), EventError> {
        sqlx::query(self.sql.checkpoint_save.clone())
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
            sqlx::query_as(self.sql.checkpoint_load.clone()).bind(name).fetch_optional(conn).await?;
        Ok(row.map(|(transaction_id, global_position)| StreamPosition { transaction_id, global_position }))
    }

    pub(crate) async fn lock_checkpoint(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<StreamPosition, EventError> {
        sqlx::query(self.sql.checkpoint_init.clone()).bind(name).execute(&mut *conn).await?;
        let (transaction_id, global_position): (i64, i64) =
            sqlx::query_as(self.sql.checkpoint_lock.clone()).bind(name).fetch_one(&mut *conn).await?;
        Ok(StreamPosition { transaction_id, global_position })
    }

    pub(crate) async fn save_snapshot(&self, snapshot: &crate::StoredSnapshot) -> Result<(), EventError> {
        sqlx::query(self.sql.snapshot_save.clone())
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
    ) -> Result<Option<crate::StoredSnapshot>, EventError> {
        let row: Option<(Uuid, String, i64, i32, String)> = sqlx::query_as(self.sql.snapshot_load.clone())
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

    /// The partitions that have pending rows.
    pub(crate) async fn outbox_partitions(&self, up_to: i64) -> Result<Vec<i32>, EventError> {
        Ok(sqlx::query_scalar(self.sql.outbox_partitions.clone()).bind(up_to).fetch_all(&self.pool).await?)
    }

    /// The highest global position written so far (0 for an empty store).
    pub(crate) async fn high_water(&self) -> Result<i64, EventError> {
        Ok(sqlx::query_scalar(self.sql.high_water.clone()).fetch_one(&self.pool).await?)
    }

    /// Takes the partition's claimer lock for the transaction; false when another holds it.
    pub(crate) async fn lock_partition(
        &self,
        conn: &mut PgConnection,
        partition: i32,
    ) -> Result<bool, EventError> {
        Ok(sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1, $2)")
            .bind(self.lock_class)
            .bind(partition)
            .fetch_one(conn)
            .await?)
    }

    /// Marks the point a failed claim rolls back to.
    pub(crate) async fn savepoint(&self, conn: &mut PgConnection) -> Result<(), EventError> {
        sqlx::raw_sql("SAVEPOINT edupulse_claim").execute(conn).await?;
        Ok(())
    }

    /// Undoes a claim: its rows are pending again.
    pub(crate) async fn rollback_to_savepoint(&self, conn: &mut PgConnection) -> Result<(), EventError> {
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT edupulse_claim").execute(conn).await?;
        Ok(())
    }

    /// Deletes and returns up to `limit` pending rows of a partition at positions up to
    /// `up_to`, oldest first (inside the caller's transaction, after
    /// [`savepoint`](Self::savepoint)).
    pub(crate) async fn outbox_claim(
        &self,
        conn: &mut PgConnection,
        partition: i32,
        limit: i64,
        up_to: i64,
    ) -> Result<Vec<ClaimedRow>, EventError> {
        let rows = sqlx::query(self.sql.outbox_claim.clone())
            .bind(partition)
            .bind(limit)
            .bind(up_to)
            .fetch_all(conn)
            .await?;
        rows.iter()
            .map(|r| Ok(ClaimedRow { subject: r.try_get("subject")?, row: stored_row(r)? }))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(EventError::from)
    }

    /// Clears acknowledged rows and records failed attempts, outside any transaction.
    pub(crate) async fn outbox_finish(
        &self,
        acked: &[i64],
        failed: &[i64],
        errors: &[String],
    ) -> Result<(), EventError> {
        let mut conn = self.pool.acquire().await?;
        self.outbox_delete(&mut conn, acked).await?;
        self.outbox_failed(&mut conn, failed, errors).await
    }

    /// Removes acknowledged rows.
    pub(crate) async fn outbox_delete(
        &self,
        conn: &mut PgConnection,
        positions: &[i64],
    ) -> Result<(), EventError> {
        if !positions.is_empty() {
            sqlx::query(self.sql.outbox_delete.clone()).bind(positions).execute(conn).await?;
        }
        Ok(())
    }

    /// Records a failed attempt for each row.
    pub(crate) async fn outbox_failed(
        &self,
        conn: &mut PgConnection,
        positions: &[i64],
        errors: &[String],
    ) -> Result<(), EventError> {
        if !positions.is_empty() {
            sqlx::query(self.sql.outbox_failed.clone()).bind(positions).bind(errors).execute(conn).await?;
        }
        Ok(())
    }

    /// The backlog.
    pub(crate) async fn outbox_lag(&self) -> Result<LagRow, EventError> {
        let row = sqlx::query(self.sql.outbox_lag.clone()).fetch_one(&self.pool).await?;
        Ok(LagRow {
            pending: row.try_get(0)?,
            oldest_seconds: row.try_get(1)?,
            max_attempts: row.try_get(2)?,
            last_error: row.try_get(3)?,
        })
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
        MIGRATOR.run(&mut conn).await.map_err(|e| EventError::Config(format!("migration failed: {e}")))?;
        conn.close().await?;
        Ok(())
    }

    pub(crate) async fn current_sequence(&self, aggregate_id: Uuid) -> Result<i64, EventError> {
        let n: i64 = sqlx::query_scalar(self.sql.current_sequence.clone())
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
        max_message_bytes: usize,
        outbox: Option<OutboxTarget<'_>>,
    ) -> Result<Appended<E>, EventError> {
        let Some(Prepared { aggregate_id, aggregate_type, rows, count: n }) =
            prepare_append(&envelopes, expected, max_message_bytes)?
        else {
            return Ok(Appended { envelopes, rows: Vec::new(), older_pending: false });
        };
        let event_ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        let event_types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
        let versions: Vec<i32> = rows.iter().map(|r| r.schema_version).collect();
        let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
        let metadata: Vec<&str> = rows.iter().map(|r| r.metadata.as_str()).collect();
        let keys: Vec<&str> = rows.iter().map(|r| r.keys.as_str()).collect();
        let occurred: Vec<DateTime<Utc>> = rows.iter().map(|r| r.occurred_at).collect();
        let existing = matches!(expected, ExpectedSequence::Exactly(n) if n > 0);
        let sql = match (existing, outbox.is_some()) {
            (true, false) => self.sql.append_existing.clone(),
            (false, false) => self.sql.append_new.clone(),
            (true, true) => self.sql.append_existing_outbox.clone(),
            (false, true) => self.sql.append_new_outbox.clone(),
        };
        let mut query = sqlx::query(sql)
            .bind(aggregate_id)
            .bind(&aggregate_type)
            .bind(expected.as_i64())
            .bind(n)
            .bind(&event_ids)
            .bind(&event_types)
            .bind(&versions)
            .bind(&payloads)
            .bind(&metadata)
            .bind(&keys)
            .bind(&occurred);
        if let Some(target) = &outbox {
            query = query.bind(target.subjects).bind(target.partition);
        }
        let result = query.fetch_all(&mut *conn).await;
        let stored_rows = match result {
            Ok(stored_rows) => stored_rows,
            Err(e) if is_unique_violation(&e, "events_aggregate_sequence_key") => {
                // Only reachable when rows were written around the store; the transaction
                // is aborted, so read the committed sequence on another connection.
                let actual = self.current_sequence(aggregate_id).await?;
                return Err(EventError::Concurrency { aggregate_id, expected: expected.as_i64(), actual });
            }
            Err(e) => return Err(e.into()),
        };
        if stored_rows.is_empty() {
            return Err(self.explain_refusal(conn, aggregate_id, &aggregate_type, expected).await);
        }
        let mut older_pending = match (&outbox, stored_rows.first()) {
            (Some(_), Some(row)) => row.try_get("older_pending")?,
            _ => false,
        };
        let mut stored: Vec<(i64, i64, DateTime<Utc>)> = stored_rows
            .iter()
            .map(|row| {
                Ok((row.try_get("sequence")?, row.try_get("global_position")?, row.try_get("recorded_at")?))
            })
            .collect::<Result<_, sqlx::Error>>()?;
        stored.sort_unstable_by_key(|(sequence, _, _)| *sequence);
        if stored.len() != envelopes.len() {
            return Err(EventError::Config(format!(
                "the store wrote {} of {} events; the transaction must be rolled back",
                stored.len(),
                envelopes.len()
            )));
        }
        let first_sequence = stored.first().map_or(0, |(sequence, _, _)| *sequence);
        for (envelope, (sequence, position, recorded_at)) in envelopes.iter_mut().zip(stored) {
            envelope.sequence = sequence;
            envelope.global_position = Some(position);
            envelope.recorded_at = Some(recorded_at);
        }
        // An `Any` append may have waited for the stream row while another transaction
        // committed the aggregate's previous events: its statement's snapshot predates that
        // commit and did not see their outbox rows. A new statement does (measured by the
        // fault harness: the bus then published both directly, racing, and JetStream got an
        // aggregate out of order). An exact expectation never waits and then succeeds: the
        // row it waited for no longer has the expected sequence.
        if let Some(target) = &outbox
            && !older_pending
            && expected == ExpectedSequence::Any
        {
            older_pending = sqlx::query_scalar(self.sql.older_pending.clone())
                .bind(target.partition)
                .bind(aggregate_id)
                .bind(first_sequence)
                .fetch_one(&mut *conn)
                .await?;
        }
        Ok(Appended { envelopes, rows, older_pending })
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
            sqlx::query_as(self.sql.stream_state.clone()).bind(aggregate_id).fetch_optional(&mut *conn).await;
        match state {
            Err(e) => e.into(),
            Ok(stream) => refusal(aggregate_id, aggregate_type, expected, stream),
        }
    }

    /// The last row of the global stream below the transaction horizon, if any.
    pub(crate) async fn stream_head(&self) -> Result<Option<StreamPosition>, EventError> {
        let row: Option<(i64, i64)> =
            sqlx::query_as(self.sql.stream_head.clone()).fetch_optional(&self.pool).await?;
        Ok(row.map(|(transaction_id, global_position)| StreamPosition { transaction_id, global_position }))
    }

    pub(crate) async fn fetch_page(
        &self,
        query: &PageQuery,
        after: StreamPosition,
        limit: i64,
    ) -> Result<Vec<StoredRow>, EventError> {
        let rows = match query {
            PageQuery::Aggregate(id) => {
                sqlx::query(self.sql.load_page.clone())
                    .bind(id)
                    .bind(after.global_position)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            PageQuery::All { event_types: None } => {
                sqlx::query(self.sql.all_page.clone())
                    .bind(after.transaction_id)
                    .bind(after.global_position)
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
            PageQuery::All { event_types: Some(types) } => {
                sqlx::query(self.sql.all_page_typed.clone())
                    .bind(after.transaction_id)
                    .bind(after.global_position)
                    .bind(limit)
                    .bind(types)
                    .fetch_all(&self.pool)
                    .await?
            }
            PageQuery::Key { filter, event_types } => {
                sqlx::query(self.sql.key_page.clone())
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

/// Fails when PostgreSQL has aborted the transaction on `conn` (a statement failed in it):
/// its COMMIT would be answered with ROLLBACK, which sqlx reports as success. Also fails
/// when events were `appended` but the connection holds no transaction that wrote anything
/// any more: the caller ended it on the raw connection (a ROLLBACK of its own).
///
/// One round trip: any statement but COMMIT and ROLLBACK is refused with SQLSTATE 25P02
/// in an aborted transaction. The transaction is left for the caller to roll back (dropping
/// it does).
pub(crate) async fn ensure_not_aborted(conn: &mut PgConnection, appended: bool) -> Result<(), EventError> {
    let probe = sqlx::query_scalar::<_, bool>("SELECT pg_current_xact_id_if_assigned() IS NOT NULL");
    match probe.fetch_one(conn).await {
        Ok(wrote) if appended && !wrote => Err(EventError::TransactionAborted),
        Ok(_) => Ok(()),
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("25P02") => {
            Err(EventError::TransactionAborted)
        }
        Err(e) => Err(e.into()),
    }
}

fn is_unique_violation(error: &sqlx::Error, constraint: &str) -> bool {
    error
        .as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23505") && d.constraint() == Some(constraint))
}
