use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
struct LessonPublished {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    #[event(aggregate_id)]
    course_id: Uuid,
}

fn main() {}
