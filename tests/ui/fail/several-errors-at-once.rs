use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(name = "", verison = 2, subject = "a..b")]
struct LessonPublished {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    #[event(aggregate_id, kee)]
    course_id: Uuid,
}

fn main() {}
