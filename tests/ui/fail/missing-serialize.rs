use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, DomainEvent)]
struct LessonPublished {
    #[event(aggregate_id)] lesson_id: Uuid,
}

fn main() {}
