//! A transaction of the store: appends and the caller's own writes commit together.

use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

use crate::store::Partition;
use crate::store::append::{AppendRules, SubjectRule};
use crate::store::backend::{Connection, Tx};
use crate::store::signals::Signals;
use crate::store::{ExpectedSequence, StreamPosition};
use crate::{DomainEvent, EventEnvelope, EventError, telemetry};

/// A database transaction of the store: appends and the caller's own writes commit or roll
/// back together. Dropping it without [`commit`](Transaction::commit) rolls it back.
pub struct Transaction {
    tx: Tx,
    /// Woken when the transaction commits events.
    signals: Arc<Signals>,
    /// A statement may have failed in this transaction: one of ours returned an error, or
    /// the caller had the raw connection. PostgreSQL then may have aborted the transaction,
    /// and answers COMMIT with ROLLBACK, which sqlx reports as success: `commit` asks first.
    may_be_aborted: bool,
    /// The stream positions of the events appended in this transaction, with their
    /// partitions: what a receipt waits for.
    written: Vec<(Partition, StreamPosition)>,
    /// How the events' subjects are made (the bus sets a prefix).
    pub(crate) subjects: SubjectRule,
    /// The largest message an event may become (the store's limit, or the broker's).
    pub(crate) max_message_bytes: usize,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction").field("backend", &self.tx.backend_name()).finish_non_exhaustive()
    }
}

impl Transaction {
    pub(crate) fn new(tx: Tx, signals: Arc<Signals>, max_message_bytes: usize) -> Self {
        Self {
            tx,
            signals,
            may_be_aborted: false,
            written: Vec::new(),
            subjects: SubjectRule::default(),
            max_message_bytes,
        }
    }

    /// Appends `events` to the aggregate `aggregate_id` of kind `aggregate_type`, in one
    /// statement, if its stream is at `expected`. The events get the sequences that follow,
    /// fresh UUID v7 ids and `occurred_at` = now; the stored envelopes are returned.
    ///
    /// Several appends in one transaction (to one or several aggregates, each with its own
    /// expected sequence) commit all together or not at all.
    ///
    /// # Errors
    /// - [`EventError::Concurrency`] when the stream is not at `expected`, with the actual
    ///   sequence. The transaction is still usable, but the usual answer is to roll back,
    ///   reload and decide again;
    /// - [`EventError::WrongAggregate`] when an event names another aggregate in its
    ///   `#[event(aggregate_id)]` field, or the aggregate exists with another type;
    /// - [`EventError::NegativeExpectedSequence`] for an expected sequence below 0;
    /// - [`EventError::InvalidEvent`] for an event that could not be delivered or read back;
    /// - [`EventError::Serialization`], [`EventError::Database`].
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

    /// Appends prepared envelopes (with their own ids, times and metadata, for example
    /// [`EventEnvelope::caused_by`]). All must name the same aggregate.
    ///
    /// # Errors
    /// As [`append`](Transaction::append).
    pub async fn append_envelopes<E: DomainEvent>(
        &mut self,
        expected: impl Into<ExpectedSequence>,
        envelopes: Vec<EventEnvelope<E>>,
    ) -> Result<Vec<EventEnvelope<E>>, EventError> {
        // For the span of the commit (`edupulse.commit` of the bus): a no-op in a span without
        // the field.
        if let Some(traceparent) = envelopes.iter().find_map(|e| e.metadata.traceparent.as_deref()) {
            tracing::Span::current().record("traceparent", traceparent);
        }
        let rules = AppendRules { max_message_bytes: self.max_message_bytes, subjects: &self.subjects };
        let appended = self.tx.append(expected.into(), envelopes, &rules).await;
        let appended = self.note(appended)?;
        self.written.extend(appended.positions.iter().map(|position| (appended.partition, *position)));
        Ok(appended.envelopes)
    }

    /// Remembers that a statement of this transaction failed.
    fn note<T>(&mut self, result: Result<T, EventError>) -> Result<T, EventError> {
        let result = telemetry::conflicts(result);
        if result.is_err() {
            self.may_be_aborted = true;
        }
        result
    }

    /// The database connection of this transaction, for the caller's own writes: match on
    /// it for the backend's sqlx connection.
    ///
    /// A statement that fails aborts a PostgreSQL transaction, even when its error is
    /// ignored: [`commit`](Transaction::commit) then returns
    /// [`EventError::TransactionAborted`]. Run a statement that may fail, and whose failure
    /// you want to ignore, inside a `SAVEPOINT` and roll back to it.
    pub fn connection(&mut self) -> Connection<'_> {
        self.may_be_aborted = true;
        self.tx.connection()
    }

    /// Saves a projection's checkpoint in this transaction, so that it commits together
    /// with the read-model changes it accounts for: each event's effect applies exactly
    /// once, whenever the process stops.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn save_checkpoint(&mut self, name: &str, position: StreamPosition) -> Result<(), EventError> {
        let result = self.tx.save_checkpoint(name, position).await;
        self.note(result)
    }

    /// A projection's checkpoint as this transaction sees it; `None` before the first save.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn checkpoint(&mut self, name: &str) -> Result<Option<StreamPosition>, EventError> {
        let result = self.tx.load_checkpoint(name).await;
        self.note(result)
    }

    /// A projection's checkpoint, locked until the transaction ends (created at the start
    /// of the stream if missing): what a projection runner compares before applying a batch.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn checkpoint_for_update(&mut self, name: &str) -> Result<StreamPosition, EventError> {
        let result = self.tx.lock_checkpoint(name).await;
        self.note(result)
    }

    /// Commits everything written in the transaction.
    ///
    /// A transaction that PostgreSQL aborted (a statement failed in it, even one whose
    /// error was ignored) is not committed: PostgreSQL answers its COMMIT with ROLLBACK.
    /// That is an error here, never a silent success.
    ///
    /// # Errors
    /// [`EventError::TransactionAborted`] when the transaction had been aborted;
    /// [`EventError::Database`] when COMMIT fails (for a lost connection, the outcome is
    /// unknown: the transaction may or may not have committed). Nothing is committed in the
    /// first case.
    pub async fn commit(self) -> Result<(), EventError> {
        self.commit_written().await.map(drop)
    }

    /// Commits, wakes this process's relays when events were written, and returns the
    /// written events' partitions and stream positions.
    pub(crate) async fn commit_written(self) -> Result<Vec<(Partition, StreamPosition)>, EventError> {
        let appended = !self.written.is_empty();
        let positions: Vec<i64> = if self.may_be_aborted {
            self.written.iter().map(|(_, position)| position.global_position).collect()
        } else {
            Vec::new()
        };
        self.tx.commit(self.may_be_aborted, &positions).await?;
        if appended {
            telemetry::appended(self.written.len());
            self.signals.wake();
        }
        Ok(self.written)
    }

    /// Rolls everything back.
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn rollback(self) -> Result<(), EventError> {
        self.tx.rollback().await
    }
}
