use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished")]
struct LessonPublished {
    lesson_id: Uuid,
}

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished")]
struct LessonReleased {
    lesson_id: Uuid,
}

#[derive(DomainEvent)]
enum CourseEvent {
    Published(LessonPublished),
    Released(LessonReleased),
}

fn main() {}
