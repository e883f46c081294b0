-- Aggregate snapshots: a cache of an aggregate's state after `sequence` events, tagged with
-- the version of the state's shape. A snapshot of another state version is ignored and the
-- aggregate rebuilt from its events: never a wrong state.
CREATE TABLE snapshots (
    aggregate_id   uuid        PRIMARY KEY,
    aggregate_type text        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence > 0),
    state_version  integer     NOT NULL,
    state          jsonb       NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now()
);
