//! The promise at its edges (issue 25), on PostgreSQL with nats-server and on the embedded
//! default: what an append accepts, every reader and the broker accept, byte for byte; a
//! commit that did not happen is an error on both backends; a connection left out of step
//! never serves another transaction.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::nats::{self, NatsServer, STREAM};
use edupulse_events::wire::{WireEnvelope, decode_message};
use edupulse_events::{
    BusConfig, DomainEvent, EventBus, EventEnvelope, EventError, EventProblem, EventStore, InMemoryBroker,
    Metadata, StoreConfig, StreamPosition, Uuid, serde_json,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
struct AttachmentAdded {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
struct ReadingsTaken {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    readings: Vec<f64>,
    note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "courses")]
struct LessonTagged {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    #[event(key)]
    tag: String,
}

/// A store and a bus on each backend, with what the broker stored.
struct Rig {
    store: EventStore,
    bus: EventBus,
    broker: Broker,
}

#[allow(clippy::large_enum_variant)] // two per test
enum Broker {
    Nats(edupulse_events::NatsPublisher, #[allow(dead_code)] NatsServer),
    Memory(InMemoryBroker),
}

impl Rig {
    async fn postgres() -> Self {
        let server = NatsServer::start().await;
        let publisher = nats::publisher(&server).await;
        let store = common::store().await;
        let bus = EventBus::new(store.clone(), Arc::new(publisher.clone()), BusConfig::default()).unwrap();
        Self { store, bus, broker: Broker::Nats(publisher, server) }
    }

    async fn sqlite() -> Self {
        let store = sqlite_file_store(4).await;
        let broker = InMemoryBroker::new();
        let bus = EventBus::new(store.clone(), Arc::new(broker.clone()), BusConfig::default()).unwrap();
        Self { store, bus, broker: Broker::Memory(broker) }
    }

    /// Every stored message: its full size on the wire (headers and body) and its body.
    async fn messages(&self) -> Vec<(usize, Vec<u8>)> {
        match &self.broker {
            Broker::Memory(broker) => broker
                .messages()
                .into_iter()
                .map(|m| {
                    let headers: usize = m.headers.iter().map(|(n, v)| n.len() + v.len() + 4).sum();
                    ("NATS/1.0\r\n\r\n".len() + headers + m.body.len(), m.body)
                })
                .collect(),
            Broker::Nats(publisher, _) => {
                let mut stream = publisher.jetstream().get_stream(STREAM).await.unwrap();
                let state = stream.info().await.unwrap().state.clone();
                let mut out = Vec::new();
                for seq in state.first_sequence..=state.last_sequence {
                    if state.messages == 0 {
                        break;
                    }
                    let message = stream.get_raw_message(seq).await.unwrap();
                    let headers: usize = message
                        .headers
                        .iter()
                        .flat_map(|(name, values)| {
                            values
                                .iter()
                                .map(move |v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4)
                        })
                        .sum();
                    let size = "NATS/1.0\r\n\r\n".len() + headers + message.payload.len();
                    out.push((size, message.payload.to_vec()));
                }
                out
            }
        }
    }

    fn name(&self) -> &'static str {
        match self.broker {
            Broker::Nats(..) => "postgres + nats",
            Broker::Memory(_) => "sqlite + in-process broker",
        }
    }
}

async fn sqlite_file_store(max_connections: u32) -> EventStore {
    let dir = std::env::temp_dir().join(format!("edupulse-edges-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("events.db").display());
    let mut config = StoreConfig::default();
    config.max_connections = max_connections;
    let store = EventStore::connect(&url, config).await.unwrap();
    store.migrate().await.unwrap();
    store
}

async fn both() -> [Rig; 2] {
    [Rig::postgres().await, Rig::sqlite().await]
}

/// `[[[…]]]`, `depth` arrays deep.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(serde_json::Value::from(1), |inner, _| serde_json::Value::Array(vec![inner]))
}

fn refused<T: std::fmt::Debug>(result: Result<T, EventError>, what: &str) -> EventProblem {
    match result {
        Err(EventError::InvalidEvent { problem, .. }) => problem,
        other => panic!("{what}: expected InvalidEvent, got {other:?}"),
    }
}

// ---- Metadata reads back like the payload -------------------------------------------------

#[tokio::test]
async fn metadata_that_no_reader_could_decode_is_refused_and_the_deepest_accepted_reads_everywhere() {
    for rig in both().await {
        let id = Uuid::now_v7();
        let with_user = |depth: usize| {
            EventEnvelope::new(
                "lesson",
                id,
                ReadingsTaken { lesson_id: id, readings: vec![1.5], note: "n".into() },
            )
            .with_metadata(Metadata::default().with("deep", nested(depth)))
        };
        // The metadata object, its `user` map and the arrays: 127 levels are more than
        // serde_json reads back.
        let result = rig.bus.commit(async |tx| tx.append_envelopes(0, vec![with_user(126)]).await).await;
        assert!(
            matches!(refused(result, rig.name()), EventProblem::UnreadableMetadata { .. }),
            "{}",
            rig.name()
        );
        let mut tx = rig.store.begin().await.unwrap();
        let result = tx.append_envelopes(0, vec![with_user(130)]).await;
        assert!(matches!(refused(result, rig.name()), EventProblem::UnreadableMetadata { .. }));
        tx.rollback().await.unwrap();
        assert_eq!(rig.store.current_sequence(id).await.unwrap(), 0, "{}: nothing written", rig.name());

        // The deepest accepted: the repository's load, the global stream and a consumer of
        // the published message all read it.
        let committed = rig.bus.commit(async |tx| tx.append_envelopes(0, vec![with_user(125)]).await).await;
        let committed = committed.unwrap_or_else(|e| panic!("{}: {e}", rig.name()));
        tokio::time::timeout(Duration::from_secs(10), committed.published()).await.unwrap().unwrap();
        let loaded: Vec<_> = rig.store.load::<ReadingsTaken>(id, 1).collect().await;
        assert_eq!(loaded.len(), 1);
        let loaded = loaded.into_iter().next().unwrap().unwrap();
        assert_eq!(loaded.metadata.user["deep"], nested(125));
        let mut all = rig.store.stream_all::<ReadingsTaken>(StreamPosition::START);
        assert_eq!(all.next().await.unwrap().unwrap().metadata, loaded.metadata);
        let messages = rig.messages().await;
        assert_eq!(messages.len(), 1, "{}", rig.name());
        let consumed: EventEnvelope<ReadingsTaken> = decode_message(&messages[0].1).unwrap();
        assert_eq!(consumed.metadata, loaded.metadata);
    }
}

// ---- The size checked is the size sent, and what is sent is what was encoded --------------

#[tokio::test]
async fn what_is_published_is_byte_for_byte_what_the_producer_encoded() {
    for rig in both().await {
        let id = Uuid::now_v7();
        // 800 054 bytes as serde_json writes them; PostgreSQL's jsonb wrote 1 200 056.
        let attachment =
            AttachmentAdded { lesson_id: id, bytes: (0..266_000u32).map(|i| (i % 251) as u8).collect() };
        // 24 KB written; jsonb wrote every 1e300 out in full: 1.2 MB, past 1 MiB.
        let readings =
            ReadingsTaken { lesson_id: id, readings: vec![1e300; 4_000], note: "key order: b, a".into() };
        let events = [serde_json::to_string(&attachment).unwrap(), serde_json::to_string(&readings).unwrap()];
        let committed = rig
            .bus
            .commit(async |tx| {
                tx.append("lesson", id, 0, [attachment.clone()]).await?;
                tx.append("lesson", id, 1, [readings.clone()]).await
            })
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", rig.name()));
        tokio::time::timeout(Duration::from_secs(10), committed.published())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: {e}", rig.name()));
        let messages = rig.messages().await;
        assert_eq!(messages.len(), 2);
        for ((size, body), written) in messages.iter().zip(&events) {
            let wire: WireEnvelope = serde_json::from_slice(body).unwrap();
            assert_eq!(wire.payload.get(), written, "{}: the payload as the producer wrote it", rig.name());
            assert!(*size < 1024 * 1024, "{size}");
        }
        let loaded: Vec<_> = rig.store.load::<ReadingsTaken>(id, 2).collect().await;
        assert_eq!(loaded[0].as_ref().unwrap().event, readings);
    }
}

/// The largest event the append accepts is published (the check never measures less than
/// is sent), and its message is within a few bytes of the limit (the check measures what is
/// sent, not a rendering of it).
#[tokio::test]
async fn the_largest_event_accepted_is_published_and_fills_the_limit() {
    for rig in both().await {
        let id = Uuid::now_v7();
        let event =
            |len: usize| ReadingsTaken { lesson_id: id, readings: vec![0.25; 3], note: "é".repeat(len / 2) };
        // The largest note accepted, by bisection over refused appends (they write nothing).
        let (mut accepted, mut too_large) = (0usize, 1024 * 1024);
        while too_large - accepted > 2 {
            let middle = (accepted + too_large) / 2;
            let mut tx = rig.store.begin().await.unwrap();
            match tx.append("lesson", id, 0, [event(middle)]).await {
                Ok(_) => accepted = middle,
                Err(EventError::InvalidEvent { problem: EventProblem::TooLarge { .. }, .. }) => {
                    too_large = middle
                }
                Err(e) => panic!("{}: {e}", rig.name()),
            }
            tx.rollback().await.unwrap();
        }
        let committed = rig
            .bus
            .commit(async |tx| tx.append("lesson", id, 0, [event(accepted)]).await)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", rig.name()));
        tokio::time::timeout(Duration::from_secs(10), committed.published())
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{}: the largest accepted event was not published: {e}", rig.name()));
        let messages = rig.messages().await;
        let (size, _) = messages[0];
        assert!(size <= 1024 * 1024, "{}: {size}", rig.name());
        // The bound takes the position and the sequence at their widest (19 digits each).
        assert!(1024 * 1024 - size < 64, "{}: {size} bytes sent for a limit of 1 MiB", rig.name());
    }
}

// ---- Keys the index cannot hold ------------------------------------------------------------

#[tokio::test]
async fn a_key_the_index_cannot_hold_is_a_typed_refusal_on_both_backends() {
    for rig in both().await {
        let id = Uuid::now_v7();
        let result = rig
            .bus
            .commit(async |tx| {
                tx.append("lesson", id, 0, [LessonTagged { lesson_id: id, tag: "a\0b".into() }]).await
            })
            .await;
        assert!(
            matches!(refused(result, rig.name()), EventProblem::KeyNul { name: "tag" }),
            "{}",
            rig.name()
        );
        assert_eq!(rig.store.current_sequence(id).await.unwrap(), 0);
        // Every other character is stored, indexed and found.
        let tag = "tab\there, quote\" and backslash\\ and \u{1F600}";
        rig.bus
            .commit(async |tx| {
                tx.append("lesson", id, 0, [LessonTagged { lesson_id: id, tag: tag.into() }]).await
            })
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", rig.name()));
        let found: Vec<_> = rig.store.events_by_key::<LessonTagged>("tag", tag).collect().await;
        assert_eq!(found.len(), 1, "{}", rig.name());
    }
}

// ---- A commit that did not happen is an error, on both backends ---------------------------

#[tokio::test]
async fn a_transaction_ended_and_begun_again_on_its_raw_connection_is_not_committed() {
    for rig in both().await {
        let id = Uuid::now_v7();
        let result = rig
            .bus
            .commit(async |tx| {
                tx.append("lesson", id, 0, [LessonTagged { lesson_id: id, tag: "gone".into() }]).await?;
                match tx.connection() {
                    edupulse_events::Connection::Sqlite(conn) => {
                        sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
                        sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut *conn).await?;
                        sqlx::raw_sql("CREATE TABLE IF NOT EXISTS caller_rows (id INTEGER)")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::raw_sql("INSERT INTO caller_rows VALUES (1)").execute(&mut *conn).await?;
                    }
                    edupulse_events::Connection::Postgres(conn) => {
                        sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
                        sqlx::raw_sql("BEGIN").execute(&mut *conn).await?;
                        sqlx::raw_sql("CREATE TEMP TABLE caller_rows (id int)").execute(&mut *conn).await?;
                        sqlx::raw_sql("INSERT INTO caller_rows VALUES (1)").execute(&mut *conn).await?;
                    }
                }
                Ok::<_, EventError>(())
            })
            .await;
        assert!(matches!(result, Err(EventError::TransactionAborted)), "{}: {result:?}", rig.name());
        assert_eq!(rig.store.current_sequence(id).await.unwrap(), 0, "{}", rig.name());
        // Plain store transactions too.
        let mut tx = rig.store.begin().await.unwrap();
        tx.append("lesson", id, 0, [LessonTagged { lesson_id: id, tag: "plain".into() }]).await.unwrap();
        match tx.connection() {
            edupulse_events::Connection::Sqlite(conn) => {
                sqlx::raw_sql("ROLLBACK; BEGIN IMMEDIATE").execute(&mut *conn).await.unwrap();
            }
            edupulse_events::Connection::Postgres(conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await.unwrap();
                sqlx::raw_sql("BEGIN; SELECT pg_current_xact_id()").execute(&mut *conn).await.unwrap();
            }
        }
        assert!(matches!(tx.commit().await, Err(EventError::TransactionAborted)), "{}", rig.name());
        assert_eq!(rig.store.current_sequence(id).await.unwrap(), 0, "{}", rig.name());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(rig.messages().await.is_empty(), "{}: nothing published", rig.name());
    }
}

/// The embedded default is an in-memory database whose only connection must survive every
/// refusal, rollback and repair: closing it would drop the database.
#[tokio::test]
async fn the_in_memory_default_survives_refusals_rollbacks_and_a_transaction_ended_by_hand() {
    let store = EventStore::connect("sqlite::memory:", StoreConfig::default()).await.unwrap();
    store.migrate().await.unwrap();
    let bus = EventBus::new(store.clone(), Arc::new(InMemoryBroker::new()), BusConfig::default()).unwrap();
    let id = Uuid::now_v7();
    let tagged = |tag: &str| LessonTagged { lesson_id: id, tag: tag.into() };
    store.append("lesson", id, 0, [tagged("1")]).await.unwrap();
    // A conflict, a wrong aggregate type, a refused event: each an early return.
    assert!(store.append("lesson", id, 0, [tagged("x")]).await.is_err());
    assert!(store.append("course", id, 1, [tagged("x")]).await.is_err());
    assert!(store.append("lesson", id, 1, [tagged("a\0b")]).await.is_err());
    // A closure that fails, and one that ends the transaction on its connection.
    let failed = bus.commit(async |tx| {
        tx.append("lesson", id, 1, [tagged("x")]).await?;
        Err::<(), _>(EventError::Config("the caller's own failure".into()))
    });
    assert!(failed.await.is_err());
    let ended = bus.commit(async |tx| {
        tx.append("lesson", id, 1, [tagged("x")]).await?;
        sqlx::raw_sql("ROLLBACK").execute(common::sqlite(tx.connection())).await?;
        Ok::<_, EventError>(())
    });
    assert!(matches!(ended.await, Err(EventError::TransactionAborted)));
    // A transaction dropped open.
    let mut tx = store.begin().await.unwrap();
    tx.append("lesson", id, 1, [tagged("x")]).await.unwrap();
    drop(tx);
    // The database is still there, with the one event.
    bus.commit(async |tx| tx.append("lesson", id, 1, [tagged("2")]).await).await.unwrap();
    let loaded: Vec<_> = store.load::<LessonTagged>(id, 1).collect().await;
    let tags: Vec<_> = loaded.into_iter().map(|e| e.unwrap().event.tag).collect();
    assert_eq!(tags, ["1", "2"]);
}

#[tokio::test]
async fn an_embedded_connection_left_out_of_step_never_serves_another_transaction() {
    // Two connections, so that the one a bad closure used is soon handed out again.
    let store = sqlite_file_store(2).await;
    let bus = EventBus::new(store.clone(), Arc::new(InMemoryBroker::new()), BusConfig::default()).unwrap();
    for round in 0..3 {
        let id = Uuid::now_v7();
        let result = bus
            .commit(async |tx| {
                tx.append("lesson", id, 0, [LessonTagged { lesson_id: id, tag: "x".into() }]).await?;
                sqlx::raw_sql("ROLLBACK").execute(common::sqlite(tx.connection())).await?;
                Ok::<_, EventError>(())
            })
            .await;
        assert!(result.is_err(), "round {round}: {result:?}");
        for n in 0..6 {
            let id = Uuid::now_v7();
            bus.commit(async |tx| {
                tx.append("lesson", id, 0, [LessonTagged { lesson_id: id, tag: "ok".into() }]).await
            })
            .await
            .unwrap_or_else(|e| panic!("round {round}, commit {n} after the bad closure: {e}"));
            let mut tx = store.begin().await.unwrap();
            tx.checkpoint("edges").await.unwrap();
            tx.rollback().await.unwrap();
        }
    }
}

/// As on PostgreSQL (`tests/store.rs`): a row written around the store at the sequence an
/// append takes is a conflict, not a raw constraint error.
#[tokio::test]
async fn an_embedded_row_written_around_the_store_makes_the_append_a_conflict() {
    let store = sqlite_file_store(2).await;
    let id = Uuid::now_v7();
    store.append("lesson", id, 0, [LessonTagged { lesson_id: id, tag: "1".into() }]).await.unwrap();
    let pool = match store.pool() {
        edupulse_events::DatabasePool::Sqlite(pool) => pool,
        edupulse_events::DatabasePool::Postgres(_) => unreachable!(),
    };
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, \
         payload, occurred_at, recorded_at) VALUES (?1, 'lesson', ?2, 2, 'LessonTagged', 1, '{}', ?3, ?3)",
    )
    .bind(Uuid::now_v7())
    .bind(id)
    .bind(edupulse_events::chrono::Utc::now())
    .execute(&pool)
    .await
    .unwrap();
    let result = store.append("lesson", id, 1, [LessonTagged { lesson_id: id, tag: "2".into() }]).await;
    assert!(matches!(result, Err(EventError::Concurrency { expected: 1, actual: 2, .. })), "{result:?}");
}
