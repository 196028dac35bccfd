//! ComputePool's WebAssembly plugin host. It owns everything between a plugin file on disk and a typed
//! call into it: plugin.toml manifests, the operator's capability grants, the wasmtime engine and its
//! on-disk cache of compiled components, per-call limits (fuel, memory), instance pools (a trapped
//! instance is replaced, never reused), the host capabilities plugins import, and one typed binding per
//! plugin kind and WIT version (`sampler/since_v0_1_0.rs`, …).
//!
//! It never touches model tensors beyond the logits a sampler is handed. Sockets and keys stay on the
//! host side of `http` and `chain`: a plugin names a granted host or contract, the host makes the request
//! or signs the transaction (with host/chain's `Chain`), and hands back the answer.
//!
//! Entry point: [`PluginHost`] (loading, the registry of loaded plugins); per kind, [`SamplerPlugin`] and
//! [`RailPlugin`] (payment rails: [`rail`]), [`KeeperPlugin`] (keeper adapters: [`keeper`]),
//! [`VoterPlugin`] (coalition voters: [`voter`]). Rail, keeper and voter calls may block on the network:
//! call them from a blocking thread (`tokio::task::spawn_blocking`).

pub mod blocking;
pub mod cache;
pub mod capability;
pub mod capability_granter;
mod capability_impls;
pub mod chain_capability;
pub mod conformance;
pub mod engine;
pub mod error;
pub mod host_state;
pub mod http_capability;
pub mod imports;
pub mod keeper;
pub mod kv_store;
pub mod limits;
pub mod manifest;
pub mod plugin_host;
mod pool;
pub mod rail;
pub mod random;
pub mod sampler;
pub mod voter;
pub mod world;

pub use cache::CompiledCache;
pub use capability::Capability;
pub use capability_granter::{CapabilityDenied, GrantPolicy};
pub use chain_capability::{ChainCallError, ChainService, TxReceipt};
pub use engine::EngineSettings;
pub use error::{CallError, LoadError};
pub use limits::{FailurePolicy, LimitCeilings, PluginLimits};
pub use manifest::{PluginKind, PluginManifest};
pub use plugin_host::{HostConfig, LoadReport, LoadedPlugin, PluginHost, Refusal, RescanReport};
pub use http_capability::{HostGrant, HttpError, HttpLimits};
pub use keeper::{KeeperCallError, KeeperPlugin};
pub use rail::{BoundRail, FlowChange, FlowMember, FlowReceipt, RailCallError, RailError, RailInfo, RailPlugin};
pub use random::RequestRandom;
pub use sampler::{SampleInput, SamplerPlugin, SamplingParams};
pub use voter::{VoterCallError, VoterPlugin};
pub use world::WitVersion;
