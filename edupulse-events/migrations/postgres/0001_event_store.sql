-- The event store, its outbox and projection checkpoints.
-- Applied by `EventStore::migrate()` with `search_path` set to the configured schema, so
-- the names below are unqualified. Never edit a released migration: add a new one.

-- One row per aggregate: its type and current sequence. Appends lock this row (INSERT ...
-- ON CONFLICT DO UPDATE ... WHERE version = expected), which serialises writers of one
-- aggregate and turns a lost race into "0 rows" instead of an error that aborts the
-- caller's transaction.
CREATE TABLE streams (
    aggregate_id   uuid   PRIMARY KEY,
    aggregate_type text   NOT NULL,
    version        bigint NOT NULL CHECK (version >= 0)
);

CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    uuid        NOT NULL,
    sequence        bigint      NOT NULL CHECK (sequence > 0),
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    -- Promoted `#[event(key)]` fields as a JSON object, indexed with GIN.
    keys            jsonb       NOT NULL DEFAULT '{}',
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- The writing transaction (xid8 as bigint). The global stream reads only rows of
    -- transactions older than every running one, so a late commit with a lower position
    -- is never skipped.
    transaction_id  bigint      NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    CONSTRAINT events_aggregate_sequence_key UNIQUE (aggregate_id, sequence)
);

-- stream_all: WHERE (transaction_id, global_position) > (...) ORDER BY the same.
CREATE INDEX events_stream_order_idx ON events (transaction_id, global_position);
-- events_by_key: WHERE keys @> '{"author_id": "..."}'.
CREATE INDEX events_keys_idx ON events USING gin (keys jsonb_path_ops);

-- Transactional outbox: one row per event to publish, written in the same transaction as
-- the event and deleted once the broker acknowledged it. `partition` (a hash of the
-- aggregate id) lets several relays work at once: one claimer per partition (an advisory
-- lock), rows claimed with FOR UPDATE SKIP LOCKED in position order, so one aggregate's
-- events are never reordered.
CREATE TABLE outbox (
    global_position bigint      PRIMARY KEY,
    event_id        uuid        NOT NULL,
    aggregate_id    uuid        NOT NULL,
    sequence        bigint      NOT NULL,
    subject         text        NOT NULL,
    partition       integer     NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text,
    last_attempt_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX outbox_partition_idx ON outbox (partition, global_position);
CREATE INDEX outbox_created_idx ON outbox (created_at);

-- Projection checkpoints, written in the same transaction as the read model.
CREATE TABLE checkpoints (
    name            text        PRIMARY KEY,
    transaction_id  bigint      NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
