//! Connecting to PostgreSQL and NATS: no secret in any log line at any level (every
//! `tracing` event and span of every crate is captured, TRACE included), and failures that
//! name the server, the cause and the next step within 2 s. Needs DATABASE_URL and
//! nats-server (`scripts/test.sh`).

mod common;

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::{counted, database_url};
use edupulse_events::{
    BrokerErrorKind, ConnectCause, EventError, EventStore, NatsConfig, NatsPublisher, StoreConfig,
    StreamSpec, Uuid,
};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

// ---------------------------------------------------------------------------------------
// Every tracing event and span field, formatted, from every crate and at every level.

static LOG: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture {
    next_span: AtomicU64,
}

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

fn push(meta: &Metadata<'_>, kind: &str, record: impl FnOnce(&mut Line)) {
    let mut line = Line(format!("{} {} {kind} {}:", meta.level(), meta.target(), meta.name()));
    record(&mut line);
    LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(line.0);
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        push(span.metadata(), "span", |line| span.record(line));
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }
    fn record(&self, _: &Id, values: &Record<'_>) {
        let mut line = Line("span record:".into());
        values.record(&mut line);
        LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(line.0);
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        push(event.metadata(), "event", |line| event.record(line));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Installs the capture as the process-wide subscriber: async-nats and sqlx log from their
/// own tasks, on any worker thread.
fn capture_logs() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        tracing::subscriber::set_global_default(Capture { next_span: AtomicU64::new(1) }).unwrap();
    });
}

/// Fails naming the first line that holds any of `secrets`; returns how many lines were
/// captured, so a test can check that the capture saw the connection at all.
fn assert_not_logged(secrets: &[&str]) -> usize {
    let log = lines();
    if let Some(line) = log.iter().find(|line| secrets.iter().any(|secret| line.contains(secret))) {
        panic!("a secret was logged: {line}");
    }
    log.len()
}

/// A copy of the lines so far (a failed test panics without the lock held).
fn lines() -> Vec<String> {
    LOG.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
}

fn logged(fragment: &str) -> bool {
    lines().iter().any(|line| line.contains(fragment))
}

// ---------------------------------------------------------------------------------------

/// `DATABASE_URL` with `password` as the password (the test server trusts loopback, so any
/// password is accepted) and `database` as the database, when given.
fn postgres_url(password: &str, database: Option<&str>) -> String {
    let url = database_url();
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, host_and_path) = rest.rsplit_once('@').unwrap();
    let user = userinfo.split(':').next().unwrap();
    let (host, path) = host_and_path.split_once('/').unwrap_or((host_and_path, ""));
    let database = database.unwrap_or(path);
    format!("{scheme}://{user}:{password}@{host}/{database}")
}

fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn config() -> NatsConfig {
    NatsConfig::default().with_ack_timeout(Duration::from_secs(2))
}

fn broker(e: impl std::error::Error + Send + Sync + 'static) -> EventError {
    EventError::Broker { kind: BrokerErrorKind::Other, message: e.to_string(), source: Some(Box::new(e)) }
}

/// Connects, ensures a stream, publishes one message and reads it back.
async fn publish_one(url: &str) -> Result<(), EventError> {
    let publisher = NatsPublisher::connect(url, config()).await?;
    publisher.ensure_stream(&StreamSpec::new("SECRETS", ["secrets.>"])).await?;
    let ack = publisher.jetstream().publish("secrets.one", "hello".into()).await.map_err(broker)?;
    ack.await.map_err(broker)?;
    Ok(())
}

#[tokio::test]
async fn nats_user_and_password_are_in_no_log_line() {
    capture_logs();
    let password = "NatsPw4sSecretQ7z";
    let server = NatsServer::start_with_args(&["--user", "edupulse", "--pass", password]).await;
    let url = format!("nats://edupulse:{password}@127.0.0.1:{}", server.port());

    let outcome = publish_one(&url).await;

    // Checked first: before the fix, the failure to see is the leak.
    assert_not_logged(&[password]);
    outcome.unwrap();
    // The capture did see async-nats connect and send CONNECT (at TRACE).
    assert!(logged("write operation: CONNECT"), "the capture missed async-nats' TRACE lines");
    assert!(logged("attempting connection"), "the capture missed async-nats' DEBUG lines");
}

#[tokio::test]
async fn nats_token_is_in_no_log_line() {
    capture_logs();
    let token = "NatsT0kenSecretK3w";
    let server = NatsServer::start_with_args(&["--auth", token]).await;

    let outcome = publish_one(&format!("nats://{token}@127.0.0.1:{}", server.port())).await;

    assert_not_logged(&[token]);
    outcome.unwrap();
    assert!(logged("write operation: CONNECT"), "the capture missed async-nats' TRACE lines");
}

#[tokio::test]
async fn several_nats_servers_with_credentials() {
    capture_logs();
    let password = "NatsListSecretP9v";
    let server = NatsServer::start_with_args(&["--user", "edupulse", "--pass", password]).await;
    // The first server is down; the client goes on to the second.
    let url =
        format!("nats://edupulse:{password}@127.0.0.1:{},nats://127.0.0.1:{}", closed_port(), server.port());

    let outcome = publish_one(&url).await;

    assert_not_logged(&[password]);
    outcome.unwrap();
}

#[tokio::test]
async fn postgres_password_is_in_no_log_line() {
    capture_logs();
    let password = "PgPassw0rdSecretM4x";
    let typo = "PgTypoParamSecretJ2n";
    // A mistyped parameter: sqlx would warn with its value.
    let url = format!("{}?pasword={typo}", postgres_url(password, None));
    let config = StoreConfig::with_schema(&format!("t_{}", Uuid::now_v7().simple())).unwrap();

    let outcome = async {
        let store = EventStore::connect(&url, config).await?;
        store.migrate().await?;
        let id = Uuid::now_v7();
        store.append("lesson", id, 0, [counted(1)]).await?;
        let mut tx = store.begin().await?;
        tx.append("lesson", id, 1, [counted(2)]).await?;
        tx.commit().await
    }
    .await;

    assert_not_logged(&[password, typo]);
    outcome.unwrap();
    assert!(logged("pasword"), "the dropped parameter is named by its key");
    assert!(logged("sqlx::query"), "the capture missed sqlx's statement lines");
}

// ---------------------------------------------------------------------------------------
// Failures that say what to do.

/// Checks what every connection failure must say, and returns its cause.
fn connect_failure(
    outcome: Result<impl fmt::Debug, EventError>,
    started: Instant,
    system: &str,
    server: &str,
    secrets: &[&str],
) -> ConnectCause {
    let elapsed = started.elapsed();
    let err = outcome.unwrap_err();
    let message = err.to_string();
    eprintln!("{elapsed:?}: {message}");
    assert!(elapsed < Duration::from_secs(2), "reported after {elapsed:?}: {message}");
    assert!(message.contains(server), "the message does not name {server}: {message}");
    for secret in secrets {
        assert!(!message.contains(secret), "the message holds a secret: {message}");
        assert!(!format!("{err:?}").contains(secret), "the error's Debug holds a secret: {err:?}");
    }
    match err {
        EventError::Connect { system: s, server: named, cause, .. } => {
            assert_eq!(s, system);
            assert_eq!(named, server);
            cause
        }
        other => panic!("not a connection error: {other}"),
    }
}

#[tokio::test]
async fn nats_refused() {
    let port = closed_port();
    let started = Instant::now();
    let outcome = NatsPublisher::connect(&format!("nats://u:RefusedSecret@127.0.0.1:{port}"), config()).await;
    let server = format!("127.0.0.1:{port}");
    let err_text = format!("{:?}", outcome.as_ref().err());
    let cause = connect_failure(outcome, started, "NATS", &server, &["RefusedSecret"]);
    assert_eq!(cause, ConnectCause::Refused);
    assert!(err_text.contains("is nats-server running"), "{err_text}");
}

#[tokio::test]
async fn nats_unknown_host() {
    let started = Instant::now();
    let outcome = NatsPublisher::connect("nats://u:DnsSecret@no-such-host.invalid:4222", config()).await;
    let cause = connect_failure(outcome, started, "NATS", "no-such-host.invalid:4222", &["DnsSecret"]);
    assert_eq!(cause, ConnectCause::Dns);
}

#[tokio::test]
async fn nats_wrong_password() {
    let server = NatsServer::start_with_args(&["--user", "edupulse", "--pass", "TheRightSecret"]).await;
    let started = Instant::now();
    let outcome = NatsPublisher::connect(
        &format!("nats://edupulse:TheWrongSecret@127.0.0.1:{}", server.port()),
        config(),
    )
    .await;
    let server = format!("127.0.0.1:{}", server.port());
    let cause = connect_failure(outcome, started, "NATS", &server, &["TheWrongSecret", "TheRightSecret"]);
    assert_eq!(cause, ConnectCause::Authentication);
}

#[tokio::test]
async fn postgres_refused() {
    let port = closed_port();
    let started = Instant::now();
    let outcome = EventStore::connect(
        &format!("postgres://u:PgRefusedSecret@127.0.0.1:{port}/db"),
        StoreConfig::default(),
    )
    .await;
    let server = format!("127.0.0.1:{port}");
    let err_text = format!("{:?}", outcome.as_ref().err());
    let cause = connect_failure(outcome, started, "PostgreSQL", &server, &["PgRefusedSecret"]);
    assert_eq!(cause, ConnectCause::Refused);
    assert!(err_text.contains("is PostgreSQL running"), "{err_text}");
}

#[tokio::test]
async fn postgres_unknown_host() {
    let started = Instant::now();
    let outcome =
        EventStore::connect("postgres://u:secret@no-such-host.invalid/db", StoreConfig::default()).await;
    let cause = connect_failure(outcome, started, "PostgreSQL", "no-such-host.invalid:5432", &["secret"]);
    assert_eq!(cause, ConnectCause::Dns);
}

#[tokio::test]
async fn postgres_unknown_database() {
    let url = postgres_url("PgDbSecret", Some("no_such_database_edupulse"));
    let server = url.split_once('@').unwrap().1.split_once('/').unwrap().0.to_owned();
    let started = Instant::now();
    let outcome = EventStore::connect(&url, StoreConfig::default()).await;
    let err_text = outcome.as_ref().err().map(ToString::to_string).unwrap_or_default();
    let cause = connect_failure(outcome, started, "PostgreSQL", &server, &["PgDbSecret"]);
    assert_eq!(cause, ConnectCause::UnknownDatabase);
    assert!(err_text.contains("no_such_database_edupulse"), "{err_text}");
}

#[tokio::test]
async fn a_sqlite_file_in_a_missing_folder_is_named_with_the_fix() {
    let folder = std::env::temp_dir().join(format!("edupulse-missing-{}", Uuid::now_v7().simple()));
    let url = format!("sqlite://{}/events.db", folder.display());
    let Err(err) = EventStore::connect(&url, StoreConfig::default()).await else {
        panic!("a missing folder fails")
    };
    let EventError::Connect { system, ref server, .. } = err else { panic!("{err:?}") };
    assert_eq!(system, "SQLite");
    assert!(server.ends_with("events.db"), "{server}");
    let text = err.to_string();
    assert!(text.contains(&format!("the folder {} does not exist", folder.display())), "{text}");
}
