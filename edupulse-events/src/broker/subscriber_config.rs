//! A [`Subscriber`](crate::Subscriber)'s settings, what it does with unknown event types,
//! and what it reports: the same on both brokers.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::EventError;
use crate::event::subject::validate_filter;

/// What to do with a message whose event type the consumer does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnknownEventPolicy {
    /// Acknowledge it and count it in [`SubscriberStats::unknown`]: the consumer is not
    /// interested (the default).
    Ack,
    /// Terminate it and report it like a poison message: every event on these subjects
    /// should be known.
    Refuse,
}

/// Settings of a [`Subscriber`](crate::Subscriber): [`SubscriberConfig::new`], then the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SubscriberConfig {
    /// The JetStream stream to consume (the in-process broker has one stream: there, the
    /// name is not looked at).
    pub stream: String,
    /// The durable consumer's name: the server remembers its progress.
    pub durable_name: String,
    /// Only subjects matching this filter (default: every subject of the stream).
    pub filter_subject: Option<String>,
    /// Deliveries before a failing message is terminated (default 5).
    pub max_deliver: i64,
    /// Delay before a failed message is redelivered (default 1 s).
    pub nak_delay: Duration,
    /// How long the server waits for an acknowledgement before redelivering (default 30 s).
    pub ack_wait: Duration,
    /// Messages fetched and not yet settled at once: the memory bound (default 256; the
    /// server's `max_ack_pending` for the consumer).
    pub max_in_flight: usize,
    /// Messages handled at once, each of another aggregate (default 64; at most
    /// `max_in_flight` run, as only those are held).
    pub max_concurrency: usize,
    /// Unknown event types (default [`UnknownEventPolicy::Ack`]).
    pub unknown_events: UnknownEventPolicy,
}

impl SubscriberConfig {
    /// Defaults for a durable consumer `durable_name` of `stream`.
    pub fn new(stream: impl Into<String>, durable_name: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable_name: durable_name.into(),
            filter_subject: None,
            max_deliver: 5,
            nak_delay: Duration::from_secs(1),
            ack_wait: Duration::from_secs(30),
            max_in_flight: 256,
            max_concurrency: 64,
            unknown_events: UnknownEventPolicy::Ack,
        }
    }
}

setters!(SubscriberConfig {
    with_max_deliver => max_deliver: i64,
    with_nak_delay => nak_delay: Duration,
    with_ack_wait => ack_wait: Duration,
    with_max_in_flight => max_in_flight: usize,
    with_max_concurrency => max_concurrency: usize,
    with_unknown_events => unknown_events: UnknownEventPolicy,
});

impl SubscriberConfig {
    /// Only subjects matching `filter` (a subject, `*` and `>` wildcards allowed).
    #[must_use]
    pub fn with_filter_subject(mut self, filter: impl Into<String>) -> Self {
        self.filter_subject = Some(filter.into());
        self
    }

    /// An invalid setting, as an error.
    pub(crate) fn check(&self) -> Result<(), EventError> {
        if self.max_deliver < 1
            || self.max_in_flight == 0
            || self.max_concurrency == 0
            || self.ack_wait.is_zero()
        {
            return Err(EventError::Config(
                "subscriber configuration: max_deliver, max_in_flight and max_concurrency must be at least 1, \
                 ack_wait above zero"
                    .into(),
            ));
        }
        if let Some(filter) = &self.filter_subject {
            validate_filter(filter)?;
        }
        Ok(())
    }
}

/// A message given up on: terminated after its last delivery, or refused.
#[derive(Debug, Clone)]
pub struct PoisonReport {
    /// The message's sequence in the stream.
    pub stream_sequence: u64,
    /// Its subject.
    pub subject: String,
    /// Its event type header, if any.
    pub event_type: Option<String>,
    /// How often it was delivered.
    pub deliveries: i64,
    /// The last error.
    pub error: String,
}

/// Counters of a subscriber.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Messages handled and acknowledged.
    pub handled: AtomicU64,
    /// Failed attempts that were negatively acknowledged for redelivery.
    pub retried: AtomicU64,
    /// Messages terminated and reported.
    pub poisoned: AtomicU64,
    /// Messages of unknown event types acknowledged under [`UnknownEventPolicy::Ack`].
    pub unknown: AtomicU64,
}
