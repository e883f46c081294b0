//! Upcasting: the same event in three schema versions. An old deployment stored versions 1
//! and 2; today's code reads them as version 3. A version from the future is refused with
//! a clear error instead of being misread.
//!
//! `cargo run --example upcasting` (embedded), or with `DATABASE_URL` for PostgreSQL.

use edupulse_events::upcast::{self, JsonValue, UpcastError};
use edupulse_events::{Backends, DomainEvent, EventError, EventSchema, StoreConfig, StreamSpec, Uuid};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// Version 1, as the first deployment wrote it: the title was called `name`.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished", version = 1, context = "courses")]
pub struct LessonPublishedV1 {
    /// The lesson.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    /// The title, under its old name.
    pub name: String,
}

/// Version 2 renamed `name` to `title` and added `minutes`: a raw JSON step from v1.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished", version = 2, context = "courses", upcast(from = 1, with = v1_to_v2))]
pub struct LessonPublishedV2 {
    /// The lesson.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    /// The title.
    pub title: String,
    /// Length in minutes.
    pub minutes: u32,
}

fn v1_to_v2(payload: JsonValue) -> Result<JsonValue, UpcastError> {
    let payload = upcast::rename_field(payload, "name", "title")?;
    upcast::default_field(payload, "minutes", 0)
}

/// Version 3, today's shape: tags added. A typed step: `From<LessonPublishedV2>`.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(version = 3, context = "courses", previous = LessonPublishedV2)]
pub struct LessonPublished {
    /// The lesson.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    /// The title.
    pub title: String,
    /// Length in minutes.
    pub minutes: u32,
    /// Tags, empty for lessons published before version 3.
    pub tags: Vec<String>,
}

impl From<LessonPublishedV2> for LessonPublished {
    fn from(old: LessonPublishedV2) -> Self {
        Self { lesson_id: old.lesson_id, title: old.title, minutes: old.minutes, tags: Vec::new() }
    }
}

/// A future deployment's version 4, which this build must not pretend to understand.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished", version = 4, context = "courses", previous = LessonPublished)]
pub struct LessonPublishedV4 {
    /// The lesson.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    /// The title.
    pub title: String,
}

impl From<LessonPublished> for LessonPublishedV4 {
    fn from(v3: LessonPublished) -> Self {
        Self { lesson_id: v3.lesson_id, title: v3.title }
    }
}

#[tokio::main]
async fn main() -> Result<(), EventError> {
    // This example only stores and reads: no broker needed.
    let database_url = std::env::var("DATABASE_URL").ok();
    let spec = StreamSpec::new("UNUSED", ["courses.>"]);
    let backends = Backends::connect(database_url.as_deref(), None, StoreConfig::default(), &spec).await?;
    let store = &backends.store;
    println!(
        "Store: {}. Today's code reads LessonPublished up to version {}.",
        backends.database_kind,
        LessonPublished::VERSION
    );

    let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    store.append("lesson", a, 0, [LessonPublishedV1 { lesson_id: a, name: "Ownership".into() }]).await?;
    println!("An old deployment stored lesson {a} as version 1: {{\"name\": \"Ownership\"}}.");
    store
        .append("lesson", b, 0, [LessonPublishedV2 { lesson_id: b, title: "Traits".into(), minutes: 25 }])
        .await?;
    println!("Another stored lesson {b} as version 2: {{\"title\": \"Traits\", \"minutes\": 25}}.");
    let today =
        LessonPublished { lesson_id: c, title: "Async".into(), minutes: 40, tags: vec!["tokio".into()] };
    store.append("lesson", c, 0, [today]).await?;

    for id in [a, b, c] {
        let mut events = store.load::<LessonPublished>(id, 1);
        while let Some(envelope) = events.next().await {
            let e = envelope?.event;
            println!("Read back as version 3: {:?} ({} min, tags {:?})", e.title, e.minutes, e.tags);
        }
    }

    let future = Uuid::now_v7();
    store
        .append(
            "lesson",
            future,
            0,
            [LessonPublishedV4 { lesson_id: future, title: "From the future".into() }],
        )
        .await?;
    let mut events = store.load::<LessonPublished>(future, 1);
    match events.next().await {
        Some(Err(err @ EventError::UnsupportedVersion { .. })) => {
            println!("A newer deployment's version 4 is refused: {err}")
        }
        other => return Err(EventError::Config(format!("expected UnsupportedVersion, got {other:?}"))),
    }
    Ok(())
}
