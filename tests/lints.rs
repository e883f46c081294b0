//! The derive's expansion is lint-clean: this file is compiled by `cargo test` under strict
//! rustc lints and checked by `cargo clippy --all-targets` (in CI) under clippy's pedantic
//! group, so any lint the generated code trips fails the build.
#![deny(warnings, unused_qualifications, missing_docs, unreachable_pub, rust_2018_idioms)]
#![deny(clippy::all, clippy::pedantic)]

use edupulse_events::upcast::{JsonValue, UpcastError};
use edupulse_events::{DomainEvent, EventSchema, Uuid};
use serde::{Deserialize, Serialize};

/// Version 1.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished", context = "courses")]
pub struct LessonPublishedV1 {
    /// The lesson.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
}

/// Version 2.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(version = 2, context = "courses", alias = "LessonReleased", previous = LessonPublishedV1)]
pub struct LessonPublished {
    /// The lesson.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    /// The author.
    #[event(key)]
    pub author_id: Option<Uuid>,
}

impl From<LessonPublishedV1> for LessonPublished {
    fn from(old: LessonPublishedV1) -> Self {
        Self { lesson_id: old.lesson_id, author_id: None }
    }
}

/// Raw chain.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(version = 3, subject = "courses.quiz", upcast(from = 1, with = step), upcast(from = 2, with = fallible))]
#[event(no_aggregate_id)]
pub struct Quiz {
    /// The score.
    #[event(key = "points")]
    pub score: i32,
}

fn step(v: JsonValue) -> JsonValue {
    v
}

fn fallible(v: JsonValue) -> Result<JsonValue, UpcastError> {
    if v.is_object() { Ok(v) } else { Err(UpcastError::new("not an object")) }
}

/// Unit event.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
#[event(no_aggregate_id)]
pub struct Tick;

/// All of them.
#[derive(Debug, Clone, DomainEvent)]
#[event(context = "courses")]
pub enum CourseEvent {
    /// A lesson.
    LessonPublished(LessonPublished),
    /// A quiz.
    Quiz(Quiz),
    /// A tick.
    Tick(Tick),
}

#[test]
fn expansion_is_lint_clean_and_works() {
    assert_eq!(LessonPublished::VERSION, 2);
    assert_eq!(CourseEvent::EVENT_TYPES, ["LessonPublished", "Quiz", "Tick"]);
    let event = CourseEvent::decode("Quiz", 1, br#"{"score": 3}"#).unwrap();
    assert_eq!(event.promoted_keys().len(), 1);
}
