-- Payloads and metadata are kept as the producer wrote them (`json` keeps the text it is
-- given; `jsonb` re-renders it). What the relay publishes and what every reader decodes is
-- then byte for byte what the append encoded, checked and measured: with `jsonb` the
-- published text had a space after every `,` and `:` and numbers written out in full (a
-- 28 KB array of 1e300 grew past 1 MiB and was refused by the broker after it committed),
-- keys in another order, and values the append had decoded back were not the ones read.
-- Nothing queried either column as `jsonb`; the promoted keys stay `jsonb` (indexed).
-- Rewrites the table once: rows stored before keep the text `jsonb` rendered for them.
ALTER TABLE events
    ALTER COLUMN payload TYPE json USING payload::json,
    ALTER COLUMN metadata DROP DEFAULT,
    ALTER COLUMN metadata TYPE json USING metadata::json,
    ALTER COLUMN metadata SET DEFAULT '{}';
