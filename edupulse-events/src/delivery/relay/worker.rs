//! A relay's tenure and timing: what it holds (idle, or a lease with the partitions it
//! locked and their ledger), when it takes more, when its checkpoints are due, when it lets
//! them go. What it does with the partitions it holds is `holding.rs`.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use crate::EventError;
use crate::delivery::relay::config::RelayConfig;
use crate::delivery::relay::holding::Holding;
use crate::delivery::relay::ledger::Ledger;
use crate::delivery::relay::parts::Parts;
use crate::delivery::relay::pass::RelayPass;
use crate::store::Partition;

/// How soon a relay looks again after a wake-up.
const SOON: Duration = Duration::from_millis(1);

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
    relay: &'a Parts,
    tenure: Tenure,
    last_takeover: Option<Instant>,
    /// When the lag gauges were last set.
    last_lag: Option<Instant>,
    /// Set when the relay is asked to stop: a drain stops after the page in progress, a
    /// repair after the batch in progress.
    pub(super) stopping: Arc<AtomicBool>,
    /// Rounds in a row that failed or sent nothing while something waited: the backoff.
    failures: u32,
    /// How soon to look again after a round that found nothing: from 1 ms after a wake-up
    /// (the commit may still be above the horizon, an older transaction finishing), doubled
    /// up to the poll interval.
    soon: Duration,
}

impl<'a> Worker<'a> {
    pub(super) fn new(relay: &'a Parts) -> Self {
        Self {
            relay,
            tenure: Tenure::Idle,
            last_takeover: None,
            last_lag: None,
            stopping: Arc::default(),
            failures: 0,
            soon: SOON,
        }
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

    /// How long to wait after a round (zero: start the next at once): the backoff after a
    /// failure (the partitions are let go) or a round that sent nothing while something
    /// waited; at once while pages are full; else soon, capped by the poll interval, the
    /// next retry, the next takeover and the next save.
    pub(super) async fn pause_after(&mut self, outcome: Result<RelayPass, EventError>) -> Duration {
        let wait = match outcome {
            Err(e) => {
                self.failures += 1;
                tracing::warn!(error = %e, "relay: pass failed; partitions released, retrying");
                self.release().await;
                self.config().backoff(self.failures)
            }
            Ok(pass) if pass.published == 0 && (pass.failed > 0 || pass.waiting > 0) => {
                // Nothing went out: wait for the next retry, not for the next page.
                self.failures += 1;
                self.next_retry().unwrap_or_else(|| self.config().backoff(self.failures))
            }
            Ok(pass) => {
                self.failures = 0;
                if pass.published > 0 {
                    tracing::debug!(published = pass.published, parked = pass.parked, "relay: published");
                }
                if pass.more {
                    return Duration::ZERO;
                }
                let wait = self.soon.min(self.config().poll_interval);
                self.soon = self.soon.saturating_mul(2);
                self.next_retry().map_or(wait, |retry| retry.min(wait))
            }
        };
        let wait = self.until_takeover().map_or(wait, |t| t.min(wait));
        self.until_save().map_or(wait, |t| t.max(Duration::from_millis(1)).min(wait))
    }

    /// Commits of this process woke the relay: look again soon.
    pub(super) fn woken(&mut self) {
        self.soon = SOON;
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
