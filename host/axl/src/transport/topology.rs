//! Topology: which peer serves which layer range of a pool's model, where to reach it, and who may
//! submit requests. Every worker of a pool gets the same topology; links follow from it.
//!
//! The pipeline is a ring: shard `i` sends activations to shard `i + 1`, and the exit (the last shard)
//! sends tokens back to the entry (shard 0). So every shard has exactly one upstream peer (whose
//! connection it accepts) and one downstream peer (which it dials), and a peer that is neither, nor a
//! listed client, is refused.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::TransportError;
use super::identity::PeerId;

/// A half-open layer range `start..end` of the model, written `"start..end"` in topology files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layers {
    /// First layer.
    pub start: u32,
    /// One past the last layer.
    pub end: u32,
}

impl Layers {
    /// Number of layers.
    pub fn len(&self) -> u32 {
        self.end - self.start
    }

    /// True if the range holds no layer (never true in a valid topology).
    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }
}

impl fmt::Display for Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

impl FromStr for Layers {
    type Err = TransportError;

    fn from_str(s: &str) -> Result<Self, TransportError> {
        let bad = || TransportError::Topology(format!("layer range {s:?} is not of the form START..END"));
        let (a, b) = s.split_once("..").ok_or_else(bad)?;
        let start = a.trim().parse().map_err(|_| bad())?;
        let end = b.trim().parse().map_err(|_| bad())?;
        if end <= start {
            return Err(TransportError::Topology(format!("layer range {s:?} is empty")));
        }
        Ok(Layers { start, end })
    }
}

impl Serialize for Layers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Layers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One shard of the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardPeer {
    /// The worker's peer id (its ed25519 public key, hex).
    pub peer: PeerId,
    /// The layers it runs.
    pub layers: Layers,
    /// Direct socket addresses it listens on. May be empty when relays or address lookup find it.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
}

/// A pool's pipeline: shards in layer order, plus the peers allowed to submit requests to the entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Layers of the whole model; the shards must cover `0..num_layers` exactly.
    pub num_layers: u32,
    /// The shards, entry first, exit last.
    pub shards: Vec<ShardPeer>,
    /// Peers (orchestrators, CLI clients) that may open generation streams on the entry.
    #[serde(default)]
    pub clients: Vec<PeerId>,
}

/// What a peer is to this worker, decided by the topology when its connection arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The shard that sends this worker its frames.
    Upstream,
    /// A client allowed to submit requests (only on the entry).
    Client,
}

impl Topology {
    /// Reads and validates a topology file (JSON).
    pub fn from_file(path: &Path) -> Result<Self, TransportError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TransportError::Topology(format!("cannot read {}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| match e {
            TransportError::Topology(m) => TransportError::Topology(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses and validates a topology from JSON text.
    pub fn from_json(text: &str) -> Result<Self, TransportError> {
        let topology: Topology =
            serde_json::from_str(text).map_err(|e| TransportError::Topology(format!("invalid topology JSON: {e}")))?;
        topology.validate()?;
        Ok(topology)
    }

    /// The topology as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a topology always serialises")
    }

    /// Checks the invariants: at least one shard, ranges contiguous from 0 to `num_layers`, every peer
    /// id used once, clients distinct from shards.
    pub fn validate(&self) -> Result<(), TransportError> {
        let err = |m: String| Err(TransportError::Topology(m));
        if self.shards.is_empty() {
            return err("a topology needs at least one shard".into());
        }
        let mut next = 0;
        for (i, s) in self.shards.iter().enumerate() {
            if s.layers.is_empty() {
                return err(format!("shard {i} has an empty layer range {}", s.layers));
            }
            if s.layers.start != next {
                return err(format!(
                    "shard {i} starts at layer {} but the previous shard ends at {next}: ranges must be contiguous",
                    s.layers.start
                ));
            }
            next = s.layers.end;
        }
        if next != self.num_layers {
            return err(format!("the shards cover layers 0..{next}, the model has {}", self.num_layers));
        }
        for (i, s) in self.shards.iter().enumerate() {
            if self.shards[..i].iter().any(|o| o.peer == s.peer) {
                return err(format!("peer {} serves more than one shard", s.peer.fmt_short()));
            }
            if self.clients.contains(&s.peer) {
                return err(format!("peer {} is both a shard and a client", s.peer.fmt_short()));
            }
        }
        Ok(())
    }

    /// The index of `peer`'s shard.
    pub fn position(&self, peer: &PeerId) -> Option<usize> {
        self.shards.iter().position(|s| &s.peer == peer)
    }

    /// The shard after shard `i` in the ring (the entry after the exit).
    pub fn downstream_of(&self, i: usize) -> &ShardPeer {
        &self.shards[(i + 1) % self.shards.len()]
    }

    /// The shard before shard `i` in the ring (the exit before the entry).
    pub fn upstream_of(&self, i: usize) -> &ShardPeer {
        &self.shards[(i + self.shards.len() - 1) % self.shards.len()]
    }

    /// The entry shard.
    pub fn entry(&self) -> &ShardPeer {
        &self.shards[0]
    }

    /// What `remote` may be to the worker at shard `me`: its upstream shard, a client (entry only), or
    /// nothing (`None`: refuse the connection).
    pub fn role_of(&self, me: usize, remote: &PeerId) -> Option<PeerRole> {
        if &self.upstream_of(me).peer == remote && self.shards.len() > 1 {
            return Some(PeerRole::Upstream);
        }
        if me == 0 && self.clients.contains(remote) {
            return Some(PeerRole::Client);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::identity::SecretKey;

    fn peer() -> PeerId {
        SecretKey::generate().public()
    }

    fn topology(ranges: &[(u32, u32)], num_layers: u32) -> Topology {
        Topology {
            num_layers,
            shards: ranges
                .iter()
                .map(|&(start, end)| ShardPeer { peer: peer(), layers: Layers { start, end }, addrs: vec![] })
                .collect(),
            clients: vec![peer()],
        }
    }

    #[test]
    fn a_ring_of_three() {
        let t = topology(&[(0, 10), (10, 20), (20, 30)], 30);
        t.validate().expect("valid");
        assert_eq!(t.downstream_of(2).peer, t.shards[0].peer);
        assert_eq!(t.upstream_of(0).peer, t.shards[2].peer);
        assert_eq!(t.role_of(1, &t.shards[0].peer), Some(PeerRole::Upstream));
        assert_eq!(t.role_of(0, &t.shards[2].peer), Some(PeerRole::Upstream));
        assert_eq!(t.role_of(0, &t.clients[0]), Some(PeerRole::Client));
        assert_eq!(t.role_of(1, &t.clients[0]), None, "clients talk to the entry only");
        assert_eq!(t.role_of(0, &t.shards[1].peer), None, "only the exit feeds the entry");
        assert_eq!(t.role_of(0, &peer()), None);
        let back = Topology::from_json(&t.to_json()).expect("round trips");
        assert_eq!(back, t);
    }

    #[test]
    fn invalid_topologies_say_why() {
        for (ranges, n, needle) in [
            (&[(0, 10), (11, 30)][..], 30, "contiguous"),
            (&[(0, 10), (10, 29)][..], 30, "cover layers 0..29"),
            (&[(1, 30)][..], 30, "starts at layer 1"),
            (&[][..], 30, "at least one shard"),
        ] {
            let e = topology(ranges, n).validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let mut t = topology(&[(0, 10), (10, 30)], 30);
        t.shards[1].peer = t.shards[0].peer;
        assert!(t.validate().unwrap_err().to_string().contains("more than one shard"));
        assert!(Topology::from_json(r#"{"num_layers":3,"shards":[],"x":1}"#).is_err());
        assert!("5..5".parse::<Layers>().is_err());
        assert!("a..5".parse::<Layers>().is_err());
        assert_eq!("0..5".parse::<Layers>().expect("parses"), Layers { start: 0, end: 5 });
    }
}
