//! A given / when / then harness for aggregates, on the embedded backend: no server.
//!
//! ```
//! # use edupulse_events::testing::AggregateTest;
//! # use edupulse_events::{Aggregate, DomainEvent, Uuid};
//! # use serde::{Deserialize, Serialize};
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, DomainEvent)]
//! struct Opened { #[event(aggregate_id)] id: Uuid }
//! #[derive(Debug, Default, Serialize, Deserialize)]
//! struct Door { open: bool }
//! #[derive(Debug, thiserror::Error, PartialEq)]
//! #[error("already open")]
//! struct AlreadyOpen;
//! impl Aggregate for Door {
//!     const TYPE: &'static str = "door";
//!     type Event = Opened;
//!     type Command = Uuid;
//!     type Error = AlreadyOpen;
//!     fn apply(&mut self, _: &Opened) { self.open = true; }
//!     fn decide(&self, id: &Uuid) -> Result<Vec<Opened>, AlreadyOpen> {
//!         if self.open { Err(AlreadyOpen) } else { Ok(vec![Opened { id: *id }]) }
//!     }
//! }
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let id = Uuid::now_v7();
//! AggregateTest::<Door>::given([]).when(id).await.then_expect([Opened { id }]);
//! AggregateTest::<Door>::given([Opened { id }]).when(id).await.then_error(AlreadyOpen);
//! # }
//! ```

use std::fmt::{Debug, Write as _};
use std::sync::Arc;

use uuid::Uuid;

use crate::broker::{BrokerMessage, InMemoryBroker};
use crate::delivery::{BusConfig, EventBus, LogRelay, RelayConfig};
use crate::store::{EventStore, StoreConfig};
use crate::write::aggregate::{Aggregate, CommandError, Repository};
use crate::{DomainEvent, EventError};

/// Given events, when a command: the start of a test. See the [module docs](self).
#[derive(Debug)]
pub struct AggregateTest<A: Aggregate> {
    given: Vec<A::Event>,
    aggregate_id: Option<Uuid>,
}

impl<A: Aggregate> AggregateTest<A>
where
    A::Event: PartialEq + Debug,
    A::Command: Debug,
    A::Error: Debug,
{
    /// The aggregate's history before the command.
    pub fn given(events: impl IntoIterator<Item = A::Event>) -> Self {
        Self { given: events.into_iter().collect(), aggregate_id: None }
    }

    /// The aggregate's id, when the events do not name it in an `#[event(aggregate_id)]`
    /// field (by default: the id the events name, or a fresh one).
    #[must_use]
    pub fn for_aggregate(mut self, id: Uuid) -> Self {
        self.aggregate_id = Some(id);
        self
    }

    /// Stores the given events in a fresh embedded store and executes `command` through a
    /// [`Repository`] and an [`EventBus`], as production code would.
    pub async fn when(self, command: A::Command) -> Outcome<A> {
        let result = self.run(&command).await;
        Outcome { given: self.given.len(), command: format!("{command:?}"), result }
    }

    async fn run(&self, command: &A::Command) -> Result<Run<A>, RunError<A::Error>> {
        let store = EventStore::connect(crate::setup::EMBEDDED_DATABASE_URL, StoreConfig::default()).await?;
        store.migrate().await?;
        let id = self
            .aggregate_id
            .or_else(|| self.given.iter().find_map(DomainEvent::aggregate_id))
            .or_else(|| A::default().decide(command).ok()?.iter().find_map(DomainEvent::aggregate_id))
            .unwrap_or_else(Uuid::now_v7);
        if !self.given.is_empty() {
            store.append(A::TYPE, id, 0, self.given.clone()).await?;
        }
        let broker = InMemoryBroker::new();
        let config = BusConfig::default().with_background_relay(false);
        let bus = EventBus::new(store.clone(), Arc::new(broker.clone()), config)?;
        let repository = Repository::<A>::new(bus);
        let stored = repository.execute(id, command).await.map_err(RunError::Command)?;
        // Publish the log (one relay pass: the embedded store has no horizon to wait for),
        // then keep the messages of the command's events (the given ones go out too).
        LogRelay::new(store, Arc::new(broker.clone()), RelayConfig::default()).run_once().await?;
        let ids: Vec<String> = stored.iter().map(|e| e.event_id.to_string()).collect();
        let published = broker
            .messages()
            .into_iter()
            .filter(|m| {
                m.header(crate::event::wire::headers::MSG_ID).is_some_and(|id| ids.iter().any(|i| i == id))
            })
            .collect();
        Ok(Run { events: stored.into_iter().map(|e| e.event).collect(), published })
    }
}

struct Run<A: Aggregate> {
    events: Vec<A::Event>,
    published: Vec<BrokerMessage>,
}

enum RunError<E: std::error::Error + 'static> {
    Command(CommandError<E>),
    Setup(EventError),
}

impl<E: std::error::Error + 'static> From<EventError> for RunError<E> {
    fn from(e: EventError) -> Self {
        Self::Setup(e)
    }
}

/// What the command did; `then_*` check it.
pub struct Outcome<A: Aggregate> {
    given: usize,
    command: String,
    result: Result<Run<A>, RunError<A::Error>>,
}

impl<A: Aggregate> Debug for Outcome<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome")
            .field("given", &self.given)
            .field("command", &self.command)
            .finish_non_exhaustive()
    }
}

impl<A: Aggregate> Outcome<A>
where
    A::Event: PartialEq + Debug,
    A::Error: Debug,
{
    /// Checks that the command produced exactly `expected`.
    ///
    /// # Errors
    /// A readable description of the difference: event by event, expected (`-`) against
    /// actual (`+`), or the error the command ended with.
    pub fn check_events(&self, expected: &[A::Event]) -> Result<(), String> {
        let header = format!("given {} event(s), when {}", self.given, self.command);
        match &self.result {
            Err(RunError::Command(CommandError::Domain(e))) => Err(format!(
                "{header}:\nexpected {} event(s), but the command was refused: {e:?}",
                expected.len()
            )),
            Err(RunError::Command(e)) => Err(format!("{header}:\nthe command failed: {e}")),
            Err(RunError::Setup(e)) => Err(format!("{header}:\nthe embedded store failed: {e}")),
            Ok(run) if run.events == expected => Ok(()),
            Ok(run) => Err(format!("{header}:\n{}", diff(expected, &run.events))),
        }
    }

    /// Checks that the command was refused with `expected`.
    ///
    /// # Errors
    /// A description of what happened instead.
    pub fn check_error(&self, expected: &A::Error) -> Result<(), String>
    where
        A::Error: PartialEq,
    {
        let header = format!("given {} event(s), when {}", self.given, self.command);
        match &self.result {
            Err(RunError::Command(CommandError::Domain(e))) if e == expected => Ok(()),
            Err(RunError::Command(CommandError::Domain(e))) => {
                Err(format!("{header}:\nexpected the error {expected:?}\nbut got the error {e:?}"))
            }
            Err(RunError::Command(e)) => {
                Err(format!("{header}:\nexpected {expected:?}, the command failed: {e}"))
            }
            Err(RunError::Setup(e)) => Err(format!("{header}:\nthe embedded store failed: {e}")),
            Ok(run) => Err(format!(
                "{header}:\nexpected the error {expected:?}\nbut the command produced {} event(s):\n{}",
                run.events.len(),
                run.events.iter().enumerate().fold(String::new(), |mut s, (i, e)| {
                    let _ = writeln!(s, "  #{} {e:?}", i + 1);
                    s
                })
            )),
        }
    }

    /// Asserts [`check_events`](Outcome::check_events).
    ///
    /// # Panics
    /// When the events differ, with the difference as the message (it is a test assertion).
    #[allow(clippy::panic)]
    pub fn then_expect(self, expected: impl IntoIterator<Item = A::Event>) -> Self {
        let expected: Vec<_> = expected.into_iter().collect();
        if let Err(message) = self.check_events(&expected) {
            panic!("{message}");
        }
        self
    }

    /// Asserts [`check_error`](Outcome::check_error).
    ///
    /// # Panics
    /// When the command was not refused with `expected` (it is a test assertion).
    #[allow(clippy::panic)]
    pub fn then_error(self, expected: A::Error) -> Self
    where
        A::Error: PartialEq,
    {
        if let Err(message) = self.check_error(&expected) {
            panic!("{message}");
        }
        self
    }

    /// The messages the command's events were published as (on the in-process broker).
    pub fn published(&self) -> &[BrokerMessage] {
        match &self.result {
            Ok(run) => &run.published,
            Err(_) => &[],
        }
    }
}

/// Event by event: `=` the same, `-` expected, `+` actual.
fn diff<E: PartialEq + Debug>(expected: &[E], actual: &[E]) -> String {
    let mut out = format!("expected {} event(s), got {}:\n", expected.len(), actual.len());
    for i in 0..expected.len().max(actual.len()) {
        match (expected.get(i), actual.get(i)) {
            (Some(e), Some(a)) if e == a => {
                let _ = writeln!(out, "  #{} = {e:?}", i + 1);
            }
            (e, a) => {
                let show = |x: Option<&E>| x.map_or_else(|| "(nothing)".to_owned(), |x| format!("{x:?}"));
                let _ = writeln!(out, "  #{} - {}", i + 1, show(e));
                let _ = writeln!(out, "  #{} + {}", i + 1, show(a));
            }
        }
    }
    out
}
