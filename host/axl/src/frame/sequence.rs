//! Sequence numbers: how a receiver notices a frame that was dropped or reordered on the way.
//!
//! Every frame that belongs to a request carries `seq`, counted per request on each link (one sender
//! to one receiver): 0, 1, 2, … A stream transport delivers them in order and never needs this; the
//! AXL bridge's shared receive queue drops its oldest message when full, and the check turns that
//! into a failed request with a clear error instead of wrong tokens.

/// A gap or step back in a request's sequence numbers. Fails that one request (the receiver sends an
/// `error` frame with code `sequence` and frees the request); the connection stays up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    /// Frames `expected .. got` never arrived.
    #[error("frame {got} arrived while {expected} was expected: {} frame(s) were dropped", got - expected)]
    Dropped { expected: u64, got: u64 },
    /// A frame from the past arrived (a duplicate, or one overtaken by later frames).
    #[error("frame {got} arrived while {expected} was expected: reordered or duplicated")]
    Reordered { expected: u64, got: u64 },
    /// All 2^64 sequence numbers of the request were used.
    #[error("the request's sequence numbers are exhausted")]
    Exhausted,
}

/// Receiver side: checks that one request's frames on one link arrive as 0, 1, 2, …
///
/// On an error the expected number does not move: the request is failed anyway, and every later
/// frame reports against the same gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceTracker {
    /// The next number expected; `None` once `u64::MAX` was accepted.
    next: Option<u64>,
}

impl SequenceTracker {
    /// A tracker expecting 0.
    pub const fn new() -> Self {
        SequenceTracker { next: Some(0) }
    }

    /// A tracker expecting `first` (a link that starts mid-request, or a run of chunks).
    pub const fn starting_at(first: u64) -> Self {
        SequenceTracker { next: Some(first) }
    }

    /// The number the next frame must carry, `None` if exhausted.
    pub fn expected(&self) -> Option<u64> {
        self.next
    }

    /// Accepts `seq` if it is the expected one and moves on.
    pub fn check(&mut self, seq: u64) -> Result<(), SequenceError> {
        let Some(expected) = self.next else { return Err(SequenceError::Exhausted) };
        if seq > expected {
            return Err(SequenceError::Dropped { expected, got: seq });
        }
        if seq < expected {
            return Err(SequenceError::Reordered { expected, got: seq });
        }
        self.next = expected.checked_add(1);
        Ok(())
    }
}

impl Default for SequenceTracker {
    fn default() -> Self {
        SequenceTracker::new()
    }
}

/// Sender side: hands out one request's sequence numbers on one link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SequenceCounter {
    next: Option<u64>,
}

impl SequenceCounter {
    /// A counter starting at 0.
    pub const fn new() -> Self {
        SequenceCounter { next: Some(0) }
    }

    /// A counter starting at `first` (e.g. after frames sent by [`split_activations`]).
    ///
    /// [`split_activations`]: super::split_activations
    pub const fn starting_at(first: u64) -> Self {
        SequenceCounter { next: Some(first) }
    }

    /// The number the next frame will carry, without taking it.
    pub fn peek(&self) -> Option<u64> {
        self.next
    }

    /// Takes the next number.
    pub fn next_seq(&mut self) -> Result<u64, SequenceError> {
        let seq = self.next.ok_or(SequenceError::Exhausted)?;
        self.next = seq.checked_add(1);
        Ok(seq)
    }
}

impl Default for SequenceCounter {
    fn default() -> Self {
        SequenceCounter::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_frames_pass() {
        let mut t = SequenceTracker::new();
        for seq in 0..100 {
            assert_eq!(t.check(seq), Ok(()));
        }
        assert_eq!(t.expected(), Some(100));
    }

    #[test]
    fn a_gap_is_reported_as_dropped() {
        let mut t = SequenceTracker::new();
        t.check(0).unwrap();
        assert_eq!(t.check(3), Err(SequenceError::Dropped { expected: 1, got: 3 }));
        assert_eq!(
            t.check(3).unwrap_err().to_string(),
            "frame 3 arrived while 1 was expected: 2 frame(s) were dropped"
        );
        // The failure sticks: the tracker still waits for 1.
        assert_eq!(t.expected(), Some(1));
    }

    #[test]
    fn a_step_back_is_reported_as_reordered() {
        let mut t = SequenceTracker::new();
        t.check(0).unwrap();
        t.check(1).unwrap();
        assert_eq!(t.check(1), Err(SequenceError::Reordered { expected: 2, got: 1 }));
        assert_eq!(t.check(0), Err(SequenceError::Reordered { expected: 2, got: 0 }));
    }

    #[test]
    fn the_first_frame_must_be_zero() {
        assert_eq!(SequenceTracker::new().check(1), Err(SequenceError::Dropped { expected: 0, got: 1 }));
        assert_eq!(SequenceTracker::default(), SequenceTracker::new());
        assert_eq!(SequenceCounter::default().peek(), Some(0));
    }

    #[test]
    fn exhaustion_is_an_error_not_a_wrap() {
        let mut t = SequenceTracker { next: Some(u64::MAX) };
        assert_eq!(t.check(u64::MAX), Ok(()));
        assert_eq!(t.check(0), Err(SequenceError::Exhausted));
        let mut c = SequenceCounter::starting_at(u64::MAX);
        assert_eq!(c.next_seq(), Ok(u64::MAX));
        assert_eq!(c.next_seq(), Err(SequenceError::Exhausted));
    }

    #[test]
    fn counter_and_tracker_agree() {
        let mut c = SequenceCounter::new();
        let mut t = SequenceTracker::new();
        for _ in 0..10 {
            t.check(c.next_seq().unwrap()).unwrap();
        }
        assert_eq!(c.peek(), t.expected());
    }
}
