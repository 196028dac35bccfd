//! The Gensyn AXL bridge: frames between shards over the AXL node daemon instead of our own QUIC
//! transport, for operators who run AXL.
//!
//! The daemon (github.com/gensyn-ai/axl) joins an encrypted Yggdrasil overlay keyed by ed25519
//! public keys and offers a local HTTP API: `POST /send` (fire-and-forget, one message), `GET /recv`
//! (polls one shared queue), `GET /topology`. One AXL message carries exactly one frame
//! (docs/PROTOCOL.md §2). The daemon gives no delivery or ordering guarantee: each send is a fresh
//! connection, and the receive queue holds 100 messages and silently evicts the oldest. The inbox
//! turns every loss or reordering into a failed request instead of wrong tokens.
//!
//! - [`api`]: the daemon's paths, headers, limits and `/topology` JSON, all in one place.
//! - [`AxlPeerId`]: a validated peer id, and the shortened form `/recv` reports senders in.
//! - [`AxlClient`]: `send` a frame, `recv` one, read the `topology`.
//! - [`AxlInbox`]: a polling task that checks each request's order and yields frames or
//!   per-request [`InboxError`]s through a bounded channel.
//! - [`standin`]: an in-process stand-in daemon network for tests, with fault knobs.
//!
//! HTTP is spoken by a small keep-alive HTTP/1.1 client of this module (`http.rs`), not reqwest:
//! with iroh in the same crate, reqwest is built with `rustls-no-provider` and its client builder
//! panics unless a process-wide rustls provider is installed. `http.rs` says what a switch back needs.
//!
//! # Found in the daemon's source, and assumed
//!
//! From gensyn-ai/axl at commit 9cba555 (2026-04-23), files named in [`api`]: the paths and headers
//! (`X-Destination-Peer-Id`, `X-From-Peer-Id`, `X-Sent-Bytes`), `204` on an empty queue, the
//! 100-slot drop-oldest queue, the 16 MiB default `max_message_size` (checked only by the receiving
//! daemon, which then drops the message silently), the `/topology` JSON, and that `/recv` reports a
//! sender by the key recovered from its Yggdrasil address, which keeps only about 113 bits of it
//! (see [`AxlPeerId::reported_form`]).
//!
//! Assumed: that the daemon's API stays on loopback without authentication (it has none), that one
//! process reads a daemon's `/recv` (the queue is shared by everything on the node), and that the
//! status codes other than `200`/`204` carry a short text body.

pub mod api;
mod client;
mod error;
mod gate;
mod http;
mod inbox;
mod peer_id;
pub mod standin;

pub use api::{AxlTopology, AxlTopologyPeer};
pub use client::{AxlClient, AxlClientConfig};
pub use error::{BridgeError, InboxError};
pub use inbox::{AxlInbox, AxlInboxConfig, InboxItem, InboxRequests};
pub use peer_id::{AxlPeerId, PEER_ID_HEX_LEN, PEER_ID_LEN, PeerIdError};
