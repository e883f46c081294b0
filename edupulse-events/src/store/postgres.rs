//! The PostgreSQL backend: the SQL of the store, built once per schema.
//!
//! Every statement binds its values as parameters. The only text put into SQL is the schema
//! name, validated by [`SchemaName`] and quoted as an identifier.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, Postgres};
use sqlx::{AssertSqlSafe, Connection, Row, SqlSafeStr, SqlStr};
use uuid::Uuid;

use crate::store::append::{AppendRules, Appended, Prepared, prepare_append, refusal};
use crate::store::connect;
use crate::store::log::{LogRow, Page, ParkedEvent, ParkedRow, RelayLagRow, RunningTransaction};
use crate::store::row::{PageQuery, StoredRow, stored_row};
use crate::store::{ExpectedSequence, SchemaName, StoreConfig, StoredSnapshot, StreamPosition};
use crate::{DomainEvent, EventEnvelope, EventError};

/// Pooled connections idle at least this long are pinged before use.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

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
    stream_state: SqlStr,
    current_sequence: SqlStr,
    load_page: SqlStr,
    all_page: SqlStr,
    all_page_typed: SqlStr,
    key_page: SqlStr,
    stream_head: SqlStr,
    relay_page: SqlStr,
    relay_lock: SqlStr,
    relay_checkpoints: SqlStr,
    relay_save: SqlStr,
    relay_lag: SqlStr,
    parked_heads: SqlStr,
    parked_requeued: SqlStr,
    parked_list: SqlStr,
    parked_among: SqlStr,
    parked_requeue: SqlStr,
    parked_requeue_all: SqlStr,
    parked_delete: SqlStr,
    parked_refused_again: SqlStr,
    oldest_write: SqlStr,
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
                 schema_version, payload, metadata, keys, occurred_at, transaction_id, subject) \
             SELECT e.event_id, $2, $1, bump.version - $4 + e.ord, e.event_type, e.schema_version, \
                 e.payload::jsonb, e.metadata::jsonb, e.keys::jsonb, e.occurred_at, bump.last_transaction_id, \
                 e.subject \
             FROM bump CROSS JOIN unnest($5::uuid[], $6::text[], $7::int4[], $8::text[], $9::text[], \
                 $10::text[], $11::timestamptz[], $12::text[]) WITH ORDINALITY \
                 AS e(event_id, event_type, schema_version, payload, metadata, keys, occurred_at, subject, ord) \
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
        let plain =
            format!(" {events_insert} RETURNING global_position, sequence, recorded_at, transaction_id");
        let sql = |text: String| AssertSqlSafe(text).into_sql_str();
        Self {
            append_new: sql(format!("{bump_new}{plain}")),
            append_existing: sql(format!("{bump_existing}{plain}")),
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
            // A backward scan of the stream-order index that stops at the newest row whose
            // transaction is older than every running one.
            stream_head: sql(format!(
                "SELECT transaction_id, global_position FROM {s}.events \
                 WHERE transaction_id < {HORIZON} \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1"
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
            // The relay's page: the held partitions' rows past the lowest of their
            // checkpoints, below the horizon, in stream order (the stream-order index, the
            // partitions as a filter: one scan whatever the number held).
            relay_page: sql(format!(
                "SELECT e.partition, e.subject, {EVENT_COLUMNS} FROM {s}.events e \
                 WHERE (e.transaction_id, e.global_position) > ($1, $2) \
                   AND e.transaction_id < {HORIZON} \
                   AND e.subject IS NOT NULL AND e.partition = ANY($4) \
                 ORDER BY e.transaction_id, e.global_position LIMIT $3"
            )),
            // Session locks: held while the connection lives, not by a transaction.
            relay_lock: sql(
                "SELECT p FROM unnest($2::int4[]) AS p WHERE pg_try_advisory_lock($1, p) ORDER BY p"
                    .to_owned(),
            ),
            relay_checkpoints: sql(format!(
                "SELECT partition, transaction_id, global_position FROM {s}.relay_checkpoints \
                 WHERE partition = ANY($1)"
            )),
            // Parks the refused events and moves the checkpoints, together: a checkpoint never
            // passes an event that is neither acknowledged nor parked. Never backwards.
            relay_save: sql(format!(
                "WITH parked AS ( \
                     INSERT INTO {s}.parked_events (global_position, event_id, aggregate_id, sequence, partition, \
                         blocked_by, attempts, reason) \
                     SELECT * FROM unnest($4::int8[], $5::uuid[], $6::uuid[], $7::int8[], $8::int4[], $9::int8[], \
                         $10::int4[], $11::text[]) \
                     ON CONFLICT (global_position) DO NOTHING) \
                 UPDATE {s}.relay_checkpoints c SET transaction_id = v.t, global_position = v.g, updated_at = now() \
                 FROM unnest($1::int4[], $2::int8[], $3::int8[]) AS v(p, t, g) \
                 WHERE c.partition = v.p AND (c.transaction_id, c.global_position) < (v.t, v.g)"
            )),
            // One range scan from the lowest checkpoint; each row compared with its own.
            relay_lag: sql(format!(
                "WITH low AS (SELECT transaction_id, global_position FROM {s}.relay_checkpoints \
                     ORDER BY transaction_id, global_position LIMIT 1), \
                 pending AS (SELECT e.transaction_id, e.recorded_at FROM {s}.events e \
                     JOIN {s}.relay_checkpoints c ON c.partition = e.partition, low \
                     WHERE e.subject IS NOT NULL \
                       AND (e.transaction_id, e.global_position) > (low.transaction_id, low.global_position) \
                       AND (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)) \
                 SELECT (SELECT count(*) FROM pending), \
                     (SELECT extract(epoch FROM now() - min(recorded_at))::float8 FROM pending), \
                     (SELECT count(*) FROM pending WHERE transaction_id >= {HORIZON}), \
                     (SELECT count(*) FROM {s}.parked_events)"
            )),
            parked_heads: sql(format!(
                "SELECT aggregate_id, global_position FROM {s}.parked_events \
                 WHERE partition = ANY($1) AND blocked_by IS NULL"
            )),
            parked_requeued: sql(format!(
                "SELECT p.partition, e.subject, p.attempts, {EVENT_COLUMNS} FROM {s}.parked_events p \
                 JOIN {s}.events e ON e.global_position = p.global_position \
                 WHERE p.partition = ANY($1) AND p.aggregate_id IN ( \
                     SELECT aggregate_id FROM {s}.parked_events WHERE partition = ANY($1) AND requeued) \
                 ORDER BY p.aggregate_id, p.sequence"
            )),
            parked_list: sql(format!(
                "SELECT global_position, event_id, aggregate_id, sequence, partition, blocked_by, attempts, reason, \
                     requeued, extract(epoch FROM now() - parked_at)::float8 AS age \
                 FROM {s}.parked_events ORDER BY global_position LIMIT $1"
            )),
            parked_among: sql(format!(
                "SELECT global_position, event_id, aggregate_id, sequence, partition, blocked_by, attempts, reason, \
                     requeued, extract(epoch FROM now() - parked_at)::float8 AS age \
                 FROM {s}.parked_events WHERE global_position = ANY($1) ORDER BY global_position"
            )),
            // Re-queues whole aggregates: a later event never goes before the one it waits for.
            parked_requeue: sql(format!(
                "UPDATE {s}.parked_events SET requeued = true WHERE blocked_by IS NULL AND aggregate_id IN ( \
                     SELECT aggregate_id FROM {s}.parked_events WHERE global_position = ANY($1))"
            )),
            parked_requeue_all: sql(format!(
                "UPDATE {s}.parked_events SET requeued = true WHERE blocked_by IS NULL"
            )),
            parked_delete: sql(format!("DELETE FROM {s}.parked_events WHERE global_position = ANY($1)")),
            // The aggregate's first parked event was refused again: it heads the rest.
            parked_refused_again: sql(format!(
                "WITH head AS (UPDATE {s}.parked_events SET blocked_by = NULL, requeued = false, \
                     attempts = attempts + 1, reason = $3 WHERE global_position = $2 RETURNING global_position) \
                 UPDATE {s}.parked_events SET blocked_by = $2, requeued = false \
                 WHERE aggregate_id = $1 AND global_position <> $2"
            )),
            // What holds the horizon back: the oldest transaction that has written.
            oldest_write: sql("SELECT pid, coalesce(application_name, ''), coalesce(state, ''), \
                     extract(epoch FROM now() - xact_start)::float8 \
                 FROM pg_stat_activity \
                 WHERE backend_xid IS NOT NULL AND datname = current_database() AND pid <> pg_backend_pid() \
                 ORDER BY xact_start LIMIT 1"
                .to_owned()),
        }
    }
}

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

    pub(crate) async fn save_snapshot(&self, snapshot: &StoredSnapshot) -> Result<(), EventError> {
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
    ) -> Result<Option<StoredSnapshot>, EventError> {
        let row: Option<(Uuid, String, i64, i32, String)> = sqlx::query_as(self.sql.snapshot_load.clone())
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
        MIGRATOR
            .run(&mut conn)
            .await
            .map_err(|source| EventError::Migration { backend: "PostgreSQL", source })?;
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
        rules: &AppendRules<'_>,
    ) -> Result<Appended<E>, EventError> {
        let Some(Prepared { aggregate_id, aggregate_type, rows, count: n, partition }) =
            prepare_append(&envelopes, expected, rules)?
        else {
            return Ok(Appended { envelopes, partition: 0, positions: Vec::new() });
        };
        let event_ids: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        let event_types: Vec<&str> = rows.iter().map(|r| r.event_type).collect();
        let versions: Vec<i32> = rows.iter().map(|r| r.schema_version).collect();
        let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
        let metadata: Vec<&str> = rows.iter().map(|r| r.metadata.as_str()).collect();
        let keys: Vec<&str> = rows.iter().map(|r| r.keys.as_str()).collect();
        let occurred: Vec<DateTime<Utc>> = rows.iter().map(|r| r.occurred_at).collect();
        let subjects: Vec<&str> = rows.iter().map(|r| r.subject.as_str()).collect();
        let existing = matches!(expected, ExpectedSequence::Exactly(n) if n > 0);
        let sql = if existing { self.sql.append_existing.clone() } else { self.sql.append_new.clone() };
        let result = sqlx::query(sql)
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
            .bind(&occurred)
            .bind(&subjects)
            .fetch_all(&mut *conn)
            .await;
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
        let mut stored: Vec<(i64, StreamPosition, DateTime<Utc>)> = stored_rows
            .iter()
            .map(|row| {
                let position = StreamPosition {
                    transaction_id: row.try_get("transaction_id")?,
                    global_position: row.try_get("global_position")?,
                };
                Ok((row.try_get("sequence")?, position, row.try_get("recorded_at")?))
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
        let mut positions = Vec::with_capacity(stored.len());
        for (envelope, (sequence, position, recorded_at)) in envelopes.iter_mut().zip(stored) {
            envelope.sequence = sequence;
            envelope.global_position = Some(position.global_position);
            envelope.recorded_at = Some(recorded_at);
            positions.push(position);
        }
        Ok(Appended { envelopes, partition, positions })
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
            PageQuery::Key { value: None, .. } => Vec::new(),
            PageQuery::Key { name, value: Some(value), event_types } => {
                // The containment the GIN index answers: `keys @> {"name": value}`.
                let filter = serde_json::json!({ name.as_str(): value });
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
        partitions: &[i32],
    ) -> Result<Vec<i32>, EventError> {
        Ok(sqlx::query_scalar(self.sql.relay_lock.clone())
            .bind(self.lock_class)
            .bind(partitions)
            .fetch_all(conn)
            .await?)
    }

    pub(crate) async fn relay_checkpoints(
        &self,
        conn: &mut PgConnection,
        partitions: &[i32],
    ) -> Result<Vec<(i32, StreamPosition)>, EventError> {
        let rows: Vec<(i32, i64, i64)> =
            sqlx::query_as(self.sql.relay_checkpoints.clone()).bind(partitions).fetch_all(conn).await?;
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
        partitions: &[i32],
    ) -> Result<Page, EventError> {
        let rows = sqlx::query(self.sql.relay_page.clone())
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
        checkpoints: &[(i32, StreamPosition)],
        parked: &[ParkedRow],
    ) -> Result<(), EventError> {
        let column = |f: fn(&ParkedRow) -> i64| parked.iter().map(f).collect::<Vec<i64>>();
        sqlx::query(self.sql.relay_save.clone())
            .bind(checkpoints.iter().map(|(p, _)| *p).collect::<Vec<i32>>())
            .bind(checkpoints.iter().map(|(_, c)| c.transaction_id).collect::<Vec<i64>>())
            .bind(checkpoints.iter().map(|(_, c)| c.global_position).collect::<Vec<i64>>())
            .bind(column(|r| r.global_position))
            .bind(parked.iter().map(|r| r.event_id).collect::<Vec<Uuid>>())
            .bind(parked.iter().map(|r| r.aggregate_id).collect::<Vec<Uuid>>())
            .bind(column(|r| r.sequence))
            .bind(parked.iter().map(|r| r.partition).collect::<Vec<i32>>())
            .bind(parked.iter().map(|r| r.blocked_by).collect::<Vec<Option<i64>>>())
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
        partitions: &[i32],
    ) -> Result<Vec<(Uuid, i64)>, EventError> {
        Ok(sqlx::query_as(self.sql.parked_heads.clone()).bind(partitions).fetch_all(conn).await?)
    }

    /// The parked events of re-queued aggregates in `partitions`, each aggregate in order.
    pub(crate) async fn parked_requeued(
        &self,
        conn: &mut PgConnection,
        partitions: &[i32],
    ) -> Result<Vec<LogRow>, EventError> {
        let rows = sqlx::query(self.sql.parked_requeued.clone()).bind(partitions).fetch_all(conn).await?;
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
        sqlx::query(self.sql.parked_delete.clone()).bind(positions).execute(conn).await?;
        Ok(())
    }

    pub(crate) async fn parked_refused_again(
        &self,
        conn: &mut PgConnection,
        aggregate_id: Uuid,
        position: i64,
        reason: &str,
    ) -> Result<(), EventError> {
        sqlx::query(self.sql.parked_refused_again.clone())
            .bind(aggregate_id)
            .bind(position)
            .bind(reason)
            .execute(conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn relay_lag(&self) -> Result<RelayLagRow, EventError> {
        let row = sqlx::query(self.sql.relay_lag.clone()).fetch_one(&self.pool).await?;
        Ok(RelayLagRow {
            pending: row.try_get(0)?,
            oldest_pending_seconds: row.try_get(1)?,
            held_back: row.try_get(2)?,
            parked: row.try_get(3)?,
        })
    }

    pub(crate) async fn oldest_write(&self) -> Result<Option<RunningTransaction>, EventError> {
        let row: Option<(i32, String, String, Option<f64>)> =
            sqlx::query_as(self.sql.oldest_write.clone()).fetch_optional(&self.pool).await?;
        Ok(row.map(|(pid, application_name, state, age)| RunningTransaction {
            pid,
            application_name,
            state,
            age: Duration::try_from_secs_f64(age.unwrap_or(0.0)).unwrap_or_default(),
        }))
    }

    pub(crate) async fn parked_list(&self, limit: i64) -> Result<Vec<ParkedEvent>, EventError> {
        let rows = sqlx::query(self.sql.parked_list.clone()).bind(limit).fetch_all(&self.pool).await?;
        parked_events(&rows)
    }

    pub(crate) async fn parked_among(&self, positions: &[i64]) -> Result<Vec<ParkedEvent>, EventError> {
        let rows = sqlx::query(self.sql.parked_among.clone()).bind(positions).fetch_all(&self.pool).await?;
        parked_events(&rows)
    }

    /// The checkpoints of `partitions`, on a pooled connection.
    pub(crate) async fn checkpoints_of(
        &self,
        partitions: &[i32],
    ) -> Result<Vec<(i32, StreamPosition)>, EventError> {
        self.relay_checkpoints(&mut *self.pool.acquire().await?, partitions).await
    }
}

fn parked_events(rows: &[sqlx::postgres::PgRow]) -> Result<Vec<ParkedEvent>, EventError> {
    {
        rows.iter()
            .map(|r| {
                let age: Option<f64> = r.try_get("age")?;
                Ok(ParkedEvent {
                    global_position: r.try_get("global_position")?,
                    event_id: r.try_get("event_id")?,
                    aggregate_id: r.try_get("aggregate_id")?,
                    sequence: r.try_get("sequence")?,
                    partition: r.try_get("partition")?,
                    blocked_by: r.try_get("blocked_by")?,
                    attempts: r.try_get("attempts")?,
                    reason: r.try_get("reason")?,
                    requeued: r.try_get("requeued")?,
                    age: Duration::try_from_secs_f64(age.unwrap_or(0.0)).unwrap_or_default(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(EventError::from)
    }
}

impl PgBackend {
    /// Marks parked aggregates for re-publishing: those of `positions`, or all.
    pub(crate) async fn requeue(&self, positions: Option<&[i64]>) -> Result<u64, EventError> {
        let done = match positions {
            Some(positions) => {
                sqlx::query(self.sql.parked_requeue.clone()).bind(positions).execute(&self.pool).await?
            }
            None => sqlx::query(self.sql.parked_requeue_all.clone()).execute(&self.pool).await?,
        };
        Ok(done.rows_affected())
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
