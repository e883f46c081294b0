//! The commit-then-publish bus and the outbox relay, against a real PostgreSQL and real
//! nats-server processes that the tests start, kill and restart.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::nats::{self, NatsServer, stream_messages};
use common::{CourseEvent, LessonPublished, counted, store};
use edupulse_events::wire::{OutgoingMessage, decode_message, headers};
use edupulse_events::{
    BoxFuture, BusConfig, EventBus, EventEnvelope, EventError, EventStore, Metadata, NatsConfig,
    NatsPublisher, OutboxRelay, PublishReceipt, Publisher, RelayConfig, Uuid,
};
use futures_util::StreamExt;

fn bus(store: &EventStore, publisher: &NatsPublisher, config: BusConfig) -> EventBus {
    EventBus::new(store.clone(), Arc::new(publisher.clone()), config)
}

fn relay(store: &EventStore, publisher: Arc<dyn Publisher>, batch_size: u32) -> OutboxRelay {
    let config = RelayConfig {
        batch_size,
        poll_interval: Duration::from_millis(50),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        ..RelayConfig::default()
    };
    OutboxRelay::new(store.clone(), publisher, config)
}

/// Runs relay passes until the outbox is empty.
async fn drain(relay: &OutboxRelay) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        relay.run_once().await.unwrap();
        if relay.lag().await.unwrap().pending == 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the outbox did not drain: {:?}", relay.lag().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
                .unwrap();
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
    bus.commit(async |tx| tx.append_envelopes(0, vec![envelope]).await).await.unwrap();

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
    assert_eq!(bus.lag().await.unwrap().pending, 0, "acknowledged rows leave the outbox");
}

#[tokio::test]
async fn a_rolled_back_commit_publishes_nothing() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = bus(&store, &publisher, BusConfig::default());
    let id = Uuid::now_v7();

    let result: Result<(), EventError> = bus
        .commit(async |tx| {
            tx.append("lesson", id, 0, [counted(1)]).await?;
            Err(EventError::Config("the domain said no".into()))
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

    relay(&store, Arc::new(publisher.clone()), 100).run_once().await.unwrap();
    assert!(stream_messages(&publisher).await.is_empty(), "nothing rolled back is ever published");
    assert_eq!(bus.lag().await.unwrap().pending, 0);
    assert_eq!(store.current_sequence(id).await.unwrap(), 1);
}

#[tokio::test]
async fn nats_down_at_commit_then_back_the_relay_delivers_everything_once() {
    let mut server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = bus(&store, &publisher, BusConfig::default());

    server.kill().await;
    let aggregates: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    let committed = commit_events(&bus, &aggregates, 4, 2).await;
    let lag = bus.lag().await.unwrap();
    assert_eq!(lag.pending, 12, "commits succeed while NATS is down; the events wait");
    assert!(lag.max_attempts >= 1 && lag.last_error.is_some(), "{lag:?}");

    server.restart().await;
    // Back up, but older events wait in the outbox: a new commit must not overtake them.
    let mut committed = committed;
    let late =
        bus.commit(async |tx| tx.append("lesson", aggregates[0], 4, [counted(99)]).await).await.unwrap();
    committed.insert(late[0].event_id);
    // (Had it overtaken them, the order check below would fail: it comes after sequence 4.)
    let relay = relay(&store, Arc::new(publisher.clone()), 100);
    drain(&relay).await;
    let stored = stream_messages(&publisher).await;
    assert_exactly_once_in_order(&stored, &committed);
}

#[tokio::test]
async fn process_dies_between_commit_and_publish_a_fresh_relay_delivers() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let aggregates: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    let committed = {
        // The hook: the bus commits and "dies" before its publish after commit.
        let dying =
            bus(&store, &publisher, BusConfig { publish_after_commit: false, ..BusConfig::default() });
        commit_events(&dying, &aggregates, 5, 5).await
    };
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
}

#[tokio::test]
async fn relay_killed_mid_batch_and_restarted_duplicates_nothing() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let dying = bus(&store, &publisher, BusConfig { publish_after_commit: false, ..BusConfig::default() });
    let aggregates: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    let committed = commit_events(&dying, &aggregates, 30, 10).await;

    let doomed = relay(&store, Arc::new(DiesMidBatch { inner: publisher.clone(), limit: 7 }), 20);
    let task = tokio::spawn(async move { doomed.run_once().await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream_messages(&publisher).await.len() < 7 {
        assert!(tokio::time::Instant::now() < deadline, "the doomed relay published nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let _ = task.await;
    assert_eq!(store.pg_pool().map(|_| ()), Some(()));
    let relay = relay(&store, Arc::new(publisher.clone()), 20);
    assert_eq!(relay.lag().await.unwrap().pending, 60, "the killed relay's batch was not marked done");
    drain(&relay).await;
    let stored = stream_messages(&publisher).await;
    assert_eq!(stored.len(), 60, "re-sent messages were dropped by the duplicate window");
    assert_exactly_once_in_order(&stored, &committed);
}

/// Acknowledges the first `limit` messages of each batch and refuses the rest: a broker
/// that rejects part of a batch (a stream full, a subject no stream takes).
struct RefusesAfter {
    inner: NatsPublisher,
    limit: usize,
}

impl Publisher for RefusesAfter {
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            let n = self.limit.min(messages.len());
            let mut outcomes = self.inner.publish(&messages[..n]).await;
            outcomes
                .extend(messages[n..].iter().map(|_| Err(EventError::Broker("refused by the test".into()))));
            outcomes
        })
    }
}

#[tokio::test]
async fn a_batch_the_broker_partly_refuses_leaves_exactly_the_refused_rows() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let dying = bus(&store, &publisher, BusConfig { publish_after_commit: false, ..BusConfig::default() });
    let aggregate = Uuid::now_v7();
    let committed = commit_events(&dying, &[aggregate], 10, 10).await;

    let refusing = relay(&store, Arc::new(RefusesAfter { inner: publisher.clone(), limit: 4 }), 20);
    let pass = refusing.run_once().await.unwrap();
    assert_eq!((pass.published, pass.failed), (4, 6), "{pass:?}");
    let lag = refusing.lag().await.unwrap();
    assert_eq!(lag.pending, 6, "the acknowledged rows are gone, the refused ones stay");
    assert_eq!(lag.max_attempts, 1, "{lag:?}");
    assert_eq!(lag.last_error.as_deref(), Some("broker error: refused by the test"), "{lag:?}");
    let stored = stream_messages(&publisher).await;
    let sequences: Vec<i64> = stored.iter().map(|m| m.wire.sequence).collect();
    assert_eq!(sequences, [1, 2, 3, 4], "exactly the acknowledged events were published");

    // A second refusing pass counts another attempt and publishes nothing new.
    let pass = relay(&store, Arc::new(RefusesAfter { inner: publisher.clone(), limit: 0 }), 20)
        .run_once()
        .await
        .unwrap();
    assert_eq!((pass.published, pass.failed), (0, 6), "{pass:?}");
    assert_eq!(refusing.lag().await.unwrap().max_attempts, 2);

    drain(&relay(&store, Arc::new(publisher.clone()), 20)).await;
    assert_exactly_once_in_order(&stream_messages(&publisher).await, &committed);
}

#[tokio::test]
async fn publishes_holding_more_than_the_acknowledgement_window_all_complete() {
    // 16 acknowledgements in flight at most, for the whole publisher; 8 relay partitions
    // of 100 events and 8 committers of 50 events each want far more at once. Each must
    // await its own oldest acknowledgement instead of waiting for slots only it can free.
    let server = NatsServer::start().await;
    let small =
        nats::publisher_with(&server, NatsConfig { max_ack_inflight: 16, ..NatsConfig::default() }).await;
    let store = store().await;
    let dying = bus(&store, &small, BusConfig { publish_after_commit: false, ..BusConfig::default() });
    let mut committed = BTreeSet::new();
    let mut aggregates = Vec::new();
    // Aggregates in eight different outbox partitions, so eight claimers run at once.
    while aggregates.len() < 8 {
        let id = Uuid::now_v7();
        if aggregates.iter().all(|other: &Uuid| other.as_u128() % 64 != id.as_u128() % 64) {
            aggregates.push(id);
        }
    }
    committed.extend(commit_events(&dying, &aggregates, 100, 100).await);
    let config = RelayConfig { batch_size: 100, concurrency: 8, ..RelayConfig::default() };
    let relay = OutboxRelay::new(store.clone(), Arc::new(small.clone()), config);
    let pass = tokio::time::timeout(Duration::from_secs(30), relay.run_once())
        .await
        .expect("the relay's partitions wait for each other's acknowledgement slots")
        .unwrap();
    assert_eq!((pass.published, pass.failed), (800, 0), "{pass:?}");

    let live = bus(&store, &small, BusConfig::default());
    let commits = (0..8).map(|_| {
        let live = live.clone();
        tokio::spawn(async move {
            let id = Uuid::now_v7();
            let events: Vec<_> = (0..50).map(counted).collect();
            live.commit(async |tx| tx.append("lesson", id, 0, events).await).await.unwrap()
        })
    });
    let stored = tokio::time::timeout(Duration::from_secs(30), futures_util::future::join_all(commits))
        .await
        .expect("concurrent commits wait for each other's acknowledgement slots");
    for envelopes in stored {
        committed.extend(envelopes.unwrap().iter().map(|e| e.event_id));
    }
    assert_eq!(live.lag().await.unwrap().pending, 0, "every commit was acknowledged right away");
    assert_exactly_once_in_order(&stream_messages(&small).await, &committed);
}

#[tokio::test]
async fn two_relays_on_ten_thousand_events_keep_every_aggregate_in_order() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = common::store_with(|c| c.max_connections = 30).await;
    let writer = bus(&store, &publisher, BusConfig { publish_after_commit: false, ..BusConfig::default() });
    let aggregates: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    let committed = commit_events(&writer, &aggregates, 100, 50).await;
    assert_eq!(committed.len(), 10_000);

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let relay = relay(&store, Arc::new(publisher.clone()), 250);
            let mut stopped = stopped.clone();
            tokio::spawn(async move {
                relay
                    .run(async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    })
                    .await
            })
        })
        .collect();
    let watcher = relay(&store, Arc::new(publisher.clone()), 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while watcher.lag().await.unwrap().pending > 0 {
        assert!(tokio::time::Instant::now() < deadline, "not drained: {:?}", watcher.lag().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.send(true).unwrap();
    for relay in relays {
        tokio::time::timeout(Duration::from_secs(10), relay)
            .await
            .expect("graceful shutdown")
            .unwrap()
            .unwrap();
    }
    let stored = stream_messages(&publisher).await;
    assert_eq!(stored.len(), 10_000);
    assert_exactly_once_in_order(&stored, &committed);
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
    let bus = bus(&store, &publisher, BusConfig { publish_after_commit: false, ..BusConfig::default() });
    let id = Uuid::now_v7();
    let envelope = EventEnvelope::new("lesson", id, counted(1)).with_metadata(Metadata::default());
    bus.commit(async |tx| tx.append_envelopes(0, vec![envelope]).await).await.unwrap();

    // Publish the same pending rows twice, as two relays racing would.
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

/// Counts what goes through it: how many events a relay published.
struct Counting {
    inner: NatsPublisher,
    count: Arc<std::sync::atomic::AtomicUsize>,
}

impl Publisher for Counting {
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        self.count.fetch_add(messages.len(), std::sync::atomic::Ordering::SeqCst);
        self.inner.publish(messages)
    }
}

/// Never answers: a process that dies while publishing.
struct Hangs;

impl Publisher for Hangs {
    fn publish<'a>(
        &'a self,
        _: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(std::future::pending())
    }
}

fn spawn_relay(relay: OutboxRelay) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
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

#[tokio::test]
async fn a_running_relay_leaves_the_committing_bus_its_own_events() {
    // A relay polling every 10 ms while 8 committers publish their own events: without the
    // settle time it claims rows between their COMMIT and their publish, publishing them a
    // second time and making the next commits of those aggregates wait for it.
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let config = RelayConfig {
        poll_interval: Duration::from_millis(10),
        settle_time: Duration::from_secs(5),
        ..RelayConfig::default()
    };
    let counting = Counting { inner: publisher.clone(), count: count.clone() };
    let (stop, running) = spawn_relay(OutboxRelay::new(store.clone(), Arc::new(counting), config));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let live = bus(&store, &publisher, BusConfig::default());
    let committers = (0..8).map(|_| {
        let live = live.clone();
        tokio::spawn(async move { commit_events(&live, &[Uuid::now_v7()], 40, 1).await })
    });
    let mut committed = BTreeSet::new();
    for ids in futures_util::future::join_all(committers).await {
        committed.extend(ids.unwrap());
    }
    assert_eq!(live.lag().await.unwrap().pending, 0);
    assert_eq!(
        count.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the relay published events the bus was publishing"
    );
    assert_exactly_once_in_order(&stream_messages(&publisher).await, &committed);
    stop.send(()).unwrap();
    running.await.unwrap();
}

#[tokio::test]
async fn events_of_a_bus_that_died_while_publishing_are_published_once_settled() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let config = RelayConfig {
        poll_interval: Duration::from_millis(50),
        settle_time: Duration::from_millis(300),
        ..RelayConfig::default()
    };
    let (stop, running) = spawn_relay(OutboxRelay::new(store.clone(), Arc::new(publisher.clone()), config));
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The bus commits, starts publishing and never finishes: no notification reaches the relay.
    let dying = EventBus::new(store.clone(), Arc::new(Hangs), BusConfig::default());
    let aggregate = Uuid::now_v7();
    let commit = tokio::spawn(async move { commit_events(&dying, &[aggregate], 3, 3).await });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while live_pending(&store).await < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the commit did not happen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    commit.abort();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream_messages(&publisher).await.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the relay never took the orphaned events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stored = stream_messages(&publisher).await;
    let sequences: Vec<i64> = stored.iter().map(|m| m.wire.sequence).collect();
    assert_eq!(sequences, [1, 2, 3]);
    assert!(stored.iter().all(|m| m.wire.aggregate_id == aggregate));
    stop.send(()).unwrap();
    running.await.unwrap();
}

async fn live_pending(store: &EventStore) -> i64 {
    OutboxRelay::new(store.clone(), Arc::new(Hangs), RelayConfig::default()).lag().await.unwrap().pending
}

#[tokio::test]
async fn a_running_relay_is_woken_by_notify_not_by_polling() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let writer = bus(&store, &publisher, BusConfig { publish_after_commit: false, ..BusConfig::default() });
    let config = RelayConfig { poll_interval: Duration::from_secs(3600), ..RelayConfig::default() };
    let (stop, running) = spawn_relay(OutboxRelay::new(store.clone(), Arc::new(publisher.clone()), config));
    // Let the relay finish its first (empty) pass and start waiting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let committed = commit_events(&writer, &[Uuid::now_v7()], 3, 3).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while stream_messages(&publisher).await.len() < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the relay was not woken by the commit's NOTIFY");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_exactly_once_in_order(&stream_messages(&publisher).await, &committed);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("stops on the shutdown signal")
        .unwrap();
}
