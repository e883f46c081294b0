//! A row of the log made a message: the relay publishes rows without decoding them.

use crate::EventError;
use crate::event::wire::{HeaderFields, HeaderMetadata, OutgoingMessage, WireEnvelope};
use crate::store::row::StoredRow;

/// The message for a stored row (the relay publishes rows it does not decode).
pub(crate) fn outgoing(row: StoredRow, subject: String) -> Result<OutgoingMessage, EventError> {
    message(row.into_wire()?, subject)
}

/// The message carrying `wire` on `subject`, its headers repeating the envelope's fields
/// and the three metadata fields consumers filter on.
pub(crate) fn message(wire: WireEnvelope, subject: String) -> Result<OutgoingMessage, EventError> {
    let repeated: HeaderMetadata<'_> = serde_json::from_str(wire.metadata.get()).unwrap_or_default();
    let headers = HeaderFields {
        event_id: wire.event_id,
        event_type: &wire.event_type,
        schema_version: i32::try_from(wire.schema_version).unwrap_or(i32::MAX),
        aggregate_type: &wire.aggregate_type,
        aggregate_id: wire.aggregate_id,
        sequence: wire.sequence,
        correlation_id: repeated.correlation_id,
        causation_id: repeated.causation_id,
        traceparent: repeated.traceparent.as_deref(),
    }
    .headers();
    let body = serde_json::to_vec(&wire)
        .map_err(|source| EventError::Serialization { event_type: "WireEnvelope", source })?
        .into();
    Ok(OutgoingMessage {
        event_id: wire.event_id,
        aggregate_id: wire.aggregate_id,
        global_position: wire.global_position,
        subject,
        headers,
        body,
    })
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

    use super::*;
    use crate::Metadata;
    use crate::event::wire::{header_block_len, message_size_bound};
    use crate::store::append::{ENVELOPE_OVERHEAD_BOUND, MAX_HEADER_VALUE_LEN};

    /// The bound is above the real message, and the shortcut's overhead above the bound,
    /// with every header value at its longest and JSON escapes in the types.
    #[test]
    fn size_bound_covers_the_real_message() {
        let long = format!("{}\"\\", "a".repeat(MAX_HEADER_VALUE_LEN - 2));
        let metadata = Metadata {
            correlation_id: Some(Uuid::now_v7()),
            causation_id: Some(Uuid::now_v7()),
            traceparent: Some(long.clone()),
            ..Metadata::default()
        };
        let metadata_json = serde_json::to_string(&metadata).unwrap();
        let payload = format!("{{\"text\":\"{}\"}}", "p".repeat(5000));
        let occurred_at = DateTime::<Utc>::from_timestamp(1_800_000_000, 123).unwrap();
        let fields = HeaderFields {
            event_id: Uuid::now_v7(),
            event_type: &long,
            schema_version: i32::MAX,
            aggregate_type: &long,
            aggregate_id: Uuid::now_v7(),
            sequence: 0,
            correlation_id: metadata.correlation_id,
            causation_id: metadata.causation_id,
            traceparent: metadata.traceparent.as_deref(),
        };
        let bound = message_size_bound(&fields, occurred_at, payload.len(), metadata_json.len()).unwrap();
        let row = StoredRow {
            global_position: i64::MAX,
            transaction_id: 0,
            event_id: fields.event_id,
            aggregate_type: long.clone(),
            aggregate_id: fields.aggregate_id,
            sequence: i64::MAX,
            event_type: long.clone(),
            schema_version: i32::MAX,
            payload: payload.clone(),
            metadata: metadata_json.clone(),
            occurred_at,
            recorded_at: DateTime::<Utc>::from_timestamp(1_800_000_000, 999_999_999).unwrap(),
            subject: Some("courses.x".into()),
        };
        let message = outgoing(row, "courses.x".into()).unwrap();
        let real = header_block_len(&message.headers) + message.body.len();
        assert!(real <= bound, "real {real} > bound {bound}");
        assert!(bound <= payload.len() + metadata_json.len() + ENVELOPE_OVERHEAD_BOUND, "bound {bound}");
    }

    /// The headers read from stored metadata are those of the typed metadata: the user
    /// fields are skipped, an escaped traceparent is unescaped.
    #[test]
    fn headers_from_stored_metadata() {
        let mut user = std::collections::BTreeMap::new();
        user.insert("tenant".to_owned(), serde_json::json!({"nested": ["x", 1]}));
        let metadata = Metadata {
            correlation_id: Some(Uuid::now_v7()),
            causation_id: None,
            traceparent: Some("00-a\"b-01".into()),
            user,
        };
        let stored = serde_json::to_string(&metadata).unwrap();
        let repeated: HeaderMetadata<'_> = serde_json::from_str(&stored).unwrap();
        assert_eq!(repeated.correlation_id, metadata.correlation_id);
        assert_eq!(repeated.causation_id, None);
        assert_eq!(repeated.traceparent.as_deref(), metadata.traceparent.as_deref());
        let empty: HeaderMetadata<'_> = serde_json::from_str("{}").unwrap();
        assert!(empty.correlation_id.is_none() && empty.traceparent.is_none());
    }
}
