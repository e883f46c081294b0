//! What a relay does with the partitions it holds: the effects around its ledger. A pass
//! checks the streams when due, reads a page of the log, asks the ledger what to do with each
//! row, publishes the rows to send as one batch, tells the ledger each outcome, moves and
//! saves the checkpoints; then the next page.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};
use tracing::Instrument;
use uuid::Uuid;

use crate::broker::PublishReceipt;
use crate::delivery::message;
use crate::delivery::relay::ledger::{Disposition, Entry, Failures, Ledger, Outcome, Save, Settlement, park};
use crate::delivery::relay::parts::Parts;
use crate::delivery::relay::pass::RelayPass;
use crate::delivery::watch::{Aged, Holder, StreamWatch, check_and_repair};
use crate::event::wire::{OutgoingMessage, headers};
use crate::store::backend::Lease;
use crate::store::log::{LogRow, MarkRow, Page, ParkedRow};
use crate::store::row::StoredRow;
use crate::store::{GlobalPosition, Partition, StreamPosition};
use crate::{BrokerErrorKind, EventError, telemetry};

/// A lease, the partitions it locked and what the relay knows of them.
pub(super) struct Holding {
    lease: Lease,
    pub(super) ledger: Ledger,
    streams: StreamWatch,
    aged: Aged,
}

/// A row to send: its entry, and when it was recorded (the publish latency).
type Sent = (Entry, DateTime<Utc>);

impl Holding {
    pub(super) fn new(lease: Lease, ledger: Ledger) -> Self {
        Self { lease, ledger, streams: StreamWatch::default(), aged: Aged::default() }
    }

    /// Locks those of `wanted` no other relay holds, with their checkpoints, parked
    /// aggregates and stream marks.
    pub(super) async fn take(&mut self, relay: &Parts, wanted: &[Partition]) -> Result<(), EventError> {
        let taken = self.lease.lock(wanted).await?;
        if taken.is_empty() {
            return Ok(());
        }
        let checkpoints = self.lease.checkpoints(&taken).await?;
        self.ledger.add_parked(self.lease.parked_heads(&taken).await?);
        self.streams.load(self.lease.marks(&taken).await?);
        relay.store.inner.signals.advance(&checkpoints, false);
        for (partition, checkpoint) in checkpoints {
            self.ledger.take(partition, checkpoint);
        }
        tracing::info!(partitions = ?taken, "relay: partitions taken");
        Ok(())
    }

    /// Saves what moved, closes the lease; returns the failed events' attempts.
    pub(super) async fn release(mut self) -> Failures {
        if let Err(e) = self.flush().await {
            tracing::debug!(error = %e, "relay: last checkpoints not saved; the next holder re-reads from older ones");
        }
        self.lease.close().await;
        self.ledger.into_failures()
    }

    /// Publishes the held partitions' events below the horizon, page by page.
    pub(super) async fn drain(&mut self, relay: &Parts, stop: &AtomicBool) -> Result<RelayPass, EventError> {
        let config = &relay.config;
        let mut pass =
            RelayPass { partitions: u32::try_from(self.ledger.len()).unwrap_or(0), ..RelayPass::default() };
        self.ledger.begin_pass();
        let limit = i64::from(config.batch_size);
        let mut after: Option<StreamPosition> = None;
        let mut requeued = self.ledger.parked().is_empty();
        loop {
            pass.more = false;
            if !self.checked(relay, stop).await? {
                // Not checked on this connection yet (the broker does not answer): wait.
                pass.waiting += 1;
                break;
            }
            let active = self.ledger.active();
            if !std::mem::replace(&mut requeued, true) {
                // Once per pass, before the pages, and only once the streams were checked.
                self.republish_requeued(relay, &active, &mut pass).await?;
            }
            let Some(from) = after.or_else(|| self.ledger.start()) else { break };
            let Page { rows, cut } = self.lease.page(from, limit, config.max_batch_bytes, &active).await?;
            let Some(end) = rows.last().map(|r| position_of(&r.row)) else { break };
            if !self.aged.look_up(&self.streams, &*relay.publisher, &rows, stop).await {
                // The broker does not answer what it holds: the page waits.
                pass.waiting += 1;
                break;
            }
            let more = cut || i64::try_from(rows.len()).unwrap_or(i64::MAX) >= limit;
            let before = pass;
            let parked = self.publish_page(relay, rows, from, &mut pass).await;
            telemetry::relayed(
                pass.published - before.published,
                pass.failed - before.failed,
                pass.parked - before.parked,
            );
            self.settle(relay, end, parked).await?;
            after = Some(end);
            pass.more = more;
            // Nothing went out while something failed or waits for its retry: the broker is
            // likely in trouble, so the next pages wait for the next pass.
            let nothing_acked = pass.published == before.published
                && (pass.failed > before.failed || pass.waiting > before.waiting);
            if !more || nothing_acked || stop.load(Ordering::Relaxed) {
                break;
            }
        }
        Ok(pass)
    }

    /// Checks the streams when due (after a reconnection, when partitions were taken, every
    /// so often) and repairs what is to be; `false` while they are not checked on the
    /// connection as it is now. Partitions whose stream lost messages are left out of the
    /// pass: nothing newer goes out before the lost ones are sent again.
    async fn checked(&mut self, relay: &Parts, stop: &AtomicBool) -> Result<bool, EventError> {
        let publisher = &*relay.publisher;
        let epoch = publisher.connection_epoch();
        if self.streams.due(epoch, relay.config.stream_check_interval) {
            let holder = Holder {
                checkpoints: self.ledger.checkpoints(),
                parked: self.ledger.parked(),
                always: relay.config.republish_lost,
                batch: (i64::from(relay.config.batch_size), relay.config.max_batch_bytes),
                stop,
            };
            check_and_repair(&mut self.streams, publisher, &mut self.lease, holder).await?;
        }
        if !self.streams.verified(epoch) {
            return Ok(false);
        }
        for partition in self.streams.lost() {
            self.ledger.lost(partition);
        }
        Ok(true)
    }

    /// Publishes one page; returns the events it parked.
    async fn publish_page(
        &mut self,
        relay: &Parts,
        rows: Vec<LogRow>,
        start: StreamPosition,
        pass: &mut RelayPass,
    ) -> Vec<ParkedRow> {
        let mut parked = Vec::new();
        let (sent, messages) = self.messages_of(relay, rows, start, pass, &mut parked);
        if messages.is_empty() {
            return parked;
        }
        let epoch = relay.publisher.connection_epoch();
        if !self.streams.verified(epoch) {
            // The connection to the broker was made again while the page was read: the
            // server may have come back without what it acknowledged, and these would land
            // after the hole. They wait for the check, as when the broker is down.
            tracing::info!(
                events = sent.len(),
                "relay: the connection to the broker was made again since its streams were checked; \
                 the page waits for the next check"
            );
            for (entry, _) in &sent {
                self.ledger.hold_back(entry);
            }
            pass.waiting += u64::try_from(sent.len()).unwrap_or(u64::MAX);
            return parked;
        }
        self.streams.batch_starts();
        // On the connection the streams were checked on, or not at all.
        let outcomes = relay.publisher.publish_on(&messages, epoch).instrument(batch_span(&messages)).await;
        // One clock reading for the batch: its acknowledgements came back together.
        let acked_at = Utc::now();
        let missing =
            || Err(EventError::broker_message(BrokerErrorKind::Other, "the publisher returned no outcome"));
        let outcomes = outcomes.into_iter().chain(std::iter::repeat_with(missing));
        for ((entry, recorded_at), outcome) in sent.into_iter().zip(outcomes) {
            if self.record(relay, &entry, &outcome, pass, &mut parked) {
                telemetry::publish_latency((acked_at - recorded_at).as_seconds_f64());
            }
        }
        parked
    }

    /// The page's rows to send now, with their messages; the others as the ledger says
    /// (see [`Disposition`]).
    fn messages_of(
        &mut self,
        relay: &Parts,
        rows: Vec<LogRow>,
        start: StreamPosition,
        pass: &mut RelayPass,
        parked: &mut Vec<ParkedRow>,
    ) -> (Vec<Sent>, Vec<OutgoingMessage>) {
        let now = Instant::now();
        let (mut sent, mut messages) = (Vec::new(), Vec::new());
        let mut previous = start;
        for LogRow { partition, subject, row } in rows {
            let entry = Entry {
                partition,
                position: position_of(&row),
                previous,
                aggregate_id: row.aggregate_id,
                event_id: row.event_id,
                sequence: row.sequence,
            };
            previous = entry.position;
            let in_stream = self.aged.in_stream(row.recorded_at, row.event_id);
            match self.ledger.dispose(&entry, in_stream, now) {
                Disposition::Settled
                | Disposition::Acknowledged
                | Disposition::InStream
                | Disposition::WaitsBehind => {}
                Disposition::WaitsForRetry => pass.waiting += 1,
                Disposition::ParkedBehind(head) => {
                    let reason = format!("waits behind parked event at position {head}");
                    parked.push(park(&entry, Some(head), 0, reason));
                    pass.parked += 1;
                }
                Disposition::Send => {
                    let recorded_at = row.recorded_at;
                    match message::outgoing(row, subject) {
                        Ok(message) => {
                            messages.push(message);
                            sent.push((entry, recorded_at));
                        }
                        Err(e) => {
                            // Settled now, so that the aggregate's later events are not sent.
                            let message = format!("cannot be made a message: {e}");
                            let error = EventError::Refused { message, source: Some(Box::new(e)) };
                            self.record(relay, &entry, &Err(error), pass, parked);
                        }
                    }
                }
            }
        }
        (sent, messages)
    }

    /// Tells the ledger what became of `entry`, and reports it; `true` when published.
    fn record(
        &mut self,
        relay: &Parts,
        entry: &Entry,
        outcome: &Result<PublishReceipt, EventError>,
        pass: &mut RelayPass,
        parked: &mut Vec<ParkedRow>,
    ) -> bool {
        let said = match outcome {
            Ok(_) => Outcome::Acknowledged,
            Err(e) if e.is_refusal() => Outcome::Refused(e.to_string()),
            Err(_) => Outcome::Failed,
        };
        let position = entry.position.global_position;
        match self.ledger.settle(entry, said, Instant::now(), |tries| relay.config.backoff(tries)) {
            Settlement::Published => {
                if let Ok(receipt) = outcome {
                    self.streams.acknowledged(entry.partition, entry.event_id, receipt);
                }
                pass.published += 1;
                return true;
            }
            Settlement::WaitsBehind => {}
            Settlement::Retry { tries, .. } => {
                if let Err(error) = outcome {
                    tracing::warn!(event_id = %entry.event_id, position, tries, %error, "relay: publish failed, will retry");
                }
                pass.failed += 1;
            }
            Settlement::Parked(row) => {
                tracing::error!(
                    event_id = %entry.event_id,
                    position,
                    attempts = row.attempts,
                    reason = %row.reason,
                    "relay: event refused by the broker, parked; its aggregate's later events wait behind it"
                );
                parked.push(row);
                pass.parked += 1;
            }
        }
        false
    }

    /// Moves the checkpoints past what this page settled and saves them with the parked
    /// events; tells this process's committers.
    async fn settle(
        &mut self,
        relay: &Parts,
        end: StreamPosition,
        parked: Vec<ParkedRow>,
    ) -> Result<(), EventError> {
        let moved = self.ledger.advance(end);
        if moved.is_empty() && parked.is_empty() {
            return Ok(());
        }
        let signals = &relay.store.inner.signals;
        if parked.is_empty() {
            // Acknowledged: tell the committers before the checkpoint is written.
            signals.advance(&moved, false);
        }
        let now = Instant::now();
        if self.ledger.save_now(now, relay.config.checkpoint_interval, !parked.is_empty()) {
            let save = self.ledger.due(now, !parked.is_empty());
            self.save(&save, &parked).await?;
        }
        if !parked.is_empty() {
            // A receipt reports a parked event once it is saved.
            signals.advance(&moved, true);
        }
        Ok(())
    }

    /// Saves every checkpoint that moved since it was last saved.
    pub(super) async fn flush(&mut self) -> Result<(), EventError> {
        let save = self.ledger.unsaved();
        self.save(&save, &[]).await
    }

    /// Writes `save` and `parked` over the lease, with the stream marks that moved.
    async fn save(&mut self, save: &Save, parked: &[ParkedRow]) -> Result<(), EventError> {
        if !save.checkpoints.is_empty() || !parked.is_empty() {
            self.lease.save(&save.checkpoints, parked).await?;
            let marks = self.streams.unsaved();
            let rows: Vec<MarkRow<'_>> = marks
                .iter()
                .map(|(partition, stream, sequence, event_id)| MarkRow {
                    partition: *partition,
                    stream,
                    sequence: sequence.stored(),
                    event_id: *event_id,
                })
                .collect();
            self.lease.save_marks(&rows).await?;
            self.streams.saved(&marks);
        }
        self.ledger.saved(save, Instant::now());
        Ok(())
    }

    /// Publishes the parked events of re-queued aggregates of `partitions` again, each
    /// aggregate in order; an aggregate all of whose parked events went out flows again.
    async fn republish_requeued(
        &mut self,
        relay: &Parts,
        partitions: &[Partition],
        pass: &mut RelayPass,
    ) -> Result<(), EventError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let rows = self.lease.requeued(partitions).await?;
        if rows.is_empty() {
            return Ok(());
        }
        // Refused again, with the position and the reason; or failed otherwise (retried).
        let (metas, messages, mut refused) = requeued_messages(rows);
        let epoch = relay.publisher.connection_epoch();
        if !self.streams.verified(epoch) {
            // Made again since the streams were checked: the next pass, once they are.
            return Ok(());
        }
        let outcomes = relay.publisher.publish_on(&messages, epoch).await;
        let (mut acked, mut failed) = (Vec::new(), HashSet::new());
        for ((aggregate_id, position), outcome) in metas.into_iter().zip(outcomes) {
            if failed.contains(&aggregate_id) || refused.contains_key(&aggregate_id) {
                continue;
            }
            match outcome {
                Ok(_) => acked.push(position),
                Err(EventError::Refused { message, .. }) => {
                    refused.insert(aggregate_id, (position, message));
                }
                Err(e) => {
                    tracing::warn!(error = %e, %position, "relay: re-queued event not published, will retry");
                    failed.insert(aggregate_id);
                }
            }
        }
        pass.published += u64::try_from(acked.len()).unwrap_or(0);
        self.lease.unpark(&acked).await?;
        for (aggregate_id, (position, reason)) in &refused {
            self.lease.refused_again(*aggregate_id, *position, reason).await?;
        }
        let held = self.ledger.partitions();
        self.ledger.set_parked(self.lease.parked_heads(&held).await?);
        Ok(())
    }
}

/// Re-queued aggregates refused again: the position and the reason.
type Refused = HashMap<Uuid, (GlobalPosition, String)>;

/// The messages of re-queued rows, with their aggregates and positions; an aggregate whose
/// event cannot be made a message sends nothing (refused, with the position and reason).
fn requeued_messages(rows: Vec<LogRow>) -> (Vec<(Uuid, GlobalPosition)>, Vec<OutgoingMessage>, Refused) {
    let (mut metas, mut messages) = (Vec::with_capacity(rows.len()), Vec::with_capacity(rows.len()));
    let mut refused: Refused = HashMap::new();
    for LogRow { subject, row, .. } in rows {
        let (aggregate_id, position) = (row.aggregate_id, GlobalPosition::new(row.global_position));
        if refused.contains_key(&aggregate_id) {
            continue;
        }
        match message::outgoing(row, subject) {
            Ok(message) => {
                metas.push((aggregate_id, position));
                messages.push(message);
            }
            Err(e) => {
                refused.insert(aggregate_id, (position, format!("cannot be made a message: {e}")));
            }
        }
    }
    // An aggregate refused before sending anything keeps its later events back.
    let (metas, messages) =
        metas.into_iter().zip(messages).filter(|((a, _), _)| !refused.contains_key(a)).unzip();
    (metas, messages, refused)
}

/// The span of one batch sent to the broker: `edupulse.publish_batch`, its size, positions
/// and the `traceparent` of its first event that carries one.
fn batch_span(messages: &[OutgoingMessage]) -> tracing::Span {
    let traceparent = messages.iter().find_map(|m| {
        m.headers.iter().find(|(name, _)| *name == headers::TRACEPARENT).map(|(_, v)| v.as_str())
    });
    tracing::info_span!(
        "edupulse.publish_batch",
        events = messages.len(),
        first_position = messages.first().map(|m| m.global_position),
        last_position = messages.last().map(|m| m.global_position),
        traceparent,
    )
}

fn position_of(row: &StoredRow) -> StreamPosition {
    StreamPosition { transaction_id: row.transaction_id, global_position: row.global_position }
}
