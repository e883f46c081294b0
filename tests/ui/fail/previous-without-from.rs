use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished")]
struct LessonPublishedV1 {
    #[event(aggregate_id)] lesson_id: Uuid,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(version = 2, previous = LessonPublishedV1)]
struct LessonPublished {
    #[event(aggregate_id)] lesson_id: Uuid,
}

fn main() {}
