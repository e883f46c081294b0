//! What the relay publishes to: the [`Publisher`] trait and what a broker answers.

use crate::EventError;
use crate::event::wire::OutgoingMessage;

/// A boxed future, as trait objects return them (futures' own type).
pub use futures_util::future::BoxFuture;

/// What the broker said about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The message's sequence in the broker's stream (0 for brokers without one).
    pub stream_sequence: u64,
    /// The broker had the message already (a re-send inside the duplicate window).
    pub duplicate: bool,
}

/// A broker the relay publishes to.
///
/// Contract: one outcome per message comes back, in the order given. An aggregate's
/// messages are sent in the order given, each only after the broker acknowledged the one
/// before, so the broker never holds an aggregate's message before an earlier one; messages
/// of different aggregates are in flight at once. After a message of an aggregate fails,
/// its later messages are not sent (they fail too). A failure that is the message's own
/// (the broker answered and refused it) is [`EventError::Refused`]; any other is
/// [`EventError::Broker`].
pub trait Publisher: Send + Sync + 'static {
    /// Publishes `messages` and waits for every acknowledgement.
    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>>;

    /// The largest message the broker accepts, headers included, when it is known (NATS
    /// tells its clients its `max_payload`). The bus refuses larger events before writing
    /// them.
    fn max_payload(&self) -> Option<usize> {
        None
    }
}
