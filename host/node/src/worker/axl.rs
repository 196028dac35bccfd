//! `--transport axl`: the worker's frames go through the operator's Gensyn AXL daemon instead of QUIC
//! links of its own.
//!
//! Outgoing frames take the same router and numbering as QUIC ([`super::links::Carrier::Axl`]): each is
//! one `POST /send` to the next hop's key. Incoming frames all arrive on one queue, the daemon's
//! `GET /recv`, so one task here polls it ([`AxlInbox`]: strict decoding, per-request order) and hands
//! each frame to the same [`Ctx::dispatch`] a QUIC link's reader uses, keeping per sender the state a
//! link reader keeps per link.
//!
//! A worker's peer id in the topology is its AXL key: the daemon must run with the worker's ed25519
//! key (checked at start against the daemon's `/topology`), so a route's next hop is also the AXL
//! destination, and `/recv`'s sender names the pool member it came from.
//!
//! What AXL does not give, and what stands in for it: no delivery or ordering guarantee (the inbox's
//! sequence check fails the request whose frame was lost or reordered, with code `sequence`), and no
//! connection state (a stopped worker is noticed by the entry's progress timeout, `--progress-timeout-ms`;
//! a peer whose daemon is gone by the failed send).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use computepool_axl::bridge::{
    AxlClient, AxlClientConfig, AxlInbox, AxlInboxConfig, AxlPeerId, BridgeError, InboxError, InboxRequests,
};
use computepool_axl::frame::{ControlHeader, ErrorCode, Frame, FrameHeader, FrameLimits, RequestId};
use computepool_axl::transport::PeerId;

use super::engine_loop::EngineJob;
use super::links::Outbound;
use super::{Ctx, Inbound};

/// How long a timed-out request's entry waits, after sending its `end`, for a shard to report frames
/// of it lost (docs/PROTOCOL.md §13): a few hops of loopback HTTP and one poll interval each.
pub(super) const LOST_FRAME_PROBE: Duration = Duration::from_millis(250);

/// How long a starting worker waits for its daemon's API to answer (the daemon may be starting too).
const DAEMON_WAIT: Duration = Duration::from_secs(10);

/// The smallest `--axl-max-message-bytes` taken: room for a header and a few rows of any model's
/// activations per chunk.
const MIN_MESSAGE_SIZE: u64 = 1024 * 1024;

/// Frame limits for daemons whose `max_message_size` is `max_message`: frames no larger (activations
/// are chunked to fit, docs/PROTOCOL.md §5), never larger than the default either.
pub(super) fn frame_limits(max_message: u64) -> anyhow::Result<FrameLimits> {
    if max_message < MIN_MESSAGE_SIZE {
        bail!("--axl-max-message-bytes {max_message} is below the {MIN_MESSAGE_SIZE} bytes a frame needs");
    }
    Ok(FrameLimits { max_frame_len: max_message.min(FrameLimits::DEFAULT.max_frame_len), ..FrameLimits::DEFAULT })
}

/// A client of the daemon at `api`, once the daemon answers and is found to run with this worker's
/// key `me`.
pub(super) async fn connect(api: &str, me: &PeerId, limits: FrameLimits) -> anyhow::Result<AxlClient> {
    let config = AxlClientConfig {
        frame_limits: limits,
        max_message_size: limits.max_frame_len,
        ..AxlClientConfig::with_base_url(api)
    };
    let client = AxlClient::new(config)?;
    let started = tokio::time::Instant::now();
    let topology = loop {
        match client.topology().await {
            Ok(topology) => break topology,
            Err(error @ BridgeError::Unreachable { .. }) if started.elapsed() < DAEMON_WAIT => {
                tracing::debug!(%error, "waiting for the AXL daemon");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => bail!("cannot use the AXL daemon at {api}: {error}"),
        }
    };
    let mine = axl_id(me);
    if topology.our_public_key != mine {
        bail!(
            "the AXL daemon at {api} runs with key {}, but this worker's key (--key) is {mine}: a worker's peer id \
             is its AXL key, so run the daemon with the worker's ed25519 key (or give --key the daemon's)",
            topology.our_public_key
        );
    }
    tracing::info!(%api, "frames go through the AXL daemon");
    Ok(client)
}

/// A pool member's AXL key: its peer id's bytes.
pub(crate) fn axl_id(peer: &PeerId) -> AxlPeerId {
    AxlPeerId::from_bytes(*peer.as_bytes())
}

/// Starts polling the daemon's receive queue (the one consumer it may have); [`receive`] acts on what
/// comes.
pub(super) fn inbox(client: AxlClient) -> AxlInbox {
    AxlInbox::spawn(client, AxlInboxConfig::default())
}

/// The entry's say in the order checks of the frames that come back to it. Its exit sends no `end`
/// after a request's last token (the entry alone applies the stop rules), so the entry tells the inbox
/// when a request is over (else its tracking would stay until the inbox's limit refuses new requests)
/// and when a request of the same id starts again, on every peer of its route (any of them may send
/// it an `error`), so that their frames count from 0 again.
#[derive(Debug, Clone)]
pub struct ReturnLinks(InboxRequests);

impl ReturnLinks {
    pub(super) fn new(inbox: &AxlInbox) -> Self {
        Self(inbox.requests())
    }

    /// Before the request's `start` goes out along `route`.
    pub(super) fn begin(&self, route: &[PeerId], request: &RequestId) {
        for peer in route {
            self.0.begin(&axl_id(peer).reported_form(), request);
        }
    }

    /// Once the request is over at the entry: its exit's late tokens are discarded.
    pub(super) fn end(&self, exit: &PeerId, request: &RequestId) {
        self.0.forget(&axl_id(exit).reported_form(), request);
    }
}

/// Acts on every frame of the daemon's receive queue as a QUIC link's reader does, for as long as the
/// worker runs. A frame from a key that is not a member of the pool is dropped with a log line.
pub(super) async fn receive(mut inbox: AxlInbox, ctx: Arc<Ctx>) {
    // `/recv` names senders by the part of their key their Yggdrasil address keeps.
    let members: HashMap<AxlPeerId, PeerId> =
        ctx.topology.shards.iter().map(|s| (axl_id(&s.peer).reported_form(), s.peer)).collect();
    // What a QUIC reader keeps per link, kept here per sender.
    let mut inbound: HashMap<PeerId, HashMap<RequestId, Inbound>> = HashMap::new();
    while let Some(item) = inbox.recv().await {
        match item {
            Ok((from, frame)) => {
                let Some(peer) = members.get(&from).copied() else {
                    tracing::warn!(
                        from = %from.short(),
                        kind = %frame.header.kind(),
                        "dropped a frame from an AXL peer that is not in this pool's topology"
                    );
                    if let Some(request) = frame.header.request() {
                        inbox.forget(&from, request);
                    }
                    continue;
                };
                let peer = upstream_of_direct_end(&inbound, peer, &frame);
                let requests = inbound.entry(peer).or_default();
                if let Err(violation) = ctx.dispatch(&peer, requests, frame).await {
                    // No connection to close: everything in flight from that peer fails, as a QUIC
                    // link's would.
                    tracing::warn!(peer = %peer.fmt_short(), "protocol violation over AXL: {violation}");
                    ctx.fail_all_from(&peer, requests, &format!("protocol violation by peer {}: {violation}", peer.fmt_short()))
                        .await;
                }
            }
            Err(error) => {
                let peer = error.peer().and_then(|p| members.get(p)).copied();
                let failed: Vec<RequestId> = match &error {
                    InboxError::InvalidMessage { failed_requests, .. } => failed_requests.clone(),
                    other => other.request().cloned().into_iter().collect(),
                };
                let Some(peer) = peer else {
                    // A daemon that cannot be polled (reported once per outage), or a stranger's bytes.
                    tracing::warn!(%error, "AXL receive queue");
                    continue;
                };
                let requests = inbound.entry(peer).or_default();
                for request in failed {
                    ctx.fail_from(&peer, requests, request, error.error_code(), error.to_string()).await;
                }
            }
        }
    }
}

/// Whose link an `end` from `from` belongs to. An entry whose request failed sends its `end` straight to
/// the shards past the first hop as well (a dead worker's daemon may swallow the one that goes down the
/// route): such an `end`, from the request's own entry, ends the request as its upstream's would.
/// Every other frame belongs to its sender's link.
fn upstream_of_direct_end(inbound: &HashMap<PeerId, HashMap<RequestId, Inbound>>, from: PeerId, frame: &Frame) -> PeerId {
    let FrameHeader::Control(ControlHeader::End { request, .. }) = &frame.header else { return from };
    if inbound.get(&from).is_some_and(|requests| requests.contains_key(request)) {
        return from;
    }
    inbound
        .iter()
        .find(|(_, requests)| requests.get(request).is_some_and(|r| r.entry == from))
        .map(|(upstream, _)| *upstream)
        .unwrap_or(from)
}

impl Ctx {
    /// Fails one request whose frames from `from` cannot be trusted (lost, reordered, garbled): on the
    /// entry its client gets the error; elsewhere it is freed here and an `error` frame goes towards its
    /// entry (down its route, or, when its start never arrived, back to the entry that sent it).
    async fn fail_from(
        &self,
        from: &PeerId,
        inbound: &mut HashMap<RequestId, Inbound>,
        request: RequestId,
        code: ErrorCode,
        message: String,
    ) {
        if let Some(entry) = &self.entry {
            entry.deliver_failure(&request, code, message);
            return;
        }
        if inbound.remove(&request).is_some() {
            self.job(EngineJob::End { request: request.clone() }).await;
        } else {
            // Its start (which names its route) never arrived here: its sender is its entry when it is
            // one, and so is the pool's only entry.
            let sender = self.topology.shard(from).filter(|s| s.layers.start == 0);
            let mut entries = self.topology.entries();
            let only = match (entries.next(), entries.next()) {
                (Some(only), None) => Some(only),
                _ => None,
            };
            let Some(entry) = sender.or(only).map(|s| s.peer) else {
                tracing::warn!(%request, "cannot tell a failed request's entry: its start frame was lost");
                return;
            };
            self.send_out(Outbound::Route { request: request.clone(), next: entry, entry }).await;
        }
        self.send_out(Outbound::Frame(Frame::error(request, 0, code, message))).await;
    }

    /// Fails every request in flight from `from`, as a lost QUIC link from it would.
    async fn fail_all_from(&self, from: &PeerId, inbound: &mut HashMap<RequestId, Inbound>, reason: &str) {
        match &self.entry {
            Some(entry) => entry.fail_through(from, reason),
            None => {
                let requests: Vec<RequestId> = inbound.drain().map(|(r, _)| r).collect();
                if !requests.is_empty() {
                    self.job(EngineJob::Fail { requests, reason: reason.to_string() }).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use computepool_axl::bridge::standin::{StandinConfig, StandinNetwork};
    use computepool_axl::frame::TokenHeader;

    fn token(request: &str, seq: u64) -> Vec<u8> {
        let header = TokenHeader { request: RequestId::new(request).expect("id"), seq, tokens: vec![7], finish: None };
        Frame::token(header).to_bytes(&FrameLimits::DEFAULT).expect("encodes")
    }

    /// An `end` straight from a request's entry counts as its upstream's; any other frame, or an `end`
    /// from a peer that is not the request's entry, stays its sender's.
    #[test]
    fn an_end_from_the_requests_entry_belongs_to_its_upstreams_link() {
        let [entry, middle, other] = [1u8, 2, 3].map(|n| iroh::SecretKey::from_bytes(&[n; 32]).public());
        let id = RequestId::new("r").expect("id");
        let state = |entry| super::super::Inbound {
            tracker: computepool_axl::frame::SequenceTracker::new(),
            cursor: computepool_axl::frame::ActivationCursor::new(0),
            pending: Vec::new(),
            entry,
        };
        let inbound = HashMap::from([(middle, HashMap::from([(id.clone(), state(entry))]))]);
        let end = Frame::end(id.clone(), 0);
        assert_eq!(upstream_of_direct_end(&inbound, entry, &end), middle);
        assert_eq!(upstream_of_direct_end(&inbound, middle, &end), middle);
        assert_eq!(upstream_of_direct_end(&inbound, other, &end), other, "only the request's entry may end it from afar");
        let error = Frame::error(id.clone(), 0, ErrorCode::Internal, "x");
        assert_eq!(upstream_of_direct_end(&inbound, entry, &error), entry);
        let unknown = Frame::end(RequestId::new("s").expect("id"), 0);
        assert_eq!(upstream_of_direct_end(&inbound, entry, &unknown), entry);
    }

    /// The entry's tracking of its exit's tokens ends with each request (none piles up towards the
    /// inbox's limit), a late token after the end is discarded, and the same id can start again.
    #[tokio::test]
    async fn an_entry_ends_and_begins_the_tracking_of_its_exits_tokens() {
        let network = StandinNetwork::new();
        let node = network.start_node_with(StandinConfig::default()).await.expect("a stand-in daemon");
        let client = AxlClient::new(AxlClientConfig::with_base_url(node.base_url())).expect("client");
        let mut inbox = inbox(client);
        let links = ReturnLinks::new(&inbox);
        let exit = iroh::SecretKey::from_bytes(&[9; 32]).public();
        let from = axl_id(&exit);
        let id = |s: &str| RequestId::new(s).expect("id");
        let next = async |inbox: &mut AxlInbox| {
            let item = tokio::time::timeout(Duration::from_secs(5), inbox.recv()).await.expect("a frame in time");
            let (_, frame) = item.expect("the inbox runs").expect("an in-order frame");
            (frame.header.request().expect("a request's frame").to_string(), frame.header.seq().expect("a seq"))
        };

        links.begin(&[exit], &id("r"));
        for seq in 0..3 {
            node.inject(&from, token("r", seq));
            assert_eq!(next(&mut inbox).await, ("r".to_string(), seq));
        }
        assert_eq!(inbox.tracked_requests(), 1);
        links.end(&exit, &id("r"));
        assert_eq!(inbox.tracked_requests(), 0, "the request's tracking ends with it");
        // A token the exit sent before the `end` reached it is dropped; the next request's comes.
        node.inject(&from, token("r", 3));
        node.inject(&from, token("s", 0));
        assert_eq!(next(&mut inbox).await, ("s".to_string(), 0));
        // The same id again: counted from 0.
        links.begin(&[exit], &id("r"));
        node.inject(&from, token("r", 0));
        assert_eq!(next(&mut inbox).await, ("r".to_string(), 0));
    }

    #[test]
    fn frame_limits_follow_the_daemons_message_size() {
        assert_eq!(frame_limits(16 * 1024 * 1024).expect("the default"), FrameLimits::DEFAULT);
        let small = frame_limits(2 * 1024 * 1024).expect("a lowered limit");
        assert_eq!(small.max_frame_len, 2 * 1024 * 1024);
        assert_eq!(small.max_header_len, FrameLimits::DEFAULT.max_header_len);
        // Never above the frame limit every peer decodes with.
        assert_eq!(frame_limits(64 * 1024 * 1024).expect("a raised limit"), FrameLimits::DEFAULT);
        let error = frame_limits(1000).unwrap_err().to_string();
        assert!(error.contains("--axl-max-message-bytes 1000"), "{error}");
    }
}
