//! Exactly-once projections: a projection killed at random points while processing 5 000
//! events, then restarted, builds the same read model as a clean run; a rebuild beside a
//! running runner applies no event twice; a projection passes over other contexts' events
//! and stops on a corrupt one of its own. Against PostgreSQL (and SQLite where said).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{CourseEvent, counted, store};
use edupulse_events::{
    BoxError, DomainEvent, EventEnvelope, EventError, EventStore, Projection, ProjectionRunner, StoreConfig,
    StreamPosition, Transaction, UndecodablePolicy, Uuid,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// Per aggregate: the number of events and the sum of their `n`.
struct Totals {
    name: String,
    table: String,
}

impl Totals {
    async fn create(store: &EventStore, name: &str) -> Self {
        let table = format!("\"{}\".totals_{}", store.config().schema.as_str(), name.replace('-', "_"));
        let sql = format!(
            "CREATE TABLE {table} (aggregate_id uuid PRIMARY KEY, events bigint NOT NULL, total bigint NOT NULL)"
        );
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&common::pg_pool(store)).await.unwrap();
        Self { name: name.into(), table }
    }

    async fn rows(&self, store: &EventStore) -> Vec<(Uuid, i64, i64)> {
        let sql = format!("SELECT aggregate_id, events, total FROM {} ORDER BY aggregate_id", self.table);
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&common::pg_pool(store)).await.unwrap()
    }
}

impl Projection<CourseEvent> for Totals {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(&self, tx: &mut Transaction, event: &EventEnvelope<CourseEvent>) -> Result<(), BoxError> {
        let CourseEvent::Counted(c) = &event.event else { return Ok(()) };
        let sql = format!(
            "INSERT INTO {} (aggregate_id, events, total) VALUES ($1, 1, $2) \
             ON CONFLICT (aggregate_id) DO UPDATE SET events = {0}.events + 1, total = {0}.total + $2",
            self.table
        );
        let conn = common::pg(tx.connection());
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(event.aggregate_id).bind(c.n as i64).execute(conn).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction) -> Result<(), BoxError> {
        let conn = common::pg(tx.connection());
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {}", self.table))).execute(conn).await?;
        Ok(())
    }
}

#[tokio::test]
async fn killed_at_random_points_then_restarted_equals_a_clean_run() {
    let store = store().await;
    let aggregates: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    for (i, id) in aggregates.iter().enumerate() {
        let events: Vec<_> = (0..100u64).map(|n| counted(n * (i as u64 + 1))).collect();
        store.append("lesson", *id, 0, events).await.unwrap();
    }

    let clean = ProjectionRunner::new(store.clone(), Totals::create(&store, "clean").await);
    end_of_stream(&store).await;
    assert_eq!(clean.catch_up().await.unwrap(), 5_000);
    let expected = clean.projection().rows(&store).await;
    assert_eq!(expected.len(), 50);
    assert!(expected.iter().all(|(_, events, _)| *events == 100));

    let crashy = Totals::create(&store, "crashy").await;
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut kills = 0;
    let mut runner = ProjectionRunner::new(store.clone(), crashy);
    runner.batch_size = 37;
    let runner = Arc::new(runner);
    loop {
        let position = store.checkpoint("crashy").await.unwrap().unwrap_or_default();
        let task = {
            let runner = runner.clone();
            tokio::spawn(async move { runner.catch_up().await })
        };
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        tokio::time::sleep(Duration::from_micros(500 + state % 20_000)).await;
        if task.is_finished() {
            task.await.unwrap().unwrap();
            break;
        }
        task.abort();
        let _ = task.await;
        kills += 1;
        assert!(kills < 10_000, "no progress from {position:?}");
    }
    assert!(kills >= 3, "the projection was killed {kills} times only");
    assert_eq!(runner.projection().rows(&store).await, expected, "killed {kills} times, same read model");
    assert_eq!(runner.catch_up().await.unwrap(), 0);

    // Rebuild from zero on demand gives the same model again.
    assert_eq!(runner.rebuild().await.unwrap(), 5_000);
    assert_eq!(runner.projection().rows(&store).await, expected);
}

#[tokio::test]
async fn two_runners_of_one_projection_never_apply_a_batch_twice() {
    let store = store().await;
    let id = Uuid::now_v7();
    store.append("lesson", id, 0, (1..=500u64).map(counted)).await.unwrap();
    end_of_stream(&store).await;
    let totals = Totals::create(&store, "shared").await;
    let table = totals.table.clone();
    let mut a = ProjectionRunner::new(store.clone(), totals);
    a.batch_size = 10;
    let mut b = ProjectionRunner::new(store.clone(), Totals { name: "shared".into(), table });
    b.batch_size = 10;
    let (ra, rb) = tokio::join!(a.catch_up(), b.catch_up());
    assert_eq!(ra.unwrap() + rb.unwrap(), 500);
    assert_eq!(a.projection().rows(&store).await, [(id, 500, (1..=500).sum::<i64>())]);
}

/// Another bounded context's events, in the same store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "billing")]
#[event(no_aggregate_id)]
struct InvoicePaid {
    cents: u64,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(context = "billing")]
enum BillingEvent {
    InvoicePaid(InvoicePaid),
}

fn paid(cents: u64) -> BillingEvent {
    BillingEvent::InvoicePaid(InvoicePaid { cents })
}

/// The last position of the whole global stream, of any type, once every row is readable:
/// the global stream holds back rows until every older transaction of the database has
/// ended, and tests running beside this one write too.
async fn end_of_stream(store: &EventStore) -> StreamPosition {
    let sql = format!(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint > max(transaction_id) FROM \"{}\".events",
        store.config().schema.as_str()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(sql.clone()))
        .fetch_one(&common::pg_pool(store))
        .await
        .unwrap()
    {
        assert!(tokio::time::Instant::now() < deadline, "the transaction horizon does not move");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sql = format!(
        "SELECT transaction_id, global_position FROM \"{}\".events \
         ORDER BY transaction_id DESC, global_position DESC LIMIT 1",
        store.config().schema.as_str()
    );
    let (transaction_id, global_position) =
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(&common::pg_pool(store)).await.unwrap();
    StreamPosition { transaction_id, global_position }
}

#[tokio::test]
async fn a_projection_passes_over_other_contexts_events_and_stops_on_a_corrupt_one_of_its_own() {
    let store = store().await;
    let (lesson, invoice) = (Uuid::now_v7(), Uuid::now_v7());
    for round in 0..10u64 {
        store
            .append("lesson", lesson, (round * 3) as i64, [counted(1), counted(2), counted(3)])
            .await
            .unwrap();
        store.append("invoice", invoice, (round * 4) as i64, (0..4).map(|c| paid(c + 100))).await.unwrap();
    }
    let mut runner = ProjectionRunner::new(store.clone(), Totals::create(&store, "courses").await);
    runner.batch_size = 7;
    let end = end_of_stream(&store).await;
    assert_eq!(runner.catch_up().await.unwrap(), 30, "every course event, no billing event");
    assert_eq!(runner.projection().rows(&store).await, [(lesson, 30, 60)]);
    assert_eq!(
        store.checkpoint("courses").await.unwrap(),
        Some(end),
        "the checkpoint is past the billing events"
    );
    assert_eq!(runner.catch_up().await.unwrap(), 0);

    // Only other contexts' events since: the checkpoint still follows the end.
    store.append("invoice", invoice, 40, [paid(1), paid(2)]).await.unwrap();
    let end = end_of_stream(&store).await;
    assert_eq!(runner.catch_up().await.unwrap(), 0);
    assert_eq!(store.checkpoint("courses").await.unwrap(), Some(end));

    // A row of one of its own types that does not decode: a typed error naming the row.
    let sql = format!(
        "INSERT INTO \"{}\".events (event_id, aggregate_type, aggregate_id, sequence, event_type, \
             schema_version, payload, occurred_at) \
         VALUES ($1, 'lesson', $2, 31, 'Counted', 1, '{{\"n\": \"not a number\"}}', now()) \
         RETURNING global_position",
        store.config().schema.as_str()
    );
    let corrupt: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(lesson)
        .fetch_one(&common::pg_pool(&store))
        .await
        .unwrap();
    store.append("invoice", invoice, 42, [paid(3)]).await.unwrap();
    let end = end_of_stream(&store).await;
    let before = store.checkpoint("courses").await.unwrap();
    match runner.catch_up().await {
        Err(EventError::Decode { event_type, position, .. }) => {
            assert_eq!((event_type.as_str(), position), ("Counted", Some(corrupt)));
        }
        other => panic!("expected a decode error at {corrupt}, got {other:?}"),
    }
    assert_eq!(store.checkpoint("courses").await.unwrap(), before, "the checkpoint stays before it");

    // Skipping it on purpose moves on to the end.
    runner.on_undecodable = UndecodablePolicy::Skip;
    assert_eq!(runner.catch_up().await.unwrap(), 0);
    assert_eq!(store.checkpoint("courses").await.unwrap(), Some(end));

    // Opting in to every type: another context's event is an unknown type to this one.
    let mut strict = ProjectionRunner::new(store.clone(), Totals::create(&store, "strict").await);
    strict.all_event_types = true;
    match strict.catch_up().await {
        Err(EventError::UnknownEventType { event_type, .. }) => assert_eq!(event_type, "InvoicePaid"),
        other => panic!("expected an unknown event type, got {other:?}"),
    }
}

/// Counts the events it is given; writes nothing (enough for the SQLite check).
struct Counter(AtomicU64);

impl Projection<CourseEvent> for Counter {
    fn name(&self) -> &str {
        "counter"
    }

    async fn apply(&self, _: &mut Transaction, _: &EventEnvelope<CourseEvent>) -> Result<(), BoxError> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::test]
async fn a_projection_on_sqlite_passes_over_other_contexts_events_too() {
    let dir = std::env::temp_dir().join(format!("edupulse-projection-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("events.db").display());
    let store = EventStore::connect(&url, StoreConfig::default()).await.unwrap();
    store.migrate().await.unwrap();
    let (lesson, invoice) = (Uuid::now_v7(), Uuid::now_v7());
    store.append("lesson", lesson, 0, [counted(1), counted(2)]).await.unwrap();
    store.append("invoice", invoice, 0, [paid(1), paid(2), paid(3)]).await.unwrap();

    let runner = ProjectionRunner::new(store.clone(), Counter(AtomicU64::new(0)));
    assert_eq!(runner.catch_up().await.unwrap(), 2);
    let end = store.checkpoint("counter").await.unwrap().unwrap();
    assert_eq!(end.global_position, 5, "past the three billing events");
    assert_eq!(runner.catch_up().await.unwrap(), 0);
    drop(store);
    let _ = std::fs::remove_dir_all(dir);
}

/// How often each event was applied: any count but 1 is a bug. Applying holds the batch's
/// transaction open a little, as a real read model's writes do, and tells the test when it
/// has written a row it has not committed yet.
struct Applications {
    table: String,
    applying: Option<Arc<Notify>>,
}

impl Applications {
    async fn create(store: &EventStore) -> String {
        let table = format!("\"{}\".applications", store.config().schema.as_str());
        let sql = format!("CREATE TABLE {table} (event_id uuid PRIMARY KEY, applied bigint NOT NULL)");
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&common::pg_pool(store)).await.unwrap();
        table
    }

    async fn counts(&self, store: &EventStore) -> Vec<(Uuid, i64)> {
        let sql = format!("SELECT event_id, applied FROM {} ORDER BY event_id", self.table);
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(&common::pg_pool(store)).await.unwrap()
    }
}

impl Projection<CourseEvent> for Applications {
    fn name(&self) -> &str {
        "applications"
    }

    async fn apply(&self, tx: &mut Transaction, event: &EventEnvelope<CourseEvent>) -> Result<(), BoxError> {
        let sql = format!(
            "INSERT INTO {0} (event_id, applied) VALUES ($1, 1) \
             ON CONFLICT (event_id) DO UPDATE SET applied = {0}.applied + 1",
            self.table
        );
        let conn = common::pg(tx.connection());
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(event.event_id).execute(conn).await?;
        if let Some(applying) = &self.applying {
            applying.notify_waiters();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction) -> Result<(), BoxError> {
        let conn = common::pg(tx.connection());
        sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {}", self.table))).execute(conn).await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_rebuild_beside_a_running_runner_applies_every_event_exactly_once() {
    let store = store().await;
    let lesson = Uuid::now_v7();
    let table = Applications::create(&store).await;
    let applying = Arc::new(Notify::new());

    let mut running = ProjectionRunner::new(
        store.clone(),
        Applications { table: table.clone(), applying: Some(applying.clone()) },
    );
    running.batch_size = 10;
    running.poll_interval = Duration::from_millis(5);
    let running = Arc::new(running);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner = {
        let running = running.clone();
        tokio::spawn(async move {
            running
                .run(async move {
                    let _ = stopped.await;
                })
                .await
        })
    };
    let mut rebuilder = ProjectionRunner::new(store.clone(), Applications { table, applying: None });
    rebuilder.batch_size = 10;
    for round in 0..6i64 {
        let mid_batch = applying.notified();
        tokio::pin!(mid_batch);
        mid_batch.as_mut().enable();
        store.append("lesson", lesson, round * 20, (1..=20u64).map(counted)).await.unwrap();
        // The runner has written a row of its batch and not committed it: rebuild now.
        tokio::time::timeout(Duration::from_secs(10), mid_batch).await.expect("the runner applies");
        rebuilder.rebuild().await.unwrap();
        let counts = rebuilder.projection().counts(&store).await;
        let twice: Vec<_> = counts.iter().filter(|(_, applied)| *applied > 1).collect();
        assert!(twice.is_empty(), "rebuild {round}: {} events applied twice: {twice:?}", twice.len());
    }
    end_of_stream(&store).await;
    rebuilder.catch_up().await.unwrap();
    let _ = stop.send(());
    runner.await.unwrap().unwrap();

    let counts = running.projection().counts(&store).await;
    assert_eq!(counts.len(), 120, "every event applied");
    assert!(counts.iter().all(|(_, applied)| *applied == 1), "{counts:?}");
}

/// Records the transaction each event was applied in.
struct Transactions {
    seen: std::sync::Mutex<Vec<i64>>,
}

impl Projection<CourseEvent> for Transactions {
    fn name(&self) -> &str {
        "transactions"
    }

    async fn apply(&self, tx: &mut Transaction, _: &EventEnvelope<CourseEvent>) -> Result<(), BoxError> {
        let id: i64 =
            sqlx::query_scalar("SELECT txid_current()").fetch_one(common::pg(tx.connection())).await?;
        let mut seen = self.seen.lock().unwrap();
        if seen.last() != Some(&id) {
            seen.push(id);
        }
        Ok(())
    }
}

/// A catch-up over a backlog grows its batches (100, 400, 1 600, then the largest), so
/// 3 000 events take four transactions instead of thirty; live events go in small batches
/// again; `events_after` counts the backlog.
#[tokio::test]
async fn catch_up_grows_its_batches_with_the_backlog_and_shrinks_them_when_live() {
    let store = store().await;
    for _ in 0..30 {
        let id = Uuid::now_v7();
        store.append("lesson", id, 0, (1..=100).map(counted)).await.unwrap();
    }
    assert_eq!(store.events_after(StreamPosition::START).await.unwrap(), 3_000);
    // Another test's open transaction would cut a batch short at the horizon.
    common::until_readable(&store, 3_000).await;
    let runner = ProjectionRunner::new(store.clone(), Transactions { seen: Default::default() });
    assert_eq!(runner.catch_up().await.unwrap(), 3_000);
    let batches = runner.projection().seen.lock().unwrap().len();
    assert_eq!(batches, 4, "batches of 100, 400, 1 600 and the remaining 900");
    let checkpoint = store.checkpoint("transactions").await.unwrap().unwrap();
    assert_eq!(store.events_after(checkpoint).await.unwrap(), 0);

    let id = Uuid::now_v7();
    store.append("lesson", id, 0, (1..=150).map(counted)).await.unwrap();
    // Below the horizon once the other tests' transactions of this moment have ended.
    let mut applied = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while applied < 150 && tokio::time::Instant::now() < deadline {
        applied += runner.catch_up().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(applied, 150);
    assert!(
        runner.projection().seen.lock().unwrap().len() >= 4 + 2,
        "live again: batches of 100 at first, not one of 150"
    );

    let mut invalid = ProjectionRunner::new(store.clone(), Transactions { seen: Default::default() });
    invalid.max_batch_size = 10;
    assert!(matches!(invalid.catch_up().await, Err(EventError::Config(_))));
}

/// `execute!` runs one statement, written once, on either backend's connection: the read
/// model's upsert of a projection, on PostgreSQL and on the embedded store.
#[tokio::test]
async fn a_statement_written_once_runs_on_both_backends() {
    let embedded = EventStore::connect("sqlite::memory:", StoreConfig::default()).await.unwrap();
    embedded.migrate().await.unwrap();
    for store in [store().await, embedded] {
        let table = format!("read_{}", Uuid::now_v7().simple());
        let mut tx = store.begin().await.unwrap();
        let create = format!(
            "CREATE TABLE {table} (author TEXT PRIMARY KEY, lessons BIGINT NOT NULL, at TIMESTAMPTZ)"
        );
        edupulse_events::execute!(tx.connection(), sqlx::AssertSqlSafe(create.clone())).unwrap();
        let upsert = format!(
            "INSERT INTO {table} (author, lessons, at) VALUES ($1, $2, $3) \
             ON CONFLICT (author) DO UPDATE SET lessons = {table}.lessons + $2, at = $3"
        );
        let now = edupulse_events::chrono::Utc::now();
        for n in [1_i64, 2, 3] {
            let rows = edupulse_events::execute!(
                tx.connection(),
                sqlx::AssertSqlSafe(upsert.clone()),
                "ada",
                n,
                now
            )
            .unwrap();
            assert_eq!(rows, 1);
        }
        let read = format!("SELECT lessons FROM {table} WHERE author = $1");
        let lessons: i64 = match tx.connection() {
            edupulse_events::Connection::Postgres(c) => sqlx::query_scalar(sqlx::AssertSqlSafe(read.clone()))
                .bind("ada")
                .fetch_one(&mut *c)
                .await
                .unwrap(),
            edupulse_events::Connection::Sqlite(c) => sqlx::query_scalar(sqlx::AssertSqlSafe(read.clone()))
                .bind("ada")
                .fetch_one(&mut *c)
                .await
                .unwrap(),
        };
        assert_eq!(lessons, 6, "{}", store.config().schema.as_str());
        tx.rollback().await.unwrap();
    }
}
