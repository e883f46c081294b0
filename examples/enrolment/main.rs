//! Course enrolment: an aggregate deciding on commands, a repository that loads it (snapshot
//! plus tail), appends its decisions through the bus and retries on conflicts; the bus's
//! background relay publishes them.
//!
//! `cargo run --example enrolment` (embedded), or with `DATABASE_URL` / `NATS_URL`.
//! The domain's given/when/then tests are in `tests/enrolment.rs`.

mod domain;

use domain::{Course, CourseCommand, EnrolmentError};
use edupulse_events::{
    Backends, BusConfig, CommandError, EventBus, EventError, Repository, StreamSpec, Uuid,
};

#[tokio::main]
async fn main() -> Result<(), EventError> {
    let backends =
        Backends::from_env(&StreamSpec::new("EDUPULSE_EXAMPLES", ["courses.>", "quizzes.>", "enrolment.>"]))
            .await?;
    println!("Store: {}. Broker: {}.", backends.database_kind, backends.broker_kind);
    let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default())?;
    let mut courses = Repository::<Course>::new(bus.clone());
    courses.snapshot_every = 5;

    let course_id = Uuid::now_v7();
    courses
        .execute(course_id, &CourseCommand::Open { course_id, capacity: 8 })
        .await
        .map_err(|e| EventError::Config(e.to_string()))?;
    println!("Opened course {course_id} with 8 seats.");

    // Eight students enrol at the same moment: conflicts are retried, each applied once.
    let students: Vec<Uuid> = (0..8).map(|_| Uuid::now_v7()).collect();
    let courses = std::sync::Arc::new(courses);
    let tasks: Vec<_> = students
        .iter()
        .map(|&student_id| {
            let courses = courses.clone();
            tokio::spawn(async move {
                courses.execute(course_id, &CourseCommand::Enroll { course_id, student_id }).await
            })
        })
        .collect();
    for task in tasks {
        task.await
            .map_err(|e| EventError::Config(e.to_string()))?
            .map_err(|e| EventError::Config(e.to_string()))?;
    }
    let loaded = courses.load(course_id).await?;
    println!(
        "8 concurrent enrolments: {} students, sequence {}, {} events read after the snapshot.",
        loaded.state.students.len(),
        loaded.sequence,
        loaded.events_read
    );

    let ninth = Uuid::now_v7();
    match courses.execute(course_id, &CourseCommand::Enroll { course_id, student_id: ninth }).await {
        Err(CommandError::Domain(EnrolmentError::Full { capacity })) => {
            println!("A ninth student is refused: the course is full ({capacity} seats).");
        }
        other => return Err(EventError::Config(format!("expected the course to be full, got {other:?}"))),
    }
    let leaving = students[0];
    courses
        .execute(course_id, &CourseCommand::Withdraw { course_id, student_id: leaving })
        .await
        .map_err(|e| EventError::Config(e.to_string()))?;
    courses
        .execute(course_id, &CourseCommand::Enroll { course_id, student_id: ninth })
        .await
        .map_err(|e| EventError::Config(e.to_string()))?;
    println!(
        "A student withdrew; the ninth took the seat. Sequence now {}.",
        courses.load(course_id).await?.sequence
    );

    // The commands only committed; the relay publishes in the background. Wait for it
    // before stopping (a bounded wait: whatever is left stays in the log for the next relay).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut lag = bus.lag().await?;
    while lag.pending > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        lag = bus.lag().await?;
    }
    let closed = bus.close(std::time::Duration::from_secs(10)).await?;
    println!(
        "The relay stopped with {} events pending and {} parked; closing published {} more, left {}.",
        lag.pending, lag.parked, closed.published, closed.unpublished
    );
    if let Some(broker) = &backends.in_memory {
        println!("The in-process broker holds {} messages.", broker.messages().len());
    }
    Ok(())
}
