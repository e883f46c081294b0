//! An in-process broker behind the same [`Publisher`] trait, for the embedded default and
//! for tests of domain code: a stream of messages with JetStream's de-duplication by
//! `Nats-Msg-Id`, durable consumers with JetStream's delivery rules (`durable.rs`: what a
//! [`Subscriber`](crate::Subscriber) consumes), plain subscriptions with NATS subject
//! filters, and a switch to simulate an outage.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use crate::broker::durable::{Durable, DurableProgress, DurableSettings, Settle};
use crate::broker::publisher::{AggregateFilter, BoxFuture, PublishReceipt, Publisher, StreamState};
use crate::event::subject::{filter_matches, validate_filter};
use crate::event::wire::{DEFAULT_MAX_MESSAGE_BYTES, OutgoingMessage, header_block_len, headers};
use crate::{BrokerErrorKind, EventError};

/// A message as the in-process broker stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerMessage {
    /// Its sequence in the broker's stream, from 1.
    pub sequence: u64,
    /// The subject it was published on.
    pub subject: String,
    /// Its headers.
    pub headers: Vec<(String, String)>,
    /// Its body (a [`WireEnvelope`](crate::wire::WireEnvelope)).
    pub body: Vec<u8>,
}

impl BrokerMessage {
    /// The value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct State {
    messages: Vec<BrokerMessage>,
    seen: HashMap<String, (u64, Instant)>,
    subscribers: Vec<(Vec<String>, mpsc::UnboundedSender<BrokerMessage>)>,
    refusing: Option<Vec<String>>,
    /// The durable consumers, by name.
    consumers: HashMap<String, Durable>,
}

/// The in-process broker. Cheap to clone: clones share one stream.
#[derive(Clone)]
pub struct InMemoryBroker {
    state: Arc<Mutex<State>>,
    available: Arc<AtomicBool>,
    duplicate_window: Duration,
    /// Woken when a message is stored or handed back: consumers waiting for one look again.
    arrived: Arc<Notify>,
}

impl Default for InMemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for InMemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryBroker")
            .field("messages", &self.lock().messages.len())
            .finish_non_exhaustive()
    }
}

impl InMemoryBroker {
    /// An empty broker with a two-minute duplicate window, like JetStream's default.
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            available: Arc::new(AtomicBool::new(true)),
            duplicate_window: Duration::from_secs(120),
            arrived: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data behind: keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Simulates an outage (`false`: every publish fails) or the recovery (`true`).
    pub fn set_available(&self, available: bool) {
        self.available.store(available, Ordering::SeqCst);
    }

    /// Refuses every message whose subject matches `filter` from now on, as a broker
    /// refuses a message it will never take ([`EventError::Refused`]); `None` accepts
    /// them again.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid filter.
    pub fn refuse(&self, filter: Option<&str>) -> Result<(), EventError> {
        let tokens = match filter {
            Some(filter) => {
                validate_filter(filter)?;
                Some(filter.split('.').map(str::to_owned).collect())
            }
            None => None,
        };
        self.lock().refusing = tokens;
        Ok(())
    }

    /// Every message stored so far, in order.
    pub fn messages(&self) -> Vec<BrokerMessage> {
        self.lock().messages.clone()
    }

    /// The messages delivered to the durable consumer `name` (a [`Subscriber`](crate::Subscriber)'s
    /// durable name) and not settled yet; `None` when there is no such consumer.
    pub fn unacknowledged(&self, name: &str) -> Option<usize> {
        self.consumer_progress(name).map(|p| p.pending)
    }

    /// Receives every message published from now on whose subject matches `filter`
    /// (`*` one token, `>` the rest).
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid filter.
    pub fn subscribe(&self, filter: &str) -> Result<mpsc::UnboundedReceiver<BrokerMessage>, EventError> {
        validate_filter(filter)?;
        let (sender, receiver) = mpsc::unbounded_channel();
        let tokens = filter.split('.').map(str::to_owned).collect();
        self.lock().subscribers.push((tokens, sender));
        Ok(receiver)
    }

    fn store(&self, message: &OutgoingMessage) -> Result<PublishReceipt, EventError> {
        if !self.available.load(Ordering::SeqCst) {
            return Err(EventError::broker_message(
                BrokerErrorKind::Unavailable,
                "the in-process broker is unavailable",
            ));
        }
        let size = header_block_len(&message.headers) + message.body.len();
        if size > DEFAULT_MAX_MESSAGE_BYTES {
            return Err(EventError::refused(format!(
                "message of {size} bytes refused: the in-process broker's limit is {DEFAULT_MAX_MESSAGE_BYTES}, \
                 as NATS' default max_payload"
            )));
        }
        let mut state = self.lock();
        if state.refusing.as_ref().is_some_and(|filter| filter_matches(filter, &message.subject)) {
            return Err(EventError::refused(format!(
                "subject {} refused by the in-process broker",
                message.subject
            )));
        }
        let now = Instant::now();
        let window = self.duplicate_window;
        state.seen.retain(|_, (_, at)| now.duration_since(*at) < window);
        let id = message
            .headers
            .iter()
            .find(|(name, _)| *name == headers::MSG_ID)
            .map_or_else(|| message.event_id.to_string(), |(_, v)| v.clone());
        if let Some((sequence, _)) = state.seen.get(&id) {
            return Ok(PublishReceipt { stream_sequence: *sequence, duplicate: true, stream: None });
        }
        let sequence = state.messages.len() as u64 + 1;
        let stored = BrokerMessage {
            sequence,
            subject: message.subject.clone(),
            headers: message.headers.iter().map(|(n, v)| ((*n).to_owned(), v.clone())).collect(),
            body: message.body.to_vec(),
        };
        state.subscribers.retain(|(filter, sender)| {
            !filter_matches(filter, &stored.subject) || sender.send(stored.clone()).is_ok()
        });
        state.messages.push(stored);
        state.seen.insert(id, (sequence, now));
        drop(state);
        self.arrived.notify_waiters();
        Ok(PublishReceipt { stream_sequence: sequence, duplicate: false, stream: None })
    }

    /// Creates the durable consumer `name`, or gives it `settings` (its progress kept).
    pub(crate) fn durable(&self, name: &str, settings: DurableSettings) {
        let mut state = self.lock();
        match state.consumers.get_mut(name) {
            Some(consumer) => consumer.configure(settings),
            None => {
                state.consumers.insert(name.to_owned(), Durable::new(settings));
            }
        }
    }

    /// Up to `count` messages for the durable consumer `name`, as soon as there is one, or
    /// none after `expires` (a pull request).
    pub(crate) async fn pull(&self, name: &str, count: usize, expires: Duration) -> Vec<Delivered> {
        let deadline = Instant::now() + expires;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            // Registered before looking: a message stored meanwhile wakes it.
            arrived.as_mut().enable();
            let now = Instant::now();
            let (taken, due) = {
                let mut state = self.lock();
                let State { messages, consumers, .. } = &mut *state;
                let Some(consumer) = consumers.get_mut(name) else { return Vec::new() };
                let subject_of = |sequence: u64| {
                    let i = usize::try_from(sequence).ok()?.checked_sub(1)?;
                    messages.get(i).map(|m| m.subject.as_str())
                };
                let taken = consumer.take(now, count, subject_of);
                let due = consumer.next_due();
                let taken: Vec<Delivered> = taken
                    .into_iter()
                    .filter_map(|(sequence, deliveries)| {
                        let message = messages.get(usize::try_from(sequence).ok()?.checked_sub(1)?)?.clone();
                        Some(Delivered {
                            message,
                            deliveries,
                            consumer: name.to_owned(),
                            broker: self.clone(),
                        })
                    })
                    .collect();
                (taken, due)
            };
            if !taken.is_empty() || now >= deadline {
                return taken;
            }
            let wake = due.map_or(deadline, |due| due.clamp(now, deadline));
            tokio::select! {
                () = &mut arrived => {}
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    /// Settles message `sequence` of the durable consumer `name`.
    pub(crate) fn settle(&self, name: &str, sequence: u64, how: Settle) {
        if let Some(consumer) = self.lock().consumers.get_mut(name) {
            consumer.settle(sequence, how, Instant::now());
        }
        if matches!(how, Settle::Nak(_)) {
            self.arrived.notify_waiters();
        }
    }

    /// Where the durable consumer `name` stands (`None`: there is none).
    pub(crate) fn consumer_progress(&self, name: &str) -> Option<DurableProgress> {
        self.lock().consumers.get(name).map(Durable::progress)
    }
}

/// A message delivered to a durable consumer of the in-process broker.
#[derive(Debug, Clone)]
pub(crate) struct Delivered {
    pub(crate) message: BrokerMessage,
    /// Deliveries so far, this one included.
    pub(crate) deliveries: i64,
    consumer: String,
    broker: InMemoryBroker,
}

impl Delivered {
    /// Settles it with its consumer.
    pub(crate) fn settle(&self, how: Settle) {
        self.broker.settle(&self.consumer, self.message.sequence, how);
    }
}

impl Publisher for InMemoryBroker {
    fn max_payload(&self) -> Option<usize> {
        Some(DEFAULT_MAX_MESSAGE_BYTES)
    }

    /// None: the in-process broker's one stream lives and dies with the process.
    fn stream_state<'a>(
        &'a self,
        _stream: &'a str,
    ) -> BoxFuture<'a, Result<Option<StreamState>, EventError>> {
        Box::pin(async { Ok(None) })
    }

    fn held_events<'a>(
        &'a self,
        _stream: &'a str,
        _last: u64,
        _since: Option<DateTime<Utc>>,
        _wanted: AggregateFilter<'a>,
    ) -> BoxFuture<'a, Result<Vec<Uuid>, EventError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn event_at<'a>(
        &'a self,
        _stream: &'a str,
        _sequence: u64,
    ) -> BoxFuture<'a, Result<Option<Uuid>, EventError>> {
        Box::pin(async { Ok(None) })
    }

    fn connection_epoch(&self) -> u64 {
        0
    }

    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            let mut failed = std::collections::HashSet::new();
            messages
                .iter()
                .map(|message| {
                    if failed.contains(&message.aggregate_id) {
                        return Err(EventError::not_sent());
                    }
                    let outcome = self.store(message);
                    if outcome.is_err() {
                        failed.insert(message.aggregate_id);
                    }
                    outcome
                })
                .collect()
        })
    }
}

/// Whether `subject` matches the filter tokens.
#[cfg(test)]
mod tests {
    use super::*;

    fn filter(f: &str) -> Vec<String> {
        f.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn subject_matching() {
        assert!(filter_matches(&filter("courses.>"), "courses.LessonPublished"));
        assert!(filter_matches(&filter("courses.>"), "courses.a.b"));
        assert!(!filter_matches(&filter("courses.>"), "courses"));
        assert!(filter_matches(&filter("*.courses.*"), "t1.courses.X"));
        assert!(!filter_matches(&filter("*.courses.*"), "t1.courses.X.y"));
        assert!(filter_matches(&filter("a.b"), "a.b"));
        assert!(!filter_matches(&filter("a.b"), "a.bc"));
    }

    fn message(id: &str, subject: &str) -> OutgoingMessage {
        OutgoingMessage {
            event_id: Uuid::nil(),
            aggregate_id: Uuid::nil(),
            global_position: 1,
            subject: subject.into(),
            headers: vec![(headers::MSG_ID, id.into())],
            body: bytes::Bytes::from_static(b"{}"),
        }
    }

    #[tokio::test]
    async fn dedup_outage_and_subscriptions() {
        let broker = InMemoryBroker::new();
        let mut rx = broker.subscribe("courses.*").unwrap();
        let first = broker.publish(&[message("a", "courses.X")]).await;
        let again = broker.publish(&[message("a", "courses.X")]).await;
        assert_eq!(
            first[0].as_ref().unwrap(),
            &PublishReceipt { stream_sequence: 1, duplicate: false, stream: None }
        );
        assert_eq!(
            again[0].as_ref().unwrap(),
            &PublishReceipt { stream_sequence: 1, duplicate: true, stream: None }
        );
        assert_eq!(rx.recv().await.unwrap().subject, "courses.X");
        broker.set_available(false);
        let down = broker.publish(&[message("b", "courses.Y"), message("c", "courses.Y")]).await;
        assert!(down.iter().all(Result::is_err));
        broker.set_available(true);
        assert_eq!(broker.messages().len(), 1);
    }
}
