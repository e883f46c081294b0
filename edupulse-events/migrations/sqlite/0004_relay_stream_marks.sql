-- What the broker acknowledged, per relay partition and stream (see
-- migrations/postgres/0005_relay_stream_marks.sql).
CREATE TABLE relay_stream_marks (
    partition        INTEGER NOT NULL CHECK (partition >= 0 AND partition < 64),
    stream           TEXT    NOT NULL,
    sequence         INTEGER NOT NULL,
    event_id         BLOB,
    behind_since     TEXT,
    held_sequence    INTEGER,
    repair_requested INTEGER NOT NULL DEFAULT 0,
    updated_at       TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (partition, stream)
);
