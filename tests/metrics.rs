//! The metrics of `edupulse_events::telemetry`, recorded through the `metrics` facade,
//! rendered in Prometheus' text format by `metrics-exporter-prometheus` and scraped over HTTP
//! from the `metrics` example's endpoint, against a real PostgreSQL and nats-server: every
//! counter, gauge and histogram with the value the work done implies.

mod common;
#[path = "../examples/metrics/serve.rs"]
mod serve;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::nats::{self, NatsServer, STREAM};
use common::{CourseEvent, counted, store};
use edupulse_events::{
    BoxError, BusConfig, EventBus, EventEnvelope, EventError, Projection, ProjectionRunner, Subscriber,
    SubscriberConfig, Transaction, Uuid,
};
use metrics_exporter_prometheus::PrometheusBuilder;

struct Noop;

impl Projection<CourseEvent> for Noop {
    fn name(&self) -> &str {
        "metrics_noop"
    }

    async fn apply(&self, _: &mut Transaction, _: &EventEnvelope<CourseEvent>) -> Result<(), BoxError> {
        Ok(())
    }
}

/// The value of the sample `name` (with its labels, as rendered) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn every_metric_is_recorded_with_the_value_the_work_implies() {
    // The recorder first: a subscriber registers its counters when it is built.
    let handle = PrometheusBuilder::new().install_recorder().unwrap();
    let server = NatsServer::start().await;
    let publisher = nats::publisher(&server).await;
    let store = store().await;
    let bus = EventBus::new(store.clone(), Arc::new(publisher.clone()), BusConfig::default()).unwrap();
    let id = Uuid::now_v7();
    for n in 0..5 {
        bus.commit(async |tx| tx.append("lesson", id, n, [counted(n as u64)]).await)
            .await
            .unwrap()
            .receipt
            .published()
            .await
            .unwrap();
    }
    // A stale expectation: one conflict, nothing appended.
    let stale = store.append("lesson", id, 2, [counted(9)]).await;
    assert!(matches!(stale, Err(EventError::Concurrency { .. })), "{stale:?}");
    common::until_readable(&store, 5).await;
    let runner = ProjectionRunner::new(store.clone(), Noop);
    assert_eq!(runner.catch_up().await.unwrap(), 5);
    // The lag counts events past the relays' saved checkpoints, saved once per
    // `checkpoint_interval`: it reaches 0 shortly after the last acknowledgement.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while store.relay_lag().await.unwrap().pending > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the relay's checkpoints were not saved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let config = SubscriberConfig::new(STREAM, "metrics").with_nak_delay(Duration::from_millis(20));
    let subscriber = Subscriber::<CourseEvent>::new(publisher.jetstream(), config).await.unwrap();
    let failed_once = AtomicBool::new(false);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = subscriber.run(
        async |_| {
            if !failed_once.swap(true, Ordering::SeqCst) {
                return Err("injected failure".into());
            }
            Ok(())
        },
        async move {
            let _ = stopped.await;
        },
    );
    let watch = async {
        while subscriber.stats().handled.load(Ordering::Relaxed) < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
    };
    let (result, ()) = tokio::join!(run, watch);
    result.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    tokio::spawn(serve::serve(listener, handle));
    let text = serve::scrape(&address).await.unwrap();
    assert_eq!(sample(&text, "edupulse_commits_total"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "edupulse_events_appended_total"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "edupulse_append_conflicts_total"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "edupulse_events_published_total"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "edupulse_publish_failures_total"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "edupulse_events_parked_total"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "edupulse_publish_latency_seconds_count"), Some(5.0), "{text}");
    let p99 = sample(&text, "edupulse_publish_latency_seconds{quantile=\"0.99\"}").unwrap();
    assert!((0.0..5.0).contains(&p99), "publication took {p99} s");
    assert_eq!(sample(&text, "edupulse_publisher_lag_events"), Some(0.0), "{text}");
    assert_eq!(sample(&text, "edupulse_stream_lost_partitions"), Some(0.0), "{text}");
    assert_eq!(
        sample(&text, "edupulse_projection_lag_events{projection=\"metrics_noop\"}"),
        Some(0.0),
        "{text}"
    );
    assert_eq!(sample(&text, "edupulse_subscriber_handled_total{consumer=\"metrics\"}"), Some(5.0), "{text}");
    assert_eq!(sample(&text, "edupulse_subscriber_retried_total{consumer=\"metrics\"}"), Some(1.0), "{text}");
    assert_eq!(
        sample(&text, "edupulse_subscriber_poisoned_total{consumer=\"metrics\"}"),
        Some(0.0),
        "{text}"
    );
}
