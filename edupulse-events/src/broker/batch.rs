//! Which messages of a publish go in which batches ([`BatchStreams::plan`]), and atomic
//! batches (JetStream's ADR-50, nats-server 2.12.1 and later): several messages stored all
//! together or not at all, with one acknowledgement. Fast-ingest batches are `fast.rs`.
//!
//! The flow, as nats-server speaks it (checked on 2.12.1 to 2.15.1 by
//! `scripts/probes/atomic-batches`): every message carries `Nats-Batch-Id` and
//! `Nats-Batch-Sequence` (1, 2, … without gaps); the first is a request whose empty reply says
//! the batch is staged; the middle ones are plain publishes; the last also carries
//! `Nats-Batch-Commit: 1` and its reply is the batch's one acknowledgement (`seq` the last
//! message's stream sequence, `count` the batch's size) or one error for the whole batch.
//! Every check (message ids, expected sequences) runs at the commit. A message id the stream
//! already holds refuses the whole batch (10201), whether all of it or only part was stored
//! before: the caller then sends the messages one at a time, and the stream's per-message
//! de-duplication says which it holds. 2.12.0 refuses `Nats-Msg-Id` in batches and servers
//! before 2.12 ignore the batch headers (storing each message on its own): batches are used
//! only on streams found with atomic publishing on, on a server of 2.12.1 or later.
//!
//! Synadia's `jetstream-extra` implements batches for async-nats 0.48 and refuses
//! `Nats-Msg-Id` in them, which the relay's de-duplication needs: the protocol is spoken here.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, HeaderMap, Request};
use serde::Deserialize;
use uuid::Uuid;

use crate::broker::PublishReceipt;
use crate::broker::fast::FastPlan;
use crate::broker::version::server_since;
use crate::event::subject::filter_matches;
use crate::event::wire::OutgoingMessage;
use crate::{BrokerErrorKind, EventError};

/// The most messages JetStream takes in one atomic batch.
pub(crate) const MAX_BATCH: usize = 1000;

/// JetStream's error code for a batch holding a message id the stream already holds.
pub(crate) const DUPLICATE_MESSAGE_ID: u64 = 10201;

/// JetStream's error code for a batch sent to a stream without atomic publishing.
pub(crate) const ATOMIC_DISABLED: u64 = 10174;

/// The oldest server whose atomic batches take `Nats-Msg-Id`.
pub(crate) const SINCE: (u64, u64, u64) = (2, 12, 1);

/// The kinds of batches a stream takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Batches {
    /// Atomic batches (2.12.1 and later): all or nothing, one acknowledgement.
    Atomic,
    /// Fast-ingest batches (2.14 and later, `fast.rs`): stored in order as they arrive.
    Fast,
}

/// A stream that takes batches: its name, its subject filters (split at the dots), and
/// which batches it takes.
#[derive(Debug)]
struct BatchStream {
    name: Arc<str>,
    filters: Vec<Vec<String>>,
    atomic: bool,
    fast: bool,
}

/// The streams found taking batches, and the subjects they capture.
#[derive(Debug, Default)]
pub(crate) struct BatchStreams {
    streams: Vec<BatchStream>,
}

/// How one publish goes out: per stream with fast-ingest batches, the messages sent as one
/// fast batch (the aggregates whose messages that stream captures, all of them, in order);
/// the runs sent as atomic batches (each one aggregate's messages, in order, at least
/// `min_batch`, all captured by one stream with atomic publishing); and the messages sent
/// one at a time.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) fast: Vec<FastPlan>,
    pub(crate) batches: Vec<Vec<usize>>,
    pub(crate) single: Vec<usize>,
}

impl BatchStreams {
    /// Records which batches stream `name`, capturing `subjects`, takes.
    pub(crate) fn set(&mut self, name: &str, subjects: &[String], atomic: bool, fast: bool) {
        self.streams.retain(|stream| &*stream.name != name);
        if atomic || fast {
            let filters = subjects.iter().map(|f| f.split('.').map(str::to_owned).collect()).collect();
            self.streams.push(BatchStream { name: Arc::from(name), filters, atomic, fast });
        }
    }

    /// Stops sending `kind` batches to the stream that captures `subject` (it refused them
    /// as disabled, or did not know them).
    pub(crate) fn forget_subject(&mut self, subject: &str, kind: Batches) {
        let Some(k) = self.index_of(subject) else { return };
        let stream = &mut self.streams[k];
        match kind {
            Batches::Atomic => stream.atomic = false,
            Batches::Fast => stream.fast = false,
        }
        if !stream.atomic && !stream.fast {
            self.streams.remove(k);
        }
    }

    fn index_of(&self, subject: &str) -> Option<usize> {
        self.streams.iter().position(|s| s.filters.iter().any(|f| filter_matches(f, subject)))
    }

    /// The stream taking `kind` batches that captures `subject`.
    fn stream_of(&self, subject: &str, kind: Batches) -> Option<&Arc<str>> {
        let stream = &self.streams[self.index_of(subject)?];
        let takes = match kind {
            Batches::Atomic => stream.atomic,
            Batches::Fast => stream.fast,
        };
        takes.then_some(&stream.name)
    }

    /// How `messages` go out; see [`Plan`].
    pub(crate) fn plan(&self, messages: &[OutgoingMessage], min_batch: usize) -> Plan {
        if self.streams.is_empty() {
            return Plan { single: (0..messages.len()).collect(), ..Plan::default() };
        }
        let mut runs: Vec<Vec<usize>> = Vec::new();
        let mut run_of: HashMap<Uuid, usize> = HashMap::new();
        for (i, message) in messages.iter().enumerate() {
            let run = *run_of.entry(message.aggregate_id).or_insert_with(|| {
                runs.push(Vec::new());
                runs.len() - 1
            });
            runs[run].push(i);
        }
        let one_stream = |run: &[usize], kind: Batches| {
            let stream = self.stream_of(&messages[run[0]].subject, kind)?;
            run[1..]
                .iter()
                .all(|&i| self.stream_of(&messages[i].subject, kind) == Some(stream))
                .then_some(stream)
        };
        // Runs to a stream with fast batches: one batch per stream, every run of it, when
        // its longest run is longer than what a batch costs (one at a time, a publish lasts
        // about as many round trips as its longest run has messages).
        let mut fast: Vec<(&Arc<str>, Vec<Vec<usize>>)> = Vec::new();
        let mut rest = Vec::with_capacity(runs.len());
        for run in runs {
            match one_stream(&run, Batches::Fast) {
                Some(stream) => match fast.iter_mut().find(|(s, _)| *s == stream) {
                    Some((_, runs)) => runs.push(run),
                    None => fast.push((stream, vec![run])),
                },
                None => rest.push(run),
            }
        }
        let mut fast_batches = Vec::new();
        for (_, runs) in fast {
            if runs.iter().map(Vec::len).max().unwrap_or(0) > FAST_BATCH_COST {
                fast_batches.push(FastPlan::of(runs));
            } else {
                rest.extend(runs);
            }
        }
        // Runs that may go as atomic batches, longest first; the others go one at a time.
        // The length first: most runs are short, and the subjects need not be matched then.
        let (mut long, short): (Vec<Vec<usize>>, Vec<Vec<usize>>) = rest
            .into_iter()
            .partition(|run| run.len() >= min_batch.max(2) && one_stream(run, Batches::Atomic).is_some());
        long.sort_by_key(|run| std::cmp::Reverse(run.len()));
        let longest_short = short.iter().map(Vec::len).max().unwrap_or(0);
        let batched = worth_batching(&long.iter().map(Vec::len).collect::<Vec<_>>(), longest_short);
        let mut plan = Plan { fast: fast_batches, ..Plan::default() };
        for (k, run) in long.into_iter().enumerate() {
            if k < batched {
                plan.batches.push(run);
            } else {
                plan.single.extend(run);
            }
        }
        for run in short {
            plan.single.extend(run);
        }
        plan.single.sort_unstable();
        plan
    }
}

/// What a fast-ingest batch costs, in acknowledgement round trips of one message: its first
/// reply, its final acknowledgement, and its aggregates' last messages, acknowledged each
/// on its own after it (`fast.rs`).
const FAST_BATCH_COST: usize = 3;

/// What a batch costs the stream, in acknowledgement round trips of one message under load:
/// the server commits a stream's batches one after another, about 4.5 ms each whatever their
/// size, while a pipelined message waits about 1.1 ms for its acknowledgement (nats-server
/// 2.15.1, BENCHMARKS.md).
const BATCH_COST: usize = 4;

/// How many of the longest runs (`long`, lengths in descending order) to send as batches,
/// the rest of the publish going one at a time (`longest_short` the longest run that may not
/// be a batch). One at a time, a publish lasts about as many round trips as its longest run
/// has messages (the aggregates go in parallel); batching the `k` longest runs makes it last
/// about `k × BATCH_COST` (the stream commits batches one after another) or the next run's
/// length, whichever is more. The fewest batches with the shortest estimate win.
pub(crate) fn worth_batching(long: &[usize], longest_short: usize) -> usize {
    let rest = |k: usize| long.get(k).copied().unwrap_or(longest_short).max(longest_short);
    let mut best = (rest(0), 0);
    for k in 1..=long.len() {
        let estimate = (k * BATCH_COST).max(rest(k));
        if estimate < best.0 {
            best = (estimate, k);
        }
    }
    best.1
}

/// What became of one batch.
#[derive(Debug)]
pub(crate) enum BatchOutcome {
    /// Stored whole: one receipt per message, in order.
    Stored(Vec<PublishReceipt>),
    /// Nothing stored: refused whole at the commit (JetStream's error code, 0 when the batch
    /// was never committed: a message could not be sent, or the first was refused), and why.
    NotStored { code: u64, reason: String },
    /// The server stored the first message on its own (it does not know batches): its
    /// receipt; the others were not sent.
    FirstAlone(PublishReceipt),
    /// The commit was sent and no answer came: whether the batch was stored is unknown.
    Unknown(EventError),
}

/// JetStream's answer to a batch's first message or its commit.
#[derive(Deserialize)]
struct Answer {
    stream: Option<String>,
    seq: Option<u64>,
    count: Option<u64>,
    duplicate: Option<bool>,
    error: Option<ApiError>,
}

#[derive(Deserialize)]
struct ApiError {
    err_code: u64,
    description: String,
}

/// Sends `messages` (at most [`MAX_BATCH`], all to one stream) as one atomic batch, each
/// reply awaited at most `timeout`; `connected` is asked before each message (nothing goes
/// out on a connection other than the one the caller checked).
pub(crate) async fn send_batch(
    client: &Client,
    messages: &[&OutgoingMessage],
    headers: impl Fn(&OutgoingMessage) -> Result<HeaderMap, EventError>,
    timeout: Duration,
    connected: impl Fn() -> bool,
) -> BatchOutcome {
    let id = Uuid::now_v7().simple().to_string();
    let last = messages.len();
    for (k, message) in messages.iter().enumerate() {
        let sequence = k + 1;
        let not_sent = |reason: String| BatchOutcome::NotStored { code: 0, reason };
        if !connected() {
            return not_sent("not connected to the NATS server on the connection checked".into());
        }
        let mut map = match headers(message) {
            Ok(map) => map,
            Err(e) => return not_sent(e.to_string()),
        };
        map.insert("Nats-Batch-Id", id.as_str());
        map.insert("Nats-Batch-Sequence", sequence.to_string().as_str());
        if sequence == last {
            map.insert("Nats-Batch-Commit", "1");
        } else if sequence > 1 {
            // Not committed yet: a failure here stores nothing (the server drops the batch).
            if let Err(e) =
                client.publish_with_headers(message.subject.clone(), map, message.body.clone()).await
            {
                return not_sent(format!("message {sequence} of the batch not sent: {e}"));
            }
            continue;
        }
        let request = Request::new().headers(map).payload(message.body.clone()).timeout(Some(timeout));
        let reply = match client.send_request(message.subject.clone(), request).await {
            Ok(reply) => reply,
            Err(e) if sequence < last => return not_sent(format!("the batch's first message: {e}")),
            Err(e) => return BatchOutcome::Unknown(no_answer(e)),
        };
        if sequence < last && reply.payload.is_empty() {
            // Staged: the rest follows.
            continue;
        }
        return settle(&reply.payload, messages, sequence == last);
    }
    BatchOutcome::NotStored { code: 0, reason: "an empty batch is not sent".into() }
}

/// The outcome a reply (to the commit, or a first message that was not staged) says.
fn settle(payload: &[u8], messages: &[&OutgoingMessage], commit: bool) -> BatchOutcome {
    // An answer the commit got that says nothing sure leaves the batch's fate unknown.
    let unknown = |message: String| {
        if commit {
            BatchOutcome::Unknown(EventError::broker_message(BrokerErrorKind::Api, message))
        } else {
            BatchOutcome::NotStored { code: 0, reason: message }
        }
    };
    let answer: Answer = match serde_json::from_slice(payload) {
        Ok(answer) => answer,
        Err(e) => return unknown(format!("JetStream answered a batch with something unreadable: {e}")),
    };
    if let Some(error) = answer.error {
        return BatchOutcome::NotStored { code: error.err_code, reason: error.description };
    }
    let (Some(stream), Some(last)) = (answer.stream, answer.seq) else {
        return unknown("JetStream acknowledged a batch without a stream or sequence".into());
    };
    let stream: Arc<str> = Arc::from(stream.as_str());
    if !commit {
        let duplicate = answer.duplicate.unwrap_or(false);
        return BatchOutcome::FirstAlone(PublishReceipt {
            stream_sequence: last,
            duplicate,
            stream: Some(stream),
        });
    }
    let count = answer.count.unwrap_or(0);
    if count != messages.len() as u64 || last < count {
        return unknown(format!("JetStream stored a batch of {count} for {} messages sent", messages.len()));
    }
    let first = last - count + 1;
    let receipts = (0..count)
        .map(|i| PublishReceipt {
            stream_sequence: first + i,
            duplicate: false,
            stream: Some(stream.clone()),
        })
        .collect();
    BatchOutcome::Stored(receipts)
}

/// Whether a server of `version` (`2.12.1`, say) takes message ids in atomic batches.
pub(crate) fn server_batches(version: &str) -> bool {
    server_since(version, SINCE)
}

fn no_answer(e: async_nats::RequestError) -> EventError {
    let kind = match e.kind() {
        async_nats::RequestErrorKind::TimedOut => BrokerErrorKind::TimedOut,
        async_nats::RequestErrorKind::NoResponders => BrokerErrorKind::NoStream,
        _ => BrokerErrorKind::Unavailable,
    };
    EventError::broker(kind, format!("batch not acknowledged: {e}"), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_that_take_message_ids_in_batches() {
        for (version, batches) in [
            ("2.9.25", false),
            ("2.11.11", false),
            ("2.12.0", false),
            ("2.12.1", true),
            ("2.12.8", true),
            ("2.14.0-RC.1", true),
            ("2.15.1", true),
            ("3.0.0", true),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(server_batches(version), batches, "{version}");
        }
    }

    fn message() -> OutgoingMessage {
        to(Uuid::nil(), "a.b")
    }

    fn to(aggregate_id: Uuid, subject: &str) -> OutgoingMessage {
        OutgoingMessage {
            event_id: Uuid::nil(),
            aggregate_id,
            global_position: 1,
            subject: subject.into(),
            headers: Vec::new(),
            body: bytes::Bytes::new(),
        }
    }

    #[test]
    fn batches_only_where_they_shorten_the_publish() {
        // One hot aggregate: a batch.
        assert_eq!(worth_batching(&[5_000], 0), 1);
        assert_eq!(worth_batching(&[2_000], 1), 1);
        // Fifty aggregates of 100 each: the stream would commit 50 batches one after another;
        // one at a time, they go in parallel.
        assert_eq!(worth_batching(&[100; 50], 0), 0);
        // A hot aggregate among many of 100: it alone; among three, all four.
        let mut runs = vec![2_000];
        runs.extend([100; 40]);
        assert_eq!(worth_batching(&runs, 10), 1);
        assert_eq!(worth_batching(&[2_000, 100, 100, 100], 10), 4);
        // Two hot ones, and the 70 too: three batches cost less than 70 round trips.
        assert_eq!(worth_batching(&[3_000, 2_500, 70], 5), 3);
        // Three messages: fewer round trips than one batch costs.
        assert_eq!(worth_batching(&[3], 0), 0);
        assert_eq!(worth_batching(&[], 40), 0);
    }

    #[test]
    fn an_aggregate_s_messages_to_one_atomic_stream_go_as_one_batch() {
        let (a, b, c, d) = (Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3), Uuid::from_u128(4));
        // a: 10 messages, its last to another stream; b: 1 000; c: 500 to another stream;
        // d: one. Interleaved as a page of the log would have them.
        let mut messages = Vec::new();
        for i in 0..1_000 {
            messages.push(to(b, "lesson.x"));
            if i < 10 {
                messages.push(to(a, if i == 9 { "other.x" } else { "lesson.y" }));
            }
            if i < 500 {
                messages.push(to(c, "other.x"));
            }
        }
        messages.push(to(d, "lesson.x"));
        let of = |aggregate: Uuid| -> Vec<usize> {
            messages.iter().enumerate().filter(|(_, m)| m.aggregate_id == aggregate).map(|(i, _)| i).collect()
        };
        let mut streams = BatchStreams::default();
        let everything: Vec<usize> = (0..messages.len()).collect();
        assert_eq!(streams.plan(&messages, 2).single, everything, "no stream takes batches");
        streams.set("LESSONS", &["lesson.>".to_owned()], true, false);
        let plan = streams.plan(&messages, 2);
        assert_eq!(plan.batches, vec![of(b)], "a: two streams; c: no atomic stream; d: alone");
        assert!(
            streams.plan(&messages, 1_001).batches.is_empty(),
            "runs shorter than min_batch go one at a time"
        );
        streams.set("OTHER", &["other.*".to_owned()], true, false);
        assert_eq!(streams.plan(&messages, 2).batches, vec![of(b), of(c)]);
        let mut single = streams.plan(&messages, 2).single;
        single.sort_unstable();
        assert_eq!(
            single,
            [of(a), of(d)]
                .concat()
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
        streams.forget_subject("lesson.x", Batches::Atomic);
        streams.set("OTHER", &["other.*".to_owned()], false, false);
        assert!(streams.plan(&messages, 2).batches.is_empty());
    }

    #[test]
    fn every_run_to_a_stream_with_fast_batches_goes_in_its_one_fast_batch() {
        let (a, b, c, d) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        // a: all four to LESSONS; b: one to LESSONS, one to OTHER; c: to OTHER; d: one to
        // LESSONS.
        let mut messages = vec![to(a, "lesson.x"), to(b, "lesson.x"), to(c, "other.x"), to(d, "lesson.z")];
        messages.extend([to(a, "lesson.y"), to(b, "other.x"), to(a, "lesson.y"), to(a, "lesson.y")]);
        messages.extend((0..4).map(|_| to(c, "other.x")));
        let mut streams = BatchStreams::default();
        streams.set("LESSONS", &["lesson.>".to_owned()], true, true);
        streams.set("OTHER", &["other.*".to_owned()], false, true);
        let plan = streams.plan(&messages, 1);
        // LESSONS: a's all but its last in the batch, then its last; d alone. OTHER: c's.
        assert_eq!(plan.fast.len(), 2);
        assert_eq!((plan.fast[0].batch.clone(), plan.fast[0].alone.clone()), (vec![0, 4, 6], vec![3]));
        assert_eq!(plan.fast[0].tails, [(7, 2)]);
        assert_eq!(
            (plan.fast[1].batch.clone(), plan.fast[1].tails.clone()),
            (vec![2, 8, 9, 10], vec![(11, 3)])
        );
        assert_eq!(plan.single, vec![1, 5], "b spans two streams: one at a time");
        assert!(plan.batches.is_empty());
        let short = streams.plan(&messages[..4], 1);
        assert!(short.fast.is_empty(), "no run longer than a batch costs: one at a time");
        assert_eq!(short.single, vec![0, 1, 2, 3]);
        streams.forget_subject("lesson.q", Batches::Fast);
        let plan = streams.plan(&messages, 1);
        assert_eq!(plan.fast.len(), 1);
        assert_eq!(plan.fast[0].batch, [2, 8, 9, 10]);
        assert_eq!(plan.single, vec![0, 1, 3, 4, 5, 6, 7], "LESSONS: atomic batches only, for long runs");
        streams.forget_subject("other.x", Batches::Fast);
        assert!(streams.plan(&messages, 1).fast.is_empty());
    }

    #[test]
    fn a_commit_s_answer_gives_each_message_its_sequence() {
        let m = message();
        let messages = [&m, &m, &m];
        let stored = settle(br#"{"stream":"S","seq":12,"batch":"x","count":3}"#, &messages, true);
        let BatchOutcome::Stored(receipts) = stored else { panic!("{stored:?}") };
        assert_eq!(receipts.iter().map(|r| r.stream_sequence).collect::<Vec<_>>(), [10, 11, 12]);
        let refused = settle(
            br#"{"error":{"code":400,"err_code":10201,"description":"atomic publish batch contains duplicate message id"},"stream":"S","seq":0}"#,
            &messages,
            true,
        );
        assert!(matches!(refused, BatchOutcome::NotStored { code: DUPLICATE_MESSAGE_ID, .. }), "{refused:?}");
        let short = settle(br#"{"stream":"S","seq":12,"count":2}"#, &messages, true);
        assert!(matches!(short, BatchOutcome::Unknown(_)), "{short:?}");
        let alone = settle(br#"{"stream":"S","seq":4}"#, &messages, false);
        assert!(
            matches!(alone, BatchOutcome::FirstAlone(PublishReceipt { stream_sequence: 4, .. })),
            "{alone:?}"
        );
        assert!(matches!(settle(b"{", &messages, true), BatchOutcome::Unknown(_)));
        assert!(matches!(settle(b"{", &messages, false), BatchOutcome::NotStored { code: 0, .. }));
    }
}
