//! Quickstart: define a context's events with `#[derive(DomainEvent)]`, wrap one in an
//! envelope, encode it for the store, and read an old stored payload back as the current
//! version.
//!
//! Run it with `cargo run --example quickstart`. Later versions of this example commit
//! through the bus and replay from the store; this one shows the event model they share.

use edupulse_events::upcast::{self, JsonValue, UpcastError};
use edupulse_events::{DomainEvent, EventEnvelope, EventError, EventSchema, Uuid};
use serde::{Deserialize, Serialize};

/// A lesson went live. Version 2 renamed `name` to `title`.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(version = 2, context = "courses", upcast(from = 1, with = rename_name))]
pub struct LessonPublished {
    /// The lesson: the aggregate this event belongs to.
    #[event(aggregate_id)]
    pub lesson_id: Uuid,
    /// Who wrote it; promoted so the store can find a teacher's lessons without reading payloads.
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

fn main() -> Result<(), EventError> {
    println!("The courses context publishes: {:?}", CourseEvent::EVENT_TYPES);
    println!("on the subjects: {:?}", CourseEvent::SUBJECTS);

    let lesson_id = Uuid::now_v7();
    let event = CourseEvent::from(LessonPublished {
        lesson_id,
        author_id: Uuid::now_v7(),
        title: "Ownership in ten minutes".into(),
    });
    let envelope = EventEnvelope::new("lesson", lesson_id, event);
    let encoded = envelope.event.encode()?;
    println!(
        "\nEvent {} ({} v{}) for aggregate {} goes to subject `{}`",
        envelope.event_id, encoded.event_type, encoded.schema_version, envelope.aggregate_id, encoded.subject
    );
    println!("  payload column: {}", encoded.payload);
    for key in &encoded.keys {
        println!("  promoted key:   {} = {:?}", key.name, key.value);
    }

    let follow_up = EventEnvelope::new(
        "course",
        Uuid::now_v7(),
        CourseEvent::from(StudentEnrolled { course_id: Uuid::now_v7(), student_id: Uuid::now_v7() }),
    )
    .caused_by(&envelope);
    println!(
        "\nA follow-up event is caused by {} and correlated with {}",
        follow_up.metadata.causation_id.unwrap_or_default(),
        follow_up.correlation_id()
    );

    let stored_v1 = format!(r#"{{"lesson_id":"{lesson_id}","author_id":"{lesson_id}","name":"Old title"}}"#);
    let CourseEvent::LessonPublished(read) = CourseEvent::decode("LessonPublished", 1, stored_v1.as_bytes())?
    else {
        return Err(EventError::Config("the v1 payload decoded as another event".into()));
    };
    println!(
        "\nA payload stored as v1 reads back as v{}: title = {:?}",
        LessonPublished::VERSION,
        read.title
    );

    match CourseEvent::decode("LessonPublished", 7, stored_v1.as_bytes()) {
        Err(err @ EventError::UnsupportedVersion { .. }) => println!("A v7 payload is refused: {err}"),
        other => return Err(EventError::Config(format!("expected a refusal, got {other:?}"))),
    }
    match CourseEvent::decode("LessonDeleted", 1, b"{}") {
        Err(err @ EventError::UnknownEventType { .. }) => println!("An unknown type is refused: {err}"),
        other => return Err(EventError::Config(format!("expected a refusal, got {other:?}"))),
    }
    Ok(())
}
