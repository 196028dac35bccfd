//! Topology: which peers serve which layer ranges of a pool's model, where to reach them, and who may
//! submit requests. Every worker of a pool gets the same topology.
//!
//! A topology lists every worker of the pool with its layer range; a range may have several workers
//! (replicas). A request's **route** is one worker per range, chained from layer 0 to the last layer:
//! the entry (layers from 0) names it in the request's `start` frame, each shard sends to the next one
//! the route names, and the exit sends the tokens back to the route's entry. So any worker may send to
//! any worker of the pool, and a peer that is not in the pool, nor a listed client, is refused.
//!
//! A one-ring topology (one worker per range, in layer order) is the special case every earlier file
//! is: its only route is the ring.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use iroh::RelayUrl;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::TransportError;
use super::endpoint::Relays;
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

/// A shard plan's range ([`crate::ShardAssignment::layers`]) as a topology's.
impl TryFrom<std::ops::Range<usize>> for Layers {
    type Error = std::num::TryFromIntError;

    fn try_from(range: std::ops::Range<usize>) -> Result<Self, Self::Error> {
        Ok(Layers { start: u32::try_from(range.start)?, end: u32::try_from(range.end)? })
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
    /// Direct socket addresses it listens on. May be empty when it is reached through its relay.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// The relay it keeps a connection to (`computepool relay`; an `http://` or `https://` URL), for
    /// peers that cannot reach its addresses: behind NAT, with no route to it, or with none listed.
    /// The worker makes this its home relay; peers dial it there as well as at `addrs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayUrl>,
}

/// A pool's workers and their layer ranges, plus the peers allowed to submit requests to the entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Layers of the whole model; from layer 0, the ranges must chain to `num_layers`.
    pub num_layers: u32,
    /// The workers. Order matters only for defaults: the first worker of a range is the one a route
    /// gets when a request names none ([`Topology::default_route`]); a one-ring file lists the entry
    /// first and the exit last.
    pub shards: Vec<ShardPeer>,
    /// Peers (orchestrators, CLI clients) that may open generation streams on the entries.
    #[serde(default)]
    pub clients: Vec<PeerId>,
}

/// What a peer is to this worker, decided by the topology when its connection arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// Another worker of the pool: it may send this worker frames of the requests routed through both.
    Member,
    /// A client allowed to submit requests (only on an entry).
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

    /// Checks the invariants: at least one shard; every worker on some complete route (its range
    /// starts at 0 or where another worker's ends, and ends at `num_layers` or where another's starts);
    /// every peer id used once; clients distinct from shards.
    pub fn validate(&self) -> Result<(), TransportError> {
        let err = |m: String| Err(TransportError::Topology(m));
        if self.shards.is_empty() {
            return err("a topology needs at least one shard".into());
        }
        for (i, s) in self.shards.iter().enumerate() {
            if s.layers.is_empty() {
                return err(format!("shard {i} has an empty layer range {}", s.layers));
            }
            if s.layers.end > self.num_layers {
                return err(format!("shard {i} (layers {}) ends past the model's {} layers", s.layers, self.num_layers));
            }
            if s.layers.start != 0 && !self.shards.iter().any(|o| o.layers.end == s.layers.start) {
                return err(format!(
                    "shard {i} (layers {}) starts at layer {}, where no shard ends: ranges must be contiguous",
                    s.layers, s.layers.start
                ));
            }
            if s.layers.end != self.num_layers && !self.shards.iter().any(|o| o.layers.start == s.layers.end) {
                return err(format!(
                    "shard {i} (layers {}) ends at layer {}, where no shard starts and the model ({} layers) does not end: ranges must be contiguous",
                    s.layers, s.layers.end, self.num_layers
                ));
            }
        }
        for (i, s) in self.shards.iter().enumerate() {
            if let Some(url) = &s.relay {
                check_relay_url(url).map_err(|m| TransportError::Topology(format!("shard {i}: {m}")))?;
            }
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

    /// `peer`'s shard.
    pub fn shard(&self, peer: &PeerId) -> Option<&ShardPeer> {
        self.shards.iter().find(|s| &s.peer == peer)
    }

    /// The first listed entry shard (layers from 0): where a client that does not choose goes.
    pub fn entry(&self) -> &ShardPeer {
        self.entries().next().expect("a valid topology has an entry")
    }

    /// Every entry shard, in listed order.
    pub fn entries(&self) -> impl Iterator<Item = &ShardPeer> {
        self.shards.iter().filter(|s| s.layers.start == 0)
    }

    /// The route after `from` when a request names none: for each following range, the first listed
    /// worker that starts where the route so far ends. In a one-ring topology, the ring.
    pub fn default_route(&self, from: &ShardPeer) -> Vec<&ShardPeer> {
        let mut route = Vec::new();
        let mut end = from.layers.end;
        while end < self.num_layers {
            // Validation guarantees a next worker wherever a worker's range ends short of the model's.
            let Some(next) = self.shards.iter().find(|s| s.layers.start == end) else { break };
            route.push(next);
            end = next.layers.end;
        }
        route
    }

    /// Checks a route a request names after the worker `from`: every peer in the topology, the ranges
    /// chaining from `from`'s end to the model's last layer, and `entry` an entry shard. Returns the
    /// shards after `from` and the entry; `Err` says what is wrong, for the request's error frame.
    pub fn resolve_route<'a>(&'a self, from: &ShardPeer, next: &[PeerId], entry: &PeerId) -> Result<(Vec<&'a ShardPeer>, &'a ShardPeer), String> {
        let mut end = from.layers.end;
        let mut route = Vec::with_capacity(next.len());
        for peer in next {
            let shard = self.shard(peer).ok_or_else(|| format!("the route names peer {}, which is not in this pool's topology", peer.fmt_short()))?;
            if shard.layers.start != end {
                return Err(format!(
                    "the route does not chain: peer {} serves layers {}, but the route so far ends at layer {end}",
                    peer.fmt_short(),
                    shard.layers
                ));
            }
            end = shard.layers.end;
            route.push(shard);
        }
        if end != self.num_layers {
            return Err(format!("the route ends at layer {end}, short of the model's {} layers", self.num_layers));
        }
        let entry = self.shard(entry).ok_or_else(|| format!("the route's entry {} is not in this pool's topology", entry.fmt_short()))?;
        if entry.layers.start != 0 {
            return Err(format!("the route's entry {} serves layers {}, not an entry's", entry.peer.fmt_short(), entry.layers));
        }
        Ok((route, entry))
    }

    /// The relays an endpoint of this pool keeps open: `me`'s own when the topology gives it one (so
    /// that one is its home relay, where its peers look for it); otherwise every relay the topology
    /// names, so it can reach the peers behind them. [`Relays::Disabled`] when the pool has none.
    pub fn relays_for(&self, me: &PeerId) -> Relays {
        if let Some(own) = self.shard(me).and_then(|s| s.relay.clone()) {
            return Relays::Custom(vec![own]);
        }
        let mut all: Vec<RelayUrl> = Vec::new();
        for url in self.shards.iter().filter_map(|s| s.relay.as_ref()) {
            if !all.contains(url) {
                all.push(url.clone());
            }
        }
        if all.is_empty() { Relays::Disabled } else { Relays::Custom(all) }
    }

    /// What `remote` may be to the worker at shard `me`: another worker of the pool, a client (entries
    /// only), or nothing (`None`: refuse the connection).
    pub fn role_of(&self, me: usize, remote: &PeerId) -> Option<PeerRole> {
        if self.shards[me].peer != *remote && self.position(remote).is_some() {
            return Some(PeerRole::Member);
        }
        if self.shards[me].layers.start == 0 && self.clients.contains(remote) {
            return Some(PeerRole::Client);
        }
        None
    }
}

/// A relay's URL must be `http://` or `https://` with a host (what iroh's relay client dials).
pub fn check_relay_url(url: &RelayUrl) -> Result<(), String> {
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("relay {url} is not an http:// or https:// URL with a host"));
    }
    Ok(())
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
                .map(|&(start, end)| ShardPeer { peer: peer(), layers: Layers { start, end }, addrs: vec![], relay: None })
                .collect(),
            clients: vec![peer()],
        }
    }

    #[test]
    fn a_ring_of_three() {
        let t = topology(&[(0, 10), (10, 20), (20, 30)], 30);
        t.validate().expect("valid");
        let route: Vec<PeerId> = t.default_route(&t.shards[0]).iter().map(|s| s.peer).collect();
        assert_eq!(route, [t.shards[1].peer, t.shards[2].peer]);
        assert!(t.default_route(&t.shards[2]).is_empty(), "nothing after the exit");
        assert_eq!(t.role_of(1, &t.shards[0].peer), Some(PeerRole::Member));
        assert_eq!(t.role_of(0, &t.shards[2].peer), Some(PeerRole::Member));
        assert_eq!(t.role_of(0, &t.clients[0]), Some(PeerRole::Client));
        assert_eq!(t.role_of(1, &t.clients[0]), None, "clients talk to the entry only");
        assert_eq!(t.role_of(0, &t.shards[0].peer), None, "not itself");
        assert_eq!(t.role_of(0, &peer()), None);
        let back = Topology::from_json(&t.to_json()).expect("round trips");
        assert_eq!(back, t);
    }

    #[test]
    fn several_workers_per_range_make_mixed_routes() {
        // Two rings of a 0..15 / 15..30 split, and a third entry that splits at 10 (its own exit too).
        let t = topology(&[(0, 15), (15, 30), (0, 15), (15, 30), (0, 10), (10, 30)], 30);
        t.validate().expect("valid");
        assert_eq!(t.entries().count(), 3);
        assert_eq!(t.entry().peer, t.shards[0].peer);
        // Any 15..30 worker continues either 0..15 entry.
        let (route, entry) = t.resolve_route(&t.shards[2], &[t.shards[1].peer], &t.shards[2].peer).expect("mixed route");
        assert_eq!((route[0].peer, entry.peer), (t.shards[1].peer, t.shards[2].peer));
        assert_eq!(t.default_route(&t.shards[2]).iter().map(|s| s.peer).collect::<Vec<_>>(), [t.shards[1].peer]);
        assert_eq!(t.default_route(&t.shards[4]).iter().map(|s| s.peer).collect::<Vec<_>>(), [t.shards[5].peer]);
        // Routes that do not chain, stop short, name strangers or a non-entry are refused with why.
        let stranger = peer();
        for (from, next, entry, needle) in [
            (0, vec![t.shards[5].peer], t.shards[0].peer, "does not chain"),
            (4, vec![t.shards[1].peer], t.shards[4].peer, "does not chain"),
            (0, vec![], t.shards[0].peer, "short of the model's 30 layers"),
            (0, vec![stranger], t.shards[0].peer, "not in this pool's topology"),
            (0, vec![t.shards[1].peer], stranger, "entry"),
            (0, vec![t.shards[1].peer], t.shards[1].peer, "not an entry's"),
            (0, vec![t.shards[1].peer, t.shards[3].peer], t.shards[0].peer, "does not chain"),
        ] {
            let e = t.resolve_route(&t.shards[from], &next, &entry).expect_err(needle);
            assert!(e.contains(needle), "{e}");
        }
        // The exit's (empty) route back to its entry.
        assert!(t.resolve_route(&t.shards[3], &[], &t.shards[0].peer).is_ok());
    }

    #[test]
    fn invalid_topologies_say_why() {
        for (ranges, n, needle) in [
            (&[(0, 10), (11, 30)][..], 30, "contiguous"),
            (&[(0, 10), (10, 29)][..], 30, "the model (30 layers) does not end"),
            (&[(1, 30)][..], 30, "starts at layer 1"),
            (&[(0, 10), (10, 31)][..], 30, "past the model's 30 layers"),
            (&[(0, 10), (10, 30), (5, 30)][..], 30, "starts at layer 5"),
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
        let mut t = topology(&[(0, 10), (10, 30)], 30);
        t.shards[1].relay = Some("ftp://relay.example".parse().expect("a URL"));
        assert!(t.validate().unwrap_err().to_string().contains("shard 1: relay ftp://relay.example"));
    }

    #[test]
    fn a_worker_keeps_its_own_relay_and_the_others_keep_every_relay_named() {
        let mut t = topology(&[(0, 10), (10, 20), (20, 30)], 30);
        assert!(matches!(t.relays_for(&t.shards[0].peer), Relays::Disabled), "no relays, none kept");
        let (a, b): (RelayUrl, RelayUrl) = ("http://a.example:3340".parse().expect("URL"), "https://b.example".parse().expect("URL"));
        t.shards[1].relay = Some(a.clone());
        t.shards[2].relay = Some(b.clone());
        t.validate().expect("valid with relays");
        assert!(matches!(t.relays_for(&t.shards[1].peer), Relays::Custom(r) if r == [a.clone()]), "its own: its home");
        assert!(matches!(t.relays_for(&t.shards[0].peer), Relays::Custom(r) if r == [a.clone(), b.clone()]));
        assert!(matches!(t.relays_for(&t.clients[0]), Relays::Custom(r) if r == [a, b]), "a client reaches both");
        let back = Topology::from_json(&t.to_json()).expect("round trips");
        assert_eq!(back, t);
    }
}
