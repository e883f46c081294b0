-- The embedded event store (SQLite): the same tables as migrations/postgres, in SQLite's
-- types. UUIDs are 16-byte BLOBs, timestamps RFC 3339 text, JSON is text.
-- SQLite has one writer at a time, so positions are handed out in commit order and the
-- global stream needs no transaction id (the column holds the position).

CREATE TABLE streams (
    aggregate_id   BLOB    PRIMARY KEY,
    aggregate_type TEXT    NOT NULL,
    version        INTEGER NOT NULL CHECK (version >= 0)
);

CREATE TABLE events (
    global_position INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id        BLOB    NOT NULL UNIQUE,
    aggregate_type  TEXT    NOT NULL,
    aggregate_id    BLOB    NOT NULL,
    sequence        INTEGER NOT NULL CHECK (sequence > 0),
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    payload         TEXT    NOT NULL,
    metadata        TEXT    NOT NULL DEFAULT '{}',
    keys            TEXT    NOT NULL DEFAULT '{}',
    occurred_at     TEXT    NOT NULL,
    recorded_at     TEXT    NOT NULL,
    UNIQUE (aggregate_id, sequence)
);

CREATE INDEX events_type_idx ON events (event_type, global_position);

CREATE TABLE outbox (
    global_position INTEGER PRIMARY KEY,
    event_id        BLOB    NOT NULL,
    aggregate_id    BLOB    NOT NULL,
    sequence        INTEGER NOT NULL,
    subject         TEXT    NOT NULL,
    partition       INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    last_attempt_at TEXT,
    created_at      TEXT    NOT NULL
);

CREATE INDEX outbox_partition_idx ON outbox (partition, global_position);

CREATE TABLE checkpoints (
    name            TEXT    PRIMARY KEY,
    transaction_id  INTEGER NOT NULL,
    global_position INTEGER NOT NULL,
    updated_at      TEXT    NOT NULL
);
