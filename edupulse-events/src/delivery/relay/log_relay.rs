//! The relay's public face: [`LogRelay`] and its runs.

use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;

use crate::EventError;
use crate::broker::Publisher;
use crate::delivery::relay::config::RelayConfig;
use crate::delivery::relay::parts::Parts;
use crate::delivery::relay::pass::RelayPass;
use crate::delivery::relay::worker::Worker;
use crate::delivery::republish::{self, Republished};
use crate::store::{EventStore, RelayLag};

/// Publishes the store's log to the broker: see the module docs. Runs as a background task
/// of the [`EventBus`](crate::EventBus) by default, or on its own (a process that only
/// publishes); any number of relays share the partitions.
pub struct LogRelay {
    parts: Parts,
}

impl std::fmt::Debug for LogRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Parts { store, config, .. } = &self.parts;
        f.debug_struct("LogRelay").field("store", store).field("config", config).finish()
    }
}

impl LogRelay {
    /// A relay publishing `store`'s log through `publisher`.
    pub fn new(store: EventStore, publisher: Arc<dyn Publisher>, config: RelayConfig) -> Self {
        Self { parts: Parts { store, publisher, config, failing: Mutex::default() } }
    }

    /// How far publication is behind; see [`EventStore::relay_lag`].
    ///
    /// # Errors
    /// [`EventError::Database`].
    pub async fn lag(&self) -> Result<RelayLag, EventError> {
        self.parts.store.relay_lag().await
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
        self.parts.config.check()?;
        let batch = usize::try_from(self.parts.config.batch_size).unwrap_or(usize::MAX);
        republish::republish(&self.parts.store, &*self.parts.publisher, from, to, batch).await
    }

    /// Takes the free partitions, publishes everything below the horizon, and lets the
    /// partitions go. For tools and tests; [`run`](Self::run) keeps going.
    ///
    /// # Errors
    /// [`EventError::Config`] for an invalid configuration; [`EventError::Database`].
    /// Broker failures are not errors here but [`RelayPass::failed`].
    pub async fn run_once(&self) -> Result<RelayPass, EventError> {
        self.parts.config.check()?;
        let mut worker = Worker::new(&self.parts);
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
        self.parts.config.check()?;
        let mut worker = Worker::new(&self.parts);
        let mut wake = self.parts.store.inner.signals.subscribe();
        tokio::pin!(shutdown);
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
            let wait = worker.pause_after(outcome).await;
            if wait.is_zero() {
                continue;
            }
            let woken = tokio::select! {
                () = &mut shutdown => break,
                changed = wake.changed() => changed.is_ok(),
                () = tokio::time::sleep(wait) => false,
            };
            if woken {
                worker.woken();
            }
        }
        worker.release().await;
        Ok(())
    }
}
