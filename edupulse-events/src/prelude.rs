//! What a service's code uses most, in one import.
//!
//! ```
//! use edupulse_events::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, DomainEvent)]
//! #[event(context = "courses")]
//! pub struct LessonPublished {
//!     #[event(aggregate_id)]
//!     pub lesson_id: Uuid,
//!     pub title: String,
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), EventError> {
//! // The trait's constants need `EventSchema` in scope: the prelude brings it.
//! assert_eq!(LessonPublished::SUBJECT, "courses.LessonPublished");
//! let store = EventStore::connect("sqlite::memory:", StoreConfig::default()).await?;
//! store.migrate().await?;
//! let lesson_id = Uuid::now_v7();
//! let mut tx = store.begin().await?;
//! tx.append("lesson", lesson_id, ExpectedSequence::Exactly(0), [LessonPublished { lesson_id, title: "Ownership".into() }])
//!     .await?;
//! tx.commit().await?;
//! // `StreamExt` (for `next`) comes with it too.
//! let mut history = store.load::<LessonPublished>(lesson_id, 1);
//! while let Some(envelope) = history.next().await {
//!     assert_eq!(envelope?.event.title, "Ownership");
//! }
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "derive")]
pub use crate::DomainEvent;
#[cfg(not(feature = "derive"))]
pub use crate::event::DomainEvent;
pub use crate::{
    Aggregate, AggregateId, Backends, BusConfig, CommandError, EventBus, EventEnvelope, EventError,
    EventSchema, EventStore, ExpectedSequence, Projection, ProjectionRunner, Publisher, Repository,
    StoreConfig, StreamPosition, Subscriber, SubscriberConfig, Uuid,
};
pub use futures_util::StreamExt as _;
