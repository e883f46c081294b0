use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(alias = "LessonPublished")]
struct LessonPublished {
    lesson_id: Uuid,
}

fn main() {}
