use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
struct LessonPublished {
    #[event(aggregate_id)] lesson_id: Uuid,
}

#[derive(DomainEvent)]
#[event(version = 2)]
enum CourseEvent {
    LessonPublished(LessonPublished),
}

fn main() {}
