//! The marks: per partition and stream, what the stream acknowledged, and whether it still
//! holds it (see the module docs of `delivery/watch`).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::EventError;
use crate::broker::{PublishReceipt, Publisher};
use crate::delivery::watch::sequence::StreamSequence;
use crate::store::backend::Lease;
use crate::store::log::MarkRow;
use crate::store::{Partition, StreamMark};

/// A partition's messages on one stream.
type MarkKey = (Partition, Arc<str>);

/// What one (partition, stream) was acknowledged, and whether the stream lost some of it.
#[derive(Debug, Clone, Default)]
struct Mark {
    acknowledged: StreamSequence,
    /// The event stored at `acknowledged`.
    event_id: Option<Uuid>,
    /// `acknowledged` when the batch in flight started: a new message of the batch is
    /// stored above it unless the stream went back (within a batch, an aggregate's next
    /// message goes after the others' first ones, so sequences do not follow the log).
    floor: StreamSequence,
    saved: StreamSequence,
    /// The stream's last sequence when it was found to have lost messages.
    lost: Option<StreamSequence>,
    /// When it was found.
    found_at: Option<Instant>,
    /// `lost` as last recorded in the store.
    recorded_lost: Option<StreamSequence>,
    repair_requested: bool,
}

impl Mark {
    /// A mark that holds `acknowledged`, saved.
    fn holding(acknowledged: StreamSequence, event_id: Option<Uuid>) -> Self {
        Self { acknowledged, event_id, floor: acknowledged, saved: acknowledged, ..Self::default() }
    }
}

/// A mark to save: `(partition, stream, sequence, event id)`.
pub(crate) type UnsavedMark = (Partition, Arc<str>, StreamSequence, Option<Uuid>);

/// The marks of the partitions a relay holds.
#[derive(Debug, Default)]
pub(crate) struct StreamWatch {
    marks: HashMap<MarkKey, Mark>,
    last_check: Option<Instant>,
    /// The broker connection's epoch at the last check.
    epoch: Option<u64>,
    /// The last check that the broker did not answer: the next waits a second.
    last_failure: Option<Instant>,
    /// Each stream's duplicate window, as it last said.
    windows: HashMap<Arc<str>, Duration>,
}

/// How long after a check the broker did not answer the next is tried.
const RETRY_CHECK: Duration = Duration::from_secs(1);

/// How long after a stream looked to have lost messages it is looked at again.
const SECOND_LOOK: Duration = Duration::from_secs(1);

/// How long a loss must last before it is repaired. A replicated stream that has just
/// restarted, or changed leader, may show less than it holds for a while, and a repair on
/// that view would store again what comes back: within this time, a stream that holds the
/// marks again clears them.
const LOSS_SETTLE: Duration = Duration::from_secs(5);

/// How often streams that lost messages are looked at again (healed, or asked to repair).
const RECHECK_LOST: Duration = Duration::from_secs(2);

impl StreamWatch {
    /// Adds the marks of partitions just taken, and asks for a check.
    pub(crate) fn load(&mut self, marks: Vec<StreamMark>) {
        for m in marks {
            let acknowledged = StreamSequence::from_stored(m.acknowledged);
            let lost = m
                .behind_since
                .map(|_| m.held_sequence.map_or(StreamSequence::new(0), StreamSequence::from_stored));
            let mark = Mark {
                lost,
                // As long ago as the store says (a relay that found it may have died right
                // after: the loss still has to last).
                found_at: m.behind_since.map(|since| {
                    let age = (chrono::Utc::now() - since).to_std().unwrap_or_default();
                    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
                }),
                recorded_lost: lost,
                repair_requested: m.repair_requested,
                ..Mark::holding(acknowledged, m.event_id)
            };
            self.marks.insert((Partition::new(m.partition), Arc::from(m.stream.as_str())), mark);
        }
        self.last_check = None;
    }

    /// Whether a check is due: never checked, a new connection, or the interval passed.
    pub(crate) fn due(&self, epoch: u64, interval: Duration) -> bool {
        let interval =
            if self.marks.values().any(|m| m.lost.is_some()) { interval.min(RECHECK_LOST) } else { interval };
        let wanted = self.epoch != Some(epoch) || self.last_check.is_none_or(|at| at.elapsed() >= interval);
        wanted && self.last_failure.is_none_or(|at| at.elapsed() >= RETRY_CHECK)
    }

    /// Whether the streams were checked on this connection to the broker: until they are
    /// (the broker restarted, maybe without what it acknowledged, and does not answer yet),
    /// nothing is published, or it could land after a hole.
    pub(crate) fn verified(&self, epoch: u64) -> bool {
        self.epoch == Some(epoch)
    }

    /// Partitions held for a loss: a stream of theirs lost messages.
    pub(crate) fn lost(&self) -> HashSet<Partition> {
        self.marks.iter().filter(|(_, m)| m.lost.is_some()).map(|((p, _), _)| *p).collect()
    }

    /// A batch is about to be sent: its new messages must be stored above the marks.
    pub(crate) fn batch_starts(&mut self) {
        for mark in self.marks.values_mut() {
            mark.floor = mark.acknowledged;
        }
    }

    /// Records an acknowledgement for an event of `partition`. A new message stored at or
    /// below the mark the batch started from means the stream went back: the partition is
    /// held for the loss.
    pub(crate) fn acknowledged(&mut self, partition: Partition, event_id: Uuid, receipt: &PublishReceipt) {
        let Some(stream) = &receipt.stream else { return };
        // 0: stored, where the broker did not say (a fast batch names its last message's
        // sequence only): nothing to compare or to mark.
        if receipt.stream_sequence == 0 {
            return;
        }
        let sequence = StreamSequence::new(receipt.stream_sequence);
        let mark = self.marks.entry((partition, stream.clone())).or_default();
        if !receipt.duplicate && sequence <= mark.floor && mark.lost.is_none() {
            tracing::error!(
                %partition,
                stream = &**stream,
                acknowledged = mark.floor.get(),
                stored_at = sequence.get(),
                "relay: the stream went back: it stored a new message at or below a sequence it had \
                 acknowledged; the partition is held until what it lost is sent again \
                 (`edupulse republish --lost`)"
            );
            mark.lost = Some(sequence.before());
            mark.found_at = Some(Instant::now());
        }
        if sequence > mark.acknowledged {
            mark.acknowledged = sequence;
            mark.event_id = Some(event_id);
        }
    }

    /// The marks whose acknowledged sequence moved since they were saved.
    pub(crate) fn unsaved(&self) -> Vec<UnsavedMark> {
        self.marks
            .iter()
            .filter(|(_, m)| m.acknowledged != m.saved)
            .map(|((p, s), m)| (*p, s.clone(), m.acknowledged, m.event_id))
            .collect()
    }

    /// Records that `unsaved` marks were saved.
    pub(crate) fn saved(&mut self, saved: &[UnsavedMark]) {
        for (p, s, sequence, _) in saved {
            if let Some(mark) = self.marks.get_mut(&(*p, s.clone())) {
                mark.saved = *sequence;
            }
        }
    }

    /// The shortest duplicate window of the streams the marks name (`None`: none known).
    pub(crate) fn duplicate_window(&self) -> Option<Duration> {
        self.windows.values().min().copied()
    }

    /// The streams the marks name.
    pub(crate) fn streams(&self) -> Vec<Arc<str>> {
        let mut streams: Vec<Arc<str>> = self.marks.keys().map(|(_, s)| s.clone()).collect();
        streams.sort();
        streams.dedup();
        streams
    }

    /// The marks `stream` no longer holds, with its last sequence; `None` when the broker
    /// did not answer. A mark is lost when the stream's last sequence is below it, or when
    /// the stream, still holding that sequence, holds another message there or none
    /// (restored from an older copy, or made again, and newer messages took it past the
    /// mark).
    async fn look(&self, publisher: &dyn Publisher, stream: &Arc<str>) -> Option<Look> {
        let state = match publisher.stream_state(stream).await {
            Ok(Some(state)) => state,
            // The broker answers that there is no such stream (deleted, renamed, or not
            // loaded yet by a server that just restarted): nothing of it to lose, and
            // nothing to wait for; a stream made again under the name is found at the next
            // look, or by the first acknowledgement it gives (a sequence below the marks).
            Ok(None) => return Some(Look::default()),
            Err(e) => {
                tracing::debug!(stream = &**stream, error = %e, "relay: cannot check the stream; later");
                return None;
            }
        };
        let (first, last) =
            (StreamSequence::new(state.first_sequence), StreamSequence::new(state.last_sequence));
        let mut look = Look { last, window: state.duplicate_window, ..Look::default() };
        for (key, mark) in &self.marks {
            if key.1 != *stream || mark.acknowledged == StreamSequence::new(0) {
                continue;
            }
            let lost = mark.lost.is_some();
            if mark.acknowledged > last {
                if !lost {
                    look.lost.push(key.clone());
                }
                continue;
            }
            // Below the stream's first sequence, the message may have expired by the
            // stream's own limits: nothing to compare.
            let (Some(event_id), true) = (mark.event_id, mark.acknowledged >= first) else { continue };
            match publisher.event_at(stream, mark.acknowledged.get()).await {
                Ok(at) if at == Some(event_id) => {
                    if lost {
                        look.healed.push(key.clone());
                    }
                }
                Ok(_) if !lost => look.lost.push(key.clone()),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(stream = &**stream, error = %e, "relay: cannot check the stream; later");
                    return None;
                }
            }
        }
        Some(look)
    }

    /// Compares each stream with the marks; records partitions found held for a loss, or
    /// healed, in the store, and reads back whether an operator asked for a repair. Broker
    /// failures leave the check due.
    pub(crate) async fn check(
        &mut self,
        publisher: &dyn Publisher,
        lease: &mut Lease,
        partitions: &[Partition],
    ) -> Result<(), EventError> {
        let epoch = publisher.connection_epoch();
        for stream in self.streams() {
            // Two looks a second apart: a server that has just restarted may answer before
            // it has loaded its streams.
            let mut found = self.look(publisher, &stream).await;
            if found.as_ref().is_some_and(|look| !look.lost.is_empty()) {
                tokio::time::sleep(SECOND_LOOK).await;
                found = self.look(publisher, &stream).await;
            }
            let Some(look) = found else {
                self.last_failure = Some(Instant::now());
                return Ok(());
            };
            self.apply(&stream, look);
        }
        self.record(lease, partitions).await?;
        self.epoch = Some(epoch);
        self.last_check = Some(Instant::now());
        self.last_failure = None;
        Ok(())
    }

    /// What a look at `stream` found: marks healed, marks lost.
    fn apply(&mut self, stream: &Arc<str>, look: Look) {
        let Look { last, lost, healed, window } = look;
        if let Some(window) = window {
            self.windows.insert(stream.clone(), window);
        }
        for key in healed {
            let Some(mark) = self.marks.get_mut(&key) else { continue };
            tracing::warn!(
                partition = %key.0,
                stream = &**stream,
                acknowledged = mark.acknowledged.get(),
                "relay: the stream holds again what it acknowledged (a replicated stream catching \
                 up after a restart); the partition is published again"
            );
            mark.lost = None;
            mark.found_at = None;
        }
        for key in lost {
            let Some(mark) = self.marks.get_mut(&key) else { continue };
            tracing::error!(
                partition = %key.0,
                stream = &**stream,
                acknowledged = mark.acknowledged.get(),
                held = last.get(),
                "relay: the stream lost messages it acknowledged (deleted, restored from an older copy, \
                 or a server that lost power before syncing); the partition is held until they are \
                 sent again (`edupulse republish --lost`)"
            );
            mark.lost = Some(last);
            mark.found_at = Some(Instant::now());
        }
    }

    /// Records in the store what changed, and reads back whether an operator asked for a
    /// repair.
    async fn record(&mut self, lease: &mut Lease, partitions: &[Partition]) -> Result<(), EventError> {
        for ((partition, stream), mark) in &mut self.marks {
            if mark.lost != mark.recorded_lost {
                lease.mark_behind(*partition, stream, mark.lost.map(StreamSequence::stored)).await?;
                mark.recorded_lost = mark.lost;
            }
        }
        if self.marks.values().any(|m| m.lost.is_some()) {
            for m in lease.marks(partitions).await? {
                if let Some(mark) =
                    self.marks.get_mut(&(Partition::new(m.partition), Arc::from(m.stream.as_str())))
                {
                    mark.repair_requested = m.repair_requested;
                }
            }
        }
        Ok(())
    }

    /// The (partition, stream) pairs to repair now: lost, and asked to (or `always`).
    pub(crate) fn to_repair(&self, always: bool) -> Vec<MarkKey> {
        let mut pairs: Vec<MarkKey> = self
            .marks
            .iter()
            .filter(|(_, m)| m.lost.is_some() && (always || m.repair_requested))
            .filter(|(_, m)| m.found_at.is_none_or(|at| at.elapsed() >= LOSS_SETTLE))
            .map(|((p, s), _)| (*p, s.clone()))
            .collect();
        pairs.sort();
        pairs
    }

    /// After a repair of `partition` on `stream`: the stream holds everything again, up to
    /// `acknowledged`, where `event_id` is stored.
    pub(crate) async fn repaired(
        &mut self,
        lease: &mut Lease,
        partition: Partition,
        stream: &Arc<str>,
        acknowledged: StreamSequence,
        event_id: Option<Uuid>,
    ) -> Result<(), EventError> {
        let row = MarkRow { partition, stream, sequence: acknowledged.stored(), event_id };
        lease.save_marks(&[row]).await?;
        lease.mark_behind(partition, stream, None).await?;
        if let Some(mark) = self.marks.get_mut(&(partition, stream.clone())) {
            *mark = Mark::holding(acknowledged, event_id);
        }
        Ok(())
    }
}

/// One look at a stream: its last sequence, the marks it lost since the last look, and the
/// marks found lost before that it holds again.
#[derive(Debug, Default)]
struct Look {
    last: StreamSequence,
    window: Option<Duration>,
    lost: Vec<MarkKey>,
    healed: Vec<MarkKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(sequence: u64, duplicate: bool) -> PublishReceipt {
        PublishReceipt { stream_sequence: sequence, duplicate, stream: Some(Arc::from("S")) }
    }

    #[test]
    fn a_batch_acknowledged_out_of_log_order_is_not_a_stream_that_went_back() {
        let mut watch = StreamWatch::default();
        watch.batch_starts();
        // Within a batch, an aggregate's second message is stored after others' first ones.
        for sequence in [1, 3, 2] {
            watch.acknowledged(Partition::new(7), Uuid::nil(), &receipt(sequence, false));
        }
        assert!(watch.lost().is_empty());
        watch.batch_starts();
        // A re-send the stream still had keeps its old sequence: not a step back.
        watch.acknowledged(Partition::new(7), Uuid::nil(), &receipt(2, true));
        watch.acknowledged(Partition::new(7), Uuid::nil(), &receipt(4, false));
        assert!(watch.lost().is_empty());
        assert_eq!(
            watch.unsaved(),
            vec![(Partition::new(7), Arc::from("S"), StreamSequence::new(4), Some(Uuid::nil()))]
        );
        // A new message stored at or below what the last batch ended at: the stream went back.
        watch.batch_starts();
        watch.acknowledged(Partition::new(7), Uuid::nil(), &receipt(3, false));
        assert_eq!(watch.lost(), HashSet::from([Partition::new(7)]));
        assert!(watch.to_repair(true).is_empty(), "not repaired before the loss has lasted");
        for mark in watch.marks.values_mut() {
            mark.found_at = Instant::now().checked_sub(LOSS_SETTLE);
        }
        assert_eq!(watch.to_repair(true), vec![(Partition::new(7), Arc::from("S"))]);
        assert!(watch.to_repair(false).is_empty(), "only when asked, by default");
    }
}
