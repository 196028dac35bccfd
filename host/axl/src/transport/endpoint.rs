//! The QUIC endpoint (iroh): one per worker, bound once, dialling and accepting persistent
//! connections authenticated by ed25519 peer ids.

use std::net::SocketAddr;
use std::time::Duration;

use iroh::endpoint::{AckFrequencyConfig, Connection, QuicTransportConfig, VarInt, presets};
use iroh::{Endpoint, EndpointAddr, RelayMap, RelayMode, RelayUrl};

use super::TransportError;
use super::identity::{PeerId, SecretKey};

/// ALPN of shard-to-shard links: one bidirectional stream per connection, frames forward, nothing back.
pub const FRAMES_ALPN: &[u8] = b"computepool/frames/1";
/// ALPN of client streams on the entry: one bidirectional stream per request (JSON lines).
pub const GENERATE_ALPN: &[u8] = b"computepool/generate/1";

/// QUIC application close code for a refused connection: a peer the topology does not know, or a
/// link this worker cannot serve yet. The close reason says which.
pub const CLOSE_REFUSED: u32 = 0x10;
/// QUIC application close code for a peer that broke the protocol (bad frames).
pub const CLOSE_PROTOCOL: u32 = 0x11;
/// QUIC application close code for an orderly shutdown.
pub const CLOSE_SHUTDOWN: u32 = 0x12;

/// Where relays come from. Relays carry encrypted traffic between peers that cannot reach each other
/// directly (both behind NAT) and help them punch holes; they never see plaintext.
#[derive(Debug, Clone, Default)]
pub enum Relays {
    /// No relays, no address lookup: peers are dialled on the direct addresses the topology gives.
    /// What tests and single-host or LAN pools use.
    #[default]
    Disabled,
    /// Number 0's public relays and DNS address lookup (needs the internet).
    Public,
    /// Relays of the pool's own (`computepool relay`). The endpoint keeps a connection to the nearest
    /// (its home relay), where peers that cannot reach its addresses reach it; peers' relays are
    /// dialled on demand. No address lookup: a peer is dialled at the addresses and relay its topology
    /// entry gives.
    Custom(Vec<RelayUrl>),
}

/// How a worker's endpoint is set up.
#[derive(Debug, Clone)]
pub struct TransportConfig {
    /// The worker's identity.
    pub secret_key: SecretKey,
    /// UDP socket addresses to bind; empty binds `0.0.0.0:0` and `[::]:0` (any port).
    pub bind: Vec<SocketAddr>,
    /// Relay servers and address lookup. Default: disabled.
    pub relays: Relays,
    /// A peer that has sent nothing (not even a keep-alive) for this long is gone: its connection
    /// closes and every request that crossed it fails. Default 1 s, so a killed shard is noticed
    /// within 2 s with room to spare; raise it for links with long outages.
    pub peer_timeout: Duration,
    /// How often an idle connection sends a keep-alive. Default 200 ms (a few dozen bytes each).
    pub keep_alive: Duration,
}

impl TransportConfig {
    /// Defaults for `secret_key`: any port, no relays, 1 s peer timeout, 200 ms keep-alive.
    pub fn new(secret_key: SecretKey) -> Self {
        Self {
            secret_key,
            bind: Vec::new(),
            relays: Relays::Disabled,
            peer_timeout: Duration::from_millis(1000),
            keep_alive: Duration::from_millis(200),
        }
    }
}

/// A bound endpoint. Cheap to clone; all clones share the socket and connections.
#[derive(Debug, Clone)]
pub struct Transport {
    endpoint: Endpoint,
    /// Whether relays are configured (see [`Transport::wait_for_relay`]).
    has_relays: bool,
}

impl Transport {
    /// Binds the endpoint; it accepts [`FRAMES_ALPN`] and [`GENERATE_ALPN`] connections.
    pub async fn bind(config: TransportConfig) -> Result<Self, TransportError> {
        let idle = config
            .peer_timeout
            .try_into()
            .map_err(|_| TransportError::Config(format!("peer timeout {:?} is out of range", config.peer_timeout)))?;
        let quic = QuicTransportConfig::builder()
            .max_idle_timeout(Some(idle))
            .keep_alive_interval(config.keep_alive)
            .default_path_keep_alive_interval(config.keep_alive)
            .default_path_max_idle_timeout(config.peer_timeout)
            // Activations of a long prompt are megabytes: a window of 8 MiB per stream keeps a link
            // of a few ms RTT busy; backpressure still applies beyond it.
            .stream_receive_window(VarInt::from_u32(8 << 20))
            .receive_window(VarInt::from_u32(16 << 20))
            .ack_frequency_config(Some(ack_frequency()))
            .congestion_controller_factory(congestion_controller())
            .build();
        let mut builder = match &config.relays {
            Relays::Public => Endpoint::builder(presets::N0),
            Relays::Disabled | Relays::Custom(_) => Endpoint::builder(presets::Minimal),
        };
        builder = builder
            .secret_key(config.secret_key.clone())
            .alpns(vec![FRAMES_ALPN.to_vec(), GENERATE_ALPN.to_vec()])
            .transport_config(quic);
        builder = match &config.relays {
            Relays::Disabled => builder.relay_mode(RelayMode::Disabled),
            Relays::Public => builder,
            Relays::Custom(urls) => builder.relay_mode(RelayMode::Custom(RelayMap::from_iter(urls.iter().cloned()))),
        };
        for addr in &config.bind {
            builder = builder
                .bind_addr(*addr)
                .map_err(|e| TransportError::Config(format!("cannot bind {addr}: {e}")))?;
        }
        let endpoint = builder.bind().await.map_err(|e| TransportError::Bind(e.to_string()))?;
        Ok(Self { endpoint, has_relays: !matches!(config.relays, Relays::Disabled) })
    }

    /// This worker's peer id.
    pub fn id(&self) -> PeerId {
        self.endpoint.id()
    }

    /// Waits until the endpoint holds a connection to its home relay, so peers that can reach it only
    /// there can dial it; returns at once when it has no relays. A new endpoint picks its home relay
    /// after its first network report (iroh's probes of each relay; a few seconds). `Err` as
    /// soon as the relay refuses this peer (not in its pool), or after `timeout`, saying what the relay
    /// last answered.
    pub async fn wait_for_relay(&self, timeout: Duration) -> Result<(), TransportError> {
        use iroh::Watcher;
        if !self.has_relays {
            return Ok(());
        }
        let failed = |reason: String| TransportError::Connect { peer: "relay".into(), reason };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut watcher = self.endpoint.home_relay_status();
        loop {
            let status = watcher.get();
            if status.iter().any(|s| s.is_connected()) {
                return Ok(());
            }
            if let Some(s) = status.iter().find(|s| s.auth_denied_reason().is_some()) {
                return Err(failed(format!("{} refused this peer: {}", s.url(), s.auth_denied_reason().unwrap_or_default())));
            }
            match tokio::time::timeout_at(deadline, watcher.updated()).await {
                Ok(Ok(_)) => continue,
                Ok(Err(_)) => return Err(failed("the endpoint is closed".into())),
                Err(_) => {
                    let why = match status.first() {
                        None => "no relay was picked as home (none answered the endpoint's probes)".to_string(),
                        Some(s) => match s.last_error() {
                            Some(error) => format!("{}: {error}", s.url()),
                            None => format!("{} has not answered", s.url()),
                        },
                    };
                    return Err(failed(format!("not connected after {timeout:?}: {why}")));
                }
            }
        }
    }

    /// The local socket addresses the endpoint is bound to.
    pub fn bound_addrs(&self) -> Vec<SocketAddr> {
        self.endpoint.bound_sockets()
    }

    /// Dials `peer` with `alpn`: at `addrs`, through `relay` (the relay the peer keeps a connection to),
    /// or wherever address lookup finds it. With both, iroh tries the direct addresses and the relay
    /// at once and keeps the path that works (moving to a direct one when hole punching finds it).
    pub async fn connect(
        &self,
        peer: PeerId,
        addrs: &[SocketAddr],
        relay: Option<&RelayUrl>,
        alpn: &[u8],
    ) -> Result<Connection, TransportError> {
        let mut addr = addrs.iter().fold(EndpointAddr::new(peer), |a, s| a.with_ip_addr(*s));
        if let Some(url) = relay {
            addr = addr.with_relay_url(url.clone());
        }
        self.endpoint
            .connect(addr, alpn)
            .await
            .map_err(|e| TransportError::Connect { peer: peer.fmt_short().to_string(), reason: e.to_string() })
    }

    /// Waits for the next connection whose peer `allow` accepts (given its id and ALPN). A refused
    /// connection is closed at once with [`CLOSE_REFUSED`] and the reason `allow` gave (e.g. "unknown
    /// peer: …"), and waiting goes on. `None` once the endpoint is closed.
    pub async fn accept(&self, allow: impl Fn(&PeerId, &[u8]) -> Result<(), String>) -> Option<Connection> {
        loop {
            let incoming = self.endpoint.accept().await?;
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::debug!("incoming connection failed its handshake: {e}");
                    continue;
                }
            };
            let remote = conn.remote_id();
            match allow(&remote, conn.alpn()) {
                Ok(()) => return Some(conn),
                Err(reason) => {
                    tracing::warn!(peer = %remote, alpn = %String::from_utf8_lossy(conn.alpn()), "refused a connection: {reason}");
                    conn.close(VarInt::from_u32(CLOSE_REFUSED), reason.as_bytes());
                }
            }
        }
    }

    /// Closes every connection and the socket.
    pub async fn close(&self) {
        self.endpoint.close().await;
    }
}

/// A one-line description of why a connection closed, for errors shown to people.
pub fn describe_close(error: &iroh::endpoint::ConnectionError) -> String {
    use iroh::endpoint::ConnectionError as E;
    match error {
        E::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            format!("closed by the peer: {reason}")
        }
        E::TimedOut => "the peer stopped answering (timed out)".into(),
        E::LocallyClosed => "closed here".into(),
        other => other.to_string(),
    }
}

/// What this endpoint asks its peers about acknowledging its packets (QUIC's ACK-frequency extension,
/// which both ends of a link speak).
///
/// A decode step sends one small packet per link, and by default the receiver answers each with an
/// ACK-only packet at once: its connection sends that ACK before the frame even reaches the reader, so
/// every hop pays a `sendmsg` (and on loopback, the peer's receive) first. Asking peers to ACK after
/// [`ACK_ELICITING_THRESHOLD`] packets or [`MAX_ACK_DELAY`], whichever comes first, takes that off the
/// path: host/axl's `link_latency` example (a decode step's frames, 5 ms idle before each round trip as
/// between pipeline steps) measured ~300 µs per QUIC round trip before and ~150–190 µs after, and the
/// pipeline's per-hop time from a frame's send to its arrival fell from ~210–380 µs to ~140 µs (worker
/// trace logs, 2 shards on loopback). Out-of-order packets are still acknowledged at once (the default
/// reordering threshold), so loss detection is unchanged; the delay is below QUIC's default 25 ms, so
/// probe timeouts do not grow; bulk transfers (a long prompt's activations) get one ACK per 16
/// packets, as TCP's coalesced ACKs do.
fn congestion_controller() -> std::sync::Arc<noq_proto::congestion::CubicConfig> {
    let mut cubic = noq_proto::congestion::CubicConfig::default();
    cubic.initial_window(INITIAL_WINDOW);
    std::sync::Arc::new(cubic)
}

const INITIAL_WINDOW: u64 = 1 << 20;

fn ack_frequency() -> AckFrequencyConfig {
    let mut config = AckFrequencyConfig::default();
    config.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD)).max_ack_delay(Some(MAX_ACK_DELAY));
    config
}

/// Ack-eliciting packets a peer may receive before it must acknowledge them.
const ACK_ELICITING_THRESHOLD: u32 = 16;
/// The longest a peer may hold an acknowledgement back.
const MAX_ACK_DELAY: Duration = Duration::from_millis(10);
