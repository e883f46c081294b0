//! The one error type of the crate.

use std::error::Error as StdError;
use std::fmt;

use uuid::Uuid;

/// A boxed error from a lower layer (serde_json, an upcaster, a driver).
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Everything that can go wrong while encoding, storing, decoding or publishing events.
///
/// Callers branch on the variants: a [`Concurrency`](EventError::Concurrency) conflict is
/// retried after reloading the aggregate, an [`UnknownEventType`](EventError::UnknownEventType)
/// row may be skipped by a projection, and so on. Decoding errors carry the global position
/// of the stored row when the error comes from the store, so the faulty row can be found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// Another writer appended to the aggregate first: reload it and decide again.
    #[error(
        "concurrency conflict on aggregate {aggregate_id}: expected sequence {expected}, \
         but the stream is at {actual}; reload the aggregate and retry the command"
    )]
    Concurrency {
        /// The aggregate both writers appended to.
        aggregate_id: Uuid,
        /// The sequence the losing writer expected the stream to be at.
        expected: i64,
        /// The sequence the stream is really at.
        actual: i64,
    },

    /// A stored or received event has a type that this build does not know.
    #[error(
        "unknown event type `{event_type}`{at}; known types: {known}; add the event type to \
         the enum, or declare the old name with `#[event(alias = \"{event_type}\")]`",
        at = fmt_position(*position),
        known = known.join(", ")
    )]
    UnknownEventType {
        /// The event type found in the row or message.
        event_type: String,
        /// The names (event types and aliases) this decoder accepts.
        known: &'static [&'static str],
        /// Global position of the stored row, when the event came from the store.
        position: Option<i64>,
    },

    /// A stored or received event has a schema version this build cannot decode.
    #[error(
        "event `{event_type}`{at} has schema version {found}, but this build knows versions \
         1 to {newest_known}; deploy a build that knows version {found} before reading it",
        at = fmt_position(*position)
    )]
    UnsupportedVersion {
        /// The event type of the payload.
        event_type: String,
        /// The version found in the row or message.
        found: u32,
        /// The newest version this build can decode.
        newest_known: u32,
        /// Global position of the stored row, when the event came from the store.
        position: Option<i64>,
    },

    /// A payload could not be decoded or upcast into the current type.
    #[error(
        "cannot decode event `{event_type}` version {version}{at}: {source}",
        at = fmt_position(*position)
    )]
    Decode {
        /// The event type of the payload.
        event_type: String,
        /// The schema version of the payload as stored.
        version: u32,
        /// Global position of the stored row, when the event came from the store.
        position: Option<i64>,
        /// What serde_json or the upcaster reported.
        #[source]
        source: BoxError,
    },

    /// An event could not be serialized to JSON.
    #[error("cannot serialize event `{event_type}`: {source}")]
    Serialization {
        /// The event type being serialized.
        event_type: &'static str,
        /// What serde_json reported.
        #[source]
        source: serde_json::Error,
    },

    /// A NATS subject or one of its tokens is invalid.
    #[error("invalid subject `{subject}`: {reason}")]
    InvalidSubject {
        /// The offending subject or token.
        subject: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The database failed or could not be reached. Connection URLs are never part of the
    /// message.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// The broker failed or could not be reached (a timeout, a lost connection, no stream
    /// for the subject). The events stay in the store; the relay retries without limit.
    #[error("broker error ({kind}): {message}")]
    Broker {
        /// What failed, for callers that branch on it (a timeout is not a missing stream).
        kind: BrokerErrorKind,
        /// What was being done, and the next step when there is one.
        message: String,
        /// What the client reported, when it reported an error.
        #[source]
        source: Option<BoxError>,
    },

    /// The broker answered and refused this one message (for example larger than the
    /// stream allows). The relay retries it a few times, then parks it.
    #[error("the broker refused the message: {message}")]
    Refused {
        /// The refusal.
        message: String,
        /// What the client reported, when it reported an error.
        #[source]
        source: Option<BoxError>,
    },

    /// The database's schema could not be brought up to date.
    #[error("migration of the {backend} schema failed: {source}")]
    Migration {
        /// `"PostgreSQL"` or `"SQLite"`.
        backend: &'static str,
        /// What sqlx's migrator reported.
        #[source]
        source: sqlx::migrate::MigrateError,
    },

    /// An append named events of more than one aggregate, an event names another aggregate
    /// in its `#[event(aggregate_id)]` field, or the aggregate exists with another type.
    /// Nothing was written.
    #[error("{0}")]
    WrongAggregate(String),

    /// An append's expected sequence is negative (0 is a new aggregate).
    #[error("expected sequence {0} is negative: use 0 for a new aggregate")]
    NegativeExpectedSequence(i64),

    /// A read model's or a subscriber's handler failed.
    #[error("handler of `{name}` failed{at}: {source}", at = fmt_position(*position))]
    Handler {
        /// The projection's name, or the subscriber's durable name.
        name: String,
        /// The event's global position, when known.
        position: Option<i64>,
        /// What the handler returned.
        #[source]
        source: BoxError,
    },

    /// The event was committed but the broker refused it for good: it is parked, with its
    /// aggregate's later events behind it, until re-queued
    /// ([`EventStore::requeue_parked`](crate::EventStore::requeue_parked)).
    #[error(
        "event {event_id} (position {global_position}) is committed but parked, not published: {reason}; \
         fix the cause, then re-queue it"
    )]
    Parked {
        /// The event.
        event_id: Uuid,
        /// Its global position.
        global_position: i64,
        /// The broker's refusal, or the parked event it waits behind.
        reason: String,
    },

    /// The configuration is invalid (a table name, a URL, an option).
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The transaction cannot be committed as the one begun: PostgreSQL aborted it (a
    /// statement failed in it, perhaps one whose error was ignored), or the caller ended it
    /// on its raw connection (a `ROLLBACK`, perhaps followed by a `BEGIN`; either backend).
    /// Nothing of it is committed by this call and nothing is published; what is open is
    /// rolled back.
    #[error(
        "the transaction was aborted by a failed statement, or ended on its raw connection, \
         and is rolled back: nothing was committed or published; run a statement whose \
         failure you want to ignore inside a SAVEPOINT and roll back to it when it fails, and \
         never end a store transaction on its connection"
    )]
    TransactionAborted,

    /// An append refused an event before writing anything: it could not be delivered to the
    /// broker or read back from the store. Nothing of the append was written.
    #[error("event `{event_type}` {event_id} refused, nothing was written: {problem}")]
    InvalidEvent {
        /// The event type.
        event_type: String,
        /// The event's id.
        event_id: Uuid,
        /// What is wrong with it.
        problem: EventProblem,
    },

    /// The first connection to PostgreSQL or NATS failed, or the SQLite file could not be
    /// opened. The message names the server (the file) and the cause and says what to do;
    /// it never holds credentials.
    #[error("cannot connect to {system} at {server}: {cause} ({source}); {hint}")]
    Connect {
        /// `"PostgreSQL"`, `"SQLite"` or `"NATS"`.
        system: &'static str,
        /// `host:port` (several, comma-separated, for a NATS server list), a socket path, or
        /// the SQLite file.
        server: String,
        /// Why, for callers that branch on it.
        cause: ConnectCause,
        /// The next step, in a sentence.
        hint: String,
        /// What the driver reported.
        #[source]
        source: BoxError,
    },
}

/// What kind of broker failure an [`EventError::Broker`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BrokerErrorKind {
    /// No answer in time: the server is slow or down, or the network drops packets.
    TimedOut,
    /// No JetStream stream captures the subject, or the stream named does not exist.
    NoStream,
    /// The server cannot be reached now (connection lost, no JetStream responders); the
    /// client reconnects in the background.
    Unavailable,
    /// JetStream answered a request (a stream, a consumer) with an error.
    Api,
    /// The message was not sent: an earlier message of its aggregate failed first.
    NotSent,
    /// Anything else; the source says what.
    Other,
}

impl fmt::Display for BrokerErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::TimedOut => "timed out",
            Self::NoStream => "no stream",
            Self::Unavailable => "unavailable",
            Self::Api => "JetStream API error",
            Self::NotSent => "not sent",
            Self::Other => "other",
        })
    }
}

/// Why an append refused an event ([`EventError::InvalidEvent`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventProblem {
    /// A value that travels in a message header holds a control character (a header line
    /// cannot hold `\r` or `\n`, and no consumer expects the others).
    #[error("the {field} {value:?} holds a control character, which a message header cannot carry")]
    ControlCharacter {
        /// Which value: `aggregate type`, `event type`, `traceparent`.
        field: &'static str,
        /// The value, shortened to its first 64 characters.
        value: String,
    },
    /// A value that travels in a message header is empty.
    #[error("the {field} is empty")]
    Empty {
        /// Which value.
        field: &'static str,
    },
    /// A value that travels in a message header is longer than the store accepts.
    #[error("the {field} is {length} bytes long; at most {max} are accepted")]
    TooLong {
        /// Which value.
        field: &'static str,
        /// Its length in bytes.
        length: usize,
        /// The most accepted.
        max: usize,
    },
    /// The message for the event would exceed what the broker accepts.
    #[error(
        "its message would be up to {size} bytes (headers and envelope), more than the \
         broker's limit of {limit} bytes (NATS `max_payload`); keep large data out of events \
         and store a reference, or raise the limit on the server and in `StoreConfig`"
    )]
    TooLarge {
        /// The size of the message, headers included (an upper bound: the global position
        /// and record time are not known yet).
        size: usize,
        /// The limit it exceeds.
        limit: usize,
    },
    /// The payload does not decode back into the event type, so no reader could ever read
    /// it (for example a NaN or infinite float, which JSON writes as `null`).
    #[error(
        "its payload does not read back as the event: {source}; non-finite floats (NaN, \
         infinity) are written as `null` in JSON and cannot be read back"
    )]
    Unreadable {
        /// The error decoding the payload gave.
        #[source]
        source: Box<EventError>,
    },
    /// The metadata does not decode back, so no reader could read the event (user fields
    /// nested deeper than the JSON reader's limit of 128 levels, the metadata object
    /// included).
    #[error("its metadata does not read back: {source}; keep user fields shallow")]
    UnreadableMetadata {
        /// The error decoding the metadata gave.
        #[source]
        source: serde_json::Error,
    },
    /// A promoted key holds a value the store's key index cannot hold.
    #[error("its key `{name}` holds a NUL character, which the store's key index cannot hold")]
    KeyNul {
        /// The key's name.
        name: &'static str,
    },
}

impl EventError {
    /// A broker failure of `kind`, with what the client reported.
    pub(crate) fn broker(
        kind: BrokerErrorKind,
        message: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Self::Broker { kind, message: message.into(), source: Some(source.into()) }
    }

    /// A broker failure of `kind` that no client error explains.
    pub(crate) fn broker_message(kind: BrokerErrorKind, message: impl Into<String>) -> Self {
        Self::Broker { kind, message: message.into(), source: None }
    }

    /// A message a publisher did not send because an earlier one of its aggregate failed
    /// (the [`Publisher`](crate::Publisher) contract).
    pub(crate) fn not_sent() -> Self {
        Self::broker_message(
            BrokerErrorKind::NotSent,
            "not sent: an earlier event of the same aggregate failed",
        )
    }

    /// A refusal of one message that no client error explains.
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Self::Refused { message: message.into(), source: None }
    }

    /// Whether this is a broker's refusal of one message (the relay parks after a few).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. })
    }

    /// The kind of a broker failure; `None` for other errors.
    pub fn broker_kind(&self) -> Option<BrokerErrorKind> {
        match self {
            Self::Broker { kind, .. } => Some(*kind),
            _ => None,
        }
    }

    /// Attaches the global position of the stored row to a decoding error.
    ///
    /// Other errors are returned unchanged.
    #[must_use]
    pub fn at_position(mut self, global_position: i64) -> Self {
        match &mut self {
            Self::UnknownEventType { position, .. }
            | Self::UnsupportedVersion { position, .. }
            | Self::Decode { position, .. } => *position = Some(global_position),
            _ => {}
        }
        self
    }

    /// The global position of the stored row this error is about, if any.
    pub fn position(&self) -> Option<i64> {
        match self {
            Self::UnknownEventType { position, .. }
            | Self::UnsupportedVersion { position, .. }
            | Self::Decode { position, .. } => *position,
            _ => None,
        }
    }

    /// Whether this error is about one event that cannot be decoded (unknown type, newer
    /// version, malformed payload), as opposed to a failure of the system.
    ///
    /// A projection may choose to skip such events; it must never skip other errors.
    pub fn is_undecodable_event(&self) -> bool {
        matches!(self, Self::UnknownEventType { .. } | Self::UnsupportedVersion { .. } | Self::Decode { .. })
    }
}

fn fmt_position(position: Option<i64>) -> String {
    match position {
        Some(p) => format!(" at global position {p}"),
        None => String::new(),
    }
}

/// Why the first connection to a server failed, for callers that branch on it (retry a
/// timeout, alert on bad credentials).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectCause {
    /// Nothing listens at the address: the server is down or the port is wrong.
    Refused,
    /// The host name cannot be resolved.
    Dns,
    /// The server refused the credentials.
    Authentication,
    /// PostgreSQL has no database of that name.
    UnknownDatabase,
    /// The TLS handshake or the TLS setup failed.
    Tls,
    /// No answer in time: a firewall, a wrong address, an overloaded server.
    Timeout,
    /// Anything else; the error's source says what.
    Other,
}

impl fmt::Display for ConnectCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Refused => "connection refused",
            Self::Dns => "the host name cannot be resolved",
            Self::Authentication => "authentication failed",
            Self::UnknownDatabase => "the database does not exist",
            Self::Tls => "TLS failed",
            Self::Timeout => "no answer in time",
            Self::Other => "the connection failed",
        })
    }
}
