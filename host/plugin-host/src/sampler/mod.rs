//! Sampler plugins: the exit shard hands one the logits of the last position, the request's history and
//! its parameters, and gets a token id. Each supported WIT version is a file (`since_v0_1_0.rs`); this
//! module is what callers see, whatever version a plugin was built against.
//!
//! Every call runs with the plugin's fuel and memory limits in a pooled instance. An instance that
//! traps, runs out of fuel or memory, or returns a token outside the vocabulary is dropped, never
//! reused; the next call starts a fresh one. The request's random stream lives with the caller, so a
//! replaced instance does not change what a seeded request draws.

mod since_v0_1_0;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store, Trap};

use crate::error::{CallError, LoadError, describe};
use crate::host_state::HostState;
use crate::kv_store::KvScope;
use crate::limits::FailurePolicy;
use crate::manifest::PluginManifest;
use crate::random::RequestRandom;
use crate::world::WitVersion;

/// The sampler versions this host serves, oldest first.
pub const SUPPORTED_VERSIONS: &[WitVersion] = &[WitVersion::V0_1_0];

/// Sampling parameters of one request, as the OpenAI-compatible API received them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 is greedy. Default 0.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all. Default 0.
    pub top_k: u32,
    /// Nucleus threshold in (0, 1]. Default 1 (off).
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in [0, 1]. Default 0 (off).
    pub min_p: f32,
    /// Multiplicative penalty for tokens in the history, > 0. Default 1 (off).
    pub repetition_penalty: f32,
    /// Default 0 (off).
    pub presence_penalty: f32,
    /// Default 0 (off).
    pub frequency_penalty: f32,
    /// The request's seed; the caller seeds its [`RequestRandom`] with it. Default 0.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// The ranges the WIT contract promises plugins.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!("temperature must be ≥ 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return Err("presence_penalty and frequency_penalty must be finite".to_string());
        }
        Ok(())
    }
}

/// One sampling step's input.
#[derive(Debug, Clone, Copy)]
pub struct SampleInput<'a> {
    /// Logits of the last position, one per vocabulary entry.
    pub logits: &'a [f32],
    /// The prompt's tokens, then the generated ones.
    pub history: &'a [u32],
    /// How many of the last `history` entries were generated.
    pub generated: u32,
    pub params: SamplingParams,
}

enum SamplerPre {
    V0_1_0(since_v0_1_0::SamplerPre<HostState>),
}

enum SamplerBindings {
    V0_1_0(since_v0_1_0::Sampler),
}

struct PooledInstance {
    store: Store<HostState>,
    bindings: SamplerBindings,
}

/// A loaded sampler plugin. Shared between threads; each call takes an instance from the pool.
pub struct SamplerPlugin {
    id: String,
    engine: Engine,
    pre: SamplerPre,
    fuel_per_call: u64,
    memory_bytes: u64,
    failure_policy: FailurePolicy,
    disable_after: u32,
    kv: KvScope,
    /// Whether the engine meters fuel (always, outside the metering benchmark).
    metered: bool,
    idle: Mutex<Vec<PooledInstance>>,
    max_idle: usize,
    consecutive_failures: AtomicU32,
    disabled: AtomicBool,
}

impl SamplerPlugin {
    /// Type-only imports of `version`'s world (see [`crate::imports`]).
    pub(crate) fn type_only_imports(version: WitVersion) -> &'static [&'static str] {
        match version {
            WitVersion::V0_1_0 => since_v0_1_0::TYPE_ONLY_IMPORTS,
            _ => &[],
        }
    }

    /// The interface a sampler of `version` must export.
    pub(crate) fn required_export(version: WitVersion) -> Option<&'static str> {
        match version {
            WitVersion::V0_1_0 => Some(since_v0_1_0::EXPORT),
            _ => None,
        }
    }

    /// Checks the component's exports against its declared version and starts one instance (so a plugin
    /// whose initial memory passes its limit, or whose start-up traps, is refused at load time).
    pub(crate) fn new(
        engine: &Engine,
        linker: &Linker<HostState>,
        component: &Component,
        manifest: &PluginManifest,
        kv: KvScope,
        max_idle: usize,
        metered: bool,
    ) -> Result<Self, LoadError> {
        let world_mismatch = |e: wasmtime::Error| LoadError::WorldMismatch {
            id: manifest.id.clone(),
            world: format!("{}@{}", manifest.wit.world, manifest.wit.version),
            message: describe(&e),
        };
        let pre = match manifest.wit.version {
            WitVersion::V0_1_0 => SamplerPre::V0_1_0(since_v0_1_0::pre(linker, component).map_err(world_mismatch)?),
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

    /// Whether the failure policy disabled the plugin.
    pub fn is_disabled(&self) -> bool {
        self.disabled.load(Ordering::Acquire)
    }

    /// Instances waiting in the pool.
    pub fn idle_instances(&self) -> usize {
        self.lock_idle().len()
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<PooledInstance>> {
        // The pool is a plain Vec; a panic elsewhere cannot leave it half-updated.
        self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn instantiate(&self) -> Result<PooledInstance, CallError> {
        let mut store = Store::new(&self.engine, HostState::new(&self.id, self.memory_bytes, self.kv.clone()));
        store.limiter(|state| &mut state.limiter);
        if self.metered {
            store.set_fuel(self.fuel_per_call).map_err(|e| self.instantiate_error(&e))?;
        }
        let bindings = match &self.pre {
            SamplerPre::V0_1_0(pre) => SamplerBindings::V0_1_0(
                since_v0_1_0::instantiate(pre, &mut store).map_err(|e| self.classify(&store, &e))?,
            ),
        };
        Ok(PooledInstance { store, bindings })
    }

    fn instantiate_error(&self, e: &wasmtime::Error) -> CallError {
        CallError::Instantiate { id: self.id.clone(), message: describe(e) }
    }

    fn release(&self, instance: PooledInstance) {
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

    /// Chooses the next token. `random` is the request's stream: it advances by what the plugin draws.
    pub fn sample(&self, random: &mut RequestRandom, input: &SampleInput<'_>) -> Result<u32, CallError> {
        self.sample_metered(random, input).map(|(token, _fuel)| token)
    }

    /// As [`Self::sample`], and also the fuel the call burned (the conformance kit's budget unit).
    pub fn sample_metered(&self, random: &mut RequestRandom, input: &SampleInput<'_>) -> Result<(u32, u64), CallError> {
        if self.is_disabled() {
            return Err(CallError::Disabled { id: self.id.clone(), failures: self.consecutive_failures.load(Ordering::Acquire) });
        }
        let invalid = |message: String| CallError::InvalidInput { id: self.id.clone(), message };
        if input.logits.is_empty() {
            return Err(invalid("the logits are empty".to_string()));
        }
        if u32::try_from(input.logits.len()).is_err() || u32::try_from(input.history.len()).is_err() {
            return Err(invalid("the logits or the history have more than 2^32 entries".to_string()));
        }
        if input.generated as usize > input.history.len() {
            return Err(invalid(format!(
                "{} generated tokens but a history of {}",
                input.generated,
                input.history.len()
            )));
        }
        input.params.validate().map_err(invalid)?;

        let result = self.call(random, input);
        match &result {
            Ok(_) => self.consecutive_failures.store(0, Ordering::Release),
            Err(e) if e.is_plugin_fault() => {
                let failures = self.consecutive_failures.fetch_add(1, Ordering::AcqRel) + 1;
                tracing::warn!(plugin = %self.id, failures, error = %e, "sampler plugin call failed");
                if self.failure_policy == FailurePolicy::Disable && failures >= self.disable_after {
                    self.disabled.store(true, Ordering::Release);
                    tracing::error!(plugin = %self.id, failures, "sampler plugin disabled by its failure policy");
                }
            }
            Err(_) => {}
        }
        result
    }

    fn call(&self, random: &mut RequestRandom, input: &SampleInput<'_>) -> Result<(u32, u64), CallError> {
        let pooled = self.lock_idle().pop();
        let mut instance = match pooled {
            Some(instance) => instance,
            None => self.instantiate()?,
        };
        let store = &mut instance.store;
        if self.metered {
            store.set_fuel(self.fuel_per_call).map_err(|e| self.instantiate_error(&e))?;
        }
        store.data_mut().random = Some(random.clone());
        store.data_mut().begin_call();
        let outcome = match &mut instance.bindings {
            SamplerBindings::V0_1_0(bindings) => since_v0_1_0::call(bindings, store, input),
        };
        store.data_mut().end_call();
        let fuel_used = if self.metered { self.fuel_per_call.saturating_sub(store.get_fuel().unwrap_or(0)) } else { 0 };
        // The stream advances by whatever the plugin drew, even if it then failed.
        if let Some(advanced) = store.data_mut().random.take() {
            *random = advanced;
        }
        match outcome {
            // Dropping `instance` here: a trapped instance is never reused.
            Err(e) => Err(self.classify(&instance.store, &e)),
            Ok(Err(reason)) => {
                self.release(instance);
                Err(CallError::Rejected { id: self.id.clone(), reason })
            }
            Ok(Ok(token)) if token as usize >= input.logits.len() => {
                Err(CallError::TokenOutOfRange { id: self.id.clone(), token, vocab: input.logits.len() })
            }
            Ok(Ok(token)) => {
                self.release(instance);
                Ok((token, fuel_used))
            }
        }
    }
}
