//! Decoding through the derived upcaster chains: every older version reaches the current
//! type; everything that cannot be decoded is a typed error, never a panic.

use edupulse_events::upcast::{self, JsonValue, UpcastError};
use edupulse_events::{DomainEvent, EventError, EventSchema, KeyValue, PromotedKey, Uuid};
use serde::{Deserialize, Serialize};

const LESSON: &str = "0190c4a8-6ad8-7f0e-9b1a-3c5d2f4e6a7b";
const AUTHOR: &str = "0190c4a8-6ad8-7f0e-9b1a-000000000001";

fn lesson() -> Uuid {
    Uuid::parse_str(LESSON).unwrap_or_default()
}

/// Version 1 as a raw JSON shape only: `{ "lesson_id", "name" }`.
/// Version 2 renamed `name` to `title` and added `author_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished", alias = "LessonReleased", version = 2, context = "courses",
        upcast(from = 1, with = v1_to_v2))]
struct LessonPublishedV2 {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    author_id: Uuid,
    title: String,
}

fn v1_to_v2(payload: JsonValue) -> Result<JsonValue, UpcastError> {
    let payload = upcast::rename_field(payload, "name", "title")?;
    upcast::default_field(payload, "author_id", Uuid::nil().to_string())
}

/// Version 3 added tags and a duration in minutes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(version = 3, context = "courses", alias = "LessonReleased", previous = LessonPublishedV2)]
struct LessonPublished {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    #[event(key)]
    author_id: Uuid,
    title: String,
    tags: Vec<String>,
    #[event(key = "minutes")]
    duration: Option<u32>,
}

impl From<LessonPublishedV2> for LessonPublished {
    fn from(old: LessonPublishedV2) -> Self {
        Self {
            lesson_id: old.lesson_id,
            author_id: old.author_id,
            title: old.title,
            tags: Vec::new(),
            duration: None,
        }
    }
}

/// A chain of raw steps only, three versions deep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(version = 4, subject = "edupulse.courses.quiz-submitted",
        upcast(from = 1, with = quiz_v1), upcast(from = 3, with = quiz_v3), upcast(from = 2, with = quiz_v2))]
struct QuizSubmitted {
    #[event(aggregate_id)]
    quiz_id: Uuid,
    score: u32,
    max_score: u32,
    passed: bool,
}

/// v1 -> v2: `points` became `score`.
fn quiz_v1(payload: JsonValue) -> Result<JsonValue, UpcastError> {
    upcast::rename_field(payload, "points", "score")
}

/// v2 -> v3: `max_score` added, 100 for every old quiz. Infallible steps return the value.
fn quiz_v2(mut payload: JsonValue) -> JsonValue {
    if let Some(object) = payload.as_object_mut() {
        object.entry("max_score").or_insert(100.into());
    }
    payload
}

/// v3 -> v4: `passed` derived from the score; refuses a payload without one.
fn quiz_v3(payload: JsonValue) -> Result<JsonValue, UpcastError> {
    let score = payload
        .get("score")
        .and_then(JsonValue::as_u64)
        .ok_or_else(|| UpcastError::new("`score` is missing"))?;
    let max = payload.get("max_score").and_then(JsonValue::as_u64).unwrap_or(100);
    upcast::default_field(payload, "passed", score * 2 >= max)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
#[event(no_aggregate_id)]
struct CourseArchived {}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(context = "courses")]
enum CourseEvent {
    LessonPublished(LessonPublished),
    Archived(CourseArchived),
}

#[derive(Debug, Clone, PartialEq, DomainEvent)]
enum AnyEvent {
    Course(CourseEvent),
    Quiz(QuizSubmitted),
}

#[test]
fn generated_names_subjects_and_versions() {
    assert_eq!(LessonPublished::EVENT_TYPE, "LessonPublished");
    assert_eq!(LessonPublished::ALIASES, ["LessonReleased"]);
    assert_eq!(LessonPublished::SUBJECT, "courses.LessonPublished");
    assert_eq!(LessonPublished::VERSION, 3);
    assert_eq!(LessonPublished::KEYS, ["author_id", "minutes"]);
    assert_eq!(LessonPublishedV2::VERSION, 2);
    assert_eq!(QuizSubmitted::SUBJECT, "edupulse.courses.quiz-submitted");
    assert_eq!(QuizSubmitted::VERSION, 4);
    assert_eq!(CourseArchived::SUBJECT, "courses.CourseArchived");
    assert_eq!(CourseEvent::EVENT_TYPES, ["LessonPublished", "CourseArchived"]);
    assert_eq!(CourseEvent::ACCEPTED_TYPES, ["LessonPublished", "LessonReleased", "CourseArchived"]);
    assert_eq!(AnyEvent::EVENT_TYPES, ["LessonPublished", "CourseArchived", "QuizSubmitted"]);
    assert_eq!(
        AnyEvent::SUBJECTS,
        ["courses.LessonPublished", "courses.CourseArchived", "edupulse.courses.quiz-submitted"]
    );
}

#[test]
fn v1_and_v2_payloads_decode_to_v3() -> Result<(), EventError> {
    let v1 = format!(r#"{{"lesson_id":"{LESSON}","name":"Ownership"}}"#);
    let event = LessonPublished::decode("LessonPublished", 1, v1.as_bytes())?;
    assert_eq!(
        event,
        LessonPublished {
            lesson_id: lesson(),
            author_id: Uuid::nil(),
            title: "Ownership".into(),
            tags: vec![],
            duration: None
        }
    );

    let v2 = format!(r#"{{"lesson_id":"{LESSON}","author_id":"{AUTHOR}","title":"Borrowing"}}"#);
    let event = LessonPublished::decode("LessonPublished", 2, v2.as_bytes())?;
    assert_eq!(event.title, "Borrowing");
    assert_eq!(event.author_id.to_string(), AUTHOR);

    let v3 = format!(
        r#"{{"lesson_id":"{LESSON}","author_id":"{AUTHOR}","title":"Traits","tags":["x"],"duration":5}}"#
    );
    let event = LessonPublished::decode("LessonPublished", 3, v3.as_bytes())?;
    assert_eq!((event.tags.as_slice(), event.duration), (&["x".to_owned()][..], Some(5)));
    Ok(())
}

#[test]
fn aliases_decode_old_names() -> Result<(), EventError> {
    let v1 = format!(r#"{{"lesson_id":"{LESSON}","name":"Old name"}}"#);
    let event = LessonPublished::decode("LessonReleased", 1, v1.as_bytes())?;
    assert_eq!(event.title, "Old name");
    let CourseEvent::LessonPublished(event) = CourseEvent::decode("LessonReleased", 1, v1.as_bytes())? else {
        return Err(EventError::Config("decoded the wrong variant".into()));
    };
    assert_eq!(event.title, "Old name");
    Ok(())
}

#[test]
fn raw_chain_runs_every_step_in_order() -> Result<(), EventError> {
    let id = lesson();
    let v1 = format!(r#"{{"quiz_id":"{id}","points":70}}"#);
    let v2 = format!(r#"{{"quiz_id":"{id}","score":30}}"#);
    let v3 = format!(r#"{{"quiz_id":"{id}","score":30,"max_score":50}}"#);
    let v4 = format!(r#"{{"quiz_id":"{id}","score":1,"max_score":2,"passed":false}}"#);
    assert_eq!(
        QuizSubmitted::decode("QuizSubmitted", 1, v1.as_bytes())?,
        QuizSubmitted { quiz_id: id, score: 70, max_score: 100, passed: true }
    );
    assert_eq!(
        QuizSubmitted::decode("QuizSubmitted", 2, v2.as_bytes())?,
        QuizSubmitted { quiz_id: id, score: 30, max_score: 100, passed: false }
    );
    assert_eq!(
        QuizSubmitted::decode("QuizSubmitted", 3, v3.as_bytes())?,
        QuizSubmitted { quiz_id: id, score: 30, max_score: 50, passed: true }
    );
    assert_eq!(
        QuizSubmitted::decode("QuizSubmitted", 4, v4.as_bytes())?,
        QuizSubmitted { quiz_id: id, score: 1, max_score: 2, passed: false }
    );
    Ok(())
}

#[test]
fn newer_or_zero_version_is_unsupported() {
    let payload = format!(r#"{{"lesson_id":"{LESSON}"}}"#);
    for version in [4, 99, u32::MAX] {
        let err = LessonPublished::decode("LessonPublished", version, payload.as_bytes()).unwrap_err();
        assert!(
            matches!(&err, EventError::UnsupportedVersion { found, newest_known: 3, .. } if *found == version),
            "{err}"
        );
        assert!(err.to_string().contains("deploy a build"), "{err}");
    }
    let err = LessonPublished::decode("LessonPublished", 0, payload.as_bytes()).unwrap_err();
    assert!(matches!(err, EventError::UnsupportedVersion { found: 0, newest_known: 3, .. }), "{err}");
    let err = AnyEvent::decode("QuizSubmitted", 5, payload.as_bytes()).unwrap_err();
    assert!(matches!(err, EventError::UnsupportedVersion { found: 5, newest_known: 4, .. }), "{err}");
}

#[test]
fn unknown_type_is_refused() {
    let err = LessonPublished::decode("LessonDeleted", 1, b"{}").unwrap_err();
    assert!(matches!(&err, EventError::UnknownEventType { event_type, .. } if event_type == "LessonDeleted"));
    let err = AnyEvent::decode("PaymentReceived", 1, b"{}").unwrap_err();
    let EventError::UnknownEventType { event_type, known, position } = &err else { panic!("{err}") };
    assert_eq!((event_type.as_str(), *position), ("PaymentReceived", None));
    assert_eq!(*known, ["LessonPublished", "LessonReleased", "CourseArchived", "QuizSubmitted"]);
    assert!(err.to_string().contains("unknown event type `PaymentReceived`"), "{err}");
    let err = err.at_position(42);
    assert_eq!(err.position(), Some(42));
    assert!(err.to_string().contains("at global position 42"), "{err}");
}

#[test]
fn malformed_payloads_are_decode_errors() {
    let cases: &[(&str, u32, &[u8])] = &[
        ("LessonPublished", 3, b"not json"),
        ("LessonPublished", 3, b""),
        ("LessonPublished", 3, b"{\"lesson_id\": 5}"),
        ("LessonPublished", 2, b"[1, 2"),
        ("LessonPublished", 1, b"\"a string, not an object\""),
        ("LessonPublished", 1, &[0xff, 0xfe, 0x00]),
        ("QuizSubmitted", 3, b"{\"quiz_id\": \"0190c4a8-6ad8-7f0e-9b1a-3c5d2f4e6a7b\"}"),
        ("QuizSubmitted", 1, b"{}"),
    ];
    for (event_type, version, payload) in cases {
        let err = AnyEvent::decode(event_type, *version, payload).unwrap_err();
        assert!(
            matches!(&err, EventError::Decode { event_type: t, version: v, .. } if t == event_type && v == version),
            "{event_type} v{version}: {err}"
        );
        assert!(err.is_undecodable_event());
    }
    // The upcaster's own refusal is reported with the step that failed.
    let err =
        QuizSubmitted::decode("QuizSubmitted", 3, b"{\"quiz_id\": \"0190c4a8-6ad8-7f0e-9b1a-3c5d2f4e6a7b\"}")
            .unwrap_err();
    assert!(err.to_string().contains("upcaster from version 3 to 4 failed: `score` is missing"), "{err}");
}

#[test]
fn encode_gives_typed_bindings_and_round_trips() -> Result<(), EventError> {
    let event = LessonPublished {
        lesson_id: lesson(),
        author_id: Uuid::nil(),
        title: "T".into(),
        tags: vec!["a".into()],
        duration: Some(12),
    };
    let encoded = event.encode()?;
    assert_eq!(
        (encoded.event_type, encoded.schema_version, encoded.subject),
        ("LessonPublished", 3, "courses.LessonPublished")
    );
    assert_eq!(encoded.aggregate_id, Some(lesson()));
    assert_eq!(
        encoded.keys,
        [
            PromotedKey { name: "author_id", value: KeyValue::Uuid(Uuid::nil()) },
            PromotedKey { name: "minutes", value: KeyValue::Integer(12) },
        ]
    );
    let back = LessonPublished::decode(
        encoded.event_type,
        encoded.schema_version,
        encoded.payload.get().as_bytes(),
    )?;
    assert_eq!(back, event);

    let without = LessonPublished { duration: None, ..event.clone() };
    assert_eq!(without.promoted_keys().len(), 1, "a None key is left out");

    let wrapped = AnyEvent::Course(CourseEvent::from(event.clone()));
    assert_eq!(
        (wrapped.event_type(), wrapped.subject(), wrapped.schema_version()),
        ("LessonPublished", "courses.LessonPublished", 3)
    );
    assert_eq!(wrapped.aggregate_id(), Some(lesson()));
    let encoded = wrapped.encode()?;
    let back =
        AnyEvent::decode(encoded.event_type, encoded.schema_version, encoded.payload.get().as_bytes())?;
    assert_eq!(back, wrapped);

    let archived = AnyEvent::Course(CourseEvent::Archived(CourseArchived {}));
    assert_eq!(archived.aggregate_id(), None);
    assert_eq!(archived.encode()?.payload.get(), "{}");
    Ok(())
}
