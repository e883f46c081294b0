//! The writers: K tasks committing random batches over A shared aggregates through
//! `EventBus::commit`, and the ledger of every event they attempted with the outcome of its
//! commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edupulse_events::{
    BusTransaction, Committed, DomainEvent, EventBus, EventEnvelope, EventError, EventStore,
    ExpectedSequence, Metadata, Uuid,
};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::prng::Rng;

/// The harness's event: an f64 that can be made NaN, a string that can be made huge, and
/// readings that are small as written but huge when a database renders them again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
#[event(context = "harness")]
pub(crate) struct Recorded {
    #[event(aggregate_id)]
    pub(crate) aggregate: Uuid,
    pub(crate) writer: u32,
    pub(crate) commit: u64,
    pub(crate) amount: f64,
    pub(crate) note: String,
    /// Empty but in a few plain commits ([`BIG_NUMBERS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) readings: Vec<f64>,
}

/// The readings of a "big numbers" event: 24 KB as serde_json writes them (`1e300`), 1.2 MB
/// when every number is written out in full (as PostgreSQL's jsonb renders it: 301 digits
/// and a space each), past the broker's 1 MiB. (2 800 of them render to 848 KB only, and
/// pass either way.) A well-formed event: it must be accepted and published.
pub(crate) const BIG_NUMBERS: (f64, usize) = (1e300, 4_000);

/// The share of plain commits, in percent, that carry one big-numbers event.
const BIG_NUMBERS_PERCENT: u64 = 6;

/// How deep the `DeepMetadata` bad input nests its user value: past serde_json's recursion
/// limit (128) with the metadata object and its `user` map around it.
pub(crate) const DEEP_METADATA_ARRAYS: usize = 130;

/// `[[[…1…]]]`, `depth` arrays deep.
fn nested(depth: usize) -> serde_json::Value {
    (0..depth).fold(serde_json::Value::from(1), |inner, _| serde_json::Value::Array(vec![inner]))
}

pub(crate) const AGGREGATE_TYPE: &str = "ledger";

/// A commit longer than this is "stuck": the pool waits 10 s at most for a connection, and
/// nothing but the COMMIT is on the write path (the relays publish), so a healthy commit
/// never comes near it.
const HUNG_AFTER: Duration = Duration::from_secs(30);

/// What a commit's closure does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// Appends at the writer's expected sequence (some parts with `Any`).
    Plain,
    /// Every part with `ExpectedSequence::Any`.
    AnyOnly,
    /// Writes to a table of its own first (the transaction takes its id early), waits, reads
    /// the aggregates' sequences, then appends.
    CallerWritesFirst,
    /// Appends, then returns an error: must roll back.
    ClosureFails,
    /// A failing statement of its own, error ignored, then the append (which PostgreSQL
    /// refuses in the aborted transaction): must end in an error.
    SwallowBefore,
    /// Appends, then a failing statement of its own, error ignored, then returns Ok:
    /// PostgreSQL aborted the transaction, so the commit must end in an error.
    SwallowAfter,
    /// A bad input: must be refused with an error before anything is written.
    Bad(BadInput),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum BadInput {
    /// `traceparent` with `\r\n`: a header injection.
    TraceparentCrlf,
    /// An aggregate type with a newline (it travels as a header).
    AggregateTypeNewline,
    /// A payload over 1 MiB: more than a NATS message may carry.
    Oversized,
    /// An f64 NaN: JSON has no NaN; serde_json writes `null`, which no longer decodes.
    NaN,
    /// A metadata user value nested [`DEEP_METADATA_ARRAYS`] arrays deep: serde_json writes
    /// it but no reader (the store's, `stream_all`, a consumer) can read it back.
    DeepMetadata,
}

impl BadInput {
    pub(crate) const ALL: [Self; 5] =
        [Self::TraceparentCrlf, Self::AggregateTypeNewline, Self::Oversized, Self::NaN, Self::DeepMetadata];

    /// Its name in `TORTURE_SKIP`, for the ones that can be left out alone (`bad-input`
    /// leaves out all of them).
    fn skip_name(self) -> Option<&'static str> {
        match self {
            Self::DeepMetadata => Some("deep-metadata"),
            _ => None,
        }
    }
}

/// The database under the writers: PostgreSQL, or the embedded default's SQLite file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Postgres,
    Sqlite,
}

impl Kind {
    pub(crate) fn is_bad(self) -> bool {
        matches!(self, Self::Bad(_))
    }

    /// Commits of this kind must never commit anything, whatever the outcome says.
    pub(crate) fn must_not_commit(self) -> bool {
        matches!(self, Self::ClosureFails | Self::SwallowBefore | Self::SwallowAfter | Self::Bad(_))
    }
}

/// How a commit ended, as seen by its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    /// An error that says nothing was committed.
    Err,
    /// An error while the servers were being faulted: the COMMIT may or may not have
    /// happened (a connection lost, an I/O error, the server shutting down).
    Ambiguous,
    /// The commit panicked (after COMMIT or before: unknown).
    Panicked,
    /// The commit did not return within [`HUNG_AFTER`] and was aborted.
    Hung,
}

/// One attempted commit and its events.
#[derive(Debug, Clone)]
pub(crate) struct CommitRecord {
    pub(crate) writer: u32,
    pub(crate) kind: Kind,
    pub(crate) outcome: Outcome,
    pub(crate) events: Vec<Uuid>,
    /// Of `events`, the big-numbers ones ([`BIG_NUMBERS`]).
    pub(crate) big_numbers: Vec<Uuid>,
    pub(crate) error: Option<String>,
    /// The error was `EventError::InvalidEvent`: the input itself was refused.
    pub(crate) invalid: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pub(crate) commits: Vec<CommitRecord>,
}

/// The closure's error: the library's, or the one a `ClosureFails` commit returns on purpose.
#[derive(Debug)]
enum CommitError {
    Event(EventError),
    Intended,
}

impl From<EventError> for CommitError {
    fn from(e: EventError) -> Self {
        Self::Event(e)
    }
}

/// Is `e` an error after which the COMMIT may have happened? Connection and I/O errors,
/// and PostgreSQL's "connection exception" (08) and "operator intervention" (57: the
/// server shutting down) classes. Everything else is an answer from a live server (SQLite's
/// codes are numbers of another kind, and its file never goes away under the run).
fn is_ambiguous(e: &EventError, backend: Backend) -> bool {
    match e {
        EventError::Database(db) => match db {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(d) => {
                backend == Backend::Postgres
                    && d.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57"))
            }
            _ => false,
        },
        _ => false,
    }
}

/// How a part's expected sequence is chosen.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// The writer's cached sequence for the aggregate.
    Cached,
    Any,
    /// Read with `current_sequence` inside the closure, right before the append.
    Fresh,
}

struct Part {
    aggregate: Uuid,
    expect: Expect,
    envelopes: Vec<EventEnvelope<Recorded>>,
}

struct Plan {
    kind: Kind,
    parts: Vec<Part>,
    /// The big-numbers events among the parts'.
    big_numbers: Vec<Uuid>,
    /// Pause inside the transaction before each part after the first, and after the
    /// caller's own write: widens the windows in which other transactions commit.
    pause: Duration,
}

pub(crate) struct Writers {
    pub(crate) backend: Backend,
    pub(crate) bus: EventBus,
    pub(crate) store: EventStore,
    pub(crate) aggregates: Arc<Vec<Uuid>>,
    pub(crate) mix: Mix,
    pub(crate) deadline: Instant,
}

/// What one writer did.
#[derive(Debug, Default)]
pub(crate) struct WriterReport {
    pub(crate) commits: Vec<CommitRecord>,
}

fn event(rng: &mut Rng, aggregate: Uuid, writer: u32, commit: u64) -> Recorded {
    // Cents as f64: a finite, ordinary value the checker can verify.
    let amount = rng.between(0, 1_000_000) as f64 / 100.0;
    Recorded { aggregate, writer, commit, amount, note: format!("w{writer}-c{commit}"), readings: Vec::new() }
}

fn envelopes(
    rng: &mut Rng,
    aggregate: Uuid,
    writer: u32,
    commit: u64,
    n: u64,
) -> Vec<EventEnvelope<Recorded>> {
    (0..n)
        .map(|_| EventEnvelope::new(AGGREGATE_TYPE, aggregate, event(rng, aggregate, writer, commit)))
        .collect()
}

/// The kinds of commit by name, with their weights: ordinary commits most often, the
/// special kinds often enough that a 40 s run has hundreds of each.
pub(crate) const KINDS: [(&str, u64); 7] = [
    ("plain", 45),
    ("any", 10),
    ("caller-writes-first", 15),
    ("closure-fails", 8),
    ("swallow-before", 4),
    ("swallow-after", 8),
    ("bad-input", 10),
];

/// The mix of commits: the weights of [`KINDS`], whether plain and caller-first commits
/// append some aggregates with `Any`, which bad inputs are drawn, and whether a few plain
/// commits carry a big-numbers event.
#[derive(Debug, Clone)]
pub(crate) struct Mix {
    pub(crate) weights: [u64; 7],
    pub(crate) any_parts: bool,
    pub(crate) bad_inputs: Vec<BadInput>,
    pub(crate) big_numbers: bool,
}

/// The kinds that never run on `backend`. On SQLite a failed statement undoes itself and
/// nothing else: the transaction goes on and commits, so `swallow-before` and
/// `swallow-after` (which must end in an error because PostgreSQL aborts the whole
/// transaction) expect what SQLite rightly does not do.
pub(crate) fn never_on(backend: Backend) -> &'static [&'static str] {
    match backend {
        Backend::Postgres => &[],
        Backend::Sqlite => &["swallow-before", "swallow-after"],
    }
}

/// The mix without what `skip` names: kinds of [`KINDS`], `any-parts`, `deep-metadata`
/// (one of the bad inputs) and `big-numbers` (to isolate a finding); and without the kinds
/// that never run on `backend`. The other weights stay as they are.
pub(crate) fn mix(skip: &[String], backend: Backend) -> Mix {
    let skipped = |name: &str| skip.iter().any(|s| s == name) || never_on(backend).contains(&name);
    let bad_inputs: Vec<BadInput> =
        BadInput::ALL.into_iter().filter(|b| !b.skip_name().is_some_and(skipped)).collect();
    Mix {
        weights: KINDS.map(|(name, weight)| {
            let none = name == "bad-input" && bad_inputs.is_empty();
            if skipped(name) || none { 0 } else { weight }
        }),
        any_parts: !skipped("any-parts"),
        bad_inputs,
        big_numbers: !skipped("big-numbers"),
    }
}

/// Chooses the next commit.
fn plan(rng: &mut Rng, mix: &Mix, aggregates: &[Uuid], writer: u32, commit: u64) -> Plan {
    let any_parts = mix.any_parts;
    let kind = match rng.weighted(&mix.weights) {
        0 => Kind::Plain,
        1 => Kind::AnyOnly,
        2 => Kind::CallerWritesFirst,
        3 => Kind::ClosureFails,
        4 => Kind::SwallowBefore,
        5 => Kind::SwallowAfter,
        _ => Kind::Bad(mix.bad_inputs[rng.below(mix.bad_inputs.len() as u64) as usize]),
    };
    let pause = if rng.percent(30) { Duration::from_millis(rng.between(1, 15)) } else { Duration::ZERO };
    if let Kind::Bad(bad) = kind {
        return bad_plan(rng, bad, writer, commit, pause);
    }
    let count = rng.between(1, 3) as usize;
    let mut chosen: Vec<Uuid> = Vec::with_capacity(count);
    while chosen.len() < count {
        let candidate = aggregates[rng.below(aggregates.len() as u64) as usize];
        if !chosen.contains(&candidate) {
            chosen.push(candidate);
        }
    }
    let mut parts: Vec<Part> = chosen
        .into_iter()
        .map(|aggregate| {
            let expect = match kind {
                Kind::AnyOnly => Expect::Any,
                Kind::CallerWritesFirst if any_parts && rng.percent(30) => Expect::Any,
                Kind::CallerWritesFirst => Expect::Fresh,
                _ if any_parts && rng.percent(15) => Expect::Any,
                _ => Expect::Cached,
            };
            let n = rng.between(1, 5);
            Part { aggregate, expect, envelopes: envelopes(rng, aggregate, writer, commit, n) }
        })
        .collect();
    // A few plain commits carry one big-numbers event: drawn whether or not the mix has
    // them, so that leaving them out changes no other choice of the seed.
    let mut big_numbers = Vec::new();
    if kind == Kind::Plain && rng.percent(BIG_NUMBERS_PERCENT) && mix.big_numbers {
        let (value, count) = BIG_NUMBERS;
        let envelope = &mut parts[0].envelopes[0];
        envelope.event.readings = vec![value; count];
        big_numbers.push(envelope.event_id);
    }
    Plan { kind, parts, big_numbers, pause }
}

/// A bad input goes to fresh aggregates, after good events of another fresh aggregate in
/// the same transaction: all of it must be refused, and an accepted one must not block
/// the shared aggregates behind it.
fn bad_plan(rng: &mut Rng, bad: BadInput, writer: u32, commit: u64, pause: Duration) -> Plan {
    let good = rng.uuid();
    let target = rng.uuid();
    let good_events = rng.between(1, 2);
    let first = Part {
        aggregate: good,
        expect: Expect::Cached,
        envelopes: envelopes(rng, good, writer, commit, good_events),
    };
    let mut bad_event = event(rng, target, writer, commit);
    let mut aggregate_type = AGGREGATE_TYPE.to_owned();
    let mut metadata = Metadata::default();
    match bad {
        BadInput::TraceparentCrlf => {
            metadata.traceparent =
                Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\nX-Injected: 1".into());
        }
        BadInput::AggregateTypeNewline => aggregate_type = format!("{AGGREGATE_TYPE}\nX-Injected: 1"),
        BadInput::Oversized => bad_event.note = "x".repeat(1_100_000),
        BadInput::NaN => bad_event.amount = f64::NAN,
        BadInput::DeepMetadata => metadata = metadata.with("deep", nested(DEEP_METADATA_ARRAYS)),
    }
    let leading = rng.below(2);
    let mut second = envelopes(rng, target, writer, commit, leading);
    // One append, one aggregate type: the good events before the bad one share it, so that
    // the append is refused for the newline and not for mixing types.
    for envelope in &mut second {
        envelope.aggregate_type.clone_from(&aggregate_type);
    }
    second.push(EventEnvelope::new(aggregate_type, target, bad_event).with_metadata(metadata));
    Plan {
        kind: Kind::Bad(bad),
        parts: vec![first, Part { aggregate: target, expect: Expect::Cached, envelopes: second }],
        big_numbers: Vec::new(),
        pause,
    }
}

/// Runs one planned commit through the bus. Returns the last sequence of each aggregate
/// as the bus reported it.
async fn execute(
    backend: Backend,
    bus: &EventBus,
    store: &EventStore,
    plan: Plan,
    cached: &HashMap<Uuid, i64>,
    writer: u32,
) -> Result<Vec<(Uuid, i64)>, CommitError> {
    let Plan { kind, parts, pause, .. } = plan;
    // Each part with the sequence its aggregate is believed to be at (fresh aggregates,
    // the bad inputs', are not in the cache: they start at 0).
    let parts: Vec<(Part, i64)> = parts
        .into_iter()
        .map(|p| {
            let at = cached.get(&p.aggregate).copied().unwrap_or(0);
            (p, at)
        })
        .collect();
    let store = store.clone();
    bus.commit(async move |tx: &mut BusTransaction| {
        if kind == Kind::SwallowBefore {
            swallow_failed_statement(tx, backend).await;
        }
        if kind == Kind::CallerWritesFirst {
            let writer = i32::try_from(writer).unwrap_or(i32::MAX);
            match backend {
                Backend::Postgres => {
                    sqlx::query("INSERT INTO harness_own.caller_writes (writer) VALUES ($1)")
                        .bind(writer)
                        .execute(crate::common::pg(tx.connection()))
                        .await
                        .map_err(EventError::from)?;
                }
                // The caller's table in the store's own database file: the same transaction.
                Backend::Sqlite => {
                    sqlx::query("INSERT INTO harness_caller_writes (writer) VALUES (?1)")
                        .bind(writer)
                        .execute(crate::common::sqlite(tx.connection()))
                        .await
                        .map_err(EventError::from)?;
                }
            }
            tokio::time::sleep(pause).await;
        }
        let mut last = Vec::with_capacity(parts.len());
        for (i, (Part { aggregate, expect, envelopes }, cached)) in parts.into_iter().enumerate() {
            if i > 0 && !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let expected = match expect {
                Expect::Any => ExpectedSequence::Any,
                Expect::Cached => ExpectedSequence::Exactly(cached),
                Expect::Fresh => ExpectedSequence::Exactly(store.current_sequence(aggregate).await?),
            };
            let stored = tx.append_envelopes(expected, envelopes).await?;
            last.push((aggregate, stored.last().map_or(0, |e| e.sequence)));
        }
        match kind {
            Kind::ClosureFails => Err(CommitError::Intended),
            Kind::SwallowAfter => {
                swallow_failed_statement(tx, backend).await;
                Ok(last)
            }
            _ => Ok(last),
        }
    })
    .await
    // The relays publish; the checker looks for the events in the stream after the drain.
    .map(Committed::into_value)
}

/// A statement of the caller's that fails (a duplicate key), its error ignored: the
/// transaction is aborted on the server, whatever the closure returns. PostgreSQL only (see
/// [`never_on`]).
async fn swallow_failed_statement(tx: &mut BusTransaction, backend: Backend) {
    assert_eq!(backend, Backend::Postgres, "a swallowed failed statement aborts nothing on SQLite");
    let conn = crate::common::pg(tx.connection());
    let _ignored = sqlx::query("INSERT INTO harness_own.once (key) VALUES ('taken')").execute(conn).await;
}

/// One writer: commits until the deadline, recording every attempt.
pub(crate) async fn writer(writers: Arc<Writers>, index: u32, seed: u64) -> WriterReport {
    let mut rng = Rng::derive(seed, 1000 + u64::from(index));
    let mut report = WriterReport::default();
    // The sequence each aggregate is believed to be at; dropped after any failure and
    // re-read with `current_sequence` before the next use.
    let mut cached: HashMap<Uuid, i64> = HashMap::new();
    let mut commit = 0u64;
    while Instant::now() < writers.deadline {
        commit += 1;
        let plan = plan(&mut rng, &writers.mix, &writers.aggregates, index, commit);
        let kind = plan.kind;
        let touched: Vec<Uuid> = plan.parts.iter().map(|p| p.aggregate).collect();
        let mut refreshed = true;
        for (aggregate, part) in touched.iter().zip(&plan.parts) {
            if matches!(part.expect, Expect::Cached) && !kind.is_bad() && !cached.contains_key(aggregate) {
                match writers.store.current_sequence(*aggregate).await {
                    Ok(sequence) => {
                        cached.insert(*aggregate, sequence);
                    }
                    Err(_) => refreshed = false,
                }
            }
        }
        if !refreshed {
            // PostgreSQL is restarting: try again shortly (the attempt was not made).
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let events: Vec<Uuid> =
            plan.parts.iter().flat_map(|p| p.envelopes.iter().map(|e| e.event_id)).collect();
        let big_numbers = plan.big_numbers.clone();
        let (bus, store, snapshot) = (writers.bus.clone(), writers.store.clone(), cached.clone());
        let backend = writers.backend;
        // Each commit in a task of its own: a panic inside the library is caught and counted
        // instead of ending the writer; a commit that never returns is aborted and counted.
        let mut task =
            tokio::spawn(async move { execute(backend, &bus, &store, plan, &snapshot, index).await });
        let mut invalid = false;
        let (outcome, error, sequences) = match tokio::time::timeout(HUNG_AFTER, &mut task).await {
            Err(_) => {
                task.abort();
                let _ = task.await;
                (Outcome::Hung, Some(format!("no answer within {HUNG_AFTER:?}")), None)
            }
            Ok(Err(join)) if join.is_panic() => {
                (Outcome::Panicked, Some(panic_text(join.into_panic())), None)
            }
            Ok(Err(join)) => (Outcome::Panicked, Some(join.to_string()), None),
            Ok(Ok(Ok(sequences))) => (Outcome::Ok, None, Some(sequences)),
            Ok(Ok(Err(CommitError::Intended))) => {
                (Outcome::Err, Some("the closure failed on purpose".into()), None)
            }
            Ok(Ok(Err(CommitError::Event(e)))) => {
                invalid = matches!(e, EventError::InvalidEvent { .. });
                let outcome = if is_ambiguous(&e, backend) { Outcome::Ambiguous } else { Outcome::Err };
                (outcome, Some(e.to_string()), None)
            }
        };
        match sequences {
            Some(sequences) if !kind.is_bad() => cached.extend(sequences),
            _ => {
                for aggregate in &touched {
                    cached.remove(aggregate);
                }
            }
        }
        report.commits.push(CommitRecord {
            writer: index,
            kind,
            outcome,
            events,
            big_numbers,
            error,
            invalid,
        });
        // A short, seeded think time: keeps 6 writers from saturating a 2-core machine.
        tokio::time::sleep(Duration::from_micros(rng.between(0, 3000))).await;
    }
    report
}

fn panic_text(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(payload) => {
            payload.downcast::<&'static str>().map_or_else(|_| "a panic".into(), |s| (*s).to_owned())
        }
    }
}
