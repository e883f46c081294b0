use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
struct LessonPublished {
    #[event(key = "author")]
    author_id: Uuid,
    #[event(key = "author")]
    editor_id: Uuid,
}

fn main() {}
