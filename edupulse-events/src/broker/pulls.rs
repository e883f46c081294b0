//! A subscriber's pull requests: of bounded size, so that every message received is
//! accounted for (at shutdown none is left in a client-side buffer, to come back only after
//! `ack_wait`), and two open at once, so that the next request is on its way before the
//! current one is filled.

use std::collections::VecDeque;
use std::task::Poll;

use futures_util::StreamExt;

use crate::BoxError;
use crate::broker::consumer::{Batch, Received};

/// Pull requests open at once.
const OPEN_AT_ONCE: usize = 2;

/// What the open pull requests brought.
// Returned by value and moved on at once: boxing the message would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Pulled {
    /// A message.
    Message(Received),
    /// A request ended (filled, or expired on the server): room for another.
    Ended,
    /// A request failed; it is closed.
    Failed(BoxError),
}

/// One open request and the messages it may still bring.
struct Open {
    batch: Batch,
    remaining: usize,
}

/// The open pull requests, oldest first: the server fills them in that order, so taking
/// their messages in that order keeps the stream's order.
#[derive(Default)]
pub(crate) struct Pulls {
    open: VecDeque<Open>,
    /// Messages the open requests may still bring.
    outstanding: usize,
}

impl Pulls {
    /// Messages asked for and not received yet.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// Whether another request may be opened.
    pub(crate) fn has_room(&self) -> bool {
        self.open.len() < OPEN_AT_ONCE
    }

    /// Whether any request is open.
    pub(crate) fn is_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// Adds a request for `count` messages.
    pub(crate) fn add(&mut self, batch: Batch, count: usize) {
        self.outstanding += count;
        self.open.push_back(Open { batch, remaining: count });
    }

    /// The next message, or the end of a request. Pending while no request is open.
    pub(crate) async fn next(&mut self) -> Pulled {
        let Self { open, outstanding } = self;
        std::future::poll_fn(|cx| {
            for i in 0..open.len() {
                let Some(request) = open.get_mut(i) else { break };
                match request.batch.poll_next_unpin(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Some(Ok(message))) => {
                        request.remaining = request.remaining.saturating_sub(1);
                        *outstanding = outstanding.saturating_sub(1);
                        return Poll::Ready(Pulled::Message(message));
                    }
                    Poll::Ready(end) => {
                        *outstanding = outstanding.saturating_sub(request.remaining);
                        open.remove(i);
                        return Poll::Ready(match end {
                            Some(Err(e)) => Pulled::Failed(e),
                            _ => Pulled::Ended,
                        });
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    /// The messages the open requests still bring, until each has ended (at most its
    /// expiry away).
    pub(crate) async fn drain(mut self) -> Vec<Received> {
        let mut messages = Vec::new();
        while self.is_open() {
            if let Pulled::Message(message) = self.next().await {
                messages.push(message);
            }
        }
        messages
    }
}
