//! The plugin host: the engine, the operator's config, the compiled-component cache, and the registry of
//! loaded plugins. Loading checks a plugin completely (manifest, WIT version, limits, grants, digest,
//! compilation, imports, exports, a first instance) before it touches the registry, so a bad plugin is
//! refused with a typed error and the loaded ones keep serving.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Linker;

use crate::cache::{CacheOutcome, CompiledCache};
use crate::capability_granter::GrantPolicy;
use crate::capability_impls::add_granted_to_linker;
use crate::engine::EngineSettings;
use crate::error::{LoadError, describe};
use crate::host_state::HostState;
use crate::imports::{check_export, check_imports};
use crate::kv_store::KvScope;
use crate::limits::LimitCeilings;
use crate::manifest::{MANIFEST_FILE, PluginKind, PluginManifest};
use crate::chain_capability::{ChainAccess, ChainService};
use crate::http_capability::{HttpAccess, HttpLimits, HttpService};
use crate::keeper::KeeperPlugin;
use crate::rail::{RailNetwork, RailPlugin};
use crate::voter::VoterPlugin;
use crate::sampler::SamplerPlugin;
use crate::world::{list_versions, supported_versions};

/// The operator's plugin configuration.
///
/// ```toml
/// cache-dir = "/var/cache/computepool/plugins"
/// [grants]
/// default = ["log", "clock", "random"]
/// [grants.plugins]
/// my-sampler = ["kv-store"]
/// [grants.http]
/// x402-exact = ["127.0.0.1:4021"]
/// [grants.chain]
/// superfluid-gda = ["0xBcC58fb72409BA1CdEc5dBcDD3Cd6c42E3e04242"]
/// [ceilings]
/// max-fuel-per-call = 20_000_000_000
/// max-memory-bytes = 1_073_741_824
/// [http]
/// timeout-ms = 10_000
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct HostConfig {
    /// Capabilities granted to plugins. Default: `log`, `clock`, `random` to every plugin.
    pub grants: GrantPolicy,
    /// Caps on the limits a plugin may ask for.
    pub ceilings: LimitCeilings,
    /// Where compiled components are cached. Default: none (every load compiles, tens of ms per plugin).
    pub cache_dir: Option<PathBuf>,
    /// Idle instances kept per plugin between calls. Default 4: enough for a batch of concurrent requests
    /// on one exit shard; each holds its linear memory (up to the plugin's `memory-bytes`).
    pub max_idle_instances: usize,
    /// Bytes each plugin's key-value scope may hold. Default 16 MiB.
    pub kv_quota_bytes: u64,
    /// Where plugins' key-value scopes are kept across restarts (`<state-dir>/kv/<id>.json`). Default: none
    /// (in memory, one process). The node also keeps the chain capability's send record here.
    pub state_dir: Option<PathBuf>,
    /// Largest plugin file the host reads. Default 64 MiB.
    pub max_wasm_bytes: u64,
    /// Limits on plugin HTTP (`computepool:host/http`).
    pub http: HttpLimits,
    /// Compile settings; not in the TOML file (they are the host's, not the operator's).
    #[serde(skip)]
    pub engine: EngineSettings,
    /// The chain connection and key behind `computepool:host/chain`; not in the TOML file (the node
    /// connects it). Without it, a plugin granted `chain` is refused at load.
    #[serde(skip)]
    pub chain: Option<Arc<ChainService>>,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self {
            grants: GrantPolicy::default(),
            ceilings: LimitCeilings::default(),
            cache_dir: None,
            max_idle_instances: 4,
            kv_quota_bytes: 16 << 20,
            state_dir: None,
            max_wasm_bytes: 64 << 20,
            http: HttpLimits::default(),
            engine: EngineSettings::default(),
            chain: None,
        }
    }
}

impl HostConfig {
    /// Parses the operator's TOML config.
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

/// The host could not start.
#[derive(Debug, thiserror::Error)]
#[error("could not start the WebAssembly engine: {0}")]
pub struct EngineError(String);

/// A loaded plugin of any kind.
pub struct LoadedPlugin {
    pub manifest: PluginManifest,
    /// The folder its plugin.toml is in.
    pub dir: PathBuf,
    /// Whether the compiled component came from the cache.
    pub cache: CacheOutcome,
    /// What the folder held when it was loaded; [`PluginHost::rescan`] reloads when it changes.
    stamp: SourceStamp,
    kind: KindHandle,
}

/// A cheap fingerprint of a plugin folder: the manifest's digest and the wasm file's size and mtime (a
/// changed wasm must come with a changed manifest digest anyway, or it is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
struct SourceStamp {
    manifest_sha256: String,
    wasm_len: u64,
    wasm_modified: Option<std::time::SystemTime>,
}

impl SourceStamp {
    fn read(dir: &Path) -> Result<Self, LoadError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read(&manifest_path).map_err(|source| LoadError::Io { path: manifest_path.clone(), source })?;
        let manifest_sha256 = hex::encode(Sha256::digest(&text));
        // The wasm file is named inside the manifest; an unparsable manifest still gets a stamp (and is
        // refused by the load), so only its digest counts then.
        let wasm = PluginManifest::parse(&String::from_utf8_lossy(&text), &manifest_path)
            .ok()
            .and_then(|m| std::fs::metadata(dir.join(&m.wasm.file)).ok());
        Ok(Self {
            manifest_sha256,
            wasm_len: wasm.as_ref().map_or(0, |m| m.len()),
            wasm_modified: wasm.and_then(|m| m.modified().ok()),
        })
    }
}

/// What [`PluginHost::rescan`] changed.
#[derive(Debug, Default)]
pub struct RescanReport {
    /// Ids newly loaded or reloaded because their folder changed.
    pub loaded: Vec<String>,
    /// Ids unloaded because their folder no longer holds a plugin.toml.
    pub removed: Vec<String>,
    /// Folders whose new contents were refused; the plugin loaded before (if any) keeps serving.
    pub refused: Vec<Refusal>,
    /// Folders that did not change.
    pub unchanged: usize,
}

enum KindHandle {
    Sampler(Arc<SamplerPlugin>),
    Rail(Arc<RailPlugin>),
    Keeper(Arc<KeeperPlugin>),
    Voter(Arc<VoterPlugin>),
}

impl LoadedPlugin {
    pub fn id(&self) -> &str {
        &self.manifest.id
    }

    pub fn as_sampler(&self) -> Option<&Arc<SamplerPlugin>> {
        match &self.kind {
            KindHandle::Sampler(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_rail(&self) -> Option<&Arc<RailPlugin>> {
        match &self.kind {
            KindHandle::Rail(r) => Some(r),
            _ => None,
        }
    }

    pub fn as_keeper(&self) -> Option<&Arc<KeeperPlugin>> {
        match &self.kind {
            KindHandle::Keeper(k) => Some(k),
            _ => None,
        }
    }

    pub fn as_voter(&self) -> Option<&Arc<VoterPlugin>> {
        match &self.kind {
            KindHandle::Voter(v) => Some(v),
            _ => None,
        }
    }
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin").field("id", &self.manifest.id).field("dir", &self.dir).finish()
    }
}

/// A plugin folder that was refused, and why.
#[derive(Debug)]
pub struct Refusal {
    pub dir: PathBuf,
    pub error: LoadError,
}

/// What [`PluginHost::load_dir`] did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Ids loaded (or reloaded), in folder order.
    pub loaded: Vec<String>,
    pub refused: Vec<Refusal>,
}

/// How deep below the plugins folder plugin.toml files are looked for (`plugins/samplers/greedy` is 2).
const MAX_SEARCH_DEPTH: usize = 4;

pub struct PluginHost {
    engine: Engine,
    fingerprint: String,
    config: HostConfig,
    cache: CompiledCache,
    plugins: RwLock<BTreeMap<String, Arc<LoadedPlugin>>>,
    kv_scopes: Mutex<HashMap<String, KvScope>>,
    /// The HTTP client behind `computepool:host/http`, built on first use.
    http: std::sync::OnceLock<Arc<HttpService>>,
    /// Folders whose current contents were refused by a rescan, so the next one does not retry them.
    refused_stamps: Mutex<HashMap<PathBuf, SourceStamp>>,
}

impl PluginHost {
    pub fn new(config: HostConfig) -> Result<Self, EngineError> {
        let engine = config.engine.build().map_err(|e| EngineError(describe(&e)))?;
        let fingerprint = config.engine.fingerprint(&engine);
        let cache = match &config.cache_dir {
            Some(dir) => CompiledCache::new(dir),
            None => CompiledCache::disabled(),
        };
        Ok(Self {
            engine,
            fingerprint,
            config,
            cache,
            plugins: RwLock::new(BTreeMap::new()),
            kv_scopes: Mutex::new(HashMap::new()),
            http: std::sync::OnceLock::new(),
            refused_stamps: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The compiled-component cache and this engine's key in it.
    pub fn cache(&self) -> (&CompiledCache, &str) {
        (&self.cache, &self.fingerprint)
    }

    /// Checks and prepares the plugin in `dir` without registering it.
    pub fn prepare(&self, dir: &Path) -> Result<LoadedPlugin, LoadError> {
        // Stamped before reading, so a change made during the load is seen by the next rescan.
        let stamp = SourceStamp::read(dir)?;
        let manifest = PluginManifest::read(dir)?;
        let id = manifest.id.clone();

        let supported = supported_versions(manifest.kind);
        if !supported.contains(&manifest.wit.version) {
            return Err(LoadError::UnsupportedWitVersion {
                id,
                kind: manifest.kind,
                world: manifest.wit.world.clone(),
                requested: manifest.wit.version.to_string(),
                supported: list_versions(supported),
            });
        }
        let ceilings = &self.config.ceilings;
        if manifest.limits.fuel_per_call > ceilings.max_fuel_per_call {
            return Err(LoadError::LimitAboveCeiling {
                id,
                limit: "fuel-per-call",
                requested: manifest.limits.fuel_per_call,
                ceiling: ceilings.max_fuel_per_call,
            });
        }
        if manifest.limits.memory_bytes > ceilings.max_memory_bytes {
            return Err(LoadError::LimitAboveCeiling {
                id,
                limit: "memory-bytes",
                requested: manifest.limits.memory_bytes,
                ceiling: ceilings.max_memory_bytes,
            });
        }
        let granted = self.config.grants.grant(&id, &manifest.capabilities)?;

        let wasm_path = dir.join(&manifest.wasm.file);
        let io = |source| LoadError::Io { path: wasm_path.clone(), source };
        let size = std::fs::metadata(&wasm_path).map_err(io)?.len();
        if size > self.config.max_wasm_bytes {
            return Err(LoadError::Compile {
                id,
                file: wasm_path.clone(),
                message: format!("{size} bytes is more than the host's limit of {}", self.config.max_wasm_bytes),
            });
        }
        let wasm = std::fs::read(&wasm_path).map_err(io)?;
        let actual = hex::encode(Sha256::digest(&wasm));
        if actual != manifest.wasm.sha256 {
            return Err(LoadError::Sha256Mismatch {
                id,
                file: wasm_path,
                expected: manifest.wasm.sha256.clone(),
                actual,
            });
        }

        let (component, cache) = self
            .cache
            .load_or_compile(&self.engine, &self.fingerprint, &actual, &wasm)
            .map_err(|e| LoadError::Compile { id: id.clone(), file: wasm_path.clone(), message: describe(&e) })?;

        if manifest.capabilities.contains(&crate::capability::Capability::KvStore) {
            self.try_kv_scope(&id).map_err(|e| LoadError::CapabilityUnavailable {
                id: id.clone(),
                capability: crate::capability::Capability::KvStore,
                reason: e.to_string(),
            })?;
        }

        let mut linker: Linker<HostState> = Linker::new(&self.engine);
        add_granted_to_linker(&mut linker, &granted)
            .map_err(|e| LoadError::Instantiate { id: id.clone(), message: describe(&e) })?;

        let kind = match manifest.kind {
            PluginKind::Sampler => {
                if let Some(export) = SamplerPlugin::required_export(manifest.wit.version) {
                    check_export(&self.engine, &component, &manifest, export)?;
                }
                check_imports(&self.engine, &component, &manifest, SamplerPlugin::type_only_imports(manifest.wit.version))?;
                let plugin = SamplerPlugin::new(
                    &self.engine,
                    &linker,
                    &component,
                    &manifest,
                    self.kv_scope(&id),
                    self.config.max_idle_instances,
                    self.config.engine.fuel,
                )?;
                KindHandle::Sampler(Arc::new(plugin))
            }
            PluginKind::PaymentRail => {
                if let Some(export) = RailPlugin::required_export(manifest.wit.version) {
                    check_export(&self.engine, &component, &manifest, export)?;
                }
                check_imports(&self.engine, &component, &manifest, RailPlugin::type_only_imports(manifest.wit.version))?;
                let network = self.network_for(&manifest)?;
                let plugin = RailPlugin::new(
                    &self.engine,
                    &linker,
                    &component,
                    &manifest,
                    self.kv_scope(&id),
                    network,
                    self.config.max_idle_instances,
                    self.config.engine.fuel,
                )?;
                KindHandle::Rail(Arc::new(plugin))
            }
            PluginKind::KeeperAdapter => {
                if let Some(export) = KeeperPlugin::required_export(manifest.wit.version) {
                    check_export(&self.engine, &component, &manifest, export)?;
                }
                check_imports(&self.engine, &component, &manifest, KeeperPlugin::type_only_imports(manifest.wit.version))?;
                let network = self.network_for(&manifest)?;
                let plugin = KeeperPlugin::new(
                    &self.engine,
                    &linker,
                    &component,
                    &manifest,
                    self.kv_scope(&id),
                    network,
                    self.config.max_idle_instances,
                    self.config.engine.fuel,
                )?;
                KindHandle::Keeper(Arc::new(plugin))
            }
            PluginKind::CoalitionVoter => {
                if let Some(export) = VoterPlugin::required_export(manifest.wit.version) {
                    check_export(&self.engine, &component, &manifest, export)?;
                }
                check_imports(&self.engine, &component, &manifest, VoterPlugin::type_only_imports(manifest.wit.version))?;
                let network = self.network_for(&manifest)?;
                let plugin = VoterPlugin::new(
                    &self.engine,
                    &linker,
                    &component,
                    &manifest,
                    self.kv_scope(&id),
                    network.chain,
                    self.config.max_idle_instances,
                    self.config.engine.fuel,
                )?;
                KindHandle::Voter(Arc::new(plugin))
            }
        };
        Ok(LoadedPlugin { manifest, dir: dir.to_path_buf(), cache, stamp, kind })
    }

    /// The `http` and `chain` access of a plugin whose grant the granter already checked.
    fn network_for(&self, manifest: &PluginManifest) -> Result<RailNetwork, LoadError> {
        use crate::capability::Capability;
        let id = &manifest.id;
        let http = if manifest.capabilities.contains(&Capability::Http) {
            let service = match self.http.get() {
                Some(s) => s.clone(),
                None => {
                    let built = HttpService::new(self.config.http)
                        .map_err(|message| LoadError::Instantiate { id: id.clone(), message })?;
                    self.http.get_or_init(|| Arc::new(built)).clone()
                }
            };
            Some(HttpAccess { service, grants: Arc::new(self.config.grants.http_hosts(id)) })
        } else {
            None
        };
        let chain = if manifest.capabilities.contains(&Capability::Chain) {
            let service = self.config.chain.clone().ok_or_else(|| LoadError::CapabilityUnavailable {
                id: id.clone(),
                capability: Capability::Chain,
                reason: "this host has no chain connection (start the node with a chain RPC and key)".into(),
            })?;
            Some(ChainAccess { service, contracts: Arc::new(self.config.grants.chain_contracts(id)) })
        } else {
            None
        };
        Ok(RailNetwork { http, chain })
    }

    /// The key-value scope of plugin `id` (made empty if it has none yet): the host side of what the
    /// plugin stores through `computepool:host/kv-store`.
    pub fn kv_scope(&self, id: &str) -> KvScope {
        self.try_kv_scope(id).unwrap_or_else(|e| {
            // Only a durable scope whose file cannot be read gets here; the loader refuses the plugin.
            tracing::error!(plugin = id, error = %e, "kv scope unreadable; an empty in-memory scope stands in");
            KvScope::new(self.config.kv_quota_bytes)
        })
    }

    /// As [`Self::kv_scope`], or why the durable scope could not be read.
    fn try_kv_scope(&self, id: &str) -> Result<KvScope, crate::kv_store::KvError> {
        let mut scopes = self.kv_scopes.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(scope) = scopes.get(id) {
            return Ok(scope.clone());
        }
        let scope = match &self.config.state_dir {
            // Plugin ids are checked to be [a-z0-9._-]: safe as file names.
            Some(dir) => KvScope::open(&dir.join("kv").join(format!("{id}.json")), self.config.kv_quota_bytes)?,
            None => KvScope::new(self.config.kv_quota_bytes),
        };
        scopes.insert(id.to_string(), scope.clone());
        Ok(scope)
    }

    /// Loads the plugin in `dir`, replacing a loaded plugin with the same id from the same folder (a new
    /// version dropped in). Calls already running keep the instance they hold.
    pub fn load_plugin(&self, dir: &Path) -> Result<Arc<LoadedPlugin>, LoadError> {
        let plugin = Arc::new(self.prepare(dir)?);
        let mut plugins = self.plugins.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(existing) = plugins.get(plugin.id())
            && existing.dir != plugin.dir
        {
            return Err(LoadError::DuplicateId {
                id: plugin.id().to_string(),
                path: plugin.dir.clone(),
                existing: existing.dir.clone(),
            });
        }
        // A folder whose plugin changed its id no longer serves the old id.
        plugins.retain(|id, p| p.dir != plugin.dir || id == plugin.id());
        plugins.insert(plugin.id().to_string(), plugin.clone());
        tracing::info!(plugin = %plugin.id(), dir = %dir.display(), kind = %plugin.manifest.kind, "plugin loaded");
        Ok(plugin)
    }

    /// Loads every plugin folder (one holding a plugin.toml) under `root`, in path order. A refused folder
    /// is reported and skipped; it changes nothing already loaded.
    pub fn load_dir(&self, root: &Path) -> LoadReport {
        let mut report = LoadReport::default();
        let mut dirs = Vec::new();
        if let Err(error) = find_plugin_dirs(root, 0, &mut dirs) {
            report.refused.push(Refusal { dir: root.to_path_buf(), error });
            return report;
        }
        dirs.sort();
        for dir in dirs {
            match self.load_plugin(&dir) {
                Ok(plugin) => report.loaded.push(plugin.id().to_string()),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "plugin refused");
                    // Remembered, so that a later `rescan` does not refuse (and report) it again until
                    // its folder changes.
                    if let Ok(stamp) = SourceStamp::read(&dir) {
                        self.lock_refused().insert(dir.clone(), stamp);
                    }
                    report.refused.push(Refusal { dir, error });
                }
            }
        }
        report
    }

    /// Hot reload: loads plugin folders under `root` that are new or changed since they were loaded, and
    /// unloads plugins whose folder under `root` is gone. A changed plugin that is refused leaves the
    /// loaded one serving, and is not retried until its folder changes again. Calls already running keep
    /// the plugin they started with (new calls get the new one), so a running stream is unharmed.
    /// Cost: one manifest read and hash and one `stat` per folder; call it on a timer or a file event.
    pub fn rescan(&self, root: &Path) -> RescanReport {
        let mut report = RescanReport::default();
        let mut dirs = Vec::new();
        if let Err(error) = find_plugin_dirs(root, 0, &mut dirs) {
            report.refused.push(Refusal { dir: root.to_path_buf(), error });
            return report;
        }
        dirs.sort();
        for dir in &dirs {
            let stamp = match SourceStamp::read(dir) {
                Ok(stamp) => stamp,
                Err(error) => {
                    report.refused.push(Refusal { dir: dir.clone(), error });
                    continue;
                }
            };
            let loaded_same = self.plugins().iter().any(|p| &p.dir == dir && p.stamp == stamp);
            let refused_same = self.lock_refused().get(dir) == Some(&stamp);
            if loaded_same || refused_same {
                report.unchanged += 1;
                continue;
            }
            match self.load_plugin(dir) {
                Ok(plugin) => {
                    self.lock_refused().remove(dir);
                    report.loaded.push(plugin.id().to_string());
                }
                Err(error) => {
                    if self.plugins().iter().any(|p| &p.dir == dir) {
                        tracing::warn!(dir = %dir.display(), %error, "changed plugin refused; the loaded one keeps serving");
                    } else {
                        tracing::warn!(dir = %dir.display(), %error, "plugin refused");
                    }
                    self.lock_refused().insert(dir.clone(), stamp);
                    report.refused.push(Refusal { dir: dir.clone(), error });
                }
            }
        }
        let mut plugins = self.plugins.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        plugins.retain(|id, p| {
            let gone = p.dir.starts_with(root) && !dirs.contains(&p.dir);
            if gone {
                tracing::info!(plugin = %id, dir = %p.dir.display(), "plugin folder removed; unloaded");
                report.removed.push(id.clone());
            }
            !gone
        });
        report
    }

    fn lock_refused(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, SourceStamp>> {
        self.refused_stamps.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, id: &str) -> Option<Arc<LoadedPlugin>> {
        self.plugins.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(id).cloned()
    }

    /// The loaded sampler `id`, if there is one.
    pub fn sampler(&self, id: &str) -> Option<Arc<SamplerPlugin>> {
        self.get(id).and_then(|p| p.as_sampler().cloned())
    }

    /// The loaded payment rail `id`, if there is one.
    pub fn rail(&self, id: &str) -> Option<Arc<RailPlugin>> {
        self.get(id).and_then(|p| p.as_rail().cloned())
    }

    /// The loaded keeper adapter `id`, if there is one.
    pub fn keeper(&self, id: &str) -> Option<Arc<KeeperPlugin>> {
        self.get(id).and_then(|p| p.as_keeper().cloned())
    }

    /// The loaded coalition voter `id`, if there is one.
    pub fn voter(&self, id: &str) -> Option<Arc<VoterPlugin>> {
        self.get(id).and_then(|p| p.as_voter().cloned())
    }

    /// Every loaded plugin, by id.
    pub fn plugins(&self) -> Vec<Arc<LoadedPlugin>> {
        self.plugins.read().unwrap_or_else(|poisoned| poisoned.into_inner()).values().cloned().collect()
    }

    /// Unloads `id`; calls already running finish on the instance they hold. Returns whether it was loaded.
    pub fn unload(&self, id: &str) -> bool {
        self.plugins.write().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(id).is_some()
    }
}

fn find_plugin_dirs(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    if dir.join(MANIFEST_FILE).is_file() {
        out.push(dir.to_path_buf());
        return Ok(());
    }
    if depth >= MAX_SEARCH_DEPTH {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io { path: dir.to_path_buf(), source })?;
    for entry in entries.flatten() {
        let path = entry.path();
        // Skip build output and hidden folders, which can be large and hold no plugin.toml.
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() && !name.starts_with('.') && name != "target" && name != "src" {
            find_plugin_dirs(&path, depth + 1, out)?;
        }
    }
    Ok(())
}
