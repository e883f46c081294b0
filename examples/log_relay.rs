//! The standalone publisher: a process that only publishes the store's log to the broker,
//! with a progress line and a graceful stop on Ctrl-C.
//!
//! Services commit through an `EventBus` (with `background_relay: false` when relays like
//! this one do the publishing) and any number of these run beside them: they share the
//! log's partitions, one holder each, and the others stand by to take over. Once a second
//! it prints what it published and what `relay_lag` says: pending, parked (refused by the
//! broker for good) and held back (committed above the transaction horizon: an older
//! write transaction is still running, and which one is named).
//!
//! `cargo run --example log_relay` runs until Ctrl-C; `-- --seconds 5` stops by itself.
//! `DATABASE_URL` / `NATS_URL` for PostgreSQL and NATS JetStream. `--demo` first commits a
//! backlog with no relay running (as if its writer had died right after COMMIT) and keeps
//! committing a trickle; on the embedded default, an in-memory database nobody else
//! writes to, the demo is always on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use edupulse_events::wire::OutgoingMessage;
use edupulse_events::{
    Backends, BoxFuture, BusConfig, DomainEvent, EventBus, EventError, LogRelay, PublishReceipt, Publisher,
    RelayConfig, RelayLag, StreamSpec, Uuid,
};
use serde::{Deserialize, Serialize};

/// A quiz was submitted.
#[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
#[event(context = "quizzes")]
pub struct QuizSubmitted {
    /// The quiz.
    #[event(aggregate_id)]
    pub quiz_id: Uuid,
    /// The score.
    pub score: u32,
}

/// The broker, counting what it acknowledged: the progress line's "published".
struct Counting {
    inner: Arc<dyn Publisher>,
    published: AtomicU64,
    duplicates: AtomicU64,
}

impl Publisher for Counting {
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            let outcomes = self.inner.publish(messages).await;
            for receipt in outcomes.iter().flatten() {
                let counter = if receipt.duplicate { &self.duplicates } else { &self.published };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            outcomes
        })
    }

    edupulse_events::forward_publisher!(inner);
}

struct Args {
    seconds: Option<u64>,
    demo: bool,
}

fn args() -> Result<Args, EventError> {
    let usage = || EventError::Config("usage: log_relay [--seconds N] [--demo]".into());
    let mut parsed = Args { seconds: None, demo: false };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => parsed.seconds = Some(args.next().and_then(|s| s.parse().ok()).ok_or_else(usage)?),
            "--demo" => parsed.demo = true,
            _ => return Err(usage()),
        }
    }
    Ok(parsed)
}

/// Commits a backlog nobody publishes yet, then a trickle of events, through a bus without
/// a relay of its own: this process's relay publishes them.
async fn demo(backends: &Backends) -> Result<tokio::task::JoinHandle<()>, EventError> {
    let quiet = BusConfig::default().with_background_relay(false);
    let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), quiet)?;
    let quizzes: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for quiz in &quizzes {
        let events: Vec<_> = (0..100).map(|score| QuizSubmitted { quiz_id: *quiz, score }).collect();
        bus.commit(async |tx| tx.append("quiz", *quiz, 0, events).await).await?;
    }
    println!("Demo: committed a backlog of 2000 events that no broker has seen yet, and a trickle follows.");
    let quiz = quizzes[0];
    Ok(tokio::spawn(async move {
        let mut sequence = 100;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let event = QuizSubmitted { quiz_id: quiz, score: 1 };
            if bus.commit(async |tx| tx.append("quiz", quiz, sequence, [event]).await).await.is_ok() {
                sequence += 1;
            }
        }
    }))
}

fn progress(published: u64, rate: f64, lag: &RelayLag) -> String {
    let oldest = lag.oldest_pending_age.map_or_else(|| "-".to_owned(), |d| format!("{} ms", d.as_millis()));
    let mut line = format!(
        "published {published:>6} ({rate:>7.0}/s) | pending {:>5} (oldest {oldest}) | parked {} | held back {}",
        lag.pending, lag.parked, lag.held_back
    );
    if let Some(t) = &lag.oldest_write_transaction {
        line.push_str(&format!(
            " by pid {} ({:?}, {}, {} s)",
            t.pid,
            t.application_name,
            t.state,
            t.age.as_secs()
        ));
    }
    line
}

#[tokio::main]
async fn main() -> Result<(), EventError> {
    let args = args()?;
    let embedded = std::env::var("DATABASE_URL").map_or(true, |url| url.is_empty());
    let backends =
        Backends::from_env(&StreamSpec::new("EDUPULSE_EXAMPLES", ["courses.>", "quizzes.>", "enrolment.>"]))
            .await?;
    println!("Store: {}. Broker: {}.", backends.database_kind, backends.broker_kind);
    let producer = if args.demo || embedded { Some(demo(&backends).await?) } else { None };

    let counting = Arc::new(Counting {
        inner: backends.publisher.clone(),
        published: AtomicU64::new(0),
        duplicates: AtomicU64::new(0),
    });
    let relay = LogRelay::new(backends.store.clone(), counting.clone(), RelayConfig::default());
    let seconds = args.seconds;
    let running = tokio::spawn(async move {
        relay
            .run(async move {
                match seconds {
                    Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                    None => {
                        // Without a signal handler (rare), run until killed.
                        if tokio::signal::ctrl_c().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            })
            .await
    });
    println!("Relay running; {}.", if seconds.is_some() { "it stops by itself" } else { "Ctrl-C stops it" });

    let (mut last, mut last_at) = (0, Instant::now());
    while !running.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if last_at.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let lag = backends.store.relay_lag().await?;
        let published = counting.published.load(Ordering::Relaxed);
        let rate = (published - last) as f64 / last_at.elapsed().as_secs_f64();
        (last, last_at) = (published, Instant::now());
        println!("{}", progress(published, rate, &lag));
    }
    if let Some(producer) = producer {
        producer.abort();
    }
    running.await.map_err(|e| EventError::Config(format!("the relay task failed: {e}")))??;

    let lag = backends.store.relay_lag().await?;
    println!(
        "Relay stopped gracefully after publishing {} events ({} re-sends the broker dropped); {} still pending \
         (the next relay publishes them), {} parked.",
        counting.published.load(Ordering::Relaxed),
        counting.duplicates.load(Ordering::Relaxed),
        lag.pending,
        lag.parked
    );
    if lag.parked > 0 {
        println!(
            "See EventStore::parked_events for why; EventStore::requeue_parked once the cause is fixed."
        );
    }
    if let Some(broker) = &backends.in_memory {
        println!("The in-process broker holds {} messages.", broker.messages().len());
    }
    Ok(())
}
