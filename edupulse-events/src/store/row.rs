//! What the drivers read from the events table: a row before decoding, and which rows a
//! stream asks for.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use serde_json::value::RawValue;

use crate::event::envelope::Recorded;
use crate::event::wire::WireEnvelope;
use crate::store::StreamPosition;
use crate::{DomainEvent, EventEnvelope, EventError, KeyValue};

/// One row of the events table, before decoding.
pub(crate) struct StoredRow {
    pub(crate) global_position: i64,
    pub(crate) transaction_id: i64,
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: Uuid,
    pub(crate) sequence: i64,
    pub(crate) event_type: String,
    pub(crate) schema_version: i32,
    pub(crate) payload: String,
    pub(crate) metadata: String,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) recorded_at: DateTime<Utc>,
    /// The subject it is published on (`None`: an event the relay does not publish).
    pub(crate) subject: Option<String>,
}

/// Reads a stored row from a query result of either backend (the same column names).
pub(crate) fn stored_row<'r, R: Row>(row: &'r R) -> Result<StoredRow, sqlx::Error>
where
    &'static str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    Uuid: Decode<'r, R::Database> + Type<R::Database>,
    DateTime<Utc>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(StoredRow {
        global_position: row.try_get("global_position")?,
        transaction_id: row.try_get("transaction_id")?,
        event_id: row.try_get("event_id")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        payload: row.try_get("payload")?,
        metadata: row.try_get("metadata")?,
        occurred_at: row.try_get("occurred_at")?,
        recorded_at: row.try_get("recorded_at")?,
        subject: row.try_get("subject")?,
    })
}

impl StoredRow {
    /// Decodes the row through `E`'s upcaster chain; errors name the global position.
    pub(crate) fn decode<E: DomainEvent>(self) -> Result<EventEnvelope<E>, EventError> {
        Recorded {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            global_position: self.global_position,
            occurred_at: self.occurred_at,
            recorded_at: self.recorded_at,
            event_type: &self.event_type,
            // A negative or zero version is reported as unsupported by the decoder.
            version: u32::try_from(self.schema_version).unwrap_or(0),
            payload: &self.payload,
            metadata: &self.metadata,
        }
        .decode()
    }
}

impl StoredRow {
    /// The row as the message body carries it, payload and metadata moved into raw JSON
    /// values (no copy); stored text that is not JSON is a decode error naming the position.
    pub(crate) fn into_wire(self) -> Result<WireEnvelope, EventError> {
        let version = u32::try_from(self.schema_version).unwrap_or(0);
        let (event_type, position) = (&self.event_type, self.global_position);
        let bad = |what: &str, e: serde_json::Error| EventError::Decode {
            event_type: event_type.clone(),
            version,
            position: Some(position),
            source: format!("stored {what} is not valid JSON: {e}").into(),
        };
        let metadata = RawValue::from_string(self.metadata).map_err(|e| bad("metadata", e))?;
        let payload = RawValue::from_string(self.payload).map_err(|e| bad("payload", e))?;
        Ok(WireEnvelope {
            event_id: self.event_id,
            event_type: self.event_type,
            schema_version: version,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            global_position: self.global_position,
            occurred_at: self.occurred_at,
            recorded_at: self.recorded_at,
            metadata,
            payload,
        })
    }
}

/// What a stream reads.
pub(crate) enum PageQuery {
    /// One aggregate, by sequence.
    Aggregate(Uuid),
    /// The global stream, optionally only some event types.
    All { event_types: Option<Vec<String>> },
    /// Events whose keys contain `filter` (a JSON object), by global position.
    /// Events whose key `name` is `value` (none for a missing value: no event matches).
    Key { name: String, value: Option<KeyValue>, event_types: Vec<String> },
}

impl PageQuery {
    /// The cursor after `row`.
    pub(crate) fn cursor_after(&self, row: &StoredRow) -> StreamPosition {
        match self {
            Self::Aggregate(_) => StreamPosition { transaction_id: 0, global_position: row.sequence },
            Self::All { .. } => {
                StreamPosition { transaction_id: row.transaction_id, global_position: row.global_position }
            }
            Self::Key { .. } => StreamPosition { transaction_id: 0, global_position: row.global_position },
        }
    }
}
