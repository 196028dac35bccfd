//! Turning payments on from the command line: the rail plugins' host (its folder, the operator's grants,
//! the chain key behind the `chain` capability) and the watcher that picks up a swapped rail.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use computepool_chain::{Chain, KeySource};
use computepool_plugin_host::{ChainService, HostConfig, PluginHost};

/// Payments on an orchestrator.
#[derive(Args, Debug, Clone, Default)]
pub struct PaymentArgs {
    /// Turn payments on: pools given a price (`PUT /pools/{id}/payments`) answer unpaid requests with an
    /// x402 402 and pay their operators per second. Needs --rails.
    #[arg(long, requires = "rails")]
    pub payments: bool,
    /// A folder of payment-rail plugins (each a folder with a plugin.toml, as plugins/rails holds them),
    /// checked for new, changed or removed rails every --rail-poll-ms.
    #[arg(long)]
    pub rails: Option<PathBuf>,
    /// The operator's config for the rails (TOML: grants — which plugin may reach which HTTP hosts and
    /// contracts —, ceilings, cache-dir; docs/PLUGINS.md). Default: nothing beyond log, clock, random.
    #[arg(long, requires = "rails")]
    pub rail_config: Option<PathBuf>,
    /// The JSON-RPC URL of the chain the rails use (the `chain` capability).
    #[arg(long, requires = "chain_key_file")]
    pub chain_rpc: Option<String>,
    /// A file holding the hex private key the host signs the rails' transactions with (the pools' GDA
    /// admin and distributor). Never passed to a plugin.
    #[arg(long, requires = "chain_rpc")]
    pub chain_key_file: Option<PathBuf>,
    /// How often the rails folder is checked, in ms.
    #[arg(long, default_value_t = 500)]
    pub rail_poll_ms: u64,
    /// A folder of keeper-adapter plugins (plugins/keepers): with it, every payment transition of a pool
    /// whose flow names a keeper (`"flow": {"plugin": "local", …}`) runs as a workflow through that
    /// keeper, logged in `<state-dir>/transitions.db` (`GET /transitions`). Loaded into the rails' host,
    /// with the same grants file. Needs --keeper-context and the chain (to confirm what keepers claim).
    #[arg(long, requires_all = ["payments", "keeper_context", "chain_rpc"])]
    pub keepers: Option<PathBuf>,
    /// The keepers' deployment context (JSON: `chainId`, `callbackUrl`, `contracts` — `gdaV1Forwarder`,
    /// `coalition`, `poolInft` addresses), passed to every workflow run as KeeperHub's trigger input.
    #[arg(long, requires = "keepers")]
    pub keeper_context: Option<PathBuf>,
    /// The keeper that resumes transitions left unfinished by the last run and acts on breaches.
    #[arg(long, default_value = "local")]
    pub keeper: String,
    /// KeeperHub callback secrets (JSON object: pool id → hex secret) for `POST /webhooks/keeperhub`.
    /// Without it every callback is refused (unknown pool).
    #[arg(long, requires = "keepers")]
    pub webhook_secrets: Option<PathBuf>,
    /// A folder of coalition-voter plugins (plugins/voters), for --coalition.
    #[arg(long, requires = "keepers")]
    pub voters: Option<PathBuf>,
    /// The coalition that judges breach reports (output audits): JSON, see `keeping::breaches::CoalitionConfig`.
    #[arg(long, requires = "voters")]
    pub coalition: Option<PathBuf>,
}

/// The rails' plugin host and its folder watcher (stops when dropped).
pub struct RailHost {
    pub host: Arc<PluginHost>,
    stop: Arc<AtomicBool>,
}

impl Drop for RailHost {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl RailHost {
    /// Loads the rails of `args.rails`; `state_dir` keeps the chain capability's send log (a retried
    /// transaction is never sent twice, even across restarts).
    pub async fn start(args: &PaymentArgs, state_dir: &Path) -> anyhow::Result<Self> {
        let dir = args.rails.clone().context("--payments needs --rails (a folder of payment-rail plugins)")?;
        let mut config = match &args.rail_config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                HostConfig::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => HostConfig::default(),
        };
        if let (Some(rpc), Some(key)) = (&args.chain_rpc, &args.chain_key_file) {
            let signer = KeySource::File(key.clone()).load()?;
            let chain = Chain::connect(rpc, None, signer).await.with_context(|| format!("connecting to {rpc}"))?;
            tracing::info!(chain_id = chain.chain_id(), sender = %chain.address(), "rails' chain connected");
            let service = ChainService::new(chain, Some(&state_dir.join("rails"))).map_err(|e| anyhow::anyhow!(e))?;
            config.chain = Some(Arc::new(service));
        }
        let host = Arc::new(PluginHost::new(config)?);
        // Rails, keepers and voters share one host (and its grants and chain key); each folder is
        // watched for swapped plugins.
        let dirs: Vec<PathBuf> = [Some(dir), args.keepers.clone(), args.voters.clone()].into_iter().flatten().collect();
        for dir in &dirs {
            let report = host.load_dir(dir);
            for refusal in &report.refused {
                // A plugin the operator granted nothing it asks for is one they chose not to run.
                if matches!(refusal.error, computepool_plugin_host::LoadError::CapabilityDenied(_)) {
                    tracing::info!(plugin = %refusal.dir.display(), "plugin not loaded: {}", refusal.error);
                } else {
                    tracing::error!(plugin = %refusal.dir.display(), "plugin not loaded: {}", refusal.error);
                }
            }
            tracing::info!(loaded = ?report.loaded, dir = %dir.display(), "payment plugins loaded");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (watched, flag, poll) = (host.clone(), stop.clone(), Duration::from_millis(args.rail_poll_ms.max(50)));
        std::thread::Builder::new().name("rail-watcher".into()).spawn(move || {
            while !flag.load(Ordering::Acquire) {
                std::thread::sleep(poll);
                for dir in &dirs {
                    let report = watched.rescan(dir);
                    for refusal in &report.refused {
                        if !matches!(refusal.error, computepool_plugin_host::LoadError::CapabilityDenied(_)) {
                            tracing::error!(plugin = %refusal.dir.display(), "changed plugin refused (the loaded one keeps serving): {}", refusal.error);
                        }
                    }
                    if !report.loaded.is_empty() || !report.removed.is_empty() {
                        tracing::info!(loaded = ?report.loaded, removed = ?report.removed, dir = %dir.display(), "payment plugins rescanned");
                    }
                }
            }
        })?;
        Ok(Self { host, stop })
    }
}
