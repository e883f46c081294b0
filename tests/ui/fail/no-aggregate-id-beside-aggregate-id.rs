use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(no_aggregate_id)]
struct LessonPublished {
    #[event(aggregate_id)]
    lesson_id: Uuid,
}

fn main() {}
