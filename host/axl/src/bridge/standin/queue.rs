//! One stand-in node's receive queue: the daemon's drop-oldest queue plus the fault knobs tests use.

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;

use crate::bridge::peer_id::AxlPeerId;

/// A message waiting in a queue: the sender as `/recv` will report it, and the raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueuedMessage {
    pub(crate) from: AxlPeerId,
    pub(crate) body: Bytes,
}

/// The daemon's receive queue (`receivedQueue` in api/recv.go): first in, first out; a push onto a
/// full queue evicts the oldest message. Arrivals are numbered 0, 1, 2, … so tests can make a given
/// message vanish or swap places with the next.
#[derive(Debug)]
pub(crate) struct StandinQueue {
    items: VecDeque<QueuedMessage>,
    capacity: usize,
    overflow_drops: u64,
    arrivals: u64,
    drop_arrivals: BTreeSet<u64>,
    reorder_arrivals: BTreeSet<u64>,
    held: Option<QueuedMessage>,
}

impl StandinQueue {
    /// An empty queue of `capacity` slots (at least 1: the daemon's own queue would panic at 0).
    pub(crate) fn new(capacity: usize) -> Self {
        StandinQueue {
            items: VecDeque::new(),
            capacity: capacity.max(1),
            overflow_drops: 0,
            arrivals: 0,
            drop_arrivals: BTreeSet::new(),
            reorder_arrivals: BTreeSet::new(),
            held: None,
        }
    }

    /// A message arrives from the network: the knobs apply, then it is queued.
    pub(crate) fn arrive(&mut self, message: QueuedMessage) {
        let index = self.arrivals;
        self.arrivals += 1;
        if self.drop_arrivals.remove(&index) {
            return;
        }
        if self.reorder_arrivals.remove(&index) {
            if let Some(earlier) = self.held.replace(message) {
                self.push(earlier);
            }
            return;
        }
        self.push(message);
        if let Some(held) = self.held.take() {
            self.push(held);
        }
    }

    /// The oldest message, if any.
    pub(crate) fn pop(&mut self) -> Option<QueuedMessage> {
        self.items.pop_front()
    }

    /// Changes the capacity (at least 1); a queue now over it loses its oldest messages.
    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity.max(1);
        while self.items.len() > self.capacity {
            self.items.pop_front();
            self.overflow_drops += 1;
        }
    }

    /// The arrival numbered `index` will vanish.
    pub(crate) fn drop_arrival(&mut self, index: u64) {
        self.drop_arrivals.insert(index);
    }

    /// The arrival numbered `index` will be held back and queued right after the next arrival.
    pub(crate) fn reorder_arrival(&mut self, index: u64) {
        self.reorder_arrivals.insert(index);
    }

    /// Messages waiting (not counting one held back for reordering).
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Messages that arrived so far, dropped and held ones included.
    pub(crate) fn arrivals(&self) -> u64 {
        self.arrivals
    }

    /// Messages evicted because the queue was full.
    pub(crate) fn overflow_drops(&self) -> u64 {
        self.overflow_drops
    }

    fn push(&mut self, message: QueuedMessage) {
        if self.items.len() >= self.capacity {
            self.items.pop_front();
            self.overflow_drops += 1;
        }
        self.items.push_back(message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u8) -> QueuedMessage {
        QueuedMessage { from: AxlPeerId::from_bytes([1; 32]), body: Bytes::from(vec![n]) }
    }

    fn drain(queue: &mut StandinQueue) -> Vec<u8> {
        std::iter::from_fn(|| queue.pop()).map(|m| m.body[0]).collect()
    }

    #[test]
    fn a_full_queue_drops_its_oldest_message() {
        let mut queue = StandinQueue::new(100);
        for n in 0..=100 {
            queue.arrive(message(n));
        }
        assert_eq!(queue.len(), 100);
        assert_eq!(queue.overflow_drops(), 1);
        let bodies = drain(&mut queue);
        assert_eq!(bodies, (1..=100).collect::<Vec<u8>>());
        assert_eq!(queue.pop(), None);
    }

    #[test]
    fn knobs_drop_and_swap_given_arrivals() {
        let mut queue = StandinQueue::new(10);
        queue.drop_arrival(1);
        queue.reorder_arrival(3);
        for n in 0..6 {
            queue.arrive(message(n));
        }
        assert_eq!(drain(&mut queue), vec![0, 2, 4, 3, 5]);
        assert_eq!(queue.arrivals(), 6);
        assert_eq!(queue.overflow_drops(), 0);
    }

    #[test]
    fn consecutive_reorders_rotate_and_capacity_shrinks_from_the_front() {
        let mut queue = StandinQueue::new(0);
        queue.arrive(message(9));
        queue.arrive(message(8));
        assert_eq!(drain(&mut queue), vec![8], "capacity 0 is taken as 1");
        queue.set_capacity(10);
        queue.reorder_arrival(2);
        queue.reorder_arrival(3);
        for n in 2..5 {
            queue.arrive(message(n));
        }
        assert_eq!(drain(&mut queue), vec![2, 4, 3]);
        for n in 0..5 {
            queue.arrive(message(n));
        }
        queue.set_capacity(2);
        assert_eq!(drain(&mut queue), vec![3, 4]);
    }
}
