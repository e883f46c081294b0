//! End-to-end load generator: each figure of ours beside its ceiling (raw sqlx, raw
//! async-nats), in the same run on the same servers. Prints Markdown tables.
//!
//! `bash scripts/bench.sh` starts PostgreSQL and nats-server and runs it; or set
//! `DATABASE_URL` and `NATS_URL` and run
//! `cargo bench -p edupulse-events-bench --bench loadgen -- [--quick] [--fresh] [--only NAME]`. Each table's
//! title says whether the server syncs its WAL (`scripts/bench.sh --fsync off` starts one that
//! does not).
//! Scenarios: `append`, `publish`, `relay`, `replay`, `wake`, `consume`, and `durability`
//! (run once per broker setting: see `bench_durability`).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edupulse_events::{
    BusConfig, DatabasePool, DomainEvent, EventBus, EventError, EventStore, LogRelay, NatsConfig,
    NatsPublisher, Publisher, RelayConfig, StoreConfig, StreamPosition, StreamSpec, Subscriber,
    SubscriberConfig, Uuid,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, QueryBuilder};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The benchmark's event: an id, a number and a short text, about 120 bytes of JSON.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(context = "bench")]
struct Tick {
    #[event(aggregate_id)]
    id: Uuid,
    n: u64,
    note: String,
}

fn tick(id: Uuid, n: u64) -> Tick {
    Tick { id, n, note: "a lesson about ownership and borrowing".into() }
}

struct Env {
    database_url: String,
    nats_url: String,
    quick: bool,
    /// `--fresh`: the bus's commits each create an aggregate, as the bare commit's do.
    fresh: bool,
    only: Option<String>,
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

async fn fresh_store(env: &Env, connections: u32) -> Result<EventStore> {
    let schema = format!("bench_{}", Uuid::now_v7().simple());
    let config = StoreConfig::with_schema(&schema)?.with_max_connections(connections);
    let store = EventStore::connect(&env.database_url, config).await?;
    store.migrate().await?;
    Ok(store)
}

/// Drops a benchmark's schema, so that repeated runs do not grow the database (and its
/// checkpoints) under the next one.
async fn drop_store(store: &EventStore) -> Result<()> {
    let pool = &pg_pool(store)?;
    let schema = store.config().schema.as_str();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA \"{schema}\" CASCADE"))).execute(pool).await?;
    Ok(())
}

/// The store's PostgreSQL pool: the load generator measures PostgreSQL.
fn pg_pool(store: &EventStore) -> Result<PgPool> {
    match store.pool() {
        DatabasePool::Postgres(pool) => Ok(pool),
        DatabasePool::Sqlite(_) => Err("the load generator needs PostgreSQL (DATABASE_URL)".into()),
    }
}

/// The ceiling's table: the same columns and constraints as the store's events table.
async fn raw_table(pool: &PgPool, schema: &str) -> Result<String> {
    let table = format!("\"{schema}\".raw_events");
    // The same tables as the store's: columns, defaults, constraints and indexes.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (LIKE \"{schema}\".events INCLUDING ALL); \
         CREATE TABLE \"{schema}\".raw_streams (LIKE \"{schema}\".streams INCLUDING ALL)"
    )))
    .execute(pool)
    .await?;
    Ok(table)
}

/// The statement an append runs, done raw: the stream row inserted or bumped at the expected
/// sequence and the rows inserted, in one statement, with no check of what is written.
fn raw_statement_query(
    table: &str,
    id: Uuid,
    expected: i64,
    events: &[Tick],
) -> QueryBuilder<sqlx::Postgres> {
    let streams = table.replace("raw_events", "raw_streams");
    let xact = "pg_current_xact_id()::text::bigint";
    let count = events.len() as i64;
    let mut query = QueryBuilder::new(format!(
        "WITH bump AS (INSERT INTO {streams} AS st (aggregate_id, aggregate_type, version, last_transaction_id) \
         VALUES ("
    ));
    query.push_bind(id).push(", 'bench', ").push_bind(count).push(format!(", {xact}) "));
    query.push("ON CONFLICT (aggregate_id) DO UPDATE SET version = st.version + ").push_bind(count);
    query.push(format!(
        ", last_transaction_id = greatest(st.last_transaction_id, {xact}) WHERE st.version = "
    ));
    query.push_bind(expected).push(" RETURNING st.version) ");
    query.push(format!(
        "INSERT INTO {table} (event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, \
         payload, metadata, keys, occurred_at, transaction_id) \
         SELECT v.*, {xact} FROM bump CROSS JOIN ("
    ));
    push_rows(&mut query, id, expected + 1, events);
    query.push(
        ") AS v(event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, payload, metadata, \
         keys, occurred_at) RETURNING global_position",
    );
    query
}

/// The ceiling: one plain multi-row INSERT per batch.
async fn raw_insert(
    pool: &PgPool,
    table: &str,
    id: Uuid,
    first_sequence: i64,
    events: &[Tick],
) -> Result<()> {
    raw_insert_query(table, id, first_sequence, events).build().execute(pool).await?;
    Ok(())
}

/// The same INSERT in a transaction, returning the rows' positions.
async fn raw_insert_returning(
    conn: &mut sqlx::PgConnection,
    table: &str,
    id: Uuid,
    first_sequence: i64,
    events: &[Tick],
) -> Result<Vec<i64>> {
    let mut query = raw_insert_query(table, id, first_sequence, events);
    query.push(" RETURNING global_position");
    Ok(query.build_query_scalar().fetch_all(conn).await?)
}

fn raw_insert_query(
    table: &str,
    id: Uuid,
    first_sequence: i64,
    events: &[Tick],
) -> QueryBuilder<sqlx::Postgres> {
    let mut query = QueryBuilder::new(format!(
        "INSERT INTO {table} (event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, \
         payload, metadata, keys, occurred_at) "
    ));
    push_rows(&mut query, id, first_sequence, events);
    query
}

/// The `VALUES` of `events`' rows as the store writes them, numbered from `first_sequence`:
/// `(event_id, aggregate_type, aggregate_id, sequence, event_type, schema_version, payload,
/// metadata, keys, occurred_at)`.
fn push_rows(query: &mut QueryBuilder<sqlx::Postgres>, id: Uuid, first_sequence: i64, events: &[Tick]) {
    let now = chrono_now();
    query.push_values(events.iter().enumerate(), |mut row, (i, e)| {
        row.push_bind(Uuid::now_v7())
            .push_bind("bench")
            .push_bind(id)
            .push_bind(first_sequence + i as i64)
            .push_bind("Tick")
            .push_bind(1_i32)
            .push_bind(serde_json::to_string(e).unwrap_or_default())
            .push_unseparated("::json")
            .push_bind("{}")
            .push_unseparated("::json")
            .push_bind("{}")
            .push_unseparated("::jsonb")
            .push_bind(now);
    });
}

fn chrono_now() -> edupulse_events::chrono::DateTime<edupulse_events::chrono::Utc> {
    edupulse_events::chrono::Utc::now()
}

/// The CPU time this process has used (user and system, every thread), from
/// `/proc/self/stat` (clock ticks of 10 ms); zero where that cannot be read.
/// The machine's busy CPU time so far (all processes, every core: `/proc/stat`'s first
/// line without idle and iowait), to tell whether a run had cores to spare.
fn machine_busy() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return Duration::ZERO };
    let fields: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Duration::from_millis(total.saturating_sub(idle) * 10)
}

fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return Duration::ZERO };
    // The command name may hold spaces: the fields that follow start after its `)`.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// How one side of an append row writes a batch.
#[derive(Clone, Copy, PartialEq)]
enum AppendForm {
    /// One statement in a transaction of its own (`EventStore::append`; a raw INSERT).
    Alone,
    /// BEGIN, the append (or the raw INSERT), COMMIT.
    InTransaction,
}

/// Who writes, in an append round.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// `EventStore::append`.
    Ours,
    /// One plain multi-row INSERT: the least a write of the rows does.
    RawInsert,
    /// The statement ours runs, by hand (`raw_statement_query`): ours without its checks.
    RawStatement,
}

/// Appends `count` batches of `batch` events to `id` from `sequence` on: ours or raw.
async fn append_round(
    store: &EventStore,
    table: &str,
    (form, writer): (AppendForm, Writer),
    id: Uuid,
    sequence: &mut i64,
    (batch, count): (usize, u64),
) -> Result<(Duration, Duration)> {
    let pool = pg_pool(store)?;
    let (started, cpu) = (Instant::now(), process_cpu());
    for _ in 0..count {
        let events: Vec<_> = (0..batch).map(|i| tick(id, *sequence as u64 + i as u64)).collect();
        let mut raw = match writer {
            Writer::Ours => None,
            Writer::RawInsert => Some(raw_insert_query(table, id, *sequence + 1, &events)),
            Writer::RawStatement => Some(raw_statement_query(table, id, *sequence, &events)),
        };
        match (form, raw.as_mut()) {
            (AppendForm::Alone, None) => drop(store.append("bench", id, *sequence, events).await?),
            (AppendForm::Alone, Some(query)) => {
                query.build().execute(&pool).await?;
            }
            (AppendForm::InTransaction, None) => {
                let mut tx = store.begin().await?;
                tx.append("bench", id, *sequence, events).await?;
                tx.commit().await?;
            }
            (AppendForm::InTransaction, Some(query)) => {
                let mut tx = pool.begin().await?;
                query.build().execute(&mut *tx).await?;
                tx.commit().await?;
            }
        }
        *sequence += batch as i64;
    }
    Ok((started.elapsed(), process_cpu().saturating_sub(cpu)))
}

async fn bench_append(env: &Env) -> Result<()> {
    println!("\n### Append throughput (events/s)\n");
    println!(
        "Ours, the raw INSERT and the raw statement (ours by hand, without its checks) take turns \
         in 8 rounds each (the ratio per round: min–max); one writer, one aggregate each.\n"
    );
    println!(
        "| workload | edupulse `append` | raw INSERT | ratio | per round | raw statement | ratio | per round | client CPU µs/event, ours / INSERT / statement |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let scale = if env.quick { 5 } else { 1 };
    let writers = [Writer::Ours, Writer::RawInsert, Writer::RawStatement];
    for form in [AppendForm::Alone, AppendForm::InTransaction] {
        for (batch, total) in [(1usize, 4_000u64), (10, 20_000), (100, 50_000)] {
            let rounds = 8u64;
            let per_round = (total / scale / batch as u64 / rounds).max(1);
            let store = fresh_store(env, 4).await?;
            let pool = pg_pool(&store)?;
            let table = raw_table(&pool, store.config().schema.as_str()).await?;
            let ids = [Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7()];
            let mut sequences = [0i64; 3];
            let (mut spent, mut cpu) = ([Duration::ZERO; 3], [Duration::ZERO; 3]);
            let mut ratios: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
            // A warm-up batch each (connections open, statements prepared), then the rounds.
            for round in 0..=rounds {
                let mut took = [Duration::ZERO; 3];
                for (i, writer) in writers.into_iter().enumerate() {
                    let count = if round == 0 { 1 } else { per_round };
                    let (t, c) = append_round(
                        &store,
                        &table,
                        (form, writer),
                        ids[i],
                        &mut sequences[i],
                        (batch, count),
                    )
                    .await?;
                    if round > 0 {
                        (took[i], spent[i], cpu[i]) = (t, spent[i] + t, cpu[i] + c);
                    }
                }
                if round > 0 {
                    ratios[0].push(took[1].as_secs_f64() / took[0].as_secs_f64());
                    ratios[1].push(took[2].as_secs_f64() / took[0].as_secs_f64());
                }
            }
            let events = per_round * rounds * batch as u64;
            let [ours, insert, statement] = spent.map(|d| rate(events, d));
            let span = |r: &[f64]| {
                let (low, high) = r.iter().fold((f64::MAX, 0f64), |(l, h), x| (l.min(*x), h.max(*x)));
                format!("{:.0}–{:.0} %", 100.0 * low, 100.0 * high)
            };
            let how = if form == AppendForm::Alone { "alone" } else { "BEGIN/append/COMMIT" };
            let [c0, c1, c2] = cpu.map(|c| c.as_secs_f64() * 1e6 / events as f64);
            println!(
                "| 1 aggregate, batch {batch}, {how} | {ours:.0} | {insert:.0} | {:.0} % | {} | {statement:.0} | {:.0} % | {} | {c0:.1} / {c1:.1} / {c2:.1} |",
                100.0 * ours / insert,
                span(&ratios[0]),
                100.0 * ours / statement,
                span(&ratios[1]),
            );
            drop_store(&store).await?;
        }
    }

    // 1 000 aggregates, 8 concurrent writers, batches of 10.
    let aggregates = if env.quick { 200 } else { 1_000 };
    let per_aggregate = 20u64;
    let store = fresh_store(env, 10).await?;
    let pool = pg_pool(&store)?;
    let table = raw_table(&pool, store.config().schema.as_str()).await?;
    let ids: Arc<Vec<Uuid>> = Arc::new((0..aggregates).map(|_| Uuid::now_v7()).collect());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (store, ids) = (store.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for id in ids.iter().skip(worker).step_by(8) {
                for round in 0..per_aggregate / 10 {
                    let events: Vec<_> = (0..10).map(|i| tick(*id, round * 10 + i)).collect();
                    store.append("bench", *id, (round * 10) as i64, events).await?;
                }
            }
            Ok::<_, EventError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let total = aggregates as u64 * per_aggregate;
    let ours = rate(total, started.elapsed());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..8 {
        let (pool, table, ids) = (pool.clone(), table.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            for id in ids.iter().skip(worker).step_by(8) {
                let raw = Uuid::now_v7();
                for round in 0..per_aggregate / 10 {
                    let events: Vec<_> = (0..10).map(|i| tick(*id, round * 10 + i)).collect();
                    raw_insert(&pool, &table, raw, (round * 10 + 1) as i64, &events).await?;
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let ceiling = rate(total, started.elapsed());
    println!(
        "| {aggregates} aggregates, 8 writers, batch 10, alone | {ours:.0} | {ceiling:.0} | {:.0} % | – | – |",
        100.0 * ours / ceiling
    );
    drop_store(&store).await
}

/// A publisher with a fresh stream `stream`. `BENCH_BATCHES=off` makes it without batches
/// (events one acknowledgement apart even on a server with them), `atomic` or `fast` with
/// those only; unset, as `StreamSpec::new` makes it (both, where the server has them).
async fn nats(env: &Env, stream: &str) -> Result<NatsPublisher> {
    let publisher = NatsPublisher::connect(&env.nats_url, NatsConfig::default()).await?;
    let _ = publisher.jetstream().delete_stream(stream).await;
    let batches = std::env::var("BENCH_BATCHES").unwrap_or_default();
    let spec = StreamSpec::new(stream, ["bench.>"])
        .with_atomic_publish(batches != "off" && batches != "fast")
        .with_fast_publish(batches != "off" && batches != "atomic");
    publisher.ensure_stream(&spec).await?;
    Ok(publisher)
}

/// The drain's ceiling: a raw program that reads the log with plain sqlx in pages of
/// `page` rows (position order), writes each row's envelope by hand and publishes it with
/// raw async-nats with the headers ours carry (`raw_message`'s), pipelined (5 000
/// acknowledgements outstanding, as `raw_pipelined`), without checkpoints or any ordering.
async fn raw_read_and_publish(
    pool: &PgPool,
    schema: &str,
    js: &async_nats::jetstream::Context,
    page: i64,
) -> Result<(Duration, u64)> {
    type Row = (i64, Uuid, String, Uuid, i64, String, i32, String, String, String, String);
    let query = format!(
        "SELECT global_position, event_id, aggregate_type, aggregate_id, sequence, event_type, \
         schema_version, payload::text, metadata::text, occurred_at::text, recorded_at::text \
         FROM \"{schema}\".events WHERE global_position > $1 ORDER BY global_position LIMIT $2"
    );
    let started = Instant::now();
    let (mut after, mut acks, mut sent) = (0_i64, std::collections::VecDeque::new(), 0_u64);
    loop {
        let rows: Vec<Row> =
            sqlx::query_as(sqlx::AssertSqlSafe(query.clone())).bind(after).bind(page).fetch_all(pool).await?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        for (
            position,
            event_id,
            aggregate_type,
            aggregate_id,
            sequence,
            event_type,
            version,
            payload,
            metadata,
            occurred,
            recorded,
        ) in rows
        {
            let body = format!(
                "{{\"event_id\":\"{event_id}\",\"event_type\":\"{event_type}\",\"schema_version\":{version},\
                 \"aggregate_type\":\"{aggregate_type}\",\"aggregate_id\":\"{aggregate_id}\",\"sequence\":{sequence},\
                 \"occurred_at\":\"{occurred}\",\"recorded_at\":\"{recorded}\",\"global_position\":{position},\
                 \"payload\":{payload},\"metadata\":{metadata}}}"
            );
            acks.push_back(js.send_publish("bench.Raw", raw_message(body.as_bytes())).await?);
            sent += 1;
            if acks.len() >= 5_000
                && let Some(ack) = acks.pop_front()
            {
                ack.await?;
            }
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok((started.elapsed(), sent))
}

/// One JetStream message as the bus sends it: an envelope of the event and the headers ours
/// carry (seven, plus `Nats-Msg-Id`).
fn raw_message(body: &[u8]) -> async_nats::jetstream::message::PublishMessage {
    let mut headers = async_nats::HeaderMap::new();
    for name in [
        "Edupulse-Event-Type",
        "Edupulse-Schema-Version",
        "Edupulse-Aggregate-Type",
        "Edupulse-Aggregate-Id",
        "Edupulse-Sequence",
        "Edupulse-Correlation-Id",
        "traceparent",
    ] {
        headers.insert(name, "0190c4a8-6ad8-7f0e-9b1a-3c5d2f4e6a7b");
    }
    async_nats::jetstream::message::PublishMessage::build()
        .payload(body.to_vec().into())
        .headers(headers)
        .message_id(Uuid::now_v7().to_string())
}

/// Runs `committers` tasks, each calling `work(task, round)` `rounds` times; returns the
/// rate of `events_per_round` events per call and the sorted latencies of the calls.
async fn run_committers<F, Fut>(
    committers: usize,
    rounds: usize,
    events_per_round: usize,
    work: F,
) -> Result<(f64, Vec<Duration>)>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<()>> + Send,
{
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..committers {
        let work = work.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(rounds);
            for round in 0..rounds {
                let t = Instant::now();
                work(task, round).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    Ok((rate((committers * rounds * events_per_round) as u64, elapsed), latencies))
}

/// The bus against a bare commit, in the same run: commit throughput and latency (the bus's
/// background relay publishing meanwhile, as in production), and the publication latency
/// from COMMIT returned to the JetStream acknowledgement, measured by a task per commit
/// awaiting its receipt (the committers do not wait for it).
async fn bench_publish(env: &Env) -> Result<()> {
    let fresh = env.fresh;
    let aggregates = if fresh { "a new aggregate per commit" } else { "one aggregate per committer" };
    println!(
        "\n### Commit-then-publish: the bus beside a bare commit ({}; {aggregates})\n",
        fsync_label(env).await?
    );
    println!(
        "| committers × events | bare commit events/s | p50 | p99 | bare commit + raw publish events/s | \
         raw publication p50 | raw publication p99 | `EventBus::commit` events/s | p50 | p99 | / bare | \
         / bare + raw publish | publication p50 | publication p99 | publication p99 / bare p99 | \
         all acknowledged events/s | end to end / bare + raw publish | publication p99 / raw publication p99 |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: \
         | ---: | ---: |"
    );
    let per_run = if env.quick { 1_200 } else { 6_000 };
    for (committers, per_commit) in [(1usize, 1usize), (8, 1), (64, 1), (64, 10)] {
        let rounds = (per_run / (committers * per_commit)).max(1);
        let publisher = nats(env, "BENCH").await?;
        let store = fresh_store(env, (committers as u32 + 4).min(80)).await?;
        // `BUS_RELAY=0`: no background relay (an experiment: the commit alone).
        let background_relay = std::env::var("BUS_RELAY").map_or(true, |v| v != "0");
        let config = BusConfig::default().with_background_relay(background_relay);
        let bus = EventBus::new(store.clone(), Arc::new(publisher.clone()), config)?;
        let pool = pg_pool(&store)?;
        let table = raw_table(&pool, store.config().schema.as_str()).await?;
        // Warm-up: one commit per committer, so that the pool's connections exist and the
        // relay runs before the clock starts (set-up is not what this table measures).
        let warm: Vec<_> = (0..committers)
            .map(|_| {
                let bus = bus.clone();
                tokio::spawn(async move {
                    let id = Uuid::now_v7();
                    let committed =
                        bus.commit(async |tx| tx.append("bench", id, 0, [tick(id, 0)]).await).await?;
                    if background_relay { committed.published().await.map(drop) } else { Ok(()) }
                })
            })
            .collect();
        for task in warm {
            task.await??;
        }

        // The least any commit-then-publish does in PostgreSQL: BEGIN, the event rows, COMMIT.
        let (bare, bare_latencies) = run_committers(committers, rounds, per_commit, {
            let (pool, table) = (pool.clone(), table.clone());
            move |_, round| {
                let (pool, table) = (pool.clone(), table.clone());
                async move {
                    let id = Uuid::now_v7();
                    let first = (round * per_commit) as u64;
                    let events: Vec<_> = (first..first + per_commit as u64).map(|n| tick(id, n)).collect();
                    let mut tx = pool.begin().await?;
                    raw_insert_returning(&mut tx, &table, id, 1, &events).await?;
                    tx.commit().await?;
                    Ok(())
                }
            }
        })
        .await?;

        // The least any commit-then-publish does on one machine: the bare commit, then the
        // events handed to raw async-nats (the same bytes and headers), the acknowledgements
        // awaited off the commit path, timed from COMMIT returned.
        let envelope = edupulse_events::EventEnvelope::new("bench", Uuid::now_v7(), tick(Uuid::now_v7(), 1));
        let body = Arc::new(serde_json::to_vec(&envelope)?);
        let (raw_waiters, mut raw_waited) =
            tokio::sync::mpsc::unbounded_channel::<tokio::task::JoinHandle<Result<Duration>>>();
        let (bare_and_publish, _) = run_committers(committers, rounds, per_commit, {
            let (pool, table, js) = (pool.clone(), table.clone(), publisher.jetstream().clone());
            move |_, round| {
                let (pool, table, js, body, raw_waiters) =
                    (pool.clone(), table.clone(), js.clone(), body.clone(), raw_waiters.clone());
                async move {
                    let id = Uuid::now_v7();
                    let first = (round * per_commit) as u64;
                    let events: Vec<_> = (first..first + per_commit as u64).map(|n| tick(id, n)).collect();
                    let mut tx = pool.begin().await?;
                    raw_insert_returning(&mut tx, &table, id, 1, &events).await?;
                    tx.commit().await?;
                    let returned = Instant::now();
                    let mut acks = Vec::with_capacity(per_commit);
                    for _ in 0..per_commit {
                        acks.push(js.send_publish("bench.Raw", raw_message(&body)).await?);
                    }
                    let _ = raw_waiters.send(tokio::spawn(async move {
                        for ack in acks {
                            ack.await?;
                        }
                        Ok(returned.elapsed())
                    }));
                    Ok(())
                }
            }
        })
        .await?;
        let mut raw_publication = Vec::new();
        while let Some(waiter) = raw_waited.recv().await {
            raw_publication.push(waiter.await??);
        }
        raw_publication.sort();

        let ids: Arc<Vec<Uuid>> = Arc::new((0..committers).map(|_| Uuid::now_v7()).collect());
        let (waiters, mut waited) =
            tokio::sync::mpsc::unbounded_channel::<tokio::task::JoinHandle<Result<Duration>>>();
        let started = Instant::now();
        let (ours, latencies) = run_committers(committers, rounds, per_commit, {
            let (bus, ids) = (bus.clone(), ids.clone());
            move |task, round| {
                let (bus, waiters) = (bus.clone(), waiters.clone());
                // Each committer appends to an aggregate of its own, or (`--fresh`) to a new
                // aggregate per commit, as the bare commit does.
                let (id, first) =
                    if fresh { (Uuid::now_v7(), 0) } else { (ids[task], (round * per_commit) as u64) };
                async move {
                    let events: Vec<_> = (first..first + per_commit as u64).map(|n| tick(id, n)).collect();
                    let committed =
                        bus.commit(async |tx| tx.append("bench", id, first as i64, events).await).await?;
                    let returned = Instant::now();
                    let receipt = committed.receipt;
                    if !background_relay {
                        return Ok(());
                    }
                    let _ = waiters.send(tokio::spawn(async move {
                        receipt.published().await?;
                        Ok(returned.elapsed())
                    }));
                    Ok(())
                }
            }
        })
        .await?;
        let mut publication = Vec::new();
        while let Some(waiter) = waited.recv().await {
            publication.push(waiter.await??);
        }
        let end_to_end = rate((committers * rounds * per_commit) as u64, started.elapsed());
        publication.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let bare_p99 = percentile(&bare_latencies, 0.99);
        println!(
            "| {committers} × {per_commit} | {bare:.0} | {:.2} ms | {:.2} ms | {bare_and_publish:.0} | {:.2} ms | \
             {:.2} ms | {ours:.0} | {:.2} ms | {:.2} ms | {:.0} % | {:.0} % | {:.2} ms | {:.2} ms | {:.2} | \
             {end_to_end:.0} | {:.0} % | {:.2} |",
            ms(percentile(&bare_latencies, 0.5)),
            ms(bare_p99),
            ms(percentile(&raw_publication, 0.5)),
            ms(percentile(&raw_publication, 0.99)),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99)),
            100.0 * ours / bare,
            100.0 * ours / bare_and_publish,
            ms(percentile(&publication, 0.5)),
            ms(percentile(&publication, 0.99)),
            percentile(&publication, 0.99).as_secs_f64() / bare_p99.as_secs_f64(),
            100.0 * end_to_end / bare_and_publish,
            percentile(&publication, 0.99).as_secs_f64() / percentile(&raw_publication, 0.99).as_secs_f64(),
        );
        bus.shutdown().await;
        drop_store(&store).await?;
    }
    Ok(())
}

/// Whether the server syncs its WAL (`fsync`), for the tables' titles.
async fn fsync_label(env: &Env) -> Result<String> {
    let pool = PgPool::connect(&env.database_url).await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&pool).await?;
    let synchronous: String = sqlx::query_scalar("SHOW synchronous_commit").fetch_one(&pool).await?;
    pool.close().await;
    Ok(format!("fsync {fsync}, synchronous_commit {synchronous}"))
}

/// Commits `total` events over `aggregates` aggregates without publishing them.
async fn backlog(
    store: &EventStore,
    publisher: Arc<dyn Publisher>,
    total: u64,
    aggregates: u64,
) -> Result<()> {
    let bus = EventBus::new(store.clone(), publisher, BusConfig::default().with_background_relay(false))?;
    let per_aggregate = total / aggregates;
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (0..aggregates).skip(worker as usize).step_by(4) {
                let id = Uuid::now_v7();
                let mut sequence = 0;
                while sequence < per_aggregate {
                    let n = 500.min(per_aggregate - sequence);
                    let events: Vec<_> = (sequence..sequence + n).map(|i| tick(id, i)).collect();
                    bus.commit(async |tx| tx.append("bench", id, sequence as i64, events).await).await?;
                    sequence += n;
                }
            }
            Ok::<_, EventError>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The body of a message as the bus sends one: an envelope of the benchmark's event.
fn bench_body() -> Result<Vec<u8>> {
    let envelope = edupulse_events::EventEnvelope::new("bench", Uuid::now_v7(), tick(Uuid::now_v7(), 1));
    Ok(serde_json::to_vec(&envelope)?)
}

/// Raw async-nats: `total` messages of `body` on `bench.Raw`, pipelined with 5 000
/// acknowledgements outstanding; the time until the last is acknowledged.
async fn raw_pipelined(js: &async_nats::jetstream::Context, body: &[u8], total: u64) -> Result<Duration> {
    let started = Instant::now();
    let mut acks = std::collections::VecDeque::new();
    for _ in 0..total {
        acks.push_back(js.send_publish("bench.Raw", raw_message(body)).await?);
        if acks.len() >= 5_000
            && let Some(ack) = acks.pop_front()
        {
            ack.await?;
        }
    }
    for ack in acks {
        ack.await?;
    }
    Ok(started.elapsed())
}

/// A backlog published by one relay from its checkpoints, beside raw async-nats publishing
/// the same number of messages pipelined.
async fn bench_relay(env: &Env) -> Result<()> {
    let total = if env.quick { 20_000 } else { 100_000 };
    let publisher = nats(env, "BENCH").await?;
    let store = fresh_store(env, 10).await?;
    let aggregates = std::env::var("BACKLOG_AGGREGATES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    backlog(&store, Arc::new(publisher.clone()), total, aggregates).await?;
    // Vacuum now, so that autovacuum's pass over the freshly written tables does not share
    // the two cores with the timed drain in some runs and not in others.
    let pool = &pg_pool(&store)?;
    let schema = store.config().schema.as_str();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM (ANALYZE) \"{schema}\".events, \"{schema}\".streams")))
        .execute(pool)
        .await?;
    // And write the dirty pages out now rather than in a checkpoint during the drain (needs a
    // superuser or `pg_checkpoint`; without it the figure is noisier, not wrong).
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(pool).await {
        eprintln!("CHECKPOINT refused ({e}); the drain may share the cores with one");
    }
    // Tuning knobs for experiments; the table is made with the defaults.
    let knob = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    let defaults = RelayConfig::default();
    let batch_size = knob("RELAY_BATCH").unwrap_or(defaults.batch_size);
    let config = defaults.with_batch_size(batch_size);
    let relay = LogRelay::new(store.clone(), Arc::new(publisher.clone()), config.clone());
    let (started, cpu, busy) = (Instant::now(), process_cpu(), machine_busy());
    let mut published = 0;
    while published < total {
        published += relay.run_once().await?.published;
    }
    let elapsed = started.elapsed();
    let (ours_cpu, ours_busy) = (process_cpu() - cpu, machine_busy() - busy);
    let mut stream = publisher.jetstream().get_stream("BENCH").await?;
    let stored = stream.info().await?.state.messages;

    // The ceilings: the same rows read in pages and published raw; and the same number of
    // messages of the same size, pipelined by async-nats.
    let (cpu, busy) = (process_cpu(), machine_busy());
    let (read_and_publish, raw_sent) =
        raw_read_and_publish(pool, schema, publisher.jetstream(), i64::from(config.batch_size)).await?;
    let (raw_cpu, raw_busy) = (process_cpu() - cpu, machine_busy() - busy);
    let per_event = |cpu: Duration, n: u64| cpu.as_secs_f64() * 1e6 / n.max(1) as f64;
    let cores = |busy: Duration, elapsed: Duration| busy.as_secs_f64() / elapsed.as_secs_f64();
    let body = bench_body()?;
    let raw = raw_pipelined(publisher.jetstream(), &body, total).await?;
    println!("\n### Relay drain\n");
    println!(
        "| backlog | aggregates | batch | time | events/s | in the stream | raw read + publish events/s | ratio | \
         raw async-nats events/s | ratio | client CPU µs/event, ours / raw read + publish | cores busy, ours / raw |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {total} | {aggregates} | {} | {:.2} s | {:.0} | {stored} | {:.0} | {:.0} % | {:.0} | {:.0} % | \
         {:.1} / {:.1} | {:.2} / {:.2} |",
        config.batch_size,
        elapsed.as_secs_f64(),
        rate(total, elapsed),
        rate(raw_sent, read_and_publish),
        100.0 * rate(total, elapsed) / rate(raw_sent, read_and_publish),
        rate(total, raw),
        100.0 * raw.as_secs_f64() / elapsed.as_secs_f64(),
        per_event(ours_cpu, total),
        per_event(raw_cpu, raw_sent),
        cores(ours_busy, elapsed),
        cores(raw_busy, read_and_publish),
    );
    drop_store(&store).await?;

    // One hot aggregate committing while the bus's relay publishes it, beside the drain.
    let hot = if env.quick { 2_000 } else { 10_000 };
    let (committed, in_stream, bare) = hot_aggregate(env, &publisher, hot).await?;
    println!("\n### One hot aggregate while it commits\n");
    println!(
        "| events | per commit | bare commits events/s | committed events/s | in the stream events/s | \
         / committed | / the drain above |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {hot} | 10 | {bare:.0} | {committed:.0} | {in_stream:.0} | {:.0} % | {:.0} % |",
        100.0 * in_stream / committed,
        100.0 * in_stream / rate(total, elapsed)
    );
    Ok(())
}

/// `total` events committed to one aggregate, 10 per commit, one commit after another,
/// through a bus whose background relay publishes them meanwhile: the commit rate, the
/// rate at which they reach the stream (the last one's acknowledgement), and the rate of
/// the same commits bare (a raw multi-row INSERT each, one after another).
async fn hot_aggregate(env: &Env, publisher: &NatsPublisher, total: u64) -> Result<(f64, f64, f64)> {
    let store = fresh_store(env, 10).await?;
    let pool = pg_pool(&store)?;
    let table = raw_table(&pool, store.config().schema.as_str()).await?;
    let raw_id = Uuid::now_v7();
    let started = Instant::now();
    for first in (1..=total).step_by(10) {
        let events: Vec<_> = (first..first + 10).map(|n| tick(raw_id, n)).collect();
        raw_insert(&pool, &table, raw_id, first as i64, &events).await?;
    }
    let bare = rate(total, started.elapsed());
    let bus = EventBus::new(store.clone(), Arc::new(publisher.clone()), BusConfig::default())?;
    let id = Uuid::now_v7();
    let warm = bus.commit(async |tx| tx.append("bench", id, 0, [tick(id, 0)]).await).await?;
    warm.published().await?;
    let started = Instant::now();
    let mut last = None;
    for first in (1..=total).step_by(10) {
        let events: Vec<_> = (first..first + 10).map(|n| tick(id, n)).collect();
        let committed = bus.commit(async |tx| tx.append("bench", id, first as i64, events).await).await?;
        last = Some(committed.receipt);
    }
    let committed = rate(total, started.elapsed());
    if let Some(receipt) = last {
        receipt.published().await?;
    }
    let in_stream = rate(total, started.elapsed());
    bus.shutdown().await;
    drop_store(&store).await?;
    Ok((committed, in_stream, bare))
}

/// One row of DURABILITY.md's table, for the broker `NATS_URL` points at (one
/// server, one with `sync_interval: always`, or a cluster with `BENCH_REPLICAS=3`; named by
/// `BENCH_BROKER`): raw JetStream publishing pipelined and one message at a time, the relay
/// draining a backlog, beside PostgreSQL's bare commit (a multi-row INSERT per commit) at 8
/// committers × 1 event and 64 × 10, in the same run.
async fn bench_durability(env: &Env) -> Result<()> {
    let replicas: usize = std::env::var("BENCH_REPLICAS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let label = std::env::var("BENCH_BROKER").unwrap_or_else(|_| format!("R{replicas}"));
    let total: u64 = if env.quick { 10_000 } else { 30_000 };
    let publisher = NatsPublisher::connect(&env.nats_url, NatsConfig::default()).await?;
    for old in ["BENCH", "BENCH_DUR"] {
        let _ = publisher.jetstream().delete_stream(old).await;
    }
    publisher.ensure_stream(&StreamSpec::new("BENCH_DUR", ["bench.>"]).with_replicas(replicas)).await?;
    let body = bench_body()?;
    let js = publisher.jetstream().clone();
    let pipelined = rate(total, raw_pipelined(&js, &body, total).await?);
    // Raw JetStream, one message at a time: the acknowledgement's latency.
    let mut latencies = Vec::new();
    let started = Instant::now();
    for _ in 0..1_000 {
        let t = Instant::now();
        js.send_publish("bench.Raw", raw_message(&body)).await?.await?;
        latencies.push(t.elapsed());
    }
    let one_at_a_time = rate(1_000, started.elapsed());
    latencies.sort();

    // The relay draining a backlog of `total` events over 1 000 aggregates.
    let store = fresh_store(env, 10).await?;
    backlog(&store, Arc::new(publisher.clone()), total, 1_000).await?;
    let relay = LogRelay::new(store.clone(), Arc::new(publisher.clone()), RelayConfig::default());
    let started = Instant::now();
    let mut published = 0;
    while published < total {
        published += relay.run_once().await?.published;
    }
    let drain = rate(total, started.elapsed());

    // PostgreSQL's bare commit, the rate a service commits events at.
    let pool = pg_pool(&store)?;
    let table = raw_table(&pool, store.config().schema.as_str()).await?;
    let mut bare = Vec::new();
    for (committers, per_commit) in [(8usize, 1usize), (64, 10)] {
        let rounds = (6_000 / (committers * per_commit)).max(1);
        let (pool, table) = (pool.clone(), table.clone());
        let (rate, _) = run_committers(committers, rounds, per_commit, move |task, round| {
            let (pool, table) = (pool.clone(), table.clone());
            async move {
                let id = Uuid::now_v7();
                let events: Vec<_> = (0..per_commit as u64).map(|n| tick(id, n)).collect();
                let _ = (task, round);
                raw_insert(&pool, &table, id, 1, &events).await
            }
        })
        .await?;
        bare.push(rate);
    }
    println!("\n### Broker durability: {label} ({})\n", fsync_label(env).await?);
    println!(
        "| broker | raw publish, pipelined, events/s | raw publish, one at a time, events/s | ack p50 | ack p99 | \
         relay drain events/s | bare commit 8 × 1 events/s | bare commit 64 × 10 events/s |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    println!(
        "| {label} | {pipelined:.0} | {one_at_a_time:.0} | {:.2} ms | {:.2} ms | {drain:.0} | {:.0} | {:.0} |",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        bare[0],
        bare[1]
    );
    let _ = publisher.jetstream().delete_stream("BENCH_DUR").await;
    drop_store(&store).await
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

async fn bench_replay(env: &Env) -> Result<()> {
    println!("\n### Replay\n");
    let store = fresh_store(env, 6).await?;
    let id = Uuid::now_v7();
    let mut sequence = 0i64;
    while sequence < 10_000 {
        let events: Vec<_> = (0..1_000).map(|i| tick(id, (sequence + i) as u64)).collect();
        store.append("bench", id, sequence, events).await?;
        sequence += 1_000;
    }
    let started = Instant::now();
    let loaded = store.load::<Tick>(id, 1).filter(|r| std::future::ready(r.is_ok())).count().await;
    let elapsed = started.elapsed();
    println!("| read | events | time | events/s | RSS growth while reading |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    println!(
        "| `load`, one aggregate | {loaded} | {:.1} ms | {:.0} | - |",
        elapsed.as_secs_f64() * 1e3,
        rate(loaded as u64, elapsed)
    );

    let total = if env.quick { 100_000 } else { 1_000_000 };
    let mut written = 10_000u64;
    let mut checkpoints = vec![total / 10, total];
    checkpoints.dedup();
    for target in checkpoints {
        // Grow the store to `target` events (raw appends of 1 000, in 100 aggregates).
        while written < target {
            let id = Uuid::now_v7();
            for round in 0..10 {
                let events: Vec<_> = (0..1_000).map(|i| tick(id, i)).collect();
                store.append("bench", id, round * 1_000, events).await?;
            }
            written += 10_000;
        }
        let before = rss_kib();
        let mut peak = before;
        let started = Instant::now();
        let mut stream = store.stream_all::<Tick>(StreamPosition::START).page_size(1_000);
        let mut read = 0u64;
        while let Some(item) = stream.next().await {
            item?;
            read += 1;
            if read.is_multiple_of(10_000) {
                peak = peak.max(rss_kib());
            }
        }
        let elapsed = started.elapsed();
        println!(
            "| `stream_all` | {read} | {:.2} s | {:.0} | {} KiB |",
            elapsed.as_secs_f64(),
            rate(read, elapsed),
            peak.saturating_sub(before)
        );
    }
    drop_store(&store).await
}

/// The read paths beside their ceilings, in the same run: 50 000 events over 1 000
/// aggregates in a stream; a raw async-nats pull consumer acknowledging each message, the
/// `Subscriber` with a no-op handler and with a handler that awaits 2 ms (one database
/// write), each on a durable consumer of its own; then `ProjectionRunner::catch_up` with a
/// no-op projection beside `stream_all` read to the end.
async fn bench_consume(env: &Env) -> Result<()> {
    let total: u64 = if env.quick { 10_000 } else { 50_000 };
    let publisher = nats(env, "BENCH").await?;
    let store = fresh_store(env, 10).await?;
    backlog(&store, Arc::new(publisher.clone()), total, 1_000).await?;
    let relay = LogRelay::new(store.clone(), Arc::new(publisher.clone()), RelayConfig::default());
    let mut published = 0;
    while published < total {
        published += relay.run_once().await?.published;
    }
    println!("\n### Consumers and projections ({total} events, 1 000 aggregates)\n");
    println!("| read path | events/s | ceiling | ceiling events/s | ratio |");
    println!("| --- | ---: | --- | ---: | ---: |");
    let raw = raw_pull(&publisher, total).await?;
    let noop = subscribe(&publisher, total, "noop", Duration::ZERO).await?;
    println!(
        "| `Subscriber`, no-op handler | {noop:.0} | raw async-nats pull consumer, ack each | {raw:.0} | {:.0} % |",
        100.0 * noop / raw
    );
    let slow = subscribe(&publisher, total.min(20_000), "slow", Duration::from_millis(2)).await?;
    println!("| `Subscriber`, handler awaiting 2 ms | {slow:.0} | target | 10000 | {:.0} % |", slow / 100.0);
    let (projection, stream_all) = catch_up(&store, total).await?;
    println!(
        "| `ProjectionRunner::catch_up`, no-op projection | {projection:.0} | `stream_all` to the end | {stream_all:.0} | {:.0} % |",
        100.0 * projection / stream_all
    );
    drop_store(&store).await
}

/// Reads `total` messages with a raw pull consumer, acknowledging each; returns events/s.
async fn raw_pull(publisher: &NatsPublisher, total: u64) -> Result<f64> {
    let stream = publisher.jetstream().get_stream("BENCH").await?;
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("raw".into()),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 256,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut messages = consumer.stream().max_messages_per_batch(256).messages().await?;
    let mut read = 0;
    while read < total {
        let Some(message) = messages.next().await else { break };
        message?.ack().await?;
        read += 1;
    }
    Ok(rate(read, started.elapsed()))
}

/// Handles `total` messages with a `Subscriber` whose handler awaits `pause`; events/s.
async fn subscribe(publisher: &NatsPublisher, total: u64, name: &str, pause: Duration) -> Result<f64> {
    let knob = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<usize>().ok());
    let mut config = SubscriberConfig::new("BENCH", name);
    if let Some(n) = knob("SUB_IN_FLIGHT") {
        config = config.with_max_in_flight(n);
    }
    if let Some(n) = knob("SUB_CONCURRENCY") {
        config = config.with_max_concurrency(n);
    }
    let subscriber = Subscriber::<Tick>::new(publisher.jetstream(), config).await?;
    let started = Instant::now();
    // The clock stops when the last event is handled, not after the shutdown (which waits
    // up to a second for the open pull requests to end).
    let finished = std::sync::Mutex::new(None);
    let watch = async {
        while subscriber.stats().handled.load(std::sync::atomic::Ordering::Relaxed) < total {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        *finished.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(started.elapsed());
    };
    let handler = async |_: edupulse_events::EventEnvelope<Tick>| {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        Ok(())
    };
    subscriber.run(handler, watch).await?;
    let elapsed = finished.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(rate(total, elapsed.unwrap_or_else(|| started.elapsed())))
}

/// A projection that does nothing: what the runner itself costs.
struct Nothing;

impl edupulse_events::Projection<Tick> for Nothing {
    fn name(&self) -> &str {
        "nothing"
    }

    async fn apply(
        &self,
        _: &mut edupulse_events::Transaction,
        _: &edupulse_events::EventEnvelope<Tick>,
    ) -> std::result::Result<(), edupulse_events::BoxError> {
        Ok(())
    }
}

/// `ProjectionRunner::catch_up` over the store, and `stream_all` read to the end; events/s.
async fn catch_up(store: &EventStore, total: u64) -> Result<(f64, f64)> {
    // As for the drain: vacuumed and checkpointed first, so that neither read pays for
    // setting the fresh rows' hint bits or shares the cores with autovacuum.
    let pool = pg_pool(store)?;
    let schema = store.config().schema.as_str();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("VACUUM (ANALYZE) \"{schema}\".events")))
        .execute(&pool)
        .await?;
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(&pool).await {
        eprintln!("CHECKPOINT refused ({e})");
    }
    let started = Instant::now();
    let mut stream = store.stream_all::<Tick>(StreamPosition::START);
    let mut read = 0u64;
    while let Some(item) = stream.next().await {
        item?;
        read += 1;
    }
    let stream_all = rate(read, started.elapsed());
    let runner = edupulse_events::ProjectionRunner::new(store.clone(), Nothing);
    let started = Instant::now();
    let applied = runner.catch_up().await?;
    if applied != total {
        return Err(format!("the projection applied {applied} of {total} events").into());
    }
    Ok((rate(applied, started.elapsed()), stream_all))
}

/// How a publisher of the log can be woken after a commit, and what each way costs the
/// committers: a bare commit (BEGIN, the event rows, COMMIT); the same
/// with `pg_notify` inside the transaction (PostgreSQL then takes a database-wide lock on
/// the notification queue at COMMIT, held until the commit is flushed: committers
/// serialise); `pg_notify` as a statement of its own after COMMIT (what the bus does today
/// when it wakes the relays: one more round trip); an in-process signal after COMMIT
/// (`tokio::sync::Notify`: no round trip, a publisher in another process polls instead).
async fn bench_wake(env: &Env) -> Result<()> {
    println!("\n### Waking a publisher after COMMIT: cost to the committers\n");
    println!(
        "| committers | events per commit | bare commit events/s | p50 | p99 | NOTIFY in the transaction | p50 | p99 | \
         NOTIFY after COMMIT | p50 | p99 | in-process signal | p50 | p99 |"
    );
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let per_run = if env.quick { 600 } else { 3_000 };
    for (committers, per_commit) in [(1usize, 1usize), (8, 1), (64, 1), (64, 10)] {
        let rounds = (per_run / (committers * per_commit)).max(1);
        let store = fresh_store(env, (committers as u32 + 4).min(80)).await?;
        let pool = pg_pool(&store)?;
        let table = raw_table(&pool, store.config().schema.as_str()).await?;
        let signal = Arc::new(tokio::sync::Notify::new());
        let mut row = format!("| {committers} | {per_commit} |");
        // The first pass, one commit per committer, only opens the pool's connections
        // (connection set-up is not what this table measures).
        for (wake, rounds) in [
            (Wake::None, 1),
            (Wake::None, rounds),
            (Wake::NotifyInTransaction, rounds),
            (Wake::NotifyAfterCommit, rounds),
            (Wake::Signal, rounds),
        ] {
            let warm_up = rounds == 1;
            let (events_per_second, latencies) = run_committers(committers, rounds, per_commit, {
                let (pool, table, signal) = (pool.clone(), table.clone(), signal.clone());
                move |_, round| {
                    let (pool, table, signal) = (pool.clone(), table.clone(), signal.clone());
                    async move {
                        let id = Uuid::now_v7();
                        let first = (round * per_commit) as u64;
                        let events: Vec<_> =
                            (first..first + per_commit as u64).map(|n| tick(id, n)).collect();
                        let mut tx = pool.begin().await?;
                        raw_insert_returning(&mut tx, &table, id, 1, &events).await?;
                        if wake == Wake::NotifyInTransaction {
                            sqlx::query("SELECT pg_notify('edupulse_bench_wake', '')")
                                .execute(&mut *tx)
                                .await?;
                        }
                        tx.commit().await?;
                        match wake {
                            Wake::NotifyAfterCommit => {
                                sqlx::query("SELECT pg_notify('edupulse_bench_wake', '')")
                                    .execute(&pool)
                                    .await?;
                            }
                            Wake::Signal => signal.notify_one(),
                            Wake::None | Wake::NotifyInTransaction => {}
                        }
                        Ok(())
                    }
                }
            })
            .await?;
            if warm_up {
                continue;
            }
            row.push_str(&format!(
                " {events_per_second:.0} | {:.2} ms | {:.2} ms |",
                percentile(&latencies, 0.50).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3
            ));
        }
        println!("{row}");
        drop_store(&store).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    None,
    NotifyInTransaction,
    NotifyAfterCommit,
    Signal,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if std::env::var("DATABASE_URL").is_err() || std::env::var("NATS_URL").is_err() {
        // A plain `cargo bench` on a machine without servers: say how to run it.
        eprintln!("loadgen needs DATABASE_URL and NATS_URL: run `bash scripts/bench.sh` (it starts both)");
        return Ok(());
    }
    let env = Env {
        database_url: std::env::var("DATABASE_URL")
            .map_err(|_| "set DATABASE_URL (or run scripts/bench.sh)")?,
        nats_url: std::env::var("NATS_URL").map_err(|_| "set NATS_URL (or run scripts/bench.sh)")?,
        quick: args.iter().any(|a| a == "--quick"),
        fresh: args.iter().any(|a| a == "--fresh"),
        only: args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1).cloned()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        println!("## edupulse-events load generator{}", if env.quick { " (quick)" } else { "" });
        run_scenarios(&env).await
    })
}

async fn run_scenarios(env: &Env) -> Result<()> {
    {
        let wanted = |name: &str| env.only.as_deref().is_none_or(|o| o == name);
        if wanted("append") {
            bench_append(env).await?;
        }
        if wanted("publish") {
            bench_publish(env).await?;
        }
        if wanted("relay") {
            bench_relay(env).await?;
        }
        if wanted("replay") {
            bench_replay(env).await?;
        }
        if wanted("wake") {
            bench_wake(env).await?;
        }
        if wanted("consume") {
            bench_consume(env).await?;
        }
        // Only when asked: its figure is the broker setting's, not the framework's.
        if env.only.as_deref() == Some("durability") {
            bench_durability(env).await?;
        }
        Ok(())
    }
}
