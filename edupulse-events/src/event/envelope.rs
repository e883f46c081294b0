//! The envelope around every stored and published event: ids, position and metadata.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::{DomainEvent, EventError};

/// An event together with where it belongs and where it came from.
///
/// - `event_id` is a UUID v7, so ids sort by creation time; it is also the broker's
///   de-duplication id (`Nats-Msg-Id`).
/// - `sequence` is the event's place in its aggregate's stream, from 1, gapless.
/// - `global_position` is assigned by the store when the event is appended; `None` before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope<E> {
    /// Unique, time-ordered id of this event (UUID v7).
    pub event_id: Uuid,
    /// The kind of aggregate the event belongs to, such as `"lesson"`.
    pub aggregate_type: String,
    /// The aggregate the event belongs to.
    pub aggregate_id: Uuid,
    /// Position in the aggregate's stream, from 1; 0 until the store assigns it.
    pub sequence: i64,
    /// Position in the store's global stream; `None` until the event is stored.
    pub global_position: Option<i64>,
    /// When the fact happened, as told by the writer.
    pub occurred_at: DateTime<Utc>,
    /// When the store recorded the event; `None` until the event is stored.
    pub recorded_at: Option<DateTime<Utc>>,
    /// Correlation, causation, trace context and user fields.
    pub metadata: Metadata,
    /// The event itself.
    pub event: E,
}

impl<E> EventEnvelope<E> {
    /// Wraps a new event: a fresh UUID v7 id, `occurred_at` = now, empty metadata, not yet
    /// stored.
    pub fn new(aggregate_type: impl Into<String>, aggregate_id: Uuid, event: E) -> Self {
        Self {
            event_id: Uuid::now_v7(),
            aggregate_type: aggregate_type.into(),
            aggregate_id,
            sequence: 0,
            global_position: None,
            occurred_at: Utc::now(),
            recorded_at: None,
            metadata: Metadata::default(),
            event,
        }
    }

    /// Wraps each of `events` with [`new`](EventEnvelope::new), for one aggregate.
    pub(crate) fn wrap_all(
        aggregate_type: &str,
        aggregate_id: Uuid,
        events: impl IntoIterator<Item = E>,
    ) -> Vec<Self> {
        events.into_iter().map(|e| Self::new(aggregate_type, aggregate_id, e)).collect()
    }

    /// Replaces the metadata.
    #[must_use]
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }

    /// Marks this event as caused by `cause`: causation = `cause.event_id`, correlation =
    /// `cause`'s correlation id, or `cause.event_id` when it has none. The trace context is
    /// carried over when this event has none of its own.
    #[must_use]
    pub fn caused_by<C>(mut self, cause: &EventEnvelope<C>) -> Self {
        let inherited = Metadata::caused_by(cause);
        self.metadata.correlation_id = inherited.correlation_id;
        self.metadata.causation_id = inherited.causation_id;
        if self.metadata.traceparent.is_none() {
            self.metadata.traceparent = inherited.traceparent;
        }
        self
    }

    /// The id that correlates this event with the others of the same conversation: the
    /// correlation id, or the event's own id when it starts one.
    pub fn correlation_id(&self) -> Uuid {
        self.metadata.correlation_id.unwrap_or(self.event_id)
    }

    /// Converts the event, keeping the envelope (for example a struct into its enum).
    pub fn map<F>(self, f: impl FnOnce(E) -> F) -> EventEnvelope<F> {
        EventEnvelope {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            global_position: self.global_position,
            occurred_at: self.occurred_at,
            recorded_at: self.recorded_at,
            metadata: self.metadata,
            event: f(self.event),
        }
    }
}

/// Where an event came from: correlation and causation ids, the W3C trace context and free
/// user fields.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The id shared by every event of one conversation (the first event's id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The id of the event (or command) that directly caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// W3C `traceparent` of the span that wrote the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Anything else the application wants to keep with the event (user id, tenant, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub user: BTreeMap<String, serde_json::Value>,
}

impl Metadata {
    /// Metadata of an event caused by `cause`: causation = `cause.event_id`, correlation =
    /// `cause`'s correlation id or, when it has none, `cause.event_id`; the trace context is
    /// inherited.
    pub fn caused_by<C>(cause: &EventEnvelope<C>) -> Self {
        Self {
            correlation_id: Some(cause.correlation_id()),
            causation_id: Some(cause.event_id),
            traceparent: cause.metadata.traceparent.clone(),
            user: BTreeMap::new(),
        }
    }

    /// Sets a user field.
    #[must_use]
    pub fn with(mut self, key: impl Into<String>, value: impl Into<serde_json::Value>) -> Self {
        self.user.insert(key.into(), value.into());
        self
    }
}

/// An event as it was recorded, its payload and metadata still JSON: what the store reads
/// and the broker carries, decoded the same way from both.
pub(crate) struct Recorded<'a> {
    pub(crate) event_id: Uuid,
    pub(crate) aggregate_type: String,
    pub(crate) aggregate_id: Uuid,
    pub(crate) sequence: i64,
    pub(crate) global_position: i64,
    pub(crate) occurred_at: DateTime<Utc>,
    pub(crate) recorded_at: DateTime<Utc>,
    pub(crate) event_type: &'a str,
    /// The payload's schema version (0, never valid, for a stored value out of range).
    pub(crate) version: u32,
    pub(crate) payload: &'a str,
    pub(crate) metadata: &'a str,
}

impl Recorded<'_> {
    /// Decodes the event through `E`'s upcaster chain; errors name the global position.
    pub(crate) fn decode<E: DomainEvent>(self) -> Result<EventEnvelope<E>, EventError> {
        let (position, version) = (self.global_position, self.version);
        let event = E::decode(self.event_type, version, self.payload.as_bytes())
            .map_err(|e| e.at_position(position))?;
        let metadata: Metadata =
            serde_json::from_str(self.metadata).map_err(|source| EventError::Decode {
                event_type: self.event_type.to_owned(),
                version,
                position: Some(position),
                source: format!("invalid metadata: {source}").into(),
            })?;
        Ok(EventEnvelope {
            event_id: self.event_id,
            aggregate_type: self.aggregate_type,
            aggregate_id: self.aggregate_id,
            sequence: self.sequence,
            global_position: Some(position),
            occurred_at: self.occurred_at,
            recorded_at: Some(self.recorded_at),
            metadata,
            event,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_v7_and_ordered() {
        let a = EventEnvelope::new("lesson", Uuid::nil(), ());
        let b = EventEnvelope::new("lesson", Uuid::nil(), ());
        assert_eq!(a.event_id.get_version_num(), 7);
        assert!(a.event_id < b.event_id);
    }

    #[test]
    fn causation_starts_and_follows_a_conversation() {
        let first = EventEnvelope::new("lesson", Uuid::now_v7(), 1);
        let second = EventEnvelope::new("quiz", Uuid::now_v7(), 2).caused_by(&first);
        assert_eq!(second.metadata.causation_id, Some(first.event_id));
        assert_eq!(second.metadata.correlation_id, Some(first.event_id));

        let third = EventEnvelope::new("quiz", Uuid::now_v7(), 3).caused_by(&second);
        assert_eq!(third.metadata.causation_id, Some(second.event_id));
        assert_eq!(third.metadata.correlation_id, Some(first.event_id));
        assert_eq!(third.correlation_id(), first.event_id);
    }

    #[test]
    fn caused_by_keeps_own_trace_and_user_fields() {
        let mut cause = EventEnvelope::new("lesson", Uuid::now_v7(), ());
        cause.metadata.traceparent = Some("00-cause-01".into());
        let own = EventEnvelope::new("lesson", Uuid::now_v7(), ())
            .with_metadata(Metadata::default().with("tenant", "t1"))
            .caused_by(&cause);
        assert_eq!(own.metadata.traceparent.as_deref(), Some("00-cause-01"));
        assert_eq!(own.metadata.user.get("tenant"), Some(&serde_json::json!("t1")));
    }
}
