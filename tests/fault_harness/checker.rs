//! The independent checker. It trusts neither the library nor the writers' view of what
//! happened:
//!
//! - the store is read with plain SQL on a connection of its own (the ground truth for
//!   "committed"); what is still to publish is counted there too, from the relay's
//!   checkpoint table and the parked events table, never through `relay_lag`;
//! - JetStream is read with plain async-nats, message by message, using only the headers
//!   (`Nats-Msg-Id`, `Edupulse-Aggregate-Id`, `Edupulse-Sequence`) and the body as a
//!   `serde_json::Value`, never the library's decoder;
//! - the embedded default's SQLite file is read with plain SQL on a read-only pool of its
//!   own ([`read_sqlite_store`]), and its in-process broker's stored messages the same way
//!   as JetStream's ([`read_broker`]);
//! - payloads are parsed with plain serde_json into the harness's event type, metadata into
//!   a `serde_json::Value`, and a message's payload must equal its stored row's;
//! - only `stream_all` is read through the library, because it is one of the things checked.
//!
//! [`count`] is pure: it takes what was read and the writers' ledger, and counts every kind
//! of violation, so it is tested on its own below with made-up observations.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use edupulse_events::{EventStore, StreamPosition, Uuid};
use futures_util::StreamExt;
use sqlx::Row;

use crate::workload::{BIG_NUMBERS, BadInput, CommitRecord, DEEP_METADATA_ARRAYS, Kind, Outcome, Recorded};

/// One row of the events table, as plain SQL returns it.
#[derive(Debug, Clone)]
pub(crate) struct StoreRow {
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_id: Uuid,
    pub(crate) sequence: i64,
    pub(crate) transaction_id: i64,
    pub(crate) global_position: i64,
    pub(crate) payload: String,
    pub(crate) metadata: String,
}

/// One message of the JetStream stream: headers and body, uninterpreted.
#[derive(Debug, Clone, Default)]
pub(crate) struct StreamMsg {
    pub(crate) stream_sequence: u64,
    pub(crate) msg_id: Option<String>,
    pub(crate) aggregate_id: Option<String>,
    pub(crate) sequence: Option<String>,
    pub(crate) body: Option<serde_json::Value>,
    /// When the stream stored it (Unix nanoseconds; 0 when unknown).
    pub(crate) stored_at_ns: i128,
    /// It came in an atomic batch (the stream keeps its `Nats-Batch-Id`).
    pub(crate) in_batch: bool,
}

/// One item of `stream_all`: the position, and the event when it decoded.
#[derive(Debug, Clone)]
pub(crate) struct AllItem {
    pub(crate) global_position: i64,
    /// `(event id, aggregate id, sequence)`; `None` for an undecodable row.
    pub(crate) event: Option<(Uuid, Uuid, i64)>,
}

#[derive(Debug, Default)]
pub(crate) struct Observed {
    pub(crate) store: Vec<StoreRow>,
    pub(crate) stream: Vec<StreamMsg>,
    /// Sequences of the JetStream stream that could not be read.
    pub(crate) stream_unreadable: u64,
    pub(crate) stream_all: Vec<AllItem>,
    /// `stream_all` items that were errors without a position (a failed page read).
    pub(crate) stream_all_errors: u64,
    /// What the log still holds for the broker, counted by [`read_store`].
    pub(crate) backlog: Backlog,
}

/// What is left to publish, counted with plain SQL on the store's tables.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backlog {
    /// Events past their partition's relay checkpoint (or in a partition without one), to
    /// publish, and not parked: what a relay has yet to publish.
    pub(crate) pending: i64,
    /// Rows of `parked_events`: refused by the broker, or waiting behind one that was.
    pub(crate) parked: i64,
    /// Events stored without a subject: no relay ever publishes them.
    pub(crate) without_subject: i64,
}

/// The rule for "still to publish", written here from the schema rather than taken from
/// the library: an event with a subject, past the `(transaction id, position)` checkpoint
/// of its partition, and not parked.
const PENDING_SQL: &str = "SELECT count(*) FROM {schema}.events e \
     LEFT JOIN {schema}.relay_checkpoints c ON c.partition = e.partition \
     WHERE e.subject IS NOT NULL \
       AND (c.partition IS NULL \
            OR (e.transaction_id, e.global_position) > (c.transaction_id, c.global_position)) \
       AND NOT EXISTS (SELECT 1 FROM {schema}.parked_events p WHERE p.global_position = e.global_position)";

/// Reads the store with plain SQL on a pool of its own: every event, and the backlog.
pub(crate) async fn read_store(url: &str, schema: &str) -> (Vec<StoreRow>, Backlog) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(30))
        .connect(url)
        .await
        .expect("the checker connects to PostgreSQL");
    // The schema name is the harness's own constant, not input.
    let events = format!(
        "SELECT event_id, aggregate_id, sequence, transaction_id, global_position, payload::text AS payload, \
             metadata::text AS metadata \
         FROM {schema}.events ORDER BY global_position"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(events)).fetch_all(&pool).await.expect("read the events");
    let rows = rows.iter().map(store_row).collect();
    let count_of = async |sql: String, what: &str| -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("the checker counts {what}: {e}"))
    };
    let backlog = Backlog {
        pending: count_of(PENDING_SQL.replace("{schema}", schema), "the pending events").await,
        parked: count_of(format!("SELECT count(*) FROM {schema}.parked_events"), "the parked events").await,
        without_subject: count_of(
            format!("SELECT count(*) FROM {schema}.events WHERE subject IS NULL"),
            "the events without a subject",
        )
        .await,
    };
    pool.close().await;
    (rows, backlog)
}

/// A row of the events table, on either backend (SQLite's `transaction_id` is the position).
fn store_row<R: Row>(r: &R) -> StoreRow
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    Uuid: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    i64: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    String: for<'a> sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    StoreRow {
        event_id: r.get("event_id"),
        aggregate_id: r.get("aggregate_id"),
        sequence: r.get("sequence"),
        transaction_id: r.get("transaction_id"),
        global_position: r.get("global_position"),
        payload: r.get("payload"),
        metadata: r.get("metadata"),
    }
}

/// The embedded store's rule for "still to publish", as [`PENDING_SQL`]: positions follow
/// commit order on SQLite, so a checkpoint is a position.
const SQLITE_PENDING_SQL: &str = "SELECT count(*) FROM events e \
     LEFT JOIN relay_checkpoints c ON c.partition = e.partition \
     WHERE e.subject IS NOT NULL \
       AND (c.partition IS NULL OR e.global_position > c.global_position) \
       AND NOT EXISTS (SELECT 1 FROM parked_events p WHERE p.global_position = e.global_position)";

/// Reads the embedded store's SQLite file with plain SQL on a read-only pool of its own:
/// every event, and the backlog, as [`read_store`] reads PostgreSQL.
pub(crate) async fn read_sqlite_store(path: &std::path::Path) -> (Vec<StoreRow>, Backlog) {
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .busy_timeout(Duration::from_secs(30));
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .expect("the checker opens the SQLite file");
    let rows = sqlx::query(
        "SELECT event_id, aggregate_id, sequence, global_position AS transaction_id, global_position, payload, \
             metadata FROM events ORDER BY global_position",
    )
    .fetch_all(&pool)
    .await
    .expect("read the events");
    let rows = rows.iter().map(store_row).collect();
    let count_of = async |sql: &str, what: &str| -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("the checker counts {what}: {e}"))
    };
    let backlog = Backlog {
        pending: count_of(SQLITE_PENDING_SQL, "the pending events").await,
        parked: count_of("SELECT count(*) FROM parked_events", "the parked events").await,
        without_subject: count_of(
            "SELECT count(*) FROM events WHERE subject IS NULL",
            "the events without a subject",
        )
        .await,
    };
    pool.close().await;
    (rows, backlog)
}

/// Every message the in-process broker stored, read as [`read_stream`] reads JetStream's:
/// headers and body, uninterpreted. The broker keeps them all in memory: none is unreadable.
pub(crate) fn read_broker(broker: &edupulse_events::InMemoryBroker) -> (Vec<StreamMsg>, u64) {
    let messages = broker
        .messages()
        .into_iter()
        .map(|m| StreamMsg {
            stream_sequence: m.sequence,
            msg_id: m.header("Nats-Msg-Id").map(str::to_owned),
            aggregate_id: m.header("Edupulse-Aggregate-Id").map(str::to_owned),
            sequence: m.header("Edupulse-Sequence").map(str::to_owned),
            body: serde_json::from_slice(&m.body).ok(),
            stored_at_ns: 0,
            in_batch: false,
        })
        .collect();
    (messages, 0)
}

/// Reads every message of the stream with plain async-nats: `(messages, unreadable)`.
pub(crate) async fn read_stream(url: &str, stream_name: &str) -> (Vec<StreamMsg>, u64) {
    let client = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(10))
        .connect(url.split(',').collect::<Vec<_>>().as_slice())
        .await
        .expect("the checker connects to NATS");
    let js = async_nats::jetstream::new(client);
    // A cluster may still be electing the stream's leader after its last restart.
    let mut tries = 0;
    let (stream, state) = loop {
        tries += 1;
        let found = match js.get_stream(stream_name).await {
            Ok(mut stream) => stream
                .info()
                .await
                .map(|info| info.state.clone())
                .map(|state| (stream, state))
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match found {
            Ok(found) => break found,
            Err(e) if tries >= 30 => panic!("the checker cannot read the stream for 60 s: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_secs(2)).await,
        }
    };
    if state.messages == 0 {
        return (Vec::new(), 0);
    }
    let stream = &stream;
    let reads = futures_util::stream::iter(state.first_sequence..=state.last_sequence)
        .map(|seq| async move {
            for _ in 0..5 {
                match tokio::time::timeout(Duration::from_secs(5), stream.get_raw_message(seq)).await {
                    Ok(Ok(message)) => return Some(message),
                    _ => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            None
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await;
    let mut unreadable = 0;
    let mut out = Vec::with_capacity(reads.len());
    for (seq, message) in (state.first_sequence..).zip(reads) {
        let Some(message) = message else {
            unreadable += 1;
            continue;
        };
        let header = |name: &str| message.headers.get(name).map(|v| v.as_str().to_owned());
        out.push(StreamMsg {
            stream_sequence: seq,
            msg_id: header("Nats-Msg-Id"),
            aggregate_id: header("Edupulse-Aggregate-Id"),
            sequence: header("Edupulse-Sequence"),
            body: serde_json::from_slice(&message.payload).ok(),
            stored_at_ns: message.time.unix_timestamp_nanos(),
            in_batch: message.headers.get("Nats-Batch-Id").is_some(),
        });
    }
    (out, unreadable)
}

/// Reads `stream_all` through the library, to its end: `(items, errors without a position)`.
pub(crate) async fn read_stream_all(store: &EventStore) -> (Vec<AllItem>, u64) {
    let mut items = Vec::new();
    let mut errors = 0;
    let mut all = store.stream_all::<Recorded>(StreamPosition::START);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(item)) = tokio::time::timeout_at(deadline, all.next()).await {
        match item {
            Ok(envelope) => items.push(AllItem {
                global_position: envelope.global_position.unwrap_or(-1),
                event: Some((envelope.event_id, envelope.aggregate_id, envelope.sequence)),
            }),
            Err(e) => match e.position() {
                Some(global_position) => items.push(AllItem { global_position, event: None }),
                None => {
                    // A failed page read; the stream retries it on the next poll.
                    errors += 1;
                    if errors > 20 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            },
        }
    }
    (items, errors)
}

/// Every figure of a run. The ones named in [`Counts::violations`] must be zero.
#[derive(Debug, Default, Clone)]
pub(crate) struct Counts {
    pub(crate) commits_attempted: u64,
    pub(crate) commits_ok: u64,
    pub(crate) commits_err: u64,
    pub(crate) commits_ambiguous: u64,
    pub(crate) commits_by_kind: BTreeMap<String, u64>,
    pub(crate) events_attempted: u64,
    pub(crate) events_committed: u64,
    pub(crate) events_published: u64,
    pub(crate) stream_messages: u64,
    /// Of those, stored by atomic batches.
    pub(crate) stream_batched: u64,
    /// Big-numbers events (small as written, over 1 MiB re-rendered): attempted, in the
    /// store, in the stream.
    pub(crate) big_numbers_attempted: u64,
    pub(crate) big_numbers_committed: u64,
    pub(crate) big_numbers_published: u64,
    /// Bad-input commits, and those refused with `EventError::InvalidEvent` (the others
    /// ended on another error first, as a fault).
    pub(crate) bad_inputs_attempted: u64,
    pub(crate) bad_inputs_refused_as_invalid: u64,

    pub(crate) committed_unpublished: u64,
    /// Of those, events of bad-input commits (which should never have been stored).
    pub(crate) committed_unpublished_bad: u64,
    pub(crate) published_uncommitted: u64,
    pub(crate) acked_not_stored: u64,
    pub(crate) refused_but_stored: u64,
    pub(crate) stored_never_attempted: u64,
    pub(crate) must_fail_returned_ok: u64,
    pub(crate) bad_inputs_accepted: u64,
    pub(crate) bad_inputs_accepted_by_kind: BTreeMap<String, u64>,
    /// Commits of well-formed events refused with `EventError::InvalidEvent`.
    pub(crate) good_inputs_refused: u64,
    pub(crate) stream_duplicates: u64,
    pub(crate) stream_order_violations: u64,
    pub(crate) stream_disagrees_with_store: u64,
    pub(crate) stream_unreadable: u64,
    pub(crate) stream_all_order_violations: u64,
    pub(crate) stream_all_mismatches: u64,
    pub(crate) store_gaps: u64,
    pub(crate) undecodable_rows: u64,
    pub(crate) backlog: Backlog,
    pub(crate) panics: u64,
    pub(crate) hung_commits: u64,
    /// Relays (the standalone ones and the bus's) that did not stop within 10 s of being
    /// asked; filled in by the harness, which stops them.
    pub(crate) relays_not_stopped: u64,

    /// A few examples of each violation, to start debugging from.
    pub(crate) examples: BTreeMap<&'static str, Vec<String>>,
}

impl Counts {
    /// The violation rows: `(name, count)`.
    pub(crate) fn violation_rows(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("committed but never published (stuck or lost)", self.committed_unpublished),
            ("published but never committed (phantom)", self.published_uncommitted),
            ("acknowledged (Ok) but not in the store (lost commit)", self.acked_not_stored),
            ("refused or rolled back, but in the store", self.refused_but_stored),
            ("in the store but never attempted", self.stored_never_attempted),
            ("commits that had to fail but returned Ok", self.must_fail_returned_ok),
            ("bad inputs accepted (commits with anything stored or published)", self.bad_inputs_accepted),
            ("well-formed inputs refused as invalid (InvalidEvent)", self.good_inputs_refused),
            ("duplicates in the stream (same Nats-Msg-Id)", self.stream_duplicates),
            ("per-aggregate order violations in the stream", self.stream_order_violations),
            ("stream messages disagreeing with the store", self.stream_disagrees_with_store),
            ("stream sequences unreadable", self.stream_unreadable),
            ("per-aggregate order violations in stream_all", self.stream_all_order_violations),
            ("stream_all not exactly the store's events", self.stream_all_mismatches),
            ("aggregates whose sequences are not 1..n", self.store_gaps),
            ("undecodable rows", self.undecodable_rows),
            (
                "events pending after the final drain (past their relay checkpoint)",
                figure(self.backlog.pending),
            ),
            ("events parked (nothing here is refused by the broker)", figure(self.backlog.parked)),
            ("events stored without a subject (never published)", figure(self.backlog.without_subject)),
            ("panics (commits and relays)", self.panics),
            ("commits hung (no answer in 30 s)", self.hung_commits),
            ("relays not stopped within 10 s of being asked", self.relays_not_stopped),
        ]
    }

    pub(crate) fn violations(&self) -> u64 {
        self.violation_rows().iter().map(|(_, n)| n).sum()
    }

    fn example(&mut self, what: &'static str, text: impl FnOnce() -> String) {
        let list = self.examples.entry(what).or_default();
        if list.len() < 3 {
            list.push(text());
        }
    }

    /// The figures as a Markdown table, violations marked.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| figure | count |\n| --- | ---: |");
        let figures = [
            ("commits attempted", self.commits_attempted),
            ("commits Ok", self.commits_ok),
            ("commits Err (definite)", self.commits_err),
            ("commits ambiguous (error during a fault)", self.commits_ambiguous),
            ("events attempted", self.events_attempted),
            ("events committed (store)", self.events_committed),
            ("events published (distinct ids in the stream)", self.events_published),
            ("messages in the stream", self.stream_messages),
            ("of which stored by atomic batches", self.stream_batched),
            ("big-numbers events attempted (24 KB written, 1.2 MB re-rendered)", self.big_numbers_attempted),
            ("big-numbers events committed (store)", self.big_numbers_committed),
            ("big-numbers events published", self.big_numbers_published),
            ("bad-input commits", self.bad_inputs_attempted),
            ("bad-input commits refused with InvalidEvent", self.bad_inputs_refused_as_invalid),
        ];
        for (name, n) in figures {
            let _ = writeln!(out, "| {name} | {n} |");
        }
        for (name, n) in self.violation_rows() {
            let mark = if n > 0 { " **✗**" } else { "" };
            let _ = writeln!(out, "| {name} | {n}{mark} |");
        }
        out.push('\n');
        if self.committed_unpublished > 0 {
            let _ = writeln!(
                out,
                "committed but never published: {} of bad-input commits, {} of the others",
                self.committed_unpublished_bad,
                self.committed_unpublished - self.committed_unpublished_bad
            );
        }
        if self.bad_inputs_accepted > 0 {
            let by_kind: Vec<String> =
                self.bad_inputs_accepted_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(out, "bad inputs accepted by kind: {}", by_kind.join(", "));
        }
        let kinds: Vec<String> = self.commits_by_kind.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(out, "commits by kind: {}", kinds.join(", "));
        for (what, examples) in &self.examples {
            let _ = writeln!(out, "e.g. {what}:");
            for e in examples {
                let _ = writeln!(out, "    {e}");
            }
        }
        out
    }
}

pub(crate) fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::Bad(bad) => format!("bad input: {}", bad_name(bad)),
        other => format!("{other:?}"),
    }
}

fn bad_name(bad: BadInput) -> &'static str {
    match bad {
        BadInput::TraceparentCrlf => "traceparent with CRLF",
        BadInput::AggregateTypeNewline => "aggregate type with a newline",
        BadInput::Oversized => "payload over 1 MiB",
        BadInput::NaN => "f64 NaN",
        BadInput::DeepMetadata => "metadata nested past the readers' limit",
    }
}

/// Counts every kind of violation in what was read, against the writers' ledger.
pub(crate) fn count(ledger: &[CommitRecord], observed: &Observed) -> Counts {
    let mut c = Counts::default();
    let by_id: HashMap<Uuid, &StoreRow> = observed.store.iter().map(|r| (r.event_id, r)).collect();
    let by_position: HashMap<i64, &StoreRow> =
        observed.store.iter().map(|r| (r.global_position, r)).collect();
    let mut attempted: HashMap<Uuid, &CommitRecord> = HashMap::new();

    // The stream: distinct ids, duplicates.
    let mut published: HashMap<String, &StreamMsg> = HashMap::new();
    for m in &observed.stream {
        match &m.msg_id {
            Some(id) => {
                if let Some(first) = published.get(id) {
                    c.stream_duplicates += 1;
                    c.example("duplicates in the stream", || {
                        let apart = (m.stored_at_ns - first.stored_at_ns) as f64 / 1e9;
                        format!(
                            "{id} at stream sequence {}, first stored at {} ({apart:.1} s earlier)",
                            m.stream_sequence, first.stream_sequence
                        )
                    });
                } else {
                    published.insert(id.clone(), m);
                }
            }
            None => {
                c.stream_disagrees_with_store += 1;
                c.example("stream disagrees", || {
                    format!("stream sequence {} has no Nats-Msg-Id", m.stream_sequence)
                });
            }
        }
    }
    c.stream_messages = observed.stream.len() as u64;
    c.stream_batched = observed.stream.iter().filter(|m| m.in_batch).count() as u64;
    c.events_published = published.len() as u64;
    c.stream_unreadable = observed.stream_unreadable;

    // The ledger against the store and the stream.
    for commit in ledger {
        c.commits_attempted += 1;
        *c.commits_by_kind.entry(kind_name(commit.kind)).or_default() += 1;
        match commit.outcome {
            Outcome::Ok => c.commits_ok += 1,
            Outcome::Err => c.commits_err += 1,
            Outcome::Ambiguous => c.commits_ambiguous += 1,
            Outcome::Panicked => {
                c.commits_ambiguous += 1;
                c.panics += 1;
                c.example("panics", || {
                    format!("{:?} commit: {}", commit.kind, commit.error.as_deref().unwrap_or(""))
                });
            }
            Outcome::Hung => {
                c.commits_ambiguous += 1;
                c.hung_commits += 1;
            }
        }
        if commit.kind.is_bad() {
            c.bad_inputs_attempted += 1;
            c.bad_inputs_refused_as_invalid += u64::from(commit.invalid);
        } else if commit.invalid {
            c.good_inputs_refused += 1;
            c.example("well-formed, refused as invalid", || {
                let big = if commit.big_numbers.is_empty() { "" } else { " (with big numbers)" };
                format!("{:?} commit{big}: {}", commit.kind, commit.error.as_deref().unwrap_or(""))
            });
        }
        for id in &commit.big_numbers {
            c.big_numbers_attempted += 1;
            c.big_numbers_committed += u64::from(by_id.contains_key(id));
            c.big_numbers_published += u64::from(published.contains_key(&id.to_string()));
        }
        if commit.kind.must_not_commit() && commit.outcome == Outcome::Ok {
            c.must_fail_returned_ok += 1;
            c.example("must fail, returned Ok", || kind_name(commit.kind));
        }
        let mut accepted = false;
        for id in &commit.events {
            c.events_attempted += 1;
            attempted.insert(*id, commit);
            let stored = by_id.contains_key(id);
            accepted |= stored || published.contains_key(&id.to_string());
            if commit.kind.is_bad() {
                continue;
            }
            if commit.outcome == Outcome::Ok && !stored {
                c.acked_not_stored += 1;
                c.example("acknowledged, not stored", || {
                    format!("{id} of a {:?} commit of writer {}", commit.kind, commit.writer)
                });
            }
            if stored && (commit.outcome == Outcome::Err || commit.kind.must_not_commit()) {
                c.refused_but_stored += 1;
                c.example("refused but stored", || {
                    format!("{id} of a {:?} commit: {}", commit.kind, commit.error.as_deref().unwrap_or("Ok"))
                });
            }
        }
        if let (Kind::Bad(bad), true) = (commit.kind, accepted) {
            c.bad_inputs_accepted += 1;
            *c.bad_inputs_accepted_by_kind.entry(bad_name(bad).to_owned()).or_default() += 1;
        }
    }

    // The store: every row committed, decodable, gapless per aggregate, published.
    c.events_committed = observed.store.len() as u64;
    let mut per_aggregate: HashMap<Uuid, Vec<i64>> = HashMap::new();
    for row in &observed.store {
        per_aggregate.entry(row.aggregate_id).or_default().push(row.sequence);
        if !attempted.contains_key(&row.event_id) {
            c.stored_never_attempted += 1;
        }
        if !published.contains_key(&row.event_id.to_string()) {
            c.committed_unpublished += 1;
            if attempted.get(&row.event_id).is_some_and(|r| r.kind.is_bad()) {
                c.committed_unpublished_bad += 1;
            }
            c.example("committed, never published", || {
                let kind = attempted.get(&row.event_id).map(|r| kind_name(r.kind)).unwrap_or_default();
                format!(
                    "{} ({kind}) aggregate {} sequence {} (transaction {}, position {})",
                    row.event_id, row.aggregate_id, row.sequence, row.transaction_id, row.global_position
                )
            });
        }
        let decodes = serde_json::from_str::<Recorded>(&row.payload).is_ok_and(|e| e.amount.is_finite());
        // Plain serde_json, with its recursion limit, as every reader parses the metadata.
        let metadata = serde_json::from_str::<serde_json::Value>(&row.metadata);
        if !decodes || metadata.is_err() {
            c.undecodable_rows += 1;
            c.example("undecodable", || {
                let (what, text) = match metadata {
                    Err(e) if decodes => (format!("metadata ({e})"), &row.metadata),
                    _ => ("payload".to_owned(), &row.payload),
                };
                format!(
                    "position {}, {what}: {}",
                    row.global_position,
                    text.chars().take(120).collect::<String>()
                )
            });
        }
    }
    for (aggregate, mut sequences) in per_aggregate {
        sequences.sort_unstable();
        if sequences.iter().zip(1..).any(|(&s, i)| s != i) {
            c.store_gaps += 1;
            c.example("store gaps", || format!("{aggregate}: {sequences:?}"));
        }
    }

    // The stream, in stream order: phantoms, agreement with the store, order per aggregate.
    let mut first_seen: HashSet<&str> = HashSet::new();
    let mut last: HashMap<Uuid, i64> = HashMap::new();
    for m in &observed.stream {
        let Some(id) = m.msg_id.as_deref() else { continue };
        if !first_seen.insert(id) {
            continue;
        }
        let row = id.parse::<Uuid>().ok().and_then(|id| by_id.get(&id));
        let Some(row) = row else {
            c.published_uncommitted += 1;
            c.example("phantom", || {
                let kind = id.parse().ok().and_then(|id| attempted.get(&id)).map(|r| kind_name(r.kind));
                format!("{id} ({})", kind.unwrap_or_default())
            });
            continue;
        };
        let body_id = m.body.as_ref().and_then(|b| b.get("event_id")).and_then(|v| v.as_str());
        let body_sequence =
            m.body.as_ref().and_then(|b| b.get("sequence")).and_then(serde_json::Value::as_i64);
        // The payload published is the payload stored (as JSON values: key order and the
        // way a number is written aside).
        let body_payload = m.body.as_ref().and_then(|b| b.get("payload"));
        let same_payload = body_payload.is_some_and(|published| {
            serde_json::from_str::<serde_json::Value>(&row.payload).is_ok_and(|stored| *published == stored)
        });
        let agrees = m.aggregate_id.as_deref() == Some(row.aggregate_id.to_string().as_str())
            && m.sequence.as_deref() == Some(row.sequence.to_string().as_str())
            && body_id == Some(id)
            && body_sequence == Some(row.sequence)
            && same_payload;
        if !agrees {
            c.stream_disagrees_with_store += 1;
            c.example("stream disagrees", || {
                let body = match &m.body {
                    None => ", a body that does not parse as JSON",
                    Some(_) if !same_payload => ", another payload",
                    Some(_) => "",
                };
                format!("{id}: headers {:?}/{:?}{body}", m.aggregate_id, m.sequence)
            });
        }
        let previous = last.entry(row.aggregate_id).or_insert(0);
        if row.sequence != *previous + 1 {
            c.stream_order_violations += 1;
            c.example("stream order", || {
                format!("aggregate {}: sequence {} after {}", row.aggregate_id, row.sequence, previous)
            });
        }
        *previous = (*previous).max(row.sequence);
    }

    // stream_all: exactly the store's events, each aggregate in sequence order.
    let mut seen_positions: HashSet<i64> = HashSet::new();
    let mut last: HashMap<Uuid, i64> = HashMap::new();
    for item in &observed.stream_all {
        let Some(row) = by_position.get(&item.global_position) else {
            c.stream_all_mismatches += 1;
            continue;
        };
        if !seen_positions.insert(item.global_position) {
            c.stream_all_mismatches += 1;
            continue;
        }
        if let Some((id, aggregate, sequence)) = item.event
            && (id, aggregate, sequence) != (row.event_id, row.aggregate_id, row.sequence)
        {
            c.stream_all_mismatches += 1;
        }
        let previous = last.entry(row.aggregate_id).or_insert(0);
        if row.sequence != *previous + 1 {
            c.stream_all_order_violations += 1;
            c.example("stream_all order", || {
                format!(
                    "aggregate {}: sequence {} (transaction {}) after {}",
                    row.aggregate_id, row.sequence, row.transaction_id, previous
                )
            });
        }
        *previous = (*previous).max(row.sequence);
    }
    c.stream_all_mismatches += observed.store.len().saturating_sub(seen_positions.len()) as u64;
    c.stream_all_mismatches += observed.stream_all_errors;
    c.backlog = observed.backlog;
    c
}

/// A count from SQL as a table figure; a negative count (impossible) still shows as one.
fn figure(n: i64) -> u64 {
    n.unsigned_abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(aggregate: Uuid, sequence: i64, position: i64, transaction: i64) -> StoreRow {
        let payload = serde_json::json!({
            "aggregate": aggregate, "writer": 0, "commit": 0, "amount": 1.5, "note": ""
        });
        StoreRow {
            event_id: Uuid::now_v7(),
            aggregate_id: aggregate,
            sequence,
            transaction_id: transaction,
            global_position: position,
            payload: payload.to_string(),
            metadata: "{}".to_owned(),
        }
    }

    fn message(r: &StoreRow, stream_sequence: u64) -> StreamMsg {
        StreamMsg {
            stream_sequence,
            msg_id: Some(r.event_id.to_string()),
            aggregate_id: Some(r.aggregate_id.to_string()),
            sequence: Some(r.sequence.to_string()),
            body: Some(serde_json::json!({
                "event_id": r.event_id.to_string(),
                "sequence": r.sequence,
                "payload": serde_json::from_str::<serde_json::Value>(&r.payload).unwrap(),
            })),
            stored_at_ns: i128::from(stream_sequence),
            in_batch: false,
        }
    }

    fn all(r: &StoreRow) -> AllItem {
        AllItem { global_position: r.global_position, event: Some((r.event_id, r.aggregate_id, r.sequence)) }
    }

    fn commit(kind: Kind, outcome: Outcome, rows: &[&StoreRow], extra: &[Uuid]) -> CommitRecord {
        let mut events: Vec<Uuid> = rows.iter().map(|r| r.event_id).collect();
        events.extend(extra);
        CommitRecord {
            writer: 0,
            kind,
            outcome,
            events,
            big_numbers: Vec::new(),
            error: None,
            invalid: false,
        }
    }

    #[test]
    fn a_clean_run_counts_no_violation() {
        let a = Uuid::now_v7();
        let (r1, r2) = (row(a, 1, 1, 10), row(a, 2, 2, 11));
        let observed = Observed {
            stream: vec![message(&r1, 1), message(&r2, 2)],
            stream_all: vec![all(&r1), all(&r2)],
            store: vec![r1.clone(), r2.clone()],
            ..Observed::default()
        };
        let ledger = [commit(Kind::Plain, Outcome::Ok, &[&r1, &r2], &[])];
        let counts = count(&ledger, &observed);
        assert_eq!(counts.violations(), 0, "{}", counts.table());
        assert_eq!((counts.events_committed, counts.events_published), (2, 2));
    }

    #[test]
    fn every_kind_of_violation_is_counted() {
        let a = Uuid::now_v7();
        let (r1, r2, r3) = (row(a, 1, 1, 12), row(a, 2, 2, 11), row(a, 4, 3, 13));
        let mut nan = row(Uuid::now_v7(), 1, 4, 14);
        nan.payload = nan.payload.replace("1.5", "null");
        let phantom = Uuid::now_v7();
        let lost = Uuid::now_v7();
        let observed = Observed {
            // r2 before r1 (order), r1 twice (duplicate), a phantom, r3 and nan never published.
            stream: vec![
                message(&r2, 1),
                message(&r1, 2),
                message(&r1, 3),
                StreamMsg { msg_id: Some(phantom.to_string()), ..StreamMsg::default() },
            ],
            // stream_all orders by transaction: r2 (11) before r1 (12).
            stream_all: vec![all(&r2), all(&r1), all(&r3)],
            store: vec![r1.clone(), r2.clone(), r3.clone(), nan.clone()],
            backlog: Backlog { pending: 2, parked: 1, without_subject: 1 },
            ..Observed::default()
        };
        let ledger = [
            commit(Kind::Plain, Outcome::Ok, &[&r1, &r2], &[lost]),
            commit(Kind::ClosureFails, Outcome::Err, &[&r3], &[]),
            commit(Kind::SwallowAfter, Outcome::Ok, &[], &[phantom]),
            commit(Kind::Bad(BadInput::NaN), Outcome::Panicked, &[&nan], &[]),
        ];
        let c = count(&ledger, &observed);
        assert_eq!(c.stream_duplicates, 1);
        assert_eq!(c.published_uncommitted, 1);
        assert_eq!(c.committed_unpublished, 2);
        assert_eq!(c.acked_not_stored, 2, "the lost event and the phantom");
        assert_eq!(c.refused_but_stored, 1);
        assert_eq!(c.must_fail_returned_ok, 1);
        assert_eq!(c.bad_inputs_accepted, 1);
        assert_eq!(c.stream_order_violations, 2, "2 before 1, then 1 after 2");
        assert_eq!(c.stream_all_order_violations, 3, "2 first, 1 after it, 4 after 2");
        assert_eq!(c.stream_all_mismatches, 1, "the NaN row is missing from stream_all");
        assert_eq!(c.store_gaps, 1, "1, 2, 4");
        assert_eq!(c.undecodable_rows, 1);
        assert_eq!(c.backlog, Backlog { pending: 2, parked: 1, without_subject: 1 });
        let rows: HashMap<&str, u64> = c.violation_rows().into_iter().collect();
        assert_eq!(rows["events pending after the final drain (past their relay checkpoint)"], 2);
        assert_eq!(rows["events parked (nothing here is refused by the broker)"], 1);
        assert_eq!(rows["events stored without a subject (never published)"], 1);
        assert_eq!(c.panics, 1);
    }

    /// `[[[…1…]]]`, `depth` arrays deep, as text (serde_json would not build it deeper).
    fn nested_text(depth: usize) -> String {
        format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
    }

    #[test]
    fn big_numbers_and_deep_metadata_are_counted() {
        let a = Uuid::now_v7();
        let (value, readings) = BIG_NUMBERS;
        let big = |mut r: StoreRow| {
            let mut event: Recorded = serde_json::from_str(&r.payload).unwrap();
            event.readings = vec![value; readings];
            r.payload = serde_json::to_string(&event).unwrap();
            r
        };
        // One published, one stuck (parked, as a broker refuses a message over 1 MiB).
        let (published, stuck) = (big(row(a, 1, 1, 1)), big(row(a, 2, 2, 2)));
        assert!(published.payload.len() < 32 * 1024, "{}", published.payload.len());
        // Each number written out in full, with a space: past the broker's 1 MiB.
        assert!(readings * ("1".len() + 300 + ", ".len()) > 1024 * 1024);
        let shown = message(&published, 1);
        // Accepted although no reader can read its metadata.
        let mut deep = row(Uuid::now_v7(), 1, 3, 3);
        deep.metadata = format!(r#"{{"user":{{"deep":{}}}}}"#, nested_text(DEEP_METADATA_ARRAYS));
        let refused = Uuid::now_v7();
        let observed = Observed {
            stream: vec![shown, message(&deep, 2)],
            stream_all: vec![all(&published), all(&stuck), AllItem { global_position: 3, event: None }],
            store: vec![published.clone(), stuck.clone(), deep.clone()],
            backlog: Backlog { pending: 0, parked: 1, without_subject: 0 },
            ..Observed::default()
        };
        let mut plain = commit(Kind::Plain, Outcome::Ok, &[&published, &stuck], &[]);
        plain.big_numbers = vec![published.event_id, stuck.event_id];
        let mut refused_big = commit(Kind::Plain, Outcome::Err, &[], &[refused]);
        refused_big.big_numbers = vec![refused];
        refused_big.invalid = true;
        let mut bad = commit(Kind::Bad(BadInput::DeepMetadata), Outcome::Ok, &[&deep], &[]);
        bad.invalid = false;
        let mut refused_bad = commit(Kind::Bad(BadInput::DeepMetadata), Outcome::Err, &[], &[Uuid::now_v7()]);
        refused_bad.invalid = true;
        let c = count(&[plain, refused_big, bad, refused_bad], &observed);
        assert_eq!(
            (c.big_numbers_attempted, c.big_numbers_committed, c.big_numbers_published),
            (3, 2, 1),
            "{}",
            c.table()
        );
        assert_eq!(c.stream_disagrees_with_store, 0, "{}", c.table());
        assert_eq!(c.committed_unpublished, 1);
        assert_eq!(c.good_inputs_refused, 1);
        assert_eq!((c.bad_inputs_attempted, c.bad_inputs_refused_as_invalid), (2, 1));
        assert_eq!(c.bad_inputs_accepted, 1);
        assert_eq!(c.must_fail_returned_ok, 1);
        assert_eq!(c.undecodable_rows, 1, "the deep metadata");

        // A message whose payload is not the stored one disagrees.
        let mut other = message(&published, 1);
        other.body.as_mut().unwrap()["payload"]["amount"] = serde_json::json!(2.5);
        let observed =
            Observed { stream: vec![other], store: vec![published.clone()], ..Observed::default() };
        let c = count(&[commit(Kind::Plain, Outcome::Ok, &[&published], &[])], &observed);
        assert_eq!(c.stream_disagrees_with_store, 1);
    }
}
