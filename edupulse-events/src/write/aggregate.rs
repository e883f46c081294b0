//! The write side: aggregates decide on commands, a repository loads them (snapshot plus
//! tail), appends their decisions through the bus, and retries on a concurrency conflict.

use std::fmt;
use std::marker::PhantomData;

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::delivery::{Committed, EventBus};
use crate::store::StoredSnapshot;
use crate::{DomainEvent, EventEnvelope, EventError};

/// A consistency boundary: state rebuilt from its own events, and a pure decision function
/// from a command to new events (or a domain error).
///
/// The state is `Serialize + DeserializeOwned` so that it can be snapshotted; raise
/// [`STATE_VERSION`](Aggregate::STATE_VERSION) whenever its shape or meaning changes, and
/// older snapshots are ignored.
///
/// ```
/// use edupulse_events::prelude::*;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
/// #[event(context = "courses")]
/// pub struct StudentEnrolled { #[event(aggregate_id)] pub course_id: Uuid, pub student_id: Uuid }
///
/// /// A course takes at most three students.
/// #[derive(Debug, Default, Serialize, Deserialize)]
/// pub struct Course { students: Vec<Uuid> }
///
/// #[derive(Debug, PartialEq, thiserror::Error)]
/// pub enum Refused { #[error("the course is full")] Full, #[error("already enrolled")] Already }
///
/// impl Aggregate for Course {
///     const TYPE: &'static str = "course";
///     type Event = StudentEnrolled;
///     type Command = (Uuid, Uuid); // (course, student)
///     type Error = Refused;
///
///     fn apply(&mut self, event: &StudentEnrolled) {
///         self.students.push(event.student_id);
///     }
///
///     fn decide(&self, &(course_id, student_id): &(Uuid, Uuid)) -> Result<Vec<StudentEnrolled>, Refused> {
///         if self.students.contains(&student_id) {
///             return Err(Refused::Already);
///         }
///         if self.students.len() >= 3 {
///             return Err(Refused::Full);
///         }
///         Ok(vec![StudentEnrolled { course_id, student_id }])
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let backends = Backends::connect(None, None, StoreConfig::default(), &edupulse_events::StreamSpec::new("EDUPULSE", ["courses.>"])).await?;
/// let bus = EventBus::new(backends.store.clone(), backends.publisher.clone(), BusConfig::default())?;
/// // Load (snapshot, then the tail), decide, append at the loaded sequence; retried on a
/// // lost race.
/// let courses = Repository::<Course>::new(bus);
/// let course = Uuid::now_v7();
/// for _ in 0..3 {
///     courses.execute(course, &(course, Uuid::now_v7())).await?;
/// }
/// let refused = courses.execute(course, &(course, Uuid::now_v7())).await;
/// assert!(matches!(refused, Err(CommandError::Domain(Refused::Full))));
/// assert_eq!(courses.load(course).await?.sequence, 3);
/// # Ok(())
/// # }
/// ```
///
/// [`testing::AggregateTest`](crate::testing::AggregateTest) tests one without a server.
pub trait Aggregate: Default + Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The aggregate type stored with every event (`"course"`).
    const TYPE: &'static str;
    /// The version of the state's shape, stored with snapshots (default 1).
    const STATE_VERSION: u32 = 1;
    /// The events of this aggregate (usually a derived enum).
    type Event: DomainEvent + Clone;
    /// The commands it decides on.
    type Command: Send + Sync;
    /// Why it refuses a command.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Folds one event into the state. Must not fail: events are facts.
    fn apply(&mut self, event: &Self::Event);

    /// Decides what happens: the new events, or a domain error. Pure: no I/O.
    ///
    /// # Errors
    /// The aggregate's domain error.
    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
}

/// Why a command was not executed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate refused the command.
    #[error("the command was refused: {0}")]
    Domain(#[source] E),
    /// Other writers kept winning: still in conflict after the configured retries.
    #[error("still in conflict after {attempts} attempts: {source}")]
    Conflict {
        /// How often the command was decided.
        attempts: u32,
        /// The last conflict.
        #[source]
        source: EventError,
    },
    /// Storing, loading or publishing failed.
    #[error(transparent)]
    Event(#[from] EventError),
}

/// An aggregate as loaded: its state and the sequence it is at.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The id.
    pub id: Uuid,
    /// The state after every event.
    pub state: A,
    /// The sequence of the last event (0 for a new aggregate).
    pub sequence: i64,
    /// Events read from the store (the tail after the snapshot, or all of them).
    pub events_read: u64,
}

/// Loads aggregates and executes commands on them ([`Aggregate`] has an example).
pub struct Repository<A> {
    bus: EventBus,
    /// Decisions tried on a concurrency conflict before giving up (default 10).
    pub max_attempts: u32,
    /// Take a snapshot every this many events; 0 never (default 100).
    pub snapshot_every: u64,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Repository")
            .field("max_attempts", &self.max_attempts)
            .field("snapshot_every", &self.snapshot_every)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository writing through `bus`.
    pub fn new(bus: EventBus) -> Self {
        Self { bus, max_attempts: 10, snapshot_every: 100, _aggregate: PhantomData }
    }

    /// Loads an aggregate: its snapshot, when one of the current state version exists, then
    /// the events after it, decoded and upcast.
    ///
    /// # Errors
    /// [`EventError`] for storage and decoding failures.
    pub async fn load(&self, id: Uuid) -> Result<Loaded<A>, EventError> {
        let store = self.bus.store();
        let mut loaded = Loaded { id, state: A::default(), sequence: 0, events_read: 0 };
        if let Some(snapshot) = store.snapshot(id).await? {
            if snapshot.state_version == A::STATE_VERSION && snapshot.aggregate_type == A::TYPE {
                match serde_json::from_str::<A>(&snapshot.state) {
                    Ok(state) => {
                        loaded.state = state;
                        loaded.sequence = snapshot.sequence;
                    }
                    Err(e) => tracing::warn!(%id, error = %e, "snapshot unreadable; rebuilding from events"),
                }
            } else {
                tracing::debug!(%id, found = snapshot.state_version, "snapshot of another state version ignored");
            }
        }
        let mut tail = store.load::<A::Event>(id, loaded.sequence + 1);
        while let Some(envelope) = tail.next().await {
            let envelope = envelope?;
            loaded.state.apply(&envelope.event);
            loaded.sequence = envelope.sequence;
            loaded.events_read += 1;
        }
        Ok(loaded)
    }

    /// Loads the aggregate, decides, and appends the decision through the bus at the loaded
    /// sequence, in one transaction; on a concurrency conflict reloads and decides again, up
    /// to [`max_attempts`](Repository::max_attempts). Returns the stored events (none when
    /// the decision was to do nothing).
    ///
    /// # Errors
    /// [`CommandError::Domain`] when the aggregate refuses; [`CommandError::Conflict`] after
    /// too many lost races; [`CommandError::Event`] for infrastructure failures.
    pub async fn execute(
        &self,
        id: Uuid,
        command: &A::Command,
    ) -> Result<Vec<EventEnvelope<A::Event>>, CommandError<A::Error>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut loaded = self.load(id).await?;
            let events = loaded.state.decide(command).map_err(CommandError::Domain)?;
            if events.is_empty() {
                return Ok(Vec::new());
            }
            let expected = loaded.sequence;
            let decided = events.clone();
            let result = self.bus.commit(async |tx| tx.append(A::TYPE, id, expected, decided).await).await;
            match result.map(Committed::into_value) {
                Ok(stored) => {
                    for event in &events {
                        loaded.state.apply(event);
                    }
                    let sequence = expected + stored.len() as i64;
                    self.maybe_snapshot(id, &loaded.state, expected, sequence).await;
                    return Ok(stored);
                }
                Err(e @ EventError::Concurrency { .. }) if attempt >= self.max_attempts.max(1) => {
                    return Err(CommandError::Conflict { attempts: attempt, source: e });
                }
                Err(EventError::Concurrency { .. }) => {}
                Err(e) => return Err(CommandError::Event(e)),
            }
        }
    }

    /// Snapshots when the append crossed a multiple of `snapshot_every`. A snapshot is a
    /// cache: failing to write one is logged, never an error of the command.
    async fn maybe_snapshot(&self, id: Uuid, state: &A, before: i64, after: i64) {
        let every = i64::try_from(self.snapshot_every).unwrap_or(i64::MAX);
        if every == 0 || before / every == after / every {
            return;
        }
        let state = match serde_json::to_string(state) {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(%id, error = %e, "aggregate state cannot be serialized; no snapshot");
                return;
            }
        };
        let snapshot = StoredSnapshot {
            aggregate_id: id,
            aggregate_type: A::TYPE.to_owned(),
            sequence: after,
            state_version: A::STATE_VERSION,
            state,
        };
        if let Err(e) = self.bus.store().save_snapshot(&snapshot).await {
            tracing::warn!(%id, error = %e, "snapshot not saved");
        }
    }

    /// Saves a snapshot of the aggregate as it is now (for example after a migration).
    ///
    /// # Errors
    /// [`EventError`] for storage failures.
    pub async fn snapshot_now(&self, id: Uuid) -> Result<Loaded<A>, EventError> {
        let loaded = self.load(id).await?;
        if loaded.sequence > 0 {
            let state = serde_json::to_string(&loaded.state)
                .map_err(|source| EventError::Serialization { event_type: A::TYPE, source })?;
            self.bus
                .store()
                .save_snapshot(&StoredSnapshot {
                    aggregate_id: id,
                    aggregate_type: A::TYPE.to_owned(),
                    sequence: loaded.sequence,
                    state_version: A::STATE_VERSION,
                    state,
                })
                .await?;
        }
        Ok(loaded)
    }
}
