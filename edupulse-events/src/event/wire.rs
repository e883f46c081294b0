//! What travels on the broker: one message per event, its headers and its JSON body.
//!
//! The body is the envelope, with the payload exactly as stored; the headers repeat what a
//! consumer needs to route or filter a message without parsing it.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::event::envelope::Recorded;
use crate::{DomainEvent, EventEnvelope, EventError};

/// Header names set on every published message.
pub mod headers {
    /// JetStream's de-duplication id: the event id.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// The event type.
    pub const EVENT_TYPE: &str = "Edupulse-Event-Type";
    /// The schema version of the payload.
    pub const SCHEMA_VERSION: &str = "Edupulse-Schema-Version";
    /// The aggregate type.
    pub const AGGREGATE_TYPE: &str = "Edupulse-Aggregate-Type";
    /// The aggregate id.
    pub const AGGREGATE_ID: &str = "Edupulse-Aggregate-Id";
    /// The event's sequence in its aggregate.
    pub const SEQUENCE: &str = "Edupulse-Sequence";
    /// The correlation id (the event's own id when it starts a conversation).
    pub const CORRELATION_ID: &str = "Edupulse-Correlation-Id";
    /// The causation id, when the event has a cause.
    pub const CAUSATION_ID: &str = "Edupulse-Causation-Id";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
}

/// NATS' default `max_payload` (1 MiB): the default limit of a message, headers included.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// One message ready for the broker.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// The event id, also the de-duplication id.
    pub event_id: Uuid,
    /// The aggregate: a publisher never sends an aggregate's later event after an earlier
    /// one failed.
    pub aggregate_id: Uuid,
    /// The event's global position in the store.
    pub global_position: i64,
    /// The subject, validated when the event was committed.
    pub subject: String,
    /// Header name and value pairs.
    pub headers: Vec<(&'static str, String)>,
    /// The JSON body: [`WireEnvelope`]. Cheap to clone, as publishers need.
    pub body: Bytes,
}

/// The JSON body of a message.
#[derive(Debug, Serialize, Deserialize)]
pub struct WireEnvelope {
    /// The event id.
    pub event_id: Uuid,
    /// The event type.
    pub event_type: String,
    /// The schema version of `payload`.
    pub schema_version: u32,
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: Uuid,
    /// The sequence in the aggregate.
    pub sequence: i64,
    /// The global position in the store.
    pub global_position: i64,
    /// When it happened.
    pub occurred_at: DateTime<Utc>,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// Correlation, causation, trace context, user fields.
    pub metadata: Box<RawValue>,
    /// The event's fields, as stored (an older version is upcast by the consumer).
    pub payload: Box<RawValue>,
}

impl WireEnvelope {
    /// Decodes the event through `E`'s upcaster chain.
    ///
    /// # Errors
    /// The errors of [`DomainEvent::decode`], with the global position set; a
    /// [`EventError::Decode`] for invalid metadata.
    pub fn decode<E: DomainEvent>(self) -> Result<EventEnvelope<E>, EventError> {
        Recorded {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            global_position: self.global_position,
            occurred_at: self.occurred_at,
            recorded_at: self.recorded_at,
            event_type: &self.event_type,
            version: self.schema_version,
            payload: self.payload.get(),
            metadata: self.metadata.get(),
        }
        .decode()
    }
}

/// Decodes a message body into an envelope of `E`, upcasting old versions.
///
/// # Errors
/// [`EventError::Decode`] when the body is not a [`WireEnvelope`]; otherwise as
/// [`WireEnvelope::decode`].
pub fn decode_message<E: DomainEvent>(body: &[u8]) -> Result<EventEnvelope<E>, EventError> {
    let wire: WireEnvelope = serde_json::from_slice(body).map_err(|e| EventError::Decode {
        event_type: String::from("<unknown>"),
        version: 0,
        position: None,
        source: format!("the message body is not an event envelope: {e}").into(),
    })?;
    wire.decode()
}

/// What the headers of an event's message are made of.
pub(crate) struct HeaderFields<'a> {
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'a str,
    pub(crate) schema_version: i32,
    pub(crate) aggregate_type: &'a str,
    pub(crate) aggregate_id: Uuid,
    pub(crate) sequence: i64,
    pub(crate) correlation_id: Option<Uuid>,
    pub(crate) causation_id: Option<Uuid>,
    pub(crate) traceparent: Option<&'a str>,
}

/// The metadata fields the headers repeat, read from stored metadata without building the
/// whole [`Metadata`] (its user fields are skipped, not copied).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct HeaderMetadata<'a> {
    #[serde(default)]
    pub(crate) correlation_id: Option<Uuid>,
    #[serde(default)]
    pub(crate) causation_id: Option<Uuid>,
    #[serde(default, borrow)]
    pub(crate) traceparent: Option<std::borrow::Cow<'a, str>>,
}

impl HeaderFields<'_> {
    /// The header name and value pairs of the message.
    pub(crate) fn headers(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (headers::MSG_ID, self.event_id.to_string()),
            (headers::EVENT_TYPE, self.event_type.to_owned()),
            (headers::SCHEMA_VERSION, self.schema_version.to_string()),
            (headers::AGGREGATE_TYPE, self.aggregate_type.to_owned()),
            (headers::AGGREGATE_ID, self.aggregate_id.to_string()),
            (headers::SEQUENCE, self.sequence.to_string()),
            (headers::CORRELATION_ID, self.correlation_id.unwrap_or(self.event_id).to_string()),
        ];
        if let Some(causation) = self.causation_id {
            out.push((headers::CAUSATION_ID, causation.to_string()));
        }
        if let Some(traceparent) = self.traceparent {
            out.push((headers::TRACEPARENT, traceparent.to_owned()));
        }
        out
    }
}

/// The bytes a header block takes on the wire (`NATS/1.0\r\n`, `Name: value\r\n` each,
/// `\r\n`): NATS counts them against `max_payload` with the body.
pub(crate) fn header_block_len(headers: &[(&'static str, String)]) -> usize {
    "NATS/1.0\r\n\r\n".len() + headers.iter().map(|(name, value)| name.len() + value.len() + 4).sum::<usize>()
}

/// An upper bound of the size of an event's message (headers and body) before the store
/// has given it a position and a record time: those take their widest form here.
pub(crate) fn message_size_bound(
    fields: &HeaderFields<'_>,
    occurred_at: DateTime<Utc>,
    payload_len: usize,
    metadata_len: usize,
) -> Result<usize, EventError> {
    let widest = HeaderFields { sequence: i64::MAX, ..*fields };
    let headers = header_block_len(&widest.headers());
    // The body with one-byte stand-ins for the payload and the metadata, whose lengths are
    // added back: the payload is not copied to be measured.
    let stand_in = || RawValue::from_string("0".to_owned());
    let serialization = |source| EventError::Serialization { event_type: "WireEnvelope", source };
    let recorded_at = DateTime::<Utc>::from_timestamp(occurred_at.timestamp().saturating_add(1), 999_999_999)
        .unwrap_or(occurred_at);
    let skeleton = WireEnvelope {
        event_id: fields.event_id,
        event_type: fields.event_type.to_owned(),
        schema_version: u32::try_from(fields.schema_version).unwrap_or(u32::MAX),
        aggregate_type: fields.aggregate_type.to_owned(),
        aggregate_id: fields.aggregate_id,
        sequence: i64::MAX,
        global_position: i64::MAX,
        occurred_at,
        recorded_at,
        metadata: stand_in().map_err(serialization)?,
        payload: stand_in().map_err(serialization)?,
    };
    let skeleton_len = serde_json::to_vec(&skeleton).map_err(serialization)?.len();
    Ok(headers + skeleton_len - 2 + payload_len + metadata_len)
}
