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
        let report = host.load_dir(&dir);
        for refusal in &report.refused {
            tracing::error!(plugin = %refusal.dir.display(), "rail not loaded: {}", refusal.error);
        }
        tracing::info!(loaded = ?report.loaded, dir = %dir.display(), "payment rails loaded");
        let stop = Arc::new(AtomicBool::new(false));
        let (watched, flag, poll) = (host.clone(), stop.clone(), Duration::from_millis(args.rail_poll_ms.max(50)));
        std::thread::Builder::new().name("rail-watcher".into()).spawn(move || {
            while !flag.load(Ordering::Acquire) {
                std::thread::sleep(poll);
                let report = watched.rescan(&dir);
                for refusal in &report.refused {
                    tracing::error!(plugin = %refusal.dir.display(), "changed rail refused (the loaded one keeps serving): {}", refusal.error);
                }
                if !report.loaded.is_empty() || !report.removed.is_empty() {
                    tracing::info!(loaded = ?report.loaded, removed = ?report.removed, "payment rails rescanned");
                }
            }
        })?;
        Ok(Self { host, stop })
    }
}
