//! Old events, looked up before they are sent. An event recorded longer ago than half the
//! streams' duplicate window may have been sent already, longer ago than the window (by a
//! relay that died before saving its checkpoint, or in an attempt whose acknowledgement never
//! came, before a long outage or a partition held for a loss), and the stream would store it
//! again. So before a page with such events goes out, the streams are read (headers only) for
//! their partitions, from a little before the oldest of them; the events they hold are not
//! sent again ([`Disposition::InStream`](crate::delivery::relay)). A reading serves the pages
//! after it for a quarter of the window.

use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::broker::Publisher;
use crate::delivery::watch::marks::StreamWatch;
use crate::delivery::watch::read::{Reading, read_stream};
use crate::store::Partition;
use crate::store::log::LogRow;

/// What the streams were found to hold of the events older than half their duplicate window.
#[derive(Debug, Default)]
pub(crate) struct Aged {
    /// When the streams were read, from what time, for which partitions.
    read_at: Option<Instant>,
    since: Option<DateTime<Utc>>,
    partitions: HashSet<Partition>,
    /// The event ids found.
    held: HashSet<Uuid>,
    /// The page being sent: events recorded before this are looked up in `held`.
    cutoff: Option<DateTime<Utc>>,
}

impl Aged {
    /// Whether the event, recorded at `recorded_at`, is old and still in its stream.
    pub(crate) fn in_stream(&self, recorded_at: DateTime<Utc>, event_id: Uuid) -> bool {
        self.cutoff.is_some_and(|cutoff| recorded_at < cutoff) && self.held.contains(&event_id)
    }

    /// Reads the streams for the old events of `rows` unless a recent reading covers them;
    /// `false` when the broker does not answer (the page waits).
    pub(crate) async fn look_up(
        &mut self,
        watch: &StreamWatch,
        publisher: &dyn Publisher,
        rows: &[LogRow],
        stop: &AtomicBool,
    ) -> bool {
        self.cutoff = None;
        let Some(window) = watch.duplicate_window() else { return true };
        let half = chrono::TimeDelta::from_std(window / 2).unwrap_or_default();
        let cutoff = Utc::now() - half;
        let aged = rows.iter().filter(|r| r.row.recorded_at < cutoff);
        let Some(oldest) = aged.clone().map(|r| r.row.recorded_at).min() else { return true };
        let partitions: HashSet<Partition> = aged.map(|r| r.partition).collect();
        let since = oldest - half;
        let fresh = self.read_at.is_some_and(|at| at.elapsed() < window / 4)
            && self.since.is_some_and(|read_from| read_from <= since)
            && partitions.is_subset(&self.partitions);
        if !fresh {
            let wanted: Vec<Partition> = partitions.iter().copied().collect();
            let mut held = HashSet::new();
            for stream in watch.streams() {
                match read_stream(publisher, &stream, &wanted, Some(since), stop).await {
                    Reading::Holds(found) => held.extend(found.events),
                    Reading::NoStream => {}
                    Reading::NoAnswer => return false,
                }
            }
            tracing::info!(
                partitions = wanted.len(),
                held = held.len(),
                "relay: events older than half the duplicate window looked up in the stream before sending"
            );
            *self =
                Self { read_at: Some(Instant::now()), since: Some(since), partitions, held, cutoff: None };
        }
        self.cutoff = Some(cutoff);
        true
    }
}
