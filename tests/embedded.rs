//! The embedded default: the same API on SQLite and the in-process broker, no server.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{CourseEvent, LessonPublished, counted};
use edupulse_events::wire::decode_message;
use edupulse_events::{
    Backends, BusConfig, EventBus, EventError, EventStore, InMemoryBroker, OutboxRelay, RelayConfig,
    StoreConfig, StreamPosition, StreamSpec, Uuid,
};
use futures_util::StreamExt;
use tokio::sync::Barrier;

async fn embedded() -> Backends {
    Backends::connect(None, None, StoreConfig::default(), &StreamSpec::new("EDUPULSE", ["courses.>"]))
        .await
        .unwrap()
}

/// A file database (several connections, WAL), removed by the caller's temp dir.
async fn file_store(dir: &std::path::Path) -> EventStore {
    let url = format!("sqlite://{}", dir.join("events.db").display());
    let store = EventStore::connect(&url, StoreConfig::default()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("edupulse-embedded-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn append_load_conflict_and_upcast_on_sqlite() {
    let backends = embedded().await;
    assert_eq!((backends.database_kind, backends.broker_kind), ("SQLite (embedded)", "in-process broker"));
    let store = &backends.store;
    let id = Uuid::now_v7();
    let stored = store.append("lesson", id, 0, [counted(1), counted(2)]).await.unwrap();
    assert_eq!(stored.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2]);
    let err = store.append("lesson", id, 1, [counted(3)]).await.unwrap_err();
    assert!(matches!(err, EventError::Concurrency { expected: 1, actual: 2, .. }), "{err}");
    let err = store.append("lesson", Uuid::now_v7(), 3, [counted(3)]).await.unwrap_err();
    assert!(matches!(err, EventError::Concurrency { expected: 3, actual: 0, .. }), "{err}");
    let err = store.append("course", id, 2, [counted(3)]).await.unwrap_err();
    assert!(matches!(err, EventError::Config(_)), "{err}");

    // An old deployment wrote version 2 of LessonPublished; it reads back as version 3.
    let old = common::LessonPublishedV2 { lesson_id: id, title: "Old".into() };
    store.append("lesson", id, 2, [old]).await.unwrap();
    let loaded: Vec<_> = store.load::<CourseEvent>(id, 1).map(|r| r.unwrap()).collect().await;
    assert_eq!(loaded.len(), 3);
    assert_eq!(
        loaded[2].event,
        CourseEvent::LessonPublished(LessonPublished { lesson_id: id, author_id: None, title: "Old".into() })
    );
    assert_eq!(store.current_sequence(id).await.unwrap(), 3);

    let all: Vec<_> =
        store.stream_all::<CourseEvent>(StreamPosition::START).map(|r| r.unwrap()).collect().await;
    assert_eq!(all.len(), 3);
    let author = Uuid::now_v7();
    let other = Uuid::now_v7();
    let event = CourseEvent::LessonPublished(LessonPublished {
        lesson_id: other,
        author_id: Some(author),
        title: "K".into(),
    });
    store.append("lesson", other, 0, [event]).await.unwrap();
    let by_key: Vec<_> =
        store.events_by_key::<CourseEvent>("author_id", author).map(|r| r.unwrap()).collect().await;
    assert_eq!(by_key.len(), 1);
    assert_eq!(by_key[0].aggregate_id, other);
}

#[tokio::test]
async fn racers_on_a_sqlite_file_one_winner_per_round() {
    let dir = temp_dir();
    let store = file_store(&dir).await;
    let id = Uuid::now_v7();
    for round in 0..5i64 {
        let barrier = Arc::new(Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|n| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.append("lesson", id, round, [counted(n)]).await
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(_) => winners += 1,
                Err(EventError::Concurrency { actual, .. }) => assert_eq!(actual, round + 1),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(winners, 1);
    }
    assert_eq!(store.current_sequence(id).await.unwrap(), 5);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn bus_publishes_to_the_in_process_broker_and_the_relay_recovers_an_outage() {
    let backends = embedded().await;
    let broker = backends.in_memory.clone().unwrap();
    let mut subscription = broker.subscribe("courses.>").unwrap();
    let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default());
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, [counted(1)]).await).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(3), subscription.recv()).await.unwrap().unwrap();
    assert_eq!(message.subject, "courses.Counted");
    let decoded = decode_message::<CourseEvent>(&message.body).unwrap();
    assert_eq!(decoded.event, counted(1));

    // Broker down: commits succeed, events wait; back up: a relay delivers them once.
    broker.set_available(false);
    for n in 2..=4 {
        bus.commit(async |tx| tx.append("lesson", id, (n - 1) as i64, [counted(n)]).await).await.unwrap();
    }
    assert_eq!(bus.lag().await.unwrap().pending, 3);
    broker.set_available(true);
    // The broker is back, but older events of the aggregate wait in the outbox: the fast
    // path must not publish the new one before them.
    bus.commit(async |tx| tx.append("lesson", id, 4, [counted(5)]).await).await.unwrap();
    assert_eq!(broker.messages().len(), 1, "the new event did not overtake the pending ones");
    let relay = OutboxRelay::new(backends.store.clone(), backends.publisher.clone(), RelayConfig::default());
    relay.run_once().await.unwrap();
    assert_eq!(relay.lag().await.unwrap().pending, 0);
    let sequences: Vec<String> = broker
        .messages()
        .iter()
        .map(|m| m.header("Edupulse-Sequence").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(sequences, ["1", "2", "3", "4", "5"]);

    // Rolled back: nothing.
    let _ = bus
        .commit(async |tx| {
            tx.append("lesson", id, 5, [counted(6)]).await?;
            Err::<(), _>(EventError::Config("no".into()))
        })
        .await;
    relay.run_once().await.unwrap();
    assert_eq!(broker.messages().len(), 5);
}

#[tokio::test]
async fn a_running_relay_is_woken_in_process() {
    let backends = embedded().await;
    let broker = backends.in_memory.clone().unwrap();
    let quiet = BusConfig { publish_after_commit: false, ..BusConfig::default() };
    let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), quiet);
    let config = RelayConfig { poll_interval: Duration::from_secs(3600), ..RelayConfig::default() };
    let relay = OutboxRelay::new(backends.store.clone(), Arc::new(broker.clone()), config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        relay
            .run(async move {
                let _ = stopped.await;
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, [counted(1), counted(2)]).await).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while broker.messages().len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "not woken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn checkpoints_commit_with_the_transaction() {
    let backends = embedded().await;
    let store = &backends.store;
    assert_eq!(store.checkpoint("titles").await.unwrap(), None);
    let at = StreamPosition { transaction_id: 3, global_position: 3 };
    let mut tx = store.begin().await.unwrap();
    tx.save_checkpoint("titles", at).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(store.checkpoint("titles").await.unwrap(), None);
    let mut tx = store.begin().await.unwrap();
    tx.save_checkpoint("titles", at).await.unwrap();
    assert_eq!(tx.checkpoint("titles").await.unwrap(), Some(at));
    tx.commit().await.unwrap();
    assert_eq!(store.checkpoint("titles").await.unwrap(), Some(at));
}

#[tokio::test]
async fn in_memory_broker_drops_resends() {
    let broker = InMemoryBroker::new();
    let backends = embedded().await;
    let bus = EventBus::new(
        backends.store.clone(),
        Arc::new(broker.clone()),
        BusConfig { publish_after_commit: false, ..BusConfig::default() },
    );
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, [counted(1)]).await).await.unwrap();
    let relay = OutboxRelay::new(backends.store.clone(), Arc::new(broker.clone()), RelayConfig::default());
    relay.run_once().await.unwrap();
    relay.run_once().await.unwrap();
    assert_eq!(broker.messages().len(), 1);
}
