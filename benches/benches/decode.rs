//! Decoding: plain serde vs the derived upcaster chain vs hand-written code doing the same.
//!
//! `cargo bench -p edupulse-events-bench --bench decode`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use edupulse_events::upcast::{self, JsonValue, UpcastError};
use edupulse_events::{DomainEvent, Uuid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(name = "LessonPublished", version = 2, context = "courses", upcast(from = 1, with = v1_to_v2))]
struct LessonPublishedV2 {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    title: String,
    minutes: u32,
}

fn v1_to_v2(payload: JsonValue) -> Result<JsonValue, UpcastError> {
    let payload = upcast::rename_field(payload, "name", "title")?;
    upcast::default_field(payload, "minutes", 0)
}

#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(version = 3, context = "courses", previous = LessonPublishedV2)]
struct LessonPublished {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    title: String,
    minutes: u32,
    tags: Vec<String>,
}

impl From<LessonPublishedV2> for LessonPublished {
    fn from(old: LessonPublishedV2) -> Self {
        Self { lesson_id: old.lesson_id, title: old.title, minutes: old.minutes, tags: Vec::new() }
    }
}

/// What a careful hand-written upcaster does for a v1 payload: the same steps, no dispatch.
fn hand_written_v1(payload: &[u8]) -> Result<LessonPublished, String> {
    let mut value: JsonValue = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    let object = value.as_object_mut().ok_or("not an object")?;
    if let Some(name) = object.remove("name") {
        object.insert("title".into(), name);
    }
    object.entry("minutes").or_insert(0.into());
    let v2: LessonPublishedV2 = serde_json::from_value(value).map_err(|e| e.to_string())?;
    Ok(v2.into())
}

fn decode(c: &mut Criterion) {
    let id = Uuid::now_v7();
    let v1 = format!(r#"{{"lesson_id":"{id}","name":"Ownership in ten minutes"}}"#);
    let v3 = format!(
        r#"{{"lesson_id":"{id}","title":"Ownership in ten minutes","minutes":10,"tags":["rust","intro"]}}"#
    );
    let mut group = c.benchmark_group("decode");
    group.bench_function("v3/plain serde", |b| {
        b.iter(|| serde_json::from_slice::<LessonPublished>(black_box(v3.as_bytes())).map(|e| e.minutes))
    });
    group.bench_function("v3/derived", |b| {
        b.iter(|| LessonPublished::decode("LessonPublished", 3, black_box(v3.as_bytes())).map(|e| e.minutes))
    });
    group.bench_function("v1->v3/hand-written", |b| {
        b.iter(|| hand_written_v1(black_box(v1.as_bytes())).map(|e| e.minutes))
    });
    group.bench_function("v1->v3/derived", |b| {
        b.iter(|| LessonPublished::decode("LessonPublished", 1, black_box(v1.as_bytes())).map(|e| e.minutes))
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
