use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(DomainEvent)]
enum CourseEvent {
    LessonPublished { lesson_id: Uuid },
    Archived,
}

fn main() {}
