//! The relay: publishes the store's log to the broker.
//!
//! The events table is the one log. A relay reads it the way a projection does: the rows
//! past its checkpoint and below the transaction horizon, in `(transaction id, position)`
//! order. It publishes them pipelined with `Nats-Msg-Id` = event id, awaits the
//! acknowledgements, and saves its checkpoint once per batch. After a crash it re-sends at
//! most the batch after its checkpoint, and the broker drops those copies inside its
//! duplicate window.
//!
//! **Partitions.** Each event is stored with its partition, a hash of its aggregate id
//! ([`PARTITIONS`] of them), and each partition has its own checkpoint. A relay publishes
//! only the partitions it holds: on PostgreSQL through advisory *session* locks taken on a
//! connection of its own (its lease), so that it holds no transaction while it waits on the
//! broker, and never holds the horizon back itself. Several relays, in one process or
//! many, share the partitions; the others stand by and take a partition over within
//! [`RelayConfig::takeover_interval`] of its holder's death (PostgreSQL ends a dead
//! client's session, and with it the locks). The checkpoints are written over the lease,
//! so a relay whose session ended cannot move them any more.
//!
//! **Order.** A relay sends an aggregate's next event only after the broker acknowledged
//! the previous one (the [`Publisher`] contract), so the broker never holds an aggregate's
//! event before an earlier one, even when an acknowledgement fails mid-batch; a
//! partition's checkpoint never passes an event that is neither acknowledged nor parked.
//!
//! **Poison.** An event the broker refuses ([`EventError::Refused`]) is retried with
//! backoff; after [`RelayConfig::max_attempts`] refusals it is parked (a table, with the
//! refusal) and its aggregate's later events are parked behind it, so that nothing else
//! waits and the aggregate is never published out of order. Re-queue parked aggregates
//! with [`EventStore::requeue_parked`] once the cause is fixed. Failures that are not the
//! message's (a timeout, a lost connection, no stream) are retried without limit.
//!
//! **Lost messages.** A relay checks that the broker's streams still hold what they
//! acknowledged; a partition whose stream lost acknowledged messages (deleted, restored
//! from an older copy, a server that lost power before syncing) is *lost*: not published,
//! and reported, until what was lost is sent again, on request or on its own
//! ([`RelayConfig::republish_lost`]). See `delivery/watch/`. Nothing is handed to the
//! broker on a connection whose streams were not checked: the check is compared with the
//! connection right before each batch goes out, not only before its page is read (the
//! connection may be made again meanwhile, to a server back from an older copy).
//!
//! **Layout.** `ledger.rs` decides (pure, unit-tested: what to do with each row, how each
//! outcome moves a partition's state); `holding.rs` does (reads pages, publishes, saves);
//! `worker.rs` keeps the tenure and the timing; `delivery/watch/` checks and repairs the
//! streams.
//!
//! **Words.** One word per concept, here and in the logs:
//!
//! | word | meaning |
//! |---|---|
//! | log | the events table, read in `(transaction id, position)` order |
//! | horizon | the oldest running write transaction: the relay reads only below it, so no row can still appear before what it read |
//! | partition | one of [`PARTITIONS`] shares of the log, by aggregate id; a relay *holds* whole partitions |
//! | lease | a relay's own database session, whose locks hold its partitions |
//! | tenure | what a relay holds: nothing (idle), or a lease with its partitions |
//! | checkpoint | per partition: every event up to it was acknowledged or parked |
//! | page | rows of the log read at once; its rows to send go to the publisher as one batch |
//! | ledger | the relay's decisions: a book per partition (checkpoint, acknowledged past it), parked aggregates, failures |
//! | disposition | what the relay does with a row: settled, acknowledged, in stream, parked behind, waits, send |
//! | outcome | what the broker said of a message: acknowledged, refused, failed |
//! | waits | not sent in this pass: behind an earlier event of its aggregate, for its retry, or for a check of the connection; its partition's checkpoint stops before it |
//! | parked | refused for good (or behind one that was): kept in a table until re-queued |
//! | mark | per partition and stream: the highest sequence the stream acknowledged for it |
//! | lost | a partition whose stream no longer holds what it acknowledged: not published until repaired |
//! | repair | sending again what a stream lost, in log order |

mod config;
mod holding;
mod ledger;
mod log_relay;
mod parts;
mod pass;
mod worker;

pub use self::config::RelayConfig;
pub use self::log_relay::LogRelay;
pub use self::pass::RelayPass;
