use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
struct LessonPublished {
    #[event(aggregate_id)] lesson_id: Uuid,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(alias = "LessonPublished")]
struct LessonReleased {
    #[event(aggregate_id)] lesson_id: Uuid,
}

#[derive(DomainEvent)]
enum CourseEvent {
    Published(LessonPublished),
    Released(LessonReleased),
}

fn main() {}
