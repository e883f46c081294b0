//! Shared test helpers: servers from the environment, a fresh schema per test, and a small
//! set of events in three schema versions.
#![allow(dead_code, missing_docs, unreachable_pub)]

pub mod nats;
pub mod proxy;

use edupulse_events::sqlx::{PgConnection, PgPool, SqliteConnection};
use edupulse_events::upcast::{self, JsonValue, UpcastError};
use edupulse_events::{Connection, DatabasePool, DomainEvent, EventStore, StoreConfig, StreamPosition, Uuid};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// The PostgreSQL URL of the test server. Tests that need it fail, loudly, without it.
pub fn database_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set: this test needs PostgreSQL. Run `bash scripts/test.sh`, which starts \
             a throw-away server on loopback, or set DATABASE_URL to a server of your own."
        ),
    }
}

/// The PostgreSQL pool of a store of these tests.
pub fn pg_pool(store: &EventStore) -> PgPool {
    match store.pool() {
        DatabasePool::Postgres(pool) => pool,
        DatabasePool::Sqlite(_) => panic!("this test needs a PostgreSQL store"),
    }
}

/// The PostgreSQL connection of a store transaction.
pub fn pg(connection: Connection<'_>) -> &mut PgConnection {
    match connection {
        Connection::Postgres(conn) => conn,
        Connection::Sqlite(_) => panic!("this test needs a PostgreSQL store"),
    }
}

/// The SQLite connection of a store transaction.
pub fn sqlite(connection: Connection<'_>) -> &mut SqliteConnection {
    match connection {
        Connection::Sqlite(conn) => conn,
        Connection::Postgres(_) => panic!("this test needs the embedded store"),
    }
}

/// A store on a schema of its own, migrated, so tests run in parallel.
pub async fn store() -> EventStore {
    store_with(|_| {}).await
}

pub async fn store_with(tune: impl FnOnce(&mut StoreConfig)) -> EventStore {
    let schema = format!("t_{}", Uuid::now_v7().simple());
    let mut config = StoreConfig::with_schema(&schema).expect("valid schema name");
    config.max_connections = 24;
    tune(&mut config);
    let store = EventStore::connect(&database_url(), config).await.expect("connect to PostgreSQL");
    store.migrate().await.expect("migrate");
    store
}

/// Version 1 stored `{ "lesson_id", "name" }`; version 2 renamed `name` to `title`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished", version = 2, context = "courses", upcast(from = 1, with = v1_to_v2))]
pub struct LessonPublishedV2 {
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    pub title: String,
}

fn v1_to_v2(payload: JsonValue) -> Result<JsonValue, UpcastError> {
    upcast::rename_field(payload, "name", "title")
}

/// Version 3 added the author, promoted as a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(version = 3, context = "courses", previous = LessonPublishedV2)]
pub struct LessonPublished {
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    #[event(key)]
    pub author_id: Option<Uuid>,
    pub title: String,
}

impl From<LessonPublishedV2> for LessonPublished {
    fn from(old: LessonPublishedV2) -> Self {
        Self { lesson_id: old.lesson_id, author_id: None, title: old.title }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
pub struct LessonRenamed {
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    pub title: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
#[event(no_aggregate_id)]
pub struct Counted {
    pub n: u64,
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(context = "courses")]
pub enum CourseEvent {
    LessonPublished(LessonPublished),
    LessonRenamed(LessonRenamed),
    Counted(Counted),
}

/// Waits (at most 10 s) until the global stream reads `count` events: until they are below
/// the horizon, which is the whole database's, so that a transaction another test keeps open
/// at this moment may hold them back.
pub async fn until_readable(store: &EventStore, count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut all = store.stream_all::<CourseEvent>(StreamPosition::START);
        let mut read = 0;
        while let Some(envelope) = all.next().await {
            envelope.unwrap();
            read += 1;
        }
        if read >= count {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "only {read} of {count} events readable after 10 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub fn counted(n: u64) -> CourseEvent {
    CourseEvent::Counted(Counted { n })
}
