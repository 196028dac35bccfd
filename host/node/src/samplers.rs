//! Samplers on a worker: the native one and the sampler plugins of its `--plugins` folder.
//!
//! The entry resolves the sampler a request names (or the pool's default, `--default-sampler`) against
//! what it has loaded, so an unknown id is refused before any shard works; the exit resolves it again to
//! the loaded plugin and keeps that plugin for the whole request, so a plugin replaced while a stream runs
//! serves new requests while the running one finishes on the old code. A watcher thread polls the folder
//! and drives [`PluginHost::rescan`] (no restart, no rebuild; a bad replacement is refused and the loaded
//! plugin keeps serving).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use computepool_engine::sampling::{Sampler, SamplingParams};
use computepool_plugin_host::{HostConfig, PluginHost, RequestRandom, SampleInput, SamplerPlugin};

/// The id that names the engine's built-in sampler (never a plugin's: plugin ids may not shadow it).
pub const NATIVE: &str = "native";

/// Where a worker finds its sampler plugins.
#[derive(Args, Debug, Clone)]
pub struct SamplerArgs {
    /// A folder of plugins (each a folder with a plugin.toml, as plugins/ holds them). Give every worker
    /// of a pool the same set: the entry checks a request's sampler id against its own, the exit runs it.
    #[arg(long)]
    pub plugins: Option<PathBuf>,
    /// The operator's plugin config (TOML: grants, ceilings, cache-dir; see docs/PLUGINS.md). Default:
    /// `log`, `clock` and `random` granted to every plugin, the host's ceilings, no compiled cache.
    #[arg(long, requires = "plugins")]
    pub plugin_config: Option<PathBuf>,
    /// (Entry) the sampler of requests that name none: `native` or a plugin id. Default native.
    #[arg(long, default_value = NATIVE)]
    pub default_sampler: String,
    /// How often the plugins folder is checked for new, changed or removed plugins, in ms.
    #[arg(long, default_value_t = 500)]
    pub plugin_poll_ms: u64,
}

impl Default for SamplerArgs {
    fn default() -> Self {
        Self { plugins: None, plugin_config: None, default_sampler: NATIVE.to_string(), plugin_poll_ms: 500 }
    }
}

impl SamplerArgs {
    /// The same settings as `computepool worker` flags (paths made absolute), for starting workers.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = Vec::new();
        let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone()).into_os_string();
        if let Some(dir) = &self.plugins {
            args.extend(["--plugins".into(), absolute(dir)]);
        }
        if let Some(config) = &self.plugin_config {
            args.extend(["--plugin-config".into(), absolute(config)]);
        }
        args.extend(["--default-sampler".into(), self.default_sampler.clone().into()]);
        args.extend(["--plugin-poll-ms".into(), self.plugin_poll_ms.to_string().into()]);
        args
    }
}

/// A worker's samplers: its plugin host (if it has a plugins folder) and the pool's default.
pub struct Samplers {
    host: Option<Arc<PluginHost>>,
    default: String,
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Samplers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Samplers").field("default", &self.default).field("serves", &self.list()).finish()
    }
}

impl Drop for Samplers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Samplers {
    /// Only the native sampler.
    pub fn native() -> Self {
        Self { host: None, default: NATIVE.to_string(), stop: Arc::new(AtomicBool::new(false)) }
    }

    /// Loads the plugins folder (refused plugins are logged and skipped), checks the default sampler and
    /// starts the watcher.
    pub fn start(args: &SamplerArgs) -> anyhow::Result<Self> {
        let Some(dir) = &args.plugins else {
            if args.default_sampler != NATIVE {
                anyhow::bail!("--default-sampler {} needs --plugins DIR holding it", args.default_sampler);
            }
            return Ok(Self::native());
        };
        let config = match &args.plugin_config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                HostConfig::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => HostConfig::default(),
        };
        let host = Arc::new(PluginHost::new(config)?);
        anyhow::ensure!(dir.is_dir(), "--plugins {}: not a folder", dir.display());
        let report = host.load_dir(dir);
        for refusal in &report.refused {
            tracing::warn!(dir = %refusal.dir.display(), error = %refusal.error, "plugin refused");
        }
        tracing::info!(loaded = ?report.loaded, refused = report.refused.len(), dir = %dir.display(), "plugins loaded");
        let samplers = Self { host: Some(host.clone()), default: args.default_sampler.clone(), stop: Arc::new(AtomicBool::new(false)) };
        samplers.resolve(None).map_err(|e| anyhow::anyhow!("--default-sampler: {e}"))?;
        let (stop, dir, poll) = (samplers.stop.clone(), dir.clone(), Duration::from_millis(args.plugin_poll_ms.max(10)));
        std::thread::Builder::new()
            .name("plugin-watch".into())
            .spawn(move || watch(&host, &dir, poll, &stop))
            .context("starting the plugin watcher")?;
        Ok(samplers)
    }

    /// The sampler a request gets: `requested`, or the default. `None` is the native sampler; an id
    /// this worker has not loaded is an error naming what it has.
    pub fn resolve(&self, requested: Option<&str>) -> Result<Option<String>, String> {
        let id = requested.unwrap_or(&self.default);
        if id == NATIVE {
            return Ok(None);
        }
        match self.host.as_ref().and_then(|h| h.sampler(id)) {
            Some(plugin) if plugin.is_disabled() => {
                Err(format!("sampler `{id}` is disabled by its failure policy; this pool serves: {}", self.list()))
            }
            Some(_) => Ok(Some(id.to_string())),
            None => Err(format!("unknown sampler `{id}`; this pool serves: {}", self.list())),
        }
    }

    /// `native` and the loaded sampler ids, comma-separated.
    fn list(&self) -> String {
        let mut ids = vec![NATIVE.to_string()];
        if let Some(host) = &self.host {
            ids.extend(host.plugins().iter().filter(|p| p.as_sampler().is_some()).map(|p| p.id().to_string()));
        }
        ids.join(", ")
    }

    /// A request's sampler on the exit shard.
    pub fn for_request(&self, params: SamplingParams, sampler: Option<&str>) -> Result<RequestSampler, String> {
        match sampler {
            None | Some(NATIVE) => Sampler::new(params).map(|s| RequestSampler::Native(Box::new(s))).map_err(|e| e.to_string()),
            Some(id) => {
                let plugin = self
                    .host
                    .as_ref()
                    .and_then(|h| h.sampler(id))
                    .ok_or_else(|| format!("the exit shard has no sampler `{id}`; it serves: {}", self.list()))?;
                let p = params;
                let params = computepool_plugin_host::SamplingParams {
                    temperature: p.temperature,
                    top_k: u32::try_from(p.top_k).unwrap_or(0),
                    top_p: p.top_p,
                    min_p: p.min_p,
                    repetition_penalty: p.repetition_penalty,
                    presence_penalty: p.presence_penalty,
                    frequency_penalty: p.frequency_penalty,
                    seed: p.seed,
                };
                params.validate()?;
                Ok(RequestSampler::Plugin { plugin, random: RequestRandom::new(p.seed), params, history: Vec::new() })
            }
        }
    }
}

/// Polls `dir` and reloads what changed, until `stop`.
fn watch(host: &PluginHost, dir: &std::path::Path, poll: Duration, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(poll);
        let report = host.rescan(dir);
        if !report.loaded.is_empty() || !report.removed.is_empty() || !report.refused.is_empty() {
            tracing::info!(loaded = ?report.loaded, removed = ?report.removed, refused = report.refused.len(), "plugins rescanned");
        }
    }
}

/// The sampler of one request on the exit shard. A plugin is held for the request's life: replacing
/// it in the folder changes new requests only.
pub enum RequestSampler {
    /// Boxed: the native sampler holds its whole state inline, several times a plugin handle.
    Native(Box<Sampler>),
    Plugin {
        plugin: Arc<SamplerPlugin>,
        random: RequestRandom,
        params: computepool_plugin_host::SamplingParams,
        /// The tokens sampled so far (the history the native sampler sees, too).
        history: Vec<u32>,
    },
}

impl RequestSampler {
    /// The next token, or why the plugin could not give one (the request fails; the worker serves on).
    ///
    /// With a temperature above 0 each token takes exactly one draw of the request's stream, whether
    /// the sampler needed it or not (the engine's `Sampler::sample` does the same), so an exit that
    /// takes over a request after `n` tokens continues the stream by skipping `n` draws ([`Self::skip`]).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, String> {
        match self {
            RequestSampler::Native(s) => Ok(s.sample(logits)),
            RequestSampler::Plugin { plugin, random, params, history } => {
                let generated = u32::try_from(history.len()).map_err(|_| "history too long".to_string())?;
                let input = SampleInput { logits, history, generated, params: *params };
                let before = random.draws();
                let token = plugin.sample(random, &input).map_err(|e| format!("sampler plugin failed: {e}"))?;
                if params.temperature > 0.0 && random.draws() == before {
                    random.next_f64();
                }
                history.push(token);
                Ok(token)
            }
        }
    }

    /// Advances the request's random stream past the draws of `tokens` tokens sampled elsewhere (a
    /// request that moved here from a broken route). A plugin that draws more than once per token
    /// cannot be continued exactly; greedy requests draw nothing.
    pub fn skip(&mut self, tokens: u64) {
        match self {
            RequestSampler::Native(s) => s.skip(tokens),
            RequestSampler::Plugin { random, params, .. } => {
                if params.temperature > 0.0 {
                    for _ in 0..tokens {
                        random.next_f64();
                    }
                }
            }
        }
    }
}

/// A start frame's sampling, as the engine's parameters and the sampler id (`None`: native).
pub fn from_header(h: &computepool_axl::frame::SamplingHeader) -> (SamplingParams, Option<String>) {
    let off = SamplingParams::default();
    let params = SamplingParams {
        temperature: h.temperature,
        top_k: h.top_k as usize,
        top_p: h.top_p,
        min_p: h.min_p.unwrap_or(off.min_p),
        repetition_penalty: h.repetition_penalty.unwrap_or(off.repetition_penalty),
        presence_penalty: h.presence_penalty.unwrap_or(off.presence_penalty),
        frequency_penalty: h.frequency_penalty.unwrap_or(off.frequency_penalty),
        seed: h.seed,
    };
    (params, h.sampler.clone())
}

/// The start frame's sampling for `params` and `sampler`. Parameters at their "off" value are left out,
/// so a native request without them sends exactly the first protocol version's header.
pub fn to_header(p: &SamplingParams, sampler: Option<&str>) -> computepool_axl::frame::SamplingHeader {
    let off = SamplingParams::default();
    let set = |v: f32, default: f32| (v != default).then_some(v);
    computepool_axl::frame::SamplingHeader {
        temperature: p.temperature,
        top_k: u32::try_from(p.top_k).unwrap_or(0),
        top_p: p.top_p,
        seed: p.seed,
        min_p: set(p.min_p, off.min_p),
        repetition_penalty: set(p.repetition_penalty, off.repetition_penalty),
        presence_penalty: set(p.presence_penalty, off.presence_penalty),
        frequency_penalty: set(p.frequency_penalty, off.frequency_penalty),
        sampler: sampler.map(str::to_string),
    }
}
