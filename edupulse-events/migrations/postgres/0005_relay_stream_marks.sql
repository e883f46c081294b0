-- What the broker acknowledged, per relay partition and JetStream stream: the highest stream
-- sequence of an acknowledged event of the partition, and that event's id. A stream whose
-- last sequence falls below it, or that holds another message (or none) at that sequence,
-- lost messages it had acknowledged (deleted, restored from an older copy, a
-- single server that lost power before syncing): the partition's relay then stops
-- publishing the partition, sets `behind_since` and `held_sequence` (the stream's last
-- sequence when found), and resends what the stream lost when asked to
-- (`repair_requested`, set by `edupulse republish --lost`) or on its own
-- (`RelayConfig::republish_lost`). Written by the partition's holder, over its lease.
CREATE TABLE relay_stream_marks (
    partition        integer     NOT NULL CHECK (partition >= 0 AND partition < 64),
    stream           text        NOT NULL,
    sequence         bigint      NOT NULL,
    event_id         uuid,
    behind_since     timestamptz,
    held_sequence    bigint,
    repair_requested boolean     NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (partition, stream)
);
