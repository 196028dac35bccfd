//! The encrypted peer-to-peer transport: QUIC through iroh, peers named by ed25519 public keys.
//!
//! - [`identity`]: key files and peer ids.
//! - [`topology`]: who serves which layers, who may connect to whom.
//! - [`endpoint`]: the bound QUIC endpoint, dialling and (filtered) accepting.
//! - [`link`]: frames over one ordered byte stream, with backpressure.
//! - [`relay`]: a relay server of the pool's own, for peers that cannot reach each other directly.
//!
//! A pipeline link is one persistent connection with one stream, opened once and reused for every
//! frame of every request: frames of a request arrive in order, and a slow receiver slows the sender
//! (QUIC flow control) instead of anything being dropped. Connections from peers the topology does not
//! name are closed during accept, before any frame is read.

pub mod endpoint;
pub mod identity;
pub mod link;
pub mod relay;
pub mod topology;

pub use endpoint::{FRAMES_ALPN, GENERATE_ALPN, Relays, Transport, TransportConfig, describe_close};
pub use identity::{PeerId, SecretKey, load_or_create_secret_key, parse_peer_id, read_secret_key, write_secret_key};
pub use link::{FrameReader, FrameWriter, LinkError};
pub use relay::{RelayAccess, RelayServer};
pub use iroh::RelayUrl;
pub use topology::{Layers, PeerRole, ShardPeer, Topology, check_relay_url};

/// What can go wrong setting up or using the transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A key file that cannot be read or written.
    #[error("key file {path}: {reason}")]
    Key {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// Text that is not a peer id.
    #[error("{text:?} is not a peer id (64 hex characters of an ed25519 public key): {reason}")]
    PeerId {
        /// The text, cut to 80 characters.
        text: String,
        /// The parser's reason.
        reason: String,
    },
    /// A topology that cannot be used.
    #[error("topology: {0}")]
    Topology(String),
    /// Settings that cannot be applied.
    #[error("transport settings: {0}")]
    Config(String),
    /// The endpoint could not bind its sockets.
    #[error("cannot bind the QUIC endpoint: {0}")]
    Bind(String),
    /// A peer could not be reached, or refused us.
    #[error("cannot connect to peer {peer}: {reason}")]
    Connect {
        /// Short form of the peer id.
        peer: String,
        /// Why.
        reason: String,
    },
}
