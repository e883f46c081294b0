//! Choosing the backends from URLs: PostgreSQL or the embedded SQLite store, NATS
//! JetStream or the in-process broker. User code is the same for all four combinations.

use std::sync::Arc;

use crate::broker::{InMemoryBroker, Publisher, StreamSpec, Subscriber, SubscriberConfig};
#[cfg(feature = "nats")]
use crate::broker::{NatsConfig, NatsPublisher};
use crate::store::{DatabasePool, EventStore, StoreConfig};
use crate::{DomainEvent, EventError};

/// The URL of the embedded default: an in-memory SQLite database.
pub const EMBEDDED_DATABASE_URL: &str = "sqlite::memory:";

/// A store and a publisher, connected, migrated and with the stream in place.
///
/// ```
/// use edupulse_events::{Backends, StreamSpec};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), edupulse_events::EventError> {
/// // PostgreSQL and NATS when DATABASE_URL and NATS_URL are set; else SQLite in memory and
/// // the in-process broker. The code that follows is the same for both.
/// let stream = StreamSpec::new("EDUPULSE", ["courses.>"]);
/// let backends = Backends::connect(None, None, Default::default(), &stream).await?;
/// assert_eq!(backends.database_kind, "SQLite (embedded)");
/// // On NATS, `backends.nats` holds the connected publisher: its JetStream context is
/// // what a `Subscriber` consumes from, without a second connection.
/// if let Some(nats) = &backends.nats {
///     let _context = nats.jetstream();
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Backends {
    /// The event store.
    pub store: EventStore,
    /// The broker.
    pub publisher: Arc<dyn Publisher>,
    /// The in-process broker, when no NATS URL was given (to look at what was published).
    pub in_memory: Option<InMemoryBroker>,
    /// The NATS publisher, when a NATS URL was given: its
    /// [`jetstream`](NatsPublisher::jetstream) context is the connected client, for a
    /// [`Subscriber`](crate::Subscriber) and the application's own use.
    #[cfg(feature = "nats")]
    pub nats: Option<NatsPublisher>,
    /// `"PostgreSQL"` or `"SQLite (embedded)"`.
    pub database_kind: &'static str,
    /// `"NATS JetStream"` or `"in-process broker"`.
    pub broker_kind: &'static str,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("database", &self.database_kind)
            .field("broker", &self.broker_kind)
            .finish_non_exhaustive()
    }
}

impl Backends {
    /// Connects to `database_url` (default: [`EMBEDDED_DATABASE_URL`]) and to `nats_url`
    /// (default: an [`InMemoryBroker`]), applies the migrations and ensures `stream`.
    ///
    /// # Errors
    /// [`EventError::Config`], [`EventError::Connect`] (a server down, unknown or refusing
    /// the credentials), [`EventError::Database`], [`EventError::Broker`]. Credentials are
    /// never part of the messages.
    pub async fn connect(
        database_url: Option<&str>,
        nats_url: Option<&str>,
        config: StoreConfig,
        stream: &StreamSpec,
    ) -> Result<Self, EventError> {
        let database_url = database_url.filter(|u| !u.is_empty()).unwrap_or(EMBEDDED_DATABASE_URL);
        let store = EventStore::connect(database_url, config).await?;
        store.migrate().await?;
        let database_kind = match store.pool() {
            #[cfg(feature = "postgres")]
            DatabasePool::Postgres(_) => "PostgreSQL",
            #[cfg(feature = "sqlite")]
            DatabasePool::Sqlite(_) => "SQLite (embedded)",
        };
        match nats_url.filter(|u| !u.is_empty()) {
            #[cfg(feature = "nats")]
            Some(url) => {
                let nats = NatsPublisher::connect(url, NatsConfig::default()).await?;
                nats.ensure_stream(stream).await?;
                let publisher = Arc::new(nats.clone());
                let broker_kind = "NATS JetStream";
                Ok(Self { store, publisher, in_memory: None, nats: Some(nats), database_kind, broker_kind })
            }
            #[cfg(not(feature = "nats"))]
            Some(_) => {
                let _ = stream;
                Err(EventError::Config(
                    "a NATS URL was given, but NATS support is not built in: enable the `nats` feature of \
                     edupulse-events"
                        .into(),
                ))
            }
            None => {
                let broker = InMemoryBroker::new();
                Ok(Self {
                    store,
                    publisher: Arc::new(broker.clone()),
                    in_memory: Some(broker),
                    #[cfg(feature = "nats")]
                    nats: None,
                    database_kind,
                    broker_kind: "in-process broker",
                })
            }
        }
    }

    /// A [`Subscriber`] on the broker these backends connected: a durable JetStream consumer
    /// of `config.stream`, or a durable consumer of the in-process broker; the same
    /// settings, rules and handler on both.
    ///
    /// # Errors
    /// As [`Subscriber::new`] and [`Subscriber::in_memory`].
    pub async fn subscriber<E: DomainEvent>(
        &self,
        config: SubscriberConfig,
    ) -> Result<Subscriber<E>, EventError> {
        #[cfg(feature = "nats")]
        if let Some(nats) = &self.nats {
            return Subscriber::new(nats.jetstream(), config).await;
        }
        match &self.in_memory {
            Some(broker) => Subscriber::in_memory(broker, config),
            None => Err(EventError::Config("these backends have no broker to subscribe to".into())),
        }
    }

    /// [`connect`](Backends::connect) with `DATABASE_URL` and `NATS_URL` from the
    /// environment; either may be unset for the embedded default.
    ///
    /// # Errors
    /// As [`connect`](Backends::connect).
    pub async fn from_env(stream: &StreamSpec) -> Result<Self, EventError> {
        let database_url = std::env::var("DATABASE_URL").ok();
        let nats_url = std::env::var("NATS_URL").ok();
        Self::connect(database_url.as_deref(), nats_url.as_deref(), StoreConfig::default(), stream).await
    }
}
