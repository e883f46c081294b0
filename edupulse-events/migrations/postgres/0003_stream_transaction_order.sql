-- Per-aggregate order in the global stream, whatever the order of transaction ids.
--
-- The global stream is read in (transaction_id, global_position) order below the oldest
-- running transaction. A transaction can take its id early (a write of its own, or the
-- speculative insert of an `ExpectedSequence::Any` append) and append an aggregate's next
-- event after a younger transaction committed the previous one: ordered by its own id, the
-- next event would be read first. So each event records the greater of its transaction's id
-- and the id recorded with the aggregate's previous event, kept here on the stream row that
-- the append locks anyway. A recorded id is never below the writer's own, so an event is
-- still read only after its own and every older transaction finished: a late commit with a
-- lower position is never skipped.
ALTER TABLE streams ADD COLUMN last_transaction_id bigint NOT NULL DEFAULT 0;

-- Existing aggregates continue from the highest id recorded with their events. Events
-- already stored keep their ids: rewriting them could move a row past a reader's
-- checkpoint and deliver it twice.
UPDATE streams s
SET last_transaction_id = m.max_id
FROM (SELECT aggregate_id, max(transaction_id) AS max_id FROM events GROUP BY aggregate_id) m
WHERE m.aggregate_id = s.aggregate_id;
