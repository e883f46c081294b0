//! The events themselves: the traits `#[derive(DomainEvent)]` implements, the typed values
//! it hands the store, envelopes, subjects, upcasting and the message format. Every other
//! layer builds on this one; it imports none of them.

pub(crate) mod envelope;
pub(crate) mod subject;
pub mod upcast;
pub mod wire;

use serde::{Serialize, de::DeserializeOwned};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::EventError;

/// A domain event, or an enum of domain events: everything the store and the broker need
/// to know about it, without hand-written match arms.
///
/// Implemented by `#[derive(DomainEvent)]`; see the [crate docs](crate) for the attributes.
/// On an event struct it describes that one event; on an enum of event structs it dispatches
/// to the variant.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a domain event",
    label = "not a domain event",
    note = "add `#[derive(DomainEvent)]` (and serde's `Serialize`, `Deserialize`) to `{Self}`"
)]
pub trait DomainEvent: Sized + Send + Sync + 'static {
    /// The current event type names this type produces (one for a struct).
    const EVENT_TYPES: &'static [&'static str];

    /// Every name [`decode`](DomainEvent::decode) accepts: the event types and their aliases.
    const ACCEPTED_TYPES: &'static [&'static str];

    /// The NATS subjects this type is published on (one for a struct).
    const SUBJECTS: &'static [&'static str];

    /// The stable event type name of this event, stored with every row.
    fn event_type(&self) -> &'static str;

    /// The NATS subject this event is published on.
    fn subject(&self) -> &'static str;

    /// The schema version this event is written with (the current version of its type).
    fn schema_version(&self) -> u32;

    /// The id of the aggregate this event belongs to, when a field is marked
    /// `#[event(aggregate_id)]`.
    fn aggregate_id(&self) -> Option<Uuid>;

    /// The fields marked `#[event(key)]`, as typed values for the store's key columns.
    ///
    /// A key whose value is `None` is left out.
    fn promoted_keys(&self) -> Vec<PromotedKey>;

    /// Serializes the event's own fields (not the envelope) to JSON.
    ///
    /// # Errors
    /// [`EventError::Serialization`] when serde refuses the value (a map with non-string keys, a
    /// custom `Serialize` that fails).
    fn to_payload(&self) -> Result<Box<RawValue>, EventError>;

    /// Decodes a stored or received payload of any known version into the current type,
    /// running the upcaster chain for older versions.
    ///
    /// # Errors
    /// - [`EventError::UnknownEventType`] when `event_type` is none of
    ///   [`ACCEPTED_TYPES`](DomainEvent::ACCEPTED_TYPES);
    /// - [`EventError::UnsupportedVersion`] when `version` is 0 or newer than the code knows;
    /// - [`EventError::Decode`] when the payload is not valid JSON of the expected shape or an
    ///   upcaster refuses it.
    fn decode(event_type: &str, version: u32, payload: &[u8]) -> Result<Self, EventError>;

    /// Whether [`decode`](DomainEvent::decode) accepts events of this type name.
    fn accepts(event_type: &str) -> bool {
        Self::ACCEPTED_TYPES.contains(&event_type)
    }

    /// The typed values the store binds for this event: the SQL bindings of the event.
    ///
    /// # Errors
    /// [`EventError::Serialization`] when the payload cannot be serialized.
    fn encode(&self) -> Result<EncodedEvent, EventError> {
        Ok(EncodedEvent {
            event_type: self.event_type(),
            schema_version: self.schema_version(),
            subject: self.subject(),
            aggregate_id: self.aggregate_id(),
            payload: self.to_payload()?,
            keys: self.promoted_keys(),
        })
    }
}

/// The schema of one event struct: its name, version, subject and upcaster chain.
///
/// Implemented by `#[derive(DomainEvent)]` on structs only. Old shapes of an event named by
/// `#[event(previous = OldShape)]` implement it too, which is how the typed chain recurses.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an event struct",
    label = "not an event struct",
    note = "an old shape named by `previous` derives `DomainEvent` too, with `#[event(version = N)]`"
)]
pub trait EventSchema: DomainEvent + Serialize + DeserializeOwned {
    /// The stable event type name.
    const EVENT_TYPE: &'static str;
    /// Older names of this event type that payloads may still carry.
    const ALIASES: &'static [&'static str];
    /// The current schema version (1 unless `#[event(version = N)]`).
    const VERSION: u32;
    /// The NATS subject, checked at compile time.
    const SUBJECT: &'static str;
    /// The names of the promoted key fields, in declaration order.
    const KEYS: &'static [&'static str];

    /// Decodes a payload of `version` (1 to [`VERSION`](EventSchema::VERSION)) through the
    /// upcaster chain, without looking at the event type name. `event_type` is used only in
    /// error messages.
    ///
    /// # Errors
    /// As [`DomainEvent::decode`], without the unknown-type case.
    fn decode_version(event_type: &str, version: u32, payload: &[u8]) -> Result<Self, EventError>;
}

/// An event ready to be written: the typed SQL bindings of one event.
///
/// The store binds these values as parameters of its insert; user code never writes the
/// event SQL.
#[derive(Debug, Clone)]
pub struct EncodedEvent {
    /// The `event_type` column.
    pub event_type: &'static str,
    /// The `schema_version` column.
    pub schema_version: u32,
    /// The subject the event is published on.
    pub subject: &'static str,
    /// The aggregate id found in the event, if a field is marked `#[event(aggregate_id)]`.
    pub aggregate_id: Option<Uuid>,
    /// The `payload` column: the event's own fields as JSON.
    pub payload: Box<RawValue>,
    /// The promoted keys, for the key columns.
    pub keys: Vec<PromotedKey>,
}

/// One field marked `#[event(key)]`: a name and a typed value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct PromotedKey {
    /// The key's name: the field name, or the `key = "…"` given.
    pub name: &'static str,
    /// The key's value.
    pub value: KeyValue,
}

/// The value of a promoted key.
///
/// Serializes as plain JSON (`"…"`, `42`, `true`), which is how the store indexes it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum KeyValue {
    /// A UUID key, such as another aggregate's id.
    Uuid(Uuid),
    /// A text key.
    Text(String),
    /// An integer key.
    Integer(i64),
    /// A boolean key.
    Bool(bool),
}

/// A field type that can be promoted with `#[event(key)]`.
///
/// Implemented for `Uuid`, `String`, the integer types that fit in `i64`, `bool`, references
/// to those and `Option`s of those. Implement it for your own newtypes.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a promoted key",
    label = "this field is marked `#[event(key)]`",
    note = "keys are `Uuid`, `String`, integers that fit in `i64`, `bool`, or an `Option` of \
            those; implement `edupulse_events::IntoKeyValue` for a newtype"
)]
pub trait IntoKeyValue {
    /// The key's value, or `None` to leave the key out for this event.
    fn key_value(&self) -> Option<KeyValue>;
}

/// A field type that can be the aggregate id: `Uuid`, or a newtype of it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an aggregate id",
    label = "this field is marked `#[event(aggregate_id)]`",
    note = "the aggregate id is a `Uuid` or a newtype of it; for a newtype, implement \
            `edupulse_events::AggregateId`"
)]
pub trait AggregateId {
    /// The aggregate's UUID.
    fn aggregate_uuid(&self) -> Uuid;
}

impl AggregateId for Uuid {
    fn aggregate_uuid(&self) -> Uuid {
        *self
    }
}

impl<T: AggregateId + ?Sized> AggregateId for &T {
    fn aggregate_uuid(&self) -> Uuid {
        (**self).aggregate_uuid()
    }
}

impl<T: AggregateId + ?Sized> AggregateId for Box<T> {
    fn aggregate_uuid(&self) -> Uuid {
        (**self).aggregate_uuid()
    }
}

impl IntoKeyValue for Uuid {
    fn key_value(&self) -> Option<KeyValue> {
        Some(KeyValue::Uuid(*self))
    }
}

impl IntoKeyValue for String {
    fn key_value(&self) -> Option<KeyValue> {
        Some(KeyValue::Text(self.clone()))
    }
}

impl IntoKeyValue for str {
    fn key_value(&self) -> Option<KeyValue> {
        Some(KeyValue::Text(self.to_owned()))
    }
}

impl IntoKeyValue for bool {
    fn key_value(&self) -> Option<KeyValue> {
        Some(KeyValue::Bool(*self))
    }
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl IntoKeyValue for $t {
            fn key_value(&self) -> Option<KeyValue> {
                Some(KeyValue::Integer(i64::from(*self)))
            }
        }
    )*};
}
int_keys!(i8, i16, i32, i64, u8, u16, u32);

impl<T: IntoKeyValue + ?Sized> IntoKeyValue for &T {
    fn key_value(&self) -> Option<KeyValue> {
        (**self).key_value()
    }
}

impl<T: IntoKeyValue + ?Sized> IntoKeyValue for Box<T> {
    fn key_value(&self) -> Option<KeyValue> {
        (**self).key_value()
    }
}

impl<T: IntoKeyValue> IntoKeyValue for Option<T> {
    fn key_value(&self) -> Option<KeyValue> {
        self.as_ref().and_then(IntoKeyValue::key_value)
    }
}
