use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(subject = "edupulse.courses.>")]
struct LessonPublished {
    lesson_id: Uuid,
}

fn main() {}
