-- Delivery from the log (see migrations/postgres/0004_delivery_from_log.sql). SQLite has
-- one writer at a time, so positions follow commit order and checkpoints are positions.

-- NULL: not for the broker (events stored before this release).
ALTER TABLE events ADD COLUMN subject TEXT;
-- The aggregate id's last byte modulo 64, written by the store (equal to the PostgreSQL
-- backend's generated column).
ALTER TABLE events ADD COLUMN partition INTEGER NOT NULL DEFAULT 0;
UPDATE events SET partition = ((instr('0123456789ABCDEF', substr(hex(aggregate_id), 31, 1)) - 1) * 16
       + (instr('0123456789ABCDEF', substr(hex(aggregate_id), 32, 1)) - 1)) % 64;
UPDATE events SET subject = (SELECT o.subject FROM outbox o WHERE o.global_position = events.global_position)
    WHERE global_position IN (SELECT global_position FROM outbox);

CREATE TABLE relay_checkpoints (
    partition       INTEGER PRIMARY KEY CHECK (partition >= 0 AND partition < 64),
    transaction_id  INTEGER NOT NULL,
    global_position INTEGER NOT NULL,
    updated_at      TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

WITH RECURSIVE p(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM p WHERE n < 63),
start(position) AS (
    SELECT coalesce((SELECT min(global_position) - 1 FROM outbox), (SELECT max(global_position) FROM events), 0))
INSERT INTO relay_checkpoints (partition, transaction_id, global_position)
SELECT n, (SELECT position FROM start), (SELECT position FROM start) FROM p;

CREATE TABLE parked_events (
    global_position INTEGER PRIMARY KEY,
    event_id        BLOB    NOT NULL,
    aggregate_id    BLOB    NOT NULL,
    sequence        INTEGER NOT NULL,
    partition       INTEGER NOT NULL,
    blocked_by      INTEGER,
    attempts        INTEGER NOT NULL,
    reason          TEXT    NOT NULL,
    requeued        INTEGER NOT NULL DEFAULT 0,
    parked_at       TEXT    NOT NULL
);
CREATE INDEX parked_events_partition_idx ON parked_events (partition, aggregate_id, sequence);

DROP TABLE outbox;
