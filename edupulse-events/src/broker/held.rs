//! What a JetStream stream still holds: its messages' event ids, read with an ordered
//! consumer that carries headers only, for a relay repairing a stream that lost messages.
//!
//! Not batched direct gets (nats-server 2.11 and later): they answer with whole messages,
//! bodies included, where the scan needs two headers of each; the ordered consumer streams
//! the headers alone, from one request, on every server version the relay supports. The one
//! message the watch reads at a mark (`event_at`) is one message get.

use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, ErrorCode, consumer::DeliverPolicy, consumer::pull::OrderedConfig};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use uuid::Uuid;

use crate::broker::publisher::AggregateFilter;
use crate::event::wire::headers;
use crate::{BrokerErrorKind, EventError};

/// How long the scan waits for the next message before it gives up.
const STALL: Duration = Duration::from_secs(10);

/// The event ids of the messages of `stream` up to sequence `last` (stored at or after
/// `since`, when given) whose aggregate `wanted` chooses, in stream order. Messages without
/// the `Edupulse-*` headers (not the relay's) are passed over.
pub(crate) async fn scan(
    js: &jetstream::Context,
    stream: &str,
    last: u64,
    since: Option<DateTime<Utc>>,
    wanted: AggregateFilter<'_>,
) -> Result<Vec<Uuid>, EventError> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| {
        EventError::broker_message(
            BrokerErrorKind::Unavailable,
            format!("cannot read stream {stream}: {what}: {e}"),
        )
    };
    let found = js.get_stream(stream).await.map_err(|e| unavailable("no stream", &e))?;
    let first = found.cached_info().state.first_sequence;
    let mut held = Vec::new();
    if last == 0 || first == 0 || first > last {
        return Ok(held);
    }
    let deliver_policy = match since.and_then(|t| t.timestamp_nanos_opt()) {
        Some(nanos) => {
            let start_time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
                .map_err(|e| unavailable("bad start time", &e))?;
            DeliverPolicy::ByStartTime { start_time }
        }
        None => DeliverPolicy::ByStartSequence { start_sequence: first },
    };
    let config = OrderedConfig { headers_only: true, deliver_policy, ..OrderedConfig::default() };
    let mut consumer = found.create_consumer(config).await.map_err(|e| unavailable("no consumer", &e))?;
    // Nothing stored since `since`: nothing to wait for.
    if consumer.info().await.map_err(|e| unavailable("no consumer", &e))?.num_pending == 0 {
        return Ok(held);
    }
    let mut messages = consumer.messages().await.map_err(|e| unavailable("no messages", &e))?;
    loop {
        let next = tokio::time::timeout(STALL, messages.next()).await;
        let message = match next {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(e))) => return Err(unavailable("read failed", &e)),
            // The read ended before it reached `last`: what it found is not all the stream
            // holds, and a repair on it would send again what the stream still has.
            Ok(None) => return Err(unavailable("read ended early", &format!("before sequence {last}"))),
            Err(_) => return Err(unavailable("stalled", &format!("no message for {STALL:?}"))),
        };
        let info = message.info().map_err(|e| unavailable("no sequence", &e))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        if sequence > last {
            break;
        }
        let header = |name: &str| {
            message.headers.as_ref().and_then(|h| h.get(name)).and_then(|v| Uuid::parse_str(v.as_str()).ok())
        };
        if let (Some(event_id), Some(aggregate_id)) = (header(headers::MSG_ID), header(headers::AGGREGATE_ID))
            && wanted(aggregate_id)
        {
            held.push(event_id);
        }
        // Nothing pending: the messages up to `last` that are not read were deleted.
        if sequence >= last || pending == 0 {
            break;
        }
    }
    Ok(held)
}

/// The event id of the message `stream` holds at `sequence`; `None` when there is none (or
/// the stream is gone, or the message carries no event id).
pub(crate) async fn event_at(
    js: &jetstream::Context,
    stream: &str,
    sequence: u64,
) -> Result<Option<Uuid>, EventError> {
    let unavailable = |e: &dyn std::fmt::Display| {
        EventError::broker_message(BrokerErrorKind::Unavailable, format!("cannot read stream {stream}: {e}"))
    };
    let found = match js.get_stream_no_info(stream).await {
        Ok(found) => found,
        Err(e) => return Err(unavailable(&e)),
    };
    match found.get_raw_message(sequence).await {
        Ok(message) => {
            Ok(message.headers.get(headers::MSG_ID).and_then(|v| Uuid::parse_str(v.as_str()).ok()))
        }
        Err(e) => match e.kind() {
            LastRawMessageErrorKind::NoMessageFound => Ok(None),
            LastRawMessageErrorKind::JetStream(j)
                if j.error_code() == ErrorCode::NO_MESSAGE_FOUND
                    || j.error_code() == ErrorCode::STREAM_NOT_FOUND =>
            {
                Ok(None)
            }
            _ => Err(unavailable(&e)),
        },
    }
}
