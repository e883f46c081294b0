//! Typed consumers against a real nats-server: ack after success, nak and redeliver on
//! failure, poison messages terminated and reported, a panicking handler caught like a
//! failure, old versions upcast, unknown types by policy, an existing durable consumer
//! brought in line with the configuration.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use common::nats::{self, NatsServer, STREAM};
use common::{CourseEvent, LessonPublishedV2, LessonRenamed, counted, store};
use edupulse_events::{
    BoxError, BusConfig, DomainEvent, EventBus, EventEnvelope, EventError, NatsPublisher, PoisonReport,
    Subscriber, SubscriberConfig, UnknownEventPolicy, Uuid,
};
use std::sync::atomic::Ordering;

/// An enum that knows only one of the events on the stream.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(context = "courses")]
enum RenamesOnly {
    LessonRenamed(LessonRenamed),
}

async fn setup() -> (NatsServer, NatsPublisher, EventBus) {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let bus = EventBus::new(store().await, Arc::new(publisher.clone()), BusConfig::default()).unwrap();
    (server, publisher, bus)
}

fn config(name: &str, max_deliver: i64) -> SubscriberConfig {
    SubscriberConfig::new(STREAM, name)
        .with_max_deliver(max_deliver)
        .with_nak_delay(Duration::from_millis(30))
}

/// Runs the subscriber until `done` holds (or 20 s), then stops it.
async fn run_until<E: DomainEvent>(
    subscriber: &Subscriber<E>,
    handler: impl AsyncFnMut(EventEnvelope<E>) -> Result<(), BoxError>,
    done: impl Fn(&Subscriber<E>) -> bool,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = subscriber.run(handler, async move {
        let _ = stopped.await;
    });
    let watch = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !done(subscriber) {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {:?}", subscriber.stats());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Give a wrongly redelivered message the chance to show up.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = stop.send(());
    };
    let (result, ()) = tokio::join!(run, watch);
    result.unwrap();
}

#[tokio::test]
async fn a_handler_that_fails_twice_applies_the_event_once() {
    let (_server, publisher, bus) = setup().await;
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, [counted(7)]).await).await.unwrap();

    let subscriber = Subscriber::<CourseEvent>::new(publisher.jetstream(), config("twice", 5)).await.unwrap();
    let mut attempts = 0;
    let mut applied = Vec::new();
    run_until(
        &subscriber,
        async |envelope: EventEnvelope<CourseEvent>| {
            attempts += 1;
            if attempts <= 2 {
                return Err("the read model is busy".into());
            }
            applied.push(envelope.event);
            Ok(())
        },
        |s| s.stats().handled.load(Ordering::Relaxed) == 1,
    )
    .await;
    assert_eq!(attempts, 3);
    assert_eq!(applied, [counted(7)]);
    assert_eq!(subscriber.stats().retried.load(Ordering::Relaxed), 2);
    assert_eq!(subscriber.stats().poisoned.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_poison_event_is_terminated_reported_and_the_consumer_moves_on() {
    let (_server, publisher, bus) = setup().await;
    let (poison, healthy) = (Uuid::now_v7(), Uuid::now_v7());
    bus.commit(async |tx| tx.append("lesson", poison, 0, [counted(1)]).await).await.unwrap();
    bus.commit(async |tx| tx.append("lesson", healthy, 0, [counted(2)]).await).await.unwrap();

    let reports: Arc<Mutex<Vec<PoisonReport>>> = Arc::default();
    let sink = reports.clone();
    let subscriber = Subscriber::<CourseEvent>::new(publisher.jetstream(), config("poison", 3))
        .await
        .unwrap()
        .on_poison(move |r| sink.lock().unwrap().push(r.clone()));
    let mut calls: HashMap<Uuid, u32> = HashMap::new();
    run_until(
        &subscriber,
        async |envelope: EventEnvelope<CourseEvent>| {
            *calls.entry(envelope.aggregate_id).or_default() += 1;
            if envelope.aggregate_id == poison { Err("cannot apply".into()) } else { Ok(()) }
        },
        |s| s.stats().poisoned.load(Ordering::Relaxed) == 1 && s.stats().handled.load(Ordering::Relaxed) == 1,
    )
    .await;
    assert_eq!(calls.get(&poison), Some(&3), "delivered exactly max_deliver times, then given up");
    assert_eq!(calls.get(&healthy), Some(&1));
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].deliveries, 3);
    assert_eq!(reports[0].event_type.as_deref(), Some("Counted"));
    assert!(reports[0].error.contains("cannot apply"), "{:?}", reports[0]);
}

#[tokio::test]
async fn an_old_version_on_the_wire_reaches_the_handler_upcast() {
    let (_server, publisher, bus) = setup().await;
    let id = Uuid::now_v7();
    // An old deployment publishes version 2 of LessonPublished.
    let old = LessonPublishedV2 { lesson_id: id, title: "From v2".into() };
    bus.commit(async |tx| tx.append("lesson", id, 0, [old]).await).await.unwrap();

    let subscriber =
        Subscriber::<CourseEvent>::new(publisher.jetstream(), config("upcast", 3)).await.unwrap();
    let mut received = Vec::new();
    run_until(
        &subscriber,
        async |envelope: EventEnvelope<CourseEvent>| {
            received.push(envelope.event);
            Ok(())
        },
        |s| s.stats().handled.load(Ordering::Relaxed) == 1,
    )
    .await;
    match &received[..] {
        [CourseEvent::LessonPublished(e)] => assert_eq!((e.title.as_str(), e.author_id), ("From v2", None)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn unknown_event_types_are_acked_and_counted_or_refused_by_policy() {
    let (_server, publisher, bus) = setup().await;
    let id = Uuid::now_v7();
    bus.commit(async |tx| {
        tx.append("lesson", id, 0, [counted(1)]).await?;
        let renamed = CourseEvent::LessonRenamed(LessonRenamed { lesson_id: id, title: "New".into() });
        tx.append("lesson", id, 1, [renamed]).await
    })
    .await
    .unwrap();

    let lenient = Subscriber::<RenamesOnly>::new(publisher.jetstream(), config("lenient", 3)).await.unwrap();
    let mut seen = Vec::new();
    run_until(
        &lenient,
        async |envelope: EventEnvelope<RenamesOnly>| {
            seen.push(envelope.event);
            Ok(())
        },
        |s| s.stats().handled.load(Ordering::Relaxed) == 1 && s.stats().unknown.load(Ordering::Relaxed) == 1,
    )
    .await;
    assert_eq!(seen, [RenamesOnly::LessonRenamed(LessonRenamed { lesson_id: id, title: "New".into() })]);
    assert_eq!(lenient.stats().poisoned.load(Ordering::Relaxed), 0);

    let reports: Arc<Mutex<Vec<PoisonReport>>> = Arc::default();
    let sink = reports.clone();
    let strict_config = config("strict", 3).with_unknown_events(UnknownEventPolicy::Refuse);
    let strict = Subscriber::<RenamesOnly>::new(publisher.jetstream(), strict_config)
        .await
        .unwrap()
        .on_poison(move |r| sink.lock().unwrap().push(r.clone()));
    run_until(
        &strict,
        async |_: EventEnvelope<RenamesOnly>| Ok(()),
        |s| s.stats().handled.load(Ordering::Relaxed) == 1 && s.stats().poisoned.load(Ordering::Relaxed) == 1,
    )
    .await;
    let reports = reports.lock().unwrap();
    assert_eq!(reports[0].event_type.as_deref(), Some("Counted"));
    assert_eq!(strict.stats().unknown.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_handler_that_panics_is_retried_then_reported_and_the_subscriber_goes_on() {
    let (_server, publisher, bus) = setup().await;
    let (before, poison, after) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for (id, n) in [(before, 1), (poison, 2), (after, 3)] {
        bus.commit(async |tx| tx.append("lesson", id, 0, [counted(n)]).await).await.unwrap();
    }

    let reports: Arc<Mutex<Vec<PoisonReport>>> = Arc::default();
    let sink = reports.clone();
    let subscriber = Subscriber::<CourseEvent>::new(publisher.jetstream(), config("panics", 3))
        .await
        .unwrap()
        .on_poison(move |r| sink.lock().unwrap().push(r.clone()));
    let mut calls: HashMap<Uuid, u32> = HashMap::new();
    run_until(
        &subscriber,
        async |envelope: EventEnvelope<CourseEvent>| {
            *calls.entry(envelope.aggregate_id).or_default() += 1;
            if envelope.aggregate_id == poison {
                panic!("the read model has no row for {}", envelope.aggregate_id);
            }
            Ok(())
        },
        |s| s.stats().poisoned.load(Ordering::Relaxed) == 1 && s.stats().handled.load(Ordering::Relaxed) == 2,
    )
    .await;
    assert_eq!(calls.get(&poison), Some(&3), "delivered exactly max_deliver times, then given up");
    assert_eq!((calls.get(&before), calls.get(&after)), (Some(&1), Some(&1)), "the others are handled");
    let stats = subscriber.stats();
    assert_eq!(stats.retried.load(Ordering::Relaxed), 2, "two naks before the last delivery");
    assert_eq!(stats.poisoned.load(Ordering::Relaxed), 1);
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].deliveries, 3);
    assert_eq!(reports[0].event_type.as_deref(), Some("Counted"));
    assert!(reports[0].error.contains("panicked"), "{:?}", reports[0]);
    assert!(
        reports[0].error.contains(&format!("the read model has no row for {poison}")),
        "{:?}",
        reports[0]
    );
}

#[tokio::test]
async fn an_existing_durable_consumer_takes_the_new_settings_and_keeps_its_progress() {
    let (_server, publisher, bus) = setup().await;
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, [counted(1)]).await).await.unwrap();
    let first = Subscriber::<CourseEvent>::new(publisher.jetstream(), config("evolving", 3)).await.unwrap();
    run_until(
        &first,
        async |_: EventEnvelope<CourseEvent>| Ok(()),
        |s| s.stats().handled.load(Ordering::Relaxed) == 1,
    )
    .await;
    let stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
    assert_eq!(stream.consumer_info("evolving").await.unwrap().config.max_deliver, 3);

    // The next deployment asks for other settings under the same durable name.
    let changed = config("evolving", 5)
        .with_filter_subject("courses.>")
        .with_ack_wait(Duration::from_secs(7))
        .with_max_in_flight(16);
    let _second = Subscriber::<CourseEvent>::new(publisher.jetstream(), changed).await.unwrap();
    let info = stream.consumer_info("evolving").await.unwrap();
    assert_eq!(
        (info.config.max_deliver, info.config.ack_wait, info.config.max_ack_pending),
        (5, Duration::from_secs(7), 16),
        "the server's consumer has the new settings"
    );
    assert_eq!(info.config.filter_subject, "courses.>");
    assert_eq!(info.ack_floor.stream_sequence, 1, "updated in place: the progress is kept");
    assert_eq!(info.num_pending, 0);

    // A setting the server cannot change in place is a typed error, not silently the old one.
    let only_new = pull::Config {
        durable_name: Some("from-now-on".into()),
        deliver_policy: consumer::DeliverPolicy::New,
        ack_policy: consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    stream.create_consumer(only_new).await.unwrap();
    match Subscriber::<CourseEvent>::new(publisher.jetstream(), config("from-now-on", 3)).await {
        Err(EventError::Config(message)) => {
            assert!(message.contains("`from-now-on`") && message.contains("deliver policy"), "{message}");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
    assert_eq!(
        stream.consumer_info("from-now-on").await.unwrap().config.deliver_policy,
        consumer::DeliverPolicy::New,
        "the existing consumer is left alone"
    );
}
