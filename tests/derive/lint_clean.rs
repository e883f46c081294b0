//! The expansion compiles without warnings under the strict lints of the crate root
//! (`main.rs`), in a public module of the user's crate.

use edupulse_events::upcast::JsonValue;
use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

/// An event.
#[derive(Debug, Serialize, Deserialize, DomainEvent)]
#[event(version = 2, context = "courses", upcast(from = 1, with = step))]
pub struct LessonPublished {
    /// The lesson.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    /// The author.
    #[event(key)]
    pub author_id: Uuid,
}

fn step(v: JsonValue) -> JsonValue {
    v
}

/// Events.
#[derive(Debug, DomainEvent)]
#[event(context = "courses")]
pub enum CourseEvent {
    /// A lesson.
    LessonPublished(LessonPublished),
}

#[test]
fn the_expansion_is_lint_clean() {
    assert_eq!(CourseEvent::EVENT_TYPES, ["LessonPublished"]);
}
