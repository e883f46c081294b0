//! The `edupulse` binary against a real PostgreSQL (`DATABASE_URL`) and nats-server
//! (`NATS_URL`): every subcommand run as a process, its exit code, output and effect checked.
// A failing test is supposed to panic.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edupulse_events::{
    BoxError, DomainEvent, EventEnvelope, EventStore, InMemoryBroker, LogRelay, NatsConfig, NatsPublisher,
    Projection, ProjectionRunner, RelayConfig, StoreConfig, StreamSpec, Transaction, Uuid,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A lesson was published.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(context = "clitest")]
struct LessonPublished {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    title: String,
}

/// A lesson was renamed.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(context = "clitest")]
struct LessonRenamed {
    #[event(aggregate_id)]
    lesson_id: Uuid,
    title: String,
}

/// The events of the tests.
#[derive(Debug, Clone, DomainEvent)]
enum LessonEvent {
    Published(LessonPublished),
    Renamed(LessonRenamed),
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run `bash scripts/test.sh`, which starts PostgreSQL and nats-server",
    )
}

fn nats_url() -> String {
    std::env::var("NATS_URL")
        .expect("NATS_URL is not set: run `bash scripts/test.sh`, which starts PostgreSQL and nats-server")
}

/// A schema of the test's own.
fn schema() -> String {
    format!("cli_{}", Uuid::now_v7().simple())
}

/// Runs `edupulse ARGS` with the store's schema, waits for it.
fn edupulse(schema: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edupulse"))
        .args(args)
        .args(["--schema", schema])
        .env("DATABASE_URL", database_url())
        .env("NATS_URL", nats_url())
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

async fn store(schema: &str) -> EventStore {
    let store =
        EventStore::connect(&database_url(), StoreConfig::with_schema(schema).unwrap()).await.unwrap();
    store.migrate().await.unwrap();
    store
}

/// Two lessons: the first published and renamed, the second published (positions 1 to 3).
async fn three_events(store: &EventStore) -> (Uuid, Uuid) {
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let published =
        |id, title: &str| LessonEvent::Published(LessonPublished { lesson_id: id, title: title.into() });
    let renamed = LessonEvent::Renamed(LessonRenamed { lesson_id: a, title: "Two".into() });
    store.append("lesson", a, 0, [published(a, "One"), renamed]).await.unwrap();
    store.append("lesson", b, 0, [published(b, "Three")]).await.unwrap();
    (a, b)
}

/// The JSON lines of `tail`: (global position, event type, aggregate).
fn lines(output: &Output) -> Vec<(i64, String, Uuid)> {
    stdout(output)
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            let id = Uuid::parse_str(v["aggregate_id"].as_str().unwrap()).unwrap();
            (v["global_position"].as_i64().unwrap(), v["event_type"].as_str().unwrap().to_owned(), id)
        })
        .collect()
}

#[test]
fn migrate_applies_and_check_exits_3_while_migrations_are_pending() {
    let schema = schema();
    let check = edupulse(&schema, &["migrate", "--check"]);
    assert_eq!(check.status.code(), Some(3), "{}", stderr(&check));
    assert!(stdout(&check).contains("pending migrations: 1, 2, 3, 4, 5, 6"), "{}", stdout(&check));
    let apply = edupulse(&schema, &["migrate"]);
    assert_eq!(apply.status.code(), Some(0), "{}", stderr(&apply));
    let check = edupulse(&schema, &["migrate", "--check"]);
    assert_eq!(check.status.code(), Some(0), "{}", stderr(&check));
    assert!(stdout(&check).contains("up to date: 6 migrations applied"), "{}", stdout(&check));
}

/// Counts the events it applied and its resets: a projection for `status` to report and
/// `projection reset` to rebuild.
#[derive(Default)]
struct Seen {
    applied: AtomicU64,
    resets: AtomicU64,
}

impl Projection<LessonEvent> for Seen {
    fn name(&self) -> &str {
        "seen"
    }

    async fn apply(&self, _: &mut Transaction, _: &EventEnvelope<LessonEvent>) -> Result<(), BoxError> {
        self.applied.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn reset(&self, _: &mut Transaction) -> Result<(), BoxError> {
        self.applied.store(0, Ordering::SeqCst);
        self.resets.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Catches `runner` up on `count` events (they may be above the database-wide horizon for a
/// moment, while another test's transaction is open).
async fn catch_up(runner: &ProjectionRunner<LessonEvent, Seen>, count: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut applied = 0;
    while applied < count {
        applied += runner.catch_up().await.unwrap();
        assert!(std::time::Instant::now() < deadline, "only {applied} of {count} events readable after 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn status_reports_counts_publication_per_partition_and_projections() {
    let schema = schema();
    let store = store(&schema).await;
    three_events(&store).await;
    let runner = ProjectionRunner::new(store.clone(), Seen::default());
    catch_up(&runner, 3).await;
    three_events(&store).await;

    let out = edupulse(&schema, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["backend"], "postgres");
    assert_eq!(status["schema"], schema.as_str());
    assert_eq!(status["migrations"]["pending"], serde_json::json!([]));
    assert_eq!(status["schema_version"].as_i64(), Some(6));
    assert_eq!((status["events"].as_i64(), status["aggregates"].as_i64()), (Some(6), Some(4)));
    assert_eq!(status["last_position"].as_i64(), Some(6));
    // No relay ran: every event is pending, in the partitions of their aggregates.
    assert_eq!(status["publication"]["pending"].as_i64(), Some(6));
    let partitions = status["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 64);
    assert_eq!(partitions.iter().map(|p| p["pending"].as_i64().unwrap()).sum::<i64>(), 6);
    let projections = status["projections"].as_array().unwrap();
    assert_eq!(projections.len(), 1);
    assert_eq!((projections[0]["name"].as_str(), projections[0]["behind"].as_i64()), (Some("seen"), Some(3)));

    let text = edupulse(&schema, &["status"]);
    assert_eq!(text.status.code(), Some(0));
    let text = stdout(&text);
    assert!(text.contains("6 in 4 aggregates"), "{text}");
    assert!(text.contains("schema version 6: 6 applied, 0 pending"), "{text}");
    assert!(text.contains("6 pending"), "{text}");
    assert!(text.contains("seen") && text.contains("3 events behind"), "{text}");

    let list = edupulse(&schema, &["projection", "list", "--json"]);
    let list: Value = serde_json::from_str(&stdout(&list)).unwrap();
    assert_eq!(list[0]["behind"].as_i64(), Some(3));
    assert_eq!(list[0]["rebuild_requested"], false);
}

#[tokio::test(flavor = "multi_thread")]
async fn projection_reset_has_the_runner_rebuild_on_its_next_batch() {
    let schema = schema();
    let store = store(&schema).await;
    three_events(&store).await;
    let runner = ProjectionRunner::new(store.clone(), Seen::default());
    catch_up(&runner, 3).await;
    let reset = edupulse(&schema, &["projection", "reset", "seen"]);
    assert_eq!(reset.status.code(), Some(0), "{}", stderr(&reset));
    let list = edupulse(&schema, &["projection", "list", "--json"]);
    let list: Value = serde_json::from_str(&stdout(&list)).unwrap();
    assert_eq!(list[0]["rebuild_requested"], true);
    assert!(stdout(&edupulse(&schema, &["projection", "list"])).contains("rebuild requested"));

    // The next catch-up empties the read model once and applies every event again.
    assert_eq!(runner.catch_up().await.unwrap(), 3);
    assert_eq!(runner.projection().resets.load(Ordering::SeqCst), 1);
    assert_eq!(runner.projection().applied.load(Ordering::SeqCst), 3);
    assert_eq!(runner.catch_up().await.unwrap(), 0, "rebuilt once");
    let list = edupulse(&schema, &["projection", "list", "--json"]);
    let list: Value = serde_json::from_str(&stdout(&list)).unwrap();
    assert_eq!((list[0]["rebuild_requested"].as_bool(), list[0]["behind"].as_i64()), (Some(false), Some(0)));

    let unknown = edupulse(&schema, &["projection", "reset", "nobody"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("no projection named `nobody`"));
}

#[tokio::test(flavor = "multi_thread")]
async fn status_names_the_write_transaction_that_holds_the_horizon() {
    use edupulse_events::sqlx::{self, postgres::PgPoolOptions};
    let schema = schema();
    let store = store(&schema).await;
    // A write transaction left open in another session: it holds the horizon back.
    let pool = PgPoolOptions::new().max_connections(1).connect(&database_url()).await.unwrap();
    let mut open = pool.begin().await.unwrap();
    let _: (i64,) =
        sqlx::query_as("SELECT txid_current()::text::bigint").fetch_one(&mut *open).await.unwrap();
    three_events(&store).await;
    let out = edupulse(&schema, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(status["publication"]["held_back"].as_i64(), Some(3), "{status}");
    let holder = &status["publication"]["oldest_write_transaction"];
    assert!(holder["pid"].as_i64().is_some_and(|pid| pid > 0), "{status}");
    let text = stdout(&edupulse(&schema, &["status"]));
    assert!(text.contains("3 held back") && text.contains("the horizon is held by pid"), "{text}");
    open.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_prints_the_stream_as_json_lines_by_position_type_and_aggregate() {
    let schema = schema();
    let store = store(&schema).await;
    let (a, b) = three_events(&store).await;
    let all = edupulse(&schema, &["tail"]);
    assert_eq!(all.status.code(), Some(0), "{}", stderr(&all));
    let published = "LessonPublished".to_owned();
    let renamed = "LessonRenamed".to_owned();
    assert_eq!(lines(&all), [(1, published.clone(), a), (2, renamed.clone(), a), (3, published.clone(), b)]);
    // The body of each line is the message body: it decodes as the event.
    let first = stdout(&all).lines().next().unwrap().to_owned();
    let envelope = edupulse_events::wire::decode_message::<LessonEvent>(first.as_bytes()).unwrap();
    assert!(matches!(envelope.event, LessonEvent::Published(ref p) if p.title == "One"));

    assert_eq!(
        lines(&edupulse(&schema, &["tail", "--from", "1"])),
        [(2, renamed.clone(), a), (3, published.clone(), b)]
    );
    assert_eq!(lines(&edupulse(&schema, &["tail", "--type", "LessonRenamed"])), [(2, renamed.clone(), a)]);
    let of_a = edupulse(&schema, &["tail", "--aggregate", &a.to_string(), "--type", "LessonPublished"]);
    assert_eq!(lines(&of_a), [(1, published.clone(), a)]);
    assert_eq!(lines(&edupulse(&schema, &["tail", "--limit", "2"])).len(), 2);

    let missing = edupulse(&schema, &["tail", "--from", "99"]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("no event at global position 99"));
    let bad = edupulse(&schema, &["tail", "--aggregate", "not-a-uuid"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_follow_prints_events_committed_after_it_started() {
    let schema = schema();
    let store = store(&schema).await;
    three_events(&store).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_edupulse"))
        .args(["tail", "--follow", "--limit", "6", "--schema", &schema])
        .env("DATABASE_URL", database_url())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    three_events(&store).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "tail --follow did not print the new events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let output = child.wait_with_output().unwrap();
    let positions: Vec<i64> = lines(&output).iter().map(|l| l.0).collect();
    assert_eq!(positions, [1, 2, 3, 4, 5, 6]);
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_sends_the_log_and_republish_sends_a_range_again() {
    let schema = schema();
    let store = store(&schema).await;
    three_events(&store).await;
    // The only stream on `clitest.>`: one left by an earlier run would overlap.
    let stream_name = "EDUPULSE_CLI_TEST".to_owned();
    let nats = NatsPublisher::connect(&nats_url(), NatsConfig::default()).await.unwrap();
    let mut streams = nats.jetstream().streams();
    let mut old = Vec::new();
    while let Some(info) = streams.next().await {
        let info = info.unwrap();
        if info.config.subjects.iter().any(|s| s.starts_with("clitest.")) {
            old.push(info.config.name);
        }
    }
    for name in old {
        nats.jetstream().delete_stream(&name).await.unwrap();
    }
    let published =
        edupulse(&schema, &["publish", "--seconds", "3", "--stream", &stream_name, "--subject", "clitest.>"]);
    assert_eq!(published.status.code(), Some(0), "{}", stderr(&published));
    assert!(stderr(&published).contains("3 published"), "{}", stderr(&published));
    let stream = nats.jetstream().get_stream(&stream_name).await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 3);
    assert_eq!(store.relay_lag().await.unwrap().pending, 0);

    // Still in the duplicate window: the server drops the re-sends.
    let again = edupulse(&schema, &["republish", "--from", "2", "--to", "3"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert!(
        stdout(&again).contains("republished 2 events from global position 2 to 3: 0 stored, 2 dropped"),
        "{}",
        stdout(&again)
    );
    // The stream lost its messages: republished, they are stored again, in order.
    stream.purge().await.unwrap();
    nats.ensure_stream(
        &StreamSpec::new(stream_name.clone(), ["clitest.>"]).with_duplicate_window(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let restored = edupulse(&schema, &["republish", "--from", "1"]);
    assert_eq!(restored.status.code(), Some(0), "{}", stderr(&restored));
    assert!(
        stdout(&restored).contains("republished 3 events from global position 1 to 3: 3 stored, 0 dropped"),
        "{}",
        stdout(&restored)
    );
    let info = stream.get_info().await.unwrap();
    assert_eq!(info.state.messages, 3);
    let missing = edupulse(&schema, &["republish", "--from", "42"]);
    assert_eq!(missing.status.code(), Some(2));
}

/// A quiz was submitted: published on a stream of its own, which the parked test limits.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(context = "cliparked")]
struct QuizSubmitted {
    #[event(aggregate_id)]
    quiz_id: Uuid,
    answers: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_events_are_listed_and_requeued_once_the_cause_is_fixed() {
    use edupulse_events::async_nats::jetstream::stream;
    let schema = schema();
    let store = store(&schema).await;
    let nats = NatsPublisher::connect(&nats_url(), NatsConfig::default()).await.unwrap();
    let _ = nats.jetstream().delete_stream("EDUPULSE_CLI_PARKED").await;
    let mut config = stream::Config {
        name: "EDUPULSE_CLI_PARKED".into(),
        subjects: vec!["cliparked.>".into()],
        max_message_size: 64,
        ..Default::default()
    };
    nats.jetstream().create_stream(config.clone()).await.unwrap();
    let quiz = Uuid::now_v7();
    let submitted = |answers: &str| QuizSubmitted { quiz_id: quiz, answers: answers.into() };
    store.append("quiz", quiz, 0, [submitted("a"), submitted("b")]).await.unwrap();
    // Refused at once (the stream takes 64 bytes at most): the first parked, the second behind it.
    let relay =
        LogRelay::new(store.clone(), Arc::new(nats.clone()), RelayConfig::default().with_max_attempts(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.relay_lag().await.unwrap().parked < 2 {
        assert!(std::time::Instant::now() < deadline, "not parked: {:?}", store.relay_lag().await);
        relay.run_once().await.unwrap();
    }
    let list = edupulse(&schema, &["parked", "list", "--json"]);
    assert_eq!(list.status.code(), Some(0), "{}", stderr(&list));
    let parked: Value = serde_json::from_str(&stdout(&list)).unwrap();
    let parked = parked.as_array().unwrap();
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert_eq!((parked[0]["global_position"].as_i64(), parked[0]["blocked_by"].as_i64()), (Some(1), None));
    assert_eq!(parked[1]["blocked_by"].as_i64(), Some(1), "the second waits behind the first");
    let text = stdout(&edupulse(&schema, &["parked", "list"]));
    assert!(text.contains("refused after 1 attempts") && text.contains("waits behind 1"), "{text}");

    // The cause fixed, the aggregate re-queued: both published, in order, nothing parked.
    config.max_message_size = -1;
    nats.jetstream().update_stream(config).await.unwrap();
    let unknown = edupulse(&schema, &["parked", "requeue", &Uuid::now_v7().to_string()]);
    assert_eq!(unknown.status.code(), Some(2), "an event id that names no parked event");
    let first_id = parked[0]["event_id"].as_str().unwrap().to_owned();
    let requeue = edupulse(&schema, &["parked", "requeue", &first_id]);
    assert_eq!(requeue.status.code(), Some(0), "{}", stderr(&requeue));
    assert!(stdout(&requeue).contains("re-queued 1 aggregate(s)"), "{}", stdout(&requeue));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.relay_lag().await.unwrap().parked > 0 {
        assert!(std::time::Instant::now() < deadline, "still parked: {:?}", store.relay_lag().await);
        relay.run_once().await.unwrap();
    }
    let stream = nats.jetstream().get_stream("EDUPULSE_CLI_PARKED").await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 2);
    assert!(stdout(&edupulse(&schema, &["parked", "list"])).contains("no parked events"));
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_list_and_requeue_without_parked_events() {
    let schema = schema();
    store(&schema).await;
    let list = edupulse(&schema, &["parked", "list"]);
    assert_eq!(list.status.code(), Some(0), "{}", stderr(&list));
    assert!(stdout(&list).contains("no parked events"));
    let json = edupulse(&schema, &["parked", "list", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&stdout(&json)).unwrap(), serde_json::json!([]));
    let requeue = edupulse(&schema, &["parked", "requeue", "--all"]);
    assert_eq!(requeue.status.code(), Some(0));
    assert!(stdout(&requeue).contains("re-queued 0 aggregate(s)"));
    let neither = edupulse(&schema, &["parked", "requeue"]);
    assert_eq!(neither.status.code(), Some(2), "POSITION or --all is needed");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_sqlite_store_is_operated_the_same_way() {
    let file = std::env::temp_dir().join(format!("edupulse-cli-{}.db", Uuid::now_v7().simple()));
    let url = format!("sqlite:{}?mode=rwc", file.display());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_edupulse")).args(args).env("DATABASE_URL", &url).output().unwrap()
    };
    assert_eq!(run(&["migrate", "--check"]).status.code(), Some(3));
    assert_eq!(run(&["migrate"]).status.code(), Some(0));
    let store = EventStore::connect(&url, StoreConfig::default()).await.unwrap();
    let (a, b) = three_events(&store).await;
    let status = run(&["status", "--json"]);
    assert_eq!(status.status.code(), Some(0), "{}", stderr(&status));
    let status: Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(status["backend"], "sqlite");
    assert_eq!((status["events"].as_i64(), status["aggregates"].as_i64()), (Some(3), Some(2)));
    assert_eq!(status["publication"]["pending"].as_i64(), Some(3));
    let tail = run(&["tail", "--from", "1"]);
    assert_eq!(tail.status.code(), Some(0), "{}", stderr(&tail));
    let published = "LessonPublished".to_owned();
    assert_eq!(lines(&tail), [(2, "LessonRenamed".to_owned(), a), (3, published, b)]);
    drop(store);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn no_secret_is_printed_in_help_or_in_errors() {
    let url = "postgres://someone:hunter2-secret@127.0.0.1:1/db";
    for args in [&["--help"][..], &["status", "--help"], &["status"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_edupulse"))
            .args(args)
            .env("DATABASE_URL", url)
            .env("NATS_URL", "nats://u:hunter2-secret@127.0.0.1:1")
            .output()
            .unwrap();
        let all = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!all.contains("hunter2"), "{args:?} printed a secret: {all}");
    }
    let down =
        Command::new(env!("CARGO_BIN_EXE_edupulse")).arg("status").env("DATABASE_URL", url).output().unwrap();
    assert_eq!(down.status.code(), Some(1), "an unreachable database is a failure");
    assert!(stderr(&down).contains("127.0.0.1:1"), "{}", stderr(&down));
    let none = Command::new(env!("CARGO_BIN_EXE_edupulse"))
        .arg("status")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert_eq!(none.status.code(), Some(2));
}

/// A certificate was issued: published on a stream of its own, which the lost-messages test
/// deletes.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(context = "clilost")]
struct CertificateIssued {
    #[event(aggregate_id)]
    learner_id: Uuid,
    course: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn republish_lost_has_the_relay_send_again_what_a_deleted_stream_lost() {
    let schema = schema();
    let store = store(&schema).await;
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    let issued = |id, course: &str| CertificateIssued { learner_id: id, course: course.into() };
    store.append("learner", a, 0, [issued(a, "rust"), issued(a, "sql")]).await.unwrap();
    store.append("learner", b, 0, [issued(b, "nats")]).await.unwrap();
    let stream_name = "EDUPULSE_CLI_LOST";
    let nats = NatsPublisher::connect(&nats_url(), NatsConfig::default()).await.unwrap();
    let _ = nats.jetstream().delete_stream(stream_name).await;
    let publish = ["publish", "--seconds", "2", "--stream", stream_name, "--subject", "clilost.>"];
    let first = edupulse(&schema, &publish);
    assert!(stderr(&first).contains("3 published"), "{}", stderr(&first));
    let nothing = edupulse(&schema, &["republish", "--lost"]);
    assert_eq!(nothing.status.code(), Some(0), "{}", stderr(&nothing));
    assert!(stdout(&nothing).contains("no stream lost messages"), "{}", stdout(&nothing));

    // The stream is deleted and made again, empty: the next relay finds it behind, holds
    // the partitions and reports them.
    nats.jetstream().delete_stream(stream_name).await.unwrap();
    let second = edupulse(&schema, &publish);
    assert_eq!(second.status.code(), Some(0), "{}", stderr(&second));
    let status = edupulse(&schema, &["status"]);
    assert!(
        stdout(&status).contains(&format!("LOST: stream {stream_name} holds up to sequence 0")),
        "{}",
        stdout(&status)
    );
    let json: Value = serde_json::from_str(&stdout(&edupulse(&schema, &["status", "--json"]))).unwrap();
    let lost = json["publication"]["lost"].as_array().unwrap();
    assert!(!lost.is_empty() && lost.iter().all(|m| m["stream"] == stream_name), "{json}");
    let stream = nats.jetstream().get_stream(stream_name).await.unwrap();
    assert_eq!(stream.get_info().await.unwrap().state.messages, 0, "nothing is sent past a loss");

    // Asked, the running relay sends the lost events again, in order.
    let mut relay = Command::new(env!("CARGO_BIN_EXE_edupulse"))
        .args([
            "publish",
            "--seconds",
            "25",
            "--stream",
            stream_name,
            "--subject",
            "clilost.>",
            "--schema",
            &schema,
        ])
        .env("DATABASE_URL", database_url())
        .env("NATS_URL", nats_url())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let repaired = edupulse(&schema, &["republish", "--lost", "--wait", "20"]);
    let _ = relay.kill();
    let _ = relay.wait();
    assert_eq!(repaired.status.code(), Some(0), "{}{}", stdout(&repaired), stderr(&repaired));
    assert!(stdout(&repaired).contains("holds what it acknowledged again"), "{}", stdout(&repaired));
    let info = stream.get_info().await.unwrap();
    assert_eq!(info.state.messages, 3);
    assert!(store.relay_lag().await.unwrap().lost.is_empty());
}

/// Runs `command`, waits at most 20 s for it (then kills it and fails the test).
fn bounded(mut command: Command) -> Output {
    let mut child =
        command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            let err = stderr(&output);
            let tail: String = err.lines().take(3).collect::<Vec<_>>().join("\n");
            panic!("{command:?} still running after 20 s; its stderr began with:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// `edupulse ARGS` on the PostgreSQL schema `schema`, bounded.
fn edupulse_bounded(schema: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edupulse"));
    command
        .args(args)
        .args(["--schema", schema])
        .env("DATABASE_URL", database_url())
        .env("NATS_URL", nats_url());
    bounded(command)
}

/// `edupulse ARGS` on the store at `url` (no broker), bounded.
fn edupulse_on(url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edupulse"));
    command.args(args).env("DATABASE_URL", url).env_remove("NATS_URL");
    bounded(command)
}

/// An embedded store in a file of its own, migrated: its path (to remove) and its URL.
async fn sqlite_store() -> (std::path::PathBuf, String, EventStore) {
    let file = std::env::temp_dir().join(format!("edupulse-cli-{}.db", Uuid::now_v7().simple()));
    let url = format!("sqlite:{}?mode=rwc", file.display());
    let store = EventStore::connect(&url, StoreConfig::default()).await.unwrap();
    store.migrate().await.unwrap();
    (file, url, store)
}

#[tokio::test(flavor = "multi_thread")]
async fn republish_refuses_a_range_that_ends_before_it_starts() {
    let schema = schema();
    let store = store(&schema).await;
    three_events(&store).await;
    let reversed = edupulse_bounded(&schema, &["republish", "--from", "3", "--to", "2"]);
    assert_eq!(reversed.status.code(), Some(2), "{}{}", stdout(&reversed), stderr(&reversed));
    assert!(stderr(&reversed).contains("--to 2 is before --from 3"), "{}", stderr(&reversed));
    assert!(!stdout(&reversed).contains("republished"), "{}", stdout(&reversed));
}

#[tokio::test(flavor = "multi_thread")]
async fn parked_requeue_refuses_a_position_that_names_no_parked_event() {
    let (file, url, store) = sqlite_store().await;
    let (a, c) = (Uuid::now_v7(), Uuid::now_v7());
    // Position 1 is refused and parked, position 2 (another subject) is published.
    let published = LessonEvent::Published(LessonPublished { lesson_id: a, title: "One".into() });
    store.append("lesson", a, 0, [published]).await.unwrap();
    let renamed = LessonEvent::Renamed(LessonRenamed { lesson_id: c, title: "Two".into() });
    store.append("lesson", c, 0, [renamed]).await.unwrap();
    let broker = InMemoryBroker::new();
    broker.refuse(Some("clitest.LessonPublished")).unwrap();
    let relay =
        LogRelay::new(store.clone(), Arc::new(broker.clone()), RelayConfig::default().with_max_attempts(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.relay_lag().await.unwrap().parked < 1 {
        assert!(std::time::Instant::now() < deadline, "not parked: {:?}", store.relay_lag().await);
        relay.run_once().await.unwrap();
    }
    assert_eq!(broker.messages().len(), 1, "position 2 was published");

    let nothing = edupulse_on(&url, &["parked", "requeue", "999999999"]);
    assert_eq!(nothing.status.code(), Some(2), "{}{}", stdout(&nothing), stderr(&nothing));
    assert!(stderr(&nothing).contains("no event at global position 999999999"), "{}", stderr(&nothing));
    let zero = edupulse_on(&url, &["parked", "requeue", "0"]);
    assert_eq!(zero.status.code(), Some(2), "{}{}", stdout(&zero), stderr(&zero));
    let not_parked = edupulse_on(&url, &["parked", "requeue", "2"]);
    assert_eq!(not_parked.status.code(), Some(2), "{}{}", stdout(&not_parked), stderr(&not_parked));
    assert!(
        stderr(&not_parked).contains("the event at global position 2 is not parked"),
        "{}",
        stderr(&not_parked)
    );
    // One position that names nothing refuses the whole command: nothing is re-queued.
    let mixed = edupulse_on(&url, &["parked", "requeue", "1", "999999999"]);
    assert_eq!(mixed.status.code(), Some(2), "{}{}", stdout(&mixed), stderr(&mixed));
    assert!(store.parked_events(10).await.unwrap().iter().all(|p| !p.requeued));

    let requeue = edupulse_on(&url, &["parked", "requeue", "1"]);
    assert_eq!(requeue.status.code(), Some(0), "{}", stderr(&requeue));
    assert!(stdout(&requeue).contains("re-queued 1 aggregate(s)"), "{}", stdout(&requeue));
    drop(store);
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_refuses_an_aggregate_without_events_and_a_start_past_the_end_of_the_stream() {
    let schema = schema();
    let store = store(&schema).await;
    let (a, _) = three_events(&store).await;
    let nobody = Uuid::now_v7().to_string();
    let unknown = edupulse_bounded(&schema, &["tail", "--aggregate", &nobody]);
    assert_eq!(unknown.status.code(), Some(2), "{}{}", stdout(&unknown), stderr(&unknown));
    assert!(stderr(&unknown).contains(&format!("aggregate {nobody} has no events")), "{}", stderr(&unknown));
    let past = edupulse_bounded(&schema, &["tail", "--aggregate", &a.to_string(), "--from", "99"]);
    assert_eq!(past.status.code(), Some(2), "{}{}", stdout(&past), stderr(&past));
    assert!(stderr(&past).contains("no event at global position 99"), "{}", stderr(&past));
    let no_type = edupulse_bounded(&schema, &["tail", "--type", ""]);
    assert_eq!(no_type.status.code(), Some(2), "{}{}", stdout(&no_type), stderr(&no_type));

    // Followed, an aggregate without events yet is waited for.
    let new = Uuid::now_v7();
    let child = Command::new(env!("CARGO_BIN_EXE_edupulse"))
        .args(["tail", "--follow", "--limit", "1", "--aggregate", &new.to_string(), "--schema", &schema])
        .env("DATABASE_URL", database_url())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let published = LessonEvent::Published(LessonPublished { lesson_id: new, title: "New".into() });
    store.append("lesson", new, 0, [published]).await.unwrap();
    let followed = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(followed.status.code(), Some(0), "{}", stderr(&followed));
    assert_eq!(lines(&followed), [(4, "LessonPublished".to_owned(), new)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_that_holds_no_store_is_refused_by_every_command_but_migrate() {
    let schema = schema();
    let commands: [&[&str]; 10] = [
        &["status"],
        &["status", "--json"],
        &["tail"],
        &["parked", "list"],
        &["parked", "requeue", "--all"],
        &["projection", "list"],
        &["projection", "reset", "seen"],
        &["republish", "--from", "1"],
        &["republish", "--lost"],
        &["publish", "--seconds", "1"],
    ];
    for args in commands {
        let out = edupulse_bounded(&schema, args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}{}", stdout(&out), stderr(&out));
        assert!(
            stderr(&out).contains(&format!("schema `{schema}` holds no store")),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // Migrating it is what makes it a store.
    assert_eq!(edupulse_bounded(&schema, &["migrate", "--check"]).status.code(), Some(3));
    assert_eq!(edupulse_bounded(&schema, &["migrate"]).status.code(), Some(0));
    assert_eq!(edupulse_bounded(&schema, &["status"]).status.code(), Some(0));

    // The same for an embedded database that was never migrated.
    let file = std::env::temp_dir().join(format!("edupulse-cli-{}.db", Uuid::now_v7().simple()));
    let url = format!("sqlite:{}?mode=rwc", file.display());
    let empty = edupulse_on(&url, &["tail"]);
    assert_eq!(empty.status.code(), Some(2), "{}{}", stdout(&empty), stderr(&empty));
    assert!(stderr(&empty).contains("the database holds no store"), "{}", stderr(&empty));
    let _ = std::fs::remove_file(&file);
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_stops_at_a_database_error_instead_of_repeating_it() {
    use edupulse_events::{DatabasePool, sqlx};
    let (file, url, store) = sqlite_store().await;
    three_events(&store).await;
    let DatabasePool::Sqlite(pool) = store.pool() else { panic!("an embedded store") };
    sqlx::query("ALTER TABLE events RENAME TO events_elsewhere").execute(&pool).await.unwrap();
    let out = edupulse_on(&url, &["tail"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let errors = stderr(&out).lines().filter(|line| line.starts_with("edupulse:")).count();
    assert_eq!(errors, 1, "reported once, then exit: {}", stderr(&out));
    assert!(stderr(&out).contains("no such table: events"), "{}", stderr(&out));
    drop(store);
    let _ = std::fs::remove_file(&file);
}
