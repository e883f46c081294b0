//! What an append accepts: events that can be delivered to the broker and read back.
//!
//! Checked before anything is written, because a stored event is published and read for
//! ever: one the broker refuses would hold back its aggregate's later events at every
//! attempt, and one no reader can decode would stop every projection and the aggregate's
//! repository.

use crate::envelope::EventEnvelope;
use crate::error::EventProblem;
use crate::store::EncodedRow;
use crate::wire::{HeaderFields, message_size_bound};
use crate::{DomainEvent, EventError};

/// The most bytes a value that travels in a header (aggregate type, event type, trace
/// context) may take.
pub(crate) const MAX_HEADER_VALUE_LEN: usize = 256;

/// More than the headers and the envelope around the payload and the metadata can take:
/// nine headers of UUIDs, numbers and three values of at most [`MAX_HEADER_VALUE_LEN`]
/// bytes, and the envelope's fields with the aggregate and event types JSON-escaped (at
/// most twice as long: control characters are refused).
const ENVELOPE_OVERHEAD_BOUND: usize = 4 * 1024;

/// NATS' default `max_payload` (1 MiB): the default limit of a message, headers included.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Checks that one encoded event can be published in a message of at most
/// `max_message_bytes` and decoded back into `E`.
pub(crate) fn check_event<E: DomainEvent>(
    envelope: &EventEnvelope<E>,
    row: &EncodedRow,
    max_message_bytes: usize,
) -> Result<(), EventError> {
    let refuse = |problem| EventError::InvalidEvent {
        event_type: row.event_type.to_owned(),
        event_id: envelope.event_id,
        problem,
    };
    check_header_value("aggregate type", &envelope.aggregate_type, true).map_err(refuse)?;
    check_header_value("event type", row.event_type, true).map_err(refuse)?;
    if let Some(traceparent) = &envelope.metadata.traceparent {
        check_header_value("traceparent", traceparent, false).map_err(refuse)?;
    }
    let version = u32::try_from(row.schema_version).unwrap_or(u32::MAX);
    if let Err(e) = E::decode(row.event_type, version, row.payload.as_bytes()) {
        return Err(refuse(EventProblem::Unreadable { source: Box::new(e) }));
    }
    // Header values are checked above, so everything but the payload and the metadata
    // takes well under this: only events near the limit are measured exactly.
    if row.payload.len() + row.metadata.len() + ENVELOPE_OVERHEAD_BOUND <= max_message_bytes {
        return Ok(());
    }
    let fields = HeaderFields {
        event_id: envelope.event_id,
        event_type: row.event_type,
        schema_version: row.schema_version,
        aggregate_type: &envelope.aggregate_type,
        aggregate_id: envelope.aggregate_id,
        sequence: envelope.sequence,
        metadata: &envelope.metadata,
    };
    let size = message_size_bound(&fields, row.occurred_at, row.payload.len(), row.metadata.len())?;
    if size > max_message_bytes {
        return Err(refuse(EventProblem::TooLarge { size, limit: max_message_bytes }));
    }
    Ok(())
}

/// A value for a header: no control character (a header line cannot hold `\r` or `\n`,
/// and async-nats panics on them), not too long, and not empty where it must not be.
fn check_header_value(field: &'static str, value: &str, required: bool) -> Result<(), EventProblem> {
    if required && value.is_empty() {
        return Err(EventProblem::Empty { field });
    }
    if value.len() > MAX_HEADER_VALUE_LEN {
        return Err(EventProblem::TooLong { field, length: value.len(), max: MAX_HEADER_VALUE_LEN });
    }
    if value.chars().any(char::is_control) {
        return Err(EventProblem::ControlCharacter { field, value: value.chars().take(64).collect() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Metadata;
    use crate::stream::StoredRow;
    use crate::wire::{header_block_len, outgoing};
    use chrono::{DateTime, Utc};
    use uuid::Uuid;

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
            metadata: &metadata,
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
        };
        let message = outgoing(row, "courses.x".into()).unwrap();
        let real = header_block_len(&message.headers) + message.body.len();
        assert!(real <= bound, "real {real} > bound {bound}");
        assert!(bound <= payload.len() + metadata_json.len() + ENVELOPE_OVERHEAD_BOUND, "bound {bound}");
    }

    #[test]
    fn header_values() {
        assert!(
            check_header_value(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                false
            )
            .is_ok()
        );
        assert!(check_header_value("aggregate type", "lesson", true).is_ok());
        assert!(check_header_value("aggregate type", "leçon", true).is_ok());
        for bad in ["a\r\nb", "a\nb", "a\rb", "a\u{0}b", "a\tb", "a\u{7f}b", "a\u{85}b"] {
            assert!(
                matches!(
                    check_header_value("traceparent", bad, false),
                    Err(EventProblem::ControlCharacter { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(check_header_value("aggregate type", "", true), Err(EventProblem::Empty { .. })));
        assert!(check_header_value("traceparent", "", false).is_ok());
        assert!(matches!(
            check_header_value("aggregate type", &"x".repeat(257), true),
            Err(EventProblem::TooLong { length: 257, .. })
        ));
    }
}
