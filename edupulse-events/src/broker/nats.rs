//! The NATS JetStream publisher: one message per event; a publish as one fast-ingest batch
//! on a stream that takes them (`fast.rs`, 2.14 and later), else an aggregate's long run as
//! one atomic batch on a stream that takes those (`batch.rs`, 2.12.1 and later), else an
//! aggregate's messages one acknowledgement apart; errors sorted into refusals and
//! transient failures.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::context::{
    CreateStreamErrorKind, GetStreamErrorKind, PublishAckFuture, PublishError, PublishErrorKind,
};
use async_nats::jetstream::{self, message::PublishMessage};
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use uuid::Uuid;

use crate::broker::batch::{
    self, ATOMIC_DISABLED, BatchOutcome, BatchStreams, Batches, DUPLICATE_MESSAGE_ID, MAX_BATCH,
};
use crate::broker::connect::{self, NatsCredentials};
use crate::broker::fast::{self, Start};
use crate::broker::held;
use crate::broker::link::{Dial, Link, Publishing};
use crate::broker::publisher::{AggregateFilter, BoxFuture, PublishReceipt, Publisher, StreamState};
use crate::broker::stream_spec::StreamSpec;
use crate::event::subject::validate_filter;
use crate::event::wire::OutgoingMessage;
use crate::{BrokerErrorKind, EventError};

/// Settings of a [`NatsPublisher`]: `NatsConfig::default()`, then the `with_*` setters.
#[derive(Clone)]
#[non_exhaustive]
pub struct NatsConfig {
    /// How long to wait for JetStream's acknowledgement of a message (default 5 s).
    pub ack_timeout: Duration,
    /// How long a connection may take, DNS included (default 5 s): the first ones, and
    /// each new publishing connection after an outage. Once connected, the application's
    /// client reconnects in the background without limit.
    pub connect_timeout: Duration,
    /// Messages awaiting their acknowledgement at once, over all concurrent publishes of
    /// this publisher (default 5 000). A publish that finds none left awaits its own oldest
    /// acknowledgement first, or, holding none, waits for the others to free some.
    pub max_ack_inflight: usize,
    /// On a stream with atomic publishing, an aggregate's messages in one publish may go as
    /// one atomic batch when there are at least this many (default 64); fewer go one
    /// acknowledgement apart. The server commits a stream's batches one after another, a few
    /// milliseconds each whatever their size (measured in BENCHMARKS.md), while aggregates
    /// sent one message at a time go in parallel: so an aggregate's run goes as a batch only
    /// when that shortens the publish (one lesson's backlog of quiz answers among a few
    /// others, not fifty aggregates of a hundred events each).
    pub min_batch: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            ack_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            max_ack_inflight: 5_000,
            min_batch: 64,
        }
    }
}

setters!(NatsConfig {
    with_ack_timeout => ack_timeout: Duration,
    with_connect_timeout => connect_timeout: Duration,
    with_max_ack_inflight => max_ack_inflight: usize,
    with_min_batch => min_batch: usize,
});

impl NatsConfig {
    /// An invalid setting, as an error.
    fn check(&self) -> Result<(), EventError> {
        if self.ack_timeout.is_zero() || self.connect_timeout.is_zero() || self.max_ack_inflight == 0 {
            return Err(EventError::Config(
                "NATS configuration: ack_timeout and connect_timeout must be above zero, max_ack_inflight at least 1"
                    .into(),
            ));
        }
        if self.min_batch < 2 {
            return Err(EventError::Config("NATS configuration: min_batch must be at least 2".into()));
        }
        Ok(())
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("ack_timeout", &self.ack_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_ack_inflight", &self.max_ack_inflight)
            .field("min_batch", &self.min_batch)
            .finish()
    }
}

/// JetStream's largest replica count.
const MAX_REPLICAS: usize = 5;

/// Publishes events to NATS JetStream: one message per event on its subject, with
/// `Nats-Msg-Id` = event id and the `Edupulse-*` headers; acknowledgements are awaited
/// together, not one round trip per event. On a stream with fast-ingest batches
/// ([`StreamSpec::fast_publish`], nats-server 2.14 and later) a publish with a long run of
/// some aggregate goes as one batch, every aggregate's messages in order, acknowledged every
/// few hundred messages. On a stream
/// with atomic publishing only ([`StreamSpec::atomic_publish`], 2.12.1 and later) an
/// aggregate's long run of messages may go as one atomic batch: stored whole or not at all,
/// with one acknowledgement.
///
/// Events go out on a connection of their own that is never made again after an outage
/// (see [`connect`](NatsPublisher::connect)).
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
    /// The connection events are published on (`link.rs`: one that is never made again,
    /// unless the application's client was given).
    link: Arc<Link>,
    /// The server's `max_payload`, once known (0 before): read on every commit, so kept
    /// here instead of cloning the client's server info each time.
    max_payload: Arc<AtomicUsize>,
    /// The streams [`ensure_stream`](Self::ensure_stream) found taking batches.
    batches: Arc<RwLock<BatchStreams>>,
    /// How long a batch's first message and its commit wait for their answer.
    ack_timeout: Duration,
    /// The fewest messages of an aggregate sent as a batch.
    min_batch: usize,
}

impl fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsPublisher").finish_non_exhaustive()
    }
}

/// A failed JetStream request about the stream: `kind`, the hint when JetStream did not
/// answer, and the client's error as the source.
fn stream_error(
    what: &str,
    kind: BrokerErrorKind,
    e: impl std::error::Error + Send + Sync + 'static,
) -> EventError {
    let message = format!("{what}: {}", stream_hint(&e));
    EventError::broker(kind, message, e)
}

impl NatsPublisher {
    /// Connects to the NATS server at `url`: `nats://host:port`, `tls://host:port`, or
    /// several servers separated by commas. Credentials in the URL (`user:password@` or a
    /// lone `token@`) are taken out of it and handed to async-nats as options, so they are
    /// sent in the CONNECT message only (which async-nats logs with the secrets masked) and
    /// never in the server addresses it logs.
    ///
    /// Two connections are made here, each within `config.connect_timeout`: a server that
    /// is down, an unknown host or refused credentials are reported at once. One carries
    /// the application's [`jetstream`](Self::jetstream) context and the relay's stream
    /// checks, and reconnects in the background after an outage. The other carries the
    /// events and is never made again: after an outage the next publish makes a new one,
    /// on which the relay checks its streams before anything goes out, so that nothing the
    /// client held at the break reaches a server that may have come back without messages
    /// it acknowledged (`broker/link.rs` tells why; async-nats logs the refused
    /// reconnection, `auth callback failed`, and `max reconnection attempts reached`, at
    /// ERROR, once per outage). Publishes fail until the server is back (the events wait
    /// in the store's log).
    ///
    /// # Errors
    /// [`EventError::Config`] when the URL or the configuration is invalid; [`EventError::Connect`] when the
    /// first connection fails, with the cause and the next step. Neither shows the URL's
    /// credentials.
    pub async fn connect(url: &str, config: NatsConfig) -> Result<Self, EventError> {
        config.check()?;
        let target = connect::nats_target(url)?;
        let options = async_nats::ConnectOptions::new().connection_timeout(config.connect_timeout);
        let options = match target.credentials.clone() {
            Some(NatsCredentials::UserPassword(user, password)) => options.user_and_password(user, password),
            Some(NatsCredentials::Token(token)) => options.token(token),
            None => options,
        };
        // Without `retry_on_initial_connect`: the first failure comes back to the caller
        // instead of surfacing later as a request timeout. The bound covers DNS too.
        let servers = target.servers.clone();
        let client = match tokio::time::timeout(config.connect_timeout, options.connect(servers)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(connect::nats_connect_error(e, &target.names)),
            Err(_) => return Err(connect::nats_timeout(&target.names, config.connect_timeout)),
        };
        let dial = Dial {
            servers: target.servers,
            credentials: target.credentials,
            names: target.names,
            connect_timeout: config.connect_timeout,
        };
        let publishing = dial.open().await?;
        let link = Link::dialed(publishing, dial, (config.ack_timeout, config.max_ack_inflight));
        Ok(Self::with_link(client, link, &config))
    }

    /// Uses an existing client, for the application's context and for publishing.
    ///
    /// The client reconnects on its own after an outage and then sends what it was handed
    /// while its connection was breaking, before the relay could check the streams: against
    /// a server that came back without messages it had acknowledged, such an event lands
    /// after the hole, ahead of the lost ones sent again. A publisher made by
    /// [`connect`](Self::connect) publishes on a connection of its own that is never made
    /// again, and has no such exposure: prefer it for the relay.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid configuration.
    pub fn from_client(client: async_nats::Client, config: &NatsConfig) -> Result<Self, EventError> {
        config.check()?;
        let link = Link::shared(client.clone(), (config.ack_timeout, config.max_ack_inflight));
        Ok(Self::with_link(client, link, config))
    }

    fn with_link(client: async_nats::Client, link: Link, config: &NatsConfig) -> Self {
        let jetstream = jetstream::ContextBuilder::new().timeout(config.ack_timeout).build(client);
        Self {
            jetstream,
            link: Arc::new(link),
            max_payload: Arc::default(),
            batches: Arc::default(),
            ack_timeout: config.ack_timeout,
            min_batch: config.min_batch,
        }
    }

    /// The JetStream context, for the application's own use.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Creates the stream, or brings an existing one to `spec`.
    ///
    /// A missing stream is created file-backed with `spec`'s subjects, duplicate window, max
    /// age and replicas, everything else at JetStream's defaults. On an existing stream only
    /// what `spec` asks for changes: the subjects, the duplicate window, and the max age and
    /// replicas when they are not zero (zero leaves the stream's own), atomic publishing,
    /// switched on when `spec` asks for it and the server takes message ids in batches (2.12.1
    /// and later), and fast-ingest batches, when `spec` asks for them and the server has them
    /// (2.14 and later); neither is ever switched off. Limits (`max_msgs`,
    /// `max_bytes`, …), retention, discard policy, storage, description and the rest are
    /// kept, so settings an operator made survive a restart of the service. Nothing is sent
    /// when the stream already matches.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid name, subject filter or replica count (above
    /// 5); [`EventError::Broker`] when JetStream refuses or does not answer (more replicas
    /// than the cluster has servers, for one).
    pub async fn ensure_stream(&self, spec: &StreamSpec) -> Result<(), EventError> {
        validate_stream_name(&spec.name)?;
        if spec.replicas > MAX_REPLICAS {
            return Err(EventError::Config(format!(
                "stream {}: {} replicas asked for, JetStream keeps at most {MAX_REPLICAS}",
                spec.name, spec.replicas
            )));
        }
        for filter in &spec.subjects {
            validate_filter(filter)?;
        }
        // Atomic batches where the server takes message ids in them (2.12.1 and later): an
        // older server accepts the setting and drops it (2.11), or refuses the ids (2.12.0).
        // Fast-ingest batches from 2.14 on (2.12 refuses the setting as unknown).
        let version = self.link.client().server_info().version;
        let atomic = spec.atomic_publish && batch::server_batches(&version);
        let fast = spec.fast_publish && fast::server_fast(&version);
        let config = self.bring_to_spec(spec, atomic, fast).await?;
        // The stream's own word, not the request's: a server may have dropped the setting.
        self.batches.write().unwrap_or_else(PoisonError::into_inner).set(
            &spec.name,
            &config.subjects,
            atomic && config.allow_atomic_publish,
            fast && config.allow_batch_publish,
        );
        Ok(())
    }

    /// Creates the stream or updates it to `spec` (see [`ensure_stream`](Self::ensure_stream));
    /// returns its configuration as the server keeps it.
    async fn bring_to_spec(
        &self,
        spec: &StreamSpec,
        atomic: bool,
        fast: bool,
    ) -> Result<jetstream::stream::Config, EventError> {
        let current = match self.stream_config(&spec.name).await? {
            Some(current) => current,
            None => {
                let config = jetstream::stream::Config {
                    name: spec.name.clone(),
                    subjects: spec.subjects.clone(),
                    duplicate_window: spec.duplicate_window,
                    max_age: spec.max_age,
                    num_replicas: spec.replicas.max(1),
                    storage: jetstream::stream::StorageType::File,
                    allow_atomic_publish: atomic,
                    allow_batch_publish: fast,
                    ..Default::default()
                };
                match self.jetstream.create_stream(config).await {
                    // The server's answer holds the configuration as it keeps it.
                    Ok(stream) => return Ok(stream.cached_info().config.clone()),
                    // Another process created it meanwhile, with other settings: adjust
                    // theirs, as if it had been there first.
                    Err(e) if create_code(e.kind()) == Some(ErrorCode::STREAM_NAME_EXIST) => {
                        self.stream_config(&spec.name).await?.ok_or_else(|| {
                            EventError::broker_message(
                                BrokerErrorKind::Api,
                                "cannot create the stream: JetStream says it exists, then that it does not",
                            )
                        })?
                    }
                    Err(e) => {
                        let kind = create_kind(e.kind());
                        return Err(stream_error("cannot create the stream", kind, e));
                    }
                }
            }
        };
        let mut config = current.clone();
        config.subjects.clone_from(&spec.subjects);
        config.duplicate_window = spec.duplicate_window;
        if !spec.max_age.is_zero() {
            config.max_age = spec.max_age;
        }
        if spec.replicas > 0 {
            config.num_replicas = spec.replicas;
        }
        config.allow_atomic_publish |= atomic;
        config.allow_batch_publish |= fast;
        if config == current {
            return Ok(current);
        }
        let updated = self
            .jetstream
            .update_stream(&config)
            .await
            .map_err(|e| stream_error("cannot update the stream", create_kind(e.kind()), e))?;
        Ok(updated.config)
    }

    /// The configuration of the stream `name`, or `None` when there is none.
    async fn stream_config(&self, name: &str) -> Result<Option<jetstream::stream::Config>, EventError> {
        match self.jetstream.get_stream(name).await {
            Ok(stream) => Ok(Some(stream.cached_info().config.clone())),
            Err(e) if jetstream_code(e.kind()) == Some(ErrorCode::STREAM_NOT_FOUND) => Ok(None),
            Err(e) => {
                let kind = match e.kind() {
                    GetStreamErrorKind::JetStream(_) => BrokerErrorKind::Api,
                    GetStreamErrorKind::Request => BrokerErrorKind::Unavailable,
                    _ => BrokerErrorKind::Other,
                };
                Err(stream_error("cannot read the stream's configuration", kind, e))
            }
        }
    }
}

fn jetstream_code(kind: GetStreamErrorKind) -> Option<ErrorCode> {
    match kind {
        GetStreamErrorKind::JetStream(e) => Some(e.error_code()),
        _ => None,
    }
}

fn create_kind(kind: CreateStreamErrorKind) -> BrokerErrorKind {
    match kind {
        CreateStreamErrorKind::TimedOut => BrokerErrorKind::TimedOut,
        CreateStreamErrorKind::JetStreamUnavailable => BrokerErrorKind::Unavailable,
        CreateStreamErrorKind::NotFound => BrokerErrorKind::NoStream,
        CreateStreamErrorKind::JetStream(_) => BrokerErrorKind::Api,
        _ => BrokerErrorKind::Other,
    }
}

fn create_code(kind: CreateStreamErrorKind) -> Option<ErrorCode> {
    match kind {
        CreateStreamErrorKind::JetStream(e) => Some(e.error_code()),
        _ => None,
    }
}

/// A stream request's error, with the likely reason when JetStream did not answer.
fn stream_hint(e: &impl fmt::Display) -> String {
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
        let told = self.link.client().server_info().max_payload;
        self.max_payload.store(told, Ordering::Relaxed);
        Some(told).filter(|&n| n > 0)
    }

    fn stream_state<'a>(&'a self, stream: &'a str) -> BoxFuture<'a, Result<Option<StreamState>, EventError>> {
        Box::pin(async move {
            validate_stream_name(stream)?;
            match self.jetstream.get_stream(stream).await {
                Ok(found) => {
                    let info = found.cached_info();
                    // A replicated stream between leaders is answered from a replica's own
                    // copy, which may not hold everything the group acknowledged yet.
                    if info.cluster.as_ref().is_some_and(|c| c.leader.is_none()) {
                        return Err(EventError::broker_message(
                            BrokerErrorKind::Unavailable,
                            format!("stream {stream} has no leader (an election is under way)"),
                        ));
                    }
                    Ok(Some(StreamState {
                        first_sequence: info.state.first_sequence,
                        last_sequence: info.state.last_sequence,
                        subjects: info.config.subjects.clone(),
                        duplicate_window: Some(info.config.duplicate_window),
                    }))
                }
                Err(e) if jetstream_code(e.kind()) == Some(ErrorCode::STREAM_NOT_FOUND) => Ok(None),
                Err(e) => {
                    Err(stream_error("cannot read the stream's state", BrokerErrorKind::Unavailable, e))
                }
            }
        })
    }

    fn held_events<'a>(
        &'a self,
        stream: &'a str,
        last: u64,
        since: Option<DateTime<Utc>>,
        wanted: AggregateFilter<'a>,
    ) -> BoxFuture<'a, Result<Vec<Uuid>, EventError>> {
        Box::pin(async move {
            validate_stream_name(stream)?;
            held::scan(&self.jetstream, stream, last, since, wanted).await
        })
    }

    fn event_at<'a>(
        &'a self,
        stream: &'a str,
        sequence: u64,
    ) -> BoxFuture<'a, Result<Option<Uuid>, EventError>> {
        Box::pin(async move {
            validate_stream_name(stream)?;
            held::event_at(&self.jetstream, stream, sequence).await
        })
    }

    fn connection_epoch(&self) -> u64 {
        self.link.epoch()
    }

    fn publish<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        self.publish_on(messages, self.connection_epoch())
    }

    fn publish_on<'a>(
        &'a self,
        messages: &'a [OutgoingMessage],
        epoch: u64,
    ) -> BoxFuture<'a, Vec<Result<PublishReceipt, EventError>>> {
        Box::pin(async move {
            let connection = match self.link.on(epoch).await {
                Ok(connection) => connection,
                Err(why) => {
                    return messages
                        .iter()
                        .map(|_| Err(EventError::broker_message(BrokerErrorKind::Unavailable, why.clone())))
                        .collect();
                }
            };
            let connection = &connection;
            let plan =
                self.batches.read().unwrap_or_else(PoisonError::into_inner).plan(messages, self.min_batch);
            if plan.batches.is_empty() && plan.fast.is_empty() {
                return self.publish_in_order(messages, connection).await;
            }
            let single: Vec<OutgoingMessage> = plan.single.iter().map(|&i| messages[i].clone()).collect();
            let batches = async {
                let mut waiting = plan.batches.iter();
                let mut running = FuturesUnordered::new();
                running.extend(
                    waiting
                        .by_ref()
                        .take(BATCHES_IN_FLIGHT)
                        .map(|run| self.publish_run(messages, run, connection)),
                );
                let mut done = Vec::with_capacity(messages.len());
                while let Some(outcomes) = running.next().await {
                    done.extend(outcomes);
                    running.extend(waiting.next().map(|run| self.publish_run(messages, run, connection)));
                }
                done
            };
            let fast = futures_util::future::join_all(
                plan.fast.iter().map(|fast| self.publish_fast(messages, fast, connection)),
            );
            let (single_outcomes, batch_outcomes, fast_outcomes) =
                futures_util::future::join3(self.publish_in_order(&single, connection), batches, fast).await;
            let mut outcomes: Vec<Option<Result<PublishReceipt, EventError>>> =
                messages.iter().map(|_| None).collect();
            for (&i, outcome) in plan.single.iter().zip(single_outcomes) {
                outcomes[i] = Some(outcome);
            }
            for (i, outcome) in batch_outcomes.into_iter().chain(fast_outcomes.into_iter().flatten()) {
                outcomes[i] = Some(outcome);
            }
            outcomes.into_iter().map(|o| o.unwrap_or_else(|| Err(EventError::not_sent()))).collect()
        })
    }
}

/// Atomic batches in flight at once in one publish (each one aggregate's).
const BATCHES_IN_FLIGHT: usize = 32;

impl NatsPublisher {
    /// Publishes one aggregate's messages (`run`, indices into `messages`) as atomic batches
    /// of at most [`MAX_BATCH`], each after the one before was stored. A batch the stream
    /// refused (a message id it already holds: all or part of it was stored before) or
    /// that was never committed stored nothing: it and the rest go one at a time, and the
    /// stream's per-message de-duplication tells what it holds.
    async fn publish_run(
        &self,
        messages: &[OutgoingMessage],
        run: &[usize],
        connection: &Publishing,
    ) -> Vec<(usize, Result<PublishReceipt, EventError>)> {
        let client = connection.client().clone();
        let mut out = Vec::with_capacity(run.len());
        let mut rest = run;
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(rest.len().min(MAX_BATCH));
            let batch: Vec<&OutgoingMessage> = chunk.iter().map(|&i| &messages[i]).collect();
            let headers = |m: &OutgoingMessage| header_map(&m.headers);
            let connected = || connection.is_up();
            match batch::send_batch(&client, &batch, headers, self.ack_timeout, connected).await {
                BatchOutcome::Stored(receipts) => {
                    out.extend(chunk.iter().copied().zip(receipts.into_iter().map(Ok)));
                    rest = after;
                }
                BatchOutcome::NotStored { code, reason } => {
                    if code != DUPLICATE_MESSAGE_ID {
                        tracing::debug!(code, %reason, "nats: atomic batch not stored; its messages go one at a time");
                    }
                    if code == ATOMIC_DISABLED {
                        self.forget_batches(&messages[rest[0]].subject, Batches::Atomic);
                    }
                    return self.one_at_a_time(messages, rest, connection, out).await;
                }
                BatchOutcome::FirstAlone(receipt) => {
                    self.forget_batches(&messages[rest[0]].subject, Batches::Atomic);
                    out.push((rest[0], Ok(receipt)));
                    return self.one_at_a_time(messages, &rest[1..], connection, out).await;
                }
                BatchOutcome::Unknown(error) => {
                    // Stored or not, nothing later may go out before it is known: the
                    // relay sends it again, and the stream says.
                    out.push((rest[0], Err(error)));
                    out.extend(rest[1..].iter().map(|&i| (i, Err(EventError::not_sent()))));
                    return out;
                }
            }
        }
        out
    }

    /// Publishes `indices` of `messages` one acknowledgement apart, after `out`.
    async fn one_at_a_time(
        &self,
        messages: &[OutgoingMessage],
        indices: &[usize],
        connection: &Publishing,
        mut out: Vec<(usize, Result<PublishReceipt, EventError>)>,
    ) -> Vec<(usize, Result<PublishReceipt, EventError>)> {
        let owned: Vec<OutgoingMessage> = indices.iter().map(|&i| messages[i].clone()).collect();
        out.extend(indices.iter().copied().zip(self.publish_in_order(&owned, connection).await));
        out
    }

    /// Stops sending `kind` batches to the stream that captures `subject`: it said it takes
    /// none.
    fn forget_batches(&self, subject: &str, kind: Batches) {
        let mut batches = self.batches.write().unwrap_or_else(PoisonError::into_inner);
        batches.forget_subject(subject, kind);
        tracing::warn!(subject, ?kind, "nats: the stream does not take these batches; events go another way");
    }

    /// Publishes the messages `plan` names (every aggregate's messages to one stream with
    /// fast-ingest batches, in order; `fast.rs`): every aggregate's messages but its last as
    /// one fast batch, while aggregates with one message go one at a time; then each
    /// aggregate's last message, once the batch stored the one before it, one at a time
    /// with an acknowledgement of its own (the batch's names one sequence only, and the
    /// relay's marks need each partition's last). What the stream did not store fails: the
    /// first with why, the rest unsent. A stream that turns out not to take the batch
    /// (nothing stored) gets the messages one at a time.
    async fn publish_fast(
        &self,
        messages: &[OutgoingMessage],
        plan: &fast::FastPlan,
        connection: &Publishing,
    ) -> Vec<(usize, Result<PublishReceipt, EventError>)> {
        if plan.batch.is_empty() {
            // Every aggregate has one message: nothing to batch (the plan does not ask for
            // a batch then).
            return self.one_at_a_time(messages, &plan.alone, connection, Vec::new()).await;
        }
        let client = connection.client().clone();
        let batch: Vec<&OutgoingMessage> = plan.batch.iter().map(|&i| &messages[i]).collect();
        let headers = |m: &OutgoingMessage| header_map(&m.headers);
        let connected = || connection.is_up();
        let alone: Vec<OutgoingMessage> = plan.alone.iter().map(|&i| messages[i].clone()).collect();
        let ((sent, start, failure), alone_outcomes) = futures_util::future::join(
            fast::send_fast(&client, &batch, headers, self.ack_timeout, connected),
            self.publish_in_order(&alone, connection),
        )
        .await;
        let mut out: Vec<(usize, Result<PublishReceipt, EventError>)> =
            plan.alone.iter().copied().zip(alone_outcomes).collect();
        let mut rest: Vec<usize> =
            plan.batch.iter().copied().chain(plan.tails.iter().map(|(i, _)| *i)).collect();
        rest.sort_unstable();
        match start {
            Start::Disabled => {
                self.forget_batches(&batch[0].subject, Batches::Fast);
                return self.one_at_a_time(messages, &rest, connection, out).await;
            }
            Start::Plain => {
                self.forget_batches(&batch[0].subject, Batches::Fast);
                out.push((plan.batch[0], sent.outcomes(None).swap_remove(0)));
                rest.retain(|&i| i != plan.batch[0]);
                return self.one_at_a_time(messages, &rest, connection, out).await;
            }
            Start::Open | Start::Ended => {}
        }
        let batch_outcomes = sent.outcomes(failure);
        let (ready, waiting): (Vec<_>, Vec<_>) = plan
            .tails
            .iter()
            .copied()
            .partition(|(_, before)| batch_outcomes.get(*before).is_some_and(Result::is_ok));
        let batch: Vec<_> = plan.batch.iter().copied().zip(batch_outcomes).collect();
        let mut tail_outcomes: Vec<_> =
            waiting.into_iter().map(|(i, _)| (i, Err(EventError::not_sent()))).collect();
        let tails: Vec<OutgoingMessage> = ready.iter().map(|(i, _)| messages[*i].clone()).collect();
        let sent_tails = self.publish_in_order(&tails, connection).await;
        tail_outcomes.extend(ready.into_iter().map(|(i, _)| i).zip(sent_tails));
        let aggregate = |i: usize| messages[i].aggregate_id;
        let confirm = fast::to_confirm(&batch, &tail_outcomes, aggregate);
        let again: Vec<OutgoingMessage> = confirm.iter().map(|&i| messages[i].clone()).collect();
        let confirmations =
            confirm.into_iter().zip(self.publish_in_order(&again, connection).await).collect();
        out.extend(fast::confirmed(batch, confirmations, aggregate));
        out.extend(tail_outcomes);
        out
    }

    /// Publishes `messages`, each aggregate's one acknowledgement apart (the [`InOrder`]
    /// bookkeeping), different aggregates pipelined; on `connection` only.
    async fn publish_in_order(
        &self,
        messages: &[OutgoingMessage],
        connection: &Publishing,
    ) -> Vec<Result<PublishReceipt, EventError>> {
        let mut order = InOrder::new(messages);
        let mut in_flight = FuturesUnordered::new();
        loop {
            while let Some(i) = order.next_ready() {
                match self.send(&messages[i], connection).await {
                    Sent::Awaiting(ack) => in_flight.push(await_ack(i, ack)),
                    Sent::NoSlot => {
                        // Every slot is taken: wait for one of ours, or for the other
                        // publishes to free theirs. Nothing was sent.
                        order.retry_first(i);
                        if in_flight.is_empty() {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        break;
                    }
                    Sent::Failed(error) => order.settle(i, Err(error)),
                }
            }
            match in_flight.next().await {
                Some((i, outcome)) => order.settle(i, outcome),
                None if !order.has_ready() => break,
                None => {}
            }
        }
        order.finish()
    }
}

/// What became of a message handed to the client.
enum Sent {
    /// Sent; its acknowledgement is awaited.
    Awaiting(PublishAckFuture),
    /// Not sent: every acknowledgement slot is taken.
    NoSlot,
    /// Not sent, or refused at once.
    Failed(EventError),
}

impl NatsPublisher {
    /// Hands one message to the client.
    /// Not while the client is disconnected, nor on another connection than the one the
    /// call started on: the client would keep the message and send it once it reconnects,
    /// to a server that may have come back without what it acknowledged, before the relay
    /// could check the stream (and after the hole).
    async fn send(&self, message: &OutgoingMessage, connection: &Publishing) -> Sent {
        if !connection.is_up() {
            return Sent::Failed(EventError::broker_message(
                BrokerErrorKind::Unavailable,
                "not connected to the NATS server: not sent (it would go out unchecked on reconnection)",
            ));
        }
        let headers = match header_map(&message.headers) {
            Ok(headers) => headers,
            Err(e) => return Sent::Failed(e),
        };
        let publish = PublishMessage::build().payload(message.body.clone()).headers(headers);
        match connection.jetstream().send_publish(message.subject.clone(), publish).await {
            Ok(ack) => Sent::Awaiting(ack),
            Err(e) if e.kind() == PublishErrorKind::MaxAckPending => Sent::NoSlot,
            Err(e) => Sent::Failed(publish_error(e)),
        }
    }
}

/// The publisher contract's bookkeeping: each aggregate's messages in order, only its first
/// ready to send; the next becomes ready when the broker acknowledged the previous. One
/// message per aggregate in flight, so a lost or refused message can never let a later one
/// of its aggregate into the stream first. Different aggregates are pipelined.
struct InOrder<'m> {
    messages: &'m [OutgoingMessage],
    outcomes: Vec<Option<Result<PublishReceipt, EventError>>>,
    queues: HashMap<Uuid, VecDeque<usize>>,
    ready: VecDeque<usize>,
}

impl<'m> InOrder<'m> {
    fn new(messages: &'m [OutgoingMessage]) -> Self {
        let mut queues: HashMap<Uuid, VecDeque<usize>> = HashMap::new();
        let mut ready = VecDeque::new();
        for (i, message) in messages.iter().enumerate() {
            let queue = queues.entry(message.aggregate_id).or_default();
            if queue.is_empty() {
                ready.push_back(i);
            }
            queue.push_back(i);
        }
        Self { messages, outcomes: messages.iter().map(|_| None).collect(), queues, ready }
    }

    /// The next message that may be sent now.
    fn next_ready(&mut self) -> Option<usize> {
        self.ready.pop_front()
    }

    /// Puts message `i` back, first in line.
    fn retry_first(&mut self, i: usize) {
        self.ready.push_front(i);
    }

    fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Records message `i`'s outcome: an acknowledged message readies its aggregate's
    /// next; a failed one fails the aggregate's later messages unsent.
    fn settle(&mut self, i: usize, outcome: Result<PublishReceipt, EventError>) {
        let acknowledged = outcome.is_ok();
        self.outcomes[i] = Some(outcome);
        let Some(queue) = self.queues.get_mut(&self.messages[i].aggregate_id) else { return };
        if queue.front() == Some(&i) {
            queue.pop_front();
        }
        if acknowledged {
            self.ready.extend(queue.front().copied());
        } else {
            for later in queue.drain(..) {
                self.outcomes[later] = Some(Err(EventError::not_sent()));
            }
        }
    }

    /// One outcome per message, in the order given.
    fn finish(self) -> Vec<Result<PublishReceipt, EventError>> {
        self.outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| {
                    Err(EventError::broker_message(BrokerErrorKind::Other, "no outcome recorded"))
                })
            })
            .collect()
    }
}

/// Awaits an acknowledgement, keeping the message's index.
async fn await_ack(i: usize, ack: PublishAckFuture) -> (usize, Result<PublishReceipt, EventError>) {
    (i, receipt(ack.await))
}

/// The headers of a message, checked: async-nats panics on a value with `\r` or `\n`.
/// Appends refuse such values; rows written around the store fail here, not in a panic.
fn header_map(pairs: &[(&'static str, String)]) -> Result<HeaderMap, EventError> {
    let mut headers = HeaderMap::new();
    for (name, value) in pairs {
        let value = async_nats::HeaderValue::from_str(value)
            .map_err(|_| EventError::refused(format!("not sent: the {name} header holds a line break")))?;
        headers.insert(*name, value);
    }
    Ok(headers)
}

fn receipt(ack: Result<jetstream::publish::PublishAck, PublishError>) -> Result<PublishReceipt, EventError> {
    ack.map(|ack| PublishReceipt {
        stream_sequence: ack.sequence,
        duplicate: ack.duplicate,
        stream: Some(Arc::from(ack.stream.as_str())),
    })
    .map_err(publish_error)
}

/// A failed publish: [`EventError::Refused`] when the server answered with an error about
/// this message (the relay parks it after a few), else [`EventError::Broker`] (retried).
/// The client's error is the source of either.
fn publish_error(e: PublishError) -> EventError {
    let answered = std::error::Error::source(&e)
        .is_some_and(|source| source.downcast_ref::<jetstream::Error>().is_some());
    let (kind, message) = match e.kind() {
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => {
            return EventError::Refused { message: e.to_string(), source: Some(Box::new(e)) };
        }
        PublishErrorKind::Other if answered => {
            return EventError::Refused { message: e.to_string(), source: Some(Box::new(e)) };
        }
        PublishErrorKind::StreamNotFound => (
            BrokerErrorKind::NoStream,
            format!("publish failed: {e}; no JetStream stream captures this subject (see `ensure_stream`)"),
        ),
        PublishErrorKind::TimedOut => {
            (BrokerErrorKind::TimedOut, format!("publish failed: {e}; is the NATS server up?"))
        }
        PublishErrorKind::BrokenPipe => (BrokerErrorKind::Unavailable, format!("publish failed: {e}")),
        _ => (BrokerErrorKind::Other, format!("publish failed: {e}")),
    };
    EventError::broker(kind, message, e)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names() {
        assert!(validate_stream_name("EDUPULSE_events-1").is_ok());
        assert!(validate_stream_name("a.b").is_err());
        assert!(validate_stream_name("").is_err());
    }
}
