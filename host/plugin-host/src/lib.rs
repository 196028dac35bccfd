//! ComputePool's WebAssembly plugin host. It owns everything between a plugin file on disk and a typed
//! call into it: plugin.toml manifests, the operator's capability grants, the wasmtime engine and its
//! on-disk cache of compiled components, per-call limits (fuel, memory), instance pools (a trapped
//! instance is replaced, never reused), the host capabilities plugins import, and one typed binding per
//! plugin kind and WIT version (`sampler/since_v0_1_0.rs`, …).
//!
//! It must never touch model tensors beyond the logits a sampler is handed, sockets, keys or the chain:
//! capabilities that need those (`http`, `chain`) are declared in wit/ and granted by later host versions.
//!
//! Entry point: [`PluginHost`] (loading, the registry of loaded plugins); per kind, [`SamplerPlugin`].

pub mod cache;
pub mod capability;
pub mod capability_granter;
mod capability_impls;
pub mod conformance;
pub mod engine;
pub mod error;
pub mod host_state;
pub mod imports;
pub mod kv_store;
pub mod limits;
pub mod manifest;
pub mod plugin_host;
pub mod random;
pub mod sampler;
pub mod world;

pub use cache::CompiledCache;
pub use capability::Capability;
pub use capability_granter::{CapabilityDenied, GrantPolicy};
pub use engine::EngineSettings;
pub use error::{CallError, LoadError};
pub use limits::{FailurePolicy, LimitCeilings, PluginLimits};
pub use manifest::{PluginKind, PluginManifest};
pub use plugin_host::{HostConfig, LoadReport, LoadedPlugin, PluginHost, Refusal, RescanReport};
pub use random::RequestRandom;
pub use sampler::{SampleInput, SamplerPlugin, SamplingParams};
pub use world::WitVersion;
