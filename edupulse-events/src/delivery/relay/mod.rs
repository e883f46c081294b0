//! The relay: publishes the store's log to the broker.
//!
//! The events table is the one log. A relay reads it the way a projection does: the rows
//! past its checkpoint and below the transaction horizon, in `(transaction id, position)`
//! order. It publishes them pipelined with `Nats-Msg-Id` = event id, awaits the
//! acknowledgements, and saves its checkpoint once per batch. After a crash it re-sends at
//! most the batch after its checkpoint, and the broker drops those copies inside its
//! duplicate window.
//!
//! **Partitions.** Each event is stored with its partition, a hash of its aggregate id
//! ([`PARTITIONS`] of them), and each partition has its own checkpoint. A relay publishes
//! only the partitions it holds: on PostgreSQL through advisory *session* locks taken on a
//! connection of its own (its lease), so that it holds no transaction while it waits on the
//! broker, and never holds the horizon back itself. Several relays, in one process or
//! many, share the partitions; the others stand by and take a partition over within
//! [`RelayConfig::takeover_interval`] of its holder's death (PostgreSQL ends a dead
//! client's session, and with it the locks). The checkpoints are written over the lease,
//! so a relay whose session ended cannot move them any more.
//!
//! **Order.** A relay sends an aggregate's next event only after the broker acknowledged
//! the previous one (the [`Publisher`] contract), so the broker never holds an aggregate's
//! event before an earlier one, even when an acknowledgement fails mid-batch; a
//! partition's checkpoint never passes an event that is neither acknowledged nor parked.
//!
//! **Poison.** An event the broker refuses ([`EventError::Refused`]) is retried with
//! backoff; after [`RelayConfig::max_attempts`] refusals it is parked (a table, with the
//! refusal) and its aggregate's later events are parked behind it, so that nothing else
//! waits and the aggregate is never published out of order. Re-queue parked aggregates
//! with [`EventStore::requeue_parked`] once the cause is fixed. Failures that are not the
//! message's (a timeout, a lost connection, no stream) are retried without limit.
//!
//! **Lost messages.** A relay checks that the broker's streams still hold what they
//! acknowledged; a partition whose stream lost acknowledged messages (deleted, restored
//! from an older copy, a server that lost power before syncing) is held and reported until
//! what was lost is sent again, on request or on its own
//! ([`RelayConfig::republish_lost`]). See `delivery/lost.rs`. Nothing is handed to the
//! broker on a connection whose streams were not checked: the check is compared with the
//! connection right before each batch goes out, not only before its page is read (the
//! connection may be made again meanwhile, to a server back from an older copy).

mod config;
mod holding;
mod ledger;
mod worker;

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use self::config::RelayConfig;
use self::ledger::Failures;
use self::worker::Worker;
use crate::EventError;
use crate::broker::Publisher;
use crate::delivery::republish::{self, Republished};
use crate::store::{EventStore, RelayLag};

/// What one pass of a relay did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RelayPass {
    /// Events the broker acknowledged.
    pub published: u64,
    /// Events parked (refused for good, or waiting behind one that was).
    pub parked: u64,
    /// Events that failed and will be retried.
    pub failed: u64,
    /// Events not sent: they wait for their retry, or behind a failed one.
    pub waiting: u64,
    /// Partitions the relay held.
    pub partitions: u32,
    /// The last page was full: more events are waiting.
    pub more: bool,
}

/// Publishes the store's log to the broker: see the module docs. Runs as a background task
/// of the [`EventBus`](crate::EventBus) by default, or on its own (a process that only
/// publishes); any number of relays share the partitions.
pub struct LogRelay {
    store: EventStore,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    /// Failed events' attempts, kept from one tenure to the next.
    failing: Mutex<Failures>,
}

impl std::fmt::Debug for LogRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogRelay").field("store", &self.store).field("config", &self.config).finish()
    }
}

impl LogRelay {
    /// A relay publishing `store`'s log through `publisher`.
    pub fn new(store: EventStore, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Self {
        Self { store, publisher, config, failing: Mutex::default() }
    }

    /// How far publication is behind; see [`EventStore::relay_lag`].
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn lag(&self) -> Result<RelayLag, EventError> {
        self.store.relay_lag().await
    }

    /// Sends the events from global position `from` to `to` (both included; without `to`, to
    /// the end of the readable stream) to the broker again, in stream order, `batch_size` at
    /// a time: for a stream that lost messages (deleted, or restored from an older backup).
    /// No checkpoint moves. Events the stream still holds inside its duplicate window are
    /// dropped by the broker and counted as [`Republished::duplicates`]; outside it they are
    /// stored a second time. Run it while no relay publishes newer events of the same
    /// aggregates, or the stream holds them before the republished ones.
    ///
    /// # Errors
    /// [`EventError::Config`] when `from` or `to` names no event; [`EventError::Database`];
    /// [`EventError::Broker`] at the first event the broker does not take, naming its position
    /// (the ones before it were sent).
    pub async fn republish(&self, from: i64, to: Option<i64>) -> Result<Republished, EventError> {
        self.config.check()?;
        let batch = usize::try_from(self.config.batch_size).unwrap_or(usize::MAX);
        republish::republish(&self.store, &*self.publisher, from, to, batch).await
    }

    /// Takes the free partitions, publishes everything below the horizon, and lets the
    /// partitions go. For tools and tests; [`run`](Self::run) keeps going.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid configuration; [`EventError::Database`].
    /// Broker failures are not errors here but [`RelayPass::failed`].
    pub async fn run_once(&self) -> Result<RelayPass, EventError> {
        self.config.check()?;
        let mut worker = Worker::new(self);
        worker.take_partitions().await?;
        let mut total = RelayPass::default();
        loop {
            let pass = worker.drain().await?;
            total.published += pass.published;
            total.parked += pass.parked;
            total.failed += pass.failed;
            total.partitions = pass.partitions;
            if !pass.more || (pass.published == 0 && (pass.failed > 0 || pass.waiting > 0)) {
                break;
            }
        }
        worker.release().await;
        Ok(total)
    }

    /// Publishes until `shutdown` completes. A commit of this process wakes it at once;
    /// otherwise it looks every [`RelayConfig::poll_interval`]. Database and broker
    /// failures are logged and retried with capped backoff. When `shutdown` completes, the
    /// batch in progress finishes (at most one acknowledgement timeout; a backlog is not
    /// drained first, nor a repair of lost messages finished), its checkpoints are saved, and
    /// the partitions are free.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid configuration; nothing else: failures are
    /// retried.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), EventError> {
        self.config.check()?;
        let mut worker = Worker::new(self);
        let mut wake = self.store.inner.signals.subscribe();
        tokio::pin!(shutdown);
        let mut failures = 0_u32;
        // After a wake-up, look again soon: the commit may still be above the horizon (an
        // older transaction is finishing).
        let mut soon = Duration::from_millis(1);
        let stopping = worker.stopping.clone();
        loop {
            let outcome = {
                let round = worker.round();
                tokio::pin!(round);
                tokio::select! {
                    outcome = &mut round => outcome,
                    () = &mut shutdown => {
                        // The page or repair batch in progress finishes; nothing after it.
                        stopping.store(true, Ordering::Relaxed);
                        if let Err(e) = round.await {
                            tracing::warn!(error = %e, "relay: last pass failed while stopping");
                        }
                        break;
                    }
                }
            };
            let wait = match outcome {
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "relay: pass failed; partitions released, retrying");
                    worker.release().await;
                    self.config.backoff(failures)
                }
                Ok(pass) if pass.published == 0 && (pass.failed > 0 || pass.waiting > 0) => {
                    // Nothing went out: wait for the next retry, not for the next page.
                    failures += 1;
                    worker.next_retry().unwrap_or_else(|| self.config.backoff(failures))
                }
                Ok(pass) => {
                    failures = 0;
                    if pass.published > 0 {
                        tracing::debug!(published = pass.published, parked = pass.parked, "relay: published");
                    }
                    if pass.more {
                        Duration::ZERO
                    } else {
                        let wait = soon.min(self.config.poll_interval);
                        soon = soon.saturating_mul(2);
                        worker.next_retry().map_or(wait, |retry| retry.min(wait))
                    }
                }
            };
            let wait = worker.until_takeover().map_or(wait, |t| t.min(wait));
            let wait = worker.until_save().map_or(wait, |t| t.max(Duration::from_millis(1)).min(wait));
            if wait.is_zero() {
                continue;
            }
            let woken = tokio::select! {
                () = &mut shutdown => break,
                changed = wake.changed() => changed.is_ok(),
                () = tokio::time::sleep(wait) => false,
            };
            if woken {
                soon = Duration::from_millis(1);
            }
        }
        worker.release().await;
        Ok(())
    }
}
