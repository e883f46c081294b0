//! The stream watch: a relay checks that the broker's streams still hold what they
//! acknowledged (this file), reads what a stream holds (`read.rs`), sends again what one lost
//! (`repair.rs`), and looks up old events before it sends them (`aged.rs`).
//!
//! Per partition and stream, the relay keeps the highest stream sequence acknowledged for an
//! event of the partition and that event's id (a *mark*, saved with the checkpoints). A
//! stream *lost* acknowledged messages (it was deleted, restored from an older copy, or it is
//! a single server's stream that lost power before syncing: see DURABILITY.md in the
//! repository) when its last sequence is below a mark, or when it holds another message, or none,
//! at a mark's sequence (newer messages of other publishers may have taken its last sequence
//! past the mark). A new acknowledgement at or below the marks a batch started from says the
//! same. The relay checks when it takes partitions, after each reconnection to the broker,
//! and every [`RelayConfig::stream_check_interval`](crate::RelayConfig::stream_check_interval);
//! it hands nothing to the broker on a connection it has not checked (a page read while the
//! connection was made again waits for the next check, and a repair stops), since what went
//! out on it would land after a hole that the check had not found yet.
//!
//! A stream is found lost only by two looks a second apart (a server that has just restarted
//! may answer before it has loaded its streams). A partition whose stream lost messages is
//! *held for the loss*: not published any more (its later events would land before the lost
//! ones), and recorded in the store ([`RelayLag::lost`](crate::RelayLag::lost), `edupulse
//! status`). When asked (`edupulse republish --lost`,
//! [`EventStore::request_republish_lost`](crate::EventStore::request_republish_lost)) or on
//! its own ([`RelayConfig::republish_lost`](crate::RelayConfig::republish_lost)), the relay
//! *repairs* it: it reads which of the partition's events the stream still holds (an ordered
//! consumer, headers only), and resends, in log order, every event of the partition up to its
//! checkpoint that comes after the oldest one the stream holds and is not held: what the
//! stream lost, and nothing it expired by its own limits. Then the partition flows again.

mod aged;
mod marks;
mod read;
mod repair;
mod sequence;

pub(crate) use self::aged::Aged;
pub(crate) use self::marks::StreamWatch;
pub(crate) use self::repair::{Holder, check_and_repair};
