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

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, Trap};

use crate::chain_capability::ChainAccess;
use crate::error::{CallError, LoadError, describe};
use crate::host_state::HostState;
use crate::http_capability::HttpAccess;
use crate::kv_store::KvScope;
use crate::limits::FailurePolicy;
use crate::manifest::PluginManifest;
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

enum KeeperPre {
    V0_1_0(since_v0_1_0::KeeperAdapterPre<HostState>),
}

enum KeeperBindings {
    V0_1_0(since_v0_1_0::KeeperAdapter),
}

struct PooledInstance {
    store: Store<HostState>,
    bindings: KeeperBindings,
}

/// A loaded keeper-adapter plugin. Shared between threads; each call takes an instance from the pool.
pub struct KeeperPlugin {
    id: String,
    engine: Engine,
    pre: KeeperPre,
    fuel_per_call: u64,
    memory_bytes: u64,
    failure_policy: FailurePolicy,
    disable_after: u32,
    kv: KvScope,
    http: Option<HttpAccess>,
    chain: Option<ChainAccess>,
    metered: bool,
    idle: Mutex<Vec<PooledInstance>>,
    max_idle: usize,
    consecutive_failures: AtomicU32,
    disabled: AtomicBool,
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
        let world_mismatch = |e: wasmtime::Error| LoadError::WorldMismatch {
            id: manifest.id.clone(),
            world: format!("{}@{}", manifest.wit.world, manifest.wit.version),
            message: describe(&e),
        };
        let pre = match manifest.wit.version {
            WitVersion::V0_1_0 => KeeperPre::V0_1_0(since_v0_1_0::pre(linker, component).map_err(world_mismatch)?),
            other => {
                return Err(LoadError::UnsupportedWitVersion {
                    id: manifest.id.clone(),
                    kind: manifest.kind,
                    world: manifest.wit.world.clone(),
                    requested: other.to_string(),
                    supported: crate::world::list_versions(SUPPORTED_VERSIONS),
                });
            }
        };
        let plugin = Self {
            id: manifest.id.clone(),
            engine: engine.clone(),
            pre,
            fuel_per_call: manifest.limits.fuel_per_call,
            memory_bytes: manifest.limits.memory_bytes,
            failure_policy: manifest.limits.failure_policy,
            disable_after: manifest.limits.disable_after.max(1),
            kv,
            http: network.http,
            chain: network.chain,
            metered,
            idle: Mutex::new(Vec::new()),
            max_idle,
            consecutive_failures: AtomicU32::new(0),
            disabled: AtomicBool::new(false),
        };
        let first = plugin
            .instantiate()
            .map_err(|e| LoadError::Instantiate { id: manifest.id.clone(), message: e.to_string() })?;
        plugin.release(first);
        Ok(plugin)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The plugin's key-value scope, as the host sees it: where an operator's configuration for the
    /// plugin (a KeeperHub plugin's API keys) is put, and what the plugin keeps across restarts.
    pub fn kv(&self) -> &KvScope {
        &self.kv
    }

    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    pub fn idle_instances(&self) -> usize {
        self.lock_idle().len()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<PooledInstance>> {
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn instantiate(&self) -> Result<PooledInstance, CallError> {
        let state = HostState::new(&self.id, self.memory_bytes, self.kv.clone()).with_network(self.http.clone(), self.chain.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        if self.metered {
            store.set_fuel(self.fuel_per_call).map_err(|e| CallError::Instantiate { id: self.id.clone(), message: describe(&e) })?;
        }
        let bindings = match &self.pre {
            KeeperPre::V0_1_0(pre) => {
                KeeperBindings::V0_1_0(since_v0_1_0::instantiate(pre, &mut store).map_err(|e| self.classify(&store, &e))?)
            }
        };
        Ok(PooledInstance { store, bindings })
    }

    fn release(&self, instance: PooledInstance) {
        let mut idle = self.lock_idle();
        if idle.len() < self.max_idle {
            idle.push(instance);
        }
    }

    fn classify(&self, store: &Store<HostState>, e: &wasmtime::Error) -> CallError {
        if let Some(requested) = store.data().limiter.exceeded() {
            return CallError::MemoryLimit { id: self.id.clone(), requested: requested as u64, limit: store.data().limiter.limit() as u64 };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
            return CallError::OutOfFuel { id: self.id.clone(), fuel: self.fuel_per_call };
        }
        CallError::Trap { id: self.id.clone(), message: describe(e) }
    }

    /// Runs one call in a pooled instance; a trapped instance is dropped. `check` vets the plugin's
    /// answer; a failed check is a contract breach and drops the instance too.
    fn run<T>(
        &self,
        call: impl FnOnce(&KeeperBindings, &mut Store<HostState>) -> wasmtime::Result<Result<T, KeeperError>>,
        check: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<T, KeeperCallError> {
        if self.is_disabled() {
            return Err(CallError::Disabled { id: self.id.clone(), failures: self.consecutive_failures.load(Ordering::Acquire) }.into());
        }
        let result = self.run_once(call, check);
        match &result {
            Ok(_) | Err(KeeperCallError::Keeper { .. }) => self.consecutive_failures.store(0, Ordering::Release),
            Err(KeeperCallError::Plugin(e)) if e.is_plugin_fault() => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::warn!(plugin = %self.id, failures, error = %e, "keeper plugin call failed");
                if self.failure_policy == FailurePolicy::Disable && failures >= self.disable_after {
                    self.disabled.store(true, Ordering::Release);
                    tracing::error!(plugin = %self.id, failures, "keeper plugin disabled by its failure policy");
                }
            }
            Err(_) => {}
        }
        result
    }

    fn run_once<T>(
        &self,
        call: impl FnOnce(&KeeperBindings, &mut Store<HostState>) -> wasmtime::Result<Result<T, KeeperError>>,
        check: impl FnOnce(&T) -> Result<(), String>,
    ) -> Result<T, KeeperCallError> {
        let pooled = self.lock_idle().pop();
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self.instantiate()?,
        };
        if self.metered {
            instance
                .store
                .set_fuel(self.fuel_per_call)
                .map_err(|e| CallError::Instantiate { id: self.id.clone(), message: describe(&e) })?;
        }
        instance.store.data_mut().begin_call();
        let outcome = call(&instance.bindings, &mut instance.store);
        instance.store.data_mut().end_call();
        match outcome {
            Err(e) => Err(self.classify(&instance.store, &e).into()),
            Ok(Err(error)) => {
                self.release(instance);
                Err(KeeperCallError::Keeper { id: self.id.clone(), error })
            }
            Ok(Ok(value)) => match check(&value) {
                Ok(()) => {
                    self.release(instance);
                    Ok(value)
                }
                Err(message) => Err(CallError::ContractBreach { id: self.id.clone(), message }.into()),
            },
        }
    }

    /// Starts a run for `transition`; a keeper that already has a run under its idempotency key returns
    /// that run. An empty idempotency key is refused before the plugin sees it (it is what makes a
    /// retry safe).
    pub fn submit(&self, transition: &Transition) -> Result<Submission, KeeperCallError> {
        if transition.idempotency_key.is_empty() {
            return Err(KeeperCallError::Keeper {
                id: self.id.clone(),
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
