//! Domain events for Rust services: annotate plain event structs with
//! `#[derive(DomainEvent)]` and get stable type names, NATS subjects, schema versions with an
//! upcaster chain for old payloads, and typed SQL bindings; store them in PostgreSQL with
//! optimistic concurrency, publish them to NATS JetStream from the log once they committed,
//! consume them with durable consumers and project them exactly once. With no server at all
//! it runs embedded: SQLite and an in-process broker, same API. Start with the [`prelude`];
//! [From events to a read model](#from-events-to-a-read-model) walks the whole path.
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
//!   implementing [`AggregateId`]): an append checks that the event belongs to the
//!   aggregate it is appended to. A struct without one gets a warning on its name, unless it
//!   says `#[event(no_aggregate_id)]` (an event that does not carry its aggregate's id).
//!   `#[event(key)]` or `#[event(key = "name")]` promotes a field into the store's indexed
//!   keys (see [`IntoKeyValue`]).
//! - On an enum whose variants each wrap one event type, the derive dispatches all of the
//!   above and decodes by event type (aliases included). `#[event(context = "…")]` on the
//!   enum checks at compile time that every variant is published under that context. A
//!   subject belongs to the event type, never to the enum wrapping it, so an event travels on
//!   the same subject wherever it is published.
//! - Decoding never panics: unknown types, versions newer than the code, malformed payloads
//!   and refusing upcasters all give an [`EventError`].
//! - Upcasting is pure and runs on every read: stored rows are never rewritten.
//!
//! # From events to a read model
//!
//! The path the repository's README walks (its code is `examples/five_minutes.rs`), here on
//! the embedded default: SQLite in memory and the in-process broker, no server.
//! [`Backends::from_env`] runs the same code on PostgreSQL and NATS JetStream when
//! `DATABASE_URL` and `NATS_URL` are set. The [`prelude`] brings what it uses most.
//!
//! **Commit through the bus, then consume.** [`Backends`] connects, migrates and makes the
//! stream; [`EventBus::commit`] appends in one transaction, and once it committed the bus's
//! relay publishes the events from the log; [`Backends::subscriber`] is a durable consumer of
//! whichever broker the backends connected (JetStream's, or [`Subscriber::in_memory`] on the
//! in-process broker), with the same rules: different aggregates at once, each aggregate's
//! events in order, acknowledged when the handler returns `Ok`.
//!
//! ```
//! use edupulse_events::prelude::*;
//! use edupulse_events::StreamSpec;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
//! #[event(context = "workshops")]
//! pub struct SeatBooked {
//!     #[event(aggregate_id)]
//!     pub workshop_id: Uuid,
//!     pub student_id: Uuid,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), EventError> {
//! let stream = StreamSpec::new("WORKSHOPS", ["workshops.>"]);
//! let backends = Backends::connect(None, None, StoreConfig::default(), &stream).await?;
//! let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default())?;
//!
//! let workshop_id = Uuid::now_v7();
//! let booked = SeatBooked { workshop_id, student_id: Uuid::now_v7() };
//! let committed = bus.commit(async |tx| tx.append("workshop", workshop_id, 0, [booked]).await).await?;
//! committed.receipt.published().await?; // only if you must know: the broker acknowledged it
//!
//! let config = SubscriberConfig::new("WORKSHOPS", "welcome-mails");
//! let subscriber = backends.subscriber::<SeatBooked>(config).await?;
//! let done = tokio::sync::Notify::new();
//! let handler = async |envelope: EventEnvelope<SeatBooked>| {
//!     assert_eq!(envelope.event.workshop_id, workshop_id);
//!     done.notify_one();
//!     Ok(()) // acknowledged; an error is retried, then reported as poison
//! };
//! subscriber.run(handler, done.notified()).await?; // until that future completes
//!
//! bus.close(std::time::Duration::from_secs(10)).await?; // before the process exits
//! # Ok(())
//! # }
//! ```
//!
//! **Project.** A [`Projection`] applies each event in one transaction with its checkpoint,
//! so each is applied exactly once; [`execute!`](crate::execute) runs a statement written
//! once on whichever database the transaction is on. [`ProjectionRunner::run`] catches up,
//! then follows; [`ProjectionRunner::catch_up`] stops at the end.
//!
//! ```
//! use edupulse_events::prelude::*;
//! use edupulse_events::{BoxError, Transaction, execute};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
//! # #[event(context = "workshops")]
//! # pub struct SeatBooked { #[event(aggregate_id)] pub workshop_id: Uuid, pub student_id: Uuid }
//!
//! /// Seats booked per workshop.
//! struct SeatsBooked;
//!
//! impl Projection<SeatBooked> for SeatsBooked {
//!     fn name(&self) -> &str {
//!         "seats-booked"
//!     }
//!
//!     async fn apply(&self, tx: &mut Transaction, e: &EventEnvelope<SeatBooked>) -> Result<(), BoxError> {
//!         let sql = "INSERT INTO seats_booked (workshop_id, seats) VALUES ($1, 1) \
//!                    ON CONFLICT (workshop_id) DO UPDATE SET seats = seats_booked.seats + 1";
//!         execute!(tx.connection(), sql, e.event.workshop_id.to_string())?;
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = EventStore::connect("sqlite::memory:", StoreConfig::default()).await?;
//! store.migrate().await?;
//! let mut tx = store.begin().await?;
//! let table = "CREATE TABLE seats_booked (workshop_id TEXT PRIMARY KEY, seats BIGINT NOT NULL)";
//! execute!(tx.connection(), table)?;
//! let workshop_id = Uuid::now_v7();
//! tx.append("workshop", workshop_id, 0, [SeatBooked { workshop_id, student_id: Uuid::now_v7() }]).await?;
//! tx.commit().await?;
//!
//! let applied = ProjectionRunner::new(store, SeatsBooked).catch_up().await?;
//! assert_eq!(applied, 1);
//! # Ok(())
//! # }
//! ```
//!
//! **Test an aggregate.** An [`Aggregate`] folds its events into a state and decides on
//! commands; [`Repository::execute`] loads it (a snapshot, then the tail), decides, appends
//! at the loaded sequence and retries a lost race. [`testing::AggregateTest`] runs
//! given / when / then through a repository on the embedded store; a mismatch panics with
//! the expected (`-`) and actual (`+`) events.
//!
//! ```
//! use edupulse_events::prelude::*;
//! use edupulse_events::testing::AggregateTest;
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
//! # #[event(context = "workshops")]
//! # pub struct SeatBooked { #[event(aggregate_id)] pub workshop_id: Uuid, pub student_id: Uuid }
//!
//! /// A workshop of two seats.
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! struct Workshop { students: Vec<Uuid> }
//!
//! #[derive(Debug, PartialEq, thiserror::Error)]
//! #[error("the workshop is full")]
//! struct Full;
//!
//! impl Aggregate for Workshop {
//!     const TYPE: &'static str = "workshop";
//!     type Event = SeatBooked;
//!     type Command = SeatBooked; // the booking asked for
//!     type Error = Full;
//!
//!     fn apply(&mut self, event: &SeatBooked) {
//!         self.students.push(event.student_id);
//!     }
//!
//!     fn decide(&self, booking: &SeatBooked) -> Result<Vec<SeatBooked>, Full> {
//!         if self.students.len() >= 2 { Err(Full) } else { Ok(vec![booking.clone()]) }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let workshop_id = Uuid::now_v7();
//! let booking = |student_id| SeatBooked { workshop_id, student_id };
//! let (ada, bob, cy) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
//! AggregateTest::<Workshop>::given([booking(ada)]).when(booking(bob)).await.then_expect([booking(bob)]);
//! AggregateTest::<Workshop>::given([booking(ada), booking(bob)]).when(booking(cy)).await.then_error(Full);
//! # }
//! ```
//!
//! # The store, the bus and the relay
//!
//! The path above in its parts, on the embedded store and broker; the comments say what
//! changes on PostgreSQL and NATS.
//!
//! ```
//! use edupulse_events::*;
//! use futures_util::StreamExt;
//! use std::sync::Arc;
//! # #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, DomainEvent)]
//! # #[event(context = "courses")]
//! # struct LessonPublished { #[event(aggregate_id)] lesson_id: Uuid, title: String }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), EventError> {
//! // On PostgreSQL: EventStore::connect("postgres://app@127.0.0.1/app", …).
//! let store = EventStore::connect("sqlite::memory:", StoreConfig::default()).await?;
//! store.migrate().await?;
//! // On NATS: NatsPublisher::connect("nats://127.0.0.1:4222", NatsConfig::default()), then
//! // ensure_stream(&StreamSpec::new("EDUPULSE", ["courses.>"])).
//! let broker: Arc<dyn Publisher> = Arc::new(InMemoryBroker::new());
//!
//! // Events and the caller's own writes commit together; the bus's background relay
//! // publishes them from the log. Wait for the acknowledgement only when you need it.
//! let bus = EventBus::new(store.clone(), broker.clone(), BusConfig::default())?;
//! let lesson_id = Uuid::now_v7();
//! let event = LessonPublished { lesson_id, title: "Ownership".into() };
//! let committed = bus.commit(async |tx| tx.append("lesson", lesson_id, 0, [event]).await).await?;
//! committed.receipt.published().await?;
//!
//! // Or publish from a process of its own (any number of relays share the partitions).
//! let relay = LogRelay::new(store.clone(), broker, RelayConfig::default());
//! tokio::spawn(async move { relay.run(std::future::pending()).await });
//!
//! // Replay one aggregate, or follow the global stream from a checkpoint.
//! let mut history = store.load::<LessonPublished>(lesson_id, 1);
//! while let Some(envelope) = history.next().await {
//!     assert_eq!(envelope?.event.title, "Ownership");
//! }
//! let poll = std::time::Duration::from_millis(200);
//! let mut all = store.stream_all::<LessonPublished>(StreamPosition::START).follow(poll);
//! assert_eq!(all.next().await.transpose()?.map(|e| e.sequence), Some(1));
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
//!   is refused before anything is written ([`EventError::InvalidEvent`]; "What an append
//!   checks" in the repository's RELIABILITY.md lists every check and its limit). It returns a
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
