use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished")]
struct LessonPublishedV1 {
    #[event(aggregate_id)] lesson_id: Uuid,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(version = 3, previous = LessonPublishedV1)]
struct LessonPublished {
    #[event(aggregate_id)] lesson_id: Uuid,
}

impl From<LessonPublishedV1> for LessonPublished {
    fn from(old: LessonPublishedV1) -> Self {
        Self { lesson_id: old.lesson_id }
    }
}

fn main() {}
