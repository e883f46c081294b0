use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, DomainEvent)]
#[event(context = "billing")]
struct InvoicePaid {
    invoice_id: Uuid,
}

#[derive(DomainEvent)]
#[event(context = "courses")]
enum CourseEvent {
    InvoicePaid(InvoicePaid),
}

fn main() {}
