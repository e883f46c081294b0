//! Exactly-once projections: a projection killed at random points while processing 5 000
//! events, then restarted, builds the same read model as a clean run. Against PostgreSQL.

mod common;

use std::time::Duration;

use common::{CourseEvent, counted, store};
use edupulse_events::{
    EventEnvelope, EventError, EventStore, Projection, ProjectionRunner, Transaction, Uuid,
};

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
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(store.pg_pool().unwrap()).await.unwrap();
        Self { name: name.into(), table }
    }

    async fn rows(&self, store: &EventStore) -> Vec<(Uuid, i64, i64)> {
        let sql = format!("SELECT aggregate_id, events, total FROM {} ORDER BY aggregate_id", self.table);
        sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_all(store.pg_pool().unwrap()).await.unwrap()
    }
}

impl Projection<CourseEvent> for Totals {
    fn name(&self) -> &str {
        &self.name
    }

    async fn apply(
        &self,
        tx: &mut Transaction,
        event: &EventEnvelope<CourseEvent>,
    ) -> Result<(), EventError> {
        let CourseEvent::Counted(c) = &event.event else { return Ok(()) };
        let sql = format!(
            "INSERT INTO {} (aggregate_id, events, total) VALUES ($1, 1, $2) \
             ON CONFLICT (aggregate_id) DO UPDATE SET events = {0}.events + 1, total = {0}.total + $2",
            self.table
        );
        let conn = tx.pg_connection().ok_or_else(|| EventError::Config("PostgreSQL only".into()))?;
        sqlx::query(sqlx::AssertSqlSafe(sql)).bind(event.aggregate_id).bind(c.n as i64).execute(conn).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction) -> Result<(), EventError> {
        let conn = tx.pg_connection().ok_or_else(|| EventError::Config("PostgreSQL only".into()))?;
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
    assert_eq!(clean.catch_up().await.unwrap(), 5_000);
    let expected = clean.projection().rows(&store).await;
    assert_eq!(expected.len(), 50);
    assert!(expected.iter().all(|(_, events, _)| *events == 100));

    let crashy = Totals::create(&store, "crashy").await;
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut kills = 0;
    let mut runner = ProjectionRunner::new(store.clone(), crashy);
    runner.batch_size = 37;
    let runner = std::sync::Arc::new(runner);
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
