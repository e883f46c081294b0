//! Probe of JetStream atomic batch publishing (ADR-50) against one nats-server.
//!
//!   batch-probe <nats-url> cases   – cases 1..8 (+ extras), printed as text
//!   batch-probe <nats-url> extra   – the same flows through jetstream-extra 0.3.0 (async-nats 0.48)
//!   batch-probe <nats-url> bench   – 10 000 messages: atomic batches vs pipelined publishes
//!
//! The batch protocol is spoken by hand on a plain async-nats 0.51 client so every reply the
//! server sends (zero-byte acks, error pub-acks, the commit's pub-ack) is seen verbatim.

mod extra;

use async_nats::jetstream::{self, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use std::time::{Duration, Instant};

pub const STREAM: &str = "PROBE";
pub static DRAIN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// One message of a batch: subject, extra headers (besides the batch headers), payload.
#[derive(Clone)]
pub struct Msg {
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

impl Msg {
    pub fn new(subject: impl Into<String>) -> Self {
        Msg { subject: subject.into(), headers: vec![], payload: Bytes::from_static(b"{\"e\":1}") }
    }
    pub fn h(mut self, k: &str, v: impl ToString) -> Self {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }
}

/// Everything the server answered to one batch.
#[derive(Default, Debug)]
pub struct Outcome {
    pub batch_id: String,
    /// (batch sequence, reply) for every non-empty reply (error pub-acks, the commit pub-ack).
    pub replies: Vec<(u64, String)>,
    /// Number of zero-byte replies (the "staged" acks).
    pub empty_acks: usize,
    pub commit_reply: Option<String>,
    /// The first message got an error reply, so the rest was not sent.
    pub stopped_after_first: bool,
    pub timed_out: bool,
}

impl Outcome {
    pub fn summary(&self) -> String {
        let mut s = String::new();
        if self.stopped_after_first {
            s.push_str("FIRST MSG GOT A NON-EMPTY REPLY (rest not sent); ");
        }
        let others: Vec<String> = self
            .replies
            .iter()
            .filter(|(_, r)| Some(r) != self.commit_reply.as_ref() || self.stopped_after_first)
            .map(|(q, r)| format!("msg#{q} -> {r}"))
            .collect();
        if !others.is_empty() {
            s.push_str(&format!("non-empty replies before commit: [{}]; ", others.join(" ; ")));
        }
        s.push_str(&format!("empty acks: {}; ", self.empty_acks));
        match &self.commit_reply {
            Some(c) => s.push_str(&format!("commit reply: {c}")),
            None if self.stopped_after_first => {}
            None => s.push_str(if self.timed_out { "commit reply: TIMEOUT" } else { "commit reply: none" }),
        }
        s
    }
}

fn reply_text(m: &async_nats::Message) -> String {
    if let Some(st) = m.status {
        return format!("<status {} {:?}>", st, m.description);
    }
    if m.payload.is_empty() {
        return String::new();
    }
    String::from_utf8_lossy(&m.payload).into_owned()
}

pub fn new_batch_id(client: &Client) -> String {
    client.new_inbox().rsplit('.').next().unwrap().to_string()
}

/// Sends `msgs` as one atomic batch.
///  * msg 1 carries a reply subject and is awaited (like a request), as ADR-50 says;
///  * msgs 2..n-1 carry a reply subject only when `reply_all` (else plain publishes);
///  * msg n carries `Nats-Batch-Commit: <commit>` and a reply subject; its reply is awaited.
pub async fn send_batch(client: &Client, msgs: &[Msg], reply_all: bool, commit: &str) -> Outcome {
    send_batch_opts(client, msgs, reply_all, commit, true, None).await
}

pub async fn send_batch_opts(
    client: &Client,
    msgs: &[Msg],
    reply_all: bool,
    commit: &str,
    await_first: bool,
    batch_id: Option<String>,
) -> Outcome {
    let batch_id = batch_id.unwrap_or_else(|| new_batch_id(client));
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(format!("{inbox}.*")).await.expect("subscribe");
    let n = msgs.len() as u64;
    let mut out = Outcome { batch_id: batch_id.clone(), ..Default::default() };

    let record = |out: &mut Outcome, m: &async_nats::Message| -> u64 {
        let q: u64 = m.subject.rsplit('.').next().unwrap().parse().unwrap_or(0);
        let t = reply_text(m);
        if t.is_empty() {
            out.empty_acks += 1;
        } else {
            out.replies.push((q, t.clone()));
        }
        if q == n {
            out.commit_reply = Some(t);
        }
        q
    };

    for (i, m) in msgs.iter().enumerate() {
        let seq = i as u64 + 1;
        let mut h = HeaderMap::new();
        for (k, v) in &m.headers {
            h.insert(k.as_str(), v.as_str());
        }
        h.insert("Nats-Batch-Id", batch_id.as_str());
        h.insert("Nats-Batch-Sequence", seq.to_string().as_str());
        if seq == n {
            h.insert("Nats-Batch-Commit", commit);
        }
        let want_reply = seq == 1 || seq == n || reply_all;
        if want_reply {
            client
                .publish_with_reply_and_headers(m.subject.clone(), format!("{inbox}.{seq}"), h, m.payload.clone())
                .await
                .expect("publish");
        } else {
            client.publish_with_headers(m.subject.clone(), h, m.payload.clone()).await.expect("publish");
        }
        if seq == 1 && n > 1 && await_first {
            match tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
                Ok(Some(r)) => {
                    record(&mut out, &r);
                    if !reply_text(&r).is_empty() {
                        out.stopped_after_first = true;
                        return out;
                    }
                }
                _ => {
                    out.timed_out = true;
                    return out;
                }
            }
        }
    }
    // Wait for the commit reply, recording everything that arrives before it.
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, sub.next()).await {
            Ok(Some(r)) => {
                if record(&mut out, &r) == n {
                    break;
                }
            }
            _ => {
                out.timed_out = true;
                break;
            }
        }
    }
    // Late replies (e.g. errors for intermediate messages arriving after the commit's);
    // skipped in the benchmark, where this 150 ms wait would dominate.
    while DRAIN.load(std::sync::atomic::Ordering::Relaxed) {
        match tokio::time::timeout(Duration::from_millis(150), sub.next()).await {
            Ok(Some(r)) => {
                record(&mut out, &r);
            }
            _ => break,
        }
    }
    out
}

pub async fn state(js: &jetstream::Context, name: &str) -> String {
    match js.get_stream(name).await {
        Ok(mut s) => match s.info().await {
            Ok(i) => format!("messages={} last_seq={}", i.state.messages, i.state.last_sequence),
            Err(e) => format!("info error: {e}"),
        },
        Err(e) => format!("get_stream error: {e}"),
    }
}

/// "seq:subject[msgid]" for every stored message (small streams only).
pub async fn stored(js: &jetstream::Context, name: &str) -> String {
    let s = js.get_stream(name).await.unwrap();
    let info = s.get_info().await.unwrap();
    let mut v = vec![];
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if info.state.messages == 0 {
            break;
        }
        if let Ok(m) = s.get_raw_message(seq).await {
            let id = m
                .headers
                .get("Nats-Msg-Id")
                .map(|x| x.as_str().to_string())
                .unwrap_or_default();
            let sub = m.subject.as_str().trim_start_matches("probe.").to_string();
            v.push(if id.is_empty() { format!("{seq}:{sub}") } else { format!("{seq}:{sub}[{id}]") });
        }
    }
    v.join(" ")
}

pub async fn fresh_stream(js: &jetstream::Context, atomic: bool) -> Result<(), String> {
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.to_string(),
        subjects: vec!["probe.>".to_string()],
        allow_atomic_publish: atomic,
        ..Default::default()
    })
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

fn ids(prefix: &str, range: std::ops::RangeInclusive<u32>) -> Vec<Msg> {
    range.map(|i| Msg::new(format!("probe.ev.{i}")).h("Nats-Msg-Id", format!("{prefix}-{i}"))).collect()
}

macro_rules! case {
    ($js:expr, $id:expr, $desc:expr, $out:expr) => {{
        let o = $out;
        println!("CASE {} | {}\n  batch {} -> {}\n  stream: {}", $id, $desc, o.batch_id, o.summary(), state($js, STREAM).await);
        o
    }};
}

async fn raw_request(client: &Client, subject: &str, body: &str) -> String {
    match tokio::time::timeout(
        Duration::from_secs(3),
        client.request(subject.to_string(), Bytes::from(body.to_string())),
    )
    .await
    {
        Ok(Ok(m)) => reply_text(&m),
        Ok(Err(e)) => format!("request error: {e}"),
        Err(_) => "timeout".into(),
    }
}

async fn cases(url: &str) {
    let client = async_nats::connect(url).await.expect("connect");
    let info = client.server_info();
    println!("SERVER INFO: version={} proto={} headers={} jetstream={} go={}", info.version, info.proto, info.headers, info.jetstream, info.go);
    let js = jetstream::new(client.clone());

    // ---------------- cases 1-4: Nats-Msg-Id inside atomic batches ----------------
    fresh_stream(&js, true).await.expect("stream");
    println!("stream PROBE subjects probe.> allow_atomic=true duplicate_window=default (2m)");
    case!(&js, "1", "10 new msgs, distinct Nats-Msg-Id ev-1..ev-10", send_batch(&client, &ids("ev", 1..=10), true, "1").await);
    println!("  stored: {}", stored(&js, STREAM).await);
    case!(&js, "2", "same 10 msg ids again, new batch id", send_batch(&client, &ids("ev", 1..=10), true, "1").await);
    case!(&js, "2-noreply", "same again, replies only on first+commit", send_batch(&client, &ids("ev", 1..=10), false, "1").await);
    let o1 = send_batch(&client, &ids("sa", 1..=3), true, "1").await;
    println!("CASE 2-sameid-setup | batch sa-1..sa-3 -> {}", o1.summary());
    case!(&js, "2-sameid", "sa-1..sa-3 re-sent with the SAME batch id as the committed batch",
        send_batch_opts(&client, &ids("sa", 1..=3), true, "1", true, Some(o1.batch_id.clone())).await);
    case!(&js, "2-sameid-new", "3 new ids sb-1..sb-3 sent with that same (committed) batch id",
        send_batch_opts(&client, &ids("sb", 1..=3), true, "1", true, Some(o1.batch_id.clone())).await);
    case!(&js, "3", "ev-6..ev-15: first 5 stored already, last 5 new", send_batch(&client, &ids("ev", 6..=15), true, "1").await);
    case!(&js, "3b", "only the 5 new ones ev-11..ev-15 (were they burnt by refused case 3?)", send_batch(&client, &ids("ev", 11..=15), true, "1").await);
    let mut m4 = ids("nw", 1..=10);
    m4[6] = Msg::new("probe.ev.7").h("Nats-Msg-Id", "nw-3"); // id repeats inside the batch
    case!(&js, "4", "10 new ids nw-1..nw-10 but msg#7 repeats nw-3", send_batch(&client, &m4, true, "1").await);
    case!(&js, "4b", "the 10 distinct nw-1..nw-10 afterwards", send_batch(&client, &ids("nw", 1..=10), true, "1").await);
    // a plain (non-batch) publish of an id stored by a batch: is the batch's id in the dedup table?
    let ack = js
        .publish_with_headers("probe.ev.1", { let mut h = HeaderMap::new(); h.insert("Nats-Msg-Id", "ev-1"); h }, Bytes::from_static(b"x"))
        .await
        .unwrap()
        .await;
    println!("CASE 2-plain | plain js.publish of ev-1 (stored by batch 1)\n  -> {:?}\n  stream: {}", ack, state(&js, STREAM).await);
    // single-message batch of an existing id
    case!(&js, "2-single", "1-message batch (seq 1 + commit) with existing id ev-2", send_batch(&client, &ids("ev", 2..=2), true, "1").await);
    println!("  stored: {}", stored(&js, STREAM).await);

    // ---------------- case 5: optimistic concurrency inside batches ----------------
    fresh_stream(&js, true).await.expect("stream");
    let agg = |k: u32| format!("probe.agg.{k}");
    let m: Vec<Msg> = (1..=10).map(|k| Msg::new(agg(k)).h("Nats-Expected-Last-Subject-Sequence", 0)).collect();
    case!(&js, "5a", "10 msgs on probe.agg.1..10, each Expected-Last-Subject-Sequence=0 (new subjects)", send_batch(&client, &m, true, "1").await);
    let m: Vec<Msg> = (1..=10).map(|k| Msg::new(agg(k)).h("Nats-Expected-Last-Subject-Sequence", k)).collect();
    case!(&js, "5b", "10 msgs on probe.agg.1..10, correct expected seqs 1..10", send_batch(&client, &m, true, "1").await);
    let m: Vec<Msg> = (1..=10)
        .map(|k| Msg::new(agg(k)).h("Nats-Expected-Last-Subject-Sequence", if k == 5 { 999 } else { k + 10 }))
        .collect();
    case!(&js, "5c", "10 msgs, correct seqs 11..20 except msg#5 expects 999", send_batch(&client, &m, true, "1").await);
    let m = vec![
        Msg::new(agg(1)).h("Nats-Expected-Last-Subject-Sequence", 11),
        Msg::new(agg(1)).h("Nats-Expected-Last-Subject-Sequence", 11),
        Msg::new(agg(2)).h("Nats-Expected-Last-Subject-Sequence", 12),
    ];
    case!(&js, "5d", "2 msgs on the SAME subject agg.1 both with expected=11 (+agg.2 expected=12)", send_batch(&client, &m, true, "1").await);
    let m = vec![
        Msg::new(agg(1)).h("Nats-Expected-Last-Subject-Sequence", 11),
        Msg::new(agg(1)),
        Msg::new(agg(1)),
        Msg::new(agg(2)).h("Nats-Expected-Last-Subject-Sequence", 12),
    ];
    let o5e = case!(&js, "5e", "agg.1 x3 (expected=11 on the first only) + agg.2 expected=12", send_batch(&client, &m, true, "1").await);
    let _ = o5e;
    case!(&js, "5f", "re-send of 5e unchanged (new batch id) = relay retry after lost ack", send_batch(&client, &m, true, "1").await);
    // whole-stream optimistic concurrency on the first message
    let last = js.get_stream(STREAM).await.unwrap().get_info().await.unwrap().state.last_sequence;
    let m: Vec<Msg> = (0..5)
        .map(|i| { let x = Msg::new(agg(30 + i)); if i == 0 { x.h("Nats-Expected-Last-Sequence", last) } else { x } })
        .collect();
    case!(&js, "5g", &format!("5 msgs, Nats-Expected-Last-Sequence={last} on msg#1 only (correct)"), send_batch(&client, &m, true, "1").await);
    case!(&js, "5g-resend", "same batch re-sent (lost ack retry)", send_batch(&client, &m, true, "1").await);
    let last = js.get_stream(STREAM).await.unwrap().get_info().await.unwrap().state.last_sequence;
    let m: Vec<Msg> = (0..3)
        .map(|i| { let x = Msg::new(agg(40 + i)); if i == 1 { x.h("Nats-Expected-Last-Sequence", last + 1) } else { x } })
        .collect();
    case!(&js, "5h", "Nats-Expected-Last-Sequence on msg#2 (not the first)", send_batch(&client, &m, true, "1").await);
    let m: Vec<Msg> = (0..3).map(|i| Msg::new(agg(50 + i)).h("Nats-Expected-Last-Msg-Id", "whatever")).collect();
    case!(&js, "5i", "Nats-Expected-Last-Msg-Id in a batch", send_batch(&client, &m, true, "1").await);
    // msg ids + per-subject expectations together, then the retry
    let s1 = js.get_stream(STREAM).await.unwrap();
    let l1 = s1.get_last_raw_message_by_subject(&agg(1)).await.map(|m| m.sequence).unwrap_or(0);
    let l2 = s1.get_last_raw_message_by_subject(&agg(2)).await.map(|m| m.sequence).unwrap_or(0);
    let m = vec![
        Msg::new(agg(1)).h("Nats-Expected-Last-Subject-Sequence", l1).h("Nats-Msg-Id", "ox-1"),
        Msg::new(agg(1)).h("Nats-Msg-Id", "ox-2"),
        Msg::new(agg(2)).h("Nats-Expected-Last-Subject-Sequence", l2).h("Nats-Msg-Id", "ox-3"),
    ];
    case!(&js, "5j", &format!("Msg-Id + Expected-Last-Subject-Sequence ({l1},-,{l2}) together"), send_batch(&client, &m, true, "1").await);
    case!(&js, "5j-resend", "5j re-sent unchanged: which check answers first?", send_batch(&client, &m, true, "1").await);
    // Nats-Expected-Last-Subject-Sequence-Subject (override subject) in a batch
    let m = vec![Msg::new(agg(60)).h("Nats-Expected-Last-Subject-Sequence", 0).h("Nats-Expected-Last-Subject-Sequence-Subject", "probe.agg.61")];
    case!(&js, "5k", "1-message batch with Expected-Last-Subject-Sequence-Subject override", send_batch(&client, &m, true, "1").await);

    // per-subject expectations on only one message of a two-subject batch (2.12.0 subject bug)
    let m = vec![Msg::new("probe.zz.a").h("Nats-Expected-Last-Subject-Sequence", 0), Msg::new("probe.zz.b")];
    case!(&js, "5z1", "2 msgs: zz.a expected=0 (first), zz.b no header (commit)", send_batch(&client, &m, true, "1").await);
    let m = vec![Msg::new("probe.zy.a"), Msg::new("probe.zy.b").h("Nats-Expected-Last-Subject-Sequence", 0)];
    case!(&js, "5z2", "2 msgs: zy.a no header (first), zy.b expected=0 (commit)", send_batch(&client, &m, true, "1").await);
    let m = vec![Msg::new("probe.zx.a").h("Nats-Expected-Last-Subject-Sequence", 0), Msg::new("probe.zx.b"), Msg::new("probe.zx.c")];
    case!(&js, "5z3", "3 msgs: zx.a expected=0 (first), zx.b, zx.c (commit) no header", send_batch(&client, &m, true, "1").await);

    // ---------------- case 6: size limit ----------------
    fresh_stream(&js, true).await.expect("stream");
    let big: Vec<Msg> = (1..=1000).map(|i| Msg::new("probe.big").h("Nats-Msg-Id", format!("b-{i}"))).collect();
    case!(&js, "6a", "1000 msgs with msg ids (limit), replies on first+commit only", send_batch(&client, &big, false, "1").await);
    let big: Vec<Msg> = (1..=1001).map(|i| Msg::new("probe.big2").h("Nats-Msg-Id", format!("c-{i}"))).collect();
    case!(&js, "6b", "1001 msgs, reply subject on every msg", send_batch(&client, &big, true, "1").await);
    case!(&js, "6c", "1001 msgs, replies on first+commit only", send_batch(&client, &big, false, "1").await);

    // ---------------- case 7: stream without allow_atomic ----------------
    fresh_stream(&js, false).await.expect("stream");
    case!(&js, "7", "3-msg batch to a stream with allow_atomic=false", send_batch(&client, &ids("na", 1..=3), true, "1").await);
    case!(&js, "7b", "same, without awaiting the first reply (fire first, wait commit)",
        send_batch_opts(&client, &ids("nb", 1..=3), true, "1", false, None).await);

    // ---------------- case 8: detection ----------------
    fresh_stream(&js, true).await.expect("stream");
    println!("CASE 8 | detection");
    println!("  $JS.API.INFO -> {}", raw_request(&client, "$JS.API.INFO", "").await);
    let si = raw_request(&client, "$JS.API.STREAM.INFO.PROBE", "").await;
    let v: serde_json::Value = serde_json::from_str(&si).unwrap_or_default();
    println!("  STREAM.INFO config.allow_atomic={} config.allow_batched={} config.metadata={}",
        v["config"]["allow_atomic"], v["config"]["allow_batched"], v["config"]["metadata"]);
    fresh_stream(&js, false).await.expect("stream");
    let si = raw_request(&client, "$JS.API.STREAM.INFO.PROBE", "").await;
    let v: serde_json::Value = serde_json::from_str(&si).unwrap_or_default();
    println!("  (allow_atomic=false stream) config.allow_atomic={} metadata={}", v["config"]["allow_atomic"], v["config"]["metadata"]);
    // update an existing stream to allow_atomic
    let up = raw_request(&client, "$JS.API.STREAM.UPDATE.PROBE",
        r#"{"name":"PROBE","subjects":["probe.>"],"storage":"file","retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"num_replicas":1,"discard":"old","allow_atomic":true}"#).await;
    let v: serde_json::Value = serde_json::from_str(&up).unwrap_or_default();
    println!("  STREAM.UPDATE to allow_atomic=true -> error={} allow_atomic={}", v["error"], v["config"]["allow_atomic"]);
    // allow_batched (fast ingest, 2.14+) on create
    let _ = js.delete_stream(STREAM).await;
    let cr = raw_request(&client, "$JS.API.STREAM.CREATE.PROBE",
        r#"{"name":"PROBE","subjects":["probe.>"],"storage":"file","retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"num_replicas":1,"discard":"old","allow_batched":true}"#).await;
    let v: serde_json::Value = serde_json::from_str(&cr).unwrap_or_default();
    println!("  STREAM.CREATE allow_batched=true -> error={} config.allow_batched={}", v["error"], v["config"]["allow_batched"]);
    // Nats-Batch-Commit: eob (ADR-50 rev 5, api level 3)
    fresh_stream(&js, true).await.expect("stream");
    case!(&js, "8-eob", "3-msg batch committed with Nats-Batch-Commit: eob (commit msg not stored)", send_batch(&client, &ids("eob", 1..=3), true, "eob").await);
    let m: Vec<Msg> = (1..=2).map(|i| Msg::new(format!("probe.lvl.{i}")).h("Nats-Required-Api-Level", 3)).collect();
    case!(&js, "8-level", "2-msg batch whose msgs carry Nats-Required-Api-Level: 3", send_batch(&client, &m, true, "1").await);
    let m: Vec<Msg> = (1..=2).map(|i| Msg::new(format!("probe.lvl.{i}")).h("Nats-Required-Api-Level", 99)).collect();
    case!(&js, "8-level99", "2-msg batch with Nats-Required-Api-Level: 99", send_batch(&client, &m, true, "1").await);
    // Batch id > 64 chars
    let long = "x".repeat(65);
    case!(&js, "8-longid", "batch id of 65 chars", send_batch_opts(&client, &ids("li", 1..=2), true, "1", true, Some(long)).await);
    // A message after an unknown batch (sequence 2 without 1)
    let bid = new_batch_id(&client);
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    let mut h = HeaderMap::new();
    h.insert("Nats-Batch-Id", bid.as_str());
    h.insert("Nats-Batch-Sequence", "2");
    h.insert("Nats-Batch-Commit", "1");
    client.publish_with_reply_and_headers("probe.gap", inbox, h, Bytes::from_static(b"x")).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(3), sub.next()).await;
    println!("CASE 8-gap | commit with Nats-Batch-Sequence 2 for a batch never started\n  -> {}", match r { Ok(Some(m)) => reply_text(&m), _ => "timeout".into() });
    println!("  stream: {}", state(&js, STREAM).await);
    let _ = js.delete_stream(STREAM).await;
}

/// Rough throughput: 10 000 messages (128-byte payloads, each with Nats-Msg-Id).
async fn bench(url: &str) {
    const N: usize = 10_000;
    let client = async_nats::connect(url).await.expect("connect");
    let js = jetstream::new(client.clone());
    let payload = Bytes::from(vec![b'x'; 128]);
    let msgs: Vec<Msg> = (0..N)
        .map(|i| Msg { subject: format!("probe.b.{}", i % 50), headers: vec![("Nats-Msg-Id".into(), format!("m-{i}"))], payload: payload.clone() })
        .collect();
    DRAIN.store(false, std::sync::atomic::Ordering::Relaxed);
    println!("BENCH server {} | {N} msgs, 128 B payload, Nats-Msg-Id on each, file storage, debug build", client.server_info().version);

    for (label, await_first) in [("atomic batches of 100, sequential, first msg awaited", true), ("atomic batches of 100, sequential, only commit awaited", false)] {
        fresh_stream(&js, true).await.unwrap();
        let t = Instant::now();
        for chunk in msgs.chunks(100) {
            let o = send_batch_opts(&client, chunk, false, "1", await_first, None).await;
            assert!(o.commit_reply.as_deref().map(|r| r.contains("\"count\":100")).unwrap_or(false), "{o:?}");
        }
        let d = t.elapsed();
        println!("  {label}: {:?} = {:.0} msg/s | {}", d, N as f64 / d.as_secs_f64(), state(&js, STREAM).await);
    }
    for conc in [4usize, 10] {
        fresh_stream(&js, true).await.unwrap();
        let t = Instant::now();
        let per = N / conc;
        let mut tasks = vec![];
        for w in 0..conc {
            let c = client.clone();
            let part: Vec<Msg> = msgs[w * per..(w + 1) * per].to_vec();
            tasks.push(tokio::spawn(async move {
                for chunk in part.chunks(100) {
                    let o = send_batch_opts(&c, chunk, false, "1", true, None).await;
                    assert!(o.commit_reply.as_deref().map(|r| r.contains("\"count\":100")).unwrap_or(false), "{o:?}");
                }
            }));
        }
        for t in tasks { t.await.unwrap(); }
        let d = t.elapsed();
        println!("  atomic batches of 100, {conc} batches in flight: {:?} = {:.0} msg/s | {}", d, N as f64 / d.as_secs_f64(), state(&js, STREAM).await);
    }
    for inflight in [256usize] {
        fresh_stream(&js, true).await.unwrap();
        let t = Instant::now();
        let mut pending = futures::stream::FuturesUnordered::new();
        for m in &msgs {
            if pending.len() >= inflight {
                let r: Result<async_nats::jetstream::publish::PublishAck, _> = pending.next().await.unwrap();
                r.expect("ack");
            }
            let mut h = HeaderMap::new();
            for (k, v) in &m.headers { h.insert(k.as_str(), v.as_str()); }
            let f = js.publish_with_headers(m.subject.clone(), h, m.payload.clone()).await.expect("publish");
            pending.push(f.into_future());
        }
        while let Some(r) = pending.next().await { r.expect("ack"); }
        let d = t.elapsed();
        println!("  individual publishes, {inflight} in flight: {:?} = {:.0} msg/s | {}", d, N as f64 / d.as_secs_f64(), state(&js, STREAM).await);
    }
    {
        fresh_stream(&js, true).await.unwrap();
        let t = Instant::now();
        for m in &msgs[..2000] {
            let mut h = HeaderMap::new();
            for (k, v) in &m.headers { h.insert(k.as_str(), v.as_str()); }
            js.publish_with_headers(m.subject.clone(), h, m.payload.clone()).await.unwrap().await.unwrap();
        }
        let d = t.elapsed();
        println!("  individual publishes, 1 in flight (2000 msgs only): {:?} = {:.0} msg/s | {}", d, 2000.0 / d.as_secs_f64(), state(&js, STREAM).await);
    }
    extra::bench_fast(url, &msgs).await;
    let _ = js.delete_stream(STREAM).await;
}

use std::future::IntoFuture;

/// Deduplication is bounded by the stream's duplicate_window: a retry after it stores twice,
/// unless an optimistic-concurrency header refuses it.
async fn window(url: &str) {
    let client = async_nats::connect(url).await.expect("connect");
    let js = jetstream::new(client.clone());
    println!("WINDOW server {}", client.server_info().version);
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.to_string(),
        subjects: vec!["probe.>".to_string()],
        allow_atomic_publish: true,
        duplicate_window: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .unwrap();
    println!("  stream with duplicate_window=2s");
    case!(&js, "w1", "3 msgs w-1..w-3 (msg ids only)", send_batch(&client, &ids("w", 1..=3), true, "1").await);
    case!(&js, "w2", "same batch within the window", send_batch(&client, &ids("w", 1..=3), true, "1").await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    case!(&js, "w3", "same batch 3 s later (window passed)", send_batch(&client, &ids("w", 1..=3), true, "1").await);
    println!("  stored: {}", stored(&js, STREAM).await);
    let m = |e: u64| -> Vec<Msg> {
        (1..=3).map(|i| { let x = Msg::new("probe.agg.w").h("Nats-Msg-Id", format!("x-{i}")); if i == 1 { x.h("Nats-Expected-Last-Subject-Sequence", e) } else { x } }).collect()
    };
    case!(&js, "w4", "3 msgs on probe.agg.w, msg ids x-1..x-3, Expected-Last-Subject-Sequence=0 on msg#1", send_batch(&client, &m(0), true, "1").await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    case!(&js, "w5", "same batch 3 s later (window passed)", send_batch(&client, &m(0), true, "1").await);
    let _ = js.delete_stream(STREAM).await;
}

/// A server without atomic batches (2.11): what do the batch headers do there?
async fn old(url: &str) {
    let client = async_nats::connect(url).await.expect("connect");
    let js = jetstream::new(client.clone());
    println!("OLD server {}", client.server_info().version);
    println!("  create with allow_atomic=true -> {:?}", fresh_stream(&js, true).await);
    let si = raw_request(&client, "$JS.API.STREAM.INFO.PROBE", "").await;
    let v: serde_json::Value = serde_json::from_str(&si).unwrap_or_default();
    println!("  STREAM.INFO config.allow_atomic={} metadata={}", v["config"]["allow_atomic"], v["config"]["metadata"]);
    println!("  $JS.API.INFO api -> {}", serde_json::from_str::<serde_json::Value>(&raw_request(&client, "$JS.API.INFO", "").await).unwrap_or_default()["api"]);
    case!(&js, "old-0", "3-msg batch, msg ids oa-1..oa-3, first reply NOT awaited (all sent)",
        send_batch_opts(&client, &ids("oa", 1..=3), true, "1", false, None).await);
    println!("  stored: {}", stored(&js, STREAM).await);
    println!("  create with allow_atomic=false -> {:?}", fresh_stream(&js, false).await);
    case!(&js, "old-1", "3-msg batch with msg ids na-1..na-3", send_batch(&client, &ids("na", 1..=3), true, "1").await);
    println!("  stored: {}", stored(&js, STREAM).await);
    let _ = js.delete_stream(STREAM).await;
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    match args.get(2).map(|s| s.as_str()).unwrap_or("cases") {
        "cases" => cases(&url).await,
        "extra" => extra::run(&url).await,
        "bench" => bench(&url).await,
        "old" => old(&url).await,
        "window" => window(&url).await,
        "rawfast" => extra::run_raw_fast(&url).await,
        "fastsem" => extra::run_fast_semantics(&url).await,
        other => eprintln!("unknown mode {other}"),
    }
}
