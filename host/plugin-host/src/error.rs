//! The host's errors: [`LoadError`] when a plugin is refused (it is then not loaded, and nothing already
//! loaded changes), [`CallError`] when one call fails (the request gets it, the host keeps serving).
//! Each message names the plugin and says what to fix.

use std::path::PathBuf;

use crate::capability::Capability;
use crate::capability_granter::CapabilityDenied;
use crate::manifest::PluginKind;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: invalid plugin manifest: {message}")]
    InvalidManifest { path: PathBuf, message: String },

    #[error(
        "plugin `{id}`: this host does not support {world}@{requested}; it supports {kind} versions: {supported}"
    )]
    UnsupportedWitVersion { id: String, kind: PluginKind, world: String, requested: String, supported: String },

    #[error("plugin `{id}`: {file} has sha256 {actual}, but plugin.toml says {expected}")]
    Sha256Mismatch { id: String, file: PathBuf, expected: String, actual: String },

    #[error("plugin `{id}`: limits.{limit} = {requested} is above the operator's ceiling of {ceiling}")]
    LimitAboveCeiling { id: String, limit: &'static str, requested: u64, ceiling: u64 },

    #[error(transparent)]
    CapabilityDenied(#[from] CapabilityDenied),

    #[error("plugin `{id}`: capability `{capability}` is granted but unavailable: {reason}")]
    CapabilityUnavailable { id: String, capability: Capability, reason: String },

    #[error("plugin `{id}`: {file} is not a valid WebAssembly component: {message}")]
    Compile { id: String, file: PathBuf, message: String },

    #[error(
        "plugin `{id}`: the component imports `{import}`, which is not a host capability; \
         a {kind} plugin may import only computepool:host/{{{allowed}}}@0.1.0"
    )]
    ExtraImport { id: String, kind: PluginKind, import: String, allowed: String },

    #[error(
        "plugin `{id}`: the component imports `{import}` but plugin.toml does not request the `{capability}` \
         capability; add it to `capabilities` (the operator must grant it too)"
    )]
    UndeclaredCapability { id: String, capability: Capability, import: String },

    #[error("plugin `{id}`: the component does not implement {world}: {message}")]
    WorldMismatch { id: String, world: String, message: String },

    #[error("plugin `{id}`: could not start an instance: {message}")]
    Instantiate { id: String, message: String },

    #[error("plugin `{id}` at {path} has the same id as the loaded plugin at {existing}")]
    DuplicateId { id: String, path: PathBuf, existing: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("plugin `{id}` ran out of fuel ({fuel} per call): stopped; the instance was replaced")]
    OutOfFuel { id: String, fuel: u64 },

    #[error(
        "plugin `{id}` tried to grow its memory to {requested} bytes, past its limit of {limit}: stopped; \
         the instance was replaced"
    )]
    MemoryLimit { id: String, requested: u64, limit: u64 },

    #[error("plugin `{id}` trapped: {message}; the instance was replaced")]
    Trap { id: String, message: String },

    #[error("plugin `{id}` returned token {token}, outside the vocabulary of {vocab}; the instance was replaced")]
    TokenOutOfRange { id: String, token: u32, vocab: usize },

    #[error("plugin `{id}` broke its contract: {message}; the instance was replaced")]
    ContractBreach { id: String, message: String },

    #[error("plugin `{id}` refused the input: {reason}")]
    Rejected { id: String, reason: String },

    #[error("plugin `{id}` is disabled after {failures} consecutive failures; reload it to serve again")]
    Disabled { id: String, failures: u32 },

    #[error("invalid input for plugin `{id}`: {message}")]
    InvalidInput { id: String, message: String },

    #[error("plugin `{id}`: could not start an instance: {message}")]
    Instantiate { id: String, message: String },
}

impl CallError {
    /// Whether the failure counts against the plugin (its failure policy), rather than the caller's input.
    pub fn is_plugin_fault(&self) -> bool {
        !matches!(self, CallError::Rejected { .. } | CallError::InvalidInput { .. } | CallError::Disabled { .. })
    }
}

/// One line for a wasmtime error and its causes ("outer: inner: root").
pub(crate) fn describe(error: &wasmtime::Error) -> String {
    error.chain().map(|e| e.to_string()).collect::<Vec<_>>().join(": ")
}
