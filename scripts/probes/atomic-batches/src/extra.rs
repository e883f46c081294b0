//! The same flows through Synadia's jetstream-extra 0.3.0, which is built on async-nats 0.48
//! (renamed here to `async_nats_048`): its extension traits are implemented for 0.48's
//! `jetstream::Context`, not for 0.51's.

use async_nats_048 as nats48;
use bytes::Bytes;
use jetstream_extra::batch_publish::BatchPublishExt;
use jetstream_extra::batch_publish_fast::FastPublishExt;
use nats48::jetstream::message::OutboundMessage;
use std::time::{Duration, Instant};

use crate::{state, Msg, STREAM};

const BASE: &str = r#""name":"PROBE","subjects":["probe.>"],"storage":"file","retention":"limits","max_consumers":-1,"max_msgs":-1,"max_bytes":-1,"max_age":0,"num_replicas":1,"discard":"old""#;

async fn create_raw(client: &nats48::Client, extra_json: &str) -> String {
    let _ = client.request("$JS.API.STREAM.DELETE.PROBE", Bytes::new()).await;
    let body = format!("{{{BASE}{extra_json}}}");
    match client.request("$JS.API.STREAM.CREATE.PROBE", Bytes::from(body)).await {
        Ok(m) => {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap_or_default();
            if v["error"].is_null() { "created".into() } else { format!("error {}", v["error"]) }
        }
        Err(e) => format!("request error {e}"),
    }
}

fn out(m: &Msg) -> OutboundMessage {
    let mut h = nats48::HeaderMap::new();
    for (k, v) in &m.headers {
        h.insert(k.as_str(), v.as_str());
    }
    OutboundMessage { subject: m.subject.clone().into(), payload: m.payload.clone(), headers: Some(h) }
}

pub async fn run(url: &str) {
    let client = nats48::connect(url).await.expect("connect");
    let js = nats48::jetstream::new(client.clone());
    let js51 = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    println!("EXTRA server {}", client.server_info().version);

    // Atomic batch through jetstream-extra, plain messages.
    println!("  create allow_atomic stream: {}", create_raw(&client, r#","allow_atomic":true"#).await);
    let mut b = js.batch_publish().build();
    for i in 1..=4 {
        b.add(format!("probe.x.{i}"), Bytes::from_static(b"e")).await.expect("add");
    }
    let ack = b.commit("probe.x.5", Bytes::from_static(b"e")).await;
    println!("  jetstream-extra atomic batch of 5 (no msg ids) -> {ack:?}\n  stream: {}", state(&js51, STREAM).await);
    // With Nats-Msg-Id: the crate refuses it client-side.
    let mut b = js.batch_publish().build();
    let r = b.add_message(out(&Msg::new("probe.x.6").h("Nats-Msg-Id", "id-6"))).await;
    println!("  jetstream-extra add_message with Nats-Msg-Id -> {:?}", r.map_err(|e| e.to_string()));
    let mut b = js.batch_publish().build();
    b.add_message(out(&Msg::new("probe.x.7").h("Nats-Expected-Last-Subject-Sequence", 0))).await.expect("add");
    let r = b.commit_message(out(&Msg::new("probe.x.8").h("Nats-Expected-Last-Subject-Sequence", 0))).await;
    println!("  jetstream-extra batch with Expected-Last-Subject-Sequence on each msg -> {:?}", r.map_err(|e| format!("{} / {:?}", e, e.kind())));

    // Fast ingest (allow_batched, 2.14+).
    let created = create_raw(&client, r#","allow_batched":true"#).await;
    println!("  create allow_batched stream: {created}");
    if created != "created" {
        return;
    }
    for round in ["first", "re-send of the same msg ids"] {
        let mut fp = match js
            .fast_publish()
            .on_error(|e| println!("    on_error: {e} / {:?}", e.kind()))
            .build()
        {
            Ok(f) => f,
            Err(e) => {
                println!("  fast_publish build error {e}");
                return;
            }
        };
        let mut err = None;
        for i in 1..=9 {
            if let Err(e) = fp.add_message(out(&Msg::new(format!("probe.f.{i}")).h("Nats-Msg-Id", format!("f-{i}")))).await {
                err = Some(e.to_string());
                break;
            }
        }
        let r = match err {
            Some(e) => Err(e),
            None => fp.commit_message(out(&Msg::new("probe.f.10").h("Nats-Msg-Id", "f-10"))).await.map_err(|e| format!("{e} / {:?}", e.kind())),
        };
        println!("  fast ingest, 10 msgs with Nats-Msg-Id f-1..f-10 ({round}) -> {r:?}\n  stream: {}", state(&js51, STREAM).await);
    }
    // Raw look at what fast ingest does with a partly duplicate batch (ids f-6..f-15).
    let mut fp = js.fast_publish().on_error(|e| println!("    on_error: {e} / {:?}", e.kind())).build().unwrap();
    for i in 6..=14 {
        fp.add_message(out(&Msg::new(format!("probe.f.{i}")).h("Nats-Msg-Id", format!("f-{i}")))).await.expect("add");
    }
    let r = fp.commit_message(out(&Msg::new("probe.f.15").h("Nats-Msg-Id", "f-15"))).await.map_err(|e| e.to_string());
    println!("  fast ingest, f-6..f-15 (5 already stored) -> {r:?}\n  stream: {}", state(&js51, STREAM).await);
    // Atomic batch headers on an allow_batched-only stream.
    let o = crate::send_batch(&async_nats::connect(url).await.unwrap(), &[Msg::new("probe.z.1"), Msg::new("probe.z.2")], true, "1").await;
    println!("  ADR-50 atomic headers on an allow_batched-only stream -> {}", o.summary());
    let _ = client.request("$JS.API.STREAM.DELETE.PROBE", Bytes::new()).await;
}

pub async fn bench_fast(url: &str, msgs: &[Msg]) {
    let client = nats48::connect(url).await.expect("connect");
    let js = nats48::jetstream::new(client.clone());
    let js51 = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    // jetstream-extra's own atomic batches (ack_first default), for comparison with the hand-rolled ones:
    // msg ids are not allowed by the crate, so these carry none.
    create_raw(&client, r#","allow_atomic":true"#).await;
    let t = Instant::now();
    for chunk in msgs.chunks(100) {
        let mut b = js.batch_publish().build();
        for m in &chunk[..chunk.len() - 1] {
            b.add(m.subject.clone(), m.payload.clone()).await.unwrap();
        }
        let last = &chunk[chunk.len() - 1];
        b.commit(last.subject.clone(), last.payload.clone()).await.unwrap();
    }
    let d = t.elapsed();
    println!("  jetstream-extra atomic batches of 100 (no msg ids), sequential: {:?} = {:.0} msg/s | {}", d, msgs.len() as f64 / d.as_secs_f64(), state(&js51, STREAM).await);

    let created = create_raw(&client, r#","allow_batched":true"#).await;
    if created != "created" {
        println!("  fast ingest: {created}");
        return;
    }
    let t = Instant::now();
    let mut fp = js.fast_publish().ack_timeout(Duration::from_secs(10)).build().unwrap();
    for m in &msgs[..msgs.len() - 1] {
        fp.add_message(out(m)).await.unwrap();
    }
    let r = fp.commit_message(out(&msgs[msgs.len() - 1])).await;
    let d = t.elapsed();
    println!("  fast ingest (jetstream-extra, one batch of {}, flow 100, Nats-Msg-Id on each): {:?} = {:.0} msg/s | ack {:?} | {}",
        msgs.len(), d, msgs.len() as f64 / d.as_secs_f64(), r.map(|a| (a.sequence, a.batch_size)).map_err(|e| e.to_string()), state(&js51, STREAM).await);
}

/// Fast ingest spoken by hand (reply subject `<inbox>.<flow>.<gap>.<seq>.<op>.$FI`, op 0 start,
/// 1 append, 2 commit), printing every reply verbatim.
async fn raw_fast(client: &async_nats::Client, msgs: &[Msg]) -> Vec<String> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(format!("{inbox}.>")).await.unwrap();
    let n = msgs.len();
    for (i, m) in msgs.iter().enumerate() {
        let seq = i + 1;
        let op = if seq == 1 { 0 } else if seq == n { 2 } else { 1 };
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in &m.headers {
            h.insert(k.as_str(), v.as_str());
        }
        client
            .publish_with_reply_and_headers(m.subject.clone(), format!("{inbox}.100.fail.{seq}.{op}.$FI"), h, m.payload.clone())
            .await
            .unwrap();
    }
    let mut out = vec![];
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(700), sub.next()).await {
        let tail: Vec<&str> = r.subject.as_str().rsplitn(4, '.').collect();
        out.push(format!("[{}] {}", tail[..tail.len() - 1].iter().rev().cloned().collect::<Vec<_>>().join("."), String::from_utf8_lossy(&r.payload)));
    }
    out
}

pub async fn run_raw_fast(url: &str) {
    let client = async_nats::connect(url).await.unwrap();
    let js51 = async_nats::jetstream::new(client.clone());
    let c48 = nats48::connect(url).await.unwrap();
    let created = create_raw(&c48, r#","allow_batched":true"#).await;
    println!("RAWFAST server {} create allow_batched: {created}", client.server_info().version);
    if created != "created" {
        return;
    }
    let ids = |r: std::ops::RangeInclusive<u32>| -> Vec<Msg> { r.map(|i| Msg::new(format!("probe.f.{i}")).h("Nats-Msg-Id", format!("f-{i}"))).collect() };
    for (label, m) in [("f-1..f-5 new", ids(1..=5)), ("f-1..f-5 again", ids(1..=5)), ("f-4..f-8 (2 dup, 3 new)", ids(4..=8))] {
        let r = raw_fast(&client, &m).await;
        println!("  {label}: replies {r:?}\n  stream: {}", state(&js51, STREAM).await);
    }
    let _ = js51.delete_stream(STREAM).await;
}

/// Fast ingest, gap "fail", sent without awaiting the first reply; `ops` overrides the
/// operation per message (None: 0 first, 2 last, 1 otherwise); returns every reply.
async fn fast_nowait(client: &async_nats::Client, msgs: &[Msg], flow: u32) -> Vec<String> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(format!("{inbox}.>")).await.unwrap();
    let n = msgs.len();
    for (i, m) in msgs.iter().enumerate() {
        let seq = i + 1;
        let op = if n == 1 { 2 } else if seq == 1 { 0 } else if seq == n { 2 } else { 1 };
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in &m.headers {
            h.insert(k.as_str(), v.as_str());
        }
        client
            .publish_with_reply_and_headers(m.subject.clone(), format!("{inbox}.{flow}.fail.{seq}.{op}.$FI"), h, m.payload.clone())
            .await
            .unwrap();
    }
    let mut out = vec![];
    while let Ok(Some(r)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
        let tail: Vec<&str> = r.subject.as_str().rsplitn(4, '.').collect();
        out.push(format!("[{}] {}", tail[..tail.len() - 1].iter().rev().cloned().collect::<Vec<_>>().join("."), String::from_utf8_lossy(&r.payload)));
    }
    out
}

pub async fn run_fast_semantics(url: &str) {
    let client = async_nats::connect(url).await.unwrap();
    let js51 = async_nats::jetstream::new(client.clone());
    let c48 = nats48::connect(url).await.unwrap();
    let created = create_raw(&c48, r#","allow_batched":true,"allow_atomic":true,"max_msg_size":200"#).await;
    println!("FASTSEM server {} create allow_batched+allow_atomic: {created}", client.server_info().version);
    if created != "created" {
        return;
    }
    let ids = |p: &str, r: std::ops::RangeInclusive<u32>| -> Vec<Msg> { r.map(|i| Msg::new(format!("probe.{p}.{i}")).h("Nats-Msg-Id", format!("{p}-{i}"))).collect() };
    let show = |label: &str, r: Vec<String>| println!("  {label}: {r:?}");
    show("a1..a5 new, no wait", fast_nowait(&client, &ids("a", 1..=5), 100).await);
    println!("    stored: {}", crate::stored(&js51, STREAM).await);
    let mut m = ids("a", 6..=7);
    m.extend(ids("a", 5..=5));
    show("a6,a7 new then a5 dup last", fast_nowait(&client, &m, 100).await);
    println!("    stored: {}", crate::stored(&js51, STREAM).await);
    let mut m = ids("b", 1..=5);
    m[2] = std::mem::replace(&mut m[2], Msg::new("x")).h("Nats-Expected-Last-Subject-Sequence", 999);
    show("b1..b5, b3 expects subject seq 999", fast_nowait(&client, &m, 100).await);
    println!("    stored: {}", crate::stored(&js51, STREAM).await);
    let mut m = ids("c", 1..=5);
    m[2].payload = Bytes::from(vec![b'x'; 400]);
    show("c1..c5, c3 over max_msg_size", fast_nowait(&client, &m, 100).await);
    println!("    stored: {}", crate::stored(&js51, STREAM).await);
    show("d1 alone (one message batch)", fast_nowait(&client, &ids("d", 1..=1), 100).await);
    show("d1 alone again", fast_nowait(&client, &ids("d", 1..=1), 100).await);
    println!("    stored: {}", crate::stored(&js51, STREAM).await);
    show("e1..e50, flow 10, no wait", fast_nowait(&client, &ids("e", 1..=50), 10).await.into_iter().filter(|s| !s.contains("\"ack\"")).collect());
    println!("    {}", crate::state(&js51, STREAM).await);
    // two batches at once from two tasks
    let (c1, c2) = (client.clone(), client.clone());
    let (f, g) = (ids("f", 1..=200), ids("g", 1..=200));
    let (r1, r2) = tokio::join!(fast_nowait(&c1, &f, 100), fast_nowait(&c2, &g, 100));
    println!("  f and g at once: {:?} / {:?}", r1.last(), r2.last());
    println!("    {}", crate::state(&js51, STREAM).await);
    // a batch where the last two are duplicates of earlier, one new before them
    let mut m = ids("h", 1..=1);
    m.extend(ids("a", 6..=7));
    show("h1 new then a6,a7 dup", fast_nowait(&client, &m, 100).await);
    println!("    {}", crate::state(&js51, STREAM).await);
    let _ = js51.delete_stream(STREAM).await;
}
