//! What this process's relays have done, for its committers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{oneshot, watch};

use crate::store::PARTITIONS;
use crate::store::{Partition, StreamPosition};
/// What this process's relays have done, for its committers: wake-ups after a commit, and
/// the positions published per partition (what a receipt waits for).
pub(crate) struct Signals {
    wake: watch::Sender<u64>,
    /// Per partition: every event up to here was acknowledged or parked; and the receipts
    /// waiting for positions not reached yet.
    done: Mutex<Progress>,
    /// A relay of this process has parked an event.
    parked_any: AtomicBool,
}

impl Default for Signals {
    fn default() -> Self {
        Self {
            wake: watch::Sender::new(0),
            done: Mutex::new(Progress {
                done: vec![StreamPosition::START; PARTITIONS as usize],
                waiting: Vec::new(),
            }),
            parked_any: AtomicBool::new(false),
        }
    }
}

impl Signals {
    /// A receiver that changes whenever events were committed (what relays wait on).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.wake.subscribe()
    }

    /// Wakes this process's relays: events were committed.
    pub(crate) fn wake(&self) {
        self.wake.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Resolves `waiter` once this process's relays have acknowledged or parked every one
    /// of `written` (at once when they have).
    pub(crate) fn notify_when_done(
        &self,
        written: Arc<[(Partition, StreamPosition)]>,
        waiter: oneshot::Sender<()>,
    ) {
        // No code below panics, so a poisoned lock holds sound data.
        let mut progress = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        if progress.covers(&written) {
            let _ = waiter.send(());
        } else {
            progress.waiting.retain(|(_, w)| !w.is_closed());
            progress.waiting.push((written, waiter));
        }
    }

    pub(crate) fn advance(&self, checkpoints: &[(Partition, StreamPosition)], parked: bool) {
        if parked {
            self.parked_any.store(true, Ordering::SeqCst);
        }
        let mut progress = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        for (partition, position) in checkpoints {
            if let Some(slot) = partition.index().and_then(|p| progress.done.get_mut(p)) {
                *slot = (*slot).max(*position);
            }
        }
        // Only the receipts now covered are woken.
        let waiting = std::mem::take(&mut progress.waiting);
        for (written, waiter) in waiting {
            if progress.covers(&written) {
                let _ = waiter.send(());
            } else if !waiter.is_closed() {
                progress.waiting.push((written, waiter));
            }
        }
    }

    /// How far this process's relays have published each partition (indexed by partition):
    /// every event up to its position was acknowledged or parked.
    pub(crate) fn done(&self) -> Vec<StreamPosition> {
        self.done.lock().unwrap_or_else(PoisonError::into_inner).done.clone()
    }

    /// Whether a relay of this process ever parked an event.
    pub(crate) fn parked_any(&self) -> bool {
        self.parked_any.load(Ordering::SeqCst)
    }
}

/// The events a commit wrote: their partitions and stream positions.
pub(crate) type Written = Arc<[(Partition, StreamPosition)]>;

/// What this process's relays published, and who waits for what.
struct Progress {
    done: Vec<StreamPosition>,
    waiting: Vec<(Written, oneshot::Sender<()>)>,
}

impl Progress {
    fn covers(&self, written: &[(Partition, StreamPosition)]) -> bool {
        written
            .iter()
            .all(|(partition, position)| partition.index().and_then(|p| self.done.get(p)) >= Some(position))
    }
}
