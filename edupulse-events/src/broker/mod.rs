//! The broker side: the [`Publisher`] trait the relay publishes through, NATS JetStream and
//! the in-process broker behind it, and the [`Subscriber`] that consumes what they carry.
//! Builds on the event layer only; it knows nothing of the store.

//!
//! NATS (the publisher, the subscriber and the batches they speak) is built with the `nats`
//! feature; the in-process broker always.

#[cfg(feature = "nats")]
mod batch;
#[cfg(feature = "nats")]
mod connect;
#[cfg(feature = "nats")]
mod fast;
#[cfg(feature = "nats")]
mod held;
#[cfg(feature = "nats")]
mod lanes;
#[cfg(feature = "nats")]
mod link;
mod memory;
#[cfg(feature = "nats")]
mod nats;
mod publisher;
#[cfg(feature = "nats")]
mod pulls;
#[cfg(feature = "nats")]
mod recovery;
mod stream_spec;
#[cfg(feature = "nats")]
mod subscriber;
#[cfg(feature = "nats")]
mod version;

pub use self::memory::{BrokerMessage, InMemoryBroker};
#[cfg(feature = "nats")]
pub use self::nats::{NatsConfig, NatsPublisher};
pub use self::publisher::{AggregateFilter, BoxFuture, PublishReceipt, Publisher, StreamState};
pub use self::stream_spec::StreamSpec;
#[cfg(feature = "nats")]
pub use self::subscriber::{PoisonReport, Subscriber, SubscriberConfig, SubscriberStats, UnknownEventPolicy};
