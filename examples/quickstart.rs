//! Quickstart: define a context's events with `#[derive(DomainEvent)]`, commit them through
//! the bus, wait until the broker acknowledged them, replay an aggregate, catch a
//! concurrency conflict, and consume the events as another service would.
//!
//! `cargo run --example quickstart` runs on the embedded default (SQLite in memory and an
//! in-process broker). With `DATABASE_URL=postgres://…` and `NATS_URL=nats://…` set, the
//! same code runs on PostgreSQL and NATS JetStream.

use edupulse_events::upcast::{self, JsonValue, UpcastError};
use edupulse_events::{
    Backends, BusConfig, DomainEvent, EventBus, EventEnvelope, EventError, StreamSpec, SubscriberConfig, Uuid,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// A lesson went live. Version 2 renamed `name` to `title`.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(version = 2, context = "courses", upcast(from = 1, with = rename_name))]
pub struct LessonPublished {
    /// The course the lesson belongs to: the aggregate.
    #[event(aggregate_id)]
    pub course_id: Uuid,
    /// Who wrote it; promoted, so the store finds a teacher's lessons without reading payloads.
    #[event(key)]
    pub author_id: Uuid,
    /// The lesson's title.
    pub title: String,
}

fn rename_name(payload: JsonValue) -> Result<JsonValue, UpcastError> {
    upcast::rename_field(payload, "name", "title")
}

/// A student enrolled in a course.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
pub struct StudentEnrolled {
    /// The course.
    #[event(aggregate_id)]
    pub course_id: Uuid,
    /// The student.
    #[event(key)]
    pub student_id: Uuid,
}

/// Every event of the courses context.
#[derive(Debug, Clone, DomainEvent)]
#[event(context = "courses")]
pub enum CourseEvent {
    /// See [`LessonPublished`].
    LessonPublished(LessonPublished),
    /// See [`StudentEnrolled`].
    StudentEnrolled(StudentEnrolled),
}

#[tokio::main]
async fn main() -> Result<(), EventError> {
    let backends =
        Backends::from_env(&StreamSpec::new("EDUPULSE_EXAMPLES", ["courses.>", "quizzes.>", "enrolment.>"]))
            .await?;
    println!("Store: {}. Broker: {}.", backends.database_kind, backends.broker_kind);
    println!("The courses context publishes {:?} on {:?}.", CourseEvent::EVENT_TYPES, CourseEvent::SUBJECTS);

    let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default())?;
    let course = Uuid::now_v7();
    let author = Uuid::now_v7();

    // 1. Commit two events in one transaction. The bus's background relay publishes them from
    //    the log after COMMIT; `published()` waits for the broker's acknowledgement.
    let stored = bus
        .commit(async |tx| {
            let events = [
                CourseEvent::from(LessonPublished {
                    course_id: course,
                    author_id: author,
                    title: "Ownership".into(),
                }),
                CourseEvent::from(StudentEnrolled { course_id: course, student_id: Uuid::now_v7() }),
            ];
            tx.append("course", course, 0, events).await
        })
        .await?
        .published()
        .await?;
    for e in &stored {
        println!(
            "Committed {} #{} of course {} at global position {}.",
            e.event.event_type(),
            e.sequence,
            e.aggregate_id,
            e.global_position.unwrap_or_default()
        );
    }
    println!("Published: the broker acknowledged both events.");
    if let Some(broker) = &backends.in_memory {
        for message in broker.messages() {
            println!(
                "  the broker holds `{}` (Nats-Msg-Id {})",
                message.subject,
                message.header("Nats-Msg-Id").unwrap_or("?")
            );
        }
    }

    // 2. Replay the aggregate.
    let mut history = backends.store.load::<CourseEvent>(course, 1);
    println!("Replaying course {course}:");
    while let Some(envelope) = history.next().await {
        let envelope = envelope?;
        println!("  #{} {:?}", envelope.sequence, envelope.event);
    }

    // 3. Two writers decide on the same version; the second one loses, with a typed error.
    let late = bus
        .commit(async |tx| {
            let event = LessonPublished { course_id: course, author_id: author, title: "Borrowing".into() };
            tx.append("course", course, 0, [CourseEvent::from(event)]).await
        })
        .await;
    match late {
        Err(EventError::Concurrency { expected, actual, .. }) => {
            println!(
                "A writer that expected sequence {expected} was refused: the course is at {actual}. Reload and retry."
            );
        }
        other => return Err(EventError::Config(format!("expected a concurrency conflict, got {other:?}"))),
    }

    // 4. Find a teacher's lessons through the promoted key.
    let count = backends.store.events_by_key::<CourseEvent>("author_id", author).count().await;
    println!("Lessons by author {author}: {count}.");

    // 5. Another service consumes the context: a durable consumer, each aggregate's events in
    //    order, acknowledged once the handler succeeded. The same code runs on the in-process
    //    broker and on JetStream (where the consumer's progress survives restarts).
    let config =
        SubscriberConfig::new("EDUPULSE_EXAMPLES", "quickstart-reader").with_filter_subject("courses.>");
    let subscriber = backends.subscriber::<CourseEvent>(config).await?;
    let (seen, done) = (std::sync::atomic::AtomicUsize::new(0), tokio::sync::Notify::new());
    let handler = async |envelope: EventEnvelope<CourseEvent>| {
        if envelope.aggregate_id == course {
            println!("  consumed #{} {}", envelope.sequence, envelope.event.event_type());
            if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == stored.len() {
                done.notify_one();
            }
        }
        Ok(())
    };
    println!("Consuming as another service would:");
    let deadline = tokio::time::sleep(std::time::Duration::from_secs(10));
    subscriber
        .run(handler, async {
            tokio::select! { () = done.notified() => {}, () = deadline => {} }
        })
        .await?;
    let consumed = seen.load(std::sync::atomic::Ordering::SeqCst);
    if consumed != stored.len() {
        return Err(EventError::Config(format!(
            "consumed {consumed} of the course's {} events",
            stored.len()
        )));
    }

    // Close the bus before the process exits: what it committed is published first (within
    // the timeout; anything left stays in the log for the next relay, and is counted).
    let closed = bus.close(std::time::Duration::from_secs(10)).await?;
    println!(
        "Closed the bus: {} published, {} left for the next relay.",
        closed.published, closed.unpublished
    );
    Ok(())
}
