//! What an operator asks the store: which migrations ran, how much is stored, where each
//! relay partition and each projection stands and how far behind it is.

use std::time::Duration;

use crate::store::{RelayLag, StreamPosition};

/// The store at a glance: [`EventStore::status`](crate::EventStore::status).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct StoreStatus {
    /// `postgres` or `sqlite`.
    pub backend: &'static str,
    /// The PostgreSQL schema the store lives in (`None` on SQLite).
    pub schema: Option<String>,
    /// Applied and pending migrations. While any is pending, the figures below may be
    /// zero: the tables are not all there yet.
    pub migrations: Migrations,
    /// Events stored.
    pub events: i64,
    /// Aggregates (streams) stored.
    pub aggregates: i64,
    /// The highest global position (0 for an empty store).
    pub last_position: i64,
    /// Each relay partition's checkpoint and backlog.
    pub partitions: Vec<PartitionStatus>,
    /// Each projection's checkpoint and backlog.
    pub projections: Vec<ProjectionStatus>,
    /// Publication's lag as a whole, with the transaction holding the horizon.
    pub lag: RelayLag,
}

/// The store's migrations (versions, as numbered in `migrations/`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Migrations {
    /// Applied successfully, in order.
    pub applied: Vec<i64>,
    /// Known to this build and not applied yet: [`EventStore::migrate`](crate::EventStore::migrate) applies them.
    pub pending: Vec<i64>,
}

/// One relay partition: where its checkpoint is and what is still to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionStatus {
    /// The partition (0 to [`PARTITIONS`](crate::PARTITIONS) − 1).
    pub partition: i32,
    /// Everything up to it is published (or parked).
    pub checkpoint: StreamPosition,
    /// How long ago the checkpoint last moved.
    pub age: Duration,
    /// Committed events of the partition after the checkpoint.
    pub pending: i64,
}

/// One projection: where its checkpoint is and how many events it has still to read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// The projection's name.
    pub name: String,
    /// Everything up to it is applied.
    pub checkpoint: StreamPosition,
    /// How long ago the checkpoint last moved.
    pub age: Duration,
    /// Events of any type after the checkpoint (the projection reads those of its types).
    pub behind: i64,
    /// A rebuild was requested ([`EventStore::request_rebuild`](crate::EventStore::request_rebuild))
    /// and the runner has not started it yet.
    pub rebuild_requested: bool,
}

impl Migrations {
    /// The `known` versions split by `applied` (both drivers' migrators).
    pub(crate) fn of(known: impl Iterator<Item = i64>, applied: Vec<i64>) -> Self {
        let pending = known.filter(|v| !applied.contains(v)).collect();
        Self { applied, pending }
    }
}

impl PartitionStatus {
    /// From a driver's row: partition, checkpoint, age in seconds, pending.
    pub(crate) fn from_row(
        (partition, transaction_id, global_position, seconds, pending): (i32, i64, i64, Option<f64>, i64),
    ) -> Self {
        let checkpoint = StreamPosition { transaction_id, global_position };
        Self { partition, checkpoint, age: age(seconds.unwrap_or(0.0)), pending }
    }
}

impl ProjectionStatus {
    /// From a driver's row: name, checkpoint, age in seconds, events behind.
    pub(crate) fn from_row(
        (name, transaction_id, global_position, seconds, behind): (String, i64, i64, Option<f64>, i64),
    ) -> Self {
        let checkpoint = StreamPosition { transaction_id, global_position };
        let rebuild_requested = checkpoint < StreamPosition::START;
        Self { name, checkpoint, age: age(seconds.unwrap_or(0.0)), behind, rebuild_requested }
    }
}

/// The seconds a driver computed, as a duration (negative or invalid: zero).
fn age(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or_default()
}
