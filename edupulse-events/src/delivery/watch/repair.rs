//! Sending again what a stream lost: after a check (`StreamWatch::check`), the partitions
//! held for a loss that are to be repaired (asked for, or all with
//! [`RelayConfig::republish_lost`](crate::RelayConfig::republish_lost)) are repaired, one
//! read of each stream and one pass over the log for all the partitions repaired on it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use uuid::Uuid;

use crate::broker::Publisher;
use crate::delivery::message;
use crate::delivery::watch::marks::StreamWatch;
use crate::delivery::watch::read::{Held, Reading, read_stream};
use crate::delivery::watch::sequence::StreamSequence;
use crate::event::subject::filter_matches;
use crate::event::wire::OutgoingMessage;
use crate::store::backend::Lease;
use crate::store::log::{LogRow, Page};
use crate::store::row::StoredRow;
use crate::store::{GlobalPosition, Partition, StreamPosition};
use crate::{BrokerErrorKind, EventError};

/// What a check and its repairs need of the relay.
pub(crate) struct Holder<'a> {
    /// The partitions held, with their checkpoints: what was acknowledged.
    pub(crate) checkpoints: Vec<(Partition, StreamPosition)>,
    /// Parked aggregates, and the position of their first parked event.
    pub(crate) parked: &'a HashMap<Uuid, GlobalPosition>,
    /// Repair without being asked.
    pub(crate) always: bool,
    /// Rows and bytes per page of the log.
    pub(crate) batch: (i64, usize),
    /// Set when the relay stops: a repair ends after the batch in progress.
    pub(crate) stop: &'a AtomicBool,
}

/// Checks the held partitions' streams; repairs those to repair.
pub(crate) async fn check_and_repair(
    watch: &mut StreamWatch,
    publisher: &dyn Publisher,
    lease: &mut Lease,
    holder: Holder<'_>,
) -> Result<(), EventError> {
    let partitions: Vec<Partition> = holder.checkpoints.iter().map(|(p, _)| *p).collect();
    watch.check(publisher, lease, &partitions).await?;
    let mut by_stream: HashMap<Arc<str>, Vec<Partition>> = HashMap::new();
    for (partition, stream) in watch.to_repair(holder.always) {
        by_stream.entry(stream).or_default().push(partition);
    }
    for (stream, partitions) in by_stream {
        if holder.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // What is sent again goes out on the connection the streams were checked and read
        // on, or not at all (see `resend`).
        let epoch = publisher.connection_epoch();
        if !watch.verified(epoch) {
            return Ok(());
        }
        repair_stream(watch, publisher, lease, &holder, &stream, &partitions, epoch).await?;
    }
    Ok(())
}

/// Repairs `partitions` on `stream`, read on connection `epoch`: one read of the stream and
/// one pass over the log for all of them.
async fn repair_stream(
    watch: &mut StreamWatch,
    publisher: &dyn Publisher,
    lease: &mut Lease,
    holder: &Holder<'_>,
    stream: &Arc<str>,
    partitions: &[Partition],
    epoch: u64,
) -> Result<(), EventError> {
    let Reading::Holds(held) = read_stream(publisher, stream, partitions, None, holder.stop).await else {
        return Ok(());
    };
    let partitions: Vec<(Partition, StreamPosition)> =
        holder.checkpoints.iter().copied().filter(|(p, _)| partitions.contains(p)).collect();
    if partitions.is_empty() {
        return Ok(());
    }
    let loss = Loss { partitions, held: &held, epoch, parked: holder.parked, stop: holder.stop };
    match resend(lease, publisher, loss, holder.batch).await {
        Ok(None) => {
            tracing::info!(stream = &**stream, "relay: stopping; the repair is finished by the next holder");
        }
        Ok(Some(resent)) => {
            let mut repaired: Vec<(Partition, Resent)> = resent.into_iter().collect();
            repaired.sort_by_key(|(partition, _)| *partition);
            for (partition, resent) in repaired {
                tracing::warn!(
                    %partition,
                    stream = &**stream,
                    resent = resent.events,
                    still_held = held.events.len(),
                    "relay: sent again what the stream lost; the partition is published again"
                );
                watch.repaired(lease, partition, stream, resent.acknowledged, resent.event_id).await?;
            }
        }
        Err(EventError::Database(e)) => return Err(EventError::Database(e)),
        Err(e) => {
            tracing::warn!(stream = &**stream, error = %e, "relay: repair failed; retried at the next check");
        }
    }
    Ok(())
}

/// What a repair sent.
struct Resent {
    /// Events sent again (acknowledged).
    events: u64,
    /// The highest stream sequence acknowledged for them (or the stream's last sequence).
    acknowledged: StreamSequence,
    /// The event stored there (`None` when nothing was resent).
    event_id: Option<Uuid>,
}

/// The partitions whose stream lost messages, repaired together, as a repair reads them.
struct Loss<'a> {
    /// Each partition with its checkpoint: what was acknowledged.
    partitions: Vec<(Partition, StreamPosition)>,
    /// What the stream holds of them.
    held: &'a Held,
    /// The connection to the broker the stream was checked and read on: nothing is sent on
    /// another.
    epoch: u64,
    /// Parked aggregates, and the position of their first parked event.
    parked: &'a HashMap<Uuid, GlobalPosition>,
    /// Set when the relay stops: the repair ends after the batch in progress.
    stop: &'a AtomicBool,
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
async fn resend(
    lease: &mut Lease,
    publisher: &dyn Publisher,
    loss: Loss<'_>,
    batch: (i64, usize),
) -> Result<Option<HashMap<Partition, Resent>>, EventError> {
    let Loss { partitions, held, epoch, parked, stop } = loss;
    let filters: Vec<Vec<&str>> = held.subjects.iter().map(|f| f.split('.').collect()).collect();
    let captured = |subject: &str| filters.iter().any(|f| filter_matches(f, subject));
    let ids: Vec<Partition> = partitions.iter().map(|(p, _)| *p).collect();
    let mut repairing: HashMap<Partition, Repairing> = partitions
        .iter()
        .map(|&(partition, checkpoint)| {
            let resent = Resent { events: 0, acknowledged: held.last, event_id: None };
            (partition, Repairing { checkpoint, started: !held.partitions.contains(&partition), resent })
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
        let messages = lost_in(rows, &mut repairing, held, parked, &captured)?;
        send_again(publisher, epoch, messages, &mut repairing).await?;
        if last >= end {
            break;
        }
    }
    Ok(Some(repairing.into_iter().map(|(partition, state)| (partition, state.resent)).collect()))
}

/// The rows of a page that the stream lost, with their partitions: up to their partition's
/// checkpoint, after the oldest event the stream holds, not held, not parked, and on a
/// subject the stream captures.
fn lost_in(
    rows: Vec<LogRow>,
    repairing: &mut HashMap<Partition, Repairing>,
    held: &Held,
    parked: &HashMap<Uuid, GlobalPosition>,
    captured: &dyn Fn(&str) -> bool,
) -> Result<Vec<(Partition, OutgoingMessage)>, EventError> {
    let mut messages = Vec::new();
    for LogRow { partition, subject, row } in rows {
        let Some(state) = repairing.get_mut(&partition) else { continue };
        if position_row(&row) > state.checkpoint {
            continue;
        }
        if held.events.contains(&row.event_id) {
            state.started = true;
            continue;
        }
        let is_parked = parked
            .get(&row.aggregate_id)
            .is_some_and(|head| *head <= GlobalPosition::new(row.global_position));
        if state.started && !is_parked && captured(&subject) {
            messages.push((partition, message::outgoing(row, subject)?));
        }
    }
    Ok(messages)
}

/// Sends `messages` again on connection `epoch` (or not at all), and notes what each
/// partition's stream acknowledged.
async fn send_again(
    publisher: &dyn Publisher,
    epoch: u64,
    messages: Vec<(Partition, OutgoingMessage)>,
    repairing: &mut HashMap<Partition, Repairing>,
) -> Result<(), EventError> {
    if messages.is_empty() {
        return Ok(());
    }
    if publisher.connection_epoch() != epoch {
        // The server may have come back without more of what it acknowledged: what it holds
        // is read again at the next check, after which the repair resumes.
        return Err(EventError::broker_message(
            BrokerErrorKind::Unavailable,
            "the connection to the broker was made again during the repair",
        ));
    }
    let (owners, outgoing): (Vec<Partition>, Vec<OutgoingMessage>) = messages.into_iter().unzip();
    let outcomes = publisher.publish_on(&outgoing, epoch).await;
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
        let sequence = StreamSequence::new(receipt.stream_sequence);
        if receipt.stream_sequence > 0 && (sequence > resent.acknowledged || resent.event_id.is_none()) {
            resent.acknowledged = resent.acknowledged.max(sequence);
            resent.event_id = Some(message.event_id);
        }
    }
    Ok(())
}

fn position(row: &LogRow) -> StreamPosition {
    position_row(&row.row)
}

fn position_row(row: &StoredRow) -> StreamPosition {
    StreamPosition { transaction_id: row.transaction_id, global_position: row.global_position }
}
