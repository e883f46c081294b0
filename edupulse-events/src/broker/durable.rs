//! The in-process broker's durable consumers: JetStream's delivery rules for a pull consumer
//! with explicit acknowledgement, as a pure type (no I/O, no clock of its own: the caller
//! says when "now" is), so that a [`Subscriber`](crate::Subscriber) behaves the same on both
//! brokers.
//!
//! A consumer delivers the stream's messages matching its filter in order; a delivered
//! message is pending until it is acknowledged or terminated; a pending message is
//! delivered again, before anything new, once it was negatively acknowledged (after the
//! delay asked) or its `ack_wait` passed without a word (a consumer that died); "in
//! progress" restarts that wait. After `max_deliver` deliveries a message is not delivered
//! again (JetStream's rule), and at most `max_ack_pending` messages are pending at once.
//! It lives as long as the broker: a consumer started again under the same name goes on
//! where the last one stopped, within the process.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::event::subject::filter_matches;

/// How a delivered message is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Handled: never delivered again.
    Ack,
    /// Deliver it again, after the delay (at once when `None`).
    Nak(Option<Duration>),
    /// Still being worked on: the `ack_wait` starts again.
    Progress,
    /// Given up on: never delivered again.
    Term,
}

/// The settings of a consumer the broker applies (the others are the subscriber's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DurableSettings {
    /// Filter tokens (`None`: every subject).
    pub(crate) filter: Option<Vec<String>>,
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: i64,
    pub(crate) max_ack_pending: usize,
}

/// Where a consumer stands, as JetStream's consumer info tells it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DurableProgress {
    /// Delivered and not settled.
    pub(crate) pending: usize,
    /// The highest stream sequence delivered.
    pub(crate) delivered: u64,
    /// Every message up to this sequence is settled (or was never for this consumer).
    pub(crate) ack_floor: u64,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    deliveries: i64,
    /// When it may be delivered again.
    again_at: Instant,
}

/// One durable consumer.
#[derive(Debug)]
pub(crate) struct Durable {
    settings: DurableSettings,
    /// The first stream sequence not looked at yet.
    next: u64,
    pending: BTreeMap<u64, Pending>,
}

impl Durable {
    pub(crate) fn new(settings: DurableSettings) -> Self {
        Self { settings, next: 1, pending: BTreeMap::new() }
    }

    /// New settings; the progress is kept (JetStream updates a consumer in place).
    pub(crate) fn configure(&mut self, settings: DurableSettings) {
        self.settings = settings;
    }

    /// Takes up to `count` messages to deliver now: first those due again, in stream
    /// order, then new ones (`subject_of` names the subject of the stream's message at a
    /// sequence, `None` past its end). Each comes with its delivery count, this delivery
    /// included.
    pub(crate) fn take<'s>(
        &mut self,
        now: Instant,
        count: usize,
        subject_of: impl Fn(u64) -> Option<&'s str>,
    ) -> Vec<(u64, i64)> {
        let mut out = Vec::new();
        let max_deliver = self.settings.max_deliver;
        // Done with: delivered as often as allowed, and due again.
        self.pending.retain(|_, p| p.deliveries < max_deliver || p.again_at > now);
        for (&sequence, pending) in &mut self.pending {
            if out.len() >= count {
                return out;
            }
            if pending.again_at <= now {
                pending.deliveries += 1;
                pending.again_at = now + self.settings.ack_wait;
                out.push((sequence, pending.deliveries));
            }
        }
        while out.len() < count && self.pending.len() < self.settings.max_ack_pending {
            let Some(subject) = subject_of(self.next) else { break };
            let sequence = self.next;
            self.next += 1;
            if self.settings.filter.as_ref().is_none_or(|f| filter_matches(f, subject)) {
                self.pending
                    .insert(sequence, Pending { deliveries: 1, again_at: now + self.settings.ack_wait });
                out.push((sequence, 1));
            }
        }
        out
    }

    /// Settles the delivered message at `sequence` (a message not pending is left alone:
    /// a late word about a message delivered again meanwhile, or settled already).
    pub(crate) fn settle(&mut self, sequence: u64, how: Settle, now: Instant) {
        match how {
            Settle::Ack | Settle::Term => {
                self.pending.remove(&sequence);
            }
            Settle::Nak(delay) => {
                if let Some(p) = self.pending.get_mut(&sequence) {
                    p.again_at = now + delay.unwrap_or_default();
                }
            }
            Settle::Progress => {
                if let Some(p) = self.pending.get_mut(&sequence) {
                    p.again_at = now + self.settings.ack_wait;
                }
            }
        }
    }

    /// When the next pending message is due again (`None`: none pending).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.again_at).min()
    }

    pub(crate) fn progress(&self) -> DurableProgress {
        let delivered = self.next - 1;
        DurableProgress {
            pending: self.pending.len(),
            delivered,
            ack_floor: self.pending.keys().next().map_or(delivered, |first| first - 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_deliver: i64, max_ack_pending: usize) -> DurableSettings {
        DurableSettings {
            filter: Some(vec!["courses".into(), ">".into()]),
            ack_wait: Duration::from_secs(30),
            max_deliver,
            max_ack_pending,
        }
    }

    const SUBJECTS: [&str; 5] = ["courses.A", "billing.X", "courses.B", "courses.C", "courses.D"];

    fn subject_of(sequence: u64) -> Option<&'static str> {
        SUBJECTS.get(usize::try_from(sequence).ok()?.checked_sub(1)?).copied()
    }

    #[test]
    fn new_messages_in_order_matching_the_filter_at_most_max_ack_pending() {
        let now = Instant::now();
        let mut d = Durable::new(settings(5, 2));
        assert_eq!(d.take(now, 10, subject_of), [(1, 1), (3, 1)], "billing.X skipped; two pending at most");
        assert_eq!(d.take(now, 10, subject_of), [], "full");
        d.settle(1, Settle::Ack, now);
        assert_eq!(d.take(now, 10, subject_of), [(4, 1)]);
        assert_eq!(d.progress(), DurableProgress { pending: 2, delivered: 4, ack_floor: 2 });
    }

    #[test]
    fn a_nak_a_silence_past_ack_wait_and_progress() {
        let now = Instant::now();
        let mut d = Durable::new(settings(5, 10));
        assert_eq!(d.take(now, 2, subject_of), [(1, 1), (3, 1)]);
        d.settle(3, Settle::Nak(Some(Duration::from_secs(1))), now);
        assert_eq!(d.take(now, 10, subject_of), [(4, 1), (5, 1)], "not due yet: new ones go");
        assert_eq!(
            d.take(now + Duration::from_secs(1), 10, subject_of),
            [(3, 2)],
            "due again, before anything new"
        );
        // 1 was never settled: back after ack_wait; 4 was kept in progress.
        d.settle(4, Settle::Progress, now + Duration::from_secs(20));
        d.settle(5, Settle::Term, now);
        let later = now + Duration::from_secs(30);
        assert_eq!(d.take(later, 10, subject_of), [(1, 2)]);
        assert_eq!(d.next_due(), Some(now + Duration::from_secs(31)), "3, delivered again at 1 s");
    }

    #[test]
    fn never_delivered_past_max_deliver() {
        let now = Instant::now();
        let mut d = Durable::new(settings(2, 10));
        assert_eq!(d.take(now, 1, subject_of), [(1, 1)]);
        d.settle(1, Settle::Nak(None), now);
        assert_eq!(d.take(now, 1, subject_of), [(1, 2)]);
        d.settle(1, Settle::Nak(None), now);
        assert_eq!(d.take(now, 1, subject_of), [(3, 1)], "delivered twice: done with");
        assert_eq!(d.progress().pending, 1);
    }
}
