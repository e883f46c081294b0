//! Metrics in Prometheus' text format: the crate records through the `metrics` facade, this
//! example installs the recorder of `metrics-exporter-prometheus` and serves what it renders
//! at `http://127.0.0.1:PORT/metrics` while the bus commits, its relay publishes and a
//! projection follows. The names are listed in `edupulse_events::telemetry`.
//!
//! `cargo run --example metrics` serves until Ctrl-C; `-- --seconds 3` scrapes its own
//! endpoint over HTTP before it stops and fails when a metric is missing (CI runs it so).
//! `DATABASE_URL` / `NATS_URL` for PostgreSQL and NATS JetStream, else the embedded default.

use std::time::Duration;

use edupulse_events::{
    Backends, BoxError, BusConfig, DomainEvent, EventBus, EventEnvelope, Projection, ProjectionRunner,
    StreamSpec, Transaction, Uuid, telemetry,
};
use metrics_exporter_prometheus::PrometheusBuilder;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

mod serve;

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

/// A projection that only follows, for the lag gauge.
struct Follower;

impl Projection<QuizSubmitted> for Follower {
    fn name(&self) -> &str {
        "metrics_example"
    }

    async fn apply(&self, _: &mut Transaction, _: &EventEnvelope<QuizSubmitted>) -> Result<(), BoxError> {
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let seconds =
        std::env::args().skip_while(|a| a != "--seconds").nth(1).map(|s| s.parse::<u64>()).transpose()?;
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let backends = Backends::from_env(&StreamSpec::new("EDUPULSE_EXAMPLES", ["quizzes.>"])).await?;
    let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default())?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    println!("metrics at http://{address}/metrics ({}, {})", backends.database_kind, backends.broker_kind);
    tokio::spawn(serve::serve(listener, metrics));
    let runner = ProjectionRunner::new(backends.store.clone(), Follower);
    let quiz = Uuid::now_v7();
    let work = async {
        for n in 0_i64.. {
            let event = QuizSubmitted { quiz_id: quiz, score: (n % 100) as u32 };
            bus.commit(async |tx| tx.append("quiz", quiz, n, [event]).await)
                .await?
                .receipt
                .published()
                .await?;
            runner.catch_up().await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok::<(), BoxError>(())
    };
    match seconds {
        None => tokio::select! {
            result = work => result?,
            _ = tokio::signal::ctrl_c() => {}
        },
        Some(seconds) => {
            tokio::select! {
                result = work => result?,
                () = tokio::time::sleep(Duration::from_secs(seconds)) => {}
            }
            scrape_and_check(&address.to_string()).await?;
        }
    }
    bus.close(Duration::from_secs(10)).await?;
    Ok(())
}

/// Scrapes the endpoint as Prometheus would, and checks the bus's and the relay's metrics.
async fn scrape_and_check(address: &str) -> Result<(), BoxError> {
    let response = serve::scrape(address).await?;
    let expected = [
        telemetry::COMMITS,
        telemetry::EVENTS_APPENDED,
        telemetry::EVENTS_PUBLISHED,
        telemetry::PUBLISH_LATENCY,
        telemetry::PROJECTION_LAG_EVENTS,
    ];
    let missing: Vec<&str> = expected.into_iter().filter(|name| !response.contains(name)).collect();
    if !missing.is_empty() {
        return Err(format!("the scrape misses {missing:?}:\n{response}").into());
    }
    let commits = response.lines().find(|l| l.starts_with(telemetry::COMMITS)).unwrap_or_default();
    println!("scraped {} bytes; {commits}", response.len());
    Ok(())
}
