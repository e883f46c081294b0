//! Domain events for Rust services: annotate plain event structs with
//! `#[derive(DomainEvent)]` and get stable type names, NATS subjects, schema versions with an
//! upcaster chain for old payloads, and typed SQL bindings; store them in PostgreSQL with
//! optimistic concurrency, and publish them to NATS JetStream from the log once they
//! committed.
//!
//! # Example
//!
//! ```
//! use edupulse_events::{DomainEvent, EventError, EventSchema, Uuid, upcast};
//! use serde::{Deserialize, Serialize};
//!
//! /// Version 2 of the event, as an older deployment wrote it.
//! #[derive(Debug, Serialize, Deserialize, DomainEvent)]
//! #[event(name = "LessonPublished", version = 2, context = "courses",
//!         upcast(from = 1, with = v1_to_v2))]
//! pub struct LessonPublishedV2 {
//!     #[event(aggregate_id)]
//!     pub lesson_id: Uuid,
//!     pub title: String,
//! }
//!
//! /// Version 1 called the title `name`.
//! fn v1_to_v2(payload: upcast::JsonValue) -> Result<upcast::JsonValue, upcast::UpcastError> {
//!     upcast::rename_field(payload, "name", "title")
//! }
//!
//! /// The current shape: version 3 added tags.
//! #[derive(Debug, Serialize, Deserialize, DomainEvent)]
//! #[event(version = 3, context = "courses", previous = LessonPublishedV2)]
//! pub struct LessonPublished {
//!     #[event(aggregate_id)]
//!     pub lesson_id: Uuid,
//!     #[event(key)]
//!     pub author_id: Uuid,
//!     pub title: String,
//!     pub tags: Vec<String>,
//! }
//!
//! impl From<LessonPublishedV2> for LessonPublished {
//!     fn from(old: LessonPublishedV2) -> Self {
//!         Self { lesson_id: old.lesson_id, author_id: Uuid::nil(), title: old.title, tags: vec![] }
//!     }
//! }
//!
//! # fn main() -> Result<(), EventError> {
//! assert_eq!(LessonPublished::EVENT_TYPE, "LessonPublished");
//! assert_eq!(LessonPublished::SUBJECT, "courses.LessonPublished");
//! assert_eq!(LessonPublished::VERSION, 3);
//!
//! // A payload stored by version 1 decodes into the current type.
//! let v1 = br#"{"lesson_id":"0190c4a8-6ad8-7f0e-9b1a-3c5d2f4e6a7b","name":"Ownership"}"#;
//! let event = LessonPublished::decode("LessonPublished", 1, v1)?;
//! assert_eq!(event.title, "Ownership");
//!
//! // A version from the future is refused with a typed error, not a panic.
//! let err = LessonPublished::decode("LessonPublished", 4, v1).unwrap_err();
//! assert!(matches!(err, EventError::UnsupportedVersion { found: 4, newest_known: 3, .. }));
//! # Ok(())
//! # }
//! ```
//!
//! # Details
//!
//! - Struct attributes, all optional, inside `#[event(...)]`:
//!   - `name = "…"`: the stable event type (default: the struct's name); `alias = "…"`,
//!     repeatable, for names that older payloads carry;
//!   - `context = "…"`: the subject prefix, giving the subject `<context>.<name>`;
//!     `subject = "…"` sets the whole subject instead. Both are checked at compile time:
//!     no empty token, no whitespace, no `*` or `>`. Without either, the subject is the name;
//!   - `version = N` (default 1) and the upcaster chain for versions `1..N`: either
//!     `previous = OldShape` (the version `N - 1` shape, itself deriving `DomainEvent`, with
//!     `impl From<OldShape> for Self`), or one `upcast(from = K, with = path::to_fn)` per older
//!     version `K`, each a raw JSON step `K -> K + 1` (see [`upcast`]). A gap is a compile
//!     error.
//! - Field attributes: `#[event(aggregate_id)]` on one field of type `Uuid` (or a newtype
//!   implementing [`AggregateId`]); `#[event(key)]` or `#[event(key = "name")]` promotes a
//!   field into the store's indexed keys (see [`IntoKeyValue`]).
//! - On an enum whose variants each wrap one event type, the derive dispatches all of the
//!   above and decodes by event type (aliases included). `#[event(context = "…")]` on the
//!   enum checks at compile time that every variant is published under that context. A
//!   subject belongs to the event type, never to the enum wrapping it, so an event travels on
//!   the same subject wherever it is published.
//! - Decoding never panics: unknown types, versions newer than the code, malformed payloads
//!   and refusing upcasters all give an [`EventError`].
//! - Upcasting is pure and runs on every read: stored rows are never rewritten.
//!
//! # The store, the bus and the relay
//!
//! ```no_run
//! # use edupulse_events::*;
//! # use std::sync::Arc;
//! # async fn demo<E: DomainEvent + Clone>(event: E, lesson_id: Uuid) -> Result<(), EventError> {
//! let store = EventStore::connect("postgres://app@127.0.0.1/app", StoreConfig::default()).await?;
//! store.migrate().await?;
//! let nats = NatsPublisher::connect("nats://127.0.0.1:4222", NatsConfig::default()).await?;
//! nats.ensure_stream(&StreamSpec::new("EDUPULSE", ["courses.>"])).await?;
//! let nats: Arc<dyn Publisher> = Arc::new(nats);
//!
//! // Events and the caller's own writes commit together; the bus's background relay
//! // publishes them from the log. Wait for the acknowledgement only when you need it.
//! let bus = EventBus::new(store.clone(), nats.clone(), BusConfig::default())?;
//! let committed = bus.commit(async |tx| tx.append("lesson", lesson_id, 0, [event.clone()]).await).await?;
//! committed.receipt.published().await?;
//!
//! // Or publish from a process of its own (any number of relays share the partitions).
//! let relay = LogRelay::new(store.clone(), nats, RelayConfig::default());
//! tokio::spawn(async move { relay.run(std::future::pending()).await });
//!
//! // Replay one aggregate, or follow the global stream from a checkpoint.
//! use futures_util::StreamExt;
//! let mut history = store.load::<E>(lesson_id, 1);
//! while let Some(envelope) = history.next().await {
//!     let envelope = envelope?;
//! }
//! let mut all = store.stream_all::<E>(StreamPosition::START).follow(std::time::Duration::from_millis(200));
//! # Ok(()) }
//! ```
//!
//! - [`EventStore`]: `append` in the caller's transaction with an expected sequence (a lost
//!   race is [`EventError::Concurrency`] with the actual sequence, never a raw
//!   unique-violation); several aggregates in one transaction commit all or nothing;
//!   [`EventStore::load`], [`EventStore::stream_all`] and [`EventStore::events_by_key`] are
//!   streams read page by page. `stream_all` orders by writing transaction so that a late
//!   commit with a lower position is never skipped; its docs explain the cost.
//! - [`EventBus::commit`]: the events and the caller's writes in one transaction, nothing
//!   else on the write path; rollback (error or panic) publishes nothing, and so does a
//!   transaction PostgreSQL aborted (a failed statement, even an ignored one) or that the
//!   caller ended on its raw connection, on either backend
//!   ([`EventError::TransactionAborted`]); an event that could not be delivered or read back
//!   is refused before anything is written ([`EventError::InvalidEvent`]; the README's "What
//!   an append checks" lists every check and its limit). It returns a
//!   [`Receipt`]: `published().await` waits for the broker's acknowledgement.
//! - [`LogRelay`]: reads the log past its checkpoints, below the transaction horizon, and
//!   publishes it pipelined, one message per aggregate in flight; a checkpoint per partition
//!   and batch. Relays share the partitions through advisory session locks, standbys take
//!   over; an event the broker refuses for good is parked with its aggregate's later events
//!   ([`EventStore::parked_events`], [`EventStore::requeue_parked`]); [`EventStore::relay_lag`]
//!   says how far behind it is and which transaction holds the horizon. Re-sends carry the
//!   same `Nats-Msg-Id`, dropped by JetStream inside the stream's duplicate window
//!   ([`StreamSpec::duplicate_window`], 2 minutes by default).
//! - [`Subscriber`]: a durable JetStream pull consumer of a struct or enum of events;
//!   acknowledges after the handler succeeds, negatively acknowledges with a delay on
//!   failure (a handler that panics is a failure too, never the end of the subscriber),
//!   terminates and reports a poison message after `max_deliver` deliveries; unknown event
//!   types are acknowledged and counted, or refused, by [`UnknownEventPolicy`]. An existing
//!   durable consumer is updated to the configured settings.
//! - [`ProjectionRunner`] runs a [`Projection`]: batches of the global stream applied with
//!   the checkpoint in one transaction, so a crash anywhere applies each event exactly once;
//!   catch up, follow, rebuild from zero (beside a running runner too). It reads only its
//!   event type's events (other contexts share the store) and stops on a corrupt one.
//! - [`Aggregate`] and [`Repository`]: load (snapshot of the current state version, then the
//!   tail), decide, append through the bus at the loaded sequence, retry on a conflict;
//!   [`testing::AggregateTest`] runs given / when / then on the embedded backend.
//! - Embedded default: `EventStore::connect("sqlite::memory:")` (or a `sqlite://` file) and
//!   the [`InMemoryBroker`] give the same API with no server; [`Backends::from_env`] picks
//!   PostgreSQL and NATS when `DATABASE_URL` / `NATS_URL` are set. On SQLite one writer
//!   works at a time, positions follow commit order, keys are matched without an index.
//! - Secrets: no password or token reaches a log line at any level, the dependencies'
//!   included, nor an error; our types implement `Debug` without them.
//!   [`NatsPublisher::connect`] hands the URL's credentials to async-nats as options, out of
//!   the server addresses it logs; [`EventStore::connect`] drops PostgreSQL URL parameters
//!   sqlx does not know (it would log their value). sqlx's `PgConnectOptions` derives `Debug`
//!   with the password: never format it with `{:?}`.
//! - Connecting: both `connect`s make the first connection at once; a server that is down,
//!   an unknown host, refused credentials or a missing database is an
//!   [`EventError::Connect`] naming `host:port`, a [`ConnectCause`] and the next step. Once
//!   connected, NATS reconnects in the background and the pool reopens connections.

#[cfg(not(any(feature = "postgres", feature = "sqlite")))]
compile_error!(
    "edupulse-events needs an event store: enable its `postgres` feature, its `sqlite` feature, or both"
);

// The layers, each importing only those listed before it (`error`, `connect` and the
// metrics of `telemetry` below them all): events; then the store and the broker, which never
// import each other; delivery, which joins them; the read and write sides on top.
#[macro_use]
mod setters;

mod connect;
mod error;
mod event;
pub mod telemetry;

mod broker;
mod store;

mod delivery;

mod read;
mod write;

mod setup;

pub mod prelude;

/// Upcasting steps for `#[event(previous = …)]` chains.
pub use crate::event::upcast;
/// The message format, for consumers of other languages or frameworks.
pub use crate::event::wire;
/// The given/when/then harness for aggregates (on the embedded store: the `sqlite` feature,
/// in `[dev-dependencies]` for a service that runs on PostgreSQL).
#[cfg(feature = "sqlite")]
pub use crate::write::testing;

#[doc(hidden)]
pub mod __private;

pub use chrono;
pub use serde_json;
pub use uuid::{self, Uuid};

pub use crate::broker::{
    AggregateFilter, BoxFuture, BrokerMessage, InMemoryBroker, PoisonReport, PublishReceipt, Publisher,
    StreamSpec, StreamState, Subscriber, SubscriberConfig, SubscriberStats, UnknownEventPolicy,
};
#[cfg(feature = "nats")]
pub use crate::broker::{NatsConfig, NatsPublisher};
pub use crate::delivery::{
    BusConfig, BusTransaction, Closed, Committed, EventBus, LogRelay, Receipt, RelayConfig, RelayPass,
    Republished,
};
pub use crate::error::{BoxError, BrokerErrorKind, ConnectCause, EventError, EventProblem};
pub use crate::event::envelope::{EventEnvelope, Metadata};
pub use crate::event::subject::{MAX_SUBJECT_LEN, validate_subject, validate_subject_token};
pub use crate::event::wire::DEFAULT_MAX_MESSAGE_BYTES;
pub use crate::event::{
    AggregateId, DomainEvent, EncodedEvent, EventSchema, IntoKeyValue, KeyValue, PromotedKey,
};
pub use crate::read::{Projection, ProjectionRunner, UndecodablePolicy};
pub use crate::setup::{Backends, EMBEDDED_DATABASE_URL};
pub use crate::store::{
    Connection, DatabasePool, EventStore, EventStream, ExpectedSequence, Migrations, PARTITIONS, ParkedEvent,
    PartitionStatus, ProjectionStatus, RecordStream, RelayLag, Requeue, RunningTransaction, SchemaName,
    StoreConfig, StoreStatus, StoredRecord, StoredSnapshot, StreamMark, StreamPosition, Transaction,
};
pub use crate::write::{Aggregate, CommandError, Loaded, Repository};
#[cfg(feature = "nats")]
pub use async_nats;
pub use futures_core::Stream;
pub use sqlx;

/// Derives [`DomainEvent`] (and, on structs, [`EventSchema`]). See the [crate docs](crate).
#[cfg(feature = "derive")]
pub use edupulse_events_derive::DomainEvent;
