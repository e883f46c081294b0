//! Enums of events: dispatch, nesting, `From`, the context check, decode by type.
use edupulse_events::{DomainEvent, EventError, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
struct LessonPublished {
    #[event(aggregate_id)]
    lesson_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(subject = "courses.quiz.submitted", alias = "QuizSent")]
struct QuizSubmitted {
    #[event(aggregate_id)]
    quiz_id: Uuid,
    #[event(key)]
    score: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "billing.v1")]
#[event(no_aggregate_id)]
struct InvoicePaid {
    invoice_id: Uuid,
}

/// An enum whose variant names differ from the event types.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(context = "courses")]
enum CourseEvent {
    Published(LessonPublished),
    Quiz(QuizSubmitted),
}

/// Enums nest.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum Everything {
    Courses(CourseEvent),
    Billing(InvoicePaid),
}

#[test]
fn enums_dispatch_nest_convert_and_decode_by_type() {
    assert_eq!(CourseEvent::EVENT_TYPES, ["LessonPublished", "QuizSubmitted"]);
    assert_eq!(CourseEvent::ACCEPTED_TYPES, ["LessonPublished", "QuizSubmitted", "QuizSent"]);
    assert_eq!(
        Everything::SUBJECTS,
        ["courses.LessonPublished", "courses.quiz.submitted", "billing.v1.InvoicePaid"]
    );

    let id = Uuid::now_v7();
    let quiz = CourseEvent::from(QuizSubmitted { quiz_id: id, score: 7 });
    assert_eq!(quiz.event_type(), "QuizSubmitted");
    assert_eq!(quiz.subject(), "courses.quiz.submitted");
    assert_eq!(quiz.aggregate_id(), Some(id));
    assert_eq!(quiz.promoted_keys().len(), 1);

    let everything = Everything::from(quiz.clone());
    let encoded = everything.encode().unwrap();
    let back =
        Everything::decode("QuizSent", encoded.schema_version, encoded.payload.get().as_bytes()).unwrap();
    assert_eq!(back, everything);

    let paid =
        Everything::decode("InvoicePaid", 1, format!(r#"{{"invoice_id":"{id}"}}"#).as_bytes()).unwrap();
    assert_eq!(paid, Everything::Billing(InvoicePaid { invoice_id: id }));
    assert!(matches!(CourseEvent::decode("InvoicePaid", 1, b"{}"), Err(EventError::UnknownEventType { .. })));
}
