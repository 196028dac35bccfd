//! A relay server of the pool's own (`computepool relay`): iroh's relay, which forwards the encrypted
//! QUIC packets of peers that cannot reach each other directly (both behind NAT, or no route between
//! them) and helps them find a direct path (hole punching) when there is one.
//!
//! A relay never sees plaintext: what it forwards is QUIC, encrypted end to end between the two peers,
//! and each peer proves its id to the relay by signing a challenge with its key. So a relay can read
//! who talks to whom and how much, and can drop traffic, but cannot read or forge a frame. It serves
//! plain HTTP here (WebSocket upgrades on `/relay`): where the relay-to-peer metadata must be hidden
//! from the network too, run it behind a TLS terminator with a publicly trusted certificate (endpoints
//! check it against the Mozilla roots built into iroh) and give peers its `https://` URL.
//!
//! Who may use it: with an allow list (the pool's topology: its workers and clients), a peer whose id
//! is not on it is refused before it can send a packet, so a relay open on the internet carries only
//! its pool's traffic.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use iroh::RelayUrl;
use iroh_relay::server::{Access, AccessControl, ClientRequest, RelayConfig, Server, ServerConfig};

use super::TransportError;
use super::identity::PeerId;
use super::topology::Topology;

/// Who may connect to a relay.
#[derive(Debug, Clone)]
pub enum RelayAccess {
    /// Any peer (a relay for tests, or one in front of which something else filters).
    Anyone,
    /// Only these peers (the workers and clients of the pools it serves).
    Only(HashSet<PeerId>),
}

impl RelayAccess {
    /// Every worker and client of these pools.
    pub fn pools<'a>(topologies: impl IntoIterator<Item = &'a Topology>) -> Self {
        RelayAccess::Only(
            topologies
                .into_iter()
                .flat_map(|t| t.shards.iter().map(|s| s.peer).chain(t.clients.iter().copied()))
                .collect(),
        )
    }

    /// Whether `peer` may use the relay; `Err` is the reason given to a refused peer.
    pub fn admit(&self, peer: &PeerId) -> Result<(), String> {
        match self {
            RelayAccess::Anyone => Ok(()),
            RelayAccess::Only(peers) if peers.contains(peer) => Ok(()),
            RelayAccess::Only(_) => Err(format!("peer {} is not in this relay's pool", peer.fmt_short())),
        }
    }
}

/// The relay's gate: iroh asks it once per connecting peer, after the peer proved its id.
#[derive(Debug)]
struct Gate(RelayAccess);

impl AccessControl for Gate {
    async fn on_connect(&self, request: &ClientRequest) -> Access {
        let peer = request.endpoint_id();
        match self.0.admit(&peer) {
            Ok(()) => {
                tracing::debug!(peer = %peer.fmt_short(), "relay: peer connected");
                Access::Allow
            }
            Err(reason) => {
                tracing::warn!(peer = %peer.fmt_short(), "relay: refused a peer: {reason}");
                Access::Deny { reason: Some(reason) }
            }
        }
    }
}

/// A running relay server; it stops when [`RelayServer::shutdown`] is called or it is dropped.
#[derive(Debug)]
pub struct RelayServer {
    server: Server,
    url: RelayUrl,
}

impl RelayServer {
    /// Binds `listen` (TCP) and serves. The URL peers use is `http://` this address; when `listen`
    /// is unspecified (`0.0.0.0`), `advertise` must say which address peers reach it at.
    pub async fn spawn(listen: SocketAddr, advertise: Option<SocketAddr>, access: RelayAccess) -> Result<Self, TransportError> {
        if advertise.is_none() && listen.ip().is_unspecified() {
            return Err(TransportError::Config(format!(
                "the relay would listen on {listen}, every address of this host: say which one peers reach it at (advertise)"
            )));
        }
        let mut relay = RelayConfig::new(listen);
        relay.access = Arc::new(Gate(access));
        let mut config = ServerConfig::default();
        config.relay = Some(relay);
        let server = Server::spawn(config).await.map_err(|e| TransportError::Bind(format!("relay on {listen}: {e}")))?;
        // Without `advertise`, `listen` names one address (checked above); the port may have been 0.
        let at = advertise.unwrap_or_else(|| server.http_addr().expect("a relay server with an HTTP config has an HTTP address"));
        let url = format!("http://{at}").parse().map_err(|e| TransportError::Config(format!("relay URL for {at}: {e}")))?;
        Ok(Self { server, url })
    }

    /// The URL peers are given (a topology's `relay`).
    pub fn url(&self) -> &RelayUrl {
        &self.url
    }

    /// The TCP address it is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.server.http_addr().expect("a relay server with an HTTP config has an HTTP address")
    }

    /// Stops serving; connected peers lose the relay path (direct paths they found stay up).
    pub async fn shutdown(self) {
        if let Err(e) = self.server.shutdown().await {
            tracing::warn!("relay shutdown: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::identity::SecretKey;
    use crate::transport::topology::{Layers, ShardPeer};

    #[test]
    fn a_pool_relay_admits_its_workers_and_clients_only() {
        let (worker, client, stranger) = (SecretKey::generate().public(), SecretKey::generate().public(), SecretKey::generate().public());
        let topology = Topology {
            num_layers: 2,
            shards: vec![ShardPeer { peer: worker, layers: Layers { start: 0, end: 2 }, addrs: vec![], relay: None }],
            clients: vec![client],
        };
        let access = RelayAccess::pools([&topology]);
        assert!(access.admit(&worker).is_ok());
        assert!(access.admit(&client).is_ok());
        let refused = access.admit(&stranger).expect_err("a stranger is refused");
        assert!(refused.contains("not in this relay's pool"), "{refused}");
        assert!(RelayAccess::Anyone.admit(&stranger).is_ok());
    }
}
