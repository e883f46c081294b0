//! Every future a service spawns is `Send + 'static`: each public async fn of the crate (and
//! each public stream) goes through `tokio::spawn` here, so that a future that is not `Send`
//! (a lock guard, a `watch::Ref`, an `Rc` held across an await) fails to compile this file.
//!
//! The tests run on the embedded backend (SQLite in memory, the in-process broker) on a
//! multi-threaded runtime. What needs a JetStream server (the subscriber, the NATS publisher)
//! is spawned in functions that are compiled and never called: `tests/consume.rs` and
//! `tests/ensure_stream.rs` run them. The `generic_*` functions prove the same for any event,
//! projection and aggregate type, not only for the ones of these tests.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{CourseEvent, counted};
use edupulse_events::testing::AggregateTest;
use edupulse_events::{
    Aggregate, Backends, BoxError, BusConfig, DomainEvent, EventBus, EventEnvelope, EventError, EventStore,
    LogRelay, NatsConfig, NatsPublisher, Projection, ProjectionRunner, RelayConfig, Repository, Requeue,
    StoreConfig, StoredSnapshot, StreamPosition, StreamSpec, Subscriber, SubscriberConfig, Transaction, Uuid,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

fn spec() -> StreamSpec {
    StreamSpec::new("EDUPULSE", ["courses.>"])
}

/// The embedded backends, connected in a spawned task.
async fn embedded() -> Backends {
    tokio::spawn(async move { Backends::connect(None, None, StoreConfig::default(), &spec()).await })
        .await
        .unwrap()
        .unwrap()
}

/// A shutdown future for `run`, and the switch that completes it.
fn shutdown() -> (oneshot::Sender<()>, impl Future<Output = ()> + Send + 'static) {
    let (stop, stopped) = oneshot::channel::<()>();
    (stop, async move {
        let _ = stopped.await;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_s_calls_and_streams_run_in_spawned_tasks() {
    let store =
        tokio::spawn(async move { EventStore::connect("sqlite::memory:", StoreConfig::default()).await })
            .await
            .unwrap()
            .unwrap();
    let s = store.clone();
    tokio::spawn(async move { s.migrate().await }).await.unwrap().unwrap();
    let id = Uuid::now_v7();

    let s = store.clone();
    let appended =
        tokio::spawn(async move { s.append("lesson", id, 0, [counted(1), counted(2)]).await }).await.unwrap();
    assert_eq!(appended.unwrap().len(), 2);
    let s = store.clone();
    assert_eq!(tokio::spawn(async move { s.current_sequence(id).await }).await.unwrap().unwrap(), 2);

    // A transaction from begin to commit (and another rolled back), all in one task.
    let s = store.clone();
    let in_tx = tokio::spawn(async move {
        let mut tx = s.begin().await?;
        tx.append("lesson", id, 2, [counted(3)]).await?;
        tx.append_envelopes(3, vec![EventEnvelope::new("lesson", id, counted(4))]).await?;
        s.append_in(tx.connection(), 4, vec![EventEnvelope::new("lesson", id, counted(5))]).await?;
        tx.checkpoint_for_update("spawned").await?;
        tx.save_checkpoint("spawned", StreamPosition::START).await?;
        let checkpoint = tx.checkpoint("spawned").await?;
        tx.commit().await?;
        let tx = s.begin().await?;
        tx.rollback().await?;
        Ok::<_, EventError>(checkpoint)
    });
    assert_eq!(in_tx.await.unwrap().unwrap(), Some(StreamPosition::START));

    let s = store.clone();
    let snapshot = StoredSnapshot {
        aggregate_id: id,
        aggregate_type: "lesson".into(),
        sequence: 5,
        state_version: 1,
        state: "{}".into(),
    };
    let saved = tokio::spawn(async move {
        s.save_snapshot(&snapshot).await?;
        s.snapshot(id).await
    });
    assert_eq!(saved.await.unwrap().unwrap().map(|s| s.sequence), Some(5));

    let s = store.clone();
    let reads = tokio::spawn(async move {
        let checkpoint = s.checkpoint("spawned").await?;
        let after = s.events_after(StreamPosition::START).await?;
        let position = s.position_of(1).await?;
        let rebuild = s.request_rebuild("spawned").await?;
        let migrations = s.migrations().await?;
        let status = s.status().await?;
        let lag = s.relay_lag().await?;
        let repair = s.request_republish_lost().await?;
        let parked = s.parked_events(10).await?;
        let requeued = s.requeue_parked(Requeue::All).await?;
        let _ = (migrations, status, lag, repair, parked, requeued);
        Ok::<_, EventError>((checkpoint, after, position.is_some(), rebuild))
    });
    assert_eq!(reads.await.unwrap().unwrap(), (Some(StreamPosition::START), 5, true, true));

    // The streams, read to the end (and a following one, stopped) in spawned tasks.
    let s = store.clone();
    let streams = tokio::spawn(async move {
        let history = s.load::<CourseEvent>(id, 1).count().await;
        let all = s.stream_all::<CourseEvent>(StreamPosition::START).count().await;
        let by_key = s.events_by_key::<CourseEvent>("author_id", Uuid::now_v7()).count().await;
        let records = s.records(StreamPosition::START).count().await;
        let own = s.aggregate_records(id, 1).count().await;
        (history, all, by_key, records, own)
    });
    assert_eq!(streams.await.unwrap(), (5, 5, 0, 5, 5));
    let s = store.clone();
    let following = tokio::spawn(async move {
        let mut live = s.stream_all::<CourseEvent>(StreamPosition::START).follow(Duration::from_millis(10));
        let mut read = 0;
        while read < 6 {
            live.next().await.transpose()?;
            read += 1;
        }
        Ok::<_, EventError>(read)
    });
    store.append("lesson", id, 5, [counted(6)]).await.unwrap();
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), following).await.unwrap().unwrap().unwrap(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_s_calls_run_in_spawned_tasks() {
    let backends = embedded().await;
    let bus =
        EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default()).unwrap();
    let id = Uuid::now_v7();

    let b = bus.clone();
    let committed = tokio::spawn(async move {
        b.commit(async |tx| {
            tx.subject_prefix(&["tenant-1"])?;
            let first = tx.append("lesson", id, 0, [counted(1)]).await?;
            let second = tx.append_envelopes(1, vec![EventEnvelope::new("lesson", id, counted(2))]).await?;
            Ok::<_, EventError>(first.len() + second.len())
        })
        .await
    })
    .await
    .unwrap()
    .unwrap();
    let receipt = committed.receipt.clone();
    tokio::spawn(async move { receipt.published().await }).await.unwrap().unwrap();
    let stored = tokio::spawn(async move { committed.published().await }).await.unwrap().unwrap();
    assert_eq!(stored, 2);

    let b = bus.clone();
    let closed = tokio::spawn(async move { b.close(Duration::from_secs(10)).await }).await.unwrap().unwrap();
    assert_eq!(closed.unpublished, 0, "{closed:?}");
    let b = bus.clone();
    tokio::spawn(async move { b.shutdown().await }).await.unwrap();
    // The relay tells committers at the acknowledgement and saves its checkpoints at most
    // every `checkpoint_interval`: the lag reads the saved ones, all saved once it stopped.
    let b = bus.clone();
    assert_eq!(tokio::spawn(async move { b.lag().await }).await.unwrap().unwrap().pending, 0);
    let published = backends.in_memory.as_ref().map(|broker| broker.messages().len());
    assert_eq!(published, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_s_calls_run_in_spawned_tasks() {
    let backends = embedded().await;
    let store = backends.store.clone();
    store.append("lesson", Uuid::now_v7(), 0, [counted(1), counted(2)]).await.unwrap();
    let relay = Arc::new(LogRelay::new(store.clone(), backends.publisher.clone(), RelayConfig::default()));

    let r = relay.clone();
    let pass = tokio::spawn(async move { r.run_once().await }).await.unwrap().unwrap();
    assert_eq!(pass.published, 2);
    let r = relay.clone();
    assert_eq!(tokio::spawn(async move { r.lag().await }).await.unwrap().unwrap().pending, 0);
    let r = relay.clone();
    let again = tokio::spawn(async move { r.republish(1, Some(2)).await }).await.unwrap().unwrap();
    assert_eq!(again.stored + again.duplicates, 2, "{again:?}");

    let (stop, stopped) = shutdown();
    let r = relay.clone();
    let running = tokio::spawn(async move { r.run(stopped).await });
    store.append("lesson", Uuid::now_v7(), 0, [counted(3)]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while relay.lag().await.unwrap().pending > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the spawned relay published nothing");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

/// Counts the `Counted` events in a table of the embedded store.
struct Counter {
    applied: AtomicU64,
}

impl Projection<CourseEvent> for Counter {
    fn name(&self) -> &str {
        "spawned-counter"
    }

    async fn apply(&self, tx: &mut Transaction, event: &EventEnvelope<CourseEvent>) -> Result<(), BoxError> {
        let CourseEvent::Counted(c) = &event.event else { return Ok(()) };
        sqlx::query("INSERT INTO spawned_counts (n) VALUES (?)")
            .bind(c.n as i64)
            .execute(common::sqlite(tx.connection()))
            .await?;
        self.applied.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction) -> Result<(), BoxError> {
        sqlx::query("DELETE FROM spawned_counts").execute(common::sqlite(tx.connection())).await?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projection_runner_s_calls_run_in_spawned_tasks() {
    let backends = embedded().await;
    let store = backends.store.clone();
    let mut tx = store.begin().await.unwrap();
    sqlx::query("CREATE TABLE spawned_counts (n INTEGER NOT NULL)")
        .execute(common::sqlite(tx.connection()))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    store.append("lesson", Uuid::now_v7(), 0, [counted(1), counted(2)]).await.unwrap();
    let runner = Arc::new(ProjectionRunner::new(store.clone(), Counter { applied: AtomicU64::new(0) }));

    let r = runner.clone();
    assert_eq!(tokio::spawn(async move { r.catch_up().await }).await.unwrap().unwrap(), 2);
    let r = runner.clone();
    assert_eq!(tokio::spawn(async move { r.rebuild().await }).await.unwrap().unwrap(), 2);

    let (stop, stopped) = shutdown();
    let r = runner.clone();
    let running = tokio::spawn(async move { r.run(stopped).await });
    store.append("lesson", Uuid::now_v7(), 0, [counted(3)]).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while runner.projection().applied.load(Ordering::Relaxed) < 5 {
        assert!(tokio::time::Instant::now() < deadline, "the spawned runner applied nothing new");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

/// A tally of `Counted` events.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Tally {
    sum: u64,
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("zero is refused")]
struct Zero;

impl Aggregate for Tally {
    const TYPE: &'static str = "tally";
    type Event = CourseEvent;
    type Command = u64;
    type Error = Zero;

    fn apply(&mut self, event: &CourseEvent) {
        if let CourseEvent::Counted(c) = event {
            self.sum += c.n;
        }
    }

    fn decide(&self, n: &u64) -> Result<Vec<CourseEvent>, Zero> {
        if *n == 0 { Err(Zero) } else { Ok(vec![counted(*n)]) }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_s_calls_run_in_spawned_tasks() {
    let backends = embedded().await;
    let bus =
        EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default()).unwrap();
    let tallies = Arc::new(Repository::<Tally>::new(bus));
    let id = Uuid::now_v7();

    let executed: Vec<_> = (1..=4u64)
        .map(|n| {
            let t = tallies.clone();
            tokio::spawn(async move { t.execute(id, &n).await })
        })
        .collect();
    for task in executed {
        assert_eq!(task.await.unwrap().unwrap().len(), 1);
    }
    let t = tallies.clone();
    assert_eq!(tokio::spawn(async move { t.load(id).await }).await.unwrap().unwrap().state.sum, 10);
    let t = tallies.clone();
    assert_eq!(tokio::spawn(async move { t.snapshot_now(id).await }).await.unwrap().unwrap().sequence, 4);

    let outcome = tokio::spawn(AggregateTest::<Tally>::given([counted(1)]).when(0)).await.unwrap();
    outcome.then_error(Zero);
}

/// Compiled, never called: the subscriber needs a JetStream server. A handler as a service
/// writes one: shared state in an `Arc`, awaits inside, any error.
#[allow(dead_code, reason = "a compile test: it needs a JetStream server to run")]
fn the_subscriber_runs_in_a_spawned_task(publisher: NatsPublisher, config: SubscriberConfig) {
    tokio::spawn(async move {
        let subscriber = Subscriber::<CourseEvent>::new(publisher.jetstream(), config).await?;
        let seen = Arc::new(tokio::sync::Mutex::new(Vec::new()));
        let (_stop, stopped) = shutdown();
        subscriber
            .run(
                async move |envelope: EventEnvelope<CourseEvent>| {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let n: u64 = envelope.sequence.try_into()?;
                    seen.lock().await.push(n);
                    Ok::<(), BoxError>(())
                },
                stopped,
            )
            .await
    });
}

/// Compiled, never called: the NATS publisher needs a server (and `from_env` may name one).
#[allow(dead_code, reason = "a compile test: it needs a JetStream server to run")]
fn the_nats_publisher_s_calls_run_in_spawned_tasks(url: String) {
    tokio::spawn(async move {
        let publisher = NatsPublisher::connect(&url, NatsConfig::default()).await?;
        publisher.ensure_stream(&spec()).await?;
        let nats = Backends::connect(None, Some(&url), StoreConfig::default(), &spec()).await?;
        let env = Backends::from_env(&spec()).await?;
        Ok::<_, EventError>((publisher, nats, env))
    });
}

/// Compiled, never called: the same calls for any event, projection and aggregate type.
#[allow(dead_code, reason = "a compile test: it proves `Send` for every type parameter")]
fn generic_calls_run_in_spawned_tasks<E, P, A>(
    store: EventStore,
    bus: EventBus,
    events: Vec<E>,
    runner: ProjectionRunner<E, P>,
    repository: Repository<A>,
    command: A::Command,
) where
    E: DomainEvent + Clone,
    P: Projection<E> + 'static,
    A: Aggregate,
    A::Command: 'static,
{
    let id = Uuid::now_v7();
    let s = store.clone();
    let appended = events.clone();
    tokio::spawn(async move { s.append("lesson", id, 0, appended).await });
    let s = store.clone();
    tokio::spawn(async move { s.load::<E>(id, 1).count().await });
    let s = store.clone();
    tokio::spawn(async move { s.stream_all::<E>(StreamPosition::START).count().await });
    tokio::spawn(async move { store.events_by_key::<E>("key", id).count().await });
    let b = bus.clone();
    tokio::spawn(async move {
        b.commit(async |tx| tx.append("lesson", id, 0, events).await).await?.published().await
    });
    let runner = Arc::new(runner);
    let r = runner.clone();
    tokio::spawn(async move { r.run(std::future::pending()).await });
    let r = runner.clone();
    tokio::spawn(async move { r.catch_up().await });
    tokio::spawn(async move { runner.rebuild().await });
    let repository = Arc::new(repository);
    let t = repository.clone();
    tokio::spawn(async move { t.execute(id, &command).await.map(|stored| stored.len()) });
    let t = repository.clone();
    tokio::spawn(async move { t.load(id).await.map(|loaded| loaded.sequence) });
    tokio::spawn(async move { repository.snapshot_now(id).await.map(|loaded| loaded.sequence) });
}
