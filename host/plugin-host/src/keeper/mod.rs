//! Keeper-adapter plugins (`computepool:keeper-adapter`): what the keeper driver calls to run a pool's
//! payment transitions as workflows — on KeeperHub (`keeperhub`), or on the host's own chain capability
//! (`local`). Each supported WIT version is a file (`since_v0_1_0.rs`); this module is what callers see.
//!
//! Calls block: a keeper reaches KeeperHub through the host's `http` capability and the chain through
//! `chain`, which wait for the network (seconds, for a transaction). Call them from a thread that may
//! block — on a tokio runtime, inside `tokio::task::spawn_blocking` — never from an async task.
//!
//! Every call runs with the plugin's fuel and memory limits in a pooled instance; a trapped instance is
//! dropped, never reused. A keeper holds no state between calls in its instance (one may be replaced at
//! any time): what must outlive a call (its runs, its configuration) it keeps in its kv-store scope, or
//! the service it drives keeps it. The host's durable log (host/keeper) is what makes a transition happen
//! once; the plugin's part is `submit` returning the run it already has for an idempotency key, and
//! `lookup` finding it after a crash.
//!
//! ```no_run
//! # fn demo(host: &computepool_plugin_host::PluginHost) -> Result<(), Box<dyn std::error::Error>> {
//! use computepool_plugin_host::keeper::{Transition, TransitionKind};
//! let keeper = host.keeper("keeperhub").expect("loaded");
//! let t = Transition {
//!     kind: TransitionKind::StreamStop,
//!     idempotency_key: "pool-1/stream-stop/7".into(),
//!     pool_id: "pool-1".into(),
//!     payload: r#"{"idempotencyKey": "pool-1/stream-stop/7", "poolId": "pool-1"}"#.into(),
//! };
//! let run = keeper.submit(&t)?;                  // blocks on KeeperHub
//! let status = keeper.status(&run.reference)?;
//! # Ok(()) }
//! ```

mod since_v0_1_0;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use crate::error::{CallError, LoadError};
use crate::host_state::HostState;
use crate::kv_store::KvScope;
use crate::manifest::PluginManifest;
use crate::pool::{Failed, Grants, InstancePool, Instantiate, unsupported_version, world_mismatch};
use crate::rail::RailNetwork;
use crate::world::WitVersion;

/// The keeper-adapter versions this host serves, oldest first.
pub const SUPPORTED_VERSIONS: &[WitVersion] = &[WitVersion::V0_1_0];

/// The most bytes a run reference may have: it is stored in the host's log and used in URLs.
pub const MAX_REFERENCE_BYTES: usize = 256;

/// The five workflows (WIT's `transition-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransitionKind {
    Propose,
    ActivateAndPool,
    StreamStart,
    StreamStop,
    HandleBreach,
}

/// One transition as the plugin gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub kind: TransitionKind,
    /// Stable across retries and restarts.
    pub idempotency_key: String,
    pub pool_id: String,
    /// JSON text: what the keeper's workflow reads as its trigger input.
    pub payload: String,
}

/// The keeper's id for a run (a workflow execution id, a transaction hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub reference: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionState {
    Pending,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionStatus {
    pub state: TransitionState,
    /// What the keeper reported (transaction hashes, an error).
    pub detail: String,
}

/// The keeper's own answer when it refuses (WIT's `keeper-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeeperError {
    #[error("invalid transition: {0}")]
    InvalidTransition(String),
    /// Retrying with the same idempotency key is safe.
    #[error("unavailable (retrying is safe): {0}")]
    Unavailable(String),
    #[error("rejected: {0}")]
    Rejected(String),
}

/// A failed keeper call: the keeper refused (typed), or the plugin failed (trap, fuel, memory, contract).
#[derive(Debug, thiserror::Error)]
pub enum KeeperCallError {
    #[error("keeper `{id}`: {error}")]
    Keeper { id: String, error: KeeperError },
    #[error(transparent)]
    Plugin(#[from] CallError),
}

impl KeeperCallError {
    /// The keeper's own error, if it was one.
    pub fn keeper_error(&self) -> Option<&KeeperError> {
        match self {
            KeeperCallError::Keeper { error, .. } => Some(error),
            KeeperCallError::Plugin(_) => None,
        }
    }
}

enum KeeperBindings {
    V0_1_0(since_v0_1_0::KeeperAdapter),
}

/// A loaded keeper-adapter plugin. Shared between threads; each call takes an instance from the pool.
pub struct KeeperPlugin {
    pool: InstancePool<KeeperBindings>,
}

impl KeeperPlugin {
    pub(crate) fn type_only_imports(version: WitVersion) -> &'static [&'static str] {
        match version {
            WitVersion::V0_1_0 => since_v0_1_0::TYPE_ONLY_IMPORTS,
            _ => &[],
        }
    }

    pub(crate) fn required_export(version: WitVersion) -> Option<&'static str> {
        match version {
            WitVersion::V0_1_0 => Some(since_v0_1_0::EXPORT),
            _ => None,
        }
    }

    /// `network`: the `http` and `chain` access the operator granted (the same grants a rail gets).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        engine: &Engine,
        linker: &Linker<HostState>,
        component: &Component,
        manifest: &PluginManifest,
        kv: KvScope,
        network: RailNetwork,
        max_idle: usize,
        metered: bool,
    ) -> Result<Self, LoadError> {
        let instantiate: Instantiate<KeeperBindings> = match manifest.wit.version {
            WitVersion::V0_1_0 => {
                let pre = since_v0_1_0::pre(linker, component).map_err(world_mismatch(manifest))?;
                Box::new(move |store| Ok(KeeperBindings::V0_1_0(since_v0_1_0::instantiate(&pre, store)?)))
            }
            _ => return Err(unsupported_version(manifest, SUPPORTED_VERSIONS)),
        };
        let grants = Grants { kv, http: network.http, chain: network.chain };
        Ok(Self { pool: InstancePool::new(engine, manifest, "keeper", grants, max_idle, metered, instantiate)? })
    }

    pub fn id(&self) -> &str {
        self.pool.id()
    }

    /// The plugin's key-value scope, as the host sees it: where an operator's configuration for the
    /// plugin (a KeeperHub plugin's API keys) is put, and what the plugin keeps across restarts.
    pub fn kv(&self) -> &KvScope {
        self.pool.kv()
    }

    pub fn is_disabled(&self) -> bool {
        self.pool.is_disabled()
    }

    pub fn idle_instances(&self) -> usize {
        self.pool.idle_instances()
    }

    /// Runs one call in a pooled instance (see [`InstancePool::call`]); `check` vets the plugin's
    /// answer, and a failed check is a contract breach.
    fn run<T>(
        &self,
        call: impl FnOnce(&mut KeeperBindings, &mut Store<HostState>) -> wasmtime::Result<Result<T, KeeperError>>,
        check: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<T, KeeperCallError> {
        let checked = |value: T| check(&value).map(|()| value).map_err(|message| self.pool.breach(message));
        self.pool.call(call, checked).map_err(|failed| match failed {
            Failed::Refused(error) => KeeperCallError::Keeper { id: self.id().to_string(), error },
            Failed::Plugin(e) => e.into(),
        })
    }

    /// Starts a run for `transition`; a keeper that already has a run under its idempotency key returns
    /// that run. An empty idempotency key is refused before the plugin sees it (it is what makes a
    /// retry safe).
    pub fn submit(&self, transition: &Transition) -> Result<Submission, KeeperCallError> {
        if transition.idempotency_key.is_empty() {
            return Err(KeeperCallError::Keeper {
                id: self.id().to_string(),
                error: KeeperError::InvalidTransition("the idempotency key is empty".into()),
            });
        }
        self.run(
            |b, store| match b {
                KeeperBindings::V0_1_0(k) => since_v0_1_0::submit(k, store, transition),
            },
            |s| check_reference(&s.reference),
        )
    }

    /// The state of a run `submit` returned.
    pub fn status(&self, reference: &str) -> Result<TransitionStatus, KeeperCallError> {
        self.run(
            |b, store| match b {
                KeeperBindings::V0_1_0(k) => since_v0_1_0::status(k, store, reference),
            },
            |_| Ok(()),
        )
    }

    /// The run the keeper already has under `idempotency_key`, if any.
    pub fn lookup(&self, idempotency_key: &str) -> Result<Option<Submission>, KeeperCallError> {
        self.run(
            |b, store| match b {
                KeeperBindings::V0_1_0(k) => since_v0_1_0::lookup(k, store, idempotency_key),
            },
            |s| s.as_ref().map_or(Ok(()), |s| check_reference(&s.reference)),
        )
    }
}

/// A reference is what the host polls and logs: it must be there, and short.
fn check_reference(reference: &str) -> Result<(), String> {
    if reference.is_empty() {
        return Err("the keeper returned an empty run reference".into());
    }
    if reference.len() > MAX_REFERENCE_BYTES {
        return Err(format!("the keeper returned a run reference of {} bytes (at most {MAX_REFERENCE_BYTES})", reference.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_must_be_present_and_short() {
        assert!(check_reference("exec_1").is_ok());
        assert!(check_reference("").unwrap_err().contains("empty"));
        assert!(check_reference(&"a".repeat(MAX_REFERENCE_BYTES)).is_ok());
        assert!(check_reference(&"a".repeat(MAX_REFERENCE_BYTES + 1)).unwrap_err().contains("at most"));
    }
}
