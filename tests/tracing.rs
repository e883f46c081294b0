//! The `tracing` spans of a commit, of a batch sent to the broker and of a projection batch
//! carry the `traceparent` of the events they handle (against a real PostgreSQL and
//! nats-server), so that a trace follows an event from the service that wrote it through
//! publication and projection.

mod common;

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::nats::{self, NatsServer};
use common::{CourseEvent, counted, store};
use edupulse_events::{
    BoxError, BusConfig, EventBus, EventEnvelope, Metadata, Projection, ProjectionRunner, Transaction, Uuid,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};

/// Every span: its metadata and its fields as `name=value` pairs, records included.
static SPANS: Mutex<Vec<(&'static tracing::Metadata<'static>, String)>> = Mutex::new(Vec::new());

thread_local! {
    /// The spans entered on this thread, innermost last: `Span::current()`.
    static STACK: std::cell::RefCell<Vec<Id>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spans of the whole process (the relay runs on tasks of other threads).
struct Capture {
    next: AtomicU64,
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fields = String::new();
        span.record(&mut Fields(&mut fields));
        let mut spans = SPANS.lock().unwrap();
        spans.push((span.metadata(), fields));
        // Ids start at 1 and index the list.
        Id::from_u64(id + 1)
    }
    fn record(&self, id: &Id, values: &Record<'_>) {
        let mut spans = SPANS.lock().unwrap();
        if let Some((_, fields)) = usize::try_from(id.into_u64() - 1).ok().and_then(|i| spans.get_mut(i)) {
            values.record(&mut Fields(fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, id: &Id) {
        STACK.with(|stack| stack.borrow_mut().push(id.clone()));
    }
    fn exit(&self, _: &Id) {
        STACK.with(|stack| stack.borrow_mut().pop());
    }
    fn current_span(&self) -> tracing_core::span::Current {
        let Some(id) = STACK.with(|stack| stack.borrow().last().cloned()) else {
            return tracing_core::span::Current::none();
        };
        let spans = SPANS.lock().unwrap();
        match usize::try_from(id.into_u64() - 1).ok().and_then(|i| spans.get(i)) {
            Some((metadata, _)) => tracing_core::span::Current::new(id, metadata),
            None => tracing_core::span::Current::none(),
        }
    }
}

struct Noop;

impl Projection<CourseEvent> for Noop {
    fn name(&self) -> &str {
        "tracing_noop"
    }

    async fn apply(&self, _: &mut Transaction, _: &EventEnvelope<CourseEvent>) -> Result<(), BoxError> {
        Ok(())
    }
}

#[tokio::test]
async fn commit_publish_and_projection_spans_carry_the_events_traceparent() {
    tracing::subscriber::set_global_default(Capture { next: AtomicU64::new(0) }).unwrap();
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = EventBus::new(store.clone(), Arc::new(publisher), BusConfig::default()).unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let id = Uuid::now_v7();
    let envelope = EventEnvelope::new("lesson", id, counted(1))
        .with_metadata(Metadata { traceparent: Some(traceparent.into()), ..Metadata::default() });
    let committed = bus.commit(async |tx| tx.append_envelopes(0, vec![envelope]).await).await.unwrap();
    committed.receipt.published().await.unwrap();
    common::until_readable(&store, 1).await;
    assert_eq!(ProjectionRunner::new(store.clone(), Noop).catch_up().await.unwrap(), 1);

    let spans: HashMap<String, String> = SPANS
        .lock()
        .unwrap()
        .iter()
        .map(|(metadata, fields)| (metadata.name().to_owned(), fields.clone()))
        .collect();
    let field = format!("traceparent={traceparent}");
    let commit = &spans["edupulse.commit"];
    assert!(commit.contains(&field) && commit.contains("events=1"), "{commit}");
    let publish = &spans["edupulse.publish_batch"];
    assert!(publish.contains(&field) && publish.contains("events=1"), "{publish}");
    let projection = &spans["edupulse.projection_batch"];
    assert!(projection.contains(&field) && projection.contains("projection=tracing_noop"), "{projection}");
}
