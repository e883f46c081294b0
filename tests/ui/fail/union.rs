use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(DomainEvent)]
union LessonPublished {
    a: u32,
    b: f32,
}

fn main() {}
