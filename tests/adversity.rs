//! The core promise under adversity (issue 12, items 1–3), against a real PostgreSQL and a
//! real nats-server: a commit that did not happen is an error and publishes nothing; an
//! append accepts only what can be delivered and read back; the global stream keeps every
//! aggregate's order whatever the order of transaction ids.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::nats::{self, NatsServer, stream_messages};
use common::{counted, store};
use edupulse_events::{
    BusConfig, DomainEvent, EventBus, EventEnvelope, EventError, EventProblem, EventStore, ExpectedSequence,
    LogRelay, Metadata, NatsPublisher, RelayConfig, RelayPass, StreamPosition, Uuid,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

/// An event with a float and free text: what a new user writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
struct GradeRecorded {
    #[event(aggregate_id)]
    quiz_id: Uuid,
    score: f64,
    comment: String,
}

fn grade(quiz_id: Uuid, score: f64, comment: &str) -> GradeRecorded {
    GradeRecorded { quiz_id, score, comment: comment.into() }
}

fn bus(store: &EventStore, publisher: &NatsPublisher) -> EventBus {
    EventBus::new(store.clone(), Arc::new(publisher.clone()), BusConfig::default()).unwrap()
}

/// A relay of its own publishes whatever the log holds.
async fn relay_pass(store: &EventStore, publisher: &NatsPublisher) {
    let relay = LogRelay::new(store.clone(), Arc::new(publisher.clone()), RelayConfig::default());
    relay.run_once().await.unwrap();
}

async fn events_in_store(store: &EventStore, schema_table: &str) -> i64 {
    let pool = &common::pg_pool(store);
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {schema_table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

fn table(store: &EventStore, name: &str) -> String {
    format!("\"{}\".{name}", store.config().schema.as_str())
}

/// A table of the caller's own, with a unique key to violate.
async fn caller_table(store: &EventStore) -> String {
    let t = table(store, "enrolments");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE TABLE {t} (id int PRIMARY KEY)")))
        .execute(&common::pg_pool(store))
        .await
        .unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("INSERT INTO {t} VALUES (1)")))
        .execute(&common::pg_pool(store))
        .await
        .unwrap();
    t
}

// ---- 1. A commit that did not happen is an error -------------------------------------

#[tokio::test]
async fn a_swallowed_failed_statement_makes_commit_an_error_and_publishes_nothing() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = bus(&store, &publisher);
    let enrolments = caller_table(&store).await;
    let insert_duplicate = format!("INSERT INTO {enrolments} VALUES (1)");

    // After the append: "insert, ignore the unique violation", written the usual way.
    let id = Uuid::now_v7();
    let result = bus
        .commit(async |tx| {
            tx.append("quiz", id, 0, [grade(id, 1.0, "after")]).await?;
            let ignored = sqlx::raw_sql(sqlx::AssertSqlSafe(insert_duplicate.clone()))
                .execute(common::pg(tx.connection()))
                .await;
            assert!(ignored.is_err(), "the caller's statement fails");
            Ok::<_, EventError>(())
        })
        .await;
    assert!(matches!(result, Err(EventError::TransactionAborted)), "{result:?}");

    // Before the append: the append then fails too, and the caller ignores that as well.
    let other = Uuid::now_v7();
    let result = bus
        .commit(async |tx| {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(insert_duplicate.clone()))
                .execute(common::pg(tx.connection()))
                .await;
            let _ = tx.append("quiz", other, 0, [grade(other, 2.0, "before")]).await;
            Ok::<_, EventError>(())
        })
        .await;
    assert!(matches!(result, Err(EventError::TransactionAborted)), "{result:?}");

    // The same through a plain store transaction.
    let third = Uuid::now_v7();
    let mut tx = store.begin().await.unwrap();
    tx.append("quiz", third, 0, [grade(third, 3.0, "plain")]).await.unwrap();
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(insert_duplicate.clone()))
        .execute(common::pg(tx.connection()))
        .await;
    assert!(matches!(tx.commit().await, Err(EventError::TransactionAborted)));

    // The caller ends the transaction itself on the raw connection: what the bus appended
    // is gone, and its commit says so.
    let fourth = Uuid::now_v7();
    let result = bus
        .commit(async |tx| {
            tx.append("quiz", fourth, 0, [grade(fourth, 5.0, "rolled back by hand")]).await?;
            sqlx::raw_sql("ROLLBACK").execute(common::pg(tx.connection())).await?;
            Ok::<_, EventError>(())
        })
        .await;
    assert!(matches!(result, Err(EventError::TransactionAborted)), "{result:?}");

    relay_pass(&store, &publisher).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(events_in_store(&store, &table(&store, "events")).await, 0, "nothing committed");
    assert!(stream_messages(&publisher).await.is_empty(), "nothing published");

    // A transaction whose own statements succeeded still commits, and a savepoint is the
    // way to ignore a failure.
    let fine = Uuid::now_v7();
    bus.commit(async |tx| {
        let conn = common::pg(tx.connection());
        sqlx::raw_sql("SAVEPOINT ignore_duplicate").execute(&mut *conn).await?;
        if sqlx::raw_sql(sqlx::AssertSqlSafe(insert_duplicate.clone())).execute(&mut *conn).await.is_err() {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT ignore_duplicate").execute(&mut *conn).await?;
        }
        tx.append("quiz", fine, 0, [grade(fine, 4.0, "savepoint")]).await
    })
    .await
    .unwrap()
    .published()
    .await
    .unwrap();
    assert_eq!(store.current_sequence(fine).await.unwrap(), 1);
    assert_eq!(stream_messages(&publisher).await.len(), 1);
}

// ---- 2. Append accepts only what can be delivered and read back ------------------------

/// Asserts an append (or a commit) was refused with `problem`; the callers check that
/// nothing was written or published.
fn refused<T: std::fmt::Debug>(result: Result<T, EventError>, what: &str) -> EventProblem {
    match result {
        Err(EventError::InvalidEvent { problem, event_type, .. }) => {
            assert_eq!(event_type, "GradeRecorded", "{what}: the error names the event");
            problem
        }
        other => panic!("{what}: expected InvalidEvent, got {other:?}"),
    }
}

#[tokio::test]
async fn appends_refuse_what_cannot_be_delivered_or_read_back() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = bus(&store, &publisher);
    let id = Uuid::now_v7();

    // A line break in the trace context, through the bus and the plain store.
    let traced = |value: &str| {
        EventEnvelope::new("quiz", id, grade(id, 1.0, "ok"))
            .with_metadata(Metadata { traceparent: Some(value.into()), ..Metadata::default() })
    };
    let result =
        bus.commit(async |tx| tx.append_envelopes(0, vec![traced("00-abc\r\nX-Injected: 1")]).await).await;
    assert!(matches!(
        refused(result, "traceparent"),
        EventProblem::ControlCharacter { field: "traceparent", .. }
    ));
    let mut tx = store.begin().await.unwrap();
    let result = tx.append_envelopes(0, vec![traced("00-abc\n")]).await;
    assert!(matches!(refused(result, "traceparent"), EventProblem::ControlCharacter { .. }));
    drop(tx);

    // A line break in the aggregate type.
    let result = bus.commit(async |tx| tx.append("quiz\nX: y", id, 0, [grade(id, 1.0, "ok")]).await).await;
    assert!(matches!(
        refused(result, "aggregate type"),
        EventProblem::ControlCharacter { field: "aggregate type", .. }
    ));
    let result = store.append("", id, 0, [grade(id, 1.0, "ok")]).await;
    assert!(matches!(refused(result, "empty aggregate type"), EventProblem::Empty { .. }));

    // Larger than the server's max_payload (1 MiB by default), and just under it.
    let big = "x".repeat(1024 * 1024);
    let result = bus.commit(async |tx| tx.append("quiz", id, 0, [grade(id, 1.0, &big)]).await).await;
    match refused(result, "oversized") {
        EventProblem::TooLarge { size, limit } => {
            assert_eq!(limit, 1024 * 1024, "the server told its max_payload");
            assert!(size > limit);
        }
        other => panic!("{other:?}"),
    }
    let result = store.append("quiz", id, 0, [grade(id, 1.0, &big)]).await;
    assert!(matches!(refused(result, "oversized, store"), EventProblem::TooLarge { .. }));

    // Non-finite floats: JSON writes `null`, which never reads back as an f64.
    for score in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let result = bus.commit(async |tx| tx.append("quiz", id, 0, [grade(id, score, "nan")]).await).await;
        assert!(matches!(refused(result, "non-finite"), EventProblem::Unreadable { .. }), "{score}");
        let result = store.append("quiz", id, ExpectedSequence::Any, [grade(id, score, "nan")]).await;
        assert!(matches!(refused(result, "non-finite, store"), EventProblem::Unreadable { .. }), "{score}");
    }

    // One bad event refuses the whole append: the good one before it is not written either.
    let result = bus
        .commit(async |tx| {
            tx.append("quiz", id, 0, [grade(id, 1.0, "good"), grade(id, f64::NAN, "bad")]).await
        })
        .await;
    assert!(matches!(refused(result, "mixed"), EventProblem::Unreadable { .. }));

    // Run-time subject tokens cannot reach the server's own subjects.
    let result = bus
        .commit(async |tx| {
            tx.subject_prefix(&["$JS"])?;
            tx.append("quiz", id, 0, [grade(id, 1.0, "system")]).await
        })
        .await;
    assert!(matches!(result, Err(EventError::InvalidSubject { .. })), "{result:?}");
    let long = "t".repeat(1100);
    let result = bus
        .commit(async |tx| {
            tx.subject_prefix(&[long.as_str()])?;
            tx.append("quiz", id, 0, [grade(id, 1.0, "long")]).await
        })
        .await;
    assert!(matches!(result, Err(EventError::InvalidSubject { .. })), "{result:?}");

    relay_pass(&store, &publisher).await;
    assert_eq!(store.current_sequence(id).await.unwrap(), 0, "nothing was written");
    assert!(stream_messages(&publisher).await.is_empty(), "nothing was published");

    // What can be delivered still is, right up to the limit.
    let near = "y".repeat(1024 * 1024 - 2048);
    let stored = bus
        .commit(async |tx| tx.append("quiz", id, 0, [grade(id, 0.5, &near)]).await)
        .await
        .unwrap()
        .published()
        .await
        .unwrap();
    assert_eq!(stored[0].sequence, 1);
    let mut loaded = store.load::<GradeRecorded>(id, 1);
    assert_eq!(loaded.next().await.unwrap().unwrap().event.comment.len(), near.len());
    assert_eq!(stream_messages(&publisher).await.len(), 1, "published");
}

#[tokio::test]
async fn a_row_with_a_line_break_written_around_the_store_is_parked_without_a_panic() {
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let id = Uuid::now_v7();
    // Committed with no relay running, then corrupted by hand (an older version of the
    // code, a manual fix): the relay must refuse to send it, not panic in async-nats, and
    // park it once its attempts are spent.
    let quiet = EventBus::new(
        store.clone(),
        Arc::new(publisher.clone()),
        BusConfig::default().with_background_relay(false),
    )
    .unwrap();
    let committed =
        quiet.commit(async |tx| tx.append("quiz", id, 0, [grade(id, 1.0, "ok")]).await).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET aggregate_type = E'quiz\\r\\nX: 1'",
        table(&store, "events")
    )))
    .execute(&common::pg_pool(&store))
    .await
    .unwrap();
    let config = RelayConfig::default()
        .with_max_attempts(2)
        .with_min_backoff(Duration::from_millis(1))
        .with_max_backoff(Duration::from_millis(5));
    let relay = LogRelay::new(store.clone(), Arc::new(publisher.clone()), config);
    // The row is read once it is below the database-wide horizon, which another test's
    // transaction of this moment may hold back: until then a pass finds nothing.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut pass = relay.run_once().await.unwrap();
    while pass == (RelayPass { partitions: pass.partitions, ..RelayPass::default() })
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        pass = relay.run_once().await.unwrap();
    }
    assert_eq!((pass.published, pass.failed, pass.parked), (0, 1, 0), "{pass:?}");
    let lag = quiet.lag().await.unwrap();
    assert_eq!((lag.pending, lag.parked), (1, 0), "{lag:?}");

    tokio::time::sleep(Duration::from_millis(20)).await;
    let pass = relay.run_once().await.unwrap();
    assert_eq!((pass.published, pass.parked), (0, 1), "{pass:?}");
    let lag = quiet.lag().await.unwrap();
    assert_eq!((lag.pending, lag.parked), (0, 1), "{lag:?}");
    let parked = store.parked_events(10).await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!((parked[0].aggregate_id, parked[0].blocked_by, parked[0].attempts), (id, None, 2));
    assert!(parked[0].reason.contains("line break"), "{}", parked[0].reason);
    match committed.receipt.published().await {
        Err(EventError::Parked { reason, .. }) => assert!(reason.contains("line break"), "{reason}"),
        other => panic!("expected Parked, got {other:?}"),
    }
    assert!(stream_messages(&publisher).await.is_empty(), "nothing was published");
}

// ---- 3. The global stream keeps every aggregate's order --------------------------------

async fn stream_all_sequences(store: &EventStore, aggregate: Uuid) -> Vec<i64> {
    let mut all = store.stream_all::<common::CourseEvent>(StreamPosition::START);
    let mut sequences = Vec::new();
    while let Some(envelope) = all.next().await {
        let envelope = envelope.unwrap();
        if envelope.aggregate_id == aggregate {
            sequences.push(envelope.sequence);
        }
    }
    sequences
}

/// The aggregate's sequences in `stream_all` once its events are below the horizon: the
/// horizon is the whole database's, so a transaction of another test running at the same
/// time may hold them back for a moment.
async fn sequences_once_visible(store: &EventStore, id: Uuid) -> Vec<i64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let sequences = stream_all_sequences(store, id).await;
        if !sequences.is_empty() || tokio::time::Instant::now() > deadline {
            return sequences;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_older_transaction_appending_later_stays_after_the_previous_event() {
    let store = store().await;
    let enrolments = caller_table(&store).await;
    let id = Uuid::now_v7();

    // B writes something of its own first: it takes its transaction id now.
    let mut b = store.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("INSERT INTO {enrolments} VALUES (2)")))
        .execute(common::pg(b.connection()))
        .await
        .unwrap();
    // A, younger, appends event 1 and commits.
    let mut a = store.begin().await.unwrap();
    a.append("lesson", id, 0, [counted(1)]).await.unwrap();
    a.commit().await.unwrap();
    // B appends event 2 at the sequence it now sees, and commits.
    b.append("lesson", id, 1, [counted(2)]).await.unwrap();
    b.commit().await.unwrap();

    assert_eq!(sequences_once_visible(&store, id).await, vec![1, 2], "the aggregate's order in stream_all");

    // Gap-safety is kept: a transaction that appends and is still open holds the stream
    // back; once it commits, its event is read, even though its position is lower.
    let late = Uuid::now_v7();
    let mut open = store.begin().await.unwrap();
    open.append("lesson", late, 0, [counted(3)]).await.unwrap();
    let other = Uuid::now_v7();
    store.append("lesson", other, 0, [counted(4)]).await.unwrap();
    assert_eq!(stream_all_sequences(&store, other).await, Vec::<i64>::new(), "held back by the open one");
    open.commit().await.unwrap();
    assert_eq!(sequences_once_visible(&store, late).await, vec![1]);
    assert_eq!(sequences_once_visible(&store, other).await, vec![1]);
}

#[tokio::test]
async fn any_appends_racing_keep_every_aggregate_in_order() {
    let store = store().await;
    let enrolments = caller_table(&store).await;
    let aggregates: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    // Writers that take their transaction id early and append with `Any` to a few hot
    // aggregates: the transaction id order and the append order disagree all the time.
    let mut writers = Vec::new();
    for w in 0..8u64 {
        let (store, aggregates, enrolments) = (store.clone(), aggregates.clone(), enrolments.clone());
        writers.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let mut tx = store.begin().await.unwrap();
                let key = 1_000 + w * 1_000 + i;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("INSERT INTO {enrolments} VALUES ({key})")))
                    .execute(common::pg(tx.connection()))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_micros(200 * (i % 3))).await;
                let aggregate = aggregates[((w + i) % 4) as usize];
                tx.append("lesson", aggregate, ExpectedSequence::Any, [counted(i)]).await.unwrap();
                tx.commit().await.unwrap();
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    for aggregate in aggregates {
        let sequences = stream_all_sequences(&store, aggregate).await;
        let expected: Vec<i64> = (1..=sequences.len() as i64).collect();
        assert_eq!(sequences, expected, "aggregate {aggregate} in order in stream_all");
    }
}

#[tokio::test]
async fn the_embedded_default_refuses_the_same_inputs() {
    let store =
        EventStore::connect("sqlite::memory:", edupulse_events::StoreConfig::default()).await.unwrap();
    store.migrate().await.unwrap();
    let broker = edupulse_events::InMemoryBroker::new();
    let bus = EventBus::new(store.clone(), Arc::new(broker.clone()), BusConfig::default()).unwrap();
    let id = Uuid::now_v7();

    let big = "x".repeat(1024 * 1024);
    let result = bus.commit(async |tx| tx.append("quiz", id, 0, [grade(id, 1.0, &big)]).await).await;
    assert!(matches!(refused(result, "oversized"), EventProblem::TooLarge { limit: 1_048_576, .. }));
    let result = bus.commit(async |tx| tx.append("quiz", id, 0, [grade(id, f64::NAN, "nan")]).await).await;
    assert!(matches!(refused(result, "nan"), EventProblem::Unreadable { .. }));
    let result = bus.commit(async |tx| tx.append("quiz\r", id, 0, [grade(id, 1.0, "cr")]).await).await;
    assert!(matches!(refused(result, "cr"), EventProblem::ControlCharacter { .. }));

    assert_eq!(store.current_sequence(id).await.unwrap(), 0);
    assert!(broker.messages().is_empty());
    let committed =
        bus.commit(async |tx| tx.append("quiz", id, 0, [grade(id, 1.0, "fine")]).await).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), committed.published()).await.unwrap().unwrap();
    assert_eq!(broker.messages().len(), 1);
}

#[tokio::test]
async fn an_existing_database_migrates_and_keeps_its_aggregates_in_order() {
    use sqlx::Connection;
    // A schema as the previous release left it: migrations 0001 and 0002 only, with events.
    let schema = format!("t_{}", Uuid::now_v7().simple());
    let old = std::env::temp_dir().join(format!("edupulse-old-migrations-{schema}"));
    std::fs::create_dir_all(&old).unwrap();
    for file in ["0001_event_store.sql", "0002_snapshots.sql"] {
        let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("edupulse-events/migrations/postgres")
            .join(file);
        std::fs::copy(source, old.join(file)).unwrap();
    }
    let mut conn = sqlx::PgConnection::connect(&common::database_url()).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}; SET search_path TO {schema}")))
        .execute(&mut conn)
        .await
        .unwrap();
    sqlx::migrate::Migrator::new(old.as_path()).await.unwrap().run(&mut conn).await.unwrap();
    sqlx::raw_sql("CREATE TABLE enrolments (id int PRIMARY KEY)").execute(&mut conn).await.unwrap();

    let mut config = edupulse_events::StoreConfig::with_schema(&schema).unwrap();
    config.max_connections = 4;
    let store = EventStore::connect(&common::database_url(), config).await.unwrap();
    // B takes its transaction id first, with a write of its own.
    let mut b = store.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("INSERT INTO {schema}.enrolments VALUES (1)")))
        .execute(common::pg(b.connection()))
        .await
        .unwrap();
    // A, younger, wrote event 1 with the previous release (its own transaction id).
    let id = Uuid::now_v7();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; INSERT INTO streams VALUES ('{id}', 'lesson', 1); \
         INSERT INTO events (event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, \
             payload, occurred_at) \
         VALUES ('{}', 'lesson', '{id}', 1, 'Counted', 1, '{{\"n\":1}}', now()); COMMIT",
        Uuid::now_v7()
    )))
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let _ = std::fs::remove_dir_all(&old);

    // The new release migrates; B appends event 2 and commits.
    store.migrate().await.unwrap();
    b.append("lesson", id, 1, [counted(2)]).await.unwrap();
    b.commit().await.unwrap();
    assert_eq!(stream_all_sequences(&store, id).await, vec![1, 2]);
}
