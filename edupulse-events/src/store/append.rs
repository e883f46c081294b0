//! What an append accepts and how it is encoded for any backend: one aggregate per append,
//! subjects made and checked, and events that can be delivered to the broker and read back.
//!
//! Checked before anything is written, because a stored event is published and read for
//! ever: one the broker refuses would hold back its aggregate's later events at every
//! attempt, and one no reader can decode would stop every projection and the aggregate's
//! repository.

use uuid::Uuid;

use crate::error::EventProblem;
use crate::event::PromotedKey;
use crate::event::wire::{HeaderFields, message_size_bound};
use crate::store::Partition;
use crate::store::{ExpectedSequence, StreamPosition};
use crate::{DomainEvent, EventEnvelope, EventError, KeyValue, Metadata, validate_subject};

/// The most bytes a value that travels in a header (aggregate type, event type, trace
/// context) may take.
pub(crate) const MAX_HEADER_VALUE_LEN: usize = 256;

/// More than the headers and the envelope around the payload and the metadata can take:
/// nine headers of UUIDs, numbers and three values of at most [`MAX_HEADER_VALUE_LEN`]
/// bytes, and the envelope's fields with the aggregate and event types JSON-escaped (at
/// most twice as long: control characters are refused).
pub(crate) const ENVELOPE_OVERHEAD_BOUND: usize = 4 * 1024;

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
    // What is stored is read back as every reader reads it: the payload through `E`'s
    // decoder, the metadata as `Metadata` (both backends keep the text as written, so this
    // is the text they read).
    let version = u32::try_from(row.schema_version).unwrap_or(u32::MAX);
    if let Err(e) = E::decode(row.event_type, version, row.payload.as_bytes()) {
        return Err(refuse(EventProblem::Unreadable { source: Box::new(e) }));
    }
    // Without user fields the metadata is ids and a checked string: it always reads back.
    if !envelope.metadata.user.is_empty()
        && let Err(source) = serde_json::from_str::<Metadata>(&row.metadata)
    {
        return Err(refuse(EventProblem::UnreadableMetadata { source }));
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
        correlation_id: envelope.metadata.correlation_id,
        causation_id: envelope.metadata.causation_id,
        traceparent: envelope.metadata.traceparent.as_deref(),
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

/// How the subjects of an append's events are made: the event's own subject, after an
/// optional prefix (a tenant), with the aggregate id as a last token when asked.
#[derive(Debug, Clone, Default)]
pub(crate) struct SubjectRule {
    /// Validated tokens joined by `.`.
    pub(crate) prefix: Option<String>,
    pub(crate) aggregate_id_token: bool,
}

impl SubjectRule {
    /// The subject of `envelope`'s message, validated.
    fn subject_of<E: DomainEvent>(&self, envelope: &EventEnvelope<E>) -> Result<String, EventError> {
        let mut subject = match &self.prefix {
            Some(prefix) => format!("{prefix}.{}", envelope.event.subject()),
            None => envelope.event.subject().to_owned(),
        };
        if self.aggregate_id_token {
            subject.push('.');
            subject.push_str(&envelope.aggregate_id.to_string());
        }
        validate_subject(&subject)?;
        Ok(subject)
    }
}

/// What an append checks its events against.
pub(crate) struct AppendRules<'a> {
    /// The largest message an event may become.
    pub(crate) max_message_bytes: usize,
    pub(crate) subjects: &'a SubjectRule,
}

static DEFAULT_SUBJECTS: SubjectRule = SubjectRule { prefix: None, aggregate_id_token: false };

impl AppendRules<'static> {
    /// The event's own subjects, within `max_message_bytes`.
    pub(crate) fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes, subjects: &DEFAULT_SUBJECTS }
    }
}

/// What an append stored.
pub(crate) struct Appended<E> {
    /// The envelopes with their sequences, positions and record times.
    pub(crate) envelopes: Vec<EventEnvelope<E>>,
    /// The aggregate's partition.
    pub(crate) partition: Partition,
    /// Where each event is in the global stream, in the same order.
    pub(crate) positions: Vec<StreamPosition>,
}

/// One event ready for the events table, encoded once for any backend.
pub(crate) struct EncodedRow {
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'static str,
    pub(crate) schema_version: i32,
    pub(crate) payload: String,
    pub(crate) metadata: String,
    pub(crate) keys: String,
    pub(crate) occurred_at: chrono::DateTime<chrono::Utc>,
    /// The subject the relay publishes it on.
    pub(crate) subject: String,
}

/// An append, checked and encoded, before any backend sees it.
pub(crate) struct Prepared {
    pub(crate) aggregate_id: Uuid,
    pub(crate) aggregate_type: String,
    pub(crate) rows: Vec<EncodedRow>,
    /// The number of events, as SQL binds it.
    pub(crate) count: i64,
    /// The aggregate's partition.
    pub(crate) partition: Partition,
}

/// Checks and encodes an append for any backend; `None` when there is nothing to append.
pub(crate) fn prepare_append<E: DomainEvent>(
    envelopes: &[EventEnvelope<E>],
    expected: ExpectedSequence,
    rules: &AppendRules<'_>,
) -> Result<Option<Prepared>, EventError> {
    let Some(first) = envelopes.first() else { return Ok(None) };
    if let ExpectedSequence::Exactly(n) = expected
        && n < 0
    {
        return Err(EventError::NegativeExpectedSequence(n));
    }
    let aggregate_id = first.aggregate_id;
    let aggregate_type = first.aggregate_type.clone();
    let rows = encode_rows(envelopes, aggregate_id, &aggregate_type, rules)?;
    let count =
        i64::try_from(rows.len()).map_err(|_| EventError::Config("too many events in one append".into()))?;
    Ok(Some(Prepared { aggregate_id, aggregate_type, rows, count, partition: Partition::of(aggregate_id) }))
}

/// Encodes the envelopes of one append, checking that they all belong to one aggregate.
fn encode_rows<E: DomainEvent>(
    envelopes: &[EventEnvelope<E>],
    aggregate_id: Uuid,
    aggregate_type: &str,
    rules: &AppendRules<'_>,
) -> Result<Vec<EncodedRow>, EventError> {
    envelopes
        .iter()
        .map(|envelope| {
            check_aggregate(envelope, aggregate_id, aggregate_type)?;
            let subject = rules.subjects.subject_of(envelope)?;
            let encoded = envelope.event.encode()?;
            let event_type = encoded.event_type;
            let serialization = |source| EventError::Serialization { event_type, source };
            let schema_version = i32::try_from(encoded.schema_version).map_err(|_| {
                EventError::Config(format!(
                    "schema version {} does not fit the store",
                    encoded.schema_version
                ))
            })?;
            check_keys(envelope, &encoded.keys)?;
            let keys: std::collections::BTreeMap<&str, _> =
                encoded.keys.iter().map(|k| (k.name, &k.value)).collect();
            let row = EncodedRow {
                event_id: envelope.event_id,
                event_type,
                schema_version,
                payload: String::from(encoded.payload.get()),
                metadata: serde_json::to_string(&envelope.metadata).map_err(serialization)?,
                keys: serde_json::to_string(&keys).map_err(serialization)?,
                occurred_at: envelope.occurred_at,
                subject,
            };
            check_event(envelope, &row, rules.max_message_bytes)?;
            Ok(row)
        })
        .collect()
}

/// Promoted keys the store's key index can hold: PostgreSQL's `jsonb` refuses a NUL
/// character in a string, so the event would fail as a database error (and SQLite's JSON
/// functions would read the text cut at it).
fn check_keys<E: DomainEvent>(envelope: &EventEnvelope<E>, keys: &[PromotedKey]) -> Result<(), EventError> {
    for key in keys {
        if let KeyValue::Text(text) = &key.value
            && text.contains('\0')
        {
            return Err(EventError::InvalidEvent {
                event_type: envelope.event.event_type().to_owned(),
                event_id: envelope.event_id,
                problem: EventProblem::KeyNul { name: key.name },
            });
        }
    }
    Ok(())
}

fn check_aggregate<E: DomainEvent>(
    envelope: &EventEnvelope<E>,
    aggregate_id: Uuid,
    aggregate_type: &str,
) -> Result<(), EventError> {
    if envelope.aggregate_id != aggregate_id || envelope.aggregate_type != aggregate_type {
        return Err(EventError::WrongAggregate(format!(
            "one append writes to one aggregate: {} {} and {aggregate_type} {aggregate_id} are both in it",
            envelope.aggregate_type, envelope.aggregate_id
        )));
    }
    if let Some(own) = envelope.event.aggregate_id()
        && own != aggregate_id
    {
        return Err(EventError::WrongAggregate(format!(
            "event `{}` names aggregate {own} in its `#[event(aggregate_id)]` field but is appended to {aggregate_id}",
            envelope.event.event_type()
        )));
    }
    Ok(())
}

/// Why an append wrote nothing, from the stream row as it is now.
pub(crate) fn refusal(
    aggregate_id: Uuid,
    aggregate_type: &str,
    expected: ExpectedSequence,
    stream: Option<(String, i64)>,
) -> EventError {
    match stream {
        Some((stored_type, _)) if stored_type != aggregate_type => EventError::WrongAggregate(format!(
            "aggregate {aggregate_id} is a `{stored_type}`, not a `{aggregate_type}`: one id, one aggregate type"
        )),
        Some((_, actual)) => EventError::Concurrency { aggregate_id, expected: expected.as_i64(), actual },
        None => EventError::Concurrency { aggregate_id, expected: expected.as_i64(), actual: 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
