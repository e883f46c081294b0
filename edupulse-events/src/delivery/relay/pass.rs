//! What a pass of a relay did.

/// What one pass of a relay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayPass {
    /// Events the broker acknowledged.
    pub published: u64,
    /// Events parked (refused for good, or waiting behind one that was).
    pub parked: u64,
    /// Events that failed and will be retried.
    pub failed: u64,
    /// Events not sent: they wait for their retry, or behind a failed one.
    pub waiting: u64,
    /// Partitions the relay held.
    pub partitions: u32,
    /// The last page was full: more events are waiting.
    pub more: bool,
}
