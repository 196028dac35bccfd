//! Keepers and coalitions: every payment state transition (propose, activate-and-pool, stream-start,
//! stream-stop, handle-breach) runs as a workflow — on KeeperHub through the `keeperhub` keeper-adapter
//! plugin, or on the built-in `local` keeper — and is logged durably, attempt by attempt, under an
//! idempotency key, so a crash at any point resumes without doing a transition twice. Breaches are judged
//! by coalition-voter plugins and acted on only with a quorum.
//!
//! It never touches activations, and it holds no chain keys: contract calls go through the host's chain
//! capability (or KeeperHub's wallet). The only keys here are the coalition voters' ballot keys.
//!
//! - `transition`: the transition types and the `Keeper` trait (mirrors wit/keeper-adapter).
//! - `log`: the SQLite transition log; `driver`: retries, backoff and crash-resume over it;
//!   `api`: `GET /transitions`.
//! - `webhook`: `POST /webhooks/keeperhub` (HMAC, time window, replay guard, on-chain confirmation).
//! - `keeperhub`: a native client for KeeperHub's REST API; `standin`: a local KeeperHub stand-in.
//! - `plugin`: `PluginKeeper`, the `Keeper` over a keeper-adapter plugin (`keeperhub`, `local`).
//! - `workflows`: the workflow files in keeperhub/workflows/ and the contract calls they name.
//! - `coalition`: signed ballots and the k-of-n tally.

pub mod api;
pub mod driver;
pub mod log;
pub mod transition;
pub mod webhook;
pub mod workflows;
pub mod coalition;
pub mod keeperhub;
pub mod standin;
pub mod plugin;
