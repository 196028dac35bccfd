//! Coalition-voter plugins (`computepool:coalition-voter`): each judges one reported breach (an operator
//! that missed heartbeats, returned wrong output, ran too slowly or cut a stream) and answers a ballot —
//! eject, warn, dismiss or abstain, with a reason. The keeper's judge (host/keeper/src/judge.rs) asks
//! several voters, signs each ballot with that voter's host-held key and acts only on a k-of-n quorum;
//! this module only hosts the plugins. Each supported WIT version is a file (`since_v0_1_0.rs`); this
//! module is what callers see.
//!
//! Calls block: a voter may read the chain through the host's `chain` capability. Call them from a thread
//! that may block (`tokio::task::spawn_blocking`), never from an async task.
//!
//! Every call runs with the plugin's fuel and memory limits in a pooled instance; a trapped instance is
//! dropped, never reused, and the failure counts toward the plugin's failure policy. A ballot's reason
//! is kept and signed, so one longer than [`MAX_REASON_BYTES`] breaks the contract
//! ([`CallError::ContractBreach`]).
//!
//! ```no_run
//! # fn demo(host: &computepool_plugin_host::PluginHost) -> Result<(), Box<dyn std::error::Error>> {
//! use computepool_plugin_host::voter::{BreachKind, BreachReport};
//! let voter = host.voter("liveness").expect("loaded");
//! let ballot = voter.vote(&BreachReport {
//!     pool_id: "pool-7".into(),
//!     operator: "0x00000000000000000000000000000000000000aa".into(),
//!     kind: BreachKind::MissedHeartbeat,
//!     evidence: r#"{"intervalMs": 5000, "lastHeartbeatMs": 1000, "checkedAtMs": 61000}"#.into(),
//!     observed_at_ms: 61_000,
//! })?;                                                  // blocks
//! println!("{:?}: {}", ballot.decision, ballot.reason);
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
use crate::kv_store::KvScope;
use crate::limits::FailurePolicy;
use crate::manifest::PluginManifest;
use crate::world::WitVersion;

/// The coalition-voter versions this host serves, oldest first.
pub const SUPPORTED_VERSIONS: &[WitVersion] = &[WitVersion::V0_1_0];

/// The longest reason a ballot may carry (it is signed and stored with every ballot).
pub const MAX_REASON_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreachKind {
    /// The operator's worker stopped answering heartbeats.
    MissedHeartbeat,
    /// Its output disagreed with a re-computation.
    WrongOutput,
    /// It ran below the throughput it committed to.
    TooSlow,
    /// Its part of a stream stopped mid-request.
    StreamCut,
    Other,
}

/// What a voter judges (the WIT's `breach-report`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreachReport {
    pub pool_id: String,
    /// The accused operator's address (0x-prefixed hex).
    pub operator: String,
    pub kind: BreachKind,
    /// Evidence as JSON text; its format depends on the kind (each voter documents what it reads).
    pub evidence: String,
    /// When the reporter observed it (Unix milliseconds).
    pub observed_at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Remove the operator from the pool and stop its stream.
    Eject,
    /// Keep it, record a warning.
    Warn,
    /// The evidence does not show a breach.
    Dismiss,
    /// The voter cannot judge this kind.
    Abstain,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ballot {
    pub decision: Decision,
    /// Why, for the pool's records.
    pub reason: String,
}

/// The voter's own refusal to vote (WIT's `voter-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoterError {
    #[error("invalid report: {0}")]
    InvalidReport(String),
    #[error("unavailable: {0}")]
    Unavailable(String),
}

/// A failed vote: the voter refused (typed), or the plugin failed (trap, fuel, memory, contract).
#[derive(Debug, thiserror::Error)]
pub enum VoterCallError {
    #[error("voter `{id}`: {error}")]
    Voter { id: String, error: VoterError },
    #[error(transparent)]
    Plugin(#[from] CallError),
}

impl VoterCallError {
    /// The voter's own error, if it was one.
    pub fn voter_error(&self) -> Option<&VoterError> {
        match self {
            VoterCallError::Voter { error, .. } => Some(error),
            VoterCallError::Plugin(_) => None,
        }
    }
}

enum VoterPre {
    V0_1_0(since_v0_1_0::CoalitionVoterPre<HostState>),
}

enum VoterBindings {
    V0_1_0(since_v0_1_0::CoalitionVoter),
}

struct PooledInstance {
    store: Store<HostState>,
    bindings: VoterBindings,
}

/// A loaded coalition-voter plugin. Shared between threads; each call takes an instance from the pool.
pub struct VoterPlugin {
    id: String,
    engine: Engine,
    pre: VoterPre,
    fuel_per_call: u64,
    memory_bytes: u64,
    failure_policy: FailurePolicy,
    disable_after: u32,
    kv: KvScope,
    chain: Option<ChainAccess>,
    metered: bool,
    idle: Mutex<Vec<PooledInstance>>,
    max_idle: usize,
    consecutive_failures: AtomicU32,
    disabled: AtomicBool,
}

impl VoterPlugin {
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

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        engine: &Engine,
        linker: &Linker<HostState>,
        component: &Component,
        manifest: &PluginManifest,
        kv: KvScope,
        chain: Option<ChainAccess>,
        max_idle: usize,
        metered: bool,
    ) -> Result<Self, LoadError> {
        let world_mismatch = |e: wasmtime::Error| LoadError::WorldMismatch {
            id: manifest.id.clone(),
            world: format!("{}@{}", manifest.wit.world, manifest.wit.version),
            message: describe(&e),
        };
        let pre = match manifest.wit.version {
            WitVersion::V0_1_0 => VoterPre::V0_1_0(since_v0_1_0::pre(linker, component).map_err(world_mismatch)?),
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
            chain,
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
        // Voters get no `http` (the capability table refuses it for this kind): a judgement rests on the
        // evidence and the chain, not on whatever a URL answers today.
        let state = HostState::new(&self.id, self.memory_bytes, self.kv.clone()).with_network(None, self.chain.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        if self.metered {
            store.set_fuel(self.fuel_per_call).map_err(|e| CallError::Instantiate { id: self.id.clone(), message: describe(&e) })?;
        }
        let bindings = match &self.pre {
            VoterPre::V0_1_0(pre) => {
                VoterBindings::V0_1_0(since_v0_1_0::instantiate(pre, &mut store).map_err(|e| self.classify(&store, &e))?)
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

    /// Asks the voter for its ballot on `report`. Blocks while the plugin runs (and while it reads the
    /// chain, if it was granted `chain`).
    pub fn vote(&self, report: &BreachReport) -> Result<Ballot, VoterCallError> {
        self.vote_metered(report).map(|(ballot, _)| ballot)
    }

    /// As [`Self::vote`], and also the fuel the call burned (the conformance kit's budget unit; 0 when
    /// the host runs without fuel).
    pub fn vote_metered(&self, report: &BreachReport) -> Result<(Ballot, u64), VoterCallError> {
        if self.is_disabled() {
            return Err(CallError::Disabled { id: self.id.clone(), failures: self.consecutive_failures.load(Ordering::Acquire) }.into());
        }
        let result = self.vote_once(report);
        match &result {
            Ok(_) | Err(VoterCallError::Voter { .. }) => self.consecutive_failures.store(0, Ordering::Release),
            Err(VoterCallError::Plugin(e)) if e.is_plugin_fault() => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::warn!(plugin = %self.id, failures, error = %e, "voter plugin call failed");
                if self.failure_policy == FailurePolicy::Disable && failures >= self.disable_after {
                    self.disabled.store(true, Ordering::Release);
                    tracing::error!(plugin = %self.id, failures, "voter plugin disabled by its failure policy");
                }
            }
            Err(_) => {}
        }
        result
    }

    fn vote_once(&self, report: &BreachReport) -> Result<(Ballot, u64), VoterCallError> {
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
        let outcome = match &instance.bindings {
            VoterBindings::V0_1_0(v) => since_v0_1_0::vote(v, &mut instance.store, report),
        };
        instance.store.data_mut().end_call();
        let fuel_used = if self.metered { self.fuel_per_call.saturating_sub(instance.store.get_fuel().unwrap_or(0)) } else { 0 };
        match outcome {
            Err(e) => Err(self.classify(&instance.store, &e).into()),
            Ok(Err(error)) => {
                self.release(instance);
                Err(VoterCallError::Voter { id: self.id.clone(), error })
            }
            Ok(Ok(ballot)) => match check_ballot(&ballot) {
                Ok(()) => {
                    self.release(instance);
                    Ok((ballot, fuel_used))
                }
                Err(message) => Err(CallError::ContractBreach { id: self.id.clone(), message }.into()),
            },
        }
    }
}

fn check_ballot(ballot: &Ballot) -> Result<(), String> {
    if ballot.reason.len() > MAX_REASON_BYTES {
        return Err(format!("a ballot's reason is {} bytes, more than {MAX_REASON_BYTES}", ballot.reason.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_is_bounded() {
        let ballot = |n: usize| Ballot { decision: Decision::Dismiss, reason: "x".repeat(n) };
        assert!(check_ballot(&ballot(MAX_REASON_BYTES)).is_ok());
        assert!(check_ballot(&ballot(MAX_REASON_BYTES + 1)).unwrap_err().contains("4097 bytes"));
    }
}
