use edupulse_events::DomainEvent;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(no_aggregate_id = true)]
struct Heartbeat {
    at: u64,
}

fn main() {}
