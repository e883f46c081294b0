//! Publishing to the broker: the [`Publisher`] trait and its NATS JetStream implementation.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{
    CreateStreamErrorKind, GetStreamErrorKind, PublishAckFuture, PublishError, PublishErrorKind,
};
use async_nats::jetstream::{self, message::PublishMessage};
use futures_util::future::join_all;

use crate::EventError;
use crate::connect::{self, NatsCredentials};
use crate::wire::OutgoingMessage;

/// A boxed future, as trait objects return them.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the broker said about one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishReceipt {
    /// The message's sequence in the broker's stream (0 for brokers without one).
    pub stream_sequence: u64,
    /// The broker had the message already (a re-send inside the duplicate window).
    pub duplicate: bool,
}

/// A broker the bus and the outbox relay publish to.
///
/// Contract: messages are sent in the order given, many in flight at once; one outcome per
/// message comes back, in the same order. After a message of an aggregate fails, the
/// publisher does not send that aggregate's later messages of the batch (they fail too), so
/// a retry can never put them before it.
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

/// Settings of a [`NatsPublisher`].
#[derive(Clone)]
pub struct NatsConfig {
    /// How long to wait for JetStream's acknowledgement of a message (default 5 s).
    pub ack_timeout: Duration,
    /// How long the first connection may take, DNS included (default 5 s); once
    /// connected, the client reconnects in the background without limit.
    pub connect_timeout: Duration,
    /// Messages awaiting their acknowledgement at once, over all concurrent publishes of
    /// this publisher (default 5 000). A publish that finds none left awaits its own oldest
    /// acknowledgement first, or, holding none, waits for the others to free some.
    pub max_ack_inflight: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_ack_inflight: 5_000,
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("ack_timeout", &self.ack_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_ack_inflight", &self.max_ack_inflight)
            .finish()
    }
}

/// The JetStream stream events are stored in.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// The stream's name: letters, digits, `-` and `_`.
    pub name: String,
    /// The subjects it captures, wildcards allowed (`courses.>`).
    pub subjects: Vec<String>,
    /// How long JetStream remembers a `Nats-Msg-Id` to drop re-sends (default 2 minutes).
    /// The outbox relay's retries are de-duplicated only inside this window: keep it longer
    /// than a broker outage you want re-sends to be invisible across.
    pub duplicate_window: Duration,
    /// Keep messages this long; zero keeps them until limits apply (default zero). On an
    /// existing stream, zero leaves the stream's own max age as it is (see
    /// [`NatsPublisher::ensure_stream`]).
    pub max_age: Duration,
}

impl StreamSpec {
    /// A file-backed stream with a two-minute duplicate window.
    pub fn new(name: impl Into<String>, subjects: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            name: name.into(),
            subjects: subjects.into_iter().map(Into::into).collect(),
            duplicate_window: Duration::from_secs(120),
            max_age: Duration::ZERO,
        }
    }
}

/// Publishes events to NATS JetStream: one message per event on its subject, with
/// `Nats-Msg-Id` = event id and the `Edupulse-*` headers; acknowledgements are awaited
/// together, not one round trip per event.
///
/// Security: [`connect`](NatsPublisher::connect) takes the credentials out of the URL before
/// async-nats sees it, so they appear in no log line at any level (async-nats logs the
/// server addresses at DEBUG, and its CONNECT message at TRACE with password and token
/// masked). This type never logs or formats the URL. A client built by the application and
/// passed to [`from_client`](NatsPublisher::from_client) logs what its URL holds.
#[derive(Clone)]
pub struct NatsPublisher {
    /// The context handed to the application (async-nats' defaults: a publish waits for a
    /// free acknowledgement slot).
    jetstream: jetstream::Context,
    /// Ours: without backpressure, so that a publish holding unawaited acknowledgements is
    /// told "none left" instead of waiting for slots that only it can free.
    publishing: jetstream::Context,
    /// The server's `max_payload`, once known (0 before): read on every commit, so kept
    /// here instead of cloning the client's server info each time.
    max_payload: Arc<AtomicUsize>,
}

impl fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPublisher").finish_non_exhaustive()
    }
}

fn broker(what: &str, e: impl fmt::Display) -> EventError {
    EventError::Broker(format!("{what}: {e}"))
}

impl NatsPublisher {
    /// Connects to the NATS server at `url`: `nats://host:port`, `tls://host:port`, or
    /// several servers separated by commas. Credentials in the URL (`user:password@` or a
    /// lone `token@`) are taken out of it and handed to async-nats as options, so they are
    /// sent in the CONNECT message only (which async-nats logs with the secrets masked) and
    /// never in the server addresses it logs.
    ///
    /// The first connection is made here, within `config.connect_timeout`: a server that is
    /// down, an unknown host or refused credentials are reported at once. Once connected,
    /// the client reconnects in the background after an outage, and publishes fail until
    /// the server is back (the outbox keeps the events).
    ///
    /// # Errors
    /// [`EventError::Config`] when the URL is invalid; [`EventError::Connect`] when the
    /// first connection fails, with the cause and the next step. Neither shows the URL's
    /// credentials.
    pub async fn connect(url: &str, config: NatsConfig) -> Result<Self, EventError> {
        let target = connect::nats_target(url)?;
        let options = async_nats::ConnectOptions::new().connection_timeout(config.connect_timeout);
        let options = match target.credentials {
            Some(NatsCredentials::UserPassword(user, password)) => options.user_and_password(user, password),
            Some(NatsCredentials::Token(token)) => options.token(token),
            None => options,
        };
        // Without `retry_on_initial_connect`: the first failure comes back to the caller
        // instead of surfacing later as a request timeout. The bound covers DNS too.
        let client = match tokio::time::timeout(config.connect_timeout, options.connect(target.servers)).await
        {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(connect::nats_connect_error(e, &target.names)),
            Err(_) => return Err(connect::nats_timeout(&target.names, config.connect_timeout)),
        };
        Ok(Self::from_client(client, &config))
    }

    /// Uses an existing client.
    pub fn from_client(client: async_nats::Client, config: &NatsConfig) -> Self {
        let jetstream = jetstream::ContextBuilder::new().timeout(config.ack_timeout).build(client.clone());
        let publishing = jetstream::ContextBuilder::new()
            .timeout(config.ack_timeout)
            .max_ack_inflight(config.max_ack_inflight.max(1))
            .backpressure_on_inflight(false)
            .build(client);
        Self { jetstream, publishing, max_payload: Arc::default() }
    }

    /// The JetStream context, for the application's own use.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Creates the stream, or brings an existing one to `spec`.
    ///
    /// A missing stream is created file-backed with `spec`'s subjects, duplicate window and
    /// max age, everything else at JetStream's defaults. On an existing stream only what
    /// `spec` asks for changes: the subjects, the duplicate window, and the max age when it
    /// is not zero (zero leaves the stream's own). Replicas, limits (`max_msgs`,
    /// `max_bytes`, …), retention, discard policy, storage, description and the rest are
    /// kept, so settings an operator made survive a restart of the service. Nothing is sent
    /// when the stream already matches.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid name or subject filter; [`EventError::Broker`]
    /// when JetStream refuses or does not answer.
    pub async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), EventError> {
        validate_stream_name(&spec.name)?;
        for filter in &spec.subjects {
            validate_filter(filter)?;
        }
        let current = match self.stream_config(&spec.name).await? {
            Some(current) => current,
            None => {
                let config = jetstream::stream::Config {
                    name: spec.name.clone(),
                    subjects: spec.subjects.clone(),
                    duplicate_window: spec.duplicate_window,
                    max_age: spec.max_age,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                };
                match self.jetstream.create_stream(config).await {
                    Ok(_) => return Ok(()),
                    // Another process created it meanwhile, with other settings: adjust
                    // theirs, as if it had been there first.
                    Err(e) if create_code(e.kind()) == Some(ErrorCode::STREAM_NAME_EXIST) => {
                        self.stream_config(&spec.name).await?.ok_or_else(|| {
                            broker(
                                "cannot create the stream",
                                "JetStream says it exists, then that it does not",
                            )
                        })?
                    }
                    Err(e) => return Err(broker("cannot create the stream", stream_hint(e))),
                }
            }
        };
        let mut config = current.clone();
        config.subjects.clone_from(&spec.subjects);
        config.duplicate_window = spec.duplicate_window;
        if !spec.max_age.is_zero() {
            config.max_age = spec.max_age;
        }
        if config != current {
            self.jetstream
                .update_stream(&config)
                .await
                .map_err(|e| broker("cannot update the stream", stream_hint(e)))?;
        }
        Ok(())
    }

    /// The configuration of the stream `name`, or `None` when there is none.
    async fn stream_config(&self, name: &str) -> Result<Option<jetstream::stream::Config>, EventError> {
        match self.jetstream.get_stream(name).await {
            Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
            Err(e) if jetstream_code(e.kind()) == Some(ErrorCode::STREAM_NOT_FOUND) => Ok(None),
            Err(e) => Err(broker("cannot read the stream's configuration", stream_hint(e))),
        }
    }
}

fn jetstream_code(kind: GetStreamErrorKind) -> Option<ErrorCode> {
    match kind {
        GetStreamErrorKind::JetStream(e) => Some(e.error_code()),
        _ => None,
    }
}

fn create_code(kind: CreateStreamErrorKind) -> Option<ErrorCode> {
    match kind {
        CreateStreamErrorKind::JetStream(e) => Some(e.error_code()),
        _ => None,
    }
}

/// A stream request's error, with the likely reason when JetStream did not answer.
fn stream_hint(e: impl fmt::Display) -> String {
    let text = e.to_string();
    if text.contains("timed out") || text.contains("no responders") || text.contains("unavailable") {
        format!("{text}; is JetStream enabled on the server (`nats-server -js`)?")
    } else {
        text
    }
}

impl Publisher for NatsPublisher {
    fn max_payload(&self) -> Option<usize> {
        let known = self.max_payload.load(Ordering::Relaxed);
        if known > 0 {
            return Some(known);
        }
        // Zero until the client has met the server.
        let told = self.publishing.client().server_info().max_payload;
        self.max_payload.store(told, Ordering::Relaxed);
        Some(told).filter(|&n| n > 0)
    }

    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            let mut outcomes: Vec<Option<Result<PublishReceipt, EventError>>> =
                messages.iter().map(|_| None).collect();
            let mut failed_aggregates = HashSet::new();
            // Sent, acknowledgement not yet awaited, oldest first.
            let mut in_flight: VecDeque<(usize, PublishAckFuture)> = VecDeque::new();
            for (i, message) in messages.iter().enumerate() {
                loop {
                    if failed_aggregates.contains(&message.aggregate_id) {
                        outcomes[i] = Some(Err(EventError::Broker(
                            "not sent: an earlier event of the same aggregate failed".into(),
                        )));
                        break;
                    }
                    let headers = match header_map(&message.headers) {
                        Ok(headers) => headers,
                        Err(e) => {
                            failed_aggregates.insert(message.aggregate_id);
                            outcomes[i] = Some(Err(e));
                            break;
                        }
                    };
                    let publish = PublishMessage::build().payload(message.body.clone()).headers(headers);
                    match self.publishing.send_publish(message.subject.clone(), publish).await {
                        Ok(ack) => in_flight.push_back((i, ack)),
                        Err(e) if e.kind() == PublishErrorKind::MaxAckPending => {
                            // Every slot is taken: free one of ours, or wait for the other
                            // publishes to free theirs (each frees a slot when its
                            // acknowledgement arrives or times out). Nothing was sent.
                            match in_flight.pop_front() {
                                Some((j, ack)) => {
                                    let outcome = receipt(ack.await);
                                    if outcome.is_err() {
                                        failed_aggregates.insert(messages[j].aggregate_id);
                                    }
                                    outcomes[j] = Some(outcome);
                                }
                                None => tokio::time::sleep(Duration::from_millis(1)).await,
                            }
                            continue;
                        }
                        Err(e) => {
                            failed_aggregates.insert(message.aggregate_id);
                            outcomes[i] = Some(Err(publish_error(&e)));
                        }
                    }
                    break;
                }
            }
            let acked =
                join_all(in_flight.into_iter().map(|(i, ack)| async move { (i, receipt(ack.await)) }));
            for (i, outcome) in acked.await {
                outcomes[i] = Some(outcome);
            }
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| Err(EventError::Broker("no outcome recorded".into()))))
                .collect()
        })
    }
}

/// The headers of a message, checked: async-nats panics on a value with `\r` or `\n`.
/// Appends refuse such values; rows written around the store fail here, not in a panic.
fn header_map(pairs: &[(&'static str, String)]) -> Result<HeaderMap, EventError> {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let value = async_nats::HeaderValue::from_str(value)
            .map_err(|_| EventError::Broker(format!("not sent: the {name} header holds a line break")))?;
        headers.insert(*name, value);
    }
    Ok(headers)
}

fn receipt(ack: Result<jetstream::publish::PublishAck, PublishError>) -> Result<PublishReceipt, EventError> {
    ack.map(|ack| PublishReceipt { stream_sequence: ack.sequence, duplicate: ack.duplicate })
        .map_err(|e| publish_error(&e))
}

fn publish_error(e: &PublishError) -> EventError {
    let hint = match e.kind() {
        PublishErrorKind::StreamNotFound => {
            "; no JetStream stream captures this subject (see `ensure_stream`)"
        }
        PublishErrorKind::TimedOut => "; is the NATS server up?",
        _ => "",
    };
    EventError::Broker(format!("publish failed: {e}{hint}"))
}

fn validate_stream_name(name: &str) -> Result<(), EventError> {
    let ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(EventError::Config(format!(
            "invalid stream name {name:?}: use ASCII letters, digits, `-` and `_`"
        )))
    }
}

/// A subscription filter: tokens are non-empty; `*` stands alone; `>` stands alone, last.
pub(crate) fn validate_filter(filter: &str) -> Result<(), EventError> {
    let tokens: Vec<&str> = filter.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        let wildcard = *token == "*" || (*token == ">" && i + 1 == tokens.len());
        if !wildcard {
            crate::validate_subject_token(token)
                .map_err(|e| EventError::Config(format!("invalid subject filter {filter:?}: {e}")))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_names() {
        for ok in ["courses.>", "*.courses.*", "a", "a.b.c"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a..b", "a.>.b", "a b", "a.b*", "a.>x"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
        assert!(validate_stream_name("EDUPULSE_events-1").is_ok());
        assert!(validate_stream_name("a.b").is_err());
        assert!(validate_stream_name("").is_err());
    }
}
