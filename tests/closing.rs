//! Closing publishes (issue 26, item 3): a process that commits and closes its bus publishes
//! what it committed before it exits, on PostgreSQL with nats-server and on the embedded
//! default; what it could not publish is counted, and a bus dropped without closing says
//! how many of its events wait for the next relay.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::counted;
use common::nats::{self, NatsServer, STREAM};
use edupulse_events::{BusConfig, EventBus, EventStore, InMemoryBroker, StoreConfig, Uuid};

/// 2 000 events in 200 commits over 50 aggregates, the way a batch job writes them.
async fn commit_batch_job(bus: &EventBus) -> usize {
    let aggregates: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    let mut sequences = vec![0i64; aggregates.len()];
    for commit in 0..200usize {
        let i = commit % aggregates.len();
        let (id, expected) = (aggregates[i], sequences[i]);
        let events: Vec<_> = (0..10).map(|n| counted((commit * 10 + n) as u64)).collect();
        bus.commit(async |tx| tx.append("lesson", id, expected, events).await).await.unwrap();
        sequences[i] += 10;
    }
    2_000
}

async fn sqlite_store() -> EventStore {
    let dir = std::env::temp_dir().join(format!("edupulse-closing-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("events.db").display());
    let store = EventStore::connect(&url, StoreConfig::default()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

#[tokio::test]
async fn closing_the_bus_publishes_everything_it_committed_on_postgres_and_nats() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = common::store().await;
    let bus = EventBus::new(store.clone(), Arc::new(publisher.clone()), BusConfig::default()).unwrap();
    let committed = commit_batch_job(&bus).await;
    let closed = bus.close(Duration::from_secs(30)).await.unwrap();
    // `published` counts what was still waiting when close was called.
    assert!(closed.published <= committed, "{closed:?}");
    assert_eq!((closed.parked, closed.unpublished), (0, 0), "{closed:?}");
    // Right after close returns, with no relay left running: the stream holds everything.
    let mut stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, committed as u64);
}

#[tokio::test]
async fn closing_the_bus_publishes_everything_it_committed_on_the_embedded_default() {
    let store = sqlite_store().await;
    let broker = InMemoryBroker::new();
    let bus = EventBus::new(store, Arc::new(broker.clone()), BusConfig::default()).unwrap();
    let committed = commit_batch_job(&bus).await;
    let closed = bus.close(Duration::from_secs(30)).await.unwrap();
    // `published` counts what was still waiting when close was called.
    assert!(closed.published <= committed, "{closed:?}");
    assert_eq!((closed.parked, closed.unpublished), (0, 0), "{closed:?}");
    assert_eq!(broker.messages().len(), committed);
}

#[tokio::test]
async fn closing_while_the_broker_is_down_counts_what_it_could_not_publish_and_leaves_it_to_the_next_relay() {
    let store = sqlite_store().await;
    let broker = InMemoryBroker::new();
    broker.set_available(false);
    let bus = EventBus::new(store.clone(), Arc::new(broker.clone()), BusConfig::default()).unwrap();
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, (0..5).map(counted)).await).await.unwrap();
    let started = std::time::Instant::now();
    let closed = bus.close(Duration::from_millis(500)).await.unwrap();
    assert_eq!((closed.published, closed.unpublished), (0, 5), "{closed:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "close is bounded: {:?}", started.elapsed());
    assert!(broker.messages().is_empty());
    // The next bus on the store (a later run of the program) publishes them.
    broker.set_available(true);
    let next = EventBus::new(store, Arc::new(broker.clone()), BusConfig::default()).unwrap();
    let other = Uuid::now_v7();
    next.commit(async |tx| tx.append("lesson", other, 0, [counted(9)]).await).await.unwrap();
    let closed = next.close(Duration::from_secs(30)).await.unwrap();
    assert_eq!(closed.unpublished, 0, "{closed:?}");
    tokio::time::timeout(Duration::from_secs(10), async {
        while broker.messages().len() < 6 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the 5 events left by the first bus, and the new one, are published");
}

/// Every event's message, captured on the thread of the test.
#[derive(Clone, Default)]
struct Warnings(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Warnings {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                use std::fmt::Write as _;
                let _ = write!(self.0, "{}={value:?} ", field.name());
            }
        }
        let mut text = String::new();
        event.record(&mut Message(&mut text));
        self.0.lock().unwrap().push(text);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn a_bus_dropped_with_unpublished_events_warns_with_their_count() {
    let warnings = Warnings::default();
    let _guard = tracing::subscriber::set_default(warnings.clone());
    let broker = InMemoryBroker::new();
    broker.set_available(false);
    let bus = EventBus::new(sqlite_store().await, Arc::new(broker), BusConfig::default()).unwrap();
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, (0..3).map(counted)).await).await.unwrap();
    drop(bus);
    let warnings = warnings.0.lock().unwrap().clone();
    let dropped: Vec<_> = warnings.iter().filter(|w| w.contains("bus dropped")).collect();
    assert_eq!(dropped.len(), 1, "{warnings:?}");
    assert!(dropped[0].contains("unpublished=3"), "{dropped:?}");
    assert!(dropped[0].contains("next relay"), "{dropped:?}");
}
