use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(subject = "edupulse..lesson-published")]
struct LessonPublished {
    lesson_id: Uuid,
}

fn main() {}
