//! The connection the relay publishes on, and why it is never made again.
//!
//! async-nats reconnects on its own after an outage and sends, on the new connection,
//! everything it was handed and had not written yet: its queue of commands survives the
//! break. A message handed over while the connection was breaking then reaches the server
//! that answers next, before the relay could check that server's streams. If that server
//! came back without messages it had acknowledged (an older copy of its store, a single
//! server that lost power before syncing), the message lands after the hole, ahead of the
//! lost ones the relay sends again: its aggregate is out of order in the stream for good.
//! No setting of async-nats drops the queue (the Go client's `ReconnectBufSize(-1)`), and
//! the same holds for a plain publish, an atomic batch's single message or a fast batch's
//! first one. The fault harness found it (376 order violations in one run with fast
//! batches); `tests/broker_durability.rs` shows it with a proxy that stalls and breaks the
//! connection.
//!
//! So a publisher that made its own connection ([`NatsPublisher::connect`]) publishes on a
//! connection that is never made again: its one reconnection attempt is refused by the
//! client itself (the authentication callback answers every call after the first
//! connection with an error, and `max_reconnects` ends the client there), so what it held
//! is dropped with it and its publishes fail. The next publish makes a new connection, one
//! generation later: a new epoch, so the relay checks its streams before anything goes out
//! on it. async-nats logs the refused attempt (`auth callback failed`) and the end of the
//! client (`max reconnection attempts reached`) at ERROR, once per outage.
//!
//! A publisher built on the application's client ([`NatsPublisher::from_client`]) publishes
//! on that client, which reconnects on its own, and keeps the exposure described above.
//!
//! [`NatsPublisher::connect`]: crate::NatsPublisher::connect
//! [`NatsPublisher::from_client`]: crate::NatsPublisher::from_client

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::{Auth, AuthError, Client, ConnectOptions, ServerAddr};

use crate::EventError;
use crate::broker::connect::{self, NatsCredentials};

/// How the publishing connection is made: the servers, the credentials, the settings.
pub(crate) struct Dial {
    pub(crate) servers: Vec<ServerAddr>,
    pub(crate) credentials: Option<NatsCredentials>,
    /// The servers' `host:port` list, for messages.
    pub(crate) names: String,
    pub(crate) connect_timeout: Duration,
}

/// What the authentication callback answers once the first connection is made.
const NOT_AGAIN: &str = "edupulse: the relay's publishing connection is not made again after an outage \
                         (what it held would reach a server whose streams are not checked yet); \
                         the next publish opens a new one";

/// How often a publish may try to open a new connection when the last try failed.
const REDIAL_EVERY: Duration = Duration::from_millis(500);

impl Dial {
    /// Opens a connection that never reconnects (see the module docs).
    pub(crate) async fn open(&self) -> Result<Client, EventError> {
        let connected = Arc::new(AtomicBool::new(false));
        let credentials = self.credentials.clone();
        let options = ConnectOptions::with_auth_callback({
            let connected = connected.clone();
            move |_nonce| {
                let refuse = connected.load(Ordering::SeqCst);
                let credentials = credentials.clone();
                async move {
                    if refuse {
                        return Err(AuthError::new(NOT_AGAIN));
                    }
                    let mut auth = Auth::new();
                    match credentials {
                        Some(NatsCredentials::UserPassword(user, password)) => {
                            auth.username = Some(user);
                            auth.password = Some(password);
                        }
                        Some(NatsCredentials::Token(token)) => auth.token = Some(token),
                        None => {}
                    }
                    Ok(auth)
                }
            }
        })
        .connection_timeout(self.connect_timeout)
        // One attempt per server after a break (each refused, or failing), then the client
        // ends. The first connection may try each server once too.
        .max_reconnects(self.servers.len().max(1));
        let client =
            match tokio::time::timeout(self.connect_timeout, options.connect(self.servers.clone())).await {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => return Err(connect::nats_connect_error(e, &self.names)),
                Err(_) => return Err(connect::nats_timeout(&self.names, self.connect_timeout)),
            };
        connected.store(true, Ordering::SeqCst);
        Ok(client)
    }
}

/// One connection of the publisher's, and the JetStream context publishing on it.
pub(crate) struct Attached {
    /// 0 for the application's client, then 1, 2, … for each connection made here.
    generation: u64,
    client: Client,
    /// Without backpressure, so that a publish holding unawaited acknowledgements is told
    /// "none left" instead of waiting for slots that only it can free.
    jetstream: jetstream::Context,
}

impl Attached {
    fn new(generation: u64, client: Client, settings: (Duration, usize)) -> Self {
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(settings.0)
            .max_ack_inflight(settings.1)
            .backpressure_on_inflight(false)
            .build(client.clone());
        Self { generation, client, jetstream }
    }

    /// The epoch: the generation, and the connections the client made (always one for a
    /// connection made here; the application's client counts its reconnections).
    fn epoch(&self) -> u64 {
        (self.generation << 32) | (self.client.statistics().connects.load(Ordering::Relaxed) & 0xffff_ffff)
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }
}

/// The connection a publish goes out on, fixed when it starts: the epoch the relay checked
/// the streams on, and nothing else.
#[derive(Clone)]
pub(crate) struct Publishing {
    attached: Arc<Attached>,
    epoch: u64,
}

impl Publishing {
    pub(crate) fn client(&self) -> &Client {
        &self.attached.client
    }

    pub(crate) fn jetstream(&self) -> &jetstream::Context {
        &self.attached.jetstream
    }

    /// Whether the client is connected, on the epoch the publish started on.
    pub(crate) fn is_up(&self) -> bool {
        self.attached.connected() && self.attached.epoch() == self.epoch
    }
}

/// The publisher's connections: the current one, and how to make the next.
pub(crate) struct Link {
    current: RwLock<Arc<Attached>>,
    /// `None`: the application's client, which reconnects on its own.
    dial: Option<Dial>,
    /// (acknowledgement timeout, acknowledgements in flight) of each connection's context.
    settings: (Duration, usize),
    /// When a new connection was last tried; one try at a time.
    redial: tokio::sync::Mutex<Option<Instant>>,
    /// Why the last try failed, for the publishes refused meanwhile.
    last_failure: Mutex<Option<String>>,
}

impl Link {
    /// The application's client: publishes go out on it (it reconnects on its own).
    pub(crate) fn shared(client: Client, settings: (Duration, usize)) -> Self {
        Self::with(Attached::new(0, client, settings), None, settings)
    }

    /// A connection made here, and how to make the next one.
    pub(crate) fn dialed(client: Client, dial: Dial, settings: (Duration, usize)) -> Self {
        Self::with(Attached::new(1, client, settings), Some(dial), settings)
    }

    fn with(attached: Attached, dial: Option<Dial>, settings: (Duration, usize)) -> Self {
        Self {
            current: RwLock::new(Arc::new(attached)),
            dial,
            settings,
            redial: tokio::sync::Mutex::new(None),
            last_failure: Mutex::new(None),
        }
    }

    fn current(&self) -> Arc<Attached> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The client of the current connection (its server's information).
    pub(crate) fn client(&self) -> Client {
        self.current().client.clone()
    }

    /// The current connection's epoch.
    pub(crate) fn epoch(&self) -> u64 {
        self.current().epoch()
    }

    /// The connection of `epoch`, to publish on: it is the current one and connected.
    /// When the current connection broke, a connection made here is replaced by a new one
    /// (at most every [`REDIAL_EVERY`] while that fails), and this publish fails all the
    /// same: the new connection has a new epoch, on which the relay checks its streams
    /// before anything goes out.
    ///
    /// # Errors
    /// Why not (nothing can be sent), when the connection of `epoch` is not the current
    /// one, or is down.
    pub(crate) async fn on(&self, epoch: u64) -> Result<Publishing, String> {
        let attached = self.current();
        if attached.epoch() != epoch {
            return Err("the connection to the NATS server was made again since the streams were checked: \
                        not sent"
                .to_owned());
        }
        if attached.connected() {
            return Ok(Publishing { attached, epoch });
        }
        let why = match &self.dial {
            Some(dial) => self.replace(&attached, dial).await,
            None => None,
        };
        Err(match why {
            Some(why) => format!("not connected to the NATS server, and a new connection failed: {why}"),
            None => "not connected to the NATS server: not sent (the streams are checked on the next \
                     connection first)"
                .to_owned(),
        })
    }

    /// Replaces the broken connection `broken` by a new one; why that failed, if it did.
    async fn replace(&self, broken: &Arc<Attached>, dial: &Dial) -> Option<String> {
        let Ok(mut tried) = self.redial.try_lock() else {
            return None;
        };
        if !Arc::ptr_eq(&self.current(), broken) {
            return None;
        }
        if tried.is_some_and(|at| at.elapsed() < REDIAL_EVERY) {
            return self.last_failure.lock().unwrap_or_else(PoisonError::into_inner).clone();
        }
        *tried = Some(Instant::now());
        match dial.open().await {
            Ok(client) => {
                let next = Arc::new(Attached::new(broken.generation + 1, client, self.settings));
                tracing::info!(
                    generation = next.generation,
                    "nats: the publishing connection broke; a new one is made (the relay checks its \
                     streams before publishing on it)"
                );
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = next;
                *self.last_failure.lock().unwrap_or_else(PoisonError::into_inner) = None;
                None
            }
            Err(e) => {
                let why = e.to_string();
                *self.last_failure.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.clone());
                Some(why)
            }
        }
    }
}
