//! The commit-then-publish bus: events and their outbox rows are written in the caller's
//! transaction; after COMMIT they are published at once; whatever the broker does not
//! acknowledge stays in the outbox for the [`OutboxRelay`](crate::OutboxRelay).
//!
//! Guarantees: an event is published only if its transaction committed (the outbox row is
//! part of it), and no committed event is lost (the row stays until the broker acknowledged
//! it). A crash between COMMIT and publish, a broker outage or a relay dying mid-batch
//! leave rows pending, and a relay publishes them later; re-sends carry the same
//! `Nats-Msg-Id`, so JetStream drops them inside its duplicate window.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use sqlx::postgres::PgConnection;
use uuid::Uuid;

use crate::outbox::{Claimer, OutboxLag, OutboxRows, partition_of};
use crate::publisher::Publisher;
use crate::store::{Backend, EventStore, ExpectedSequence, Transaction};
use crate::{DomainEvent, EventEnvelope, EventError, validate_subject, validate_subject_token};

/// Settings of an [`EventBus`].
#[derive(Debug, Clone)]
pub struct BusConfig {
    /// Publish right after COMMIT (default true). When false, only a relay publishes:
    /// exactly what happens when the process dies between COMMIT and publish.
    pub publish_after_commit: bool,
    /// Append the aggregate id as a last subject token (`courses.LessonPublished.<id>`),
    /// so consumers can subscribe to one aggregate (default false).
    pub aggregate_id_in_subject: bool,
    /// Rows published per round trip after commit (default 500).
    pub batch_size: u32,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self { publish_after_commit: true, aggregate_id_in_subject: false, batch_size: 500 }
    }
}

/// Commits events with the caller's writes and publishes them after COMMIT.
///
/// ```no_run
/// # use edupulse_events::*;
/// # async fn demo(bus: EventBus, id: Uuid, event: impl DomainEvent) -> Result<(), EventError> {
/// bus.commit(async |tx| {
///     tx.append("lesson", id, 0, [event]).await?;
///     Ok::<_, EventError>(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct EventBus {
    claimer: Arc<Claimer>,
    config: BusConfig,
}

impl fmt::Debug for EventBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventBus").field("store", &self.claimer.store).field("config", &self.config).finish()
    }
}

impl EventBus {
    /// A bus writing to `store` and publishing through `publisher`.
    pub fn new(store: EventStore, publisher: Arc<dyn Publisher>, config: BusConfig) -> Self {
        let batch_size = i64::from(config.batch_size.max(1));
        Self { claimer: Arc::new(Claimer { store, publisher, batch_size }), config }
    }

    /// The store.
    pub fn store(&self) -> &EventStore {
        &self.claimer.store
    }

    /// Runs `work` in a new transaction, commits it, then publishes the appended events.
    ///
    /// When `work` returns an error (or panics), the transaction is rolled back and nothing
    /// is published. When the publish after COMMIT fails, the commit still stands and the
    /// events wait in the outbox for a relay; the failure is logged, not returned.
    ///
    /// # Errors
    /// The error of `work`; [`EventError::Database`] (converted) when BEGIN or COMMIT fails.
    pub async fn commit<T, Err>(
        &self,
        work: impl AsyncFnOnce(&mut BusTransaction) -> Result<T, Err>,
    ) -> Result<T, Err>
    where
        Err: From<EventError>,
    {
        let tx = self.claimer.store.begin().await?;
        let mut bus_tx =
            BusTransaction { tx, config: self.config.clone(), prefix: None, partitions: BTreeSet::new() };
        let value = match work(&mut bus_tx).await {
            Ok(value) => value,
            Err(e) => {
                if let Err(rollback) = bus_tx.tx.rollback().await {
                    tracing::warn!(error = %rollback, "bus: rollback failed; the connection is discarded");
                }
                return Err(e);
            }
        };
        let partitions = std::mem::take(&mut bus_tx.partitions);
        bus_tx.tx.commit().await?;
        if let Backend::Sqlite(sq) = &self.claimer.store.inner.backend
            && !partitions.is_empty()
        {
            // PostgreSQL wakes relays with NOTIFY at commit; the embedded backend in process.
            sq.notify_outbox();
        }
        if self.config.publish_after_commit && !partitions.is_empty() {
            match self.claimer.drain(partitions).await {
                Ok(pass) if pass.failed > 0 => {
                    tracing::warn!(
                        failed = pass.failed,
                        "bus: events committed but not yet published; the relay will retry"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "bus: publish after commit failed; the relay will retry")
                }
            }
        }
        Ok(value)
    }

    /// The outbox's backlog.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn lag(&self) -> Result<OutboxLag, EventError> {
        crate::outbox::outbox_lag(&self.claimer.store).await
    }
}

/// The transaction handed to [`EventBus::commit`]'s closure.
pub struct BusTransaction {
    tx: Transaction,
    config: BusConfig,
    prefix: Option<String>,
    partitions: BTreeSet<i32>,
}

impl fmt::Debug for BusTransaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusTransaction").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

impl BusTransaction {
    /// Puts `tokens` in front of the subjects of the events appended after this call, for
    /// example a tenant: `["tenant-42"]` gives `tenant-42.courses.LessonPublished`.
    ///
    /// Each token is checked: values from users never widen a subscription or publish
    /// where nobody expects.
    ///
    /// # Errors
    /// [`EventError::InvalidSubject`] for an empty token or one with `.`, `*`, `>`,
    /// whitespace, control or non-ASCII characters.
    pub fn subject_prefix(&mut self, tokens: &[&str]) -> Result<(), EventError> {
        for token in tokens {
            validate_subject_token(token)?;
        }
        self.prefix = if tokens.is_empty() { None } else { Some(tokens.join(".")) };
        Ok(())
    }

    /// Appends events to one aggregate and queues them for publishing; see
    /// [`Transaction::append`].
    ///
    /// # Errors
    /// As [`Transaction::append`]; [`EventError::InvalidSubject`] when a subject would be
    /// invalid (nothing is written then).
    pub async fn append<E: DomainEvent>(
        &mut self,
        aggregate_type: &str,
        aggregate_id: Uuid,
        expected: impl Into<ExpectedSequence>,
        events: impl IntoIterator<Item = E>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        let envelopes =
            events.into_iter().map(|e| EventEnvelope::new(aggregate_type, aggregate_id, e)).collect();
        self.append_envelopes(expected, envelopes).await
    }

    /// Appends prepared envelopes and queues them for publishing; see
    /// [`Transaction::append_envelopes`].
    ///
    /// # Errors
    /// As [`append`](BusTransaction::append).
    pub async fn append_envelopes<E: DomainEvent>(
        &mut self,
        expected: impl Into<ExpectedSequence>,
        envelopes: Vec<EventEnvelope<E>>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        // Subjects first: an invalid one refuses the append before anything is written.
        let subjects = envelopes.iter().map(|e| self.subject_of(e)).collect::<Result<Vec<_>, _>>()?;
        let stored = self.tx.append_envelopes(expected, envelopes).await?;
        let mut rows = OutboxRows::default();
        for (envelope, subject) in stored.iter().zip(subjects) {
            let partition = partition_of(envelope.aggregate_id);
            rows.positions.push(envelope.global_position.unwrap_or_default());
            rows.event_ids.push(envelope.event_id);
            rows.aggregate_ids.push(envelope.aggregate_id);
            rows.sequences.push(envelope.sequence);
            rows.subjects.push(subject);
            rows.partitions.push(partition);
            self.partitions.insert(partition);
        }
        if !rows.positions.is_empty() {
            let store = self.tx.store().clone();
            let wrong = || EventError::Config("the transaction belongs to another backend".into());
            match &store.inner.backend {
                Backend::Postgres(pg) => {
                    pg.outbox_insert(self.tx.pg_connection().ok_or_else(wrong)?, &rows).await?
                }
                Backend::Sqlite(sq) => {
                    sq.outbox_insert(self.tx.sqlite_connection().ok_or_else(wrong)?, &rows).await?
                }
            }
        }
        Ok(stored)
    }

    /// The PostgreSQL connection of the transaction, for the caller's own writes.
    pub fn pg_connection(&mut self) -> Option<&mut PgConnection> {
        self.tx.pg_connection()
    }

    /// The SQLite connection of the transaction (embedded backend), for the caller's own
    /// writes.
    pub fn sqlite_connection(&mut self) -> Option<&mut sqlx::sqlite::SqliteConnection> {
        self.tx.sqlite_connection()
    }

    fn subject_of<E: DomainEvent>(&self, envelope: &EventEnvelope<E>) -> Result<String, EventError> {
        let mut subject = match &self.prefix {
            Some(prefix) => format!("{prefix}.{}", envelope.event.subject()),
            None => envelope.event.subject().to_owned(),
        };
        if self.config.aggregate_id_in_subject {
            subject.push('.');
            subject.push_str(&envelope.aggregate_id.to_string());
        }
        validate_subject(&subject)?;
        Ok(subject)
    }
}
