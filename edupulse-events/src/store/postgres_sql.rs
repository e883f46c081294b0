//! The PostgreSQL backend's statements, built once per schema and grouped by what they serve.
//!
//! Every statement binds its values as parameters. The only text put into SQL is the schema
//! name, validated by [`SchemaName`] and quoted as an identifier.

use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

use crate::store::SchemaName;

const EVENT_COLUMNS: &str = "e.global_position, e.transaction_id, e.event_id, e.aggregate_type, e.aggregate_id, \
     e.sequence, e.event_type, e.schema_version, e.payload::text AS payload, e.metadata::text AS metadata, \
     e.occurred_at, e.recorded_at, e.subject";

const COLUMNS: &str = "global_position, transaction_id, event_id, aggregate_type, aggregate_id, sequence, \
     event_type, schema_version, payload::text AS payload, metadata::text AS metadata, occurred_at, recorded_at, \
     subject";

/// The writing transaction's id, as the `bigint` the tables store.
const XACT_ID: &str = "pg_current_xact_id()::text::bigint";

/// The transaction horizon: the oldest transaction still running. Rows recorded below it
/// can no longer be joined by a late commit, so the global stream reads only those.
pub(crate) const HORIZON: &str = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint";

/// A statement's text, checked safe: only the validated schema name is spliced into it.
fn sql(text: String) -> SqlStr {
    AssertSqlSafe(text).into_sql_str()
}

/// The schema, quoted. Safe: `SchemaName` admits only `[a-z0-9_]`, and it is quoted besides.
fn quoted(schema: &SchemaName) -> String {
    format!("\"{}\"", schema.as_str())
}

/// The store's statements for one schema.
pub(crate) struct Queries {
    pub(crate) append: AppendSql,
    pub(crate) read: ReadSql,
    pub(crate) state: StateSql,
    pub(crate) relay: RelaySql,
    pub(crate) parked: ParkedSql,
    pub(crate) marks: MarksSql,
    pub(crate) status: StatusSql,
}

impl Queries {
    pub(crate) fn new(schema: &SchemaName) -> Self {
        let s = quoted(schema);
        Self {
            append: AppendSql::new(&s),
            read: ReadSql::new(&s),
            state: StateSql::new(&s),
            relay: RelaySql::new(&s),
            parked: ParkedSql::new(&s),
            marks: MarksSql::new(&s),
            status: StatusSql::new(&s),
        }
    }
}

/// Appends: the stream row's bump and the events, in one statement.
pub(crate) struct AppendSql {
    pub(crate) new: SqlStr,
    pub(crate) existing: SqlStr,
    pub(crate) stream_state: SqlStr,
    pub(crate) current_sequence: SqlStr,
    /// How many of the positions `$1` the transaction sees: all of its own appends, while
    /// it is still the transaction that made them.
    pub(crate) visible: SqlStr,
}

impl AppendSql {
    fn new(s: &str) -> Self {
        let events_insert = format!(
            "INSERT INTO {s}.events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
                 schema_version, payload, metadata, keys, occurred_at, transaction_id, subject) \
             SELECT e.event_id, $2, $1, bump.version - $4 + e.ord, e.event_type, e.schema_version, \
                 e.payload::json, e.metadata::json, e.keys::jsonb, e.occurred_at, bump.last_transaction_id, \
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
        Self {
            new: sql(format!("{bump_new}{plain}")),
            existing: sql(format!("{bump_existing}{plain}")),
            stream_state: sql(format!(
                "SELECT aggregate_type, version FROM {s}.streams WHERE aggregate_id = $1"
            )),
            current_sequence: sql(format!(
                "SELECT coalesce((SELECT version FROM {s}.streams WHERE aggregate_id = $1), 0)"
            )),
            visible: sql(format!("SELECT count(*) FROM {s}.events WHERE global_position = ANY($1)")),
        }
    }
}

/// Reads: an aggregate, the global stream below the horizon, a promoted key.
pub(crate) struct ReadSql {
    pub(crate) aggregate_page: SqlStr,
    pub(crate) all_page: SqlStr,
    pub(crate) all_page_typed: SqlStr,
    pub(crate) key_page: SqlStr,
    pub(crate) stream_head: SqlStr,
    pub(crate) count_after: SqlStr,
}

impl ReadSql {
    fn new(s: &str) -> Self {
        Self {
            aggregate_page: sql(format!(
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
            count_after: sql(format!(
                "SELECT count(*) FROM {s}.events WHERE (transaction_id, global_position) > ($1, $2)"
            )),
            stream_head: sql(format!(
                "SELECT transaction_id, global_position FROM {s}.events \
                 WHERE transaction_id < {HORIZON} \
                 ORDER BY transaction_id DESC, global_position DESC LIMIT 1"
            )),
        }
    }
}

/// Projection checkpoints and aggregate snapshots.
pub(crate) struct StateSql {
    pub(crate) checkpoint_save: SqlStr,
    pub(crate) checkpoint_load: SqlStr,
    pub(crate) checkpoint_init: SqlStr,
    pub(crate) checkpoint_lock: SqlStr,
    pub(crate) snapshot_save: SqlStr,
    pub(crate) snapshot_load: SqlStr,
}

impl StateSql {
    fn new(s: &str) -> Self {
        Self {
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
            checkpoint_lock: sql(format!(
                "SELECT transaction_id, global_position FROM {s}.checkpoints WHERE name = $1 FOR UPDATE"
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
        }
    }
}

/// The relays' reads and writes: pages, partition locks, checkpoints, the lag.
pub(crate) struct RelaySql {
    pub(crate) page: SqlStr,
    pub(crate) lock: SqlStr,
    pub(crate) checkpoints: SqlStr,
    pub(crate) save: SqlStr,
    pub(crate) lag: SqlStr,
    pub(crate) oldest_write: SqlStr,
}

impl RelaySql {
    fn new(s: &str) -> Self {
        Self {
            // The relay's page: the held partitions' rows past the lowest of their
            // checkpoints, below the horizon, in stream order (the stream-order index, the
            // partitions as a filter: one scan whatever the number held).
            page: sql(format!(
                "SELECT e.partition, {EVENT_COLUMNS} FROM {s}.events e \
                 WHERE (e.transaction_id, e.global_position) > ($1, $2) \
                   AND e.transaction_id < {HORIZON} \
                   AND e.subject IS NOT NULL AND e.partition = ANY($4) \
                 ORDER BY e.transaction_id, e.global_position LIMIT $3"
            )),
            // Session locks: held while the connection lives, not by a transaction.
            lock: sql("SELECT p FROM unnest($2::int4[]) AS p WHERE pg_try_advisory_lock($1, p) ORDER BY p"
                .to_owned()),
            checkpoints: sql(format!(
                "SELECT partition, transaction_id, global_position FROM {s}.relay_checkpoints \
                 WHERE partition = ANY($1)"
            )),
            // Parks the refused events and moves the checkpoints, together: a checkpoint never
            // passes an event that is neither acknowledged nor parked. Never backwards.
            save: sql(format!(
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
            lag: sql(format!(
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

/// Parked events: listed, re-queued, published after all, refused again.
pub(crate) struct ParkedSql {
    pub(crate) heads: SqlStr,
    pub(crate) requeued: SqlStr,
    pub(crate) list: SqlStr,
    pub(crate) among: SqlStr,
    pub(crate) requeue: SqlStr,
    pub(crate) requeue_all: SqlStr,
    pub(crate) delete: SqlStr,
    pub(crate) refused_again: SqlStr,
}

impl ParkedSql {
    fn new(s: &str) -> Self {
        Self {
            heads: sql(format!(
                "SELECT aggregate_id, global_position FROM {s}.parked_events \
                 WHERE partition = ANY($1) AND blocked_by IS NULL"
            )),
            requeued: sql(format!(
                "SELECT p.partition, p.attempts, {EVENT_COLUMNS} FROM {s}.parked_events p \
                 JOIN {s}.events e ON e.global_position = p.global_position \
                 WHERE p.partition = ANY($1) AND p.aggregate_id IN ( \
                     SELECT aggregate_id FROM {s}.parked_events WHERE partition = ANY($1) AND requeued) \
                 ORDER BY p.aggregate_id, p.sequence"
            )),
            list: sql(format!(
                "SELECT global_position, event_id, aggregate_id, sequence, partition, blocked_by, attempts, reason, \
                     requeued, extract(epoch FROM now() - parked_at)::float8 AS age \
                 FROM {s}.parked_events ORDER BY global_position LIMIT $1"
            )),
            among: sql(format!(
                "SELECT global_position, event_id, aggregate_id, sequence, partition, blocked_by, attempts, reason, \
                     requeued, extract(epoch FROM now() - parked_at)::float8 AS age \
                 FROM {s}.parked_events WHERE global_position = ANY($1) ORDER BY global_position"
            )),
            // Re-queues whole aggregates: a later event never goes before the one it waits for.
            requeue: sql(format!(
                "UPDATE {s}.parked_events SET requeued = true WHERE blocked_by IS NULL AND aggregate_id IN ( \
                     SELECT aggregate_id FROM {s}.parked_events WHERE global_position = ANY($1))"
            )),
            requeue_all: sql(format!(
                "UPDATE {s}.parked_events SET requeued = true WHERE blocked_by IS NULL"
            )),
            delete: sql(format!("DELETE FROM {s}.parked_events WHERE global_position = ANY($1)")),
            // The aggregate's first parked event was refused again: it heads the rest.
            refused_again: sql(format!(
                "WITH head AS (UPDATE {s}.parked_events SET blocked_by = NULL, requeued = false, \
                     attempts = attempts + 1, reason = $3 WHERE global_position = $2 RETURNING global_position) \
                 UPDATE {s}.parked_events SET blocked_by = $2, requeued = false \
                 WHERE aggregate_id = $1 AND global_position <> $2"
            )),
        }
    }
}

/// What operators ask: migrations, counts, where relays and projections stand.
/// What the broker's streams acknowledged, per partition (see `StreamMark`).
pub(crate) struct MarksSql {
    pub(crate) load: SqlStr,
    pub(crate) save: SqlStr,
    pub(crate) behind: SqlStr,
    pub(crate) lost: SqlStr,
    pub(crate) request: SqlStr,
}

const MARK_COLUMNS: &str =
    "partition, stream, sequence, behind_since, held_sequence, repair_requested, event_id";

impl MarksSql {
    fn new(s: &str) -> Self {
        Self {
            load: sql(format!(
                "SELECT {MARK_COLUMNS} FROM {s}.relay_stream_marks WHERE partition = ANY($1) \
                 ORDER BY partition, stream"
            )),
            save: sql(format!(
                "INSERT INTO {s}.relay_stream_marks (partition, stream, sequence, event_id) \
                 SELECT * FROM unnest($1::int4[], $2::text[], $3::int8[], $4::uuid[]) \
                 ON CONFLICT (partition, stream) DO UPDATE SET sequence = excluded.sequence, \
                     event_id = excluded.event_id, updated_at = now()"
            )),
            // A held sequence marks the stream behind (since the first time); none clears it.
            behind: sql(format!(
                "UPDATE {s}.relay_stream_marks SET \
                     behind_since = CASE WHEN $3::int8 IS NULL THEN NULL ELSE coalesce(behind_since, now()) END, \
                     held_sequence = $3, repair_requested = repair_requested AND $3::int8 IS NOT NULL, \
                     updated_at = now() \
                 WHERE partition = $1 AND stream = $2"
            )),
            lost: sql(format!(
                "SELECT {MARK_COLUMNS} FROM {s}.relay_stream_marks WHERE behind_since IS NOT NULL \
                 ORDER BY stream, partition"
            )),
            request: sql(format!(
                "UPDATE {s}.relay_stream_marks SET repair_requested = true, updated_at = now() \
                 WHERE behind_since IS NOT NULL"
            )),
        }
    }
}

pub(crate) struct StatusSql {
    pub(crate) migrations: SqlStr,
    pub(crate) counts: SqlStr,
    pub(crate) partitions: SqlStr,
    pub(crate) projections: SqlStr,
    pub(crate) position_of: SqlStr,
    pub(crate) request_rebuild: SqlStr,
}

impl StatusSql {
    fn new(s: &str) -> Self {
        let after = "(e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)";
        Self {
            migrations: sql(format!(
                "SELECT version FROM {s}._sqlx_migrations WHERE success ORDER BY version"
            )),
            counts: sql(format!(
                "SELECT (SELECT count(*) FROM {s}.events), (SELECT count(*) FROM {s}.streams), \
                     (SELECT coalesce(max(global_position), 0) FROM {s}.events)"
            )),
            partitions: sql(format!(
                "SELECT c.partition, c.transaction_id, c.global_position, \
                     extract(epoch FROM now() - c.updated_at)::float8, \
                     (SELECT count(*) FROM {s}.events e WHERE e.partition = c.partition \
                         AND e.subject IS NOT NULL AND {after}) \
                 FROM {s}.relay_checkpoints c ORDER BY c.partition"
            )),
            projections: sql(format!(
                "SELECT c.name, c.transaction_id, c.global_position, \
                     extract(epoch FROM now() - c.updated_at)::float8, \
                     (SELECT count(*) FROM {s}.events e WHERE {after}) \
                 FROM {s}.checkpoints c ORDER BY c.name"
            )),
            position_of: sql(format!("SELECT transaction_id FROM {s}.events WHERE global_position = $1")),
            request_rebuild: sql(format!(
                "UPDATE {s}.checkpoints SET transaction_id = -1, global_position = -1, updated_at = now() \
                 WHERE name = $1"
            )),
        }
    }
}
