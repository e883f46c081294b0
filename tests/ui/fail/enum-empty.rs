use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(DomainEvent)]
enum CourseEvent {}

fn main() {}
