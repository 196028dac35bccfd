//! A worker's outgoing side: one persistent link per peer it sends to (dialled on first use, kept,
//! redialled with backoff), and the router that sends each request's frames to the next hop its route
//! names. Frames are numbered per request on each link here, on the way out, and checked on the way in.
//!
//! A link is carried one of two ways ([`Carrier`]): a QUIC connection of this worker's own (iroh), or
//! a Gensyn AXL daemon's `POST /send`, one frame per message. Everything above the link task (routes,
//! numbering, failing the requests of a lost link) is the same for both.
//!
//! ```text
//!   compute thread ─┐                          ┌─▶ link to peer A ─▶ QUIC stream
//!   request handlers├─▶ outbound ─▶ router ────┼─▶ link to peer B ─▶ QUIC stream
//!   upstream readers┘   (in order)  (routes)   └─▶ …
//! ```
//!
//! Every frame of a request goes through one channel and one router task, so the frames a worker sends
//! for a request keep their order; the router hands each to the link of the request's next hop (for
//! the exit, its entry). It never waits on one link: a frame for a link whose queue is full waits in
//! that link's backlog here (in order), so a slow peer delays only the requests routed over it. When a
//! link goes down, every request routed over it fails at once: its KV cache here is freed and an
//! `error` frame goes to its entry (docs/PROTOCOL.md §11).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use computepool_axl::bridge::{AxlClient, AxlPeerId};
use computepool_axl::frame::{ControlHeader, ErrorCode, Frame, FrameHeader, FrameLimits, RequestId, SequenceCounter};
use computepool_axl::transport::{FRAMES_ALPN, FrameWriter, PeerId, ShardPeer, Topology, Transport, describe_close};
use tokio::sync::{Notify, mpsc, watch};

use super::engine_loop::EngineJob;

/// What the compute thread and the request handlers hand to the router.
#[derive(Debug)]
pub enum Outbound {
    /// A request's next hop from this worker (for the exit: its entry) and its entry. Sent before the
    /// request's first frame leaves this worker.
    Route { request: RequestId, next: PeerId, entry: PeerId },
    /// A frame of a request for its next hop; its `seq` is assigned on the way out. An `end` or `error`
    /// frame is the request's last here: its route is forgotten after it.
    Frame(Frame),
    /// The request is over here without a last frame to send (the exit, after `end`): forget its route
    /// and its numbering.
    Forget(RequestId),
    /// A frame straight to `peer`, whatever its request's route (numbered on that link as any frame of
    /// its request): over AXL, the entry's `end` to the shards past a hop that may swallow it.
    Direct { peer: PeerId, frame: Frame },
    /// Tokens this worker sampled for one of its own requests, for its own entry: the entry of a split
    /// head samples (the exit's would go over the link).
    OwnTokens { request: RequestId, tokens: Vec<u32> },
}

/// The state of one link, watched by whoever must react to it going down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Dialling for the first time: frames wait for the connection.
    Connecting,
    /// Not connected (lost, refused or unreachable) and redialling; the string says why, for errors.
    Down(String),
    /// Connected.
    Up,
}

/// Sets a frame's sequence number.
pub fn set_seq(header: &mut FrameHeader, seq: u64) {
    match header {
        FrameHeader::Activations(h) => h.seq = seq,
        FrameHeader::Token(h) => h.seq = seq,
        FrameHeader::Head(h) => h.seq = seq,
        FrameHeader::Control(ControlHeader::Start { seq: s, .. })
        | FrameHeader::Control(ControlHeader::End { seq: s, .. })
        | FrameHeader::Control(ControlHeader::Error { seq: s, .. }) => *s = seq,
        FrameHeader::Control(ControlHeader::Unload) => {}
    }
}

/// Per-request sequence counters of one outgoing link.
#[derive(Debug, Default)]
struct Numbering {
    counters: HashMap<RequestId, SequenceCounter>,
}

impl Numbering {
    /// Numbers `frame` for its request; `false` if the request used up its numbers (never in practice).
    fn stamp(&mut self, frame: &mut Frame) -> bool {
        let Some(request) = frame.header.request().cloned() else { return true };
        if matches!(frame.header, FrameHeader::Control(ControlHeader::Start { .. })) {
            self.counters.insert(request.clone(), SequenceCounter::new());
        }
        let last = is_last(&frame.header);
        let seq = self.counters.entry(request.clone()).or_default().next_seq();
        if last {
            self.counters.remove(&request);
        }
        match seq {
            Ok(seq) => {
                set_seq(&mut frame.header, seq);
                true
            }
            Err(_) => false,
        }
    }
}

/// Whether a frame is its request's last on a link (`end` or `error`).
fn is_last(header: &FrameHeader) -> bool {
    matches!(header, FrameHeader::Control(ControlHeader::End { .. } | ControlHeader::Error { .. }))
}

/// What the router hands to this worker's own entry instead of a link.
#[derive(Debug)]
pub enum ToEntry {
    /// One of the entry's requests failed (here, or its next hop is unreachable).
    Failed { request: RequestId, code: ErrorCode, message: String },
    /// Tokens this worker sampled for one of its own requests: a one-worker pool, whose exit is its
    /// entry, or the entry of a split head. An in-process channel loses and reorders nothing, so they
    /// carry no sequence number.
    Tokens { request: RequestId, tokens: Vec<u32> },
}

/// Where the router sends what is for this worker's own entry (only an entry has one).
pub type EntrySink = mpsc::UnboundedSender<ToEntry>;

/// What a link task takes.
#[derive(Debug)]
enum LinkMsg {
    Frame(Frame),
    /// Drop the request's sequence counter (it is over on this link, or starts afresh).
    Forget(RequestId),
}

/// One peer's link: its task's mailbox and state.
#[derive(Clone)]
struct Link {
    tx: mpsc::Sender<LinkMsg>,
    state: watch::Receiver<LinkState>,
    /// Wakes the link's task to dial again now (the peer showed it is up); unused over AXL.
    redial: Arc<Notify>,
}

/// How this worker's frames reach its peers.
#[derive(Clone)]
pub enum Carrier {
    /// A QUIC connection per peer, dialled by this worker (docs/PROTOCOL.md §11).
    Quic(Transport),
    /// The operator's Gensyn AXL daemon: each frame is one `POST /send` to the peer's key, which is
    /// its peer id in the topology (docs/PROTOCOL.md §13).
    Axl(AxlClient),
}

/// How long an AXL peer whose daemon refused a send counts as down before the next frame for it is
/// tried again. AXL has no connection to redial: trying is the only way to learn it is back.
const AXL_RETRY_AFTER: Duration = Duration::from_millis(500);

/// Every link this worker has dialled, by peer. Links are made on first use and kept.
pub struct Links {
    carrier: Carrier,
    limits: FrameLimits,
    topology: Arc<Topology>,
    map: Mutex<HashMap<PeerId, Link>>,
    /// Link tasks report each loss here (the router fails the requests routed over it).
    lost: mpsc::UnboundedSender<(PeerId, String)>,
}

impl Links {
    fn link(&self, peer: &PeerId) -> Option<Link> {
        let mut map = self.map.lock().expect("links lock");
        if let Some(link) = map.get(peer) {
            return Some(link.clone());
        }
        let shard = self.topology.shard(peer)?.clone();
        let (tx, rx) = mpsc::channel(1024);
        let redial = Arc::new(Notify::new());
        let state = match &self.carrier {
            Carrier::Quic(transport) => {
                let (state_tx, state) = watch::channel(LinkState::Connecting);
                let task = run_link(transport.clone(), shard, rx, state_tx, redial.clone(), self.limits, self.lost.clone());
                tokio::spawn(task);
                state
            }
            // No connection to make: a link over AXL is up until a send to the peer fails.
            Carrier::Axl(client) => {
                let (state_tx, state) = watch::channel(LinkState::Up);
                tokio::spawn(run_axl_link(client.clone(), shard, rx, state_tx, self.lost.clone()));
                state
            }
        };
        let link = Link { tx, state, redial };
        map.insert(*peer, link.clone());
        Some(link)
    }

    /// Dials `peer` now instead of on first use. A worker that starts dials the shards that send to it:
    /// those of them that lost it (it restarted) then learn it is back from the connection
    /// ([`Links::peer_is_up`]).
    pub fn open(&self, peer: &PeerId) {
        let _ = self.link(peer);
    }

    /// `peer` just connected to this worker, so it is up: a link to it that is down, or still dialling
    /// for the first time, dials again at once: after its backoff's pause is cut short, or in place of
    /// a dial pending for [`STALE_DIAL`] or longer. Without this, a dial begun while the peer was away
    /// reaches its new process only at QUIC's next retransmission of the handshake, which backs off to
    /// seconds (docs/PROTOCOL.md §11).
    pub fn peer_is_up(&self, peer: &PeerId) {
        if let Some(link) = self.map.lock().expect("links lock").get(peer)
            && *link.state.borrow() != LinkState::Up
        {
            link.redial.notify_one();
        }
    }

    /// Waits (at most `wait`) until the link to `peer` is up, dialling it if this worker never has;
    /// `Err` says why it is not.
    pub async fn ready(&self, peer: &PeerId, wait: Duration) -> Result<(), String> {
        let Some(link) = self.link(peer) else { return Err(format!("peer {} is not in this pool", peer.fmt_short())) };
        let mut state = link.state;
        let check = async {
            loop {
                match &*state.borrow_and_update() {
                    LinkState::Up => return Ok(()),
                    LinkState::Down(why) => return Err(why.clone()),
                    LinkState::Connecting => {}
                }
                if state.changed().await.is_err() {
                    return Err("the worker is shutting down".to_string());
                }
            }
        };
        match tokio::time::timeout(wait, check).await {
            Ok(result) => result,
            Err(_) => Err(format!("peer {} did not connect within {wait:?}", peer.fmt_short())),
        }
    }
}

/// A request's route through this worker.
#[derive(Debug, Clone, Copy)]
struct Hop {
    next: PeerId,
    entry: PeerId,
}

/// Messages held for one link while its queue is full, beyond which the router waits for that link
/// (bounding memory: 4096 frames of up to 16 MiB would be too much, but decode frames are a few KiB
/// and a backlog this deep means the peer is stalled, not slow).
const MAX_BACKLOG: usize = 4096;

/// How often the router retries links with a backlog.
const BACKLOG_RETRY: Duration = Duration::from_millis(1);

/// The router: sends each request's frames to its next hop, and fails the requests of a lost link.
pub struct Router {
    me: PeerId,
    links: Arc<Links>,
    routes: HashMap<RequestId, Hop>,
    /// Per peer, what waits for room in its link's queue, in order.
    backlog: HashMap<PeerId, std::collections::VecDeque<LinkMsg>>,
    engine: mpsc::Sender<EngineJob>,
    /// What is for the entry's own requests (only on an entry): their failures, and in a one-worker
    /// pool their tokens.
    local: Option<EntrySink>,
}

/// Starts the router; returns the links (the entry waits on them) and the router's task handle.
pub fn spawn_router(
    me: PeerId,
    carrier: Carrier,
    topology: Arc<Topology>,
    limits: FrameLimits,
    outbound: mpsc::Receiver<Outbound>,
    engine: mpsc::Sender<EngineJob>,
    local: Option<EntrySink>,
) -> Arc<Links> {
    let (lost_tx, lost_rx) = mpsc::unbounded_channel();
    let links = Arc::new(Links { carrier, limits, topology, map: Mutex::new(HashMap::new()), lost: lost_tx });
    let router = Router { me, links: links.clone(), routes: HashMap::new(), backlog: HashMap::new(), engine, local };
    tokio::spawn(router.run(outbound, lost_rx));
    links
}

impl Router {
    async fn run(mut self, mut outbound: mpsc::Receiver<Outbound>, mut lost: mpsc::UnboundedReceiver<(PeerId, String)>) {
        loop {
            let backlogged = !self.backlog.is_empty();
            tokio::select! {
                msg = outbound.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => return,
                },
                Some((peer, why)) = lost.recv() => self.peer_lost(peer, &why).await,
                () = tokio::time::sleep(BACKLOG_RETRY), if backlogged => self.flush_backlog(),
            }
        }
    }

    /// Hands `msg` to `peer`'s link without waiting for it: behind what already waits for that link,
    /// or, when its queue is full, into its backlog. Waits only when the backlog is [`MAX_BACKLOG`]
    /// deep (a stalled peer), for room in that link.
    async fn deliver(&mut self, peer: &PeerId, msg: LinkMsg) {
        let Some(link) = self.links.link(peer) else { return };
        let backlog = self.backlog.entry(*peer).or_default();
        if backlog.is_empty() {
            match link.tx.try_send(msg) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.remove(peer);
                    return;
                }
                Err(mpsc::error::TrySendError::Full(msg)) => backlog.push_back(msg),
            }
        } else {
            backlog.push_back(msg);
        }
        if backlog.len() > MAX_BACKLOG {
            tracing::warn!(peer = %peer.fmt_short(), "a link's backlog is full: waiting for the peer");
            while backlog.len() > MAX_BACKLOG / 2 {
                let Some(msg) = backlog.pop_front() else { break };
                if link.tx.send(msg).await.is_err() {
                    backlog.clear();
                }
            }
        }
    }

    /// Moves what waits in the backlogs into their links' queues, as far as they have room.
    fn flush_backlog(&mut self) {
        self.backlog.retain(|peer, backlog| {
            let Some(link) = self.links.map.lock().expect("links lock").get(peer).cloned() else { return false };
            while let Some(msg) = backlog.pop_front() {
                match link.tx.try_send(msg) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => return false,
                    Err(mpsc::error::TrySendError::Full(msg)) => {
                        backlog.push_front(msg);
                        return true;
                    }
                }
            }
            false
        });
    }

    async fn handle(&mut self, msg: Outbound) {
        match msg {
            Outbound::Route { request, next, entry } => {
                // A request id may come back (a failover to a route through this worker): its
                // numbering on the new hop starts afresh.
                if next != self.me {
                    self.deliver(&next, LinkMsg::Forget(request.clone())).await;
                }
                self.routes.insert(request, Hop { next, entry });
            }
            Outbound::Forget(request) => {
                if let Some(hop) = self.routes.remove(&request)
                    && hop.next != self.me
                {
                    self.deliver(&hop.next, LinkMsg::Forget(request)).await;
                }
            }
            Outbound::Direct { peer, frame } => self.send(&peer, frame).await,
            Outbound::OwnTokens { request, tokens } => self.to_entry(ToEntry::Tokens { request, tokens }),
            Outbound::Frame(frame) => {
                let Some(request) = frame.header.request().cloned() else {
                    return; // `unload` is not forwarded: it concerns the link it came over
                };
                let Some(hop) = self.routes.get(&request).copied() else {
                    return; // over here already (ended or failed): what is still on its way is dropped
                };
                if is_last(&frame.header) {
                    self.routes.remove(&request);
                }
                if let FrameHeader::Control(ControlHeader::Error { code, message, .. }) = &frame.header {
                    // Towards the entry: down the route while the next hop is there (it frees the
                    // request on every shard on the way), else straight to the entry.
                    if hop.entry == self.me {
                        self.to_entry(ToEntry::Failed { request, code: *code, message: message.clone() });
                        return;
                    }
                    let to = if self.down(&hop.next).is_none() { hop.next } else { hop.entry };
                    self.send(&to, frame).await;
                    return;
                }
                if hop.next == self.me {
                    // A one-worker pool: the exit's tokens go to its own entry; its `end` ends it here.
                    if let FrameHeader::Token(h) = frame.header {
                        self.to_entry(ToEntry::Tokens { request, tokens: h.tokens });
                    }
                    return;
                }
                if let Some(why) = self.down(&hop.next) {
                    self.routes.remove(&request);
                    self.fail(request, hop, &why).await;
                    return;
                }
                self.send(&hop.next, frame).await;
            }
        }
    }

    /// Hands `msg` to this worker's own entry (a worker without one has no requests of its own).
    fn to_entry(&self, msg: ToEntry) {
        if let Some(local) = &self.local {
            let _ = local.send(msg);
        }
    }

    /// Why the link to `peer` is down, if it is.
    fn down(&self, peer: &PeerId) -> Option<String> {
        match self.links.link(peer) {
            Some(link) => match &*link.state.borrow() {
                LinkState::Down(why) => Some(why.clone()),
                _ => None,
            },
            None => Some(format!("peer {} is not in this pool's topology", peer.fmt_short())),
        }
    }

    async fn send(&mut self, peer: &PeerId, frame: Frame) {
        self.deliver(peer, LinkMsg::Frame(frame)).await;
    }

    /// Fails a request whose next hop is unreachable: frees it here and tells its entry.
    async fn fail(&mut self, request: RequestId, hop: Hop, why: &str) {
        // Not awaited here: the compute thread may itself be waiting for this router to take its
        // output, and the router must never wait on it.
        if let Err(mpsc::error::TrySendError::Full(job)) = self.engine.try_send(EngineJob::End { request: request.clone() }) {
            let engine = self.engine.clone();
            tokio::spawn(async move { engine.send(job).await });
        }
        let message = format!("the pipeline broke: {why}");
        if hop.entry == self.me {
            self.to_entry(ToEntry::Failed { request, code: ErrorCode::Unavailable, message });
        } else if hop.entry != hop.next && self.down(&hop.entry).is_none() {
            self.send(&hop.entry, Frame::error(request, 0, ErrorCode::Unavailable, message)).await;
        }
    }

    /// A link went down: every request routed over it fails.
    async fn peer_lost(&mut self, peer: PeerId, why: &str) {
        let broken: Vec<(RequestId, Hop)> =
            self.routes.iter().filter(|(_, hop)| hop.next == peer).map(|(r, hop)| (r.clone(), *hop)).collect();
        if !broken.is_empty() {
            tracing::warn!(peer = %peer.fmt_short(), requests = broken.len(), "failing the requests routed over a lost link");
        }
        for (request, hop) in broken {
            self.routes.remove(&request);
            self.fail(request, hop, why).await;
        }
    }
}

/// Keeps the link to `peer` up and writes every frame handed to it, in order. While the link is down,
/// frames are discarded (the router fails their requests when it hears of the loss) and the peer is
/// redialled with backoff, or at once when `redial` says the peer is up. Returns when the router goes
/// away.
async fn run_link(
    transport: Transport,
    peer: ShardPeer,
    mut inbox: mpsc::Receiver<LinkMsg>,
    state: watch::Sender<LinkState>,
    redial: Arc<Notify>,
    limits: FrameLimits,
    lost: mpsc::UnboundedSender<(PeerId, String)>,
) {
    let short = peer.peer.fmt_short().to_string();
    let mut backoff = Duration::from_millis(50);
    let down = |why: String| {
        let first = !matches!(&*state.borrow(), LinkState::Down(_));
        state.send_replace(LinkState::Down(why.clone()));
        // Report a loss once per outage (redials that fail again change only the reason).
        if first {
            let _ = lost.send((peer.peer, why));
        }
    };
    // The peer connected to this worker while the link was not up: what waited for the old outage
    // belongs to requests failed already; from now on frames wait for the new connection.
    let peer_is_back = |inbox: &mut mpsc::Receiver<LinkMsg>| {
        if matches!(&*state.borrow(), LinkState::Down(_)) {
            while inbox.try_recv().is_ok() {}
            state.send_replace(LinkState::Connecting);
        }
        tracing::debug!("link to {short}: the peer is up, dialling it now");
    };
    loop {
        // Dial, discarding what arrives meanwhile only while the link is known down (while it is
        // connecting for the first time, frames wait in the inbox).
        let dial = async {
            match tokio::time::timeout(Duration::from_secs(3), transport.connect(peer.peer, &peer.addrs, peer.relay.as_ref(), FRAMES_ALPN)).await {
                Ok(Ok(conn)) => match await_link_ack(&conn).await {
                    Ok(()) => Ok(conn),
                    Err(why) => Err(format!("shard {} (peer {short}) {why}", peer.layers)),
                },
                Ok(Err(e)) => Err(format!("shard {} (peer {short}) is unreachable: {e}", peer.layers)),
                Err(_) => Err(format!("shard {} (peer {short}) is unreachable: dial timed out", peer.layers)),
            }
        };
        tokio::pin!(dial);
        let started = tokio::time::Instant::now();
        let connected = loop {
            tokio::select! {
                connected = &mut dial => break Some(connected),
                () = redial.notified() => {
                    // Only a stale dial is dropped: a younger one still has QUIC's first retransmission
                    // to come, and two workers dialling each other at once must not keep cancelling
                    // each other's dials (each accept wakes the other side).
                    if started.elapsed() >= STALE_DIAL {
                        peer_is_back(&mut inbox);
                        break None;
                    }
                }
            }
        };
        let Some(connected) = connected else { continue };
        let stream = match connected {
            Ok(conn) => {
                let opened = conn.open_uni().await;
                match opened {
                    Ok(s) => Ok((conn, s)),
                    Err(e) => Err(format!("shard {} (peer {short}): {e}", peer.layers)),
                }
            }
            Err(why) => Err(why),
        };
        let (conn, stream) = match stream {
            Ok(pair) => pair,
            Err(why) => {
                tracing::debug!("link to {short}: {why}");
                down(why);
                // Wait out the backoff, discarding what arrives (its requests are being failed).
                let sleep = tokio::time::sleep(backoff);
                tokio::pin!(sleep);
                backoff = (backoff * 2).min(Duration::from_millis(500));
                loop {
                    tokio::select! {
                        _ = &mut sleep => break,
                        () = redial.notified() => {
                            peer_is_back(&mut inbox);
                            backoff = Duration::from_millis(50);
                            break;
                        }
                        msg = inbox.recv() => if msg.is_none() { return },
                    }
                }
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        // What arrived while the link was down belongs to requests that are failed already.
        if matches!(&*state.borrow(), LinkState::Down(_)) {
            while inbox.try_recv().is_ok() {}
        }
        tracing::info!(peer = %short, layers = %peer.layers, "link up");
        state.send_replace(LinkState::Up);
        let mut writer = FrameWriter::new(stream, limits);
        let mut numbering = Numbering::default();
        let reason = loop {
            tokio::select! {
                msg = inbox.recv() => match msg {
                    None => {
                        let _ = writer.finish().await;
                        return;
                    }
                    Some(LinkMsg::Forget(request)) => {
                        numbering.counters.remove(&request);
                    }
                    Some(LinkMsg::Frame(mut frame)) => {
                        if !numbering.stamp(&mut frame) {
                            continue;
                        }
                        if let Err(e) = writer.send(&frame).await {
                            break e.to_string();
                        }
                        tracing::trace!(kind = ?frame.header.kind(), seq = ?frame.header.seq(), "frame out");
                    }
                },
                e = conn.closed() => break describe_close(&e),
            }
        };
        tracing::warn!(peer = %short, "link lost: {reason}");
        down(format!("shard {} (peer {short}) was lost: {reason}", peer.layers));
    }
}

/// Sends every frame handed to it to `peer` through the AXL daemon, in order, one message each.
///
/// A send the daemon refuses (the peer's daemon cannot be reached, or ours is down) reports the link
/// lost, so the router fails every request routed over it, and counts the peer down for
/// [`AXL_RETRY_AFTER`]; frames that arrive meanwhile belong to those failed requests and are discarded.
/// After that the link counts as up again and the next frame tries. A send that succeeds says only
/// that the daemon took the message: a frame lost further on is found by the receiver's sequence
/// check, a stopped peer by the entry's progress timeout. Returns when the router goes away.
async fn run_axl_link(
    client: AxlClient,
    peer: ShardPeer,
    mut inbox: mpsc::Receiver<LinkMsg>,
    state: watch::Sender<LinkState>,
    lost: mpsc::UnboundedSender<(PeerId, String)>,
) {
    let short = peer.peer.fmt_short().to_string();
    let destination = AxlPeerId::from_bytes(*peer.peer.as_bytes());
    let mut numbering = Numbering::default();
    let mut down_until: Option<tokio::time::Instant> = None;
    loop {
        let retry = async {
            match down_until {
                Some(until) => tokio::time::sleep_until(until).await,
                None => std::future::pending().await,
            }
        };
        let msg = tokio::select! {
            msg = inbox.recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
            () = retry => {
                // Counted up again, so that the router lets the next request try.
                down_until = None;
                state.send_replace(LinkState::Up);
                continue;
            }
        };
        let mut frame = match msg {
            LinkMsg::Forget(request) => {
                numbering.counters.remove(&request);
                continue;
            }
            LinkMsg::Frame(frame) => frame,
        };
        if down_until.is_some() || !numbering.stamp(&mut frame) {
            continue;
        }
        if let Err(error) = client.send(&destination, &frame).await {
            let why = format!("shard {} (peer {short}) cannot be reached over AXL: {error}", peer.layers);
            tracing::warn!(peer = %short, "AXL send failed: {error}");
            state.send_replace(LinkState::Down(why.clone()));
            down_until = Some(tokio::time::Instant::now() + AXL_RETRY_AFTER);
            let _ = lost.send((peer.peer, why));
        }
    }
}

/// How old a pending dial must be for a sign that its peer is up ([`Links::peer_is_up`]) to replace it
/// with a new one: about when QUIC retransmits a handshake that got no answer the first time (three
/// times its initial RTT estimate of 333 ms), after which its retransmissions back off to seconds.
const STALE_DIAL: Duration = Duration::from_secs(1);

/// The byte an accepting worker sends to confirm a frames link.
pub const LINK_ACK: u8 = 0x01;

/// Waits for the peer's confirmation of a new link: one [`LINK_ACK`] byte on a unidirectional stream it
/// opens, or the reason it closed the connection instead.
async fn await_link_ack(conn: &iroh::endpoint::Connection) -> Result<(), String> {
    let ack = async {
        let mut stream = conn.accept_uni().await.map_err(|e| describe_close(&e))?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.map_err(|e| match conn.close_reason() {
            Some(close) => describe_close(&close),
            None => e.to_string(),
        })?;
        if byte[0] == LINK_ACK { Ok(()) } else { Err(format!("sent {:#04x} instead of the link confirmation", byte[0])) }
    };
    match tokio::time::timeout(Duration::from_secs(3), ack).await {
        Ok(result) => result.map_err(|why| format!("refused the link: {why}")),
        Err(_) => Err("did not confirm the link within 3 s".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use computepool_axl::frame::{SamplingHeader, TokenHeader};

    fn rid(s: &str) -> RequestId {
        RequestId::new(s).expect("valid id")
    }

    fn token(request: &str) -> Frame {
        Frame::token(TokenHeader { request: rid(request), seq: 0, tokens: vec![1], finish: None })
    }

    /// A router over two peers whose link queues hold one message each, and those queues' far ends.
    fn router_with_two_links() -> (Router, [PeerId; 2], [mpsc::Receiver<LinkMsg>; 2]) {
        let peers = [computepool_axl::transport::SecretKey::generate().public(), computepool_axl::transport::SecretKey::generate().public()];
        let me = computepool_axl::transport::SecretKey::generate().public();
        let topology = Topology::from_json(
            &serde_json::json!({"num_layers": 2, "shards": [
                {"peer": me.to_string(), "layers": "0..1"},
                {"peer": peers[0].to_string(), "layers": "1..2"},
                {"peer": peers[1].to_string(), "layers": "1..2"},
            ]})
            .to_string(),
        )
        .expect("valid topology");
        // Never used to send: the links below are in place already, so none is started.
        let client = AxlClient::new(computepool_axl::bridge::AxlClientConfig::default()).expect("client");
        let (lost, _) = mpsc::unbounded_channel();
        let links = Arc::new(Links {
            carrier: Carrier::Axl(client),
            limits: FrameLimits::DEFAULT,
            topology: Arc::new(topology),
            map: Mutex::new(HashMap::new()),
            lost,
        });
        let receivers = peers.map(|peer| {
            let (tx, rx) = mpsc::channel(1);
            let (_, state) = watch::channel(LinkState::Up);
            links.map.lock().expect("links lock").insert(peer, Link { tx, state, redial: Arc::new(Notify::new()) });
            rx
        });
        let (engine, _) = mpsc::channel(1);
        let router = Router { me, links, routes: HashMap::new(), backlog: HashMap::new(), engine, local: None };
        (router, peers, receivers)
    }

    fn frame_of(msg: LinkMsg) -> Option<String> {
        match msg {
            LinkMsg::Frame(frame) => frame.header.request().map(|r| r.to_string()),
            LinkMsg::Forget(_) => None,
        }
    }

    /// A peer that takes nothing holds up only the requests routed over it: the router keeps their
    /// frames, in order, until its link has room, and frames for other peers go on meanwhile.
    #[tokio::test]
    async fn a_full_link_does_not_hold_up_the_others() {
        let (mut router, [slow, fast], [mut slow_rx, mut fast_rx]) = router_with_two_links();
        let me = router.me;
        for (request, next) in [("s", slow), ("f", fast)] {
            router.handle(Outbound::Route { request: rid(request), next, entry: me }).await;
        }
        // Each route's `Forget` took its link's one slot.
        assert!(matches!(fast_rx.recv().await, Some(LinkMsg::Forget(_))));
        for _ in 0..5 {
            // Would wait for ever if the router awaited the slow link.
            tokio::time::timeout(Duration::from_secs(1), router.handle(Outbound::Frame(token("s"))))
                .await
                .expect("the router does not wait on a full link");
            router.handle(Outbound::Frame(token("f"))).await;
            assert_eq!(fast_rx.recv().await.and_then(frame_of).as_deref(), Some("f"));
        }
        assert_eq!(router.backlog.get(&slow).map(|b| b.len()), Some(5));
        // The slow peer catches up: everything comes, in order, as room appears.
        assert!(matches!(slow_rx.recv().await, Some(LinkMsg::Forget(_))));
        for _ in 0..5 {
            router.flush_backlog();
            assert_eq!(slow_rx.recv().await.and_then(frame_of).as_deref(), Some("s"));
        }
        router.flush_backlog();
        assert!(router.backlog.is_empty());
    }

    /// A one-worker pool routes its requests to itself: their tokens and errors go to its own entry,
    /// nothing goes on a link, and the request's `end` forgets its route.
    #[tokio::test]
    async fn a_route_to_this_worker_hands_its_frames_to_its_own_entry() {
        let (mut router, _, [mut a_rx, mut b_rx]) = router_with_two_links();
        let (local, mut entry) = mpsc::unbounded_channel();
        router.local = Some(local);
        let me = router.me;
        for request in ["r", "q"] {
            router.handle(Outbound::Route { request: rid(request), next: me, entry: me }).await;
            router.handle(Outbound::Frame(token(request))).await;
            router.handle(Outbound::Frame(token(request))).await;
        }
        for request in ["r", "r", "q", "q"] {
            match entry.try_recv() {
                Ok(ToEntry::Tokens { request: r, tokens }) => assert_eq!((r, tokens), (rid(request), vec![1])),
                other => panic!("expected tokens of {request}, got {other:?}"),
            }
        }
        router.handle(Outbound::Frame(Frame::end(rid("r"), 0))).await;
        assert!(!router.routes.contains_key(&rid("r")), "its end forgets the route");
        router.handle(Outbound::Frame(token("r"))).await;
        router.handle(Outbound::Frame(Frame::error(rid("q"), 0, ErrorCode::Internal, "sampler trapped"))).await;
        assert!(matches!(entry.try_recv(), Ok(ToEntry::Failed { request, code: ErrorCode::Internal, .. }) if request == rid("q")));
        assert!(entry.try_recv().is_err(), "a late token of an ended request is dropped");
        assert!(a_rx.try_recv().is_err() && b_rx.try_recv().is_err(), "nothing went on a link");
        assert!(router.routes.is_empty());
    }

    #[test]
    fn frames_are_numbered_per_request_and_counters_end_with_the_request() {
        let mut n = Numbering::default();
        let sampling = SamplingHeader::default();
        let mut seqs = Vec::new();
        for mut f in [
            Frame::start(rid("a"), sampling.clone()),
            Frame::start(rid("b"), sampling),
            Frame::token(TokenHeader { request: rid("a"), seq: 99, tokens: vec![1], finish: None }),
            Frame::end(rid("a"), 99),
            Frame::token(TokenHeader { request: rid("b"), seq: 99, tokens: vec![1], finish: None }),
        ] {
            assert!(n.stamp(&mut f));
            seqs.push(f.header.seq());
        }
        assert_eq!(seqs, [Some(0), Some(0), Some(1), Some(2), Some(1)]);
        assert!(!n.counters.contains_key(&rid("a")), "end drops the counter");
    }
}
