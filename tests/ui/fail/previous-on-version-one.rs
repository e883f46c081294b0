use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished")]
struct LessonPublishedV0 {
    #[event(aggregate_id)] lesson_id: Uuid,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(previous = LessonPublishedV0)]
struct LessonPublished {
    #[event(aggregate_id)] lesson_id: Uuid,
}

impl From<LessonPublishedV0> for LessonPublished {
    fn from(old: LessonPublishedV0) -> Self {
        Self { lesson_id: old.lesson_id }
    }
}

fn main() {}
