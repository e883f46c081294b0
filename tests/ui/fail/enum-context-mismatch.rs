use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(context = "billing")]
struct InvoicePaid {
    #[event(aggregate_id)] invoice_id: Uuid,
}

#[derive(DomainEvent)]
#[event(context = "courses")]
enum CourseEvent {
    InvoicePaid(InvoicePaid),
}

fn main() {}
