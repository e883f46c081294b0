//! Metrics, through the [`metrics`](https://docs.rs/metrics) facade: the names the crate
//! records under, and the one function that records each.
//!
//! The crate installs no recorder and forces no exporter: an application that wants the
//! figures installs one (`metrics-exporter-prometheus`, for example; the `metrics` example
//! serves them in Prometheus' text format). Without a recorder, recording costs one atomic
//! load. Counters of a [`Subscriber`](crate::Subscriber) are registered when it is built:
//! install the recorder before.
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `edupulse_commits_total` | counter | | commits of [`EventBus::commit`](crate::EventBus::commit) |
//! | `edupulse_events_appended_total` | counter | | events committed through the store or the bus (`append_in`: written, the caller's commit unknown) |
//! | `edupulse_append_conflicts_total` | counter | | appends refused: the expected sequence did not hold |
//! | `edupulse_events_published_total` | counter | | events the broker acknowledged (relays) |
//! | `edupulse_publish_failures_total` | counter | | failed publish attempts (retried, or parked after the last) |
//! | `edupulse_events_parked_total` | counter | | events parked: refused for good, or waiting behind one that was |
//! | `edupulse_publish_latency_seconds` | histogram | | from the event's recording to the broker's acknowledgement |
//! | `edupulse_publisher_lag_events` | gauge | | committed events not yet published nor parked |
//! | `edupulse_publisher_lag_seconds` | gauge | | how long the oldest of them has waited |
//! | `edupulse_projection_lag_events` | gauge | `projection` | events after the projection's checkpoint |
//! | `edupulse_subscriber_handled_total` | counter | `consumer` | messages handled and acknowledged |
//! | `edupulse_subscriber_retried_total` | counter | `consumer` | failed attempts that will be retried |
//! | `edupulse_subscriber_poisoned_total` | counter | `consumer` | messages given up on (terminated and reported) |

use std::time::Duration;

use crate::EventError;

/// Commits of the bus.
pub const COMMITS: &str = "edupulse_commits_total";
/// Events committed.
pub const EVENTS_APPENDED: &str = "edupulse_events_appended_total";
/// Appends refused by the expected sequence.
pub const APPEND_CONFLICTS: &str = "edupulse_append_conflicts_total";
/// Events the broker acknowledged.
pub const EVENTS_PUBLISHED: &str = "edupulse_events_published_total";
/// Failed publish attempts.
pub const PUBLISH_FAILURES: &str = "edupulse_publish_failures_total";
/// Events parked.
pub const EVENTS_PARKED: &str = "edupulse_events_parked_total";
/// Recording to acknowledgement, in seconds.
pub const PUBLISH_LATENCY: &str = "edupulse_publish_latency_seconds";
/// Events not yet published nor parked.
pub const PUBLISHER_LAG_EVENTS: &str = "edupulse_publisher_lag_events";
/// The oldest unpublished event's wait, in seconds.
pub const PUBLISHER_LAG_SECONDS: &str = "edupulse_publisher_lag_seconds";
/// Relay partitions held because their stream lost messages it had acknowledged (see
/// `edupulse republish --lost`): alert on anything above zero.
pub const STREAM_LOST_PARTITIONS: &str = "edupulse_stream_lost_partitions";
/// Events after a projection's checkpoint (label `projection`).
pub const PROJECTION_LAG_EVENTS: &str = "edupulse_projection_lag_events";
/// Messages a subscriber handled (label `consumer`).
pub const SUBSCRIBER_HANDLED: &str = "edupulse_subscriber_handled_total";
/// Failed attempts a subscriber retries (label `consumer`).
pub const SUBSCRIBER_RETRIED: &str = "edupulse_subscriber_retried_total";
/// Messages a subscriber gave up on (label `consumer`).
pub const SUBSCRIBER_POISONED: &str = "edupulse_subscriber_poisoned_total";

pub(crate) fn committed() {
    metrics::counter!(COMMITS).increment(1);
}

pub(crate) fn appended(events: usize) {
    metrics::counter!(EVENTS_APPENDED).increment(events as u64);
}

/// Counts a refused expectation in `result`, which it returns unchanged.
pub(crate) fn conflicts<T>(result: Result<T, EventError>) -> Result<T, EventError> {
    if let Err(EventError::Concurrency { .. }) = &result {
        metrics::counter!(APPEND_CONFLICTS).increment(1);
    }
    result
}

/// One page of a relay: published, failed and parked events.
pub(crate) fn relayed(published: u64, failed: u64, parked: u64) {
    metrics::counter!(EVENTS_PUBLISHED).increment(published);
    metrics::counter!(PUBLISH_FAILURES).increment(failed);
    metrics::counter!(EVENTS_PARKED).increment(parked);
}

pub(crate) fn publish_latency(seconds: f64) {
    metrics::histogram!(PUBLISH_LATENCY).record(seconds);
}

pub(crate) fn publisher_lag(pending: i64, oldest: Option<Duration>, lost_partitions: usize) {
    metrics::gauge!(PUBLISHER_LAG_EVENTS).set(pending as f64);
    metrics::gauge!(PUBLISHER_LAG_SECONDS).set(oldest.map_or(0.0, |d| d.as_secs_f64()));
    metrics::gauge!(STREAM_LOST_PARTITIONS).set(lost_partitions as f64);
}

pub(crate) fn projection_lag(projection: &str, behind: u64) {
    metrics::gauge!(PROJECTION_LAG_EVENTS, "projection" => projection.to_owned()).set(behind as f64);
}

/// A subscriber's counters, registered once (with the recorder installed at that moment).
pub(crate) struct SubscriberMetrics {
    pub(crate) handled: metrics::Counter,
    pub(crate) retried: metrics::Counter,
    pub(crate) poisoned: metrics::Counter,
}

impl SubscriberMetrics {
    pub(crate) fn new(consumer: &str) -> Self {
        let label = || ("consumer", consumer.to_owned());
        Self {
            handled: metrics::counter!(SUBSCRIBER_HANDLED, &[label()]),
            retried: metrics::counter!(SUBSCRIBER_RETRIED, &[label()]),
            poisoned: metrics::counter!(SUBSCRIBER_POISONED, &[label()]),
        }
    }
}
