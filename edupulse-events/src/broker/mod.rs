//! The broker side: the [`Publisher`] trait the relay publishes through, NATS JetStream and
//! the in-process broker behind it, and the [`Subscriber`] that consumes what they carry.
//! Builds on the event layer only; it knows nothing of the store.

//!
//! NATS (the publisher, JetStream's consumers and the batches they speak) is built with the
//! `nats` feature; the in-process broker and the subscriber always.

#[cfg(feature = "nats")]
mod batch;
#[cfg(feature = "nats")]
mod connect;
mod consumer;
mod durable;
#[cfg(feature = "nats")]
mod fast;
#[cfg(feature = "nats")]
mod held;
#[cfg(feature = "nats")]
mod jetstream_durable;
mod lanes;
#[cfg(feature = "nats")]
mod link;
mod memory;
#[cfg(feature = "nats")]
mod nats;
mod publisher;
mod pulls;
mod recovery;
mod stream_spec;
mod subscriber;
mod subscriber_config;
#[cfg(feature = "nats")]
mod version;

pub use self::memory::{BrokerMessage, InMemoryBroker};
#[cfg(feature = "nats")]
pub use self::nats::{NatsConfig, NatsPublisher};
pub use self::publisher::{AggregateFilter, BoxFuture, PublishReceipt, Publisher, StreamState};
pub use self::stream_spec::StreamSpec;
pub use self::subscriber::{PoisonReport, Subscriber, SubscriberConfig, SubscriberStats, UnknownEventPolicy};
