//! The broker side: the [`Publisher`] trait the relay publishes through, NATS JetStream and
//! the in-process broker behind it, and the [`Subscriber`] that consumes what they carry.
//! Builds on the event layer only; it knows nothing of the store.

mod batch;
mod connect;
mod fast;
mod held;
mod lanes;
mod link;
mod memory;
mod nats;
mod publisher;
mod pulls;
mod recovery;
mod subscriber;
mod version;

pub use self::memory::{BrokerMessage, InMemoryBroker};
pub use self::nats::{NatsConfig, NatsPublisher, StreamSpec};
pub use self::publisher::{AggregateFilter, BoxFuture, PublishReceipt, Publisher, StreamState};
pub use self::subscriber::{PoisonReport, Subscriber, SubscriberConfig, SubscriberStats, UnknownEventPolicy};
