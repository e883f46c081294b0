//! The attribute keys the derive understands, in one place.

/// The attribute every key lives in: `#[event(...)]`.
pub(crate) const EVENT: &str = "event";

/// `name = "…"`: the stable event type name.
pub(crate) const NAME: &str = "name";
/// `alias = "…"`: an older name of the event type.
pub(crate) const ALIAS: &str = "alias";
/// `version = N`: the current schema version.
pub(crate) const VERSION: &str = "version";
/// `context = "…"`: the subject prefix.
pub(crate) const CONTEXT: &str = "context";
/// `subject = "…"`: the whole subject.
pub(crate) const SUBJECT: &str = "subject";
/// `previous = Type`: the typed shape of version N - 1.
pub(crate) const PREVIOUS: &str = "previous";
/// `upcast(from = K, with = path)`: a raw JSON step K -> K + 1.
pub(crate) const UPCAST: &str = "upcast";
/// `from = K` inside `upcast(...)`.
pub(crate) const FROM: &str = "from";
/// `with = path` inside `upcast(...)`.
pub(crate) const WITH: &str = "with";

/// `#[event(aggregate_id)]` on a field.
pub(crate) const AGGREGATE_ID: &str = "aggregate_id";
/// `#[event(no_aggregate_id)]` on a struct: the event does not carry its aggregate's id.
pub(crate) const NO_AGGREGATE_ID: &str = "no_aggregate_id";
/// `#[event(key)]` / `#[event(key = "…")]` on a field.
pub(crate) const KEY: &str = "key";

/// Keys allowed on an event struct.
pub(crate) const STRUCT_KEYS: &[&str] =
    &[NAME, ALIAS, VERSION, CONTEXT, SUBJECT, PREVIOUS, UPCAST, NO_AGGREGATE_ID];
/// Keys allowed on an enum of events.
pub(crate) const ENUM_KEYS: &[&str] = &[CONTEXT];
/// Keys allowed on a field.
pub(crate) const FIELD_KEYS: &[&str] = &[AGGREGATE_ID, KEY];
/// Keys allowed inside `upcast(...)`.
pub(crate) const UPCAST_KEYS: &[&str] = &[FROM, WITH];
