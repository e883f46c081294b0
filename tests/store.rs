//! The PostgreSQL event store against a real server (DATABASE_URL; `scripts/test.sh` starts
//! one). Each test works in a schema of its own.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{CourseEvent, LessonPublished, LessonRenamed, counted, store};
use edupulse_events::{
    Connection, EventEnvelope, EventError, EventStore, ExpectedSequence, Metadata, StreamPosition, Uuid,
};
use futures_util::StreamExt;
use tokio::sync::Barrier;

fn published(lesson_id: Uuid, title: &str) -> CourseEvent {
    CourseEvent::LessonPublished(LessonPublished { lesson_id, author_id: None, title: title.into() })
}

async fn load_all(store: &EventStore, id: Uuid) -> Vec<EventEnvelope<CourseEvent>> {
    store.load::<CourseEvent>(id, 1).map(|r| r.expect("decodes")).collect().await
}

/// Rows inserted around the store (old deployments, corruption) — as raw SQL.
async fn insert_raw(
    store: &EventStore,
    aggregate_id: Uuid,
    sequence: i64,
    event_type: &str,
    version: i32,
    payload: &str,
) {
    let schema = store.config().schema.as_str();
    let sql = format!(
        "INSERT INTO \"{schema}\".events (event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, payload, occurred_at) \
         VALUES ($1, 'lesson', $2, $3, $4, $5, $6::json, now())"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(Uuid::now_v7())
        .bind(aggregate_id)
        .bind(sequence)
        .bind(event_type)
        .bind(version)
        .bind(payload)
        .execute(&common::pg_pool(store))
        .await
        .expect("raw insert");
    let sql = format!(
        "INSERT INTO \"{schema}\".streams (aggregate_id, aggregate_type, version) VALUES ($1, 'lesson', $2) \
         ON CONFLICT (aggregate_id) DO UPDATE SET version = excluded.version"
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(aggregate_id)
        .bind(sequence)
        .execute(&common::pg_pool(store))
        .await
        .expect("raw stream row");
}

#[tokio::test]
async fn append_then_load_round_trips_envelopes() {
    let store = store().await;
    let id = Uuid::now_v7();
    let first = store.append("lesson", id, 0, [published(id, "Ownership")]).await.unwrap();
    assert_eq!(first[0].sequence, 1);
    assert!(first[0].global_position.is_some() && first[0].recorded_at.is_some());

    let cause = first[0].clone();
    let mut tx = store.begin().await.unwrap();
    let follow_ups = vec![
        EventEnvelope::new(
            "lesson",
            id,
            CourseEvent::LessonRenamed(LessonRenamed { lesson_id: id, title: "B".into() }),
        )
        .caused_by(&cause),
        EventEnvelope::new("lesson", id, counted(7)).with_metadata(Metadata::default().with("tenant", "t1")),
    ];
    let stored = tx.append_envelopes(1, follow_ups).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(stored.iter().map(|e| e.sequence).collect::<Vec<_>>(), [2, 3]);

    let loaded = load_all(&store, id).await;
    assert_eq!(loaded.len(), 3);
    assert_eq!(loaded[0].event, published(id, "Ownership"));
    assert_eq!(loaded[0].event_id, first[0].event_id);
    assert_eq!(loaded[1].metadata.causation_id, Some(cause.event_id));
    assert_eq!(loaded[1].metadata.correlation_id, Some(cause.event_id));
    assert_eq!(loaded[2].metadata.user.get("tenant"), Some(&serde_json::json!("t1")));
    assert_eq!(loaded.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(store.current_sequence(id).await.unwrap(), 3);

    let tail: Vec<_> = store.load::<CourseEvent>(id, 3).collect().await;
    assert_eq!(tail.len(), 1);
}

#[tokio::test]
async fn wrong_expected_sequence_is_a_typed_conflict_and_writes_nothing() {
    let store = store().await;
    let id = Uuid::now_v7();
    store.append("lesson", id, 0, [counted(1), counted(2)]).await.unwrap();
    for expected in [0, 1, 3, 10] {
        let err = store.append("lesson", id, expected, [counted(9)]).await.unwrap_err();
        assert!(
            matches!(err, EventError::Concurrency { aggregate_id, expected: e, actual: 2 } if aggregate_id == id && e == expected),
            "{err}"
        );
    }
    // A stream that does not exist is at 0.
    let err = store.append("lesson", Uuid::now_v7(), 4, [counted(1)]).await.unwrap_err();
    assert!(matches!(err, EventError::Concurrency { expected: 4, actual: 0, .. }), "{err}");
    assert_eq!(load_all(&store, id).await.len(), 2);
    // `Any` appends wherever the stream is.
    let any = store.append("lesson", id, ExpectedSequence::Any, [counted(3)]).await.unwrap();
    assert_eq!(any[0].sequence, 3);
    // Another aggregate type for the same id is refused.
    let err = store.append("course", id, 3, [counted(4)]).await.unwrap_err();
    assert!(matches!(&err, EventError::WrongAggregate(m) if m.contains("is a `lesson`")), "{err}");
    // An event naming another aggregate is refused before anything is written.
    let other = Uuid::now_v7();
    let err = store.append("lesson", id, 3, [published(other, "x")]).await.unwrap_err();
    assert!(matches!(&err, EventError::WrongAggregate(m) if m.contains("appended to")), "{err}");
    assert_eq!(store.current_sequence(id).await.unwrap(), 3);
}

#[tokio::test]
async fn sixteen_racers_one_winner_per_round_and_a_gapless_history() {
    const RACERS: usize = 16;
    const ROUNDS: i64 = 12;
    let store = store().await;
    let id = Uuid::now_v7();
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(RACERS));
        let tasks: Vec<_> = (0..RACERS)
            .map(|racer| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    let mut tx = store.begin().await?;
                    barrier.wait().await;
                    tx.append("lesson", id, round, [counted(racer as u64)]).await?;
                    // Hold the lock a moment so that the others really wait on it.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    tx.commit().await
                })
            })
            .collect();
        let mut winners = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(()) => winners += 1,
                Err(EventError::Concurrency { aggregate_id, expected, actual }) => {
                    assert_eq!((aggregate_id, expected, actual), (id, round, round + 1));
                }
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        assert_eq!(winners, 1, "round {round}");
    }
    let history = load_all(&store, id).await;
    assert_eq!(history.iter().map(|e| e.sequence).collect::<Vec<_>>(), (1..=ROUNDS).collect::<Vec<_>>());
}

#[tokio::test]
async fn one_transaction_appends_to_several_aggregates_all_or_nothing() {
    let store = store().await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    store.append("lesson", b, 0, [counted(1)]).await.unwrap();

    // Both succeed: both are committed.
    let mut tx = store.begin().await.unwrap();
    tx.append("lesson", a, 0, [counted(1), counted(2)]).await.unwrap();
    tx.append("lesson", b, 1, [counted(2)]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!((store.current_sequence(a).await.unwrap(), store.current_sequence(b).await.unwrap()), (2, 2));

    // The second conflicts: rolling back leaves neither.
    let mut tx = store.begin().await.unwrap();
    tx.append("lesson", a, 2, [counted(3)]).await.unwrap();
    let err = tx.append("lesson", b, 1, [counted(3)]).await.unwrap_err();
    assert!(matches!(err, EventError::Concurrency { expected: 1, actual: 2, .. }), "{err}");
    tx.rollback().await.unwrap();
    assert_eq!((store.current_sequence(a).await.unwrap(), store.current_sequence(b).await.unwrap()), (2, 2));

    // Dropping a transaction rolls it back too.
    {
        let mut tx = store.begin().await.unwrap();
        tx.append("lesson", a, 2, [counted(3)]).await.unwrap();
    }
    assert_eq!(load_all(&store, a).await.len(), 2);
}

#[tokio::test]
async fn the_callers_own_writes_share_the_transaction() {
    let store = store().await;
    let pool = common::pg_pool(&store);
    let table = format!("\"{}\".read_model", store.config().schema.as_str());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE TABLE {table} (id uuid PRIMARY KEY)")))
        .execute(&pool)
        .await
        .unwrap();
    let id = Uuid::now_v7();
    for commit in [false, true] {
        let mut tx = store.begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("INSERT INTO {table} VALUES ($1)")))
            .bind(id)
            .execute(common::pg(tx.connection()))
            .await
            .unwrap();
        tx.append("lesson", id, 0, [counted(1)]).await.unwrap();
        if commit {
            tx.commit().await.unwrap()
        } else {
            tx.rollback().await.unwrap()
        }
        let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!((rows, store.current_sequence(id).await.unwrap()), if commit { (1, 1) } else { (0, 0) });
    }
    // A plain sqlx transaction works as well.
    let mut sqlx_tx = pool.begin().await.unwrap();
    let stored = store
        .append_in(Connection::Postgres(&mut sqlx_tx), 1, vec![EventEnvelope::new("lesson", id, counted(2))])
        .await
        .unwrap();
    sqlx_tx.commit().await.unwrap();
    assert_eq!(stored[0].sequence, 2);
}

#[tokio::test]
async fn old_payload_versions_written_with_raw_sql_load_as_current() {
    let store = store().await;
    let id = Uuid::now_v7();
    insert_raw(&store, id, 1, "LessonPublished", 1, &format!(r#"{{"lesson_id":"{id}","name":"From v1"}}"#))
        .await;
    insert_raw(&store, id, 2, "LessonPublished", 2, &format!(r#"{{"lesson_id":"{id}","title":"From v2"}}"#))
        .await;
    store.append("lesson", id, 2, [published(id, "From v3")]).await.unwrap();
    let titles: Vec<_> = load_all(&store, id)
        .await
        .into_iter()
        .map(|e| match e.event {
            CourseEvent::LessonPublished(p) => p.title,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(titles, ["From v1", "From v2", "From v3"]);
}

#[tokio::test]
async fn undecodable_rows_are_typed_errors_naming_their_position() {
    let store = store().await;
    let id = Uuid::now_v7();
    store.append("lesson", id, 0, [counted(1), counted(2)]).await.unwrap();
    insert_raw(&store, id, 3, "Counted", 1, r#"{"n": "not a number"}"#).await;
    insert_raw(&store, id, 4, "LessonDeleted", 1, "{}").await;
    insert_raw(&store, id, 5, "Counted", 9, r#"{"n": 5}"#).await;
    store.append("lesson", id, 5, [counted(6)]).await.unwrap();

    let items: Vec<_> = store.load::<CourseEvent>(id, 1).collect().await;
    assert_eq!(items.len(), 6, "the stream goes on after bad rows");
    assert_eq!(items[0].as_ref().unwrap().event, counted(1));
    assert_eq!(items[1].as_ref().unwrap().event, counted(2));
    let positions: Vec<i64> =
        items.iter().filter_map(|i| i.as_ref().ok()).filter_map(|e| e.global_position).collect();
    let (p1, p2) = (positions[0], positions[1]);
    match &items[2] {
        Err(EventError::Decode { position: Some(p), event_type, version: 1, .. }) => {
            assert!(*p > p2 && event_type == "Counted");
        }
        other => panic!("expected a decode error, got {other:?}"),
    }
    assert!(
        matches!(&items[3], Err(EventError::UnknownEventType { position: Some(_), .. })),
        "{:?}",
        items[3]
    );
    assert!(
        matches!(
            &items[4],
            Err(EventError::UnsupportedVersion { found: 9, newest_known: 1, position: Some(_), .. })
        ),
        "{:?}",
        items[4]
    );
    assert_eq!(items[5].as_ref().unwrap().event, counted(6));
    let err = items[2].as_ref().unwrap_err();
    assert!(err.to_string().contains("at global position"), "{err}");
    assert!(p1 < p2);

    // The global stream reports the same rows the same way, and goes on.
    let all: Vec<_> = tokio::time::timeout(
        Duration::from_secs(30),
        store
            .stream_all::<CourseEvent>(StreamPosition::START)
            .follow(Duration::from_millis(10))
            .take(6)
            .collect::<Vec<_>>(),
    )
    .await
    .expect("all six rows arrive");
    assert_eq!(all.iter().filter(|i| i.is_err()).count(), 3);
    assert_eq!(all.len(), 6);
}

#[tokio::test]
async fn events_by_promoted_key() {
    let store = store().await;
    let (alice, bob) = (Uuid::now_v7(), Uuid::now_v7());
    for (n, author) in [alice, bob, alice].into_iter().enumerate() {
        let id = Uuid::now_v7();
        let event = CourseEvent::LessonPublished(LessonPublished {
            lesson_id: id,
            author_id: Some(author),
            title: format!("L{n}"),
        });
        store.append("lesson", id, 0, [event]).await.unwrap();
    }
    let by_alice: Vec<_> =
        store.events_by_key::<CourseEvent>("author_id", alice).map(|r| r.unwrap()).collect().await;
    let titles: Vec<_> = by_alice
        .iter()
        .map(|e| match &e.event {
            CourseEvent::LessonPublished(p) => p.title.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(titles, ["L0", "L2"]);
    assert_eq!(store.events_by_key::<CourseEvent>("author_id", Uuid::now_v7()).count().await, 0);
    assert_eq!(store.events_by_key::<CourseEvent>("nope", alice).count().await, 0);

    // The query is served by the GIN index, not by reading every payload.
    let schema = store.config().schema.as_str();
    let pool = &common::pg_pool(&store);
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off").execute(&mut *conn).await.unwrap();
    let plan: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "EXPLAIN SELECT global_position FROM \"{schema}\".events WHERE keys @> '{{\"author_id\": \"{alice}\"}}'::jsonb"
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert!(plan.iter().any(|line| line.contains("events_keys_idx")), "{plan:#?}");
}

#[tokio::test]
async fn stream_all_pages_and_resumes_from_a_position() {
    let store = common::store_with(|c| c.page_size = 7).await;
    let ids: Vec<_> = (0..5).map(|_| Uuid::now_v7()).collect();
    for round in 0..10u64 {
        for id in &ids {
            store.append("lesson", *id, round as i64, [counted(round)]).await.unwrap();
        }
    }
    // Follow mode: rows of transactions younger than the oldest one still running anywhere
    // on the server (other tests run in parallel) are held back until it ends.
    let poll = Duration::from_millis(10);
    let mut stream = store.stream_all::<CourseEvent>(StreamPosition::START).follow(poll);
    let mut first_half = Vec::new();
    while first_half.len() < 23 {
        first_half.push(stream.next().await.unwrap().unwrap());
    }
    let resume_at = stream.position();
    drop(stream);
    let rest: Vec<_> = tokio::time::timeout(
        Duration::from_secs(30),
        store
            .stream_all::<CourseEvent>(resume_at)
            .follow(poll)
            .take(27)
            .map(|r| r.unwrap())
            .collect::<Vec<_>>(),
    )
    .await
    .expect("the remaining events arrive");
    assert_eq!(first_half.len() + rest.len(), 50);
    let all: Vec<i64> = first_half.iter().chain(&rest).map(|e| e.global_position.unwrap()).collect();
    let unique: BTreeSet<_> = all.iter().collect();
    assert_eq!(unique.len(), 50, "none twice");
    assert!(all.windows(2).all(|w| w[0] < w[1]), "single-statement appends come in position order");
}
