use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct LessonPublished {
    lesson_id: Uuid,
}

#[derive(DomainEvent)]
enum CourseEvent {
    LessonPublished(LessonPublished),
}

fn main() {}
