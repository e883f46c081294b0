//! A projection: a read model (lessons per author) built from the store's global stream,
//! with its checkpoint saved in the same transaction as the read model, so a restart
//! resumes where it stopped and applies each event exactly once.
//!
//! `cargo run --example projection` (embedded), or with `DATABASE_URL` for PostgreSQL.

use edupulse_events::{
    Backends, BoxError, Connection, DatabasePool, DomainEvent, EventEnvelope, EventError, EventStore,
    Projection, ProjectionRunner, StoreConfig, StreamSpec, Transaction, Uuid,
};
use serde::{Deserialize, Serialize};

const PROJECTION: &str = "lessons-per-author";

/// A lesson went live.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "ExampleLessonPublished", context = "courses")]
pub struct LessonPublished {
    /// The lesson.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    /// Its author.
    #[event(key)]
    pub author: String,
}

/// The events this projection reads.
#[derive(Debug, Clone, DomainEvent)]
pub enum ProjectedEvent {
    /// See [`LessonPublished`].
    LessonPublished(LessonPublished),
}

/// The read model: how many lessons each author published.
struct LessonsPerAuthor;

impl Projection<ProjectedEvent> for LessonsPerAuthor {
    fn name(&self) -> &str {
        PROJECTION
    }

    async fn apply(
        &self,
        tx: &mut Transaction,
        envelope: &EventEnvelope<ProjectedEvent>,
    ) -> Result<(), BoxError> {
        let ProjectedEvent::LessonPublished(e) = &envelope.event;
        match tx.connection() {
            Connection::Postgres(conn) => {
                sqlx::query(
                    "INSERT INTO edupulse_example.lessons_per_author (author, lessons) VALUES ($1, 1) \
                     ON CONFLICT (author) DO UPDATE SET lessons = lessons_per_author.lessons + 1",
                )
                .bind(&e.author)
                .execute(conn)
                .await?;
            }
            Connection::Sqlite(conn) => {
                sqlx::query(
                    "INSERT INTO lessons_per_author (author, lessons) VALUES (?1, 1) \
                     ON CONFLICT (author) DO UPDATE SET lessons = lessons + 1",
                )
                .bind(&e.author)
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    }

    /// A rebuild starts from an empty table.
    async fn reset(&self, tx: &mut Transaction) -> Result<(), BoxError> {
        match tx.connection() {
            Connection::Postgres(conn) => {
                sqlx::raw_sql(
                    "CREATE SCHEMA IF NOT EXISTS edupulse_example; \
                     DROP TABLE IF EXISTS edupulse_example.lessons_per_author; \
                     CREATE TABLE edupulse_example.lessons_per_author (author text PRIMARY KEY, lessons bigint NOT NULL)",
                )
                .execute(conn)
                .await?;
            }
            Connection::Sqlite(conn) => {
                sqlx::raw_sql(
                    "DROP TABLE IF EXISTS lessons_per_author; \
                     CREATE TABLE lessons_per_author (author TEXT PRIMARY KEY, lessons INTEGER NOT NULL)",
                )
                .execute(conn)
                .await?;
            }
        }
        Ok(())
    }
}

async fn read_model(store: &EventStore) -> Result<Vec<(String, i64)>, EventError> {
    Ok(match store.pool() {
        DatabasePool::Postgres(pool) => {
            sqlx::query_as("SELECT author, lessons FROM edupulse_example.lessons_per_author ORDER BY author")
                .fetch_all(&pool)
                .await?
        }
        DatabasePool::Sqlite(pool) => {
            sqlx::query_as("SELECT author, lessons FROM lessons_per_author ORDER BY author")
                .fetch_all(&pool)
                .await?
        }
    })
}

async fn publish_lessons(store: &EventStore, authors: &[&str]) -> Result<(), EventError> {
    for author in authors {
        let id = Uuid::now_v7();
        store.append("lesson", id, 0, [LessonPublished { lesson_id: id, author: (*author).into() }]).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), EventError> {
    let database_url = std::env::var("DATABASE_URL").ok();
    let config = StoreConfig::with_schema("edupulse_projection_example")?;
    let backends =
        Backends::connect(database_url.as_deref(), None, config, &StreamSpec::new("UNUSED", ["x"])).await?;
    let store = &backends.store;
    println!("Store: {}.", backends.database_kind);

    // Each run reads from the checkpoint; a batch of events and the checkpoint commit together.
    let runner = ProjectionRunner::new(store.clone(), LessonsPerAuthor);
    runner.rebuild().await?; // an empty read model, from the first event
    publish_lessons(store, &["ada", "grace", "ada", "linus", "ada"]).await?;
    let first = runner.catch_up().await?;
    println!("First run applied {first} events: {:?}", read_model(store).await?);

    // The process stops here; meanwhile three more lessons are published.
    publish_lessons(store, &["grace", "ada", "barbara"]).await?;
    let checkpoint = store.checkpoint(PROJECTION).await?.unwrap_or_default();
    println!("Restarting from checkpoint {checkpoint:?}.");
    let restarted = ProjectionRunner::new(store.clone(), LessonsPerAuthor);
    let second = restarted.catch_up().await?;
    println!("The restarted projection applied {second} events: {:?}", read_model(store).await?);
    if second != 3 {
        return Err(EventError::Config(format!("the restart re-applied events: {second} instead of 3")));
    }
    let third = restarted.catch_up().await?;
    println!("A run with nothing new applied {third} events.");
    Ok(())
}
