//! Every struct attribute and field attribute, used at once, and the values they produce.
use edupulse_events::upcast::{self, JsonValue, UpcastError};
use edupulse_events::{AggregateId, DomainEvent, EventSchema, IntoKeyValue, KeyValue, PromotedKey, Uuid};
use serde::{Deserialize, Serialize};

/// A newtype aggregate id.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct LessonId(Uuid);

impl AggregateId for LessonId {
    fn aggregate_uuid(&self) -> Uuid {
        self.0
    }
}

/// A newtype key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Locale(String);

impl IntoKeyValue for Locale {
    fn key_value(&self) -> Option<KeyValue> {
        Some(KeyValue::Text(self.0.to_lowercase()))
    }
}

#[derive(Debug, Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished", version = 2, upcast(from = 1, with = v1))]
#[event(no_aggregate_id)]
struct LessonPublishedV2 {
    lesson_id: LessonId,
    title: String,
}

fn v1(payload: JsonValue) -> Result<JsonValue, UpcastError> {
    upcast::rename_field(payload, "name", "title")
}

#[derive(Debug, Serialize, Deserialize, DomainEvent)]
#[event(
    name = "LessonPublished",
    alias = "LessonReleased",
    alias = "LessonWentLive",
    version = 3,
    subject = "edupulse.courses.lesson-published",
    previous = LessonPublishedV2
)]
struct Published {
    #[event(aggregate_id)]
    lesson_id: LessonId,
    #[event(key)]
    author_id: Uuid,
    #[event(key = "locale")]
    language: Locale,
    #[event(key)]
    r#type: String,
    #[event(key)]
    rank: i64,
    #[event(key)]
    featured: bool,
    #[event(key)]
    reviewer: Option<Uuid>,
    title: String,
}

impl From<LessonPublishedV2> for Published {
    fn from(old: LessonPublishedV2) -> Self {
        Self {
            lesson_id: old.lesson_id,
            author_id: Uuid::nil(),
            language: Locale("EN".into()),
            r#type: "video".into(),
            rank: 0,
            featured: false,
            reviewer: None,
            title: old.title,
        }
    }
}

/// An event without fields and without attributes.
#[derive(Debug, Serialize, Deserialize, DomainEvent)]
#[event(no_aggregate_id)]
struct Heartbeat;

#[test]
fn every_attribute_at_once_produces_its_values() {
    assert_eq!(Published::EVENT_TYPE, "LessonPublished");
    assert_eq!(Published::ALIASES, ["LessonReleased", "LessonWentLive"]);
    assert_eq!(Published::ACCEPTED_TYPES, ["LessonPublished", "LessonReleased", "LessonWentLive"]);
    assert_eq!(Published::SUBJECT, "edupulse.courses.lesson-published");
    assert_eq!(Published::VERSION, 3);
    assert_eq!(Published::KEYS, ["author_id", "locale", "type", "rank", "featured", "reviewer"]);
    assert_eq!(Heartbeat::SUBJECT, "Heartbeat");
    assert_eq!(Heartbeat::VERSION, 1);

    let id = Uuid::now_v7();
    let v1 = format!(r#"{{"lesson_id":"{id}","name":"Old"}}"#);
    let event = Published::decode("LessonWentLive", 1, v1.as_bytes()).unwrap();
    assert_eq!(event.title, "Old");
    assert_eq!(event.aggregate_id(), Some(id));
    assert_eq!(
        event.promoted_keys(),
        [
            PromotedKey { name: "author_id", value: KeyValue::Uuid(Uuid::nil()) },
            PromotedKey { name: "locale", value: KeyValue::Text("en".into()) },
            PromotedKey { name: "type", value: KeyValue::Text("video".into()) },
            PromotedKey { name: "rank", value: KeyValue::Integer(0) },
            PromotedKey { name: "featured", value: KeyValue::Bool(false) },
        ]
    );
    let payload = event.to_payload().unwrap();
    assert!(payload.get().contains(r#""type":"video""#));
    assert!(Heartbeat::decode("Heartbeat", 1, b"null").is_ok());
    assert!(Heartbeat::decode("Heartbeat", 2, b"null").is_err());
}
