//! Sending a range of the log to the broker again: for a stream that lost messages (deleted,
//! or restored from an older backup). No checkpoint moves; the relays go on as they were.

use futures_util::StreamExt;

use crate::broker::Publisher;
use crate::delivery::message::message;
use crate::event::wire::OutgoingMessage;
use crate::{EventError, EventStore, StreamPosition};

/// What [`LogRelay::republish`](crate::LogRelay::republish) sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Republished {
    /// Events the broker stored (again).
    pub stored: u64,
    /// Events the broker dropped as duplicates: it still had them inside its duplicate
    /// window (JetStream's `Nats-Msg-Id` is the event id).
    pub duplicates: u64,
    /// Events of the range stored without a subject, which are never published.
    pub unpublished: u64,
    /// The global position of the last event sent (0 when none was).
    pub last_position: i64,
}

/// Sends the events from global position `from` to `to` (both included; to the end of the
/// readable stream without `to`) in stream order, `batch` at a time.
pub(crate) async fn republish(
    store: &EventStore,
    publisher: &dyn Publisher,
    from: i64,
    to: Option<i64>,
    batch: usize,
) -> Result<Republished, EventError> {
    let Some(start) = store.position_of(from).await? else {
        return Err(EventError::Config(format!("no event at global position {from}")));
    };
    let end = match to {
        None => None,
        Some(to) => Some(
            store
                .position_of(to)
                .await?
                .ok_or_else(|| EventError::Config(format!("no event at global position {to}")))?,
        ),
    };
    let start = StreamPosition { global_position: start.global_position.saturating_sub(1), ..start };
    let mut records = store.records(start);
    let mut done = Republished::default();
    let mut messages = Vec::with_capacity(batch);
    while let Some(record) = records.next().await {
        let record = record?;
        if end.is_some_and(|end| record.position > end) {
            break;
        }
        match record.subject {
            Some(subject) => messages.push(message(record.envelope, subject)?),
            None => done.unpublished += 1,
        }
        if messages.len() >= batch {
            send(publisher, &mut messages, &mut done).await?;
        }
    }
    send(publisher, &mut messages, &mut done).await?;
    Ok(done)
}

/// Publishes `messages` and counts them; the first failure is the error (the events before
/// it are counted, the operator resumes from the failed one).
async fn send(
    publisher: &dyn Publisher,
    messages: &mut Vec<OutgoingMessage>,
    done: &mut Republished,
) -> Result<(), EventError> {
    let outcomes = publisher.publish(messages).await;
    for (message, outcome) in messages.iter().zip(outcomes) {
        match outcome {
            Ok(receipt) if receipt.duplicate => done.duplicates += 1,
            Ok(_) => done.stored += 1,
            Err(e) => {
                let kind = e.broker_kind().unwrap_or(crate::BrokerErrorKind::Other);
                let at = message.global_position;
                let text = format!("republishing stopped at global position {at} ({e}); resume from {at}");
                return Err(EventError::broker(kind, text, e));
            }
        }
        done.last_position = message.global_position;
    }
    messages.clear();
    Ok(())
}
