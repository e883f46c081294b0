//! Lost messages: a relay checks that the broker's streams still hold what they
//! acknowledged, and sends again what one lost.
//!
//! Per partition and stream, the relay keeps the highest stream sequence acknowledged for an
//! event of the partition and that event's id (a *mark*, saved with the checkpoints). A
//! stream lost acknowledged messages (it was deleted, restored from an older copy, or it is a
//! single server's stream that lost power before syncing: see the README's durability guide)
//! when its last sequence is below a mark, or when it holds another message, or none, at a
//! mark's sequence (newer messages of other publishers may have taken its last sequence past
//! the mark). A new acknowledgement at or below the marks a batch started from says the
//! same. The
//! relay checks when it takes partitions, after each reconnection to the broker, and every
//! [`RelayConfig::stream_check_interval`](crate::RelayConfig::stream_check_interval); it
//! hands nothing to the broker on a connection it has not checked (a page read while the
//! connection was made again waits for the next check, and a repair stops), since what went
//! out on it would land after a hole that the check had not found yet.
//!
//! A stream is found behind only by two looks a second apart (a server that has just
//! restarted may answer before it has loaded its streams).
//! A partition found behind is not published any more (its later events would land before
//! the lost ones), and the store records it ([`RelayLag::lost`](crate::RelayLag::lost),
//! `edupulse status`). When asked (`edupulse republish --lost`,
//! [`EventStore::request_republish_lost`](crate::EventStore::request_republish_lost)) or on
//! its own ([`RelayConfig::republish_lost`](crate::RelayConfig::republish_lost)), the relay
//! reads which of the partition's events the stream still holds (an ordered consumer,
//! headers only), and resends, in log order, every event of the partition up to its
//! checkpoint that comes after the oldest one the stream holds and is not held: what the
//! stream lost, and nothing it expired by its own limits. Then the partition flows again.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::broker::{PublishReceipt, Publisher};
use crate::delivery::message;
use crate::event::subject::filter_matches;
use crate::event::wire::OutgoingMessage;
use crate::store::backend::Lease;
use crate::store::log::{LogRow, MarkRow, Page};
use crate::store::{StreamMark, StreamPosition};
use crate::{BrokerErrorKind, EventError};

/// What one (partition, stream) was acknowledged, and whether the stream lost some of it.
#[derive(Debug, Clone, Default)]
struct Mark {
    acknowledged: u64,
    /// The event stored at `acknowledged`.
    event_id: Option<Uuid>,
    /// `acknowledged` when the batch in flight started: a new message of the batch is
    /// stored above it unless the stream went back (within a batch, an aggregate's next
    /// message goes after the others' first ones, so sequences do not follow the log).
    floor: u64,
    saved: u64,
    /// The stream's last sequence when it was found behind.
    behind: Option<u64>,
    /// When it was found behind.
    found_at: Option<Instant>,

    /// Behind as last recorded in the store.
    recorded_behind: Option<u64>,
    repair_requested: bool,
}

/// The marks of the partitions a relay holds.
#[derive(Debug, Default)]
pub(crate) struct StreamWatch {
    marks: HashMap<(i32, Arc<str>), Mark>,
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

/// How long after a stream looked behind it is looked at again.
const SECOND_LOOK: Duration = Duration::from_secs(1);

/// How long a loss must last before it is repaired. A replicated stream that has just
/// restarted, or changed leader, may show less than it holds for a while, and a repair on
/// that view would store again what comes back: within this time, a stream that holds the
/// marks again clears them.
const LOSS_SETTLE: Duration = Duration::from_secs(5);

/// How often streams that lost messages are looked at again (healed, or asked to repair).
const RECHECK_BEHIND: Duration = Duration::from_secs(2);

impl StreamWatch {
    /// Adds the marks of partitions just taken, and asks for a check.
    pub(crate) fn load(&mut self, marks: Vec<StreamMark>) {
        for m in marks {
            let acknowledged = u64::try_from(m.acknowledged).unwrap_or(0);
            let behind =
                m.behind_since.map(|_| m.held_sequence.and_then(|h| u64::try_from(h).ok()).unwrap_or(0));
            let mark = Mark {
                acknowledged,
                event_id: m.event_id,
                floor: acknowledged,
                saved: acknowledged,
                behind,
                // As long ago as the store says (a relay that found it may have died right
                // after: the loss still has to last).
                found_at: m.behind_since.map(|since| {
                    let age = (chrono::Utc::now() - since).to_std().unwrap_or_default();
                    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
                }),
                recorded_behind: behind,
                repair_requested: m.repair_requested,
            };
            self.marks.insert((m.partition, Arc::from(m.stream.as_str())), mark);
        }
        self.last_check = None;
    }

    /// Forgets every mark (the partitions were let go).
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// Whether a check is due: never checked, a new connection, or the interval passed.
    pub(crate) fn due(&self, epoch: u64, interval: Duration) -> bool {
        let interval = if self.marks.values().any(|m| m.behind.is_some()) {
            interval.min(RECHECK_BEHIND)
        } else {
            interval
        };
        let wanted = self.epoch != Some(epoch) || self.last_check.is_none_or(|at| at.elapsed() >= interval);
        wanted && self.last_failure.is_none_or(|at| at.elapsed() >= RETRY_CHECK)
    }

    /// Whether the streams were checked on this connection to the broker: until they are
    /// (the broker restarted, maybe without what it acknowledged, and does not answer yet),
    /// nothing is published, or it could land after a hole.
    pub(crate) fn verified(&self, epoch: u64) -> bool {
        self.epoch == Some(epoch)
    }

    /// Partitions not to publish: a stream of theirs lost messages.
    pub(crate) fn behind(&self) -> HashSet<i32> {
        self.marks.iter().filter(|(_, m)| m.behind.is_some()).map(|((p, _), _)| *p).collect()
    }

    /// A batch is about to be sent: its new messages must be stored above the marks.
    pub(crate) fn batch_starts(&mut self) {
        for mark in self.marks.values_mut() {
            mark.floor = mark.acknowledged;
        }
    }

    /// Records an acknowledgement for an event of `partition`. A new message stored at or
    /// below the mark the batch started from means the stream went back: the partition is
    /// behind.
    pub(crate) fn acknowledged(&mut self, partition: i32, event_id: Uuid, receipt: &PublishReceipt) {
        let Some(stream) = &receipt.stream else { return };
        let key = (partition, stream.clone());
        let mark = self.marks.entry(key).or_default();
        if !receipt.duplicate && receipt.stream_sequence <= mark.floor && mark.behind.is_none() {
            tracing::error!(
                partition,
                stream = &**stream,
                acknowledged = mark.floor,
                stored_at = receipt.stream_sequence,
                "relay: the stream went back: it stored a new message at or below a sequence it had \
                 acknowledged; the partition is held until what it lost is sent again \
                 (`edupulse republish --lost`)"
            );
            mark.behind = Some(receipt.stream_sequence.saturating_sub(1));
            mark.found_at = Some(Instant::now());
        }
        if receipt.stream_sequence > mark.acknowledged {
            mark.acknowledged = receipt.stream_sequence;
            mark.event_id = Some(event_id);
        }
    }

    /// The marks whose acknowledged sequence moved since they were saved:
    /// `(partition, stream, sequence, event id)`.
    pub(crate) fn unsaved(&self) -> Vec<(i32, Arc<str>, i64, Option<Uuid>)> {
        self.marks
            .iter()
            .filter(|(_, m)| m.acknowledged != m.saved)
            .map(|((p, s), m)| (*p, s.clone(), i64::try_from(m.acknowledged).unwrap_or(i64::MAX), m.event_id))
            .collect()
    }

    /// Records that `unsaved` marks were saved.
    pub(crate) fn saved(&mut self, saved: &[(i32, Arc<str>, i64, Option<Uuid>)]) {
        for (p, s, sequence, _) in saved {
            if let Some(mark) = self.marks.get_mut(&(*p, s.clone())) {
                mark.saved = u64::try_from(*sequence).unwrap_or(0);
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
    /// did not answer or does not know the stream (deleted, or a server that restarted and
    /// has not loaded it yet: asked again later). A mark is lost when the stream's last
    /// sequence is below it, or when the stream, still holding that sequence, holds another
    /// message there or none (restored from an older copy, or made again, and newer messages
    /// took it past the mark).
    async fn lost_on(&self, publisher: &dyn Publisher, stream: &Arc<str>) -> Option<Look> {
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
        let mut look = Look { last: state.last_sequence, window: state.duplicate_window, ..Look::default() };
        for (key, mark) in &self.marks {
            if key.1 != *stream || mark.acknowledged == 0 {
                continue;
            }
            let behind = mark.behind.is_some();
            if mark.acknowledged > state.last_sequence {
                if !behind {
                    look.lost.push(key.clone());
                }
                continue;
            }
            // Below the stream's first sequence, the message may have expired by the
            // stream's own limits: nothing to compare.
            let (Some(event_id), true) = (mark.event_id, mark.acknowledged >= state.first_sequence) else {
                continue;
            };
            match publisher.event_at(stream, mark.acknowledged).await {
                Ok(at) if at == Some(event_id) => {
                    if behind {
                        look.healed.push(key.clone());
                    }
                }
                Ok(_) if !behind => look.lost.push(key.clone()),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(stream = &**stream, error = %e, "relay: cannot check the stream; later");
                    return None;
                }
            }
        }
        Some(look)
    }

    /// Compares each stream's last sequence with the marks; records partitions found
    /// behind in the store. Broker failures leave the check due.
    pub(crate) async fn check(
        &mut self,
        publisher: &dyn Publisher,
        lease: &mut Lease,
        partitions: &[i32],
    ) -> Result<(), EventError> {
        let epoch = publisher.connection_epoch();
        for stream in self.streams() {
            // Two looks a second apart: a server that has just restarted may answer before
            // it has loaded its streams.
            let mut found = self.lost_on(publisher, &stream).await;
            if found.as_ref().is_some_and(|look| !look.lost.is_empty()) {
                tokio::time::sleep(SECOND_LOOK).await;
                found = self.lost_on(publisher, &stream).await;
            }
            let Some(Look { last, lost, healed, window }) = found else {
                self.last_failure = Some(Instant::now());
                return Ok(());
            };
            if let Some(window) = window {
                self.windows.insert(stream.clone(), window);
            }
            for key in healed {
                let Some(mark) = self.marks.get_mut(&key) else { continue };
                tracing::warn!(
                    partition = key.0,
                    stream = &*stream,
                    acknowledged = mark.acknowledged,
                    "relay: the stream holds again what it acknowledged (a replicated stream catching \
                     up after a restart); the partition is published again"
                );
                mark.behind = None;
                mark.found_at = None;
            }
            for key in lost {
                let Some(mark) = self.marks.get_mut(&key) else { continue };
                tracing::error!(
                    partition = key.0,
                    stream = &*stream,
                    acknowledged = mark.acknowledged,
                    held = last,
                    "relay: the stream lost messages it acknowledged (deleted, restored from an older copy, \
                     or a server that lost power before syncing); the partition is held until they are \
                     sent again (`edupulse republish --lost`)"
                );
                mark.behind = Some(last);
                mark.found_at = Some(Instant::now());
            }
        }
        // Record what changed, and read back whether an operator asked for a repair.
        for ((partition, stream), mark) in &mut self.marks {
            if mark.behind != mark.recorded_behind {
                let held = mark.behind.map(|h| i64::try_from(h).unwrap_or(i64::MAX));
                lease.mark_behind(*partition, stream, held).await?;
                mark.recorded_behind = mark.behind;
            }
        }
        if self.marks.values().any(|m| m.behind.is_some()) {
            for m in lease.marks(partitions).await? {
                if let Some(mark) = self.marks.get_mut(&(m.partition, Arc::from(m.stream.as_str()))) {
                    mark.repair_requested = m.repair_requested;
                }
            }
        }
        self.epoch = Some(epoch);
        self.last_check = Some(Instant::now());
        self.last_failure = None;
        Ok(())
    }

    /// The (partition, stream) pairs to repair now: behind, and asked to (or `always`).
    pub(crate) fn to_repair(&self, always: bool) -> Vec<(i32, Arc<str>)> {
        let mut pairs: Vec<(i32, Arc<str>)> = self
            .marks
            .iter()
            .filter(|(_, m)| m.behind.is_some() && (always || m.repair_requested))
            .filter(|(_, m)| m.found_at.is_none_or(|at| at.elapsed() >= LOSS_SETTLE))
            .map(|((p, s), _)| (*p, s.clone()))
            .collect();
        pairs.sort();
        pairs
    }

    /// After a repair of `partition` on `stream`: the stream holds everything again, up to
    /// `acknowledged`.
    pub(crate) async fn repaired(
        &mut self,
        lease: &mut Lease,
        partition: i32,
        stream: &Arc<str>,
        resent: &Resent,
    ) -> Result<(), EventError> {
        let sequence = i64::try_from(resent.acknowledged).unwrap_or(i64::MAX);
        let row = MarkRow { partition, stream, sequence, event_id: resent.event_id };
        lease.save_marks(&[row]).await?;
        lease.mark_behind(partition, stream, None).await?;
        if let Some(mark) = self.marks.get_mut(&(partition, stream.clone())) {
            let acknowledged = resent.acknowledged;
            *mark = Mark {
                acknowledged,
                event_id: resent.event_id,
                floor: acknowledged,
                saved: acknowledged,
                ..Mark::default()
            };
        }
        Ok(())
    }
}

/// One look at a stream: its last sequence, the marks it lost since the last look, and the
/// marks found lost before that it holds again.
#[derive(Debug, Default)]
struct Look {
    last: u64,
    window: Option<Duration>,
    lost: Vec<(i32, Arc<str>)>,
    healed: Vec<(i32, Arc<str>)>,
}

/// What a repair sent.
pub(crate) struct Resent {
    /// Events sent again (acknowledged).
    pub(crate) events: u64,
    /// The highest stream sequence acknowledged for them (or the stream's last sequence).
    pub(crate) acknowledged: u64,
    /// The event stored there (`None` when nothing was resent).
    pub(crate) event_id: Option<Uuid>,
}

/// The partitions whose stream lost messages, repaired together, as a repair reads them.
pub(crate) struct Loss<'a> {
    /// Each partition with its checkpoint: what was acknowledged.
    pub(crate) partitions: Vec<(i32, StreamPosition)>,
    /// The event ids the stream holds (of these partitions).
    pub(crate) held: &'a HashSet<Uuid>,
    /// The partitions the stream holds at least one event of.
    pub(crate) holding: &'a HashSet<i32>,
    /// The stream's last sequence.
    pub(crate) held_up_to: u64,
    /// The connection to the broker the stream was checked and read on: nothing is sent on
    /// another.
    pub(crate) epoch: u64,
    /// The stream's subject filters: events on other subjects go to other streams.
    pub(crate) subjects: Vec<String>,
    /// Parked aggregates, and the position of their first parked event.
    pub(crate) parked: &'a HashMap<Uuid, i64>,
    /// Set when the relay stops: the repair ends after the batch in progress.
    pub(crate) stop: &'a AtomicBool,
}

/// Where one partition's repair stands as the log is read.
struct Repairing {
    checkpoint: StreamPosition,
    /// The oldest event the stream holds was met: what follows and is not held was lost.
    /// Events before it are older than what the stream keeps (or the stream holds none of
    /// the partition's: then everything is sent).
    started: bool,
    resent: Resent,
}

/// Sends again, for each partition, its events up to its checkpoint, on a subject the
/// stream captures, that come after the oldest one the stream holds and are not held; all
/// of them when it holds none. Parked events were never in the stream and stay parked. One
/// pass over the log for all the partitions, in log order, `batch` (rows, bytes) at a time;
/// an aggregate's events one acknowledgement apart (the [`Publisher`] contract).
///
/// What was resent, per partition; `None` when the relay stopped before the repair was done
/// (its next holder repairs again; what was sent is dropped as duplicates).
///
/// # Errors
/// [`EventError::Database`]; [`EventError::Broker`] when an event is not acknowledged (the
/// repair is tried again at the next check; what was sent is dropped as duplicates).
pub(crate) async fn resend(
    lease: &mut Lease,
    publisher: &dyn Publisher,
    loss: Loss<'_>,
    batch: (i64, usize),
) -> Result<Option<HashMap<i32, Resent>>, EventError> {
    let Loss { partitions, held, holding, held_up_to, epoch, subjects, parked, stop } = loss;
    let filters: Vec<Vec<&str>> = subjects.iter().map(|f| f.split('.').collect()).collect();
    let captured = |subject: &str| filters.iter().any(|f| filter_matches(f, subject));
    let ids: Vec<i32> = partitions.iter().map(|(p, _)| *p).collect();
    let mut repairing: HashMap<i32, Repairing> = partitions
        .iter()
        .map(|&(partition, checkpoint)| {
            let resent = Resent { events: 0, acknowledged: held_up_to, event_id: None };
            (partition, Repairing { checkpoint, started: !holding.contains(&partition), resent })
        })
        .collect();
    let Some(&end) = partitions.iter().map(|(_, checkpoint)| checkpoint).max() else {
        return Ok(Some(HashMap::new()));
    };
    let mut after = StreamPosition::default();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let Page { rows, .. } = lease.page(after, batch.0, batch.1, &ids).await?;
        let Some(last) = rows.last().map(position) else { break };
        after = last;
        let mut messages: Vec<(i32, OutgoingMessage)> = Vec::new();
        for LogRow { partition, subject, row } in rows {
            let Some(state) = repairing.get_mut(&partition) else { continue };
            if position_row(&row) > state.checkpoint {
                continue;
            }
            if held.contains(&row.event_id) {
                state.started = true;
                continue;
            }
            let is_parked = parked.get(&row.aggregate_id).is_some_and(|head| *head <= row.global_position);
            if state.started && !is_parked && captured(&subject) {
                messages.push((partition, message::outgoing(row, subject)?));
            }
        }
        if !messages.is_empty() {
            if publisher.connection_epoch() != epoch {
                // The server may have come back without more of what it acknowledged: what
                // it holds is read again at the next check, after which the repair resumes.
                return Err(EventError::broker_message(
                    BrokerErrorKind::Unavailable,
                    "the connection to the broker was made again during the repair",
                ));
            }
            let (owners, outgoing): (Vec<i32>, Vec<OutgoingMessage>) = messages.into_iter().unzip();
            let outcomes = publisher.publish(&outgoing).await;
            for ((partition, message), outcome) in owners.into_iter().zip(&outgoing).zip(outcomes) {
                let receipt = outcome.map_err(|e| {
                    EventError::broker_message(
                        BrokerErrorKind::Other,
                        format!("resending what the stream lost stopped: {e}"),
                    )
                })?;
                let Some(state) = repairing.get_mut(&partition) else { continue };
                let resent = &mut state.resent;
                resent.events += 1;
                if receipt.stream_sequence > resent.acknowledged || resent.event_id.is_none() {
                    resent.acknowledged = resent.acknowledged.max(receipt.stream_sequence);
                    resent.event_id = Some(message.event_id);
                }
            }
        }
        if last >= end {
            break;
        }
    }
    Ok(Some(repairing.into_iter().map(|(partition, state)| (partition, state.resent)).collect()))
}

fn position(row: &LogRow) -> StreamPosition {
    position_row(&row.row)
}

fn position_row(row: &crate::store::row::StoredRow) -> StreamPosition {
    StreamPosition { transaction_id: row.transaction_id, global_position: row.global_position }
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
            watch.acknowledged(7, Uuid::nil(), &receipt(sequence, false));
        }
        assert!(watch.behind().is_empty());
        watch.batch_starts();
        // A re-send the stream still had keeps its old sequence: not a step back.
        watch.acknowledged(7, Uuid::nil(), &receipt(2, true));
        watch.acknowledged(7, Uuid::nil(), &receipt(4, false));
        assert!(watch.behind().is_empty());
        assert_eq!(watch.unsaved(), vec![(7, Arc::from("S"), 4, Some(Uuid::nil()))]);
        // A new message stored at or below what the last batch ended at: the stream went back.
        watch.batch_starts();
        watch.acknowledged(7, Uuid::nil(), &receipt(3, false));
        assert_eq!(watch.behind(), HashSet::from([7]));
        assert!(watch.to_repair(true).is_empty(), "not repaired before the loss has lasted");
        for mark in watch.marks.values_mut() {
            mark.found_at = Instant::now().checked_sub(LOSS_SETTLE);
        }
        assert_eq!(watch.to_repair(true), vec![(7, Arc::from("S"))]);
        assert!(watch.to_repair(false).is_empty(), "only when asked, by default");
    }
}
