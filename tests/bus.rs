//! The commit-then-publish bus and the relay that publishes the log, against a real
//! PostgreSQL and real nats-server processes that the tests start, kill and restart.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::nats::{self, NatsServer, stream_messages};
use common::{CourseEvent, LessonPublished, counted, store};
use edupulse_events::wire::{OutgoingMessage, decode_message, headers};
use edupulse_events::{
    BoxFuture, BusConfig, EventBus, EventEnvelope, EventError, EventStore, LogRelay, Metadata, NatsConfig,
    NatsPublisher, PublishReceipt, Publisher, RelayConfig, Requeue, Uuid,
};
use futures_util::StreamExt;

fn bus(store: &EventStore, publisher: &NatsPublisher, config: BusConfig) -> EventBus {
    EventBus::new(store.clone(), Arc::new(publisher.clone()), config).unwrap()
}

/// A bus whose commits nobody publishes: a process that dies right after COMMIT.
fn silent_bus(store: &EventStore, publisher: &NatsPublisher) -> EventBus {
    bus(store, publisher, BusConfig::default().with_background_relay(false))
}

fn relay_config(batch_size: u32) -> RelayConfig {
    RelayConfig::default()
        .with_batch_size(batch_size)
        .with_poll_interval(Duration::from_millis(50))
        .with_takeover_interval(Duration::from_millis(200))
        .with_min_backoff(Duration::from_millis(20))
        .with_max_backoff(Duration::from_millis(500))
}

fn relay(store: &EventStore, publisher: Arc<dyn Publisher>, batch_size: u32) -> LogRelay {
    LogRelay::new(store.clone(), publisher, relay_config(batch_size))
}

/// Runs relay passes until nothing is pending.
async fn drain(relay: &LogRelay) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        relay.run_once().await.unwrap();
        if relay.lag().await.unwrap().pending == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the log was not drained: {:?}", relay.lag().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until nothing is pending (a relay runs elsewhere).
async fn wait_drained(store: &EventStore, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let lag = store.relay_lag().await.unwrap();
        if lag.pending == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not published within {within:?}: {lag:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn spawn_relay(relay: LogRelay) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (stop, running)
}

/// Every committed event is in the stream exactly once, and each aggregate's events are in
/// sequence order.
fn assert_exactly_once_in_order(stored: &[nats::Stored], committed: &BTreeSet<Uuid>) {
    let ids: Vec<String> = stored.iter().map(|m| m.event_id.clone()).collect();
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), unique.len(), "an event is in the stream twice");
    let expected: BTreeSet<String> = committed.iter().map(Uuid::to_string).collect();
    assert_eq!(
        unique.into_iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "the stream holds exactly the committed events"
    );
    let mut last: BTreeMap<Uuid, i64> = BTreeMap::new();
    for m in stored {
        let previous = last.insert(m.wire.aggregate_id, m.wire.sequence).unwrap_or(0);
        assert_eq!(m.wire.sequence, previous + 1, "aggregate {} out of order", m.wire.aggregate_id);
    }
}

async fn commit_events(
    bus: &EventBus,
    aggregates: &[Uuid],
    per_aggregate: u64,
    per_commit: u64,
) -> BTreeSet<Uuid> {
    let mut ids = BTreeSet::new();
    for &aggregate in aggregates {
        let mut sequence = 0;
        while sequence < per_aggregate {
            let n = per_commit.min(per_aggregate - sequence);
            let events: Vec<_> = (sequence..sequence + n).map(counted).collect();
            let stored = bus
                .commit(async |tx| tx.append("lesson", aggregate, sequence as i64, events).await)
                .await
                .unwrap()
                .value;
            ids.extend(stored.iter().map(|e| e.event_id));
            sequence += n;
        }
    }
    ids
}

#[tokio::test]
async fn subscriber_receives_a_committed_event_with_all_headers() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = bus(&store, &publisher, BusConfig::default());

    let client = async_nats::connect(server.url()).await.unwrap();
    let mut subscription = client.subscribe("courses.LessonPublished").await.unwrap();
    client.flush().await.unwrap();

    let id = Uuid::now_v7();
    let cause = EventEnvelope::new("course", Uuid::now_v7(), counted(0));
    let mut envelope = EventEnvelope::new(
        "lesson",
        id,
        CourseEvent::LessonPublished(LessonPublished {
            lesson_id: id,
            author_id: None,
            title: "Live".into(),
        }),
    )
    .caused_by(&cause);
    envelope.metadata.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    let event_id = envelope.event_id;
    let committed = bus.commit(async |tx| tx.append_envelopes(0, vec![envelope]).await).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), committed.receipt.published())
        .await
        .expect("acknowledged within 5 s")
        .unwrap();

    let message = tokio::time::timeout(Duration::from_secs(3), subscription.next())
        .await
        .expect("received within 3 s")
        .expect("a message");
    let h = message.headers.as_ref().expect("headers");
    let header = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(header(headers::MSG_ID), Some(event_id.to_string()));
    assert_eq!(header(headers::EVENT_TYPE).as_deref(), Some("LessonPublished"));
    assert_eq!(header(headers::SCHEMA_VERSION).as_deref(), Some("3"));
    assert_eq!(header(headers::AGGREGATE_TYPE).as_deref(), Some("lesson"));
    assert_eq!(header(headers::AGGREGATE_ID), Some(id.to_string()));
    assert_eq!(header(headers::SEQUENCE).as_deref(), Some("1"));
    assert_eq!(header(headers::CORRELATION_ID), Some(cause.event_id.to_string()));
    assert_eq!(header(headers::CAUSATION_ID), Some(cause.event_id.to_string()));
    assert_eq!(
        header(headers::TRACEPARENT).as_deref(),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );

    let decoded = decode_message::<CourseEvent>(&message.payload).unwrap();
    assert_eq!(decoded.event_id, event_id);
    assert_eq!(decoded.metadata.causation_id, Some(cause.event_id));
    assert!(matches!(decoded.event, CourseEvent::LessonPublished(ref p) if p.title == "Live"));
    // The checkpoint is written right after the acknowledgement the receipt saw.
    wait_drained(&store, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_rolled_back_commit_publishes_nothing() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = bus(&store, &publisher, BusConfig::default());
    let id = Uuid::now_v7();

    let result = bus
        .commit(async |tx| {
            tx.append("lesson", id, 0, [counted(1)]).await?;
            Err::<(), _>(EventError::Config("the domain said no".into()))
        })
        .await;
    assert!(result.is_err());

    // A panic inside the closure rolls back as well.
    let panicking = bus.clone();
    let join = tokio::spawn(async move {
        panicking
            .commit(async |tx| {
                tx.append("lesson", id, 0, [counted(2)]).await?;
                if id != Uuid::nil() {
                    panic!("the handler crashed");
                }
                Ok::<_, EventError>(())
            })
            .await
    })
    .await;
    assert!(join.unwrap_err().is_panic());

    // A conflict inside the closure: nothing either.
    store.append("lesson", id, 0, [counted(3)]).await.unwrap();
    let conflict = bus.commit(async |tx| tx.append("lesson", id, 0, [counted(4)]).await).await;
    assert!(matches!(conflict, Err(EventError::Concurrency { .. })));

    // The appended event is published; nothing rolled back is.
    drain(&relay(&store, Arc::new(publisher.clone()), 100)).await;
    let stored = stream_messages(&publisher).await;
    assert_eq!(stored.len(), 1, "only the committed event is published");
    assert_eq!(stored[0].wire.sequence, 1);
    assert_eq!(bus.lag().await.unwrap().pending, 0);
    assert_eq!(store.current_sequence(id).await.unwrap(), 1);
}

#[tokio::test]
async fn nats_down_at_commit_then_back_everything_is_published_once_in_order() {
    let mut server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let config = BusConfig::default().with_relay(relay_config(100));
    let bus = bus(&store, &publisher, config);

    server.kill().await;
    let aggregates: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let mut committed = commit_events(&bus, &aggregates, 4, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lag = bus.lag().await.unwrap();
    assert_eq!(lag.pending, 12, "commits succeed while NATS is down; the events wait in the log");
    assert_eq!(lag.parked, 0, "an outage parks nothing: {lag:?}");

    server.restart().await;
    let late =
        bus.commit(async |tx| tx.append("lesson", aggregates[0], 4, [counted(99)]).await).await.unwrap();
    committed.insert(late.value[0].event_id);
    tokio::time::timeout(Duration::from_secs(30), late.receipt.published())
        .await
        .expect("published within 30 s of the broker's return")
        .unwrap();
    wait_drained(&store, Duration::from_secs(30)).await;
    // The late event comes after sequence 4 of its aggregate: the order check sees it.
    assert_exactly_once_in_order(&stream_messages(&publisher).await, &committed);
}

#[tokio::test]
async fn commits_nobody_published_are_published_by_a_relay_started_later() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let aggregates: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    // The process commits and dies before any relay published.
    let committed = commit_events(&silent_bus(&store, &publisher), &aggregates, 5, 5).await;
    assert!(stream_messages(&publisher).await.is_empty());

    // A new process: its own store handle, publisher connection and relay.
    let store_again = EventStore::connect(&common::database_url(), store.config().clone()).await.unwrap();
    let publisher_again = nats::publisher(&server).await;
    let relay = relay(&store_again, Arc::new(publisher_again.clone()), 100);
    assert_eq!(relay.lag().await.unwrap().pending, 20);
    drain(&relay).await;
    assert_exactly_once_in_order(&stream_messages(&publisher_again).await, &committed);
}

/// Publishes the first `limit` messages it is given, then never answers again: a relay
/// that dies in the middle of a batch.
struct DiesMidBatch {
    inner: NatsPublisher,
    limit: usize,
}

impl Publisher for DiesMidBatch {
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            let n = self.limit.min(messages.len());
            let _ = self.inner.publish(&messages[..n]).await;
            std::future::pending().await
        })
    }

    edupulse_events::forward_publisher!(inner);
}

#[tokio::test]
async fn relay_killed_mid_batch_and_restarted_duplicates_nothing() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let aggregates: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    let committed = commit_events(&silent_bus(&store, &publisher), &aggregates, 30, 10).await;

    let doomed = relay(&store, Arc::new(DiesMidBatch { inner: publisher.clone(), limit: 7 }), 20);
    let task = tokio::spawn(async move { doomed.run_once().await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream_messages(&publisher).await.len() < 7 {
        assert!(tokio::time::Instant::now() < deadline, "the doomed relay published nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let _ = task.await;
    let relay = relay(&store, Arc::new(publisher.clone()), 20);
    assert_eq!(relay.lag().await.unwrap().pending, 60, "the killed relay's batch was not checkpointed");
    drain(&relay).await;
    let stored = stream_messages(&publisher).await;
    assert_eq!(stored.len(), 60, "re-sent messages were dropped by the duplicate window");
    assert_exactly_once_in_order(&stored, &committed);
}

/// Publishes through `inner`, `delay` per call, counting the calls.
struct Slow {
    inner: NatsPublisher,
    delay: Duration,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl Publisher for Slow {
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            tokio::time::sleep(self.delay).await;
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.inner.publish(messages).await
        })
    }

    edupulse_events::forward_publisher!(inner);
}

#[tokio::test]
async fn a_relay_asked_to_stop_finishes_its_page_and_leaves_the_backlog_with_its_checkpoints_saved() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let aggregates: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    let committed = commit_events(&silent_bus(&store, &publisher), &aggregates, 100, 100).await;
    // 40 pages of 20, a call each, 50 ms a call: about 2 s to drain.
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow = Slow { inner: publisher.clone(), delay: Duration::from_millis(50), calls: calls.clone() };
    let (stop, task) = spawn_relay(relay(&store, Arc::new(slow), 20));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while calls.load(std::sync::atomic::Ordering::SeqCst) < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the relay published nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the relay stops after its page, without draining the backlog first")
        .unwrap();
    let published = stream_messages(&publisher).await.len();
    assert!(published < 400, "the relay went on after it was asked to stop: {published} of 800 published");
    let lag = store.relay_lag().await.unwrap();
    assert_eq!(lag.pending, 800 - published as i64, "the stopped relay saved its checkpoints");
    drain(&relay(&store, Arc::new(publisher.clone()), 100)).await;
    assert_exactly_once_in_order(&stream_messages(&publisher).await, &committed);
}

/// Sets the test stream's largest message, as an operator would.
async fn set_max_msg_size(publisher: &NatsPublisher, bytes: i32) {
    let mut stream = publisher.jetstream().get_stream(nats::STREAM).await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    config.max_message_size = bytes;
    publisher.jetstream().update_stream(&config).await.unwrap();
}

#[tokio::test]
async fn an_event_the_broker_refuses_is_parked_and_holds_back_only_its_aggregate() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    set_max_msg_size(&publisher, 2_000).await;
    let writer = silent_bus(&store, &publisher);
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let big = LessonPublished { lesson_id: a, author_id: None, title: "x".repeat(3_000) };
    let first = writer.commit(async |tx| tx.append("lesson", a, 0, [counted(1)]).await).await.unwrap();
    let refused = writer
        .commit(async |tx| tx.append("lesson", a, 1, [CourseEvent::LessonPublished(big)]).await)
        .await
        .unwrap();
    let behind = writer.commit(async |tx| tx.append("lesson", a, 2, [counted(3)]).await).await.unwrap();
    let others = commit_events(&writer, &[b], 3, 1).await;
    let refused_position = refused.value[0].global_position.unwrap();

    let config = relay_config(100).with_max_attempts(2).with_min_backoff(Duration::from_millis(5));
    let relay = LogRelay::new(store.clone(), Arc::new(publisher.clone()), config);
    drain(&relay).await;
    let stored = stream_messages(&publisher).await;
    let published: BTreeSet<String> = stored.iter().map(|m| m.event_id.clone()).collect();
    let mut expected: BTreeSet<String> = others.iter().map(Uuid::to_string).collect();
    expected.insert(first.value[0].event_id.to_string());
    assert_eq!(published, expected, "the other aggregate and the refused event's predecessor went out");

    let parked = store.parked_events(100).await.unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert_eq!(
        (parked[0].global_position, parked[0].blocked_by, parked[0].attempts),
        (refused_position, None, 2)
    );
    assert!(parked[0].reason.contains("refused"), "{}", parked[0].reason);
    assert_eq!(parked[1].event_id, behind.value[0].event_id);
    assert_eq!(parked[1].blocked_by, Some(refused_position), "the later event waits behind it");
    let lag = store.relay_lag().await.unwrap();
    assert_eq!((lag.pending, lag.parked), (0, 2), "{lag:?}");
    assert!(matches!(
        refused.receipt.published().await,
        Err(EventError::Parked { global_position, .. }) if global_position == refused_position
    ));
    first.receipt.published().await.unwrap();

    // A commit to the parked aggregate waits behind it too; the cause fixed, all go out in order.
    let after = writer.commit(async |tx| tx.append("lesson", a, 3, [counted(4)]).await).await.unwrap();
    drain(&relay).await;
    assert_eq!(store.relay_lag().await.unwrap().parked, 3);
    set_max_msg_size(&publisher, -1).await;
    assert_eq!(store.requeue_parked(Requeue::All).await.unwrap(), 1, "one aggregate re-queued");
    drain(&relay).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.parked_events(10).await.unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "re-queued events not published");
        relay.run_once().await.unwrap();
    }
    after.receipt.published().await.unwrap();
    let mut all = expected;
    for id in [refused.value[0].event_id, behind.value[0].event_id, after.value[0].event_id] {
        all.insert(id.to_string());
    }
    let ids: BTreeSet<Uuid> = all.iter().map(|s| s.parse().unwrap()).collect();
    assert_exactly_once_in_order(&stream_messages(&publisher).await, &ids);
}

#[tokio::test]
async fn a_failed_acknowledgement_mid_batch_never_lets_a_later_event_of_its_aggregate_through() {
    // Every second event of one aggregate is too large for the stream: the broker refuses
    // it, and the publisher must not have sent the aggregate's next event meanwhile
    // (pipelining everything would put sequence 3 in the stream without 2).
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    set_max_msg_size(&publisher, 2_000).await;
    let store = store().await;
    let writer = silent_bus(&store, &publisher);
    let id = Uuid::now_v7();
    let events: Vec<CourseEvent> = (0..20)
        .map(|n| {
            let title = if n % 2 == 1 { "x".repeat(3_000) } else { format!("t{n}") };
            CourseEvent::LessonPublished(LessonPublished { lesson_id: id, author_id: None, title })
        })
        .collect();
    writer.commit(async |tx| tx.append("lesson", id, 0, events).await).await.unwrap();
    // Other tests' transactions share the database's horizon: pass until the event is
    // readable, then twice more.
    let relay = relay(&store, Arc::new(publisher.clone()), 100);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut published = 0;
    while published == 0 {
        assert!(tokio::time::Instant::now() < deadline, "nothing became readable");
        published += relay.run_once().await.unwrap().published;
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        published += relay.run_once().await.unwrap().published;
    }
    assert_eq!(published, 1);
    let sequences: Vec<i64> = stream_messages(&publisher).await.iter().map(|m| m.wire.sequence).collect();
    assert_eq!(sequences, [1], "nothing after the refused event of the aggregate reached the stream");
}

#[tokio::test]
async fn publishes_holding_more_than_the_acknowledgement_window_all_complete() {
    // 16 acknowledgements in flight at most, for the whole publisher; two relays of 32
    // partitions each and 8 committers want far more at once.
    let server = NatsServer::start().await;
    let small = nats::publisher_with(&server, NatsConfig::default().with_max_ack_inflight(16)).await;
    let store = store().await;
    let aggregates: Vec<Uuid> = (0..64).map(|_| Uuid::now_v7()).collect();
    let mut committed = commit_events(&silent_bus(&store, &small), &aggregates, 20, 20).await;
    let halves = [0..32, 32..64].map(|partitions| {
        let config = relay_config(500).with_partitions(partitions);
        spawn_relay(LogRelay::new(store.clone(), Arc::new(small.clone()), config))
    });
    let live = bus(&store, &small, BusConfig::default().with_background_relay(false));
    let commits = (0..8).map(|_| {
        let live = live.clone();
        tokio::spawn(async move {
            let id = Uuid::now_v7();
            let events: Vec<_> = (0..50).map(counted).collect();
            let committed = live.commit(async |tx| tx.append("lesson", id, 0, events).await).await.unwrap();
            committed.published().await.unwrap()
        })
    });
    let stored = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(commits))
        .await
        .expect("publishes wait for each other's acknowledgement slots, never for ever");
    for envelopes in stored {
        committed.extend(envelopes.unwrap().iter().map(|e| e.event_id));
    }
    wait_drained(&store, Duration::from_secs(30)).await;
    for (stop, task) in halves {
        stop.send(()).unwrap();
        task.await.unwrap();
    }
    assert_exactly_once_in_order(&stream_messages(&small).await, &committed);
}

#[tokio::test]
async fn two_relays_sharing_the_partitions_keep_ten_thousand_events_in_order() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = common::store_with(|c| c.max_connections = 30).await;
    let aggregates: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    let writer = silent_bus(&store, &publisher);
    // Half committed before the relays start, half while they run.
    let mut committed = commit_events(&writer, &aggregates[..50], 100, 50).await;
    let relays = [0..32, 32..64].map(|partitions| {
        let config = relay_config(250).with_partitions(partitions);
        spawn_relay(LogRelay::new(store.clone(), Arc::new(publisher.clone()), config))
    });
    committed.extend(commit_events(&writer, &aggregates[50..], 100, 50).await);
    assert_eq!(committed.len(), 10_000);
    wait_drained(&store, Duration::from_secs(120)).await;
    for (stop, task) in relays {
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("graceful shutdown").unwrap();
    }
    let stored = stream_messages(&publisher).await;
    assert_eq!(stored.len(), 10_000);
    assert_exactly_once_in_order(&stored, &committed);
}

#[tokio::test]
async fn a_standby_relay_takes_over_within_seconds_of_the_holders_death() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let writer = silent_bus(&store, &publisher);
    let holder = tokio::spawn({
        let relay = relay(&store, Arc::new(publisher.clone()), 100);
        async move { relay.run(std::future::pending()).await }
    });
    let id = Uuid::now_v7();
    writer.commit(async |tx| tx.append("lesson", id, 0, [counted(1)]).await).await.unwrap();
    wait_drained(&store, Duration::from_secs(5)).await;
    // The standby finds every partition held, and waits.
    let (stop, standby) = spawn_relay(relay(&store, Arc::new(publisher.clone()), 100));
    tokio::time::sleep(Duration::from_millis(500)).await;

    holder.abort();
    let _ = holder.await;
    let killed = tokio::time::Instant::now();
    let next = writer.commit(async |tx| tx.append("lesson", id, 1, [counted(2)]).await).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), next.receipt.published())
        .await
        .expect("the standby published within 5 s of the holder's death")
        .unwrap();
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "took over in {took:?}");
    let sequences: Vec<i64> = stream_messages(&publisher).await.iter().map(|m| m.wire.sequence).collect();
    assert_eq!(sequences, [1, 2]);
    stop.send(()).unwrap();
    standby.await.unwrap();
}

#[tokio::test]
async fn a_long_write_transaction_holds_publication_back_and_lag_names_it() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let config = BusConfig::default().with_relay(relay_config(100));
    let bus = bus(&store, &publisher, config);
    let pool = common::pg_pool(&store);

    // Someone's write transaction, open for a while.
    let mut long = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()").execute(&mut *long).await.unwrap();
    let committed =
        bus.commit(async |tx| tx.append("lesson", Uuid::now_v7(), 0, [counted(1)]).await).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(stream_messages(&publisher).await.is_empty(), "the relay reads nothing above the horizon");
    let lag = bus.lag().await.unwrap();
    assert_eq!((lag.pending, lag.held_back), (1, 1), "{lag:?}");
    let holder = lag.oldest_write_transaction.expect("the transaction holding the horizon is named");
    assert!(holder.age >= Duration::from_millis(1_500), "{holder:?}");
    assert!(holder.pid > 0);

    long.commit().await.unwrap();
    let released = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(2), committed.receipt.published())
        .await
        .expect("published within the poll interval once the horizon moved")
        .unwrap();
    assert!(released.elapsed() < Duration::from_secs(1), "{:?}", released.elapsed());
}

#[tokio::test]
async fn run_time_subject_tokens_are_checked() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = bus(&store, &publisher, BusConfig::default());
    let id = Uuid::now_v7();
    for bad in ["", "a.b", "*", ">", "a b", "tab\t", "é", "x>"] {
        let result = bus
            .commit(async |tx| {
                tx.subject_prefix(&[bad])?;
                tx.append("lesson", id, 0, [counted(1)]).await
            })
            .await;
        assert!(matches!(result, Err(EventError::InvalidSubject { .. })), "{bad:?}: {result:?}");
    }
    assert_eq!(store.current_sequence(id).await.unwrap(), 0, "nothing was written");

    bus.commit(async |tx| {
        tx.subject_prefix(&["tenant-42"])?;
        tx.append("lesson", id, 0, [counted(1)]).await
    })
    .await
    .unwrap()
    .published()
    .await
    .unwrap();
    let stored = stream_messages(&publisher).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].subject, "tenant-42.courses.Counted");
}

#[tokio::test]
async fn resends_inside_the_duplicate_window_are_dropped() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = silent_bus(&store, &publisher);
    let id = Uuid::now_v7();
    let envelope = EventEnvelope::new("lesson", id, counted(1)).with_metadata(Metadata::default());
    bus.commit(async |tx| tx.append_envelopes(0, vec![envelope]).await).await.unwrap();

    // Publish the same event twice, as a relay and one that took over after it would.
    let relay_a = relay(&store, Arc::new(publisher.clone()), 10);
    let message = {
        let row = store.load::<CourseEvent>(id, 1).next().await.unwrap().unwrap();
        let body = serde_json::json!({
            "event_id": row.event_id, "event_type": "Counted", "schema_version": 1, "aggregate_type": "lesson",
            "aggregate_id": id, "sequence": 1, "global_position": row.global_position,
            "occurred_at": row.occurred_at, "recorded_at": row.recorded_at, "metadata": {}, "payload": {"n": 1}
        });
        OutgoingMessage {
            event_id: row.event_id,
            aggregate_id: id,
            global_position: row.global_position.unwrap(),
            subject: "courses.Counted".into(),
            headers: vec![(headers::MSG_ID, row.event_id.to_string())],
            body: serde_json::to_vec(&body).unwrap().into(),
        }
    };
    let first = publisher.publish(std::slice::from_ref(&message)).await.remove(0).unwrap();
    assert!(!first.duplicate);
    drain(&relay_a).await;
    let again = publisher.publish(std::slice::from_ref(&message)).await.remove(0).unwrap();
    assert!(again.duplicate, "JetStream recognised the re-send");
    assert_eq!(again.stream_sequence, first.stream_sequence);
    assert_eq!(stream_messages(&publisher).await.len(), 1);
}
