//! What the relay publishes to: the [`Publisher`] trait and what a broker answers.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use uuid::Uuid;

use crate::EventError;
use crate::event::wire::OutgoingMessage;

/// A boxed future, as trait objects return them (futures' own type).
pub use futures_util::future::BoxFuture;

/// What the broker said about one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The message's sequence in the broker's stream: 0 for brokers without one, and for a
    /// message of a fast-ingest batch whose sequence the broker did not name (its one
    /// acknowledgement names the last message's).
    pub stream_sequence: u64,
    /// The broker had the message already (a re-send inside the duplicate window).
    pub duplicate: bool,
    /// The stream that stored it, for brokers that name one (JetStream): the relay checks
    /// that this stream keeps what it acknowledged.
    pub stream: Option<Arc<str>>,
}

/// Where a broker's stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamState {
    /// The sequence of the oldest message it holds (0 when empty).
    pub first_sequence: u64,
    /// The sequence of the newest message it stored (0 for a stream that never held one).
    pub last_sequence: u64,
    /// The subject filters it captures: a repair resends only what this stream would store.
    pub subjects: Vec<String>,
    /// How long after a message it drops another with the same `Nats-Msg-Id` (`None`:
    /// unknown). A relay about to send an event older than half of it first asks the stream
    /// whether it holds it: a re-send later than the window would be stored twice.
    pub duplicate_window: Option<Duration>,
}

/// Chooses messages by their aggregate: what [`Publisher::held_events`] keeps.
pub type AggregateFilter<'a> = &'a (dyn Fn(Uuid) -> bool + Send + Sync);

/// A broker the relay publishes to.
///
/// Contract: one outcome per message comes back, in the order given. An aggregate's
/// messages are sent in the order given, each only after the broker acknowledged the one
/// before, or together in a batch the broker stores whole or not at all (JetStream's atomic
/// batches), or in a batch the broker stores in order up to the first message it does not
/// store (JetStream's fast-ingest batches), so the broker never holds an aggregate's message
/// before an earlier one;
/// messages of different aggregates are in flight at once. After a message of an aggregate fails,
/// its later messages are not sent (they fail too). A failure that is the message's own
/// (the broker answered and refused it) is [`EventError::Refused`]; any other is
/// [`EventError::Broker`].
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `messages` and waits for every acknowledgement.
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>>;

    /// Publishes `messages` on the connection of `epoch` only: what
    /// [`connection_epoch`](Self::connection_epoch) returned when the relay last checked
    /// its streams. A publisher whose connection was made again since fails every message
    /// unsent, so that nothing reaches a server whose streams were not checked.
    ///
    /// The default compares the epochs, then calls [`publish`](Self::publish): a wrapper
    /// gets it without writing anything, and a broker whose connection can change between
    /// the two (NATS) overrides it.
    fn publish_on<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
        epoch: u64,
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        if self.connection_epoch() == epoch {
            return self.publish(messages);
        }
        let refused = messages
            .iter()
            .map(|_| {
                Err(EventError::broker_message(
                    crate::BrokerErrorKind::Unavailable,
                    "the connection to the broker was made again since the streams were checked: not sent",
                ))
            })
            .collect();
        Box::pin(std::future::ready(refused))
    }

    /// The largest message the broker accepts, headers included, when it is known (NATS
    /// tells its clients its `max_payload`). The bus refuses larger events before writing
    /// them.
    fn max_payload(&self) -> Option<usize> {
        None
    }

    /// Where stream `stream` stands; `None` when it does not exist, or for a broker without
    /// streams. The relay compares it with the sequences it was acknowledged: a stream whose
    /// last sequence is below one of them lost acknowledged messages (deleted, restored
    /// from an older copy, a single server that lost power before syncing).
    ///
    /// No default: a wrapper around another publisher must forward it, or the relay cannot
    /// see a stream that lost messages (a broker without streams returns `Ok(None)`);
    /// [`forward_publisher!`](crate::forward_publisher) forwards them all.
    ///
    /// # Errors
    /// [`EventError::Broker`] when the broker does not answer, or cannot answer for the
    /// whole stream (a replicated stream electing a leader).
    fn stream_state<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Option<StreamState>, EventError>>;

    /// The event ids (`Nats-Msg-Id`) of the messages stream `stream` holds up to sequence
    /// `last` (and stored at or after `since`, when given), of the aggregates `wanted`
    /// chooses, in stream order: what a relay repairing a stream that lost messages
    /// compares with the log, and what it asks before sending an event that may have been
    /// sent longer ago than the duplicate window. Empty for a broker without streams.
    ///
    /// No default, for the same reason (a broker without streams returns an empty list).
    ///
    /// # Errors
    /// [`EventError::Broker`] when the broker does not answer or the stream is gone.
    fn held_events<'a>(
        &'a self,
        stream: &'a str,
        last: u64,
        since: Option<DateTime<Utc>>,
        wanted: AggregateFilter<'a>,
    ) -> BoxFuture<'a, Result<Vec<Uuid>, EventError>>;

    /// The event id (`Nats-Msg-Id`) of the message stream `stream` holds at `sequence`;
    /// `None` when it holds none there (or one without an event id). The relay compares it
    /// with the event it was acknowledged at that sequence: a stream restored from an older
    /// copy or made again holds another message there, or none, even once newer messages
    /// took its last sequence past the mark. No default (a broker without streams returns
    /// `Ok(None)`).
    ///
    /// # Errors
    /// [`EventError::Broker`] when the broker does not answer.
    fn event_at<'a>(
        &'a self,
        stream: &'a str,
        sequence: u64,
    ) -> BoxFuture<'a, Result<Option<Uuid>, EventError>>;

    /// A number that changes each time the connection to the broker is made again (0 for
    /// brokers without connections): after a reconnection the relay checks its streams
    /// before it publishes more, since a server that restarted may have lost messages.
    /// No default: a wrapper forwards it.
    fn connection_epoch(&self) -> u64;
}

/// Inside an `impl Publisher for Wrapper` block, forwards every method but `publish` to the
/// field `$inner` (any [`Publisher`]): for wrappers that count, log or inject faults around
/// another publisher and must not lose what it says about its streams (the relay's
/// lost-message check depends on it).
///
/// ```
/// use std::sync::Arc;
/// use edupulse_events::{BoxFuture, EventError, PublishReceipt, Publisher};
/// use edupulse_events::wire::OutgoingMessage;
///
/// struct Logged {
///     inner: Arc<dyn Publisher>,
/// }
///
/// impl Publisher for Logged {
///     fn publish<'a>(
///         &'a self,
///         messages: &'a [OutgoingMessage],
///     ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
///         println!("publishing {}", messages.len());
///         self.inner.publish(messages)
///     }
///
///     edupulse_events::forward_publisher!(inner);
/// }
/// ```
#[macro_export]
macro_rules! forward_publisher {
    ($inner:ident) => {
        fn max_payload(&self) -> ::std::option::Option<usize> {
            self.$inner.max_payload()
        }

        fn stream_state<'a>(
            &'a self,
            stream: &'a str,
        ) -> $crate::BoxFuture<
            'a,
            ::std::result::Result<::std::option::Option<$crate::StreamState>, $crate::EventError>,
        > {
            self.$inner.stream_state(stream)
        }

        fn held_events<'a>(
            &'a self,
            stream: &'a str,
            last: u64,
            since: ::std::option::Option<$crate::chrono::DateTime<$crate::chrono::Utc>>,
            wanted: $crate::AggregateFilter<'a>,
        ) -> $crate::BoxFuture<'a, ::std::result::Result<::std::vec::Vec<$crate::Uuid>, $crate::EventError>> {
            self.$inner.held_events(stream, last, since, wanted)
        }

        fn event_at<'a>(
            &'a self,
            stream: &'a str,
            sequence: u64,
        ) -> $crate::BoxFuture<
            'a,
            ::std::result::Result<::std::option::Option<$crate::Uuid>, $crate::EventError>,
        > {
            self.$inner.event_at(stream, sequence)
        }

        fn connection_epoch(&self) -> u64 {
            self.$inner.connection_epoch()
        }
    };
}
