//! A relay's tenure and timing: what it holds (idle, or a lease with the partitions it
//! locked and their ledger), when it takes more, when its checkpoints are due, when it lets
//! them go. What it does with the partitions it holds is `holding.rs`.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::EventError;
use crate::delivery::relay::holding::Holding;
use crate::delivery::relay::ledger::Ledger;
use crate::delivery::relay::{LogRelay, RelayConfig, RelayPass};
use crate::store::Partition;

/// How often a relay sets the publisher lag gauges (a count of the pending events).
const LAG_EVERY: Duration = Duration::from_secs(10);

/// What a relay holds.
enum Tenure {
    /// Nothing: no lease.
    Idle,
    /// A lease, and the partitions it locked with their ledger (none yet for a standby).
    Leased(Box<Holding>),
}

/// A relay while it runs.
pub(super) struct Worker<'a> {
    relay: &'a LogRelay,
    tenure: Tenure,
    last_takeover: Option<Instant>,
    /// When the lag gauges were last set.
    last_lag: Option<Instant>,
    /// Set when the relay is asked to stop: a drain stops after the page in progress, a
    /// repair after the batch in progress.
    pub(super) stopping: Arc<AtomicBool>,
}

impl<'a> Worker<'a> {
    pub(super) fn new(relay: &'a LogRelay) -> Self {
        Self { relay, tenure: Tenure::Idle, last_takeover: None, last_lag: None, stopping: Arc::default() }
    }

    fn config(&self) -> &RelayConfig {
        &self.relay.config
    }

    fn holding(&self) -> Option<&Holding> {
        match &self.tenure {
            Tenure::Idle => None,
            Tenure::Leased(holding) => Some(holding),
        }
    }

    /// Takes free partitions when due, publishes, and saves checkpoints left unsaved once
    /// their interval has passed.
    pub(super) async fn round(&mut self) -> Result<RelayPass, EventError> {
        if self.until_takeover().is_some_and(|t| t.is_zero()) {
            self.take_partitions().await?;
        }
        let pass = self.drain().await?;
        if self.until_save().is_some_and(|t| t.is_zero())
            && let Tenure::Leased(holding) = &mut self.tenure
        {
            holding.flush().await?;
        }
        if self.last_lag.is_none_or(|at| at.elapsed() >= LAG_EVERY) {
            self.last_lag = Some(Instant::now());
            // Sets the lag gauges; a failure here is the next round's to report.
            if let Err(e) = self.relay.store.relay_lag().await {
                tracing::debug!(error = %e, "relay: cannot read the lag");
            }
        }
        Ok(pass)
    }

    /// Publishes the held partitions' events below the horizon, page by page.
    pub(super) async fn drain(&mut self) -> Result<RelayPass, EventError> {
        match &mut self.tenure {
            Tenure::Idle => Ok(RelayPass::default()),
            Tenure::Leased(holding) => holding.drain(self.relay, &self.stopping).await,
        }
    }

    /// How long until the checkpoints published since the last save are due; `None` when
    /// there are none.
    pub(super) fn until_save(&self) -> Option<Duration> {
        let interval = self.config().checkpoint_interval;
        self.holding().and_then(|h| h.ledger.until_save(Instant::now(), interval))
    }

    /// How long until the relay next tries to take partitions; `None` when it holds all
    /// it may.
    pub(super) fn until_takeover(&self) -> Option<Duration> {
        let held = self.holding().map_or(0, |h| h.ledger.len());
        if held == self.config().partitions.len() {
            return None;
        }
        Some(match self.last_takeover {
            None => Duration::ZERO,
            Some(at) => self.config().takeover_interval.saturating_sub(at.elapsed()),
        })
    }

    /// How long until the next failed event may be retried.
    pub(super) fn next_retry(&self) -> Option<Duration> {
        self.holding().and_then(|h| h.ledger.next_retry(Instant::now()))
    }

    /// Takes the free partitions of the configured range (opening a lease when idle).
    pub(super) async fn take_partitions(&mut self) -> Result<(), EventError> {
        self.last_takeover = Some(Instant::now());
        let held = self.holding().map(|h| h.ledger.partitions()).unwrap_or_default();
        let wanted: Vec<Partition> =
            Partition::range(self.config().partitions.clone()).filter(|p| !held.contains(p)).collect();
        if wanted.is_empty() {
            return Ok(());
        }
        if let Tenure::Idle = self.tenure {
            let lease = self.relay.store.inner.backend.lease().await?;
            let failures =
                std::mem::take(&mut *self.relay.failing.lock().unwrap_or_else(PoisonError::into_inner));
            let ledger = Ledger::new(self.config().max_attempts, failures);
            self.tenure = Tenure::Leased(Box::new(Holding::new(lease, ledger)));
        }
        match &mut self.tenure {
            Tenure::Idle => Ok(()),
            Tenure::Leased(holding) => holding.take(self.relay, &wanted).await,
        }
    }

    /// Lets every partition go (closing the lease's session frees its locks), after saving
    /// their checkpoints; the failed events' attempts stay with the relay.
    pub(super) async fn release(&mut self) {
        self.last_takeover = None;
        if let Tenure::Leased(holding) = std::mem::replace(&mut self.tenure, Tenure::Idle) {
            let failures = holding.release().await;
            *self.relay.failing.lock().unwrap_or_else(PoisonError::into_inner) = failures;
        }
    }
}
