//! Typed consumers, each test against a real nats-server and against the in-process broker
//! (one consumer API, `on_both!`): ack after success, retry on failure, poison
//! messages terminated and reported, a panicking handler caught like a failure, old versions
//! upcast, unknown types by policy, an existing durable consumer brought in line with the
//! configuration; aggregates handled concurrently, each in order across failures, a
//! restart and a crash; a slow handler over a backlog holding at most `max_in_flight`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use common::nats::{self, NatsServer, STREAM};
use common::{CourseEvent, LessonPublishedV2, LessonRenamed, counted, store};
use edupulse_events::{
    BoxError, BusConfig, DomainEvent, EventBus, EventEnvelope, EventError, InMemoryBroker, NatsPublisher,
    PoisonReport, Publisher, Subscriber, SubscriberConfig, UnknownEventPolicy, Uuid,
};
use std::sync::atomic::Ordering;

/// An enum that knows only one of the events on the stream.
#[derive(Debug, Clone, PartialEq, DomainEvent)]
#[event(context = "courses")]
enum RenamesOnly {
    LessonRenamed(LessonRenamed),
}

/// Which broker a test consumes from.
#[derive(Clone, Copy)]
enum Kind {
    Nats,
    Memory,
}

/// The broker of a test: a nats-server of its own (kept running while the test does), or
/// the in-process broker.
#[allow(clippy::large_enum_variant)] // one per test
enum Broker {
    Nats(#[allow(dead_code)] NatsServer, NatsPublisher),
    Memory(InMemoryBroker),
}

impl Broker {
    /// A subscriber with `config`, the same call on both.
    async fn subscriber<E: DomainEvent>(&self, config: SubscriberConfig) -> Subscriber<E> {
        match self {
            Self::Nats(_, publisher) => Subscriber::new(publisher.jetstream(), config).await.unwrap(),
            Self::Memory(broker) => Subscriber::in_memory(broker, config).unwrap(),
        }
    }

    /// The messages the durable consumer `name` was delivered and has not settled.
    async fn unacknowledged(&self, name: &str) -> Option<usize> {
        match self {
            Self::Nats(_, publisher) => {
                let stream = publisher.jetstream().get_stream(STREAM).await.ok()?;
                stream.consumer_info(name).await.ok().map(|info| info.num_ack_pending)
            }
            Self::Memory(broker) => broker.unacknowledged(name),
        }
    }
}

async fn setup(kind: Kind) -> (Broker, EventBus) {
    let (broker, publisher): (Broker, Arc<dyn Publisher>) = match kind {
        Kind::Nats => {
            let server = NatsServer::start().await;
            let publisher = nats::publisher(&server).await;
            (Broker::Nats(server, publisher.clone()), Arc::new(publisher))
        }
        Kind::Memory => {
            let broker = InMemoryBroker::new();
            (Broker::Memory(broker.clone()), Arc::new(broker))
        }
    };
    let bus = EventBus::new(store().await, publisher, BusConfig::default()).unwrap();
    (broker, bus)
}

/// Each test, once on nats-server (`on_nats::…`) and once on the in-process broker
/// (`in_memory::…`): one consumer API, the same rules.
macro_rules! on_both {
    ($($test:ident),* $(,)?) => {
        mod on_nats {
            $(#[tokio::test] async fn $test() { super::$test(super::Kind::Nats).await })*
        }
        mod in_memory {
            $(#[tokio::test] async fn $test() { super::$test(super::Kind::Memory).await })*
        }
    };
}

on_both!(
    a_handler_that_fails_twice_applies_the_event_once,
    a_poison_event_is_terminated_reported_and_the_consumer_moves_on,
    an_old_version_on_the_wire_reaches_the_handler_upcast,
    unknown_event_types_are_acked_and_counted_or_refused_by_policy,
    a_handler_that_panics_is_retried_then_reported_and_the_subscriber_goes_on,
    aggregates_are_handled_concurrently_each_in_order_across_failures_and_a_restart,
    after_a_crash_the_unacknowledged_messages_are_handled_before_newer_ones_of_their_aggregates,
    a_slow_handler_over_a_backlog_holds_at_most_max_in_flight,
);

fn config(name: &str, max_deliver: i64) -> SubscriberConfig {
    SubscriberConfig::new(STREAM, name)
        .with_max_deliver(max_deliver)
        .with_nak_delay(Duration::from_millis(30))
}

/// Runs the subscriber until `done` holds (or 20 s), then stops it.
async fn run_until<E: DomainEvent>(
    subscriber: &Subscriber<E>,
    handler: impl AsyncFn(EventEnvelope<E>) -> Result<(), BoxError>,
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

async fn a_handler_that_fails_twice_applies_the_event_once(kind: Kind) {
    let (broker, bus) = setup(kind).await;
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, [counted(7)]).await).await.unwrap();

    let subscriber = broker.subscriber::<CourseEvent>(config("twice", 5)).await;
    let attempts = Mutex::new(0);
    let applied = Mutex::new(Vec::new());
    run_until(
        &subscriber,
        async |envelope: EventEnvelope<CourseEvent>| {
            let attempt = {
                let mut attempts = attempts.lock().unwrap();
                *attempts += 1;
                *attempts
            };
            if attempt <= 2 {
                return Err("the read model is busy".into());
            }
            applied.lock().unwrap().push(envelope.event);
            Ok(())
        },
        |s| s.stats().handled.load(Ordering::Relaxed) == 1,
    )
    .await;
    assert_eq!(*attempts.lock().unwrap(), 3);
    assert_eq!(*applied.lock().unwrap(), [counted(7)]);
    assert_eq!(subscriber.stats().retried.load(Ordering::Relaxed), 2);
    assert_eq!(subscriber.stats().poisoned.load(Ordering::Relaxed), 0);
}

async fn a_poison_event_is_terminated_reported_and_the_consumer_moves_on(kind: Kind) {
    let (broker, bus) = setup(kind).await;
    let (poison, healthy) = (Uuid::now_v7(), Uuid::now_v7());
    bus.commit(async |tx| tx.append("lesson", poison, 0, [counted(1)]).await).await.unwrap();
    bus.commit(async |tx| tx.append("lesson", healthy, 0, [counted(2)]).await).await.unwrap();

    let reports: Arc<Mutex<Vec<PoisonReport>>> = Arc::default();
    let sink = reports.clone();
    let subscriber = broker
        .subscriber::<CourseEvent>(config("poison", 3))
        .await
        .on_poison(move |r| sink.lock().unwrap().push(r.clone()));
    let calls: Mutex<HashMap<Uuid, u32>> = Mutex::default();
    run_until(
        &subscriber,
        async |envelope: EventEnvelope<CourseEvent>| {
            *calls.lock().unwrap().entry(envelope.aggregate_id).or_default() += 1;
            if envelope.aggregate_id == poison { Err("cannot apply".into()) } else { Ok(()) }
        },
        |s| s.stats().poisoned.load(Ordering::Relaxed) == 1 && s.stats().handled.load(Ordering::Relaxed) == 1,
    )
    .await;
    let calls = calls.into_inner().unwrap();
    assert_eq!(calls.get(&poison), Some(&3), "attempted exactly max_deliver times, then given up");
    assert_eq!(calls.get(&healthy), Some(&1));
    let reports = reports.lock().unwrap();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].deliveries, 3);
    assert_eq!(reports[0].event_type.as_deref(), Some("Counted"));
    assert!(reports[0].error.contains("cannot apply"), "{:?}", reports[0]);
}

async fn an_old_version_on_the_wire_reaches_the_handler_upcast(kind: Kind) {
    let (broker, bus) = setup(kind).await;
    let id = Uuid::now_v7();
    // An old deployment publishes version 2 of LessonPublished.
    let old = LessonPublishedV2 { lesson_id: id, title: "From v2".into() };
    bus.commit(async |tx| tx.append("lesson", id, 0, [old]).await).await.unwrap();

    let subscriber = broker.subscriber::<CourseEvent>(config("upcast", 3)).await;
    let received = Mutex::new(Vec::new());
    run_until(
        &subscriber,
        async |envelope: EventEnvelope<CourseEvent>| {
            received.lock().unwrap().push(envelope.event);
            Ok(())
        },
        |s| s.stats().handled.load(Ordering::Relaxed) == 1,
    )
    .await;
    match &received.into_inner().unwrap()[..] {
        [CourseEvent::LessonPublished(e)] => assert_eq!((e.title.as_str(), e.author_id), ("From v2", None)),
        other => panic!("{other:?}"),
    }
}

async fn unknown_event_types_are_acked_and_counted_or_refused_by_policy(kind: Kind) {
    let (broker, bus) = setup(kind).await;
    let id = Uuid::now_v7();
    bus.commit(async |tx| {
        tx.append("lesson", id, 0, [counted(1)]).await?;
        let renamed = CourseEvent::LessonRenamed(LessonRenamed { lesson_id: id, title: "New".into() });
        tx.append("lesson", id, 1, [renamed]).await
    })
    .await
    .unwrap();

    let lenient = broker.subscriber::<RenamesOnly>(config("lenient", 3)).await;
    let seen = Mutex::new(Vec::new());
    run_until(
        &lenient,
        async |envelope: EventEnvelope<RenamesOnly>| {
            seen.lock().unwrap().push(envelope.event);
            Ok(())
        },
        |s| s.stats().handled.load(Ordering::Relaxed) == 1 && s.stats().unknown.load(Ordering::Relaxed) == 1,
    )
    .await;
    assert_eq!(
        *seen.lock().unwrap(),
        [RenamesOnly::LessonRenamed(LessonRenamed { lesson_id: id, title: "New".into() })]
    );
    assert_eq!(lenient.stats().poisoned.load(Ordering::Relaxed), 0);

    let reports: Arc<Mutex<Vec<PoisonReport>>> = Arc::default();
    let sink = reports.clone();
    let strict_config = config("strict", 3).with_unknown_events(UnknownEventPolicy::Refuse);
    let strict = broker
        .subscriber::<RenamesOnly>(strict_config)
        .await
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

async fn a_handler_that_panics_is_retried_then_reported_and_the_subscriber_goes_on(kind: Kind) {
    let (broker, bus) = setup(kind).await;
    let (before, poison, after) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for (id, n) in [(before, 1), (poison, 2), (after, 3)] {
        bus.commit(async |tx| tx.append("lesson", id, 0, [counted(n)]).await).await.unwrap();
    }

    let reports: Arc<Mutex<Vec<PoisonReport>>> = Arc::default();
    let sink = reports.clone();
    let subscriber = broker
        .subscriber::<CourseEvent>(config("panics", 3))
        .await
        .on_poison(move |r| sink.lock().unwrap().push(r.clone()));
    let calls: Mutex<HashMap<Uuid, u32>> = Mutex::default();
    run_until(
        &subscriber,
        async |envelope: EventEnvelope<CourseEvent>| {
            *calls.lock().unwrap().entry(envelope.aggregate_id).or_default() += 1;
            if envelope.aggregate_id == poison {
                panic!("the read model has no row for {}", envelope.aggregate_id);
            }
            Ok(())
        },
        |s| s.stats().poisoned.load(Ordering::Relaxed) == 1 && s.stats().handled.load(Ordering::Relaxed) == 2,
    )
    .await;
    let calls = calls.into_inner().unwrap();
    assert_eq!(calls.get(&poison), Some(&3), "attempted exactly max_deliver times, then given up");
    assert_eq!((calls.get(&before), calls.get(&after)), (Some(&1), Some(&1)), "the others are handled");
    let stats = subscriber.stats();
    assert_eq!(stats.retried.load(Ordering::Relaxed), 2, "two retries before the last attempt");
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
    let (broker, bus) = setup(Kind::Nats).await;
    let Broker::Nats(_, publisher) = &broker else { unreachable!() };
    let id = Uuid::now_v7();
    bus.commit(async |tx| tx.append("lesson", id, 0, [counted(1)]).await).await.unwrap();
    let first = broker.subscriber::<CourseEvent>(config("evolving", 3)).await;
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
    let _second = broker.subscriber::<CourseEvent>(changed).await;
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

/// What the ordered-concurrency test's handler saw.
#[derive(Default)]
struct Observed {
    /// Per aggregate, the sequences applied, in the order they were applied.
    applied: HashMap<Uuid, Vec<i64>>,
    /// Aggregates with a handler running now.
    busy: std::collections::HashSet<Uuid>,
    /// Two handlers of one aggregate at once, or a sequence applied out of order.
    violations: Vec<String>,
    running: usize,
    most_running: usize,
    failures_injected: u32,
}

/// A handler that takes 0–4 ms, fails the first attempt of every seventh event, and
/// records what it applied.
async fn observe(observed: &Mutex<Observed>, envelope: EventEnvelope<CourseEvent>) -> Result<(), BoxError> {
    let (id, sequence) = (envelope.aggregate_id, envelope.sequence);
    {
        let mut o = observed.lock().unwrap();
        if !o.busy.insert(id) {
            o.violations.push(format!("{id}: two handlers at once (sequence {sequence})"));
        }
        o.running += 1;
        o.most_running = o.most_running.max(o.running);
    }
    let pseudo_random = (envelope.event_id.as_u128() % 5) as u64;
    tokio::time::sleep(Duration::from_millis(pseudo_random)).await;
    let mut guard = observed.lock().unwrap();
    let o = &mut *guard;
    o.busy.remove(&id);
    o.running -= 1;
    let applied = o.applied.entry(id).or_default();
    if sequence % 7 == 3 && !applied.contains(&-sequence) {
        applied.push(-sequence); // the marker of the injected failure
        o.failures_injected += 1;
        return Err("injected failure".into());
    }
    let last = applied.iter().copied().filter(|s| *s > 0).max().unwrap_or(0);
    if sequence != last + 1 {
        o.violations.push(format!("{id}: sequence {sequence} applied after {last}"));
    }
    applied.push(sequence);
    Ok(())
}

/// Messages of different aggregates are handled at once, an aggregate's strictly in order,
/// across injected failures (their retries keep the aggregate's later events waiting) and
/// across a restart of the subscriber in the middle of the stream.
async fn aggregates_are_handled_concurrently_each_in_order_across_failures_and_a_restart(kind: Kind) {
    let (broker, bus) = setup(kind).await;
    let ids: Vec<Uuid> = (0..40).map(|_| Uuid::now_v7()).collect();
    for n in 0..10 {
        for id in &ids {
            bus.commit(async |tx| tx.append("lesson", *id, n, [counted(n as u64)]).await).await.unwrap();
        }
    }
    let config = config("ordered", 5).with_max_concurrency(16).with_max_in_flight(64);
    let observed = Mutex::new(Observed::default());
    let first = broker.subscriber::<CourseEvent>(config.clone()).await;
    // Stopped in the middle: running handlers finish, the waiting messages go back.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = first.run(async |e| observe(&observed, e).await, async move {
        let _ = stopped.await;
    });
    let stop_at_150 = async {
        while first.stats().handled.load(Ordering::Relaxed) < 150 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let _ = stop.send(());
    };
    let (result, ()) = tokio::join!(run, stop_at_150);
    result.unwrap();
    let handled_first = first.stats().handled.load(Ordering::Relaxed);
    assert!(handled_first < 400, "the restart happens in the middle: {handled_first}");
    let second = broker.subscriber::<CourseEvent>(config).await;
    run_until(
        &second,
        async |e| observe(&observed, e).await,
        |s| s.stats().handled.load(Ordering::Relaxed) + handled_first >= 400,
    )
    .await;

    let observed = observed.into_inner().unwrap();
    assert_eq!(observed.violations, Vec::<String>::new());
    for id in &ids {
        let applied: Vec<i64> = observed.applied[id].iter().copied().filter(|s| *s > 0).collect();
        assert_eq!(applied, (1..=10).collect::<Vec<i64>>(), "aggregate {id}");
    }
    assert!(observed.failures_injected >= 40, "failures were injected: {}", observed.failures_injected);
    assert!(observed.most_running > 4, "handled concurrently: at most {} at once", observed.most_running);
    assert!(observed.most_running <= 16, "at most max_concurrency at once: {}", observed.most_running);
    assert_eq!(
        first.stats().poisoned.load(Ordering::Relaxed) + second.stats().poisoned.load(Ordering::Relaxed),
        0
    );
}

/// A crash: the subscriber's run is dropped with messages held (some handlers hanging,
/// others waiting behind them), newer events of the same aggregates are committed, and a new
/// subscriber on the durable consumer starts at once. The crashed run's messages come back
/// only once `ack_wait` has passed, after the newer ones are available: the new subscriber
/// waits for them, so every aggregate's events are applied exactly once, in order.
async fn after_a_crash_the_unacknowledged_messages_are_handled_before_newer_ones_of_their_aggregates(
    kind: Kind,
) {
    let (broker, bus) = setup(kind).await;
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let commit_round = async |n: i64| {
        for id in &ids {
            bus.commit(async |tx| tx.append("lesson", *id, n, [counted(n as u64)]).await).await.unwrap();
        }
    };
    for n in 0..6 {
        commit_round(n).await;
    }
    let config = config("crash", 5)
        .with_ack_wait(Duration::from_secs(2))
        .with_max_concurrency(8)
        .with_max_in_flight(64);
    let observed = Mutex::new(Observed::default());
    let started = std::sync::atomic::AtomicUsize::new(0);
    let first = broker.subscriber::<CourseEvent>(config.clone()).await;
    // After 30 handler calls, every call hangs: the run is then dropped (no hand-back).
    let run = first.run(
        async |e| {
            if started.fetch_add(1, Ordering::SeqCst) >= 30 {
                std::future::pending::<()>().await;
            }
            observe(&observed, e).await
        },
        std::future::pending(),
    );
    let hang = async {
        while started.load(Ordering::SeqCst) < 38 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        result = run => panic!("the run ended: {result:?}"),
        () = hang => {}
    }
    let applied_first = first.stats().handled.load(Ordering::Relaxed);
    assert!(applied_first < 60, "the crash happens with most events unapplied: {applied_first}");
    // Newer events of every aggregate, available before the crashed run's come back.
    for n in 6..9 {
        commit_round(n).await;
    }
    let second = broker.subscriber::<CourseEvent>(config).await;
    run_until(
        &second,
        async |e| observe(&observed, e).await,
        |s| s.stats().handled.load(Ordering::Relaxed) + applied_first >= 180,
    )
    .await;

    let observed = observed.into_inner().unwrap();
    assert_eq!(observed.violations, Vec::<String>::new());
    for id in &ids {
        let applied: Vec<i64> = observed.applied[id].iter().copied().filter(|s| *s > 0).collect();
        assert_eq!(applied, (1..=9).collect::<Vec<i64>>(), "aggregate {id}");
    }
    assert_eq!(second.stats().poisoned.load(Ordering::Relaxed), 0);
}

/// A slow handler and a backlog: the subscriber holds at most `max_in_flight` messages (the
/// server's count of unacknowledged ones never passes it) and runs at most
/// `max_concurrency` handlers.
async fn a_slow_handler_over_a_backlog_holds_at_most_max_in_flight(kind: Kind) {
    let (broker, bus) = setup(kind).await;
    for _ in 0..300 {
        let id = Uuid::now_v7();
        bus.commit(async |tx| tx.append("lesson", id, 0, [counted(1)]).await).await.unwrap();
    }
    let config = config("bounded", 3).with_max_in_flight(24).with_max_concurrency(8);
    let subscriber = broker.subscriber::<CourseEvent>(config).await;
    let running = std::sync::atomic::AtomicUsize::new(0);
    let most = std::sync::atomic::AtomicUsize::new(0);
    let most_pending = std::sync::atomic::AtomicU64::new(0);
    let sample = async {
        while subscriber.stats().handled.load(Ordering::Relaxed) < 300 {
            if let Some(pending) = broker.unacknowledged("bounded").await {
                most_pending.fetch_max(pending as u64, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let consume = run_until(
        &subscriber,
        async |_| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(10)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        },
        |s| s.stats().handled.load(Ordering::Relaxed) == 300,
    );
    tokio::join!(consume, sample);
    let (most, most_pending) = (most.into_inner(), most_pending.into_inner());
    assert!((2..=8).contains(&most), "handlers at once: {most}");
    assert!((1..=24).contains(&most_pending), "unacknowledged at once: {most_pending}");
}

#[tokio::test]
async fn a_subscriber_on_a_missing_stream_names_it_and_the_fix() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let config = SubscriberConfig::new("NO_SUCH_STREAM", "reader");
    let err = Subscriber::<CourseEvent>::new(publisher.jetstream(), config).await.unwrap_err();
    assert_eq!(err.broker_kind(), Some(edupulse_events::BrokerErrorKind::NoStream), "{err}");
    let text = err.to_string();
    assert!(text.contains("`NO_SUCH_STREAM`") && text.contains("ensure_stream"), "{text}");
}
