use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(version = 2, upcast(from = 1, with = step))]
struct LessonPublished {
    #[event(aggregate_id)] lesson_id: Uuid,
}

fn step(v: String) -> String {
    v
}

fn main() {}
