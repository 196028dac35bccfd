//! A stand-in for the AXL daemon, for tests: an in-process network of nodes, each serving the same
//! local HTTP API as the real daemon ([`super::api`]) on its own `127.0.0.1` port.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use computepool_axl::bridge::standin::StandinNetwork;
//!
//! let network = StandinNetwork::new();
//! let a = network.start_node().await?;
//! let b = network.start_node().await?;
//! // a.client().send(b.peer_id(), &frame) … b.client().recv() …
//! b.drop_arrival(3); // the 4th message to reach b vanishes
//! # Ok(()) }
//! ```
//!
//! What it shares with the real daemon: the paths and headers, `204` from an empty `/recv`, one
//! receive queue per node of [`RECV_QUEUE_CAPACITY`] slots that evicts its oldest message when full,
//! senders reported in [`AxlPeerId::reported_form`], routing by that form (so replying to a reported
//! sender works), `400` for a missing or malformed destination, `502` for one that is not on the
//! network, the `/topology` JSON shape.
//!
//! Where it differs, on purpose: a message over the sending or the receiving node's size limit is
//! refused with `413` (the real daemon accepts it and the receiving daemon drops it silently), messages are delivered in the
//! order they were sent unless a knob says otherwise (the real network may reorder them), and
//! `/topology` lists every other node of the network as a directly connected peer (the real one
//! lists Yggdrasil links, often public relays).

mod queue;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use tokio::task::JoinHandle;

use self::queue::{QueuedMessage, StandinQueue};
use super::api::{
    AxlTopology, AxlTopologyPeer, DEFAULT_MAX_MESSAGE_SIZE, DESTINATION_PEER_HEADER, FROM_PEER_HEADER, RECV_PATH,
    RECV_QUEUE_CAPACITY, SEND_PATH, SENT_BYTES_HEADER, TOPOLOGY_PATH,
};
use super::client::{AxlClient, AxlClientConfig};
use super::peer_id::AxlPeerId;

/// How one stand-in node is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandinConfig {
    /// The node's key. Default `None`: the network makes up a new one per node (deterministic:
    /// the same in every run).
    pub key: Option<AxlPeerId>,
    /// Receive queue slots. Default [`RECV_QUEUE_CAPACITY`] (100), like the daemon; 0 is taken as 1.
    /// Changeable later with [`StandinNode::set_queue_capacity`].
    pub queue_capacity: usize,
    /// Largest message, in bytes, this node sends or receives: `POST /send` answers `413` for a body
    /// over the sending node's limit or over the destination's. Default [`DEFAULT_MAX_MESSAGE_SIZE`]
    /// (16 MiB), the daemon's default.
    pub max_message_size: u64,
}

impl Default for StandinConfig {
    fn default() -> Self {
        StandinConfig { key: None, queue_capacity: RECV_QUEUE_CAPACITY, max_message_size: DEFAULT_MAX_MESSAGE_SIZE }
    }
}

/// The in-process network stand-in nodes deliver through. Cheap to clone; clones are the same
/// network. Nodes are reachable from the moment they start until they are dropped.
#[derive(Debug, Clone, Default)]
pub struct StandinNetwork {
    inner: Arc<NetworkInner>,
}

#[derive(Debug, Default)]
struct NetworkInner {
    /// Nodes by the reported form of their key: the daemon routes by address, which is all that
    /// form carries.
    nodes: Mutex<HashMap<AxlPeerId, Arc<NodeState>>>,
    keys_made: AtomicU64,
}

#[derive(Debug)]
struct NodeState {
    key: AxlPeerId,
    uri: String,
    max_message_size: u64,
    queue: Mutex<StandinQueue>,
}

impl NodeState {
    fn queue(&self) -> MutexGuard<'_, StandinQueue> {
        // Queue methods do not panic, so a poisoned lock still holds a consistent queue.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl StandinNetwork {
    /// An empty network.
    pub fn new() -> Self {
        StandinNetwork::default()
    }

    /// Starts a node with the default [`StandinConfig`].
    pub async fn start_node(&self) -> io::Result<StandinNode> {
        self.start_node_with(StandinConfig::default()).await
    }

    /// Starts a node serving the daemon's API on a free `127.0.0.1` port.
    ///
    /// Errors: binding the port fails, or (`AddrInUse`) another node of this network already has
    /// the key, or one with the same Yggdrasil address.
    pub async fn start_node_with(&self, config: StandinConfig) -> io::Result<StandinNode> {
        let key = config.key.unwrap_or_else(|| self.make_key());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(NodeState {
            key,
            uri: format!("standin://{addr}"),
            max_message_size: config.max_message_size,
            queue: Mutex::new(StandinQueue::new(config.queue_capacity)),
        });
        {
            let mut nodes = self.nodes();
            let route = key.reported_form();
            if nodes.contains_key(&route) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a stand-in node with the address of key {} is already running", key.short()),
                ));
            }
            nodes.insert(route, Arc::clone(&state));
        }
        let body_limit = usize::try_from(config.max_message_size).unwrap_or(usize::MAX);
        let app = Router::new()
            .route(SEND_PATH, post(handle_send))
            .route(RECV_PATH, get(handle_recv))
            .route(TOPOLOGY_PATH, get(handle_topology))
            .layer(DefaultBodyLimit::max(body_limit))
            .with_state(AppState { node: Arc::clone(&state), network: self.clone() });
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "stand-in AXL node stopped");
            }
        });
        Ok(StandinNode { state, network: self.clone(), addr, server })
    }

    fn nodes(&self) -> MutexGuard<'_, HashMap<AxlPeerId, Arc<NodeState>>> {
        // Only inserts and removes happen under this lock; a poisoned one is still consistent.
        self.inner.nodes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn node(&self, destination: &AxlPeerId) -> Option<Arc<NodeState>> {
        self.nodes().get(&destination.reported_form()).cloned()
    }

    /// A new deterministic key: splitmix64 of a counter, so keys differ in their leading bits (and
    /// thus in their Yggdrasil addresses).
    fn make_key(&self) -> AxlPeerId {
        let mut state = self.inner.keys_made.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_mut(8) {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_be_bytes());
        }
        AxlPeerId::from_bytes(bytes)
    }
}

/// One running stand-in node. Dropping it stops its server and takes it off the network (sends to
/// it then get `502`).
#[derive(Debug)]
pub struct StandinNode {
    state: Arc<NodeState>,
    network: StandinNetwork,
    addr: SocketAddr,
    server: JoinHandle<()>,
}

impl StandinNode {
    /// The node's key: what others send to, and what its `/topology` reports.
    pub fn peer_id(&self) -> &AxlPeerId {
        &self.state.key
    }

    /// The node's API, `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The socket the API listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// A client of this node with otherwise default settings.
    pub fn client(&self) -> AxlClient {
        AxlClient::new(AxlClientConfig::with_base_url(self.base_url())).expect("a stand-in's URL is a valid http URL")
    }

    /// Queues `body` as if the node had received it from `from` (reported as
    /// [`AxlPeerId::reported_form`]), e.g. bytes that are not a frame. Counts as an arrival, so the
    /// knobs apply to it.
    pub fn inject(&self, from: &AxlPeerId, body: impl Into<Bytes>) {
        self.state.queue().arrive(QueuedMessage { from: from.reported_form(), body: body.into() });
    }

    /// Makes the message that arrives as number `index` (counting every arrival at this node from
    /// 0, including [`inject`](Self::inject)ed ones) vanish, as if the network had lost it.
    pub fn drop_arrival(&self, index: u64) {
        self.state.queue().drop_arrival(index);
    }

    /// Makes the message that arrives as number `index` swap places with the next one: it is held
    /// back and queued right after the next arrival (not at all if none comes).
    pub fn reorder_arrival(&self, index: u64) {
        self.state.queue().reorder_arrival(index);
    }

    /// Changes the receive queue's capacity (0 is taken as 1). A queue now over it loses its oldest
    /// messages, counted in [`overflow_drops`](Self::overflow_drops).
    pub fn set_queue_capacity(&self, capacity: usize) {
        self.state.queue().set_capacity(capacity);
    }

    /// Messages waiting in the receive queue.
    pub fn queued(&self) -> usize {
        self.state.queue().len()
    }

    /// Messages that arrived so far (the next arrival's number).
    pub fn arrivals(&self) -> u64 {
        self.state.queue().arrivals()
    }

    /// Messages the receive queue evicted because it was full.
    pub fn overflow_drops(&self) -> u64 {
        self.state.queue().overflow_drops()
    }
}

impl Drop for StandinNode {
    fn drop(&mut self) {
        self.server.abort();
        let mut nodes = self.network.nodes();
        let route = self.state.key.reported_form();
        if nodes.get(&route).is_some_and(|node| Arc::ptr_eq(node, &self.state)) {
            nodes.remove(&route);
        }
    }
}

/// What every handler of one node shares.
#[derive(Debug, Clone)]
struct AppState {
    node: Arc<NodeState>,
    network: StandinNetwork,
}

/// `POST /send`. A body over this node's limit never gets here: the body limit layer answers `413`.
async fn handle_send(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(destination) = headers.get(DESTINATION_PEER_HEADER) else {
        return (StatusCode::BAD_REQUEST, format!("Missing {DESTINATION_PEER_HEADER} header")).into_response();
    };
    let Some(destination) = destination.to_str().ok().and_then(|text| AxlPeerId::parse(text).ok()) else {
        return (StatusCode::BAD_REQUEST, "Invalid destination peer ID").into_response();
    };
    let Some(node) = state.network.node(&destination) else {
        let message = format!("Failed to reach peer: no stand-in node {}", destination.short());
        return (StatusCode::BAD_GATEWAY, message).into_response();
    };
    if body.len() as u64 > node.max_message_size {
        let message = format!(
            "message of {} bytes exceeds the destination's max_message_size of {} bytes",
            body.len(),
            node.max_message_size
        );
        return (StatusCode::PAYLOAD_TOO_LARGE, message).into_response();
    }
    let sent = body.len().to_string();
    node.queue().arrive(QueuedMessage { from: state.node.key.reported_form(), body });
    ([(SENT_BYTES_HEADER, sent)], StatusCode::OK).into_response()
}

/// `GET /recv`.
async fn handle_recv(State(state): State<AppState>) -> Response {
    let Some(message) = state.node.queue().pop() else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let headers = [(FROM_PEER_HEADER, message.from.to_hex()), ("Content-Type", "application/octet-stream".to_string())];
    (headers, message.body).into_response()
}

/// `GET /topology`.
async fn handle_topology(State(state): State<AppState>) -> Response {
    let mut peers: Vec<AxlTopologyPeer> = state
        .network
        .nodes()
        .values()
        .filter(|node| !Arc::ptr_eq(node, &state.node))
        .map(|node| AxlTopologyPeer {
            uri: node.uri.clone(),
            up: true,
            inbound: false,
            public_key: Some(node.key),
            port: 0,
        })
        .collect();
    peers.sort_by(|a, b| a.uri.cmp(&b.uri));
    let topology = AxlTopology {
        our_ipv6: state.node.key.yggdrasil_address().map(|a| a.to_string()).unwrap_or_default(),
        our_public_key: state.node.key,
        peers,
    };
    match serde_json::to_vec(&topology) {
        Ok(json) => ([("Content-Type", "application/json")], json).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nodes_get_distinct_deterministic_keys() {
        let network = StandinNetwork::new();
        let a = network.start_node().await.expect("starts");
        let b = network.start_node().await.expect("starts");
        assert_ne!(a.peer_id(), b.peer_id());
        assert!(!a.peer_id().same_node(b.peer_id()));
        let again = StandinNetwork::new().start_node().await.expect("starts");
        assert_eq!(again.peer_id(), a.peer_id(), "keys are the same in every run");
        assert_ne!(a.local_addr(), b.local_addr());
    }

    #[tokio::test]
    async fn a_key_can_run_only_once_per_network() {
        let network = StandinNetwork::new();
        let key = AxlPeerId::from_bytes([0x42; 32]);
        let config = StandinConfig { key: Some(key), ..StandinConfig::default() };
        let first = network.start_node_with(config.clone()).await.expect("starts");
        let error = network.start_node_with(config.clone()).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        // Same address, different tail: the daemon could not tell them apart either.
        let twin = StandinConfig { key: Some(key.reported_form()), ..StandinConfig::default() };
        assert_eq!(network.start_node_with(twin).await.unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(first);
        assert!(network.start_node_with(config).await.is_ok(), "a dropped node frees its key");
    }
}
