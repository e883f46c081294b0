//! The log as relays read it: partitions, the rows a relay reads, its checkpoints, parked
//! events, and the backlog.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use crate::EventError;
use crate::store::GlobalPosition;
use crate::store::Partition;
use crate::store::row::StoredRow;
/// One row of the log as a relay reads it.
pub(crate) struct LogRow {
    pub(crate) partition: Partition,
    pub(crate) subject: String,
    pub(crate) row: StoredRow,
}

/// One page of the log: at most `batch_size` rows, and at most about `max_batch_bytes` of
/// payload and metadata (a page always holds at least one row).
pub(crate) struct Page {
    pub(crate) rows: Vec<LogRow>,
    /// The byte bound cut the page short: more rows may follow.
    pub(crate) cut: bool,
}

impl Page {
    /// Reads rows until the stream ends or they hold `max_bytes`.
    pub(crate) async fn collect(
        rows: impl futures_util::Stream<Item = Result<LogRow, sqlx::Error>>,
        max_bytes: usize,
    ) -> Result<Self, EventError> {
        use futures_util::StreamExt;
        let mut rows = std::pin::pin!(rows);
        let mut page = Self { rows: Vec::new(), cut: false };
        let mut bytes = 0_usize;
        while let Some(row) = rows.next().await {
            let row = row?;
            bytes = bytes.saturating_add(row.row.payload.len() + row.row.metadata.len());
            page.rows.push(row);
            if bytes >= max_bytes {
                page.cut = true;
                break;
            }
        }
        Ok(page)
    }
}

/// A parked event, as the relay writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParkedRow {
    pub(crate) global_position: GlobalPosition,
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_id: Uuid,
    pub(crate) sequence: i64,
    pub(crate) partition: Partition,
    pub(crate) blocked_by: Option<GlobalPosition>,
    pub(crate) attempts: i32,
    pub(crate) reason: String,
}

/// The backlog as the database tells it.
pub(crate) struct RelayLagRow {
    pub(crate) pending: i64,
    pub(crate) oldest_pending_seconds: Option<f64>,
    pub(crate) held_back: i64,
    pub(crate) parked: i64,
}

impl RelayLagRow {
    /// The lag as the API reports it, with the transaction holding the horizon.
    pub(crate) fn with_oldest_write(self, oldest: Option<RunningTransaction>) -> RelayLag {
        RelayLag {
            pending: self.pending,
            oldest_pending_age: self
                .oldest_pending_seconds
                .map(|s| Duration::try_from_secs_f64(s).unwrap_or_default()),
            held_back: self.held_back,
            parked: self.parked,
            oldest_write_transaction: oldest,
            lost: Vec::new(),
        }
    }
}

/// An event the broker refused for good, or one waiting behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedEvent {
    /// The event's global position.
    pub global_position: i64,
    /// The event id.
    pub event_id: Uuid,
    /// Its aggregate.
    pub aggregate_id: Uuid,
    /// Its sequence in the aggregate.
    pub sequence: i64,
    /// Its partition.
    pub partition: i32,
    /// `None` for an event the broker refused; else the position of the parked event of
    /// the same aggregate it waits behind.
    pub blocked_by: Option<i64>,
    /// Attempts made before it was parked.
    pub attempts: i32,
    /// The broker's refusal, or why it waits.
    pub reason: String,
    /// Re-queued: the relay publishes it (and the events behind it) again.
    pub requeued: bool,
    /// How long ago it was parked.
    pub age: Duration,
}

impl ParkedEvent {
    /// Reads a parked event from a query result of either backend (the same column names);
    /// `age` is computed by the driver.
    pub(crate) fn from_row<'r, R: Row>(row: &'r R, age: Duration) -> Result<Self, sqlx::Error>
    where
        &'static str: ColumnIndex<R>,
        i64: Decode<'r, R::Database> + Type<R::Database>,
        i32: Decode<'r, R::Database> + Type<R::Database>,
        bool: Decode<'r, R::Database> + Type<R::Database>,
        String: Decode<'r, R::Database> + Type<R::Database>,
        Uuid: Decode<'r, R::Database> + Type<R::Database>,
        Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    {
        Ok(Self {
            global_position: row.try_get("global_position")?,
            event_id: row.try_get("event_id")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            partition: row.try_get("partition")?,
            blocked_by: row.try_get("blocked_by")?,
            attempts: row.try_get("attempts")?,
            reason: row.try_get("reason")?,
            requeued: row.try_get("requeued")?,
            age,
        })
    }
}

/// A write transaction still running: what holds the transaction horizon back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningTransaction {
    /// The server process (`pg_terminate_backend(pid)` ends it).
    pub pid: i32,
    /// The client's `application_name`.
    pub application_name: String,
    /// `active`, `idle in transaction`, …
    pub state: String,
    /// How long it has been running.
    pub age: Duration,
}

/// How far publication is behind the log.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RelayLag {
    /// Committed events not yet acknowledged by the broker (nor parked).
    pub pending: i64,
    /// The checkpoints' age: how long the oldest pending event has waited.
    pub oldest_pending_age: Option<Duration>,
    /// Pending events a relay cannot read yet: an older write transaction is still
    /// running (see [`oldest_write_transaction`](Self::oldest_write_transaction)).
    pub held_back: i64,
    /// Events parked: refused by the broker, or waiting behind one that was.
    pub parked: i64,
    /// When events are held back: the oldest running write transaction, which holds the
    /// horizon (PostgreSQL; reading other roles' sessions needs `pg_read_all_stats`).
    pub oldest_write_transaction: Option<RunningTransaction>,
    /// Streams found holding less than they acknowledged (lost messages), per partition:
    /// those partitions are not published until what was lost is sent again (see
    /// [`LogRelay`](crate::LogRelay), "Lost messages").
    pub lost: Vec<StreamMark>,
}

/// What the broker acknowledged to a relay partition on one stream, and whether the stream
/// still holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamMark {
    /// The relay partition.
    pub partition: i32,
    /// The broker's stream.
    pub stream: String,
    /// The highest stream sequence acknowledged for an event of the partition.
    pub acknowledged: i64,
    /// When the relay found the stream holding less (its last sequence below
    /// `acknowledged`); `None` while it holds everything.
    pub behind_since: Option<DateTime<Utc>>,
    /// The stream's last sequence when found behind.
    pub held_sequence: Option<i64>,
    /// An operator asked the partition's relay to send what the stream lost again.
    pub repair_requested: bool,
    /// The event whose message was stored at `acknowledged`: the stream still holds what it
    /// acknowledged only if that message is still there.
    pub event_id: Option<Uuid>,
}

/// A mark as a relay saves it.
pub(crate) struct MarkRow<'a> {
    pub(crate) partition: Partition,
    pub(crate) stream: &'a str,
    pub(crate) sequence: i64,
    pub(crate) event_id: Option<Uuid>,
}

impl StreamMark {
    /// A mark read from the store's columns, in `MARK_COLUMNS` order.
    pub(crate) fn from_row<'r, R: Row>(row: &'r R) -> Result<Self, sqlx::Error>
    where
        usize: ColumnIndex<R>,
        i32: Decode<'r, R::Database> + Type<R::Database>,
        i64: Decode<'r, R::Database> + Type<R::Database>,
        bool: Decode<'r, R::Database> + Type<R::Database>,
        String: Decode<'r, R::Database> + Type<R::Database>,
        DateTime<Utc>: Decode<'r, R::Database> + Type<R::Database>,
        Uuid: Decode<'r, R::Database> + Type<R::Database>,
    {
        Ok(Self {
            partition: row.try_get(0)?,
            stream: row.try_get(1)?,
            acknowledged: row.try_get(2)?,
            behind_since: row.try_get(3)?,
            held_sequence: row.try_get(4)?,
            repair_requested: row.try_get(5)?,
            event_id: row.try_get(6)?,
        })
    }
}

/// Which parked aggregates [`EventStore::requeue_parked`](crate::EventStore::requeue_parked) re-queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// Every parked aggregate.
    All,
    /// The aggregates of these parked events (by global position): each is re-queued
    /// whole, from its first parked event.
    Positions(Vec<i64>),
}
