//! Fast-ingest batches (JetStream's ADR-50, nats-server 2.14 and later): many messages to
//! one stream on one connection, stored as they arrive, with an acknowledgement every few
//! messages instead of one per message.
//!
//! The relay uses them in the "gap: fail" mode: the server stores a batch's messages in the
//! order sent and stops the batch at the first message it does not store (lost on the way,
//! refused, a leader change), so what a batch stored is always its first messages, in
//! order. That is the per-aggregate order the relay promises, for any number of aggregates
//! and any length of their runs, without waiting for one message's acknowledgement before
//! sending the next. Each message keeps its `Nats-Msg-Id`: a message the stream already
//! holds is passed over (not stored again) without stopping the batch.
//!
//! The flow, as nats-server 2.14.6 and 2.15.1 speak it (`scripts/probes/atomic-batches`,
//! FINDINGS.md §4): the batch lives in the reply subjects,
//! `<inbox>.<flow>.fail.<batch sequence>.<operation>.$FI` (operation 0 starts, 1 appends,
//! 2 commits with the last message). The first message's reply is awaited (the server says
//! there whether it takes the batch and how often it acknowledges); the server then answers
//! `{"type":"ack","seq":N,"msgs":M}` when the first `N` are stored, `{"type":"gap",…}` or
//! `{"type":"err",…}` at a message it did not store, and one final acknowledgement,
//! `{"stream":…,"seq":S,"batch":…,"count":C}`: the first `C` messages are stored (or were
//! held already), `S` the stream sequence of the last one the batch stored (0 when it
//! stored none). Messages sent after the batch stopped are answered "batch unknown" (10208).
//! A batch of one message is a plain publish with a plain acknowledgement.
//!
//! The decisions are [`FastBatch`] (no I/O, unit-tested); [`send_fast`] does the sending.
//! Synadia's `jetstream-extra` has a fast publisher for async-nats 0.48, not for the 0.51
//! this crate builds on, so the protocol is spoken here (`batch.rs` says the same of atomic
//! batches).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap};
use futures_util::{FutureExt, StreamExt};
use serde::Deserialize;
use uuid::Uuid;

use crate::broker::PublishReceipt;
use crate::broker::version::server_since;
use crate::event::wire::OutgoingMessage;
use crate::{BrokerErrorKind, EventError};

/// The oldest server with fast-ingest batches.
pub(crate) const SINCE: (u64, u64, u64) = (2, 14, 0);

/// How often the relay asks the server to acknowledge (every this many messages, at most:
/// the server may ask for more often, never less). With two acknowledgements outstanding,
/// up to 1 000 messages are on their way: against 100, the drain of BENCHMARKS.md went from
/// 75–94 % of its raw ceiling to 91–98 % (five runs each, alternating).
const FLOW: u64 = 500;

/// Acknowledgements the relay may be waiting for before it stops sending: ADR-50's advice
/// (while the server stores one group, the next is on its way).
const OUTSTANDING: u64 = 2;

/// JetStream's error code for a message sent to a batch that already stopped.
const BATCH_UNKNOWN: u64 = 10208;

/// JetStream's error code for a stream without fast-ingest batches.
pub(crate) const FAST_DISABLED: u64 = 10205;

/// How the messages of one publish to a stream with fast batches go out, so that every
/// aggregate's last message gets a receipt with its stream sequence (what the relay's marks
/// keep: per partition, the highest sequence acknowledged and the event there; a batch's
/// acknowledgement names one sequence only, and not which message it holds).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct FastPlan {
    /// In the batch: every aggregate's messages but its last, in the order given.
    pub(crate) batch: Vec<usize>,
    /// Aggregates with one message: sent one at a time meanwhile.
    pub(crate) alone: Vec<usize>,
    /// The last message of each aggregate with messages in the batch, and the batch's index
    /// of its message before (the last of it in the batch): sent one at a time once the batch
    /// stored that one, with its acknowledgement of its own.
    pub(crate) tails: Vec<(usize, usize)>,
}

impl FastPlan {
    /// The plan for `runs`: each aggregate's messages (indices into the publish, in order).
    pub(crate) fn of(runs: Vec<Vec<usize>>) -> Self {
        let mut plan = Self::default();
        let mut lasts = Vec::new();
        for run in runs {
            match run.split_last() {
                Some((&last, [])) => plan.alone.push(last),
                Some((&last, before)) => {
                    plan.batch.extend_from_slice(before);
                    lasts.push((last, before[before.len() - 1]));
                }
                None => {}
            }
        }
        plan.batch.sort_unstable();
        plan.alone.sort_unstable();
        // Each tail waits for its message before: its index in the batch.
        plan.tails = lasts
            .into_iter()
            .filter_map(|(last, before)| Some((last, plan.batch.binary_search(&before).ok()?)))
            .collect();
        plan.tails.sort_unstable();
        plan
    }
}

/// The messages a batch stored that no acknowledgement names yet, to send again one at a
/// time: for each aggregate whose tail was not acknowledged, its last message the batch
/// stored (`batch`: index into the publish and outcome).
///
/// The relay's marks must cover every message it counts as acknowledged, and a batch's
/// acknowledgement names one sequence, not which message is there: an aggregate's tail,
/// acknowledged after the batch, names a sequence past all of its messages. Without it, a
/// stream that went back to before them but kept the partition's older mark would not be
/// found out, and the aggregate's next event would land after the hole. Sent again, the
/// message is dropped by the stream (it holds its id), whose answer names its sequence.
pub(crate) fn to_confirm<R>(
    batch: &[(usize, Result<PublishReceipt, EventError>)],
    tails: &[(usize, Result<R, EventError>)],
    aggregate: impl Fn(usize) -> Uuid,
) -> Vec<usize> {
    let uncovered: HashSet<Uuid> =
        tails.iter().filter(|(_, outcome)| outcome.is_err()).map(|(i, _)| aggregate(*i)).collect();
    let mut last: HashMap<Uuid, usize> = HashMap::new();
    for (i, outcome) in batch {
        if outcome.as_ref().is_ok_and(|r| r.stream_sequence == 0) && uncovered.contains(&aggregate(*i)) {
            last.insert(aggregate(*i), *i);
        }
    }
    let mut out: Vec<usize> = last.into_values().collect();
    out.sort_unstable();
    out
}

/// The batch's outcomes once the messages of [`to_confirm`] were sent again
/// (`confirmations`): each gets the receipt that names its sequence; the stored messages
/// of an aggregate whose confirmation failed fail (the relay sends them again).
pub(crate) fn confirmed(
    batch: Vec<(usize, Result<PublishReceipt, EventError>)>,
    confirmations: Vec<(usize, Result<PublishReceipt, EventError>)>,
    aggregate: impl Fn(usize) -> Uuid,
) -> Vec<(usize, Result<PublishReceipt, EventError>)> {
    let failed: HashSet<Uuid> =
        confirmations.iter().filter(|(_, o)| o.is_err()).map(|(i, _)| aggregate(*i)).collect();
    let mut receipts: HashMap<usize, PublishReceipt> =
        confirmations.into_iter().filter_map(|(i, o)| Some((i, o.ok()?))).collect();
    batch
        .into_iter()
        .map(|(i, outcome)| match outcome {
            Ok(_) if failed.contains(&aggregate(i)) => (i, Err(unconfirmed())),
            Ok(receipt) => (i, Ok(receipts.remove(&i).unwrap_or(receipt))),
            outcome => (i, outcome),
        })
        .collect()
}

/// A message a fast batch stored, whose sequence nothing named (see [`to_confirm`]).
fn unconfirmed() -> EventError {
    EventError::broker_message(
        BrokerErrorKind::Other,
        "stored by a fast batch, but no acknowledgement named its sequence: sent again (the stream \
         drops the copy)",
    )
}

/// One reply of the server about a batch, read from its payload and the batch sequence of
/// the reply subject it came on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// The first `stored` messages are stored; acknowledgements come every `every` from now on.
    Flow { stored: u64, every: u64 },
    /// The server did not receive message `at` (a gap): informational, the final
    /// acknowledgement follows.
    Gap { at: u64 },
    /// Message `at` was refused (`code`, `description`); in "gap: fail" the batch stops there.
    Refused { at: u64, code: u64, description: String },
    /// The batch ended: the first `count` messages are stored or were held already; `last`
    /// the sequence of the last one it stored (0: none). `duplicate` is known for a batch
    /// of one message only.
    Final { stream: Arc<str>, last: u64, count: u64, duplicate: bool },
    /// A message sent after the batch had stopped; says nothing new.
    Late,
    /// Something this code cannot read: the batch's fate is left to what is already known.
    Unreadable(String),
}

#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "type")]
    kind: Option<String>,
    stream: Option<String>,
    seq: Option<u64>,
    msgs: Option<u64>,
    count: Option<u64>,
    duplicate: Option<bool>,
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireError {
    err_code: u64,
    description: String,
}

impl Reply {
    /// Reads a reply that came on the reply subject of message `at`.
    pub(crate) fn read(at: u64, payload: &[u8]) -> Self {
        let wire: Wire = match serde_json::from_slice(payload) {
            Ok(wire) => wire,
            Err(e) => {
                return Self::Unreadable(format!(
                    "JetStream answered a batch with something unreadable: {e}"
                ));
            }
        };
        match (wire.kind.as_deref(), wire.error) {
            (Some("ack"), _) => {
                Self::Flow { stored: wire.seq.unwrap_or(0), every: wire.msgs.unwrap_or(1).max(1) }
            }
            (Some("gap"), _) => Self::Gap { at: wire.seq.unwrap_or(at) },
            (Some("err"), Some(e)) => {
                Self::Refused { at: wire.seq.unwrap_or(at), code: e.err_code, description: e.description }
            }
            (Some(other), _) => {
                Self::Unreadable(format!("JetStream sent a batch reply of an unknown type {other:?}"))
            }
            (None, Some(e)) if e.err_code == BATCH_UNKNOWN => Self::Late,
            (None, Some(e)) => Self::Refused { at, code: e.err_code, description: e.description },
            (None, None) => match (wire.stream, wire.seq) {
                (Some(stream), Some(last)) => Self::Final {
                    stream: Arc::from(stream.as_str()),
                    last,
                    count: wire.count.unwrap_or(1),
                    duplicate: wire.duplicate.unwrap_or(false),
                },
                _ => Self::Unreadable("JetStream acknowledged a batch without a stream or sequence".into()),
            },
        }
    }
}

/// One fast-ingest batch of `size` messages, as the replies tell it: what may be sent, and
/// each message's outcome at the end. No I/O.
#[derive(Debug)]
pub(crate) struct FastBatch {
    size: u64,
    /// Messages sent so far.
    sent: u64,
    /// The first `stored` messages are stored (flow acknowledgements).
    stored: u64,
    /// The server's acknowledgement interval.
    every: u64,
    /// The first refusal: the message and why.
    refused: Option<(u64, u64, String)>,
    /// The batch stopped (a refusal or a gap): nothing more is sent.
    stopped: bool,
    end: Option<(Arc<str>, u64, u64, bool)>,
    /// Why the batch's replies could not be trusted, if they could not.
    trouble: Option<String>,
    /// Replies observed.
    answers: u64,
}

/// What the sender does next.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Send the next message.
    Send,
    /// Wait for a reply first.
    Wait,
    /// Everything that will be sent is sent: wait for the final acknowledgement.
    Finish,
    /// The final acknowledgement came (or the batch cannot go on): settle.
    Done,
}

/// What the sender learned when the batch's first reply came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// The batch is open: send the rest.
    Open,
    /// The stream does not take fast batches (nothing was stored): send another way.
    Disabled,
    /// The server stored the first message as a plain message (it does not know fast
    /// batches): its outcome is known, the rest must go another way.
    Plain,
    /// The batch ended at its first message (refused or a batch of one).
    Ended,
}

impl FastBatch {
    pub(crate) fn new(size: usize) -> Self {
        Self {
            size: size as u64,
            sent: 0,
            stored: 0,
            every: FLOW,
            refused: None,
            stopped: false,
            end: None,
            trouble: None,
            answers: 0,
        }
    }

    /// The reply subject's last parts for the next message: `(sequence, operation)`.
    pub(crate) fn next_operation(&self) -> (u64, u8) {
        let sequence = self.sent + 1;
        let operation = match (sequence == 1, sequence == self.size) {
            (_, true) => 2,
            (true, false) => 0,
            (false, false) => 1,
        };
        (sequence, operation)
    }

    /// Records that the next message went out.
    pub(crate) fn sent_one(&mut self) {
        self.sent += 1;
    }

    /// Whether the server answered anything yet.
    pub(crate) fn answered(&self) -> bool {
        self.answers > 0
    }

    /// Records a reply.
    pub(crate) fn observe(&mut self, reply: Reply) {
        self.answers += 1;
        match reply {
            Reply::Flow { stored, every } => {
                self.stored = self.stored.max(stored.min(self.sent));
                self.every = every.min(FLOW);
            }
            Reply::Gap { .. } => self.stopped = true,
            Reply::Refused { at, code, description } => {
                self.stopped = true;
                if self.refused.as_ref().is_none_or(|(first, ..)| at < *first) {
                    self.refused = Some((at, code, description));
                }
            }
            Reply::Final { stream, last, count, duplicate } => {
                self.end = Some((stream, last, count.min(self.sent), duplicate));
            }
            Reply::Late => {}
            Reply::Unreadable(why) => {
                self.trouble.get_or_insert(why);
                self.stopped = true;
            }
        }
    }

    /// How the batch's first reply reads; see [`Start`].
    pub(crate) fn start(&self) -> Start {
        match (&self.end, &self.refused) {
            (_, Some((_, code, _))) if *code == FAST_DISABLED => Start::Disabled,
            (Some(_), _) if self.size == 1 => Start::Ended,
            (Some(_), _) => Start::Plain,
            (None, Some(_)) => Start::Ended,
            (None, None) if self.trouble.is_some() => Start::Ended,
            (None, None) => Start::Open,
        }
    }

    /// What the sender does next.
    pub(crate) fn step(&self) -> Step {
        if self.end.is_some() || self.trouble.is_some() {
            return Step::Done;
        }
        if self.stopped || self.sent == self.size {
            return Step::Finish;
        }
        // The first reply says whether the server takes the batch, and its flow.
        if self.sent == 1 && !self.answered() {
            return Step::Wait;
        }
        if self.sent >= self.stored + self.every * OUTSTANDING {
            return Step::Wait;
        }
        Step::Send
    }

    /// Each message's outcome, in order; `timed_out` when the final acknowledgement never
    /// came (the messages past the acknowledged ones may or may not be stored: the first of
    /// them fails with `timed_out`, and the relay sends them again, de-duplicated).
    ///
    /// The stored ones get a receipt without their stream sequence (0: the batch's final
    /// acknowledgement names one sequence only, and not which message is there), except a
    /// batch of one message, whose acknowledgement is its own.
    pub(crate) fn outcomes(&self, timed_out: Option<EventError>) -> Vec<Result<PublishReceipt, EventError>> {
        let (stream, stored, exact) = match &self.end {
            Some((stream, last, count, duplicate)) => {
                // One message sent: the acknowledgement is its own.
                let exact = (self.sent == 1).then_some((*last, *duplicate));
                (Some(stream.clone()), *count, exact)
            }
            None => (None, self.stored, None),
        };
        let mut failure = Some(match (&self.refused, timed_out) {
            (Some((at, code, description)), _) if *at == stored + 1 => {
                EventError::refused(format!("JetStream refused the message (error {code}): {description}"))
            }
            (_, Some(e)) => e,
            _ => EventError::broker_message(
                BrokerErrorKind::Other,
                self.trouble.clone().unwrap_or_else(|| {
                    "the stream stopped the batch before this message (a gap: lost on the way or a leader change)"
                        .into()
                }),
            ),
        });
        (1..=self.size)
            .map(|k| {
                if k <= stored {
                    let (stream_sequence, duplicate) = exact.unwrap_or((0, false));
                    Ok(PublishReceipt { stream_sequence, duplicate, stream: stream.clone() })
                } else if let Some(e) = failure.take() {
                    Err(e)
                } else {
                    Err(EventError::not_sent())
                }
            })
            .collect()
    }
}

/// Sends `messages` (all to one stream with fast-ingest batches) as one batch, in the
/// "gap: fail" mode; each wait for a reply lasts at most `timeout`; `connected` is asked
/// before each message (nothing goes out on a connection other than the one the caller
/// checked). Returns the batch as its replies left it, and the error that ended the waiting,
/// if one did.
pub(crate) async fn send_fast(
    client: &Client,
    messages: &[&OutgoingMessage],
    headers: impl Fn(&OutgoingMessage) -> Result<HeaderMap, EventError>,
    timeout: Duration,
    connected: impl Fn() -> bool,
) -> (FastBatch, Start, Option<EventError>) {
    let mut batch = FastBatch::new(messages.len());
    if messages.is_empty() {
        return (batch, Start::Ended, None);
    }
    let unavailable = |what: String| EventError::broker_message(BrokerErrorKind::Unavailable, what);
    let inbox = client.new_inbox();
    let mut replies = match client.subscribe(format!("{inbox}.>")).await {
        Ok(replies) => replies,
        Err(e) => {
            return (batch, Start::Ended, Some(unavailable(format!("cannot open the batch's inbox: {e}"))));
        }
    };
    let mut start = None;
    let mut failure = None;
    loop {
        // Replies already here first: a stop or a slower flow changes the next step.
        while let Some(Some(reply)) = replies.next().now_or_never() {
            batch.observe(read_reply(&reply));
        }
        if start.is_none() && batch.answered() {
            let first = batch.start();
            start = Some(first);
            if first != Start::Open {
                break;
            }
        }
        match batch.step() {
            Step::Done => break,
            Step::Send => {
                let message = messages[batch.sent as usize];
                if !connected() {
                    failure = Some(unavailable(
                        "not connected to the NATS server on the connection checked".into(),
                    ));
                    break;
                }
                let map = match headers(message) {
                    Ok(map) => map,
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                };
                let (sequence, operation) = batch.next_operation();
                let reply = format!("{inbox}.{FLOW}.fail.{sequence}.{operation}.$FI");
                if let Err(e) = client
                    .publish_with_reply_and_headers(message.subject.clone(), reply, map, message.body.clone())
                    .await
                {
                    failure = Some(unavailable(format!("message {sequence} of the batch not sent: {e}")));
                    break;
                }
                batch.sent_one();
            }
            Step::Wait | Step::Finish => match tokio::time::timeout(timeout, replies.next()).await {
                Ok(Some(reply)) => batch.observe(read_reply(&reply)),
                Ok(None) => {
                    failure = Some(unavailable("the batch's inbox closed (connection lost)".into()));
                    break;
                }
                Err(_) => {
                    failure = Some(EventError::broker_message(
                        BrokerErrorKind::TimedOut,
                        format!("no answer to the batch for {timeout:?}; is the NATS server up?"),
                    ));
                    break;
                }
            },
        }
    }
    let _ = replies.unsubscribe().await;
    let start = start.unwrap_or(Start::Ended);
    (batch, start, failure)
}

/// A reply, with the batch sequence its subject names.
fn read_reply(message: &async_nats::Message) -> Reply {
    // `<inbox>.<flow>.fail.<sequence>.<operation>.$FI`
    let at = message.subject.as_str().rsplit('.').nth(2).and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply::read(at, &message.payload)
}

/// Whether a server of `version` (`2.14.0`, say) has fast-ingest batches.
pub(crate) fn server_fast(version: &str) -> bool {
    server_since(version, SINCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(size: usize, sent: usize, replies: &[(u64, &str)]) -> FastBatch {
        let mut batch = FastBatch::new(size);
        for _ in 0..sent {
            batch.sent_one();
        }
        for (at, payload) in replies {
            batch.observe(Reply::read(*at, payload.as_bytes()));
        }
        batch
    }

    /// `s` stored (with its sequence, when named), `r` refused, `f` failed otherwise,
    /// `-` not sent.
    fn shape(outcomes: &[Result<PublishReceipt, EventError>]) -> String {
        outcomes
            .iter()
            .map(|o| match o {
                Ok(r) if r.stream_sequence == 0 => "s".to_owned(),
                Ok(r) => format!("s{}{}", r.stream_sequence, if r.duplicate { "d" } else { "" }),
                Err(e) if e.is_refusal() => "r".to_owned(),
                Err(e) if e.broker_kind() == Some(BrokerErrorKind::NotSent) => "-".to_owned(),
                Err(_) => "f".to_owned(),
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    // The replies, verbatim from nats-server 2.15.1 (`scripts/probes/atomic-batches`).
    const FLOW: &str = r#"{"type":"ack","seq":0,"msgs":100}"#;
    const EXPECTED_SEQUENCE: &str = r#"{"type":"err","seq":3,"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 0"}}"#;
    const TOO_LARGE: &str = r#"{"error":{"code":400,"err_code":10054,"description":"message size exceeds maximum allowed"},"stream":"PROBE","seq":0}"#;
    const GAP: &str = r#"{"type":"gap","last_seq":3,"seq":4}"#;
    const UNKNOWN: &str = r#"{"error":{"code":400,"err_code":10208,"description":"batch publish ID unknown"},"stream":"PROBE","seq":0}"#;
    const DISABLED: &str = r#"{"error":{"code":400,"err_code":10205,"description":"batch publish not enabled"},"stream":"PROBE","seq":0}"#;

    #[test]
    fn replies_read_as_the_server_means_them() {
        assert_eq!(Reply::read(1, FLOW.as_bytes()), Reply::Flow { stored: 0, every: 100 });
        assert_eq!(Reply::read(4, GAP.as_bytes()), Reply::Gap { at: 4 });
        assert!(matches!(
            Reply::read(3, EXPECTED_SEQUENCE.as_bytes()),
            Reply::Refused { at: 3, code: 10071, .. }
        ));
        assert!(matches!(Reply::read(3, TOO_LARGE.as_bytes()), Reply::Refused { at: 3, code: 10054, .. }));
        assert_eq!(Reply::read(5, UNKNOWN.as_bytes()), Reply::Late);
        let end = Reply::read(5, br#"{"stream":"PROBE","seq":9,"batch":"x","count":5}"#);
        assert_eq!(end, Reply::Final { stream: Arc::from("PROBE"), last: 9, count: 5, duplicate: false });
        let alone = Reply::read(1, br#"{"stream":"PROBE","seq":12,"duplicate": true,"batch":"x","count":1}"#);
        assert_eq!(alone, Reply::Final { stream: Arc::from("PROBE"), last: 12, count: 1, duplicate: true });
        assert!(matches!(Reply::read(1, b"{"), Reply::Unreadable(_)));
        assert!(matches!(Reply::read(1, br#"{"type":"new"}"#), Reply::Unreadable(_)));
    }

    #[test]
    fn the_first_reply_is_awaited_then_the_flow_sets_how_far_ahead_it_sends() {
        let mut b = FastBatch::new(1_000);
        assert_eq!((b.step(), b.next_operation()), (Step::Send, (1, 0)));
        b.sent_one();
        assert_eq!(b.step(), Step::Wait, "the server says first whether it takes the batch");
        b.observe(Reply::read(1, br#"{"type":"ack","seq":0,"msgs":10}"#));
        assert_eq!((b.start(), b.step(), b.next_operation()), (Start::Open, Step::Send, (2, 1)));
        while b.step() == Step::Send {
            b.sent_one();
        }
        assert_eq!(b.sent, 20, "two acknowledgements outstanding at most");
        b.observe(Reply::read(10, br#"{"type":"ack","seq":10,"msgs":10}"#));
        assert_eq!(b.step(), Step::Send);
        b.observe(Reply::read(3, EXPECTED_SEQUENCE.as_bytes()));
        assert_eq!(b.step(), Step::Finish, "a refusal stops the sending");
        let mut last = FastBatch::new(2);
        last.sent_one();
        last.observe(Reply::read(1, FLOW.as_bytes()));
        assert_eq!(last.next_operation(), (2, 2), "the last message commits");
        last.sent_one();
        assert_eq!(last.step(), Step::Finish);
        last.observe(Reply::read(2, br#"{"stream":"S","seq":7,"batch":"x","count":2}"#));
        assert_eq!(last.step(), Step::Done);
    }

    #[test]
    fn what_the_batch_stored_is_its_first_messages_and_the_rest_fails_or_waits() {
        let end = |count: u64| format!(r#"{{"stream":"S","seq":40,"batch":"x","count":{count}}}"#);
        // (what, batch size, messages sent, replies, no final answer, outcomes)
        type Case<'a> = (&'a str, usize, usize, Vec<(u64, String)>, bool, &'a str);
        let cases: &[Case<'_>] = &[
            ("all stored", 5, 5, vec![(1, FLOW.into()), (5, end(5))], false, "s s s s s"),
            (
                "refused at 3 (expected sequence): stops there",
                5,
                5,
                vec![(1, FLOW.into()), (3, EXPECTED_SEQUENCE.into()), (3, end(2)), (4, UNKNOWN.into())],
                false,
                "s s r - -",
            ),
            (
                "refused at 3 (too large), then a gap",
                5,
                5,
                vec![(1, FLOW.into()), (3, TOO_LARGE.into()), (4, GAP.into()), (4, end(2))],
                false,
                "s s r - -",
            ),
            (
                "a gap at 3: lost on the way",
                5,
                5,
                vec![(1, FLOW.into()), (3, GAP.into()), (3, end(2))],
                false,
                "s s f - -",
            ),
            (
                "no final answer: the acknowledged ones only",
                300,
                250,
                vec![(1, FLOW.into()), (100, r#"{"type":"ack","seq":100,"msgs":100}"#.into())],
                true,
                "",
            ),
            (
                "a batch of one is a plain publish",
                1,
                1,
                vec![(1, r#"{"stream":"S","seq":12,"duplicate": true,"batch":"x","count":1}"#.into())],
                false,
                "s12d",
            ),
            ("refused at its first message", 3, 1, vec![(1, TOO_LARGE.into())], false, "r - -"),
        ];
        for (what, size, sent, replies, timed_out, expected) in cases {
            let replies: Vec<(u64, &str)> = replies.iter().map(|(at, r)| (*at, r.as_str())).collect();
            let b = batch(*size, *sent, &replies);
            let failure =
                timed_out.then(|| EventError::broker_message(BrokerErrorKind::TimedOut, "no answer"));
            let outcomes = b.outcomes(failure);
            assert_eq!(outcomes.len(), *size, "{what}");
            if expected.is_empty() {
                let got = shape(&outcomes);
                let want = ["s"; 100].join(" ") + " f" + &" -".repeat(199);
                assert_eq!(got, want, "{what}");
            } else {
                assert_eq!(shape(&outcomes), *expected, "{what}");
            }
        }
    }

    #[test]
    fn the_first_reply_tells_a_stream_that_takes_no_fast_batches() {
        assert_eq!(batch(3, 1, &[(1, DISABLED)]).start(), Start::Disabled);
        let plain = batch(3, 1, &[(1, r#"{"stream":"S","seq":4}"#)]);
        assert_eq!(plain.start(), Start::Plain, "a server that does not know them stored the first alone");
        assert_eq!(shape(&plain.outcomes(None)[..1]), "s4");
        assert_eq!(batch(3, 1, &[(1, TOO_LARGE)]).start(), Start::Ended);
        assert_eq!(batch(3, 1, &[(1, FLOW)]).start(), Start::Open);
    }

    #[test]
    fn every_aggregate_s_last_message_goes_after_the_batch_with_a_receipt_of_its_own() {
        // a: 0 2 4 5; b: 1; c: 3 6
        let plan = FastPlan::of(vec![vec![0, 2, 4, 5], vec![1], vec![3, 6]]);
        assert_eq!(plan.batch, [0, 2, 3, 4]);
        assert_eq!(plan.alone, [1]);
        assert_eq!(
            plan.tails,
            [(5, 3), (6, 2)],
            "a's last after the batch's 4th (its 4), c's after its 3rd (its 3)"
        );
        let some = FastPlan::of(vec![vec![1], vec![3, 6]]);
        assert_eq!((some.batch, some.alone, some.tails), (vec![3], vec![1], vec![(6, 0)]));
    }

    #[test]
    fn a_message_the_batch_stored_counts_only_once_an_acknowledgement_names_a_sequence_past_it() {
        // a: 0 1 | 4 (tail acknowledged); b: 2 3 | 5 (tail failed); c: 6 | 7 (tail not
        // sent); d: 8 9 | 10 (tail failed, confirmation failed).
        let (a, b, c, d) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3), Uuid::from_u128(4));
        let owner = |i: usize| match i {
            0 | 1 | 4 => a,
            2 | 3 | 5 => b,
            6 | 7 => c,
            _ => d,
        };
        let receipt = |sequence| {
            Ok(PublishReceipt { stream_sequence: sequence, duplicate: sequence > 0, stream: None })
        };
        let batch = || {
            vec![
                (0, receipt(0)),
                (1, receipt(0)),
                (2, receipt(0)),
                (3, receipt(0)),
                (6, Err(EventError::not_sent())),
                (8, receipt(0)),
                (9, receipt(0)),
            ]
        };
        let tails = [
            (4, Ok(())),
            (5, Err(EventError::not_sent())),
            (7, Err(EventError::not_sent())),
            (10, Err(EventError::not_sent())),
        ];
        assert_eq!(
            to_confirm(&batch(), &tails, owner),
            [3, 9],
            "b's and d's last stored; a is covered, c stored none"
        );
        let outcomes = confirmed(batch(), vec![(3, receipt(12)), (9, Err(EventError::not_sent()))], owner);
        let shape: Vec<(usize, Option<u64>)> =
            outcomes.iter().map(|(i, o)| (*i, o.as_ref().ok().map(|r| r.stream_sequence))).collect();
        assert_eq!(
            shape,
            [(0, Some(0)), (1, Some(0)), (2, Some(0)), (3, Some(12)), (6, None), (8, None), (9, None)]
        );
        let Err(e) = &outcomes[5].1 else { unreachable!() };
        assert!(!e.is_refusal() && e.broker_kind() != Some(BrokerErrorKind::NotSent), "{e}");
    }

    #[test]
    fn versions_with_fast_batches() {
        for (version, fast) in
            [("2.9.25", false), ("2.12.8", false), ("2.14.0", true), ("2.15.1", true), ("3.0.0-beta", true)]
        {
            assert_eq!(server_fast(version), fast, "{version}");
        }
    }
}
