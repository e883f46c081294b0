//! A relay's settings.

use std::ops::Range;
use std::time::Duration;

use uuid::Uuid;

use crate::EventError;
use crate::store::PARTITIONS;

/// Settings of a [`LogRelay`](crate::LogRelay): `RelayConfig::default()`, then the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayConfig {
    /// Rows read and published per page at most (default 5 000). An aggregate's events go
    /// one acknowledgement round trip each (or, on a stream with atomic publishing, as one
    /// batch per page), so a larger page holds more aggregates in flight: measured in
    /// BENCHMARKS.md.
    pub batch_size: u32,
    /// Bytes of payload and metadata read per batch at most (default 16 MiB): what bounds
    /// a batch's memory when events are large (a batch holds at least one event).
    pub max_batch_bytes: usize,
    /// How often to look for new events when no commit of this process woke the relay
    /// (default 100 ms): commits of other processes are published within about this long.
    pub poll_interval: Duration,
    /// How often a relay tries to take partitions nobody holds (default 1 s): a standby
    /// takes over a dead relay's partitions within about this long.
    pub takeover_interval: Duration,
    /// The partitions this relay may hold (default all: `0..64`). Give several relays
    /// disjoint ranges to share the work, or the same range for standbys.
    pub partitions: Range<i32>,
    /// The shortest time between two checkpoint saves (default 100 ms): a batch's
    /// checkpoints are saved after it, unless the last save is more recent. After a crash
    /// the next holder re-sends at most what was published since the last save, and the
    /// broker drops the copies inside its duplicate window. Zero saves after every batch.
    pub checkpoint_interval: Duration,
    /// Refusals before an event is parked (default 5).
    pub max_attempts: u32,
    /// First delay after a failure (default 100 ms); doubled after each, with jitter.
    pub min_backoff: Duration,
    /// Longest delay between retries (default 30 s).
    pub max_backoff: Duration,
    /// How often the relay checks that the broker's streams still hold what they
    /// acknowledged (default 10 s); also when it takes partitions and after each
    /// reconnection to the broker.
    pub stream_check_interval: Duration,
    /// Send again, without being asked, what a stream lost (default off: the partition is
    /// held and reported until an operator runs `edupulse republish --lost`, or calls
    /// [`EventStore::request_republish_lost`](crate::EventStore::request_republish_lost), having looked at why it was lost).
    pub republish_lost: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 5_000,
            max_batch_bytes: 16 << 20,
            poll_interval: Duration::from_millis(100),
            takeover_interval: Duration::from_secs(1),
            partitions: 0..PARTITIONS,
            checkpoint_interval: Duration::from_millis(100),
            max_attempts: 5,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            stream_check_interval: Duration::from_secs(10),
            republish_lost: false,
        }
    }
}

setters!(RelayConfig {
    with_batch_size => batch_size: u32,
    with_max_batch_bytes => max_batch_bytes: usize,
    with_poll_interval => poll_interval: Duration,
    with_takeover_interval => takeover_interval: Duration,
    with_partitions => partitions: Range<i32>,
    with_checkpoint_interval => checkpoint_interval: Duration,
    with_max_attempts => max_attempts: u32,
    with_min_backoff => min_backoff: Duration,
    with_max_backoff => max_backoff: Duration,
    with_stream_check_interval => stream_check_interval: Duration,
    with_republish_lost => republish_lost: bool,
});

impl RelayConfig {
    /// An invalid setting, as an error.
    pub(crate) fn check(&self) -> Result<(), EventError> {
        let problem = if self.batch_size == 0 || self.max_batch_bytes == 0 {
            Some("batch_size and max_batch_bytes must be at least 1".to_owned())
        } else if self.partitions.start < 0 || self.partitions.end > PARTITIONS || self.partitions.is_empty()
        {
            Some(format!("partitions {:?} must be a non-empty range within 0..{PARTITIONS}", self.partitions))
        } else if self.max_attempts == 0 {
            Some("max_attempts must be at least 1".to_owned())
        } else if self.poll_interval.is_zero()
            || self.takeover_interval.is_zero()
            || self.stream_check_interval.is_zero()
        {
            Some("poll_interval, takeover_interval and stream_check_interval must be above zero".to_owned())
        } else if self.min_backoff.is_zero() || self.max_backoff < self.min_backoff {
            Some("min_backoff must be above zero and at most max_backoff".to_owned())
        } else {
            None
        };
        problem.map_or(Ok(()), |p| Err(EventError::Config(format!("relay configuration: {p}"))))
    }

    /// The delay before retry number `tries` (from 1): capped exponential, with jitter.
    pub(crate) fn backoff(&self, tries: u32) -> Duration {
        let base =
            self.min_backoff.saturating_mul(1 << tries.saturating_sub(1).min(16)).min(self.max_backoff);
        let random = (Uuid::now_v7().as_u128() & 0xffff) as f64 / 65536.0;
        base.mul_f64(0.5 + random)
    }
}
