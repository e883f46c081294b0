-- Delivery from the log: the events table is the only source of what is published.
--
-- A relay reads the global stream past a checkpoint per partition and publishes it; the
-- outbox table, which repeated every event, goes. Each event now carries what the relay
-- needs: the subject it is published on (chosen at append time: a tenant prefix, the
-- aggregate id as a last token) and its partition (a hash of the aggregate id).

-- NULL: not for the broker. Only events stored by releases before this one have it: those
-- were either published already or never meant to be (plain appends without the bus).
ALTER TABLE events ADD COLUMN subject text;

-- The last byte of the aggregate id, modulo 64: equal to the Rust side's
-- `aggregate_id.as_u128() % 64`. Several relays share the stream by partition, one holder
-- each, so an aggregate's events are always published by one relay, in order.
ALTER TABLE events ADD COLUMN partition integer
    GENERATED ALWAYS AS (get_byte(uuid_send(aggregate_id), 15) % 64) STORED;

-- Events the outbox still held are published by the relay: they get their subject.
UPDATE events e SET subject = o.subject FROM outbox o WHERE o.global_position = e.global_position;

-- One checkpoint per partition: the last stream position (transaction id, position) whose
-- event the broker acknowledged (or that was parked). A relay writes it over the session
-- that holds the partition's advisory lock, once per batch.
CREATE TABLE relay_checkpoints (
    partition       integer     PRIMARY KEY CHECK (partition >= 0 AND partition < 64),
    transaction_id  bigint      NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- A new store starts at the beginning. An existing one starts just before the oldest event
-- the outbox still held, or after the last event when it held none: what was published
-- already is not published again.
INSERT INTO relay_checkpoints (partition, transaction_id, global_position)
SELECT p, start.transaction_id, start.global_position
FROM generate_series(0, 63) AS p
CROSS JOIN (
    SELECT coalesce(
               (SELECT e.transaction_id FROM outbox o JOIN events e ON e.global_position = o.global_position
                ORDER BY e.transaction_id, e.global_position LIMIT 1),
               (SELECT transaction_id FROM events ORDER BY transaction_id DESC, global_position DESC LIMIT 1),
               0) AS transaction_id,
           coalesce(
               (SELECT e.global_position - 1 FROM outbox o JOIN events e ON e.global_position = o.global_position
                ORDER BY e.transaction_id, e.global_position LIMIT 1),
               (SELECT global_position FROM events ORDER BY transaction_id DESC, global_position DESC LIMIT 1),
               0) AS global_position
) AS start;

-- Events the broker refused for good (after the relay's attempts), and the later events of
-- their aggregates, which wait behind them so that the aggregate is never published out of
-- order. `blocked_by` is NULL for a refused event, else the position of the parked event
-- it waits behind. Re-queued rows are published again, in order, by the partition's relay.
CREATE TABLE parked_events (
    global_position bigint      PRIMARY KEY,
    event_id        uuid        NOT NULL,
    aggregate_id    uuid        NOT NULL,
    sequence        bigint      NOT NULL,
    partition       integer     NOT NULL,
    blocked_by      bigint,
    attempts        integer     NOT NULL,
    reason          text        NOT NULL,
    requeued        boolean     NOT NULL DEFAULT false,
    parked_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX parked_events_partition_idx ON parked_events (partition, aggregate_id, sequence);

DROP TABLE outbox;
