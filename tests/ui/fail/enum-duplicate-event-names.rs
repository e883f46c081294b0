use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished")]
struct LessonPublished {
    #[event(aggregate_id)] lesson_id: Uuid,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished")]
struct LessonReleased {
    #[event(aggregate_id)] lesson_id: Uuid,
}

#[derive(DomainEvent)]
enum CourseEvent {
    Published(LessonPublished),
    Released(LessonReleased),
}

fn main() {}
