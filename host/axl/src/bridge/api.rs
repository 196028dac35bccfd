//! The AXL daemon's local HTTP API: every path, header, limit and JSON shape the bridge relies on, in
//! one place. Taken from gensyn-ai/axl at commit 9cba555 (2026-04-23): `api/handler.go` (routes),
//! `api/send.go`, `api/recv.go`, `api/topology.go`, `api/tcp_helpers.go`, `cmd/node/config.go` and
//! `docs/api.md`. A daemon release that changes any of these changes this file only.

use serde::{Deserialize, Deserializer, Serialize};

use super::peer_id::AxlPeerId;

/// Where the daemon listens by default (`bridge_addr` 127.0.0.1, `api_port` 9002).
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:9002";

/// `POST`: fire-and-forget, one message per call. Header [`DESTINATION_PEER_HEADER`], body the raw
/// message. `200` once written to a fresh connection to the peer (nothing is read back), with
/// [`SENT_BYTES_HEADER`]; `400` for a missing or malformed peer id; `502` when the peer cannot be
/// reached; `500` when writing fails.
pub const SEND_PATH: &str = "/send";

/// `GET`: takes the oldest message from the node's one shared receive queue. `204` when empty;
/// `200` with the raw message as body and [`FROM_PEER_HEADER`].
pub const RECV_PATH: &str = "/recv";

/// `GET`: this node's key and Yggdrasil address and its directly connected peers, as [`AxlTopology`].
pub const TOPOLOGY_PATH: &str = "/topology";

/// Request header of [`SEND_PATH`]: the destination's 64-hex-character ed25519 public key.
pub const DESTINATION_PEER_HEADER: &str = "X-Destination-Peer-Id";

/// Response header of [`RECV_PATH`]: who sent the message, as a 64-hex-character key recovered from
/// the sender's Yggdrasil address (see [`AxlPeerId::reported_form`]).
pub const FROM_PEER_HEADER: &str = "X-From-Peer-Id";

/// Response header of [`SEND_PATH`]: bytes accepted.
pub const SENT_BYTES_HEADER: &str = "X-Sent-Bytes";

/// Default `max_message_size`: 16 777 216 bytes (16 MiB). A message of exactly this size passes.
///
/// The real daemon does not check it when sending: the *receiving* daemon reads the length prefix,
/// finds it over its limit and closes the connection, so the message vanishes while the sender got
/// `200`. The bridge therefore checks before sending, and the stand-in answers `413` instead.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 16 * 1024 * 1024;

/// Slots in the receive queue (`DefaultRecvQueue`, fixed in the daemon's code). A message arriving
/// at a full queue evicts the oldest one, silently.
pub const RECV_QUEUE_CAPACITY: usize = 100;

/// The `/topology` answer. Fields this bridge does not use (the spanning `tree`, each peer's `root`
/// and `coords`) are ignored when read and left out when the stand-in writes one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AxlTopology {
    /// This node's Yggdrasil IPv6 address, as text (`our_ipv6`).
    pub our_ipv6: String,
    /// This node's key: the id other nodes send to (`our_public_key`).
    pub our_public_key: AxlPeerId,
    /// Directly connected Yggdrasil peers (often public relay nodes, not other pool workers). The
    /// daemon writes `null` when there are none, read as empty.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub peers: Vec<AxlTopologyPeer>,
}

/// One directly connected Yggdrasil peer in [`AxlTopology::peers`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AxlTopologyPeer {
    /// The peering URI, e.g. `tls://1.2.3.4:9001`.
    pub uri: String,
    /// Whether the link is up.
    pub up: bool,
    /// Whether the peer dialled this node.
    pub inbound: bool,
    /// The peer's key; `None` while the daemon reports an empty one (a link not up yet).
    #[serde(deserialize_with = "empty_as_none", skip_serializing_if = "Option::is_none")]
    pub public_key: Option<AxlPeerId>,
    /// Yggdrasil's switch port number of the link.
    pub port: u64,
}

/// Go writes a nil slice as `null`.
fn null_as_empty<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// Go hex-encodes a nil key as `""`.
fn empty_as_none<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<AxlPeerId>, D::Error> {
    match Option::<String>::deserialize(deserializer)? {
        None => Ok(None),
        Some(text) if text.is_empty() => Ok(None),
        Some(text) => AxlPeerId::parse(&text).map(Some).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "1c3e0a4e3a7b9f8d2c1e0a4e3a7b9f8d2c1e0a4e3a7b9f8d2c1e0a4e3a7b9f8d";
    const PEER: &str = "9f8d2c1e0a4e3a7b9f8d2c1e0a4e3a7b9f8d2c1e0a4e3a7b9f8d2c1e0a4e3a7b";

    #[test]
    fn reads_the_daemons_topology_json() {
        // The shape api/topology.go writes, with the fields this bridge ignores.
        let json = format!(
            r#"{{"our_ipv6":"203:c1f5:b1c5:8460:72d3:e1f5:b1c5:8460","our_public_key":"{KEY}",
                "peers":[{{"uri":"tls://34.46.48.224:9001","up":true,"inbound":false,
                           "public_key":"{PEER}","root":"{PEER}","port":1,"coords":[1,4]}},
                         {{"uri":"tls://10.0.0.1:9001","up":false,"inbound":true,
                           "public_key":"","root":"","port":0,"coords":null}}],
                "tree":[{{"public_key":"{PEER}","parent":"{PEER}","sequence":7}}]}}"#
        );
        let topology: AxlTopology = serde_json::from_str(&json).expect("parses");
        assert_eq!(topology.our_public_key, AxlPeerId::parse(KEY).expect("valid"));
        assert_eq!(topology.peers.len(), 2);
        assert_eq!(topology.peers[0].public_key, Some(AxlPeerId::parse(PEER).expect("valid")));
        assert!(topology.peers[0].up);
        assert_eq!(topology.peers[1].public_key, None);
        assert!(topology.peers[1].inbound);
    }

    #[test]
    fn null_peers_read_as_none_and_bad_keys_are_refused() {
        let json = format!(r#"{{"our_ipv6":"200::","our_public_key":"{KEY}","peers":null,"tree":null}}"#);
        let topology: AxlTopology = serde_json::from_str(&json).expect("parses");
        assert!(topology.peers.is_empty());
        let bad = r#"{"our_ipv6":"200::","our_public_key":"abc","peers":null}"#;
        let error = serde_json::from_str::<AxlTopology>(bad).unwrap_err().to_string();
        assert!(error.contains("64 hex characters"), "{error}");
        let bad_peer = format!(r#"{{"our_ipv6":"200::","our_public_key":"{KEY}","peers":[{{"public_key":"zz"}}]}}"#);
        assert!(serde_json::from_str::<AxlTopology>(&bad_peer).is_err());
    }

    #[test]
    fn what_the_stand_in_writes_reads_back() {
        let topology = AxlTopology {
            our_ipv6: "200::1".into(),
            our_public_key: AxlPeerId::parse(KEY).expect("valid"),
            peers: vec![AxlTopologyPeer {
                uri: "standin://b".into(),
                up: true,
                public_key: Some(AxlPeerId::parse(PEER).expect("valid")),
                ..AxlTopologyPeer::default()
            }],
        };
        let json = serde_json::to_string(&topology).expect("serializes");
        assert_eq!(serde_json::from_str::<AxlTopology>(&json).expect("parses"), topology);
    }
}
