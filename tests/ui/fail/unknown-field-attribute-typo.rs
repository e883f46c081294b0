use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
struct LessonPublished {
    #[event(agregate_id)]
    lesson_id: Uuid,
}

fn main() {}
