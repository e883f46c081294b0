-- Aggregate snapshots (see migrations/postgres/0002_snapshots.sql).
CREATE TABLE snapshots (
    aggregate_id   BLOB    PRIMARY KEY,
    aggregate_type TEXT    NOT NULL,
    sequence       INTEGER NOT NULL CHECK (sequence > 0),
    state_version  INTEGER NOT NULL,
    state          TEXT    NOT NULL,
    taken_at       TEXT    NOT NULL
);
