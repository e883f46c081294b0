//! A subscriber's start after a crash: the messages its predecessor held and never
//! acknowledged come back only once `ack_wait` has passed, by which time newer messages of
//! the same aggregates may already have been pulled. Until they are back, nothing is handled:
//! every message pulled waits in its lane, in stream order, and is kept from redelivery.

use std::time::Duration;

use tokio::time::Instant;

use crate::broker::consumer::Consumer;

/// How long past `ack_wait` the subscriber waits for its predecessor's messages before it
/// goes on without them: the server's redelivery timer and one pull request's expiry.
const GRACE: Duration = Duration::from_secs(2);

/// The messages a predecessor left unacknowledged, while they are not all back.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// The last stream sequence the consumer had delivered at the start: every message left
    /// unacknowledged is at or below it.
    upto: u64,
    /// Unacknowledged messages at the start.
    left: usize,
    /// When the subscriber stops waiting for them.
    deadline: Instant,
}

impl Recovery {
    /// What the consumer has delivered and not had acknowledged, if anything. A consumer
    /// that cannot be read (the first pull then says why) is taken as having nothing.
    pub(crate) async fn begin(consumer: &Consumer, ack_wait: Duration) -> Option<Self> {
        let info = consumer.progress().await.ok()?;
        (info.pending > 0).then(|| {
            tracing::info!(
                unacknowledged = info.pending,
                up_to_stream_sequence = info.delivered,
                "subscriber: waiting for the messages a previous run left unacknowledged before handling any"
            );
            Self {
                upto: info.delivered,
                left: info.pending,
                deadline: Instant::now() + ack_wait.saturating_add(GRACE),
            }
        })
    }

    /// Messages the subscriber may hold beyond `max_in_flight` meanwhile: the ones coming
    /// back, which the server counts as unacknowledged already.
    pub(crate) fn extra_room(&self) -> usize {
        self.left
    }

    /// Whether the wait is over: every message delivered before the start was acknowledged
    /// (by another instance, or it was not left at all), or every unacknowledged message is
    /// held here (`held` of them), or the deadline passed.
    pub(crate) async fn is_over(&self, consumer: &Consumer, held: usize) -> bool {
        if Instant::now() >= self.deadline {
            tracing::warn!(
                up_to_stream_sequence = self.upto,
                "subscriber: not every message a previous run left unacknowledged came back in time; \
                 handling goes on (their aggregates' order is not guaranteed)"
            );
            return true;
        }
        match consumer.progress().await {
            Ok(info) => {
                let over = info.ack_floor >= self.upto || info.pending <= held;
                if over {
                    tracing::info!("subscriber: the previous run's messages are back; handling starts");
                }
                over
            }
            Err(e) => {
                tracing::warn!(error = %e, "subscriber: cannot read the consumer; still waiting");
                false
            }
        }
    }
}
