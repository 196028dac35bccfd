//! The inbox's ordering check: for every (sender, request) pair, frames must arrive as seq 0, 1, 2, …
//! (docs/PROTOCOL.md §6). Pure and synchronous, so every rule is tested without a daemon.
//!
//! A request on a link is in one of three states:
//!
//! - **active**: a [`SequenceTracker`] waits for the next seq; in-order frames are delivered.
//! - **failed**: a gap or step back was reported once; later frames are discarded (not reported
//!   again) until the request's `end` or `error` frame, which is still delivered.
//!
//! An `end` is delivered whatever its seq; when its seq shows frames missing before it, the gap is
//! reported first (a frame lost in the token loop stalls its request, and the `end` its entry sends
//! on giving up is the first frame after the gap).
//! - **closed**: ended (`end`/`error`), refused, forgotten, or its sender sent `unload`; its tracking
//!   state is freed and a bounded memory of closed requests discards late frames, so a frame that
//!   overtook nothing but arrives after the end does not start a new, bogus tracker. Only a `start`
//!   opens a closed request again, as new (the request starts over on this link: a failover back
//!   through the same pair of workers, or a request id used again).

use std::collections::{HashMap, HashSet, VecDeque};

use crate::frame::{ControlHeader, Frame, FrameHeader, RequestId, SequenceError, SequenceTracker};

use super::error::InboxError;
use super::peer_id::AxlPeerId;

/// What to do with one received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// In order (or an `end`/`error`/`unload`, which are always passed on): hand it to the worker.
    Deliver,
    /// The request fails: report this instead of the frame.
    Reject(InboxError),
    /// Drop it quietly: its request already failed or is over. The reason is for the debug log.
    Discard(&'static str),
    /// An `end` whose seq shows that frames of its request before it never arrived: report this, then
    /// hand the `end` on. A lost frame in a pipeline's token loop stalls its request (nothing follows
    /// it to show the gap), so the `end` its entry sends when it gives up is what reveals the loss.
    DeliverAfterGap(InboxError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestState {
    Active(SequenceTracker),
    Failed,
}

type Link = (AxlPeerId, RequestId);

/// Sequence state of every request the inbox sees, keyed by (sender as reported, request id).
#[derive(Debug)]
pub(crate) struct SequenceGate {
    max_tracked: usize,
    closed_memory: usize,
    requests: HashMap<Link, RequestState>,
    closed_order: VecDeque<Link>,
    closed: HashSet<Link>,
}

impl SequenceGate {
    /// A gate tracking at most `max_tracked` requests at once and remembering the last
    /// `closed_memory` closed ones.
    pub(crate) fn new(max_tracked: usize, closed_memory: usize) -> Self {
        SequenceGate {
            max_tracked,
            closed_memory,
            requests: HashMap::new(),
            closed_order: VecDeque::new(),
            closed: HashSet::new(),
        }
    }

    /// Requests tracked now (active or failed, not closed).
    pub(crate) fn tracked(&self) -> usize {
        self.requests.len()
    }

    /// Decides on one frame from `from`.
    pub(crate) fn admit(&mut self, from: &AxlPeerId, frame: &Frame) -> Verdict {
        let (Some(request), Some(seq)) = (frame.header.request(), frame.header.seq()) else {
            // `unload`: the sender's pipeline is going away, so are all its requests.
            self.close_peer(from);
            return Verdict::Deliver;
        };
        let link = (*from, request.clone());
        if self.closed.contains(&link) {
            if !matches!(frame.header, FrameHeader::Control(ControlHeader::Start { .. })) {
                return Verdict::Discard("its request is already over");
            }
            // The request starts again on this link: a failover whose new route passes this pair again
            // (the old route's `end` closed it here), or a client using the id again after the request
            // ended. (The one other way here, an old start that the network put behind its own `end`,
            // opens a request that nothing follows, as a sender that never ends one would: the shard
            // frees its cache at the idle timeout, and `max_tracked` bounds such trackers.)
            self.reopen(&link);
        }
        if matches!(frame.header, FrameHeader::Control(ControlHeader::End { .. } | ControlHeader::Error { .. })) {
            // An end or error ends the request whatever its seq; a gap before it is only worth a log
            // line (docs/PROTOCOL.md §6).
            let expected = match self.requests.remove(&link) {
                Some(RequestState::Active(tracker)) => tracker.expected(),
                Some(RequestState::Failed) => None,
                None => Some(0),
            };
            self.remember_closed(link);
            return match expected.filter(|&expected| expected != seq) {
                Some(expected) if matches!(frame.header, FrameHeader::Control(ControlHeader::End { .. })) => {
                    let error = if seq > expected {
                        SequenceError::Dropped { expected, got: seq }
                    } else {
                        SequenceError::Reordered { expected, got: seq }
                    };
                    Verdict::DeliverAfterGap(InboxError::Sequence { from: *from, request: request.clone(), error })
                }
                Some(expected) => {
                    // An `error` after a gap: the request is failing anyway.
                    tracing::debug!(peer = %from.short(), %request, seq, expected, "request failed after a gap in its frames");
                    Verdict::Deliver
                }
                None => Verdict::Deliver,
            };
        }
        if let Some(state) = self.requests.get_mut(&link) {
            return match state {
                RequestState::Failed => Verdict::Discard("its request already failed"),
                RequestState::Active(tracker) => match tracker.check(seq) {
                    Ok(()) => Verdict::Deliver,
                    Err(error) => {
                        *state = RequestState::Failed;
                        Verdict::Reject(InboxError::Sequence { from: *from, request: request.clone(), error })
                    }
                },
            };
        }
        if self.requests.len() >= self.max_tracked {
            self.remember_closed(link);
            let (from, request) = (*from, request.clone());
            return Verdict::Reject(InboxError::TooManyRequests { from, request, limit: self.max_tracked });
        }
        let mut tracker = SequenceTracker::new();
        match tracker.check(seq) {
            Ok(()) => {
                self.requests.insert(link, RequestState::Active(tracker));
                Verdict::Deliver
            }
            Err(error) => {
                self.requests.insert(link, RequestState::Failed);
                Verdict::Reject(InboxError::Sequence { from: *from, request: request.clone(), error })
            }
        }
    }

    /// Fails every active request from `from` (a message from it could not be decoded, so any of
    /// them may have lost a frame); returns them in id order. Already failed ones are not repeated.
    pub(crate) fn fail_peer(&mut self, from: &AxlPeerId) -> Vec<RequestId> {
        let mut failed: Vec<RequestId> = self
            .requests
            .iter_mut()
            .filter(|((peer, _), state)| peer == from && matches!(state, RequestState::Active(_)))
            .map(|((_, request), state)| {
                *state = RequestState::Failed;
                request.clone()
            })
            .collect();
        failed.sort();
        failed
    }

    /// Closes one request: frees its state and discards its later frames. True if it was tracked.
    pub(crate) fn forget(&mut self, from: &AxlPeerId, request: &RequestId) -> bool {
        let link = (*from, request.clone());
        let was_tracked = self.requests.remove(&link).is_some();
        self.remember_closed(link);
        was_tracked
    }

    /// The request from `from` starts (again) on this link: whatever was tracked or remembered closed
    /// for it goes, and its frames count from 0. For a receiver that knows a request begins before
    /// its first frame says so (an entry, of the frames its exit sends back).
    pub(crate) fn begin(&mut self, from: &AxlPeerId, request: &RequestId) {
        let link = (*from, request.clone());
        self.requests.remove(&link);
        self.reopen(&link);
    }

    /// Takes `link` out of the memory of closed requests.
    fn reopen(&mut self, link: &Link) {
        if self.closed.remove(link) {
            self.closed_order.retain(|closed| closed != link);
        }
    }

    fn close_peer(&mut self, from: &AxlPeerId) {
        let links: Vec<Link> = self.requests.keys().filter(|(peer, _)| peer == from).cloned().collect();
        for link in links {
            self.requests.remove(&link);
            self.remember_closed(link);
        }
    }

    fn remember_closed(&mut self, link: Link) {
        if self.closed_memory == 0 || !self.closed.insert(link.clone()) {
            return;
        }
        self.closed_order.push_back(link);
        while self.closed_order.len() > self.closed_memory {
            if let Some(oldest) = self.closed_order.pop_front() {
                self.closed.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ActivationsHeader, DType, ErrorCode, SamplingHeader, SequenceError, TokenHeader};
    use proptest::prelude::*;

    fn peer(n: u8) -> AxlPeerId {
        AxlPeerId::from_bytes([n; 32])
    }

    fn rid(s: &str) -> RequestId {
        RequestId::new(s).expect("test id is valid")
    }

    fn token(request: &str, seq: u64) -> Frame {
        Frame::token(TokenHeader { request: rid(request), seq, tokens: vec![seq as u32], finish: None })
    }

    fn activations(request: &str, seq: u64) -> Frame {
        let header = ActivationsHeader {
            request: rid(request),
            seq,
            dtype: DType::F32,
            rows: 1,
            hidden: 1,
            start_pos: seq,
            last_chunk: true,
        };
        Frame::activations(header, vec![0; 4])
    }

    fn gate() -> SequenceGate {
        SequenceGate::new(1024, 1024)
    }

    fn start(request: &str, seq: u64) -> Frame {
        let sampling = SamplingHeader { seed: 1, ..SamplingHeader::default() };
        let header = ControlHeader::Start { request: rid(request), seq, sampling, route: None, resumed: None };
        Frame { header: FrameHeader::Control(header), payload: Vec::new() }
    }

    #[test]
    fn in_order_frames_are_delivered_per_request_and_peer() {
        let mut g = gate();
        for seq in 0..5 {
            assert_eq!(g.admit(&peer(1), &activations("a", seq)), Verdict::Deliver);
            assert_eq!(g.admit(&peer(1), &token("b", seq)), Verdict::Deliver);
            // Same request id from another peer is another link with its own count.
            assert_eq!(g.admit(&peer(2), &token("a", seq)), Verdict::Deliver);
        }
        assert_eq!(g.tracked(), 3);
    }

    #[test]
    fn a_gap_fails_that_request_once_and_others_go_on() {
        let mut g = gate();
        assert_eq!(g.admit(&peer(1), &token("a", 0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &token("b", 0)), Verdict::Deliver);
        assert_eq!(
            g.admit(&peer(1), &token("a", 2)),
            Verdict::Reject(InboxError::Sequence {
                from: peer(1),
                request: rid("a"),
                error: SequenceError::Dropped { expected: 1, got: 2 }
            })
        );
        // The late frame 1 and later ones are not delivered, nor reported again.
        assert_eq!(g.admit(&peer(1), &token("a", 1)), Verdict::Discard("its request already failed"));
        assert_eq!(g.admit(&peer(1), &token("a", 3)), Verdict::Discard("its request already failed"));
        assert_eq!(g.admit(&peer(1), &token("b", 1)), Verdict::Deliver);
        // Its end is still delivered, and frees it.
        assert_eq!(g.admit(&peer(1), &Frame::end(rid("a"), 4)), Verdict::Deliver);
        assert_eq!(g.tracked(), 1);
    }

    #[test]
    fn start_is_counted_like_any_frame_of_its_request() {
        let mut g = gate();
        let start = |seq| start("a", seq);
        assert_eq!(g.admit(&peer(1), &start(0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &activations("a", 1)), Verdict::Deliver);
        assert_eq!(g.tracked(), 1);
        // A start that lost the race to the request's first activations is a reordering.
        assert_eq!(g.admit(&peer(1), &activations("b", 1)), rejected_as_dropped("b", 0, 1));
        let mut g = gate();
        assert_eq!(g.admit(&peer(1), &activations("a", 0)), Verdict::Deliver);
        assert!(matches!(g.admit(&peer(1), &start(0)), Verdict::Reject(InboxError::Sequence { .. })));
    }

    /// A failover whose new route passes the same pair of workers again (or a client using an id
    /// again) sends a new `start` for a request this link closed: it opens the request afresh, counted
    /// from 0, while other frames still find it over.
    #[test]
    fn a_start_opens_a_closed_request_again_as_new() {
        let mut g = SequenceGate::new(1024, 4);
        for close in [Frame::end(rid("a"), 2), Frame::error(rid("a"), 2, ErrorCode::Unavailable, "lost")] {
            assert_eq!(g.admit(&peer(1), &start("a", 0)), Verdict::Deliver);
            assert_eq!(g.admit(&peer(1), &activations("a", 1)), Verdict::Deliver);
            assert_eq!(g.admit(&peer(1), &close), Verdict::Deliver);
            assert_eq!(g.tracked(), 0);
            // What the old run still had on its way is discarded.
            assert_eq!(g.admit(&peer(1), &activations("a", 3)), Verdict::Discard("its request is already over"));
        }
        // Its own `unload` closed the sender's requests; a start after it opens one again.
        assert_eq!(g.admit(&peer(1), &start("a", 0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &Frame::unload()), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &activations("a", 1)), Verdict::Discard("its request is already over"));
        assert_eq!(g.admit(&peer(1), &start("a", 0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &activations("a", 1)), Verdict::Deliver);
        // Counted from 0 again: a gap in the new run still fails it.
        assert_eq!(g.admit(&peer(1), &activations("a", 3)), rejected_as_dropped("a", 2, 3));
        // Opened again, it left the memory of closed requests: closing it again records it once, so
        // the memory still holds its other 3 entries' worth of requests.
        assert_eq!(g.admit(&peer(1), &Frame::end(rid("a"), 4)), Verdict::Deliver);
        for other in ["b", "c", "d"] {
            assert_eq!(g.admit(&peer(1), &Frame::end(rid(other), 0)), Verdict::Deliver);
        }
        assert_eq!(g.admit(&peer(1), &activations("a", 5)), Verdict::Discard("its request is already over"));
        assert_eq!(g.closed_order.len(), 4);
    }

    /// An entry's token link: the exit sends no `end`, so the entry forgets the request when it is
    /// over, and begins it again when the same id starts again; a late token of the old run is
    /// discarded in between.
    #[test]
    fn begin_counts_a_request_from_0_again_after_forget_or_mid_run() {
        let mut g = gate();
        g.begin(&peer(1), &rid("a"));
        for seq in 0..3 {
            assert_eq!(g.admit(&peer(1), &token("a", seq)), Verdict::Deliver);
        }
        assert!(g.forget(&peer(1), &rid("a")));
        assert_eq!(g.admit(&peer(1), &token("a", 3)), Verdict::Discard("its request is already over"));
        g.begin(&peer(1), &rid("a"));
        assert_eq!(g.admit(&peer(1), &token("a", 0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &token("a", 1)), Verdict::Deliver);
        // Begun again while tracked (its end never came): counted from 0 too.
        g.begin(&peer(1), &rid("a"));
        assert_eq!(g.admit(&peer(1), &token("a", 0)), Verdict::Deliver);
        assert_eq!(g.tracked(), 1);
        // Other senders' links of the same id are left alone.
        assert_eq!(g.admit(&peer(2), &token("a", 0)), Verdict::Deliver);
        g.begin(&peer(1), &rid("a"));
        assert_eq!(g.admit(&peer(2), &token("a", 2)), rejected_as(peer(2), "a", 1, 2));
    }

    fn rejected_as(from: AxlPeerId, request: &str, expected: u64, got: u64) -> Verdict {
        Verdict::Reject(InboxError::Sequence { from, request: rid(request), error: SequenceError::Dropped { expected, got } })
    }

    fn rejected_as_dropped(request: &str, expected: u64, got: u64) -> Verdict {
        Verdict::Reject(InboxError::Sequence {
            from: peer(1),
            request: rid(request),
            error: SequenceError::Dropped { expected, got },
        })
    }

    #[test]
    fn an_end_after_a_gap_reports_it_then_is_delivered() {
        let mut g = gate();
        for seq in 0..3 {
            assert_eq!(g.admit(&peer(1), &token("a", seq)), Verdict::Deliver);
        }
        // Frame 3 was lost, then the request stalled; its entry gave up and sent `end` as frame 4.
        assert_eq!(
            g.admit(&peer(1), &Frame::end(rid("a"), 4)),
            Verdict::DeliverAfterGap(InboxError::Sequence {
                from: peer(1),
                request: rid("a"),
                error: SequenceError::Dropped { expected: 3, got: 4 }
            })
        );
        assert_eq!(g.tracked(), 0);
        assert_eq!(g.admit(&peer(1), &token("a", 3)), Verdict::Discard("its request is already over"));
        // In order, or after a failure already reported, an end is just delivered; so is an error.
        assert_eq!(g.admit(&peer(1), &token("b", 0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &Frame::end(rid("b"), 1)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &token("c", 0)), Verdict::Deliver);
        assert!(matches!(g.admit(&peer(1), &token("c", 2)), Verdict::Reject(_)));
        assert_eq!(g.admit(&peer(1), &Frame::end(rid("c"), 5)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &token("d", 0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &Frame::error(rid("d"), 3, ErrorCode::Internal, "x")), Verdict::Deliver);
    }

    #[test]
    fn a_step_back_is_reordered() {
        let mut g = gate();
        for seq in 0..3 {
            assert_eq!(g.admit(&peer(1), &token("a", seq)), Verdict::Deliver);
        }
        assert_eq!(
            g.admit(&peer(1), &token("a", 1)),
            Verdict::Reject(InboxError::Sequence {
                from: peer(1),
                request: rid("a"),
                error: SequenceError::Reordered { expected: 3, got: 1 }
            })
        );
    }

    #[test]
    fn a_request_whose_first_frame_was_lost_fails_at_once() {
        let mut g = gate();
        let verdict = g.admit(&peer(1), &token("a", 1));
        assert!(matches!(
            verdict,
            Verdict::Reject(InboxError::Sequence { error: SequenceError::Dropped { expected: 0, got: 1 }, .. })
        ));
        assert_eq!(g.tracked(), 1);
        assert_eq!(g.admit(&peer(1), &token("a", 2)), Verdict::Discard("its request already failed"));
    }

    #[test]
    fn end_and_error_free_the_tracker_and_late_frames_are_discarded() {
        let mut g = gate();
        assert_eq!(g.admit(&peer(1), &token("a", 0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &token("b", 0)), Verdict::Deliver);
        assert_eq!(g.tracked(), 2);
        assert_eq!(g.admit(&peer(1), &Frame::end(rid("a"), 1)), Verdict::Deliver);
        assert_eq!(g.tracked(), 1);
        assert_eq!(g.admit(&peer(1), &Frame::error(rid("b"), 7, ErrorCode::Internal, "boom")), Verdict::Deliver);
        assert_eq!(g.tracked(), 0);
        // A frame that overtook nothing but arrives after the end starts no new tracker.
        assert_eq!(g.admit(&peer(1), &token("a", 1)), Verdict::Discard("its request is already over"));
        assert_eq!(g.admit(&peer(1), &Frame::end(rid("a"), 1)), Verdict::Discard("its request is already over"));
        assert_eq!(g.tracked(), 0);
        // The same id from another peer is unaffected.
        assert_eq!(g.admit(&peer(2), &token("a", 0)), Verdict::Deliver);
    }

    #[test]
    fn unload_closes_every_request_of_its_sender() {
        let mut g = gate();
        g.admit(&peer(1), &token("a", 0));
        g.admit(&peer(1), &token("b", 0));
        g.admit(&peer(2), &token("a", 0));
        assert_eq!(g.admit(&peer(1), &Frame::unload()), Verdict::Deliver);
        assert_eq!(g.tracked(), 1);
        assert_eq!(g.admit(&peer(1), &token("a", 1)), Verdict::Discard("its request is already over"));
        assert_eq!(g.admit(&peer(2), &token("a", 1)), Verdict::Deliver);
    }

    #[test]
    fn an_invalid_message_fails_the_senders_active_requests() {
        let mut g = gate();
        g.admit(&peer(1), &token("b", 0));
        g.admit(&peer(1), &token("a", 0));
        g.admit(&peer(1), &token("c", 5)); // already failed: not reported again
        g.admit(&peer(2), &token("a", 0));
        assert_eq!(g.fail_peer(&peer(1)), vec![rid("a"), rid("b")]);
        assert_eq!(g.admit(&peer(1), &token("a", 1)), Verdict::Discard("its request already failed"));
        assert_eq!(g.admit(&peer(2), &token("a", 1)), Verdict::Deliver);
        assert_eq!(g.fail_peer(&peer(1)), Vec::<RequestId>::new());
    }

    #[test]
    fn tracking_is_bounded() {
        let mut g = SequenceGate::new(2, 16);
        assert_eq!(g.admit(&peer(1), &token("a", 0)), Verdict::Deliver);
        assert_eq!(g.admit(&peer(1), &token("b", 0)), Verdict::Deliver);
        assert_eq!(
            g.admit(&peer(1), &token("c", 0)),
            Verdict::Reject(InboxError::TooManyRequests { from: peer(1), request: rid("c"), limit: 2 })
        );
        assert_eq!(g.admit(&peer(1), &token("c", 1)), Verdict::Discard("its request is already over"));
        assert_eq!(g.tracked(), 2);
        assert!(g.forget(&peer(1), &rid("a")));
        assert!(!g.forget(&peer(1), &rid("a")));
        assert_eq!(g.admit(&peer(1), &token("d", 0)), Verdict::Deliver);
    }

    #[test]
    fn closed_memory_is_bounded() {
        let mut g = SequenceGate::new(16, 2);
        for id in ["a", "b", "c"] {
            g.admit(&peer(1), &Frame::end(rid(id), 0));
        }
        assert_eq!(g.closed.len(), 2);
        assert_eq!(g.closed_order.len(), 2);
        // "a" was forgotten: a late frame of it now starts a tracker again, which reports the gap.
        assert!(matches!(g.admit(&peer(1), &token("a", 1)), Verdict::Reject(_)));
        assert_eq!(g.admit(&peer(1), &token("c", 1)), Verdict::Discard("its request is already over"));
    }

    proptest! {
        /// Whatever the daemon does to a stream of frames (drop, duplicate, reorder), what the gate
        /// delivers for each request is exactly its frames 0, 1, 2, … in order with nothing skipped,
        /// and its state stays bounded.
        #[test]
        fn never_delivers_out_of_order_data(
            events in proptest::collection::vec((0u8..3, 0u8..4, 0u64..6, 0u8..12), 0..200)
        ) {
            let mut g = SequenceGate::new(6, 8);
            let mut delivered: HashMap<(u8, u8), Vec<u64>> = HashMap::new();
            for (p, r, seq, kind) in events {
                let request = format!("r{r}");
                let frame = match kind {
                    0 => Frame::end(rid(&request), seq),
                    1 if seq == 0 => Frame::unload(),
                    _ => token(&request, seq),
                };
                let is_data = kind >= 2 || (kind == 1 && seq != 0);
                match g.admit(&peer(p), &frame) {
                    Verdict::Deliver if is_data => delivered.entry((p, r)).or_default().push(seq),
                    Verdict::Deliver | Verdict::DeliverAfterGap(_) => {}
                    Verdict::Reject(_) | Verdict::Discard(_) => {}
                }
                prop_assert!(g.tracked() <= 6);
                prop_assert!(g.closed.len() <= 8 && g.closed_order.len() == g.closed.len());
            }
            for seqs in delivered.values() {
                // Deliveries of one request restart from 0 only if it was closed and then forgotten
                // by the bounded memory; each run must be 0, 1, 2, …
                let mut expected = 0;
                for &seq in seqs {
                    if seq != expected {
                        prop_assert_eq!(seq, 0, "delivered {:?}", seqs);
                    }
                    expected = seq + 1;
                }
            }
        }
    }
}
