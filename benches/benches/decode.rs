//! Decoding: plain serde vs the derived upcaster chain vs hand-written code doing the same.
//!
//! `cargo bench -p edupulse-events-bench --bench decode`

use std::hint::black_box;

use criterion::{Criterion, criterion_group};
use edupulse_events::upcast::{self, JsonValue, UpcastError};
use edupulse_events::{DomainEvent, EventError, Uuid};
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

/// What careful hand-written code does: the same checks (event type, version) and the same
/// typed errors with their context, and the same upcasting steps.
fn hand_written(event_type: &str, version: u32, payload: &[u8]) -> Result<LessonPublished, EventError> {
    let decode_error = |e: serde_json::Error| EventError::Decode {
        event_type: event_type.to_owned(),
        version,
        position: None,
        source: Box::new(e),
    };
    if event_type != "LessonPublished" {
        return Err(EventError::UnknownEventType {
            event_type: event_type.to_owned(),
            known: &["LessonPublished"],
            position: None,
        });
    }
    match version {
        3 => serde_json::from_slice(payload).map_err(decode_error),
        1 | 2 => {
            let mut value: JsonValue = serde_json::from_slice(payload).map_err(decode_error)?;
            if version == 1 {
                let object = value.as_object_mut().ok_or_else(|| EventError::Decode {
                    event_type: event_type.to_owned(),
                    version,
                    position: None,
                    source: "not an object".into(),
                })?;
                if let Some(name) = object.remove("name") {
                    object.insert("title".into(), name);
                }
                object.entry("minutes").or_insert(0.into());
            }
            let v2: LessonPublishedV2 = serde_json::from_value(value).map_err(decode_error)?;
            Ok(v2.into())
        }
        found => Err(EventError::UnsupportedVersion {
            event_type: event_type.to_owned(),
            found,
            newest_known: 3,
            position: None,
        }),
    }
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
    group.bench_function("v3/hand-written", |b| {
        b.iter(|| hand_written("LessonPublished", 3, black_box(v3.as_bytes())).map(|e| e.minutes))
    });
    group.bench_function("v1->v3/hand-written", |b| {
        b.iter(|| hand_written("LessonPublished", 1, black_box(v1.as_bytes())).map(|e| e.minutes))
    });
    group.bench_function("v1->v3/derived", |b| {
        b.iter(|| LessonPublished::decode("LessonPublished", 1, black_box(v1.as_bytes())).map(|e| e.minutes))
    });
    group.finish();
}

criterion_group!(benches, decode);

/// `decode -- --count VARIANT N`: runs one variant N times and exits, for instruction counts
/// under `valgrind --tool=callgrind` (repeatable where wall-clock time on a shared machine is
/// not). VARIANT: plain, derived3, hand3, derived1, hand1.
fn count(variant: &str, n: u64) {
    let id = Uuid::nil();
    let v1 = format!(r#"{{"lesson_id":"{id}","name":"Ownership in ten minutes"}}"#);
    let v3 = format!(
        r#"{{"lesson_id":"{id}","title":"Ownership in ten minutes","minutes":10,"tags":["rust","intro"]}}"#
    );
    let mut sum = 0u64;
    for _ in 0..n {
        let minutes = match variant {
            "plain" => {
                serde_json::from_slice::<LessonPublished>(black_box(v3.as_bytes())).map(|e| e.minutes).ok()
            }
            "derived3" => LessonPublished::decode("LessonPublished", 3, black_box(v3.as_bytes()))
                .map(|e| e.minutes)
                .ok(),
            "hand3" => hand_written("LessonPublished", 3, black_box(v3.as_bytes())).map(|e| e.minutes).ok(),
            "derived1" => LessonPublished::decode("LessonPublished", 1, black_box(v1.as_bytes()))
                .map(|e| e.minutes)
                .ok(),
            "hand1" => hand_written("LessonPublished", 1, black_box(v1.as_bytes())).map(|e| e.minutes).ok(),
            _ => None,
        };
        sum += u64::from(minutes.unwrap_or(0));
    }
    println!("{variant} x{n}: {sum}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--count") {
        let variant = args.get(i + 1).map_or("plain", String::as_str);
        let n = args.get(i + 2).and_then(|s| s.parse().ok()).unwrap_or(0);
        count(variant, n);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
