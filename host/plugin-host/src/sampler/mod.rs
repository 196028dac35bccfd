//! Sampler plugins: the exit shard hands one the logits of the last position, the request's history and
//! its parameters, and gets a token id. Each supported WIT version is a file (`since_v0_1_0.rs`); this
//! module is what callers see, whatever version a plugin was built against.
//!
//! Every call runs with the plugin's fuel and memory limits in a pooled instance. An instance that
//! traps, runs out of fuel or memory, or returns a token outside the vocabulary is dropped, never
//! reused; the next call starts a fresh one. The request's random stream lives with the caller, so a
//! replaced instance does not change what a seeded request draws.

mod since_v0_1_0;

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use crate::error::{CallError, LoadError};
use crate::host_state::HostState;
use crate::kv_store::KvScope;
use crate::manifest::PluginManifest;
use crate::pool::{Failed, Grants, InstancePool, Instantiate, unsupported_version, world_mismatch};
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

enum SamplerBindings {
    V0_1_0(since_v0_1_0::Sampler),
}

/// A loaded sampler plugin. Shared between threads; each call takes an instance from the pool.
pub struct SamplerPlugin {
    pool: InstancePool<SamplerBindings>,
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
        let instantiate: Instantiate<SamplerBindings> = match manifest.wit.version {
            WitVersion::V0_1_0 => {
                let pre = since_v0_1_0::pre(linker, component).map_err(world_mismatch(manifest))?;
                Box::new(move |store| Ok(SamplerBindings::V0_1_0(since_v0_1_0::instantiate(&pre, store)?)))
            }
            _ => return Err(unsupported_version(manifest, SUPPORTED_VERSIONS)),
        };
        let grants = Grants { kv, http: None, chain: None };
        Ok(Self { pool: InstancePool::new(engine, manifest, "sampler", grants, max_idle, metered, instantiate)? })
    }

    pub fn id(&self) -> &str {
        self.pool.id()
    }

    /// Whether the failure policy disabled the plugin.
    pub fn is_disabled(&self) -> bool {
        self.pool.is_disabled()
    }

    /// Instances waiting in the pool.
    pub fn idle_instances(&self) -> usize {
        self.pool.idle_instances()
    }

    /// Chooses the next token. `random` is the request's stream: it advances by what the plugin draws.
    pub fn sample(&self, random: &mut RequestRandom, input: &SampleInput<'_>) -> Result<u32, CallError> {
        self.sample_metered(random, input).map(|(token, _fuel)| token)
    }

    /// As [`Self::sample`], and also the fuel the call burned (the conformance kit's budget unit).
    pub fn sample_metered(&self, random: &mut RequestRandom, input: &SampleInput<'_>) -> Result<(u32, u64), CallError> {
        // A disabled plugin refuses every call the same way, before its input is looked at.
        self.pool.refuse_if_disabled()?;
        let invalid = |message: String| CallError::InvalidInput { id: self.id().to_string(), message };
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

        let call = |bindings: &mut SamplerBindings, store: &mut Store<HostState>| {
            store.data_mut().random = Some(random.clone());
            let outcome = match bindings {
                SamplerBindings::V0_1_0(b) => since_v0_1_0::call(b, store, input),
            };
            let fuel = self.pool.fuel_used(store);
            // The stream advances by whatever the plugin drew, even if it then failed.
            if let Some(advanced) = store.data_mut().random.take() {
                *random = advanced;
            }
            outcome.map(|answer| answer.map(|token| (token, fuel)))
        };
        let check = |(token, fuel): (u32, u64)| {
            if token as usize >= input.logits.len() {
                return Err(CallError::TokenOutOfRange { id: self.id().to_string(), token, vocab: input.logits.len() });
            }
            Ok((token, fuel))
        };
        self.pool.call(call, check).map_err(|failed| match failed {
            Failed::Plugin(e) => e,
            Failed::Refused(reason) => CallError::Rejected { id: self.id().to_string(), reason },
        })
    }
}
