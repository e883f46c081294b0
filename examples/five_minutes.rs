//! The README's five-minute path, as one program: define events, commit them through the
//! bus, consume them as another service would, project them into a read model, and test an
//! aggregate. The README's code blocks of that path are cut from this file (`tests/readme.rs`
//! fails when one is not found here), so what the README shows is what runs.
//!
//! `cargo run --example five_minutes` runs on the embedded default (SQLite in memory and the
//! in-process broker). With `DATABASE_URL=postgres://…` and `NATS_URL=nats://…` set, the same
//! code runs on PostgreSQL and NATS JetStream; run it again and the durable consumer and the
//! projection's checkpoint carry on from the first run.

use std::time::Duration;

use edupulse_events::prelude::*;
use edupulse_events::testing::AggregateTest;
use edupulse_events::{BoxError, DatabasePool, StreamSpec, Transaction, execute};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "workshops")]
struct WorkshopScheduled {
    #[event(aggregate_id)]
    workshop_id: Uuid,
    seats: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "workshops")] // published on `workshops.SeatBooked`
struct SeatBooked {
    #[event(aggregate_id)] // appends check it (a struct without one warns)
    workshop_id: Uuid,
    #[event(key)] // indexed: `store.events_by_key("student_id", id)`
    student_id: Uuid,
}

// Every event of the context, for its aggregate, consumers and projections.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(context = "workshops")]
enum WorkshopEvent {
    WorkshopScheduled(WorkshopScheduled),
    SeatBooked(SeatBooked),
}

/// A read model: the seats booked per workshop.
struct SeatsBooked;

impl Projection<WorkshopEvent> for SeatsBooked {
    fn name(&self) -> &str {
        "seats-booked" // the checkpoint's name
    }

    // In one transaction with the checkpoint: each event applied exactly once.
    async fn apply(&self, tx: &mut Transaction, e: &EventEnvelope<WorkshopEvent>) -> Result<(), BoxError> {
        if let WorkshopEvent::SeatBooked(seat) = &e.event {
            let sql = "INSERT INTO seats_booked (workshop_id, seats) VALUES ($1, 1) \
                       ON CONFLICT (workshop_id) DO UPDATE SET seats = seats_booked.seats + 1";
            execute!(tx.connection(), sql, seat.workshop_id.to_string())?; // PostgreSQL or SQLite
        }
        Ok(())
    }
}

/// The workshop aggregate: its state, folded from its events.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Workshop {
    seats: u32,
    students: Vec<Uuid>,
}

/// A command.
#[derive(Debug)]
struct BookSeat {
    workshop_id: Uuid,
    student_id: Uuid,
}

/// Why a workshop refuses a booking.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("the workshop is full")]
struct Full;

impl Aggregate for Workshop {
    const TYPE: &'static str = "workshop";
    type Event = WorkshopEvent;
    type Command = BookSeat;
    type Error = Full;

    fn apply(&mut self, event: &WorkshopEvent) {
        match event {
            WorkshopEvent::WorkshopScheduled(e) => self.seats = e.seats,
            WorkshopEvent::SeatBooked(e) => self.students.push(e.student_id),
        }
    }

    fn decide(&self, command: &BookSeat) -> Result<Vec<WorkshopEvent>, Full> {
        if self.students.len() >= self.seats as usize {
            return Err(Full);
        }
        let BookSeat { workshop_id, student_id } = *command;
        Ok(vec![WorkshopEvent::from(SeatBooked { workshop_id, student_id })])
    }
}

#[tokio::main]
async fn main() -> Result<(), EventError> {
    // Whatever happens below, the example ends within a minute.
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        eprintln!("five_minutes: still running after 60 s; giving up");
        std::process::exit(1);
    });

    // PostgreSQL and NATS when DATABASE_URL and NATS_URL are set, else SQLite in memory and
    // the in-process broker; migrated, the stream in place.
    let backends = Backends::from_env(&StreamSpec::new("WORKSHOPS", ["workshops.>"])).await?;
    let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default())?;
    let workshop_id = Uuid::now_v7();
    let events = [
        WorkshopEvent::from(WorkshopScheduled { workshop_id, seats: 30 }),
        WorkshopEvent::from(SeatBooked { workshop_id, student_id: Uuid::now_v7() }),
    ];
    let committed = bus.commit(async |tx| tx.append("workshop", workshop_id, 0, events).await).await?;
    committed.receipt.published().await?; // only if you must know: the broker acknowledged them
    println!("Store: {}. Broker: {}.", backends.database_kind, backends.broker_kind);
    println!("Committed workshop {workshop_id}'s first {} events; published.", committed.value.len());

    let done = Notify::new();
    let handler = async |envelope: EventEnvelope<WorkshopEvent>| {
        if let WorkshopEvent::SeatBooked(seat) = &envelope.event {
            println!("Welcome mail to student {}.", seat.student_id);
        }
        if envelope.aggregate_id == workshop_id && envelope.sequence == 2 {
            done.notify_one(); // this example stops after its workshop's second event
        }
        Ok(()) // acknowledged; an error is retried, then reported as poison
    };
    let config = SubscriberConfig::new("WORKSHOPS", "welcome-mails");
    let subscriber = backends.subscriber::<WorkshopEvent>(config).await?;
    subscriber.run(handler, done.notified()).await?; // until it completes (in a service: SIGTERM)

    // A service creates the read model's table in a migration of its own.
    let mut tx = backends.store.begin().await?;
    let table =
        "CREATE TABLE IF NOT EXISTS seats_booked (workshop_id TEXT PRIMARY KEY, seats BIGINT NOT NULL)";
    execute!(tx.connection(), table)?;
    tx.commit().await?;

    let runner = ProjectionRunner::new(backends.store.clone(), SeatsBooked);
    let applied = runner.catch_up().await?; // a service runs `runner.run(shutdown)`: catch up, then follow
    let seats = seats_booked(&backends.store, workshop_id).await?;
    println!("The projection applied {applied} event(s): workshop {workshop_id} has {seats} seat(s) booked.");
    if seats != 1 {
        return Err(EventError::Config(format!("the read model counts {seats} seats booked, not 1")));
    }

    workshop_rules().await;
    println!("The workshop's rules hold: a seat is booked, a full workshop refuses.");

    // Before the process exits: what the bus committed is published first.
    let closed = bus.close(Duration::from_secs(10)).await?;
    println!("Closed the bus: {} left for the next relay.", closed.unpublished);
    Ok(())
}

// Given / when / then on the embedded store, no server; in a service, a `#[tokio::test]`.
async fn workshop_rules() {
    let (workshop_id, ada, bob) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let scheduled = WorkshopEvent::from(WorkshopScheduled { workshop_id, seats: 1 });
    let ada_booked = WorkshopEvent::from(SeatBooked { workshop_id, student_id: ada });
    AggregateTest::<Workshop>::given([scheduled.clone()])
        .when(BookSeat { workshop_id, student_id: ada })
        .await
        .then_expect([ada_booked.clone()]); // a mismatch panics with expected (-) and actual (+)
    AggregateTest::<Workshop>::given([scheduled, ada_booked])
        .when(BookSeat { workshop_id, student_id: bob })
        .await
        .then_error(Full);
}

/// The read model's count for one workshop (reading is the application's own SQL).
async fn seats_booked(store: &EventStore, workshop_id: Uuid) -> Result<i64, EventError> {
    let sql = "SELECT seats FROM seats_booked WHERE workshop_id = $1";
    let id = workshop_id.to_string();
    Ok(match store.pool() {
        DatabasePool::Postgres(pool) => sqlx::query_scalar(sql).bind(id).fetch_optional(&pool).await?,
        DatabasePool::Sqlite(pool) => sqlx::query_scalar(sql).bind(id).fetch_optional(&pool).await?,
    }
    .unwrap_or(0))
}
