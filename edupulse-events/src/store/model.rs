//! The store's plain values: expected sequences, stream positions, snapshots, and the
//! configuration.

use uuid::Uuid;

use crate::EventError;
use crate::event::wire::DEFAULT_MAX_MESSAGE_BYTES;

/// The sequence an append expects the aggregate's stream to be at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedSequence {
    /// Append whatever the stream's sequence is (no concurrency check).
    Any,
    /// The stream must be at exactly this sequence; 0 means the aggregate has no events yet.
    Exactly(i64),
}

impl From<i64> for ExpectedSequence {
    fn from(sequence: i64) -> Self {
        Self::Exactly(sequence)
    }
}

impl ExpectedSequence {
    /// As stored procedures see it: -1 for `Any`.
    pub(crate) fn as_i64(self) -> i64 {
        match self {
            Self::Any => -1,
            Self::Exactly(n) => n,
        }
    }
}

/// A place in the global stream, from which [`EventStore::stream_all`](crate::EventStore::stream_all) resumes.
///
/// The global stream is ordered by the writing transaction, then by position: events of a
/// transaction are read only once every older transaction has finished, so an event that
/// commits late with a lower position is never skipped (see [`EventStore::stream_all`](crate::EventStore::stream_all)).
/// Save both numbers as a projection's checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamPosition {
    /// The writing transaction's id (PostgreSQL `xid8`).
    pub transaction_id: i64,
    /// The event's global position.
    pub global_position: i64,
}

impl StreamPosition {
    /// The start of the stream.
    pub const START: Self = Self { transaction_id: 0, global_position: 0 };

    /// A projection checkpoint that asks for a rebuild, below [`START`](Self::START):
    /// [`EventStore::request_rebuild`](crate::EventStore::request_rebuild) saves it and the
    /// projection's runner, on its next batch, empties the read model and reads from the
    /// start.
    pub const REBUILD: Self = Self { transaction_id: -1, global_position: -1 };
}

/// An aggregate's state after `sequence` events, as stored: a cache that spares replaying
/// the whole history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The aggregate.
    pub aggregate_id: Uuid,
    /// Its type.
    pub aggregate_type: String,
    /// The sequence of the last event folded into `state`.
    pub sequence: i64,
    /// The version of the state's shape; a snapshot of another version is ignored.
    pub state_version: u32,
    /// The state as JSON.
    pub state: String,
}

/// A validated SQL schema name: 1 to 63 characters, lowercase ASCII letters, digits and `_`,
/// not starting with a digit and not `pg_…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    /// Checks a schema name.
    ///
    /// # Errors
    /// [`EventError::Config`] when the name is not a plain lowercase identifier.
    pub fn new(name: impl Into<String>) -> Result<Self, EventError> {
        let name = name.into();
        let valid_chars = name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        let starts_ok = name.bytes().next().is_some_and(|b| !b.is_ascii_digit());
        if !valid_chars || !starts_ok || name.len() > 63 || name.starts_with("pg_") {
            return Err(EventError::Config(format!(
                "invalid schema name {name:?}: use 1 to 63 lowercase ASCII letters, digits and `_`, \
                 not starting with a digit or `pg_`"
            )));
        }
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How the store is set up: `StoreConfig::default()` or [`with_schema`](Self::with_schema),
/// then the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct StoreConfig {
    /// The schema holding the store's tables (default `edupulse`).
    pub schema: SchemaName,
    /// The most connections the store's own pool opens (default 10).
    pub max_connections: u32,
    /// How many rows one page of a stream reads (default 500).
    pub page_size: u32,
    /// The largest message an event may become, headers included (default 1 MiB, NATS'
    /// default `max_payload`). Appends refuse larger events before writing anything: the
    /// broker would refuse them at every attempt. The bus also applies the broker's own
    /// limit when it is lower.
    pub max_message_bytes: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            schema: SchemaName("edupulse".into()),
            max_connections: 10,
            page_size: 500,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        }
    }
}

impl StoreConfig {
    /// The default configuration with another schema.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid schema name.
    pub fn with_schema(schema: &str) -> Result<Self, EventError> {
        Ok(Self { schema: SchemaName::new(schema)?, ..Self::default() })
    }
}

setters!(StoreConfig {
    with_max_connections => max_connections: u32,
    with_page_size => page_size: u32,
    with_max_message_bytes => max_message_bytes: usize,
});

impl StoreConfig {
    /// An invalid setting, as an error.
    pub(crate) fn check(&self) -> Result<(), EventError> {
        if self.max_connections == 0 || self.page_size == 0 || self.max_message_bytes == 0 {
            return Err(EventError::Config(
                "store configuration: max_connections, page_size and max_message_bytes must be at least 1"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// The number of partitions: the most relays that can publish at once.
pub const PARTITIONS: i32 = 64;

/// One share of the log: all of an aggregate's events fall in the partition its id names
/// (the low six bits of the id; the PostgreSQL column computes the same from its last byte).
/// Each partition has its own relay checkpoint, and a relay holds whole partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Partition(i32);

impl Partition {
    /// The partition of an aggregate.
    pub(crate) fn of(aggregate_id: Uuid) -> Self {
        // `as` is exact: the remainder is below 64.
        Self((aggregate_id.as_u128() % PARTITIONS as u128) as i32)
    }

    /// A partition number as the store keeps it (a column, or a setting checked against
    /// [`PARTITIONS`]).
    pub(crate) const fn new(number: i32) -> Self {
        Self(number)
    }

    /// Every partition of `range` (a relay's setting).
    pub(crate) fn range(range: std::ops::Range<i32>) -> impl Iterator<Item = Self> {
        range.map(Self)
    }

    /// The number, as the store keeps it.
    #[cfg(feature = "sqlite")]
    pub(crate) const fn number(self) -> i32 {
        self.0
    }

    /// Its index in a table of [`PARTITIONS`] slots (`None` out of range).
    pub(crate) fn index(self) -> Option<usize> {
        usize::try_from(self.0).ok().filter(|i| *i < PARTITIONS as usize)
    }
}

/// An event's place in the order of insertion (`global_position`): what the parked table
/// keys its events by. (A relay orders rows by [`StreamPosition`], which holds it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct GlobalPosition(i64);

impl GlobalPosition {
    /// The global position of an event at `position`.
    pub(crate) const fn of(position: StreamPosition) -> Self {
        Self(position.global_position)
    }

    /// A global position as the store keeps it.
    pub(crate) const fn new(position: i64) -> Self {
        Self(position)
    }

    /// As the store keeps it.
    pub(crate) const fn get(self) -> i64 {
        self.0
    }
}

impl std::fmt::Display for GlobalPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Stores a newtype as the integer it wraps, on either backend.
macro_rules! stored_as {
    ($newtype:ty, $inner:ty) => {
        impl<DB: sqlx::Database> sqlx::Type<DB> for $newtype
        where
            $inner: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <$inner as sqlx::Type<DB>>::type_info()
            }

            fn compatible(ty: &DB::TypeInfo) -> bool {
                <$inner as sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'q, DB: sqlx::Database> sqlx::Encode<'q, DB> for $newtype
        where
            $inner: sqlx::Encode<'q, DB>,
        {
            fn encode_by_ref(
                &self,
                buf: &mut <DB as sqlx::Database>::ArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                self.0.encode_by_ref(buf)
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $newtype
        where
            $inner: sqlx::Decode<'r, DB>,
        {
            fn decode(value: <DB as sqlx::Database>::ValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
                <$inner>::decode(value).map(Self)
            }
        }
    };
}

stored_as!(Partition, i32);
stored_as!(GlobalPosition, i64);

impl std::fmt::Display for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["edupulse", "a", "_x", "t_0123456789abcdef"] {
            assert!(SchemaName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Edupulse", "1abc", "a-b", "a b", "a;drop", "pg_catalog", "\"x\"", &"a".repeat(64)] {
            assert!(matches!(SchemaName::new(bad), Err(EventError::Config(_))), "{bad}");
        }
    }
}
