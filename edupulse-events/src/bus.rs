//! The commit-then-publish bus: events and their outbox rows are written in the caller's
//! transaction; after COMMIT they are published at once; whatever the broker does not
//! acknowledge stays in the outbox for the [`OutboxRelay`](crate::OutboxRelay).
//!
//! Guarantees: an event is published only if its transaction committed (the outbox row is
//! part of it), and no committed event is lost (the row stays until the broker acknowledged
//! it). A crash between COMMIT and publish, a broker outage or a relay dying mid-batch
//! leave rows pending, and a relay publishes them later; re-sends carry the same
//! `Nats-Msg-Id`, so JetStream drops them inside its duplicate window.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::postgres::PgConnection;
use uuid::Uuid;

use crate::outbox::{Claimer, OutboxLag, outbox_finish, partition_of};
use crate::publisher::Publisher;
use crate::store::{Backend, EventStore, ExpectedSequence, OutboxTarget, Transaction};
use crate::stream::StoredRow;
use crate::wire::{self, OutgoingMessage};
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
    sweeper: Arc<Sweeper>,
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
        Self {
            claimer: Arc::new(Claimer { store, publisher, batch_size }),
            sweeper: Arc::new(Sweeper::default()),
            config,
        }
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
        let max_message_bytes = self.claimer.publisher.max_payload().unwrap_or(usize::MAX);
        let mut bus_tx = BusTransaction {
            tx,
            max_message_bytes,
            config: self.config.clone(),
            prefix: None,
            outgoing: Vec::new(),
            seen: HashSet::new(),
            blocked: HashSet::new(),
        };
        let value = match work(&mut bus_tx).await {
            Ok(value) => value,
            Err(e) => {
                if let Err(rollback) = bus_tx.tx.rollback().await {
                    tracing::warn!(error = %rollback, "bus: rollback failed; the connection is discarded");
                }
                return Err(e);
            }
        };
        let BusTransaction { tx, outgoing, blocked, .. } = bus_tx;
        tx.commit().await?;
        if !outgoing.is_empty() {
            self.publish_committed(outgoing, &blocked).await;
        }
        Ok(value)
    }

    /// The fast path after COMMIT: publish the events straight from memory, then delete
    /// their outbox rows. An aggregate with older events still pending is left to the relay
    /// (publishing its new events first would reorder it), and so is whatever the broker
    /// does not acknowledge; the relays are woken for them.
    async fn publish_committed(&self, outgoing: Vec<OutgoingMessage>, blocked: &HashSet<Uuid>) {
        let store = &self.claimer.store;
        let (direct, left): (Vec<_>, Vec<_>) = if self.config.publish_after_commit {
            outgoing.into_iter().partition(|m| !blocked.contains(&m.aggregate_id))
        } else {
            (Vec::new(), outgoing)
        };
        let mut wake_relays = !left.is_empty();
        if !direct.is_empty() {
            let outcomes = self.claimer.publisher.publish(&direct).await;
            let mut acked = Vec::with_capacity(direct.len());
            let mut failed = Vec::new();
            let mut errors = Vec::new();
            for (message, outcome) in direct.iter().zip(outcomes) {
                match outcome {
                    Ok(_) => acked.push(message.global_position),
                    Err(e) => {
                        failed.push(message.global_position);
                        errors.push(e.to_string());
                    }
                }
            }
            if !failed.is_empty() {
                wake_relays = true;
                tracing::warn!(
                    failed = failed.len(),
                    error = %errors[0],
                    "bus: events committed but not acknowledged; the relay will retry"
                );
            }
            let mut finished = self.sweeper.clear(store, acked).await;
            if !failed.is_empty() {
                finished = finished.and(outbox_finish(store, &[], &failed, &errors).await);
            }
            if let Err(e) = finished {
                // The rows stay; a relay re-sends them and JetStream drops the duplicates.
                wake_relays = true;
                tracing::warn!(error = %e, "bus: published, but the outbox rows were not cleared");
            }
        }
        if wake_relays {
            let notified = match &store.inner.backend {
                Backend::Postgres(pg) => pg.notify_outbox().await,
                Backend::Sqlite(sq) => {
                    sq.notify_outbox();
                    Ok(())
                }
            };
            if let Err(e) = notified {
                tracing::warn!(error = %e, "bus: cannot wake the relays; they will poll");
            }
        }
    }

    /// The outbox's backlog.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn lag(&self) -> Result<OutboxLag, EventError> {
        crate::outbox::outbox_lag(&self.claimer.store).await
    }
}

/// Deletes the outbox rows of acknowledged events, the rows of many commits in one
/// statement: the group commit of the outbox.
///
/// Each caller queues its positions and waits for its turn; the first in turn deletes
/// everything queued so far, and those whose rows it took find them gone when their turn
/// comes. So a commit still returns only after its rows are deleted, but 64 concurrent
/// committers cost a few DELETE statements instead of 64.
#[derive(Default)]
struct Sweeper {
    queue: Mutex<SweepQueue>,
    turn: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct SweepQueue {
    positions: Vec<i64>,
    /// The number of the batch now being queued (the next DELETE takes it).
    batch: u64,
    /// The number of the newest batch a DELETE has finished (successfully or not).
    finished: Option<u64>,
}

impl Sweeper {
    async fn clear(&self, store: &EventStore, positions: Vec<i64>) -> Result<(), EventError> {
        if positions.is_empty() {
            return Ok(());
        }
        // No code in these critical sections can panic, so a poisoned lock holds a sound queue.
        let mine = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            queue.positions.extend(positions);
            queue.batch
        };
        let _turn = self.turn.lock().await;
        let (batch, taken) = {
            let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
            if queue.finished.is_some_and(|finished| finished >= mine) {
                // Another caller's DELETE took these rows. Had it failed, it woke the relays.
                return Ok(());
            }
            let batch = queue.batch;
            queue.batch += 1;
            (batch, std::mem::take(&mut queue.positions))
        };
        let deleted = outbox_finish(store, &taken, &[], &[]).await;
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).finished = Some(batch);
        deleted
    }
}

/// The transaction handed to [`EventBus::commit`]'s closure.
pub struct BusTransaction {
    tx: Transaction,
    /// The broker's limit of a message.
    max_message_bytes: usize,
    config: BusConfig,
    prefix: Option<String>,
    /// The committed events' messages, for the fast path.
    outgoing: Vec<OutgoingMessage>,
    /// Aggregates appended to in this transaction.
    seen: HashSet<Uuid>,
    /// Aggregates whose older events were still pending at their first append.
    blocked: HashSet<Uuid>,
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
        let envelopes = EventEnvelope::wrap_all(aggregate_type, aggregate_id, events);
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
        let Some(aggregate_id) = envelopes.first().map(|e| e.aggregate_id) else { return Ok(envelopes) };
        let target = OutboxTarget {
            subjects: &subjects,
            partition: partition_of(aggregate_id),
            max_message_bytes: self.max_message_bytes,
        };
        let appended = self.tx.append_with_outbox(expected.into(), envelopes, target).await?;
        if self.seen.insert(aggregate_id) && appended.older_pending {
            self.blocked.insert(aggregate_id);
        }
        for ((envelope, row), subject) in appended.envelopes.iter().zip(appended.rows).zip(subjects) {
            let stored = StoredRow {
                global_position: envelope.global_position.unwrap_or_default(),
                transaction_id: 0,
                event_id: envelope.event_id,
                aggregate_type: envelope.aggregate_type.clone(),
                aggregate_id,
                sequence: envelope.sequence,
                event_type: row.event_type.to_owned(),
                schema_version: row.schema_version,
                payload: row.payload,
                metadata: row.metadata,
                occurred_at: envelope.occurred_at,
                recorded_at: envelope.recorded_at.unwrap_or(envelope.occurred_at),
            };
            self.outgoing.push(wire::outgoing(stored, subject)?);
        }
        Ok(appended.envelopes)
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
