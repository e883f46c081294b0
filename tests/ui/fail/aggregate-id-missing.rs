// Forgetting `#[event(aggregate_id)]` is a warning on the struct's name (here made an error):
// the append could not check that the event belongs to its aggregate.
#![deny(deprecated)]

use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
struct LessonPublished {
    lesson_id: Uuid,
    title: String,
}

fn main() {}
