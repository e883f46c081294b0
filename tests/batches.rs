//! Batches (issue 27), on the nats-server of `EDUPULSE_NATS_SERVER_BATCH_BIN` (2.15.1 in the
//! suite). Fast-ingest batches (2.14 and later, the default there): a publish goes as one
//! batch, every aggregate in order; a batch sent again stores nothing twice; a refused
//! message stops the batch there, so nothing of its aggregate lands after it. Atomic
//! batches (2.12.1 and later, the path of 2.12 servers; here with fast batches off): an
//! aggregate's long run goes as one batch; a batch sent again after its acknowledgement was
//! lost stores nothing twice, a batch of which only part was stored stores the rest, in
//! order. Older servers get one event at a time. Against real PostgreSQL and nats-server.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;

use common::nats::{NatsServer, STREAM, publisher, publisher_on, spec, stream_messages};
use common::{counted, store};
use edupulse_events::wire::{OutgoingMessage, headers};
use edupulse_events::{
    EventStore, ExpectedSequence, LogRelay, NatsConfig, NatsPublisher, Publisher, RelayConfig, StreamSpec,
    Uuid,
};

/// Appends `n` events to `id`, 100 per commit.
async fn commit(store: &EventStore, id: Uuid, n: u64) {
    for from in (0..n).step_by(100) {
        let events: Vec<_> = (from..(from + 100).min(n)).map(counted).collect();
        store.append("course", id, ExpectedSequence::Any, events).await.unwrap();
    }
}

/// A publisher on `server` with atomic batches only (the path of a 2.12 server).
async fn atomic_only(server: &NatsServer, config: NatsConfig) -> NatsPublisher {
    publisher_on(server, config, spec().with_fast_publish(false)).await
}

/// Publishes the whole log with `run_once` until nothing is left.
async fn drain(store: &EventStore, publisher: &NatsPublisher) {
    let relay = LogRelay::new(store.clone(), std::sync::Arc::new(publisher.clone()), RelayConfig::default());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while relay.lag().await.unwrap().pending > 0 {
        relay.run_once().await.unwrap();
        assert!(tokio::time::Instant::now() < deadline, "not drained: {:?}", relay.lag().await);
    }
}

/// Each aggregate's sequences in stream order, and how often each event id is stored.
async fn stored(publisher: &NatsPublisher) -> (HashMap<Uuid, Vec<i64>>, HashMap<String, usize>, usize) {
    let messages = stream_messages(publisher).await;
    let mut order: HashMap<Uuid, Vec<i64>> = HashMap::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for m in &messages {
        order.entry(m.wire.aggregate_id).or_default().push(m.wire.sequence);
        *ids.entry(m.event_id.clone()).or_default() += 1;
    }
    (order, ids, messages.len())
}

/// Whether the stream's message at `sequence` came in a batch (the server keeps its
/// `Nats-Batch-Id` header).
async fn came_in_a_batch(publisher: &NatsPublisher, sequence: u64) -> bool {
    let stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
    let message = stream.get_raw_message(sequence).await.unwrap();
    message.headers.get("Nats-Batch-Id").is_some()
}

#[tokio::test]
async fn a_hot_aggregate_goes_out_in_atomic_batches_in_order() {
    let server = NatsServer::start_batching().await;
    let publisher = atomic_only(&server, NatsConfig::default()).await;
    let store = store().await;
    let (hot, cold) = (Uuid::now_v7(), Uuid::now_v7());
    commit(&store, hot, 2_500).await;
    commit(&store, cold, 1).await;
    drain(&store, &publisher).await;
    let (order, ids, total) = stored(&publisher).await;
    assert_eq!(total, 2_501);
    assert!(ids.values().all(|n| *n == 1), "an event stored twice");
    assert_eq!(order[&hot], (1..=2_500).collect::<Vec<i64>>(), "the hot aggregate out of order");
    assert_eq!(order[&cold], [1]);
    // Past the batch limit of 1 000 as well: the first and the last of the hot aggregate's
    // came in batches; the lone event of the other one did not need any.
    assert!(came_in_a_batch(&publisher, 1).await || came_in_a_batch(&publisher, 2).await);
    assert!(came_in_a_batch(&publisher, 2_501).await || came_in_a_batch(&publisher, 2_500).await);
}

/// Messages of one aggregate as the relay makes them, on the test stream's subjects.
fn messages(aggregate: Uuid, sequences: std::ops::RangeInclusive<i64>) -> Vec<OutgoingMessage> {
    sequences
        .map(|sequence| {
            let event_id = Uuid::now_v7();
            let body = serde_json::json!({
                "event_id": event_id, "event_type": "Counted", "schema_version": 1, "aggregate_type": "course",
                "aggregate_id": aggregate, "sequence": sequence, "occurred_at": "2026-12-03T00:00:00Z",
                "recorded_at": "2026-12-03T00:00:00Z", "global_position": sequence, "payload": {}, "metadata": {},
            });
            OutgoingMessage {
                event_id,
                aggregate_id: aggregate,
                global_position: sequence,
                subject: "courses.counted".into(),
                headers: vec![(headers::MSG_ID, event_id.to_string()), (headers::AGGREGATE_ID, aggregate.to_string())],
                body: serde_json::to_vec(&body).unwrap().into(),
            }
        })
        .collect()
}

#[tokio::test]
async fn a_batch_sent_again_stores_nothing_twice_and_a_partly_stored_one_stores_the_rest() {
    let server = NatsServer::start_batching().await;
    let publisher = atomic_only(&server, NatsConfig::default().with_min_batch(2)).await;
    let aggregate = Uuid::now_v7();
    let all = messages(aggregate, 1..=10);

    // The first five stored as a batch; their acknowledgement "lost": the relay sends them
    // again, then all ten (its page grew meanwhile).
    let first = publisher.publish(&all[..5]).await;
    assert!(first.iter().all(Result::is_ok), "{first:?}");
    let again = publisher.publish(&all[..5]).await;
    let sequences: Vec<u64> = again.iter().map(|r| r.as_ref().unwrap().stream_sequence).collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5], "a re-sent batch is acknowledged as what the stream holds");
    assert!(again.iter().all(|r| r.as_ref().unwrap().duplicate));
    let grown = publisher.publish(&all).await;
    assert!(grown.iter().all(Result::is_ok), "{grown:?}");
    let (order, ids, total) = stored(&publisher).await;
    assert_eq!(total, 10, "nothing stored twice");
    assert!(ids.values().all(|n| *n == 1));
    assert_eq!(order[&aggregate], (1..=10).collect::<Vec<i64>>());
    // The next batch is a batch again: the fallback was for the one refused.
    let more = messages(aggregate, 11..=30);
    assert!(publisher.publish(&more).await.iter().all(Result::is_ok));
    assert!(came_in_a_batch(&publisher, 30).await, "batches go on after a refused one");
    // Runs shorter than `min_batch` go one at a time (the default is 64).
    let short = atomic_only(&server, NatsConfig::default()).await;
    assert!(short.publish(&messages(aggregate, 31..=40)).await.iter().all(Result::is_ok));
    assert!(!came_in_a_batch(&short, 40).await);
}

#[tokio::test]
async fn a_stream_made_without_atomic_publishing_is_given_it_and_one_asked_without_is_left_alone() {
    let server = NatsServer::start_batching().await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: STREAM.into(),
        subjects: vec!["courses.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let spec = StreamSpec::new(STREAM, ["courses.>"]).with_fast_publish(false);
    let config = NatsConfig::default().with_min_batch(2);
    let plain = NatsPublisher::connect(&server.url(), config.clone()).await.unwrap();
    plain.ensure_stream(&spec.clone().with_atomic_publish(false)).await.unwrap();
    let mut stream = js.get_stream(STREAM).await.unwrap();
    assert!(!stream.info().await.unwrap().config.allow_atomic_publish, "left as the operator made it");
    let aggregate = Uuid::now_v7();
    assert!(plain.publish(&messages(aggregate, 1..=3)).await.iter().all(Result::is_ok));
    assert!(!came_in_a_batch(&plain, 3).await, "one at a time when asked so");

    let batching = NatsPublisher::connect(&server.url(), config).await.unwrap();
    batching.ensure_stream(&spec).await.unwrap();
    assert!(stream.info().await.unwrap().config.allow_atomic_publish);
    assert!(batching.publish(&messages(aggregate, 4..=13)).await.iter().all(Result::is_ok));
    assert!(came_in_a_batch(&batching, 13).await);
}

#[tokio::test]
async fn an_older_server_gets_one_event_at_a_time() {
    // Debian's nats-server (2.9): no atomic batches; the stream is made without them.
    let server = NatsServer::start().await;
    let publisher = publisher(&server).await;
    let mut stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert!(!config.allow_atomic_publish && !config.allow_batch_publish);
    let store = store().await;
    let hot = Uuid::now_v7();
    commit(&store, hot, 300).await;
    drain(&store, &publisher).await;
    let (order, ids, total) = stored(&publisher).await;
    assert_eq!(total, 300);
    assert!(ids.values().all(|n| *n == 1));
    assert_eq!(order[&hot], (1..=300).collect::<Vec<i64>>());
    assert!(!came_in_a_batch(&publisher, 300).await);
}

/// Every sequence a receipt names holds that receipt's message.
async fn assert_named_truly(
    publisher: &NatsPublisher,
    page: &[OutgoingMessage],
    outcomes: &[Result<edupulse_events::PublishReceipt, edupulse_events::EventError>],
) {
    let stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
    for (message, outcome) in page.iter().zip(outcomes) {
        let sequence = outcome.as_ref().unwrap().stream_sequence;
        if sequence == 0 {
            continue;
        }
        let held = stream.get_raw_message(sequence).await.unwrap();
        let id = held.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_owned());
        assert_eq!(
            id,
            Some(message.event_id.to_string()),
            "a receipt names sequence {sequence} for another message"
        );
    }
}

/// Messages of several aggregates, interleaved as a page of the log holds them.
fn interleaved(aggregates: &[Uuid], per_aggregate: i64) -> Vec<OutgoingMessage> {
    let runs: Vec<Vec<OutgoingMessage>> =
        aggregates.iter().map(|a| messages(*a, 1..=per_aggregate)).collect();
    (0..per_aggregate as usize).flat_map(|k| runs.iter().map(move |run| run[k].clone())).collect()
}

#[tokio::test]
async fn a_page_goes_out_as_one_fast_batch_every_aggregate_in_order() {
    let server = NatsServer::start_batching().await;
    let publisher = publisher(&server).await;
    let mut stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
    assert!(stream.info().await.unwrap().config.allow_batch_publish, "ensure_stream asks for fast batches");
    // The server's replies to a fast batch go to subjects ending in `.$FI`: a client of
    // our own listening to every inbox sees whether the publish used one.
    let watcher = async_nats::connect(server.url()).await.unwrap();
    let mut replies = watcher.subscribe("_INBOX.>").await.unwrap();
    watcher.flush().await.unwrap();
    let aggregates: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let page = interleaved(&aggregates, 30);
    let outcomes = publisher.publish(&page).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    let mut fast_replies = 0;
    while let Ok(Some(reply)) = tokio::time::timeout(Duration::from_millis(300), replies.next()).await {
        fast_replies += usize::from(reply.subject.ends_with(".$FI"));
    }
    assert!((1..=10).contains(&fast_replies), "one batch, acknowledged every 100: {fast_replies} replies");
    // The batch's acknowledgement names one sequence, and not which message is there: each
    // aggregate's last message goes after the batch, acknowledged on its own, and its
    // receipt names its sequence (what the relay's marks keep); the batch's others none.
    let named: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| o.as_ref().unwrap().stream_sequence > 0)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(named, (580..600).collect::<Vec<usize>>(), "each aggregate's last");
    assert_named_truly(&publisher, &page, &outcomes).await;

    // Through the relay: a hot aggregate past any batch limit, beside many small ones.
    let store = store().await;
    let hot = Uuid::now_v7();
    commit(&store, hot, 2_500).await;
    let small: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
    for id in &small {
        commit(&store, *id, 3).await;
    }
    drain(&store, &publisher).await;
    let (order, ids, total) = stored(&publisher).await;
    assert_eq!(total, 600 + 2_500 + 600);
    assert!(ids.values().all(|n| *n == 1), "an event stored twice");
    assert_eq!(order[&hot], (1..=2_500).collect::<Vec<i64>>(), "the hot aggregate out of order");
    for id in aggregates.iter().chain(&small) {
        let n = order[id].len() as i64;
        assert_eq!(order[id], (1..=n).collect::<Vec<i64>>());
    }
}

#[tokio::test]
async fn a_fast_batch_sent_again_stores_nothing_twice_and_a_refused_message_stops_it_there() {
    let server = NatsServer::start_batching().await;
    let publisher = publisher(&server).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let page = interleaved(&[a, b], 5);
    // The first six stored; their acknowledgement "lost": the relay sends them again, then
    // the whole page.
    assert!(publisher.publish(&page[..6]).await.iter().all(Result::is_ok));
    assert!(publisher.publish(&page[..6]).await.iter().all(Result::is_ok), "held already: acknowledged");
    assert!(publisher.publish(&page).await.iter().all(Result::is_ok));
    let (order, ids, total) = stored(&publisher).await;
    assert_eq!(total, 10, "nothing stored twice");
    assert!(ids.values().all(|n| *n == 1));
    assert_eq!((order[&a].clone(), order[&b].clone()), ((1..=5).collect(), (1..=5).collect()));

    // A message the stream refuses (larger than its max_msg_size) stops the batch at it:
    // what came before is stored, nothing after it is. No acknowledgement came after what
    // it stored (each aggregate's last message waited for its message before), so each
    // aggregate's last stored message is sent again, one at a time: the stream drops it and
    // names its sequence, which the relay's marks keep.
    let mut stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = 2_048;
    publisher.jetstream().update_stream(&config).await.unwrap();
    let (c, d) = (Uuid::now_v7(), Uuid::now_v7());
    let mut page = interleaved(&[c, d], 4);
    page[4].body = vec![b' '; 4_096].into(); // c's third
    let outcomes = publisher.publish(&page).await;
    let shape: Vec<String> = outcomes
        .iter()
        .map(|o| match o {
            Ok(r) if r.stream_sequence == 0 => "stored".to_owned(),
            Ok(r) => format!("stored at {}{}", r.stream_sequence, if r.duplicate { ", held" } else { "" }),
            Err(e) if e.is_refusal() => "refused".into(),
            Err(e) if e.broker_kind() == Some(edupulse_events::BrokerErrorKind::NotSent) => "not sent".into(),
            Err(_) => "failed".into(),
        })
        .collect();
    assert_eq!(
        shape,
        [
            "stored",
            "stored",
            "stored at 13, held",
            "stored at 14, held",
            "refused",
            "not sent",
            "not sent",
            "not sent"
        ]
    );
    let (order, _, total) = stored(&publisher).await;
    assert_eq!(total, 14);
    assert_eq!((order[&c].clone(), order[&d].clone()), (vec![1, 2], vec![1, 2]));
}

#[tokio::test]
async fn every_sequence_a_fast_batch_names_is_the_stream_s_own() {
    // A re-send after a restart: the stream holds a1 and b1 already; the page holds them
    // again, around x1 (which had waited), with the next event of each and a hot
    // aggregate's four. The batch's range then looks filled by its own messages in order;
    // it is not (b1 is where x1 would be): a receipt that guessed sequences from it would
    // be wrong.
    let server = NatsServer::start_batching().await;
    let publisher = publisher(&server).await;
    let (a, b, x, h) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let (a12, b12, x12) = (messages(a, 1..=2), messages(b, 1..=2), messages(x, 1..=2));
    let held = [a12[0].clone(), b12[0].clone()];
    assert!(publisher.publish(&held).await.iter().all(Result::is_ok));
    let page = [
        vec![a12[0].clone(), x12[0].clone(), b12[0].clone()],
        vec![a12[1].clone(), x12[1].clone(), b12[1].clone()],
        messages(h, 1..=4),
    ]
    .concat();
    let outcomes = publisher.publish(&page).await;
    assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
    assert_named_truly(&publisher, &page, &outcomes).await;
    let named: Vec<usize> =
        (0..page.len()).filter(|&k| outcomes[k].as_ref().unwrap().stream_sequence > 0).collect();
    assert_eq!(named, [3, 4, 5, 9], "each aggregate's last: a2, x2, b2, h4");
    let (_, ids, total) = stored(&publisher).await;
    assert_eq!(total, 10);
    assert!(ids.values().all(|n| *n == 1));
}
