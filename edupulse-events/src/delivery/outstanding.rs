//! What a bus committed and no relay of its process has reported published yet: what
//! [`EventBus::close`](crate::EventBus::close) waits for, and what a bus dropped without
//! closing warns about.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};

use crate::store::signals::Signals;
use crate::store::{Partition, StreamPosition};

/// Per partition, the positions of the events a bus committed that its process's relays
/// have not yet published (acknowledged or parked). Pruned from the relays' progress at
/// every commit, so it holds what is in flight, not the bus's history.
#[derive(Default)]
pub(crate) struct Outstanding {
    by_partition: Mutex<HashMap<Partition, BTreeSet<StreamPosition>>>,
}

impl Outstanding {
    /// Adds a commit's events, and forgets what the relays have published since.
    pub(crate) fn add(&self, written: &[(Partition, StreamPosition)], signals: &Signals) {
        // No code below panics, so a poisoned lock holds sound data.
        let mut by_partition = self.by_partition.lock().unwrap_or_else(PoisonError::into_inner);
        for (partition, position) in written {
            by_partition.entry(*partition).or_default().insert(*position);
        }
        prune(&mut by_partition, signals);
    }

    /// What is still unpublished, by the relays' progress in this process.
    pub(crate) fn current(&self, signals: &Signals) -> Vec<(Partition, StreamPosition)> {
        let mut by_partition = self.by_partition.lock().unwrap_or_else(PoisonError::into_inner);
        prune(&mut by_partition, signals);
        by_partition
            .iter()
            .flat_map(|(partition, positions)| positions.iter().map(move |position| (*partition, *position)))
            .collect()
    }

    /// Forgets everything: what is left is reported, and is the next relay's.
    pub(crate) fn clear(&self) {
        self.by_partition.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }
}

/// Drops the positions at or below each partition's published position.
fn prune(by_partition: &mut HashMap<Partition, BTreeSet<StreamPosition>>, signals: &Signals) {
    if by_partition.is_empty() {
        return;
    }
    // One look at the relays' progress for every partition, not one lock per partition.
    let published = signals.done();
    by_partition.retain(|partition, positions| {
        let done = partition.index().and_then(|p| published.get(p)).copied().unwrap_or(StreamPosition::START);
        // The least position after `done` in (transaction, position) order: `split_off`
        // keeps it and everything above.
        let after = StreamPosition { global_position: done.global_position.saturating_add(1), ..done };
        *positions = positions.split_off(&after);
        !positions.is_empty()
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(number: i32) -> Partition {
        Partition::new(number)
    }

    fn at(transaction_id: i64, global_position: i64) -> StreamPosition {
        StreamPosition { transaction_id, global_position }
    }

    #[test]
    fn what_the_relays_published_is_forgotten() {
        let signals = Signals::default();
        let outstanding = Outstanding::default();
        outstanding.add(&[(p(3), at(10, 1)), (p(3), at(10, 2)), (p(5), at(11, 3))], &signals);
        assert_eq!(outstanding.current(&signals).len(), 3);
        signals.advance(&[(p(3), at(10, 1))], false);
        let mut left = outstanding.current(&signals);
        left.sort();
        assert_eq!(left, [(p(3), at(10, 2)), (p(5), at(11, 3))]);
        // A later commit lower in (transaction, position) order than a published one.
        signals.advance(&[(p(5), at(12, 9))], false);
        outstanding.add(&[(p(5), at(11, 4))], &signals);
        assert_eq!(outstanding.current(&signals), [(p(3), at(10, 2))]);
        outstanding.clear();
        assert!(outstanding.current(&signals).is_empty());
    }
}
