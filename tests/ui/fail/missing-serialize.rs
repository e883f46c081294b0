use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, DomainEvent)]
struct LessonPublished {
    lesson_id: Uuid,
}

fn main() {}
