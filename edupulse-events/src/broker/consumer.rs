//! What a [`Subscriber`](crate::Subscriber) consumes from: the one place that decides
//! between a durable JetStream pull consumer and a durable consumer of the in-process
//! broker. Both speak the same rules (`durable.rs` has the in-process broker's): messages
//! pulled in bounded requests, each settled with an acknowledgement, a negative one (with a
//! delay), "in progress" or a termination; the consumer's progress read back after a crash.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;

#[cfg(feature = "nats")]
use async_nats::jetstream;
#[cfg(feature = "nats")]
use async_nats::jetstream::consumer::PullConsumer;

#[cfg(feature = "nats")]
use crate::BrokerErrorKind;
use crate::broker::durable::DurableProgress;
pub(crate) use crate::broker::durable::Settle;
use crate::broker::memory::{Delivered, InMemoryBroker};
use crate::{BoxError, EventError};

/// A durable consumer.
pub(crate) enum Consumer {
    /// JetStream's, on the server.
    #[cfg(feature = "nats")]
    JetStream(Box<PullConsumer>),
    /// The in-process broker's, by name.
    Memory(InMemoryBroker, String),
}

/// A message a pull request delivered.
pub(crate) enum Received {
    #[cfg(feature = "nats")]
    JetStream(Box<jetstream::Message>),
    Memory(Delivered),
}

/// The messages of one pull request, as they come; it ends when filled or expired.
pub(crate) type Batch = BoxStream<'static, Result<Received, BoxError>>;

impl Consumer {
    /// A pull request for at most `count` messages, open for `expires`.
    ///
    /// # Errors
    /// [`EventError::Broker`] when the request cannot be made.
    pub(crate) async fn pull(&self, count: usize, expires: Duration) -> Result<Batch, EventError> {
        match self {
            #[cfg(feature = "nats")]
            Self::JetStream(consumer) => {
                let batch =
                    consumer.batch().max_messages(count).expires(expires).messages().await.map_err(|e| {
                        EventError::broker(
                            BrokerErrorKind::Unavailable,
                            format!("cannot pull messages: {e}"),
                            e,
                        )
                    })?;
                Ok(batch
                    .map(|m| m.map(|m| Received::JetStream(Box::new(m))).map_err(|e| e as BoxError))
                    .boxed())
            }
            Self::Memory(broker, name) => {
                // Like a JetStream pull request: made at once, filled while the subscriber
                // goes on (its loop must not wait here for the messages).
                let (broker, name) = (broker.clone(), name.clone());
                let request = async move { broker.pull(&name, count, expires).await };
                let messages = futures_util::stream::once(request).flat_map(|delivered| {
                    futures_util::stream::iter(delivered.into_iter().map(|m| Ok(Received::Memory(m))))
                });
                Ok(messages.boxed())
            }
        }
    }

    /// Where the consumer stands: messages delivered and not settled, the highest stream
    /// sequence delivered, and the sequence up to which everything is settled.
    ///
    /// # Errors
    /// [`EventError::Broker`] when the server does not answer.
    pub(crate) async fn progress(&self) -> Result<DurableProgress, EventError> {
        match self {
            #[cfg(feature = "nats")]
            Self::JetStream(consumer) => {
                let info = consumer.get_info().await.map_err(|e| {
                    EventError::broker(
                        BrokerErrorKind::Unavailable,
                        format!("cannot read the consumer: {e}"),
                        e,
                    )
                })?;
                Ok(DurableProgress {
                    pending: info.num_ack_pending,
                    delivered: info.delivered.stream_sequence,
                    ack_floor: info.ack_floor.stream_sequence,
                })
            }
            Self::Memory(broker, name) => Ok(broker.consumer_progress(name).unwrap_or_default()),
        }
    }
}

impl Received {
    /// The body.
    pub(crate) fn payload(&self) -> &[u8] {
        match self {
            #[cfg(feature = "nats")]
            Self::JetStream(m) => &m.payload,
            Self::Memory(d) => &d.message.body,
        }
    }

    /// A header's value.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        match self {
            #[cfg(feature = "nats")]
            Self::JetStream(m) => m.headers.as_ref().and_then(|h| h.get(name)).map(|v| v.as_str()),
            Self::Memory(d) => d.message.header(name),
        }
    }

    pub(crate) fn subject(&self) -> &str {
        match self {
            #[cfg(feature = "nats")]
            Self::JetStream(m) => m.subject.as_str(),
            Self::Memory(d) => &d.message.subject,
        }
    }

    /// (deliveries so far, this one included; the stream sequence).
    pub(crate) fn delivery(&self) -> (i64, u64) {
        match self {
            #[cfg(feature = "nats")]
            Self::JetStream(m) => m.info().map_or((1, 0), |i| (i.delivered, i.stream_sequence)),
            Self::Memory(d) => (d.deliveries, d.message.sequence),
        }
    }

    /// Settles it. A lost word means a redelivery, which handlers must tolerate anyway: the
    /// failure is logged, not returned.
    pub(crate) async fn settle(&self, how: Settle) {
        match self {
            #[cfg(feature = "nats")]
            Self::JetStream(m) => {
                let kind = match how {
                    Settle::Ack => jetstream::AckKind::Ack,
                    Settle::Nak(delay) => jetstream::AckKind::Nak(delay),
                    Settle::Progress => jetstream::AckKind::Progress,
                    Settle::Term => jetstream::AckKind::Term,
                };
                if let Err(e) = m.ack_with(kind).await {
                    tracing::warn!(error = %e, "subscriber: acknowledgement failed");
                }
            }
            Self::Memory(d) => d.settle(how),
        }
    }
}
