//! Ordered concurrency for a subscriber: one lane per aggregate. A lane's messages are
//! handled one after the other in stream order (a redelivery that arrives after a later
//! message of its lane goes before it); different lanes run at once, up to a limit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

/// A message held by the lanes, known by its key (its aggregate) and its stream sequence.
pub(crate) trait Held {
    /// What names a lane.
    type Key: Hash + Eq + Clone;
    /// The lane: messages with the same key are handled in order.
    fn key(&self) -> &Self::Key;
    /// The stream sequence, to recognise a redelivery of a message already held.
    fn sequence(&self) -> u64;
}

/// One aggregate's messages: the one being handled, and those waiting behind it.
struct Lane<M> {
    current: Option<Arc<M>>,
    waiting: VecDeque<Arc<M>>,
}

/// The lanes of a subscriber.
pub(crate) struct Lanes<M: Held> {
    lanes: HashMap<M::Key, Lane<M>>,
    /// Lanes whose first waiting message may start, in the order they became ready.
    ready: VecDeque<M::Key>,
    /// Stream sequences held (current or waiting): a redelivery of one is dropped.
    sequences: HashSet<u64>,
    running: usize,
    limit: usize,
}

impl<M: Held> Lanes<M> {
    /// Lanes running at most `limit` messages at once.
    pub(crate) fn new(limit: usize) -> Self {
        Self { lanes: HashMap::new(), ready: VecDeque::new(), sequences: HashSet::new(), running: 0, limit }
    }

    /// Messages held: being handled or waiting.
    pub(crate) fn held(&self) -> usize {
        self.sequences.len()
    }

    /// Messages being handled.
    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.running
    }

    /// Takes a message in, behind its lane's earlier ones and before its later ones that
    /// are waiting (a redelivery may arrive after them). A message already held (the server
    /// redelivered it meanwhile) is returned: the held copy settles it.
    pub(crate) fn push(&mut self, message: M) -> Option<M> {
        if !self.sequences.insert(message.sequence()) {
            return Some(message);
        }
        let key = message.key().clone();
        let lane =
            self.lanes.entry(key.clone()).or_insert_with(|| Lane { current: None, waiting: VecDeque::new() });
        if lane.current.is_none() && lane.waiting.is_empty() {
            self.ready.push_back(key);
        }
        let sequence = message.sequence();
        let at = lane.waiting.iter().rposition(|held| held.sequence() < sequence).map_or(0, |i| i + 1);
        lane.waiting.insert(at, Arc::new(message));
        None
    }

    /// The next message to handle, when the limit allows one more.
    pub(crate) fn start(&mut self) -> Option<Arc<M>> {
        while self.running < self.limit {
            let key = self.ready.pop_front()?;
            let Some(lane) = self.lanes.get_mut(&key) else { continue };
            let Some(message) = lane.waiting.pop_front() else { continue };
            lane.current = Some(message.clone());
            self.running += 1;
            return Some(message);
        }
        None
    }

    /// The message of lane `key` is settled: the lane's next may start.
    pub(crate) fn finish(&mut self, key: &M::Key) {
        let Some(lane) = self.lanes.get_mut(key) else { return };
        if let Some(done) = lane.current.take() {
            self.sequences.remove(&done.sequence());
            self.running = self.running.saturating_sub(1);
        }
        if lane.waiting.is_empty() {
            self.lanes.remove(key);
        } else {
            self.ready.push_back(key.clone());
        }
    }

    /// Every message held, being handled or waiting.
    pub(crate) fn all(&self) -> impl Iterator<Item = &Arc<M>> {
        self.lanes.values().flat_map(|lane| lane.current.iter().chain(lane.waiting.iter()))
    }

    /// Takes the waiting messages out, each lane's in order (for shutdown: they go back to
    /// the server, so that it redelivers each lane's first before its later ones).
    pub(crate) fn take_waiting(&mut self) -> Vec<Arc<M>> {
        let mut out = Vec::new();
        for lane in self.lanes.values_mut() {
            for message in lane.waiting.drain(..) {
                self.sequences.remove(&message.sequence());
                out.push(message);
            }
        }
        self.ready.clear();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Msg(&'static str, u64);

    impl Held for Msg {
        type Key = &'static str;
        fn key(&self) -> &&'static str {
            &self.0
        }
        fn sequence(&self) -> u64 {
            self.1
        }
    }

    fn started(lanes: &mut Lanes<Msg>) -> Vec<u64> {
        std::iter::from_fn(|| lanes.start()).map(|m| m.1).collect()
    }

    #[test]
    fn one_message_per_lane_in_order_up_to_the_limit() {
        let mut lanes = Lanes::new(2);
        for (key, seq) in [("a", 1), ("a", 2), ("b", 3), ("c", 4), ("b", 5)] {
            assert!(lanes.push(Msg(key, seq)).is_none());
        }
        // a1 and b3 start; c4 waits for the limit, a2 and b5 for their lanes.
        assert_eq!(started(&mut lanes), [1, 3]);
        assert_eq!((lanes.running(), lanes.held()), (2, 5));
        lanes.finish(&"a");
        assert_eq!(started(&mut lanes), [4]);
        lanes.finish(&"c");
        assert_eq!(started(&mut lanes), [2]);
        lanes.finish(&"b");
        assert_eq!(started(&mut lanes), [5]);
        lanes.finish(&"a");
        lanes.finish(&"b");
        assert_eq!((lanes.running(), lanes.held()), (0, 0));
        assert!(lanes.start().is_none());
    }

    #[test]
    fn a_redelivery_of_a_held_message_is_handed_back() {
        let mut lanes = Lanes::new(4);
        assert!(lanes.push(Msg("a", 1)).is_none());
        assert_eq!(lanes.push(Msg("a", 1)), Some(Msg("a", 1)));
        assert_eq!(started(&mut lanes), [1]);
        assert_eq!(lanes.push(Msg("a", 1)), Some(Msg("a", 1)));
        lanes.finish(&"a");
        assert!(lanes.push(Msg("a", 1)).is_none(), "settled: a new delivery is taken");
    }

    #[test]
    fn a_late_redelivery_goes_before_the_later_messages_of_its_lane() {
        let mut lanes = Lanes::new(4);
        for (key, seq) in [("a", 5), ("a", 7), ("b", 6), ("a", 3), ("a", 4)] {
            assert!(lanes.push(Msg(key, seq)).is_none());
        }
        let mut order = Vec::new();
        while let Some(message) = lanes.start() {
            order.push((message.0, message.1));
            lanes.finish(&message.0);
        }
        assert_eq!(order, [("a", 3), ("b", 6), ("a", 4), ("a", 5), ("a", 7)]);
    }

    #[test]
    fn shutdown_takes_the_waiting_in_lane_order() {
        let mut lanes = Lanes::new(1);
        for (key, seq) in [("a", 1), ("a", 2), ("a", 3), ("b", 4)] {
            lanes.push(Msg(key, seq));
        }
        assert_eq!(started(&mut lanes), [1]);
        let mut waiting: Vec<(&str, u64)> = lanes.take_waiting().iter().map(|m| (m.0, m.1)).collect();
        waiting.sort_by_key(|(key, _)| *key);
        assert_eq!(waiting, [("a", 2), ("a", 3), ("b", 4)]);
        assert_eq!(lanes.all().count(), 1, "the running one is still held");
        lanes.finish(&"a");
        assert_eq!(lanes.held(), 0);
    }
}
