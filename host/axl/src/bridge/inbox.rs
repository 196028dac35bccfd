//! [`AxlInbox`]: a task that polls the daemon's `/recv`, checks each request's frame order and hands
//! frames or per-request failures to a worker through a bounded channel.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::frame::{Frame, RequestId};

use super::client::AxlClient;
use super::error::{BridgeError, InboxError};
use super::gate::{SequenceGate, Verdict};
use super::peer_id::AxlPeerId;

/// One item from an [`AxlInbox`]: an in-order frame with its sender (as `/recv` reports it, see
/// [`AxlPeerId::reported_form`]), or what failed instead.
pub type InboxItem = Result<(AxlPeerId, Frame), InboxError>;

/// How an [`AxlInbox`] polls and what it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxlInboxConfig {
    /// First pause after `/recv` finds the queue empty. Default 500 µs. Each further empty answer
    /// doubles the pause up to [`max_poll_interval`](Self::max_poll_interval); any message resets
    /// it, and a busy queue is drained without pausing.
    pub min_poll_interval: Duration,
    /// Longest pause between polls of an empty queue, and the pause between retries while the
    /// daemon cannot be reached. Default 10 ms: the most latency an idle link adds to its next frame,
    /// for about 100 loopback HTTP calls a second while idle.
    pub max_poll_interval: Duration,
    /// While requests are in flight (tracked), polls of an empty queue stay at
    /// [`min_poll_interval`](Self::min_poll_interval) for this long after the last message or the
    /// last request to begin, instead of backing off: in a running pipeline the next frame is one
    /// step away, and a backed-off poll would add up to `max_poll_interval` to every hop (a 2-shard
    /// SmolLM2 pipeline over stand-in daemons decoded at half the speed). Default 1 s, so a request
    /// abandoned without an `end` stops the fast polling a second later; zero turns it off. Cost:
    /// about one loopback HTTP call per millisecond while a request runs (the runtime's timer rounds
    /// the 500 µs pause up to its 1 ms tick).
    pub busy_window: Duration,
    /// Items the channel holds before the inbox stops polling. Default 32. A worker that falls
    /// behind makes the daemon's 100-slot queue fill and drop its oldest messages, which then show
    /// up as [`InboxError::Sequence`] (never as wrong data). Memory: up to this many frames of up to
    /// `max_frame_len` (16 MiB) each.
    pub channel_capacity: usize,
    /// Requests (per sender) tracked at once; a new one beyond it fails with
    /// [`InboxError::TooManyRequests`]. Default 4096. Bounds memory against a peer that opens
    /// requests without ending them; [`AxlInbox::forget`] frees abandoned ones.
    pub max_tracked_requests: usize,
    /// Ended requests remembered so that their late frames are discarded instead of failing as new
    /// requests with a gap. Default 4096; the oldest is forgotten first.
    pub closed_request_memory: usize,
}

impl Default for AxlInboxConfig {
    fn default() -> Self {
        AxlInboxConfig {
            min_poll_interval: Duration::from_micros(500),
            max_poll_interval: Duration::from_millis(10),
            busy_window: Duration::from_secs(1),
            channel_capacity: 32,
            max_tracked_requests: 4096,
            closed_request_memory: 4096,
        }
    }
}

/// The receiving side of an AXL link, used like a QUIC link's incoming frames: [`recv`](Self::recv)
/// yields in-order frames, or an [`InboxError`] that fails one request (or, for a garbled message,
/// every request in flight with its sender) while everything else continues.
///
/// It owns a polling task, started by [`spawn`](Self::spawn) and stopped when the inbox is dropped
/// or [`close`](Self::close)d. It must be the only consumer of its daemon's `/recv`: the queue is
/// shared, so a second reader would steal frames and cause sequence errors.
///
/// Ordering is checked per (sender, request id) with [`SequenceTracker`](crate::frame::SequenceTracker)
/// semantics (docs/PROTOCOL.md §6):
///
/// - a gap or step back yields one [`InboxError::Sequence`] for that request; its later frames are
///   discarded quietly, and its `end` or `error` frame is still delivered;
/// - an `end` or `error` frame is delivered whatever its seq and frees the request's tracking;
///   frames of it arriving later are discarded; an `end` whose seq shows frames of its request
///   missing (and not yet reported) comes right after an [`InboxError::Sequence`] for it — a frame
///   lost in the token loop stalls its request, and the `end` its entry sends on giving up is the
///   first to show the gap;
/// - `unload` is delivered and closes every request of its sender;
/// - a message that is not a frame yields [`InboxError::InvalidMessage`] listing the sender's
///   requests in flight, which fail.
///
/// ```no_run
/// # async fn demo() -> Result<(), computepool_axl::bridge::BridgeError> {
/// use computepool_axl::bridge::{AxlClient, AxlClientConfig, AxlInbox, AxlInboxConfig};
///
/// let mut inbox = AxlInbox::spawn(AxlClient::new(AxlClientConfig::default())?, AxlInboxConfig::default());
/// while let Some(item) = inbox.recv().await {
///     match item {
///         Ok((from, frame)) => { /* run the layers, forward */ }
///         Err(error) => {
///             // Send an `error` frame with error.error_code() for error.request() (or for each
///             // failed request of an InvalidMessage) towards the entry.
///         }
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AxlInbox {
    items: mpsc::Receiver<InboxItem>,
    gate: Arc<Mutex<SequenceGate>>,
    task: JoinHandle<()>,
}

impl AxlInbox {
    /// Starts polling `client`'s daemon on the current tokio runtime.
    ///
    /// Panics if called outside a tokio runtime. A `channel_capacity` of 0 is taken as 1.
    pub fn spawn(client: AxlClient, config: AxlInboxConfig) -> AxlInbox {
        let (sender, items) = mpsc::channel(config.channel_capacity.max(1));
        let gate = Arc::new(Mutex::new(SequenceGate::new(config.max_tracked_requests, config.closed_request_memory)));
        let task = tokio::spawn(poll_loop(client, Arc::clone(&gate), sender, config));
        AxlInbox { items, gate, task }
    }

    /// The next frame or failure; waits while there is none. `None` only after the polling task
    /// stopped (it does not stop on its own: daemon errors are retried).
    pub async fn recv(&mut self) -> Option<InboxItem> {
        self.items.recv().await
    }

    /// Closes one request from `peer` (as reported by `/recv`): frees its tracking and discards its
    /// later frames. For requests the worker abandons without an `end` (an idle timeout). True if it
    /// was tracked.
    pub fn forget(&self, peer: &AxlPeerId, request: &RequestId) -> bool {
        self.requests().forget(peer, request)
    }

    /// A handle on the per-request ordering state, for code that knows when requests begin and end.
    pub fn requests(&self) -> InboxRequests {
        InboxRequests { gate: Arc::clone(&self.gate) }
    }

    /// Requests whose ordering is tracked now (in flight, or failed and waiting for their `end`).
    pub fn tracked_requests(&self) -> usize {
        self.lock_gate().tracked()
    }

    /// Stops polling. Frames already taken from the daemon but not yet received are lost.
    pub fn close(self) {
        // Drop aborts the task.
    }

    fn lock_gate(&self) -> MutexGuard<'_, SequenceGate> {
        lock(&self.gate)
    }
}

/// A handle on an [`AxlInbox`]'s per-request ordering state (cheap to clone), for the code that knows
/// when a request begins or ends on a link whose frames do not say so. An entry's tokens come from
/// its exit, which sends no `end` after the last one: only the entry knows that the request is over
/// (it [`forget`](Self::forget)s it then), and that a request of the same id starts again (a retry,
/// a failover back through the same exit: it [`begin`](Self::begin)s it before its `start` goes out).
#[derive(Debug, Clone)]
pub struct InboxRequests {
    gate: Arc<Mutex<SequenceGate>>,
}

impl InboxRequests {
    /// As [`AxlInbox::forget`].
    pub fn forget(&self, peer: &AxlPeerId, request: &RequestId) -> bool {
        lock(&self.gate).forget(peer, request)
    }

    /// The request from `peer` (as reported by `/recv`) starts (again): its frames count from 0, even
    /// if an earlier request of the same id was closed or is still tracked.
    pub fn begin(&self, peer: &AxlPeerId, request: &RequestId) {
        lock(&self.gate).begin(peer, request)
    }
}

fn lock(gate: &Mutex<SequenceGate>) -> MutexGuard<'_, SequenceGate> {
    // The gate's methods do not panic, so a poisoned lock still holds consistent state.
    gate.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for AxlInbox {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll_loop(
    client: AxlClient,
    gate: Arc<Mutex<SequenceGate>>,
    items: mpsc::Sender<InboxItem>,
    config: AxlInboxConfig,
) {
    let mut pacer = PollPacer::new(&config);
    let mut daemon_failing = false;
    loop {
        let polled = tokio::select! {
            polled = client.recv() => polled,
            () = items.closed() => return,
        };
        let item = match polled {
            Ok(Some((from, frame))) => {
                pacer.message(Instant::now());
                daemon_failing = false;
                let verdict = lock(&gate).admit(&from, &frame);
                match verdict {
                    Verdict::Deliver => Ok((from, frame)),
                    Verdict::Reject(error) => {
                        tracing::warn!(%error, "AXL inbox failed a request");
                        Err(error)
                    }
                    Verdict::DeliverAfterGap(error) => {
                        tracing::warn!(%error, "AXL inbox found frames of an ended request missing");
                        if items.send(Err(error)).await.is_err() {
                            return;
                        }
                        Ok((from, frame))
                    }
                    Verdict::Discard(reason) => {
                        tracing::debug!(peer = %from.short(), request = ?frame.header.request(), seq = ?frame.header.seq(), reason, "AXL inbox discarded a frame");
                        continue;
                    }
                }
            }
            Ok(None) => {
                daemon_failing = false;
                let in_flight = lock(&gate).tracked();
                tokio::time::sleep(pacer.empty(Instant::now(), in_flight)).await;
                continue;
            }
            Err(BridgeError::InvalidFrame { from, error }) => {
                daemon_failing = false;
                let failed_requests = lock(&gate).fail_peer(&from);
                let error = InboxError::InvalidMessage { from, error, failed_requests };
                tracing::warn!(%error, "AXL inbox discarded a message");
                Err(error)
            }
            Err(
                error
                @ (BridgeError::Unreachable { .. } | BridgeError::Daemon { .. } | BridgeError::BadResponse { .. }),
            ) => {
                let first = !daemon_failing;
                daemon_failing = true;
                tokio::time::sleep(config.max_poll_interval).await;
                if !first {
                    continue;
                }
                tracing::warn!(%error, "AXL inbox cannot poll the daemon; retrying");
                Err(InboxError::Daemon(error))
            }
            Err(error) => {
                // A message the daemon delivered badly (no or a malformed sender): it cannot be
                // attributed to a request, so it is reported and polling goes on.
                tracing::warn!(%error, "AXL inbox got a message it cannot attribute");
                Err(InboxError::Daemon(error))
            }
        };
        if items.send(item).await.is_err() {
            return;
        }
    }
}

/// When to poll an empty queue again ([`AxlInboxConfig`]'s three intervals): at the minimum while
/// requests are in flight and something happened within the busy window (a message arrived, or a
/// request began); otherwise backing off, doubling from the minimum up to the maximum. Pure, so the
/// rules are tested without a daemon or a clock.
#[derive(Debug)]
struct PollPacer {
    min: Duration,
    max: Duration,
    busy_window: Duration,
    /// The next backed-off pause.
    pause: Duration,
    last_activity: Option<Instant>,
    /// Requests in flight at the last empty poll: more now means one began.
    last_in_flight: usize,
}

impl PollPacer {
    fn new(config: &AxlInboxConfig) -> Self {
        PollPacer {
            min: config.min_poll_interval,
            max: config.max_poll_interval.max(config.min_poll_interval),
            busy_window: config.busy_window,
            pause: config.min_poll_interval,
            last_activity: None,
            last_in_flight: 0,
        }
    }

    /// A message arrived: poll again at once (the caller does), and back off from the minimum.
    fn message(&mut self, now: Instant) {
        self.last_activity = Some(now);
        self.pause = self.min;
    }

    /// The queue was empty with `in_flight` requests tracked: how long to wait before the next poll.
    fn empty(&mut self, now: Instant, in_flight: usize) -> Duration {
        if in_flight > self.last_in_flight {
            self.last_activity = Some(now);
        }
        self.last_in_flight = in_flight;
        let busy = in_flight > 0 && self.last_activity.is_some_and(|at| now.duration_since(at) < self.busy_window);
        if busy {
            self.pause = self.min;
            return self.min;
        }
        let pause = self.pause;
        self.pause = (self.pause * 2).min(self.max);
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pacer(busy_window: Duration) -> PollPacer {
        PollPacer::new(&AxlInboxConfig { busy_window, ..AxlInboxConfig::default() })
    }

    fn pauses(pacer: &mut PollPacer, at: Instant, in_flight: usize, n: usize) -> Vec<Duration> {
        (0..n).map(|_| pacer.empty(at, in_flight)).collect()
    }

    #[test]
    fn an_idle_inbox_backs_off_to_the_longest_pause() {
        let mut p = pacer(Duration::from_secs(1));
        let t = Instant::now();
        p.message(t);
        let us = |n: u64| Duration::from_micros(n);
        assert_eq!(pauses(&mut p, t, 0, 7), [us(500), us(1000), us(2000), us(4000), us(8000), 10 * MS, 10 * MS]);
        // A message resets the back-off.
        p.message(t);
        assert_eq!(p.empty(t, 0), us(500));
    }

    #[test]
    fn requests_in_flight_keep_polls_fast_for_the_busy_window() {
        let mut p = pacer(Duration::from_secs(1));
        let t = Instant::now();
        let min = Duration::from_micros(500);
        // A request begins and its first frame comes.
        assert_eq!(p.empty(t, 1), min);
        p.message(t);
        // A step away from the next frame: polled at the minimum throughout.
        assert!(pauses(&mut p, t + 5 * MS, 1, 20).iter().all(|&d| d == min));
        assert!(pauses(&mut p, t + 999 * MS, 1, 3).iter().all(|&d| d == min));
        // Silent for longer than the window (a request abandoned without an `end`): backing off.
        assert_eq!(pauses(&mut p, t + 1001 * MS, 1, 3), [min, 2 * min, 4 * min]);
    }

    #[test]
    fn a_request_beginning_counts_as_activity() {
        let mut p = pacer(Duration::from_secs(1));
        let t = Instant::now();
        // Long idle: backed off.
        assert_eq!(pauses(&mut p, t, 0, 6).last(), Some(&(10 * MS)));
        // The entry begins a request (its inbox now tracks the exit's tokens): fast at once, though no
        // message has come yet, and still fast while the request waits for its first token.
        assert_eq!(p.empty(t + 50 * MS, 1), Duration::from_micros(500));
        assert_eq!(p.empty(t + 900 * MS, 1), Duration::from_micros(500));
        // Requests ending is no activity.
        assert_eq!(p.empty(t + 1100 * MS, 0), Duration::from_micros(500));
        assert_eq!(p.empty(t + 1100 * MS, 0), Duration::from_micros(1000));
    }

    #[test]
    fn a_zero_busy_window_always_backs_off() {
        let mut p = pacer(Duration::ZERO);
        let t = Instant::now();
        p.message(t);
        assert_eq!(pauses(&mut p, t, 3, 3), [Duration::from_micros(500), MS, 2 * MS]);
    }
}
