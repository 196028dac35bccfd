//! The call path every plugin kind shares: a pool of ready instances of one plugin, each call run with
//! the plugin's fuel and memory limits in one of them, and the failure policy kept across calls.
//!
//! - A call takes an idle instance (or starts one), refills its fuel and runs. An instance that traps,
//!   runs out of fuel or memory, or answers outside its contract is dropped, never reused: the next
//!   call starts a fresh one. A healthy instance goes back to the pool (at most `max_idle` are kept).
//! - A plugin's own typed refusal (a keeper's `unavailable`, a sampler's rejection) is a healthy answer.
//! - Consecutive plugin faults count toward the manifest's failure policy: with `disable`, the plugin
//!   refuses every call after `disable_after` of them; any healthy answer resets the count.
//!
//! The kinds (sampler/, rail/, keeper/, voter/) keep what is theirs: the WIT version files, input
//! checks, and what their answers must satisfy.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use wasmtime::{Engine, Store, Trap};

use crate::chain_capability::ChainAccess;
use crate::error::{CallError, LoadError, describe};
use crate::host_state::HostState;
use crate::http_capability::HttpAccess;
use crate::kv_store::KvScope;
use crate::limits::FailurePolicy;
use crate::manifest::PluginManifest;
use crate::world::WitVersion;

/// What an instance's store is given: the plugin's key-value scope and its network grants.
pub(crate) struct Grants {
    pub kv: KvScope,
    pub http: Option<HttpAccess>,
    pub chain: Option<ChainAccess>,
}

/// One instance: its store (limits, capabilities) and the kind's typed bindings.
pub(crate) struct Instance<B> {
    pub store: Store<HostState>,
    pub bindings: B,
}

/// Starts the kind's bindings in a new store (the WIT version's `instantiate`).
pub(crate) type Instantiate<B> = Box<dyn Fn(&mut Store<HostState>) -> wasmtime::Result<B> + Send + Sync>;

/// Why a call gave no value.
pub(crate) enum Failed<E> {
    /// The plugin's own typed refusal; the instance is healthy.
    Refused(E),
    /// The plugin failed (trap, fuel, memory, contract) or is disabled.
    Plugin(CallError),
}

/// A pool of instances of one loaded plugin. Shared between threads.
pub(crate) struct InstancePool<B> {
    id: String,
    /// The plugin kind, for logs ("sampler", "rail", …).
    kind: &'static str,
    engine: Engine,
    instantiate: Instantiate<B>,
    fuel_per_call: u64,
    memory_bytes: u64,
    failure_policy: FailurePolicy,
    disable_after: u32,
    grants: Grants,
    /// Whether the engine meters fuel (always, outside the metering benchmark).
    metered: bool,
    idle: Mutex<Vec<Instance<B>>>,
    max_idle: usize,
    consecutive_failures: AtomicU32,
    disabled: AtomicBool,
}

impl<B> InstancePool<B> {
    /// A pool for `manifest`'s plugin; starts one instance now, so a plugin whose initial memory passes
    /// its limit, or whose start-up traps, is refused at load time.
    pub fn new(
        engine: &Engine,
        manifest: &PluginManifest,
        kind: &'static str,
        grants: Grants,
        max_idle: usize,
        metered: bool,
        instantiate: Instantiate<B>,
    ) -> Result<Self, LoadError> {
        let pool = Self {
            id: manifest.id.clone(),
            kind,
            engine: engine.clone(),
            instantiate,
            fuel_per_call: manifest.limits.fuel_per_call,
            memory_bytes: manifest.limits.memory_bytes,
            failure_policy: manifest.limits.failure_policy,
            disable_after: manifest.limits.disable_after.max(1),
            grants,
            metered,
            idle: Mutex::new(Vec::new()),
            max_idle,
            consecutive_failures: AtomicU32::new(0),
            disabled: AtomicBool::new(false),
        };
        let first = pool.start().map_err(|e| LoadError::Instantiate { id: manifest.id.clone(), message: e.to_string() })?;
        pool.release(first);
        Ok(pool)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn kv(&self) -> &KvScope {
        &self.grants.kv
    }

    /// The fuel a call has burned so far in `store` (the conformance kit's budget unit); 0 when the
    /// engine does not meter.
    pub fn fuel_used(&self, store: &Store<HostState>) -> u64 {
        if self.metered { self.fuel_per_call.saturating_sub(store.get_fuel().unwrap_or(0)) } else { 0 }
    }

    /// Whether the failure policy disabled the plugin.
    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    /// Instances waiting in the pool.
    pub fn idle_instances(&self) -> usize {
        self.lock_idle().len()
    }

    /// [`CallError::Disabled`] once the failure policy disabled the plugin.
    pub fn refuse_if_disabled(&self) -> Result<(), CallError> {
        if self.is_disabled() {
            return Err(CallError::Disabled { id: self.id.clone(), failures: self.consecutive_failures.load(Ordering::Acquire) });
        }
        Ok(())
    }

    /// The plugin answered something its contract forbids.
    pub fn breach(&self, message: String) -> CallError {
        CallError::ContractBreach { id: self.id.clone(), message }
    }

    /// Runs one call in a pooled instance. `call` gets the bindings and the store (its fuel refilled);
    /// `check` vets the plugin's answer and turns it into the caller's type: an error there drops the
    /// instance as a trap does.
    pub fn call<R, T, E>(
        &self,
        call: impl FnOnce(&mut B, &mut Store<HostState>) -> wasmtime::Result<Result<R, E>>,
        check: impl FnOnce(R) -> Result<T, CallError>,
    ) -> Result<T, Failed<E>> {
        self.refuse_if_disabled().map_err(Failed::Plugin)?;
        let result = self.call_once(call, check);
        match &result {
            Ok(_) | Err(Failed::Refused(_)) => self.consecutive_failures.store(0, Ordering::Release),
            Err(Failed::Plugin(e)) if e.is_plugin_fault() => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::warn!(plugin = %self.id, failures, error = %e, "{} plugin call failed", self.kind);
                if self.failure_policy == FailurePolicy::Disable && failures >= self.disable_after {
                    self.disabled.store(true, Ordering::Release);
                    tracing::error!(plugin = %self.id, failures, "{} plugin disabled by its failure policy", self.kind);
                }
            }
            Err(Failed::Plugin(_)) => {}
        }
        result
    }

    fn call_once<R, T, E>(
        &self,
        call: impl FnOnce(&mut B, &mut Store<HostState>) -> wasmtime::Result<Result<R, E>>,
        check: impl FnOnce(R) -> Result<T, CallError>,
    ) -> Result<T, Failed<E>> {
        let pooled = self.lock_idle().pop();
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self.start().map_err(Failed::Plugin)?,
        };
        if self.metered {
            instance.store.set_fuel(self.fuel_per_call).map_err(|e| Failed::Plugin(self.instantiate_error(&e)))?;
        }
        instance.store.data_mut().begin_call();
        let outcome = call(&mut instance.bindings, &mut instance.store);
        instance.store.data_mut().end_call();
        match outcome {
            // Dropping `instance` here: a trapped instance is never reused.
            Err(e) => Err(Failed::Plugin(self.classify(&instance.store, &e))),
            Ok(Err(refusal)) => {
                self.release(instance);
                Err(Failed::Refused(refusal))
            }
            Ok(Ok(raw)) => {
                let value = check(raw).map_err(Failed::Plugin)?;
                self.release(instance);
                Ok(value)
            }
        }
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Instance<B>>> {
        // The pool is a plain Vec; a panic elsewhere cannot leave it half-updated.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn start(&self) -> Result<Instance<B>, CallError> {
        let state = HostState::new(&self.id, self.memory_bytes, self.grants.kv.clone())
            .with_network(self.grants.http.clone(), self.grants.chain.clone());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        if self.metered {
            store.set_fuel(self.fuel_per_call).map_err(|e| self.instantiate_error(&e))?;
        }
        let bindings = (self.instantiate)(&mut store).map_err(|e| self.classify(&store, &e))?;
        Ok(Instance { store, bindings })
    }

    fn instantiate_error(&self, e: &wasmtime::Error) -> CallError {
        CallError::Instantiate { id: self.id.clone(), message: describe(e) }
    }

    fn release(&self, instance: Instance<B>) {
        let mut idle = self.lock_idle();
        if idle.len() < self.max_idle {
            idle.push(instance);
        }
    }

    /// Turns a failed call into the error the caller sees: the memory limit, fuel, or another trap.
    fn classify(&self, store: &Store<HostState>, e: &wasmtime::Error) -> CallError {
        if let Some(requested) = store.data().limiter.exceeded() {
            return CallError::MemoryLimit {
                id: self.id.clone(),
                requested: requested as u64,
                limit: store.data().limiter.limit() as u64,
            };
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::OutOfFuel) {
            return CallError::OutOfFuel { id: self.id.clone(), fuel: self.fuel_per_call };
        }
        CallError::Trap { id: self.id.clone(), message: describe(e) }
    }
}

/// The load error for a component that does not export what `manifest`'s world says.
pub(crate) fn world_mismatch(manifest: &PluginManifest) -> impl Fn(wasmtime::Error) -> LoadError + '_ {
    move |e| LoadError::WorldMismatch {
        id: manifest.id.clone(),
        world: format!("{}@{}", manifest.wit.world, manifest.wit.version),
        message: describe(&e),
    }
}

/// The load error for a WIT version of `manifest`'s kind this host does not serve.
pub(crate) fn unsupported_version(manifest: &PluginManifest, supported: &[WitVersion]) -> LoadError {
    LoadError::UnsupportedWitVersion {
        id: manifest.id.clone(),
        kind: manifest.kind,
        world: manifest.wit.world.clone(),
        requested: manifest.wit.version.to_string(),
        supported: crate::world::list_versions(supported),
    }
}
