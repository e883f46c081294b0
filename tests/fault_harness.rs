//! The randomized fault harness: the referee of the framework's core promise.
//!
//! > An event is published if and only if it committed, each aggregate's events in order
//! > (in JetStream and in `stream_all`), nothing ever stuck, and every bad input a typed
//! > error before anything is written.
//!
//! The harness starts a PostgreSQL and a nats-server of its own; K writers commit random
//! batches over A shared aggregates through `EventBus::commit` (plain appends, `Any`,
//! closures that fail, closures that swallow a failed statement, caller writes first, bad
//! inputs) while three relays publish the log and compete for its partitions: the bus's
//! own background relay (the production path, holding partitions 0..32; a warm-up commit
//! starts it first) and two standalone `LogRelay`s that may hold any partition: one holds
//! 32..64, the other stands by. The report says how many acknowledgements each kind of relay
//! got. A seeded schedule kills the standalone relays mid-batch,
//! SIGKILLs nats-server while a relay waits on it and restarts PostgreSQL, and once puts the
//! server back on an older copy of its store (what it acknowledged over 3–5 s is lost, as in
//! a power cut before a sync; the relays must find it and send it again). A second test runs
//! the same against a JetStream cluster of three servers and a stream of three replicas:
//! the stream's leader SIGKILLed mid-batch, one member lost for good (killed, its store
//! deleted) after which the stream must go on taking messages, and the whole cluster
//! SIGKILLed and restarted. A third test runs the same writers and checker against the
//! embedded default: a SQLite file in a temporary directory and the in-process broker
//! (`InMemoryBroker`), with the caller's table of the caller-first commits in that file;
//! its faults are the standalone relays killed mid-batch and the in-process broker made
//! unavailable for a while, from the middle of a relay's batch or not. The swallowed failed
//! statements do not run there: SQLite undoes the failed statement and nothing else, so
//! their transactions rightly commit. Then the relays drain the log (until
//! `relay_lag` shows nothing pending) and an independent checker
//! (`fault_harness/checker.rs`) reads the whole stream and the whole store and counts every
//! kind of violation; the test asserts that all of them are zero, and that events were
//! committed and published at all.
//!
//! The bad inputs: a `traceparent` with CRLF, an aggregate type with a newline, a payload
//! over 1 MiB, an f64 NaN, and metadata whose user value nests 130 arrays deep (more than
//! any reader parses back). Among the plain commits, a few carry a "big numbers" event
//! (4 000 readings of `1e300`: 24 KB as written, 1.2 MB if a database writes the numbers
//! out in full): a well-formed event that must be accepted and published.
//!
//! Environment: `TORTURE_SEED` (default fixed), `TORTURE_SECONDS` of load (default 40, 30
//! against the cluster, 20 on the embedded default),
//! `TORTURE_WRITERS` (6), `TORTURE_AGGREGATES` (40), `TORTURE_SKIP` (what to leave out, to
//! isolate a finding: kinds of commit `plain,any,caller-writes-first,closure-fails,
//! swallow-before,swallow-after,bad-input`, `any-parts` (the `Any` appends inside plain and
//! caller-first commits), `deep-metadata` (that one bad input), `big-numbers` (the big
//! numbers events of plain commits), faults `relay-kill,nats-kill,pg-restart,restore-older,
//! member-loss,cluster-restart,broker-outage`), `TORTURE_LOG=1` (the library's warnings and
//! the faults, timed, on standard error). `scripts/torture.sh` runs long ones.
//! See RELIABILITY.md.

#[path = "fault_harness/broker.rs"]
mod broker;
#[path = "fault_harness/checker.rs"]
mod checker;
mod common;
#[path = "fault_harness/faults.rs"]
mod faults;
#[path = "fault_harness/log.rs"]
mod log;
#[path = "fault_harness/postgres.rs"]
mod postgres;
#[path = "fault_harness/prng.rs"]
mod prng;
#[path = "fault_harness/workload.rs"]
mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use broker::{Broker, Topology};
use edupulse_events::{
    BusConfig, DatabasePool, EventBus, EventStore, InMemoryBroker, NatsConfig, NatsPublisher, Publisher,
    RelayConfig, StoreConfig, StreamSpec, Uuid,
};
use tokio::time::Instant;

use checker::{Counts, Observed};
use faults::{Counting, FaultCounts, Interrupting, Relays, Target};
use postgres::PgServer;
use prng::Rng;
use workload::{AGGREGATE_TYPE, Backend, CommitRecord, Kind, Ledger, Outcome, Recorded, Writers};

/// The store's schema on the harness's own server.
const SCHEMA: &str = "harness";
const STREAM: &str = "HARNESS";
/// The seed of the run in the test suite: fixed, so that CI replays the same choices.
const DEFAULT_SEED: u64 = 0x5eed_0012_0008;

#[derive(Debug, Clone)]
struct Settings {
    topology: Topology,
    /// A nats-server that takes atomic batches (2.15): the relay sends long runs as batches.
    batches: bool,
    seed: u64,
    load: Duration,
    writers: u32,
    aggregates: usize,
    /// Kinds of commit left out (`TORTURE_SKIP=bad-input,swallow-after`), to isolate a
    /// finding; see `workload::KINDS`.
    skip: Vec<String>,
    /// The final drain stops when `relay_lag` shows no pending event, when the pending
    /// count has not shrunk for `stall`, or after `drain` at most.
    drain: Duration,
    stall: Duration,
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={value:?} is not a number")))
}

impl Settings {
    fn from_env(topology: Topology, batches: bool) -> Self {
        let default_load = match (topology, batches) {
            (Topology::Single, false) => 40,
            (Topology::Cluster, false) => 30,
            // CI runs the whole suite on 2 cores: the embedded run and the second broker
            // version's are the short ones.
            (Topology::Single, true) | (Topology::Embedded, _) => 20,
            (Topology::Cluster, true) => 15,
        };
        Self {
            topology,
            batches,
            seed: env_u64("TORTURE_SEED").unwrap_or(DEFAULT_SEED),
            load: Duration::from_secs(env_u64("TORTURE_SECONDS").unwrap_or(default_load)),
            writers: env_u64("TORTURE_WRITERS").map_or(6, |n| n.clamp(1, 64) as u32),
            aggregates: env_u64("TORTURE_AGGREGATES").map_or(40, |n| n.clamp(1, 100_000) as usize),
            skip: std::env::var("TORTURE_SKIP")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            drain: Duration::from_secs(60),
            stall: Duration::from_secs(15),
        }
    }
}

struct Report {
    counts: Counts,
    faults: FaultCounts,
    relay_panic: Option<String>,
    /// Acknowledgements the bus's background relay got, and the standalone relays.
    acked_by_bus_relay: u64,
    acked_by_standalone_relays: u64,
    /// Of those, acknowledged in fast-ingest batches (nats-server 2.14 and later).
    acked_in_fast_batches: u64,
    drained_in: Duration,
    elapsed: Duration,
    /// Acknowledgements after a cluster member was lost for good.
    acked_after_loss: Option<u64>,
}

impl Report {
    fn summary(&self, settings: &Settings) -> String {
        let f = &self.faults;
        format!(
            "fault harness: seed {seed} (0x{seed:x}), {load} s of load, {writers} writers, {aggregates} aggregates, \
             {broker}, {elapsed:.0} s in all{skip}{never}\n\
             faults injected: {faults}broker down {nd:.1} s in all; final drain {drain:.1} s\n\
             acknowledgements (re-sends included): {bus} to the bus's background relay, {standalone} to the \
             standalone relays, {fast} of them in fast-ingest batches\n{relay}\n{table}\
             replay with TORTURE_SEED={seed} TORTURE_SECONDS={load}{skip_env}",
            seed = settings.seed,
            broker = match (settings.topology, settings.batches) {
                (Topology::Single, false) => "one nats-server (stream R1)",
                (Topology::Single, true) => "one nats-server with batches (stream R1)",
                (Topology::Cluster, false) => "a 3-server JetStream cluster (stream R3)",
                (Topology::Cluster, true) => "a 3-server JetStream cluster with batches (stream R3)",
                (Topology::Embedded, _) => "the embedded default (a SQLite file, the in-process broker)",
            },
            never = match workload::never_on(settings.topology.backend()) {
                [] => String::new(),
                kinds => format!(", never on this backend: {}", kinds.join(", ")),
            },
            faults = if settings.topology == Topology::Embedded {
                format!(
                    "{} relay kills, {} outages of the in-process broker ({} from mid-batch), ",
                    f.relay_kills, f.broker_outages, f.broker_outages_mid_batch
                )
            } else {
                format!(
                    "{rk} relay kills, {nk} nats-server SIGKILLs{leader} ({mid} mid-batch, {after} right after an \
                     acknowledgement), {cluster}{pr} PostgreSQL fast restarts ({pd:.1} s down), ",
                    rk = f.relay_kills,
                    nk = f.nats_kills,
                    leader =
                        if settings.topology == Topology::Cluster { " of the stream leader" } else { "" },
                    mid = f.nats_kills_mid_batch,
                    after = f.nats_kills_after_ack,
                    cluster = cluster_faults(settings.topology, f, self.acked_after_loss),
                    pr = f.pg_restarts,
                    pd = f.pg_down.as_secs_f64(),
                )
            },
            load = settings.load.as_secs(),
            writers = settings.writers,
            aggregates = settings.aggregates,
            elapsed = self.elapsed.as_secs_f64(),
            skip = if settings.skip.is_empty() {
                String::new()
            } else {
                format!(", without: {}", settings.skip.join(", "))
            },
            nd = f.nats_down.as_secs_f64(),
            drain = self.drained_in.as_secs_f64(),
            bus = self.acked_by_bus_relay,
            standalone = self.acked_by_standalone_relays,
            fast = self.acked_in_fast_batches,
            relay = self.relay_panic.as_deref().map(|p| format!("a relay panicked: {p}")).unwrap_or_default(),
            table = self.counts.table(),
            skip_env = if settings.skip.is_empty() {
                String::new()
            } else {
                format!(" TORTURE_SKIP={}", settings.skip.join(","))
            },
        )
    }
}

/// The faults that only a server run has: an older copy of the store, or a cluster's.
fn cluster_faults(topology: Topology, f: &FaultCounts, acked_after_loss: Option<u64>) -> String {
    match topology {
        Topology::Single => format!(
            "{} return(s) of the server to an older copy of its store ({} acknowledgements lost with it), ",
            f.older_copies, f.acked_then_lost
        ),
        Topology::Cluster => format!(
            "{} member(s) lost for good ({} acknowledgements after the loss), {} whole-cluster SIGKILLs and \
             restarts, ",
            f.members_lost,
            acked_after_loss.map_or_else(|| "-".to_owned(), |n| n.to_string()),
            f.cluster_restarts
        ),
        Topology::Embedded => String::new(),
    }
}

impl Topology {
    /// The store's database in a run against this broker.
    fn backend(self) -> Backend {
        match self {
            Self::Single | Self::Cluster => Backend::Postgres,
            Self::Embedded => Backend::Sqlite,
        }
    }
}

/// The runs share the machine one after the other, not at once.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_event_is_published_once_in_order_under_faults() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let settings = Settings::from_env(Topology::Single, false);
    let report = check(settings.clone()).await;
    if settings.skip.iter().all(|s| s != "restore-older") {
        assert_eq!(report.faults.older_copies, 1, "the server went back to an older copy once");
        assert!(
            report.faults.acked_then_lost > 0,
            "the older copy lost acknowledged messages (else it tested nothing):\n{}",
            report.summary(&settings)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_event_is_published_once_in_order_when_cluster_members_fail() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let settings = Settings::from_env(Topology::Cluster, false);
    let report = check(settings.clone()).await;
    if settings.skip.iter().all(|s| s != "member-loss") {
        assert_eq!(report.faults.members_lost, 1, "a member was lost for good");
        assert!(
            report.acked_after_loss.is_some_and(|n| n > 0),
            "the R3 stream took messages after losing a member for good:\n{}",
            report.summary(&settings)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_event_is_published_once_in_order_under_faults_with_batches() {
    check_with_batches(Topology::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_event_is_published_once_in_order_when_cluster_members_fail_with_batches() {
    check_with_batches(Topology::Cluster).await;
}

/// Runs the harness on `topology` with a nats-server that takes batches (fast-ingest on
/// 2.14 and later, atomic on 2.12), and asserts
/// that some events went as batches (the backlogs the outages leave), or it tested nothing.
async fn check_with_batches(topology: Topology) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let settings = Settings::from_env(topology, true);
    let report = check(settings.clone()).await;
    assert!(
        report.counts.stream_batched + report.acked_in_fast_batches > 0,
        "events went in batches (else it tested nothing):\n{}",
        report.summary(&settings)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_committed_event_is_published_once_in_order_on_the_embedded_default() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let settings = Settings::from_env(Topology::Embedded, false);
    let report = check(settings.clone()).await;
    let f = &report.faults;
    if settings.skip.iter().all(|s| s != "broker-outage") {
        assert!(
            f.broker_outages > 0 && f.broker_outages_mid_batch > 0,
            "the in-process broker went down, once at least from the middle of a batch:\n{}",
            report.summary(&settings)
        );
    }
    if settings.skip.iter().all(|s| s != "relay-kill") {
        assert!(f.relay_kills > 0, "relays were killed:\n{}", report.summary(&settings));
    }
}

/// Runs the harness and asserts that it found no violation.
async fn check(settings: Settings) -> Report {
    println!(
        "fault harness: seed {} (0x{:x}), {} s of load (TORTURE_SEED / TORTURE_SECONDS to change)",
        settings.seed,
        settings.seed,
        settings.load.as_secs()
    );
    // Panics inside library tasks are counted as violations; print the first few, not
    // every one (a bad input can make every relay pass panic). Every panic is also counted
    // here: the bus's background relay is a task nobody joins but the bus.
    let printed = Arc::new(AtomicU64::new(0));
    // This run's panics only: a test of this file that failed before (its own assertion is
    // a panic too) must not count in the next one's figures.
    PANICS_SEEN.store(0, Ordering::Relaxed);
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new({
        let printed = printed.clone();
        move |info| {
            PANICS_SEEN.fetch_add(1, Ordering::Relaxed);
            // Runtime threads are `tokio-runtime-worker` or `tokio-rt-worker`, by version.
            let worker = std::thread::current().name().is_some_and(|name| name.starts_with("tokio-"));
            if !worker || printed.fetch_add(1, Ordering::Relaxed) < 3 {
                default_hook(info);
            }
        }
    }));
    let report = run(&settings).await;
    drop(std::panic::take_hook());
    let summary = report.summary(&settings);
    println!("{summary}");
    assert_eq!(
        report.counts.violations(),
        0,
        "the fault harness found violations of the promise (seed {}):\n{summary}",
        settings.seed
    );
    // A run that committed or published nothing checked nothing.
    let c = &report.counts;
    assert!(
        c.commits_ok > 0 && c.events_committed > 0 && c.events_published > 0,
        "the run committed {} events and published {}: nothing was checked (seed {}):\n{summary}",
        c.events_committed,
        c.events_published,
        settings.seed
    );
    assert_eq!(c.events_published, c.events_committed, "every committed event is in the stream:\n{summary}");
    // The inputs this run was to try were tried.
    let skipped = |name: &str| settings.skip.iter().any(|s| s == name);
    if !skipped("plain") && !skipped("big-numbers") {
        assert!(
            c.big_numbers_committed > 0 && c.big_numbers_published == c.big_numbers_committed,
            "big-numbers events were committed ({}) and all published ({}):\n{summary}",
            c.big_numbers_committed,
            c.big_numbers_published
        );
    }
    if !skipped("bad-input") && !skipped("deep-metadata") {
        let deep = checker::kind_name(Kind::Bad(workload::BadInput::DeepMetadata));
        assert!(
            c.commits_by_kind.get(&deep).is_some_and(|n| *n > 0),
            "the run tried the deep metadata:\n{summary}"
        );
    }
    report
}

/// Commits one event through the bus and waits for its publication: the bus's background
/// relay then holds the partitions. The commit goes into the ledger like the writers' ones.
async fn warm_up(bus: &EventBus, settings: &Settings) -> CommitRecord {
    probe(bus, settings, 2, "warm-up").await
}

/// Commits one event to a new aggregate of the bus relay's partitions (0..32) and waits
/// for its publication (at the start, no other relay runs yet; after the faults, it shows
/// that the stream still takes messages, whenever the schedule put its faults).
async fn probe(bus: &EventBus, settings: &Settings, stream: u64, note: &str) -> CommitRecord {
    let mut rng = Rng::derive(settings.seed, stream);
    let aggregate =
        std::iter::repeat_with(|| rng.uuid()).find(|id| id.as_u128() % 64 < 32).unwrap_or_default();
    // A writer index no writer has.
    let writer = settings.writers;
    let event =
        Recorded { aggregate, writer, commit: 0, amount: 1.0, note: note.into(), readings: Vec::new() };
    let committed = bus
        .commit(async |tx| tx.append(AGGREGATE_TYPE, aggregate, 0, [event]).await)
        .await
        .unwrap_or_else(|e| panic!("the {note} commit: {e}"));
    let events = committed.value.iter().map(|e| e.event_id).collect();
    tokio::time::timeout(Duration::from_secs(60), committed.receipt.published())
        .await
        .unwrap_or_else(|_| panic!("the {note} event is published within 60 s"))
        .unwrap_or_else(|e| panic!("the {note} event is published: {e}"));
    CommitRecord {
        writer,
        kind: Kind::Plain,
        outcome: Outcome::Ok,
        events,
        big_numbers: Vec::new(),
        error: None,
        invalid: false,
    }
}

/// Panics seen by the hook, on any thread: the floor of the panics figure.
static PANICS_SEEN: AtomicU64 = AtomicU64::new(0);

/// What a run's store and relays talk to, and what the checker reads after.
enum Rig {
    /// A PostgreSQL and a NATS (one server or a cluster) of the harness's own.
    Servers { pg: Option<PgServer>, pg_url: String, broker: Broker },
    /// The embedded default: a SQLite file in a temporary directory, the in-process broker.
    Embedded { dir: PathBuf, file: PathBuf, broker: Arc<Interrupting> },
}

impl Rig {
    /// Starts the servers (or creates the file), migrates the store, creates the caller's
    /// own tables and the stream: the store and the broker as the relays see it.
    async fn start(settings: &Settings) -> (Self, EventStore, Arc<dyn Publisher>) {
        if settings.topology == Topology::Embedded {
            return Self::start_embedded().await;
        }
        let pg = tokio::task::spawn_blocking(PgServer::start).await.expect("PostgreSQL started");
        let broker = Broker::start(settings.topology, settings.batches).await;
        let pg_url = pg.url();
        let store_config = StoreConfig::with_schema(SCHEMA).unwrap().with_max_connections(24);
        let store =
            EventStore::connect(&pg_url, store_config).await.expect("connect to the harness's PostgreSQL");
        store.migrate().await.unwrap();
        let pool = common::pg_pool(&store);
        for statement in [
            "CREATE SCHEMA harness_own",
            "CREATE TABLE harness_own.caller_writes (id bigserial PRIMARY KEY, writer int NOT NULL, \
             at timestamptz NOT NULL DEFAULT now())",
            "CREATE TABLE harness_own.once (key text PRIMARY KEY)",
            "INSERT INTO harness_own.once (key) VALUES ('taken')",
        ] {
            sqlx::query(statement).execute(&pool).await.unwrap();
        }
        let publisher = NatsPublisher::connect(
            &broker.url(),
            NatsConfig::default().with_ack_timeout(Duration::from_secs(1)),
        )
        .await
        .unwrap();
        let spec = StreamSpec::new(STREAM, ["harness.>"]).with_replicas(broker.replicas());
        publisher.ensure_stream(&spec).await.unwrap();
        (Self::Servers { pg: Some(pg), pg_url, broker }, store, Arc::new(publisher))
    }

    async fn start_embedded() -> (Self, EventStore, Arc<dyn Publisher>) {
        let dir = std::env::temp_dir().join(format!("edupulse-harness-{}", Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).expect("the harness creates its temporary directory");
        let file = dir.join("events.db");
        // Writers, three relays, their reads: more connections than SQLite has writers.
        let config = StoreConfig::default().with_max_connections(16);
        let store = EventStore::connect(&format!("sqlite://{}", file.display()), config)
            .await
            .expect("the embedded store opens its file");
        store.migrate().await.unwrap();
        let DatabasePool::Sqlite(pool) = store.pool() else { panic!("a SQLite URL opens a SQLite store") };
        // The caller-first commits' own table, in the store's file: the same transaction.
        sqlx::query(
            "CREATE TABLE harness_caller_writes (id INTEGER PRIMARY KEY AUTOINCREMENT, writer INTEGER NOT NULL, \
             at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))",
        )
        .execute(&pool)
        .await
        .unwrap();
        let broker = Interrupting::new(InMemoryBroker::new());
        (Self::Embedded { dir, file, broker: broker.clone() }, store, broker)
    }

    fn backend(&self) -> Backend {
        match self {
            Self::Servers { .. } => Backend::Postgres,
            Self::Embedded { .. } => Backend::Sqlite,
        }
    }

    fn target(&mut self) -> Target<'_> {
        match self {
            Self::Servers { pg, broker, .. } => Target::Servers { broker, pg },
            Self::Embedded { broker, .. } => Target::Embedded { broker },
        }
    }

    /// What the checker reads: the store with plain SQL, the broker's messages, and
    /// `stream_all` through the library.
    async fn observe(&self, store: &EventStore) -> Observed {
        let ((store_rows, backlog), (stream, stream_unreadable)) = match self {
            Self::Servers { pg_url, broker, .. } => {
                (checker::read_store(pg_url, SCHEMA).await, checker::read_stream(&broker.url(), STREAM).await)
            }
            Self::Embedded { file, broker, .. } => {
                (checker::read_sqlite_store(file).await, checker::read_broker(broker.broker()))
            }
        };
        let (stream_all, stream_all_errors) = checker::read_stream_all(store).await;
        Observed { store: store_rows, stream, stream_unreadable, stream_all, stream_all_errors, backlog }
    }

    /// The embedded run's file is removed after a clean run, and kept (its path printed)
    /// after one with violations.
    fn finish(self, violations: u64) {
        if let Self::Embedded { dir, .. } = self {
            if violations == 0 {
                let _ = std::fs::remove_dir_all(&dir);
            } else {
                println!("the embedded store is kept in {}", dir.display());
            }
        }
    }
}

async fn run(settings: &Settings) -> Report {
    let started = Instant::now();
    log::install();
    log::note(&format!("{:?} run starts", settings.topology));
    let (mut rig, store, publisher) = Rig::start(settings).await;
    // One broker, seen through two counters: which kind of relay published is reported.
    let (bus_publisher, standalone_publisher) = (Counting::new(publisher.clone()), Counting::new(publisher));
    // The bus's relay holds half the partitions; the standalone relays may hold any, so one
    // holds the other half and the other stands by for both: a killed standalone relay's
    // partitions are taken over, and both kinds of relay publish under faults.
    // A stream that lost acknowledged messages (a whole cluster SIGKILLed before its
    // servers wrote them) is repaired by the relays themselves, as `republish_lost` does in
    // production; the checker then finds every event once, in order, or counts it.
    let relay = RelayConfig::default().with_partitions(0..32).with_republish_lost(true);
    let config = BusConfig::default().with_relay(relay);
    let bus = EventBus::new(store.clone(), bus_publisher.clone(), config).unwrap();
    // The bus's relay starts with the first commit: one commit before the standalone relays
    // start lets it take its partitions first (a standalone relay would otherwise take
    // them all, and the production path would not publish under faults).
    let warm_up = warm_up(&bus, settings).await;
    let mut relays = Relays::start(store.clone(), standalone_publisher.clone(), 2);

    let mut rng = Rng::derive(settings.seed, 0);
    let aggregates: Vec<Uuid> = (0..settings.aggregates).map(|_| rng.uuid()).collect();
    let load_start = Instant::now();
    let writers = Arc::new(Writers {
        backend: rig.backend(),
        bus: bus.clone(),
        store: store.clone(),
        aggregates: Arc::new(aggregates),
        mix: workload::mix(&settings.skip, rig.backend()),
        deadline: load_start + settings.load,
    });
    let tasks: Vec<_> = (0..settings.writers)
        .map(|i| tokio::spawn(workload::writer(writers.clone(), i, settings.seed)))
        .collect();

    // The faults, on schedule; between them, relays that died on their own are replaced.
    let mut fault_counts = FaultCounts::default();
    let counters = [&*bus_publisher, &*standalone_publisher];
    for (at, fault) in faults::schedule(settings.seed, settings.load, 2, &settings.skip, settings.topology) {
        while Instant::now() < load_start + at {
            relays.reap().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        faults::inject(fault, rig.target(), &mut relays, &counters, &mut fault_counts).await;
    }
    while Instant::now() < writers.deadline {
        relays.reap().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    log::note("the load ends");
    // Writers finish their last commit (each bounded: a hung commit is aborted after 30 s).
    let mut ledger = Ledger { commits: vec![warm_up] };
    // After every fault (the schedule may have put the last ones after the load): the
    // stream still takes a message.
    ledger.commits.push(probe(&bus, settings, 3, "after-faults").await);
    let mut writer_failures = 0;
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(60), task).await {
            Ok(Ok(report)) => ledger.commits.extend(report.commits),
            _ => writer_failures += 1,
        }
    }

    // The final drain: both servers are up; the relays (the bus's and the standalone ones)
    // run until nothing is pending nor held for a lost message, or the backlog stops
    // shrinking. The library's own
    // figure decides when to stop; the checker counts the backlog again, its own way.
    let drain_start = Instant::now();
    let mut best = i64::MAX;
    let mut last_progress = Instant::now();
    loop {
        relays.reap().await;
        // Partitions whose stream lost messages count until they are repaired (a loss is
        // repaired once it has lasted a few seconds).
        let lag = store.relay_lag().await;
        let pending = lag.map_or(i64::MAX, |lag| lag.pending + i64::try_from(lag.lost.len()).unwrap_or(0));
        if pending == 0 {
            break;
        }
        if pending < best {
            best = pending;
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > settings.stall || drain_start.elapsed() > settings.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drained_in = drain_start.elapsed();
    log::note("drained; the relays stop");
    let relays = relays.stop().await;
    let bus_relay_stuck = tokio::time::timeout(Duration::from_secs(10), bus.shutdown()).await.is_err();

    // The independent check.
    let observed = rig.observe(&store).await;
    let mut counts = checker::count(&ledger.commits, &observed);
    counts.panics += relays.panics + writer_failures;
    // Every panic the harness joined went through the hook too; one it did not join (the
    // bus's background relay) only did.
    counts.panics = counts.panics.max(PANICS_SEEN.load(Ordering::Relaxed));
    counts.relays_not_stopped = relays.stuck + u64::from(bus_relay_stuck);
    rig.finish(counts.violations());
    let acked = bus_publisher.acked() + standalone_publisher.acked();
    Report {
        acked_after_loss: fault_counts.acked_at_loss.map(|at| acked.saturating_sub(at)),
        counts,
        faults: fault_counts,
        relay_panic: relays.last_panic.clone(),
        acked_by_bus_relay: bus_publisher.acked(),
        acked_by_standalone_relays: standalone_publisher.acked(),
        acked_in_fast_batches: bus_publisher.acked_fast() + standalone_publisher.acked_fast(),
        drained_in,
        elapsed: started.elapsed(),
    }
}
