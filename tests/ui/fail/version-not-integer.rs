use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(version = "2")]
struct LessonPublished {
    lesson_id: Uuid,
}

fn main() {}
