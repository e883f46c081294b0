//! A long-running outbox relay with a progress line and graceful Ctrl-C.
//!
//! It first commits a backlog without publishing it (as if the broker had been down, or
//! the process had died right after COMMIT), keeps committing a trickle of new events, and
//! runs a relay that publishes everything in order, printing published / pending / lag.
//!
//! `cargo run --example outbox_relay` runs until Ctrl-C; `-- --seconds 5` stops by itself.
//! Embedded by default; `DATABASE_URL` / `NATS_URL` for PostgreSQL and NATS JetStream.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use edupulse_events::{
    Backends, BusConfig, DomainEvent, EventBus, EventError, OutboxRelay, RelayConfig, StreamSpec, Uuid,
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

fn seconds_arg() -> Result<Option<u64>, EventError> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--seconds") {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| EventError::Config("usage: outbox_relay [--seconds N]".into())),
    }
}

#[tokio::main]
async fn main() -> Result<(), EventError> {
    let seconds = seconds_arg()?;
    let backends =
        Backends::from_env(&StreamSpec::new("EDUPULSE_EXAMPLES", ["courses.>", "quizzes.>", "enrolment.>"]))
            .await?;
    println!("Store: {}. Broker: {}.", backends.database_kind, backends.broker_kind);

    // Commit without publishing: the events wait in the outbox.
    let quiet = BusConfig { publish_after_commit: false, ..BusConfig::default() };
    let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), quiet);
    let quizzes: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let committed = Arc::new(AtomicU64::new(0));
    for quiz in &quizzes {
        let events: Vec<_> = (0..100).map(|score| QuizSubmitted { quiz_id: *quiz, score }).collect();
        bus.commit(async |tx| tx.append("quiz", *quiz, 0, events).await).await?;
        committed.fetch_add(100, Ordering::Relaxed);
    }
    println!(
        "Committed a backlog of {} events that no broker has seen yet.",
        committed.load(Ordering::Relaxed)
    );

    // A trickle of new events while the relay runs.
    let producer = {
        let (bus, committed, quiz) = (bus.clone(), committed.clone(), quizzes[0]);
        tokio::spawn(async move {
            let mut sequence = 100;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let event = QuizSubmitted { quiz_id: quiz, score: 1 };
                if bus.commit(async |tx| tx.append("quiz", quiz, sequence, [event]).await).await.is_ok() {
                    sequence += 1;
                    committed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let relay = OutboxRelay::new(backends.store.clone(), backends.publisher.clone(), RelayConfig::default());
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

    let probe = OutboxRelay::new(backends.store.clone(), backends.publisher.clone(), RelayConfig::default());
    while !running.is_finished() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let lag = probe.lag().await?;
        let total = committed.load(Ordering::Relaxed);
        let published = total.saturating_sub(u64::try_from(lag.pending).unwrap_or(0));
        let oldest = lag.oldest_age.map_or_else(|| "-".to_owned(), |d| format!("{} ms", d.as_millis()));
        println!("published {published:>5} | pending {:>5} | oldest pending {oldest}", lag.pending);
    }
    producer.abort();
    running.await.map_err(|e| EventError::Config(format!("the relay task failed: {e}")))??;
    let lag = probe.lag().await?;
    println!(
        "Relay stopped gracefully; {} events still pending (the next relay publishes them).",
        lag.pending
    );
    if let Some(broker) = &backends.in_memory {
        println!("The in-process broker holds {} messages.", broker.messages().len());
    }
    Ok(())
}
