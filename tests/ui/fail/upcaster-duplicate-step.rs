use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(version = 2, upcast(from = 1, with = step), upcast(from = 1, with = step))]
struct LessonPublished {
    lesson_id: Uuid,
}

fn step(v: edupulse_events::upcast::JsonValue) -> edupulse_events::upcast::JsonValue {
    v
}

fn main() {}
