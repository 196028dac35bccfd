//! The orchestrator's side of keepers and coalitions: every payment transition a pool goes through —
//! stream-start, stream-stop and handle-breach here — is written to the durable transition log
//! (`<state-dir>/transitions.db`) and acted out by a keeper-adapter plugin (`local` by default, or
//! `keeperhub`), which reports the transactions it sent. Nothing moves on that report alone: each claimed
//! transaction is read back from the chain (mined, successful, sent to one of the pool's contracts)
//! before the transition is recorded, whether the report came from the plugin's `status` or from a
//! KeeperHub callback (`POST /webhooks/keeperhub`).
//!
//! - [`KeeperService`]: the log, the drivers (one per keeper plugin, all writing the one log), and
//!   `GET /transitions` / `POST /webhooks/keeperhub`.
//! - [`ChainConfirmer`]: reads claimed effects back from the chain.
//! - [`breaches`]: audit reports → the coalition's voters → handle-breach → the operator ejected.

pub mod breaches;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use computepool_chain::Chain;
use computepool_chain::alloy::primitives::{Address, B256};
use computepool_chain::alloy::providers::Provider;
use computepool_keeper::driver::{Driven, Driver, RetryPolicy, TransitionSink};
use computepool_keeper::keeperhub::DeploymentContext;
use computepool_keeper::log::{TransitionLog, TransitionRecord, TransitionState};
use computepool_keeper::plugin::PluginKeeper;
use computepool_keeper::transition::Transition;
use computepool_keeper::webhook::{
    self, ClaimedEffect, ConfirmError, EffectConfirmer, ReplayGuard, WebhookSecrets, WebhookSink, WebhookState, WorkflowResult,
};
use computepool_plugin_host::PluginHost;
use futures_util::future::BoxFuture;

/// A transaction a keeper reported, read back from the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmedTx {
    pub hash: String,
    pub block_number: u64,
    /// When it took effect, Unix seconds.
    pub block_timestamp: u64,
}

/// Reads a keeper's claimed transactions back from the chain: mined, status 1, sent to a contract the
/// pool's workflows call (the deployment context's contracts, plus the pool's GDA pool).
pub struct ChainConfirmer {
    chain: Chain,
    contracts: Vec<Address>,
    runtime: tokio::runtime::Handle,
}

impl ChainConfirmer {
    /// `contracts`: every address a workflow may send to.
    pub fn new(chain: Chain, contracts: Vec<Address>, runtime: tokio::runtime::Handle) -> Self {
        Self { chain, contracts, runtime }
    }

    /// The addresses in a deployment context's `contracts` object.
    pub fn contracts_of(context: &DeploymentContext) -> Vec<Address> {
        context
            .contracts
            .as_object()
            .map(|o| o.values().filter_map(|v| v.as_str()?.parse::<Address>().ok()).collect())
            .unwrap_or_default()
    }

    pub async fn confirm_tx(&self, hash: &str) -> Result<ConfirmedTx, ConfirmError> {
        let parsed: B256 = hash.parse().map_err(|_| ConfirmError::Unknown(hash.to_string()))?;
        let receipt = self
            .chain
            .provider()
            .get_transaction_receipt(parsed)
            .await
            .map_err(|e| ConfirmError::Chain(e.to_string()))?
            .ok_or_else(|| ConfirmError::NotYet(hash.to_string()))?;
        if !receipt.status() {
            return Err(ConfirmError::Reverted(hash.to_string()));
        }
        match receipt.to {
            Some(to) if self.contracts.contains(&to) => {}
            other => {
                return Err(ConfirmError::Mismatch {
                    tx: hash.to_string(),
                    node: "?".into(),
                    reason: format!("sent to {other:?}, which is none of the pool's contracts"),
                });
            }
        }
        let block_number = receipt.block_number.ok_or_else(|| ConfirmError::NotYet(hash.to_string()))?;
        let block_timestamp = self.chain.timestamp_of(block_number).await.map_err(|e| ConfirmError::Chain(e.to_string()))?;
        Ok(ConfirmedTx { hash: hash.to_string(), block_number, block_timestamp })
    }

    /// Blocking form, for the driver's threads (never call it on an async task).
    pub fn confirm_blocking(&self, hash: &str) -> Result<ConfirmedTx, ConfirmError> {
        self.runtime.block_on(self.confirm_tx(hash))
    }
}

impl EffectConfirmer for ChainConfirmer {
    fn confirm<'a>(&'a self, effect: &'a ClaimedEffect) -> BoxFuture<'a, Result<(), ConfirmError>> {
        Box::pin(async move {
            self.confirm_tx(&effect.tx_hash).await.map(|_| ()).map_err(|e| match e {
                ConfirmError::Mismatch { tx, reason, .. } => ConfirmError::Mismatch { tx, node: effect.node_id.clone(), reason },
                other => other,
            })
        })
    }
}

/// Records a transition once every transaction its keeper claims is confirmed on chain, and keeps the
/// confirmed transactions for the caller (the flow rail takes its `effective_at_s` from them).
struct ConfirmingSink {
    confirmer: Arc<ChainConfirmer>,
    confirmed: Mutex<HashMap<String, Vec<ConfirmedTx>>>,
}

impl TransitionSink for ConfirmingSink {
    fn record(&self, transition: &TransitionRecord) -> Result<(), String> {
        let effects = ClaimedEffect::of_record(transition)?;
        let mut txs = Vec::with_capacity(effects.len());
        for effect in &effects {
            let tx = self
                .confirmer
                .confirm_blocking(&effect.tx_hash)
                .map_err(|e| format!("{} (node {}): {e}", transition.idempotency_key, effect.node_id))?;
            txs.push(tx);
        }
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner()).insert(transition.idempotency_key.clone(), txs);
        Ok(())
    }
}

/// How a transition ended, for its caller.
#[derive(Debug, Clone)]
pub struct Settled {
    pub record: TransitionRecord,
    /// Its transactions as the chain has them, in the order sent.
    pub transactions: Vec<ConfirmedTx>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeeperFailure {
    #[error("keeper plugin `{0}` is not loaded")]
    NotLoaded(String),
    #[error("transition {key} failed: {reason}")]
    Failed { key: String, reason: String },
    /// Not settled yet; calling again with the same key picks it up where it is.
    #[error("transition {key} is not settled yet ({state}); it is retried under the same key")]
    Pending { key: String, state: String },
    #[error("transition log: {0}")]
    Log(String),
}

/// The log, the keepers and the chain confirmer of one orchestrator.
pub struct KeeperService {
    log: Arc<TransitionLog>,
    host: Arc<PluginHost>,
    context: DeploymentContext,
    sink: Arc<ConfirmingSink>,
    policy: RetryPolicy,
    /// The keeper plugin that resumes transitions left unfinished by the last run.
    default_keeper: String,
    /// The address the keepers' transactions come from (the host key granted to them): the flows'
    /// distributor.
    sender: String,
    webhook: Arc<WebhookState>,
}

/// Per-pool webhook secrets, from the operator's config.
struct PoolSecrets(HashMap<String, Vec<u8>>);

impl WebhookSecrets for PoolSecrets {
    fn secret(&self, pool_id: &str) -> Option<Vec<u8>> {
        self.0.get(pool_id).cloned()
    }
}

/// A KeeperHub callback moves its transition on in the log; the driver (polling the run meanwhile)
/// then records it after confirming the same transactions again.
struct LogWebhookSink {
    log: Arc<TransitionLog>,
}

impl WebhookSink for LogWebhookSink {
    fn deliver<'a>(&'a self, result: &'a WorkflowResult) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let log = self.log.clone();
            let result = result.clone();
            tokio::task::spawn_blocking(move || {
                let Some(record) = log.find_by_key(result.transition_key()).map_err(|e| e.to_string())? else {
                    return Err(format!("no transition {}", result.transition_key()));
                };
                if record.state != TransitionState::Submitted || result.status != "success" {
                    // Failures and late deliveries: the driver's own polling decides.
                    return Ok(());
                }
                let detail = serde_json::to_string(&result.transaction_hashes).map_err(|e| e.to_string())?;
                log.mark_acted(record.id, &detail).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

impl KeeperService {
    /// Opens `<state_dir>/transitions.db` and the webhook replay guard beside it.
    pub fn open(
        state_dir: &Path,
        host: Arc<PluginHost>,
        context: DeploymentContext,
        confirmer: Arc<ChainConfirmer>,
        default_keeper: String,
        sender: String,
        webhook_secrets: HashMap<String, Vec<u8>>,
    ) -> anyhow::Result<Self> {
        let path = state_dir.join("transitions.db");
        let log = Arc::new(TransitionLog::open(&path).with_context(|| format!("opening {}", path.display()))?);
        let replay_path = state_dir.join("webhook-deliveries.db");
        let replay = Arc::new(
            ReplayGuard::open(&replay_path, webhook::DEFAULT_WINDOW_S).with_context(|| format!("opening {}", replay_path.display()))?,
        );
        let sink = Arc::new(ConfirmingSink { confirmer: confirmer.clone(), confirmed: Mutex::new(HashMap::new()) });
        let webhook = Arc::new(WebhookState {
            secrets: Arc::new(PoolSecrets(webhook_secrets)),
            replay,
            confirmer,
            sink: Arc::new(LogWebhookSink { log: log.clone() }),
            window_s: webhook::DEFAULT_WINDOW_S,
            clock: WebhookState::system_clock(),
        });
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            max_unavailable: 5,
            max_runs: 3,
            poll_interval: Duration::from_millis(200),
            pending_timeout: Duration::from_secs(60),
        };
        Ok(Self { log, host, context, sink, policy, default_keeper, sender, webhook })
    }

    /// The keeper that resumes unfinished transitions and runs handle-breach.
    pub fn default_keeper(&self) -> &str {
        &self.default_keeper
    }

    pub fn sender(&self) -> &str {
        &self.sender
    }

    fn driver(&self, keeper: &str) -> Result<Driver, KeeperFailure> {
        let plugin = self.host.keeper(keeper).ok_or_else(|| KeeperFailure::NotLoaded(keeper.to_string()))?;
        let adapter = PluginKeeper::new(plugin, self.context.clone());
        Ok(Driver::new(self.log.clone(), Arc::new(adapter), self.sink.clone(), self.policy.clone()))
    }

    /// Whether `id` names a loaded keeper-adapter plugin.
    pub fn is_keeper(&self, id: &str) -> bool {
        self.host.keeper(id).is_some()
    }

    /// Runs `transition` through `keeper` to the end: written first, or — when a transition under the
    /// same idempotency key is already in the log (a retry, a restart) — picked up where it stands, so it
    /// is never acted twice. Blocking (plugin calls and chain reads): call it from a blocking thread.
    pub fn run(&self, keeper: &str, transition: &Transition) -> Result<Settled, KeeperFailure> {
        let driver = self.driver(keeper)?;
        let log_err = |e: computepool_keeper::driver::DriveError| KeeperFailure::Log(e.to_string());
        let driven = match self.log.find_by_key(&transition.idempotency_key).map_err(|e| KeeperFailure::Log(e.to_string()))? {
            Some(existing) => driver.drive(existing.id).map_err(log_err)?,
            None => driver.run(transition).map_err(log_err)?,
        };
        self.settled(driven)
    }

    fn settled(&self, driven: Driven) -> Result<Settled, KeeperFailure> {
        match driven {
            Driven::Done(record) if record.state == TransitionState::Recorded => {
                let transactions = match self.sink.confirmed.lock().unwrap_or_else(|p| p.into_inner()).remove(&record.idempotency_key) {
                    Some(txs) => txs,
                    // Recorded by an earlier process: read its transactions back again.
                    None => ClaimedEffect::of_record(&record)
                        .map_err(|reason| KeeperFailure::Failed { key: record.idempotency_key.clone(), reason })?
                        .iter()
                        .map(|e| self.sink.confirmer.confirm_blocking(&e.tx_hash))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| KeeperFailure::Pending { key: record.idempotency_key.clone(), state: e.to_string() })?,
                };
                Ok(Settled { record, transactions })
            }
            Driven::Done(record) => Err(KeeperFailure::Failed {
                key: record.idempotency_key.clone(),
                reason: record.detail.clone().unwrap_or_else(|| "no reason given".into()),
            }),
            Driven::Pending(record) => {
                Err(KeeperFailure::Pending { key: record.idempotency_key.clone(), state: record.state.as_str().to_string() })
            }
        }
    }

    /// Drives what the last run left unfinished through the default keeper (stream changes are also
    /// picked up by the meter's own recovery under their keys; whichever comes first settles them).
    pub fn resume(&self) -> Vec<Result<Settled, KeeperFailure>> {
        let ids = match self.log.unfinished() {
            Ok(ids) => ids,
            Err(e) => return vec![Err(KeeperFailure::Log(e.to_string()))],
        };
        if ids.is_empty() {
            return Vec::new();
        }
        let driver = match self.driver(&self.default_keeper) {
            Ok(d) => d,
            Err(e) => return vec![Err(e)],
        };
        ids.into_iter()
            .map(|id| driver.drive(id).map_err(|e| KeeperFailure::Log(e.to_string())).and_then(|d| self.settled(d)))
            .collect()
    }

    /// `GET /transitions` and `POST /webhooks/keeperhub`.
    pub fn router(&self) -> Router {
        computepool_keeper::api::router(self.log.clone()).merge(webhook::router(self.webhook.clone()))
    }
}

/// The deployment context file of `--keeper-context`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ContextFile {
    chain_id: serde_json::Value,
    #[serde(default)]
    callback_url: String,
    contracts: serde_json::Map<String, serde_json::Value>,
}

impl KeeperService {
    /// Builds the service from the command line: the context file, the webhook secrets, and a chain
    /// connection (with the rails' key, which it never signs with here) to confirm keepers' claims.
    pub async fn start(
        args: &crate::payments::setup::PaymentArgs,
        state_dir: &Path,
        host: Arc<PluginHost>,
    ) -> anyhow::Result<Arc<Self>> {
        let context_path = args.keeper_context.as_ref().context("--keepers needs --keeper-context")?;
        let text = std::fs::read_to_string(context_path).with_context(|| format!("reading {}", context_path.display()))?;
        let file: ContextFile = serde_json::from_str(&text).with_context(|| format!("parsing {}", context_path.display()))?;
        for (name, value) in &file.contracts {
            let ok = value.as_str().is_some_and(|v| v.parse::<Address>().is_ok());
            anyhow::ensure!(ok, "{}: contracts.{name} is not an address", context_path.display());
        }
        let chain_id = match &file.chain_id {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            other => anyhow::bail!("{}: chainId {other} is not a number", context_path.display()),
        };
        let context = DeploymentContext { chain_id, callback_url: file.callback_url, contracts: serde_json::Value::Object(file.contracts) };
        let secrets: HashMap<String, Vec<u8>> = match &args.webhook_secrets {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let map: HashMap<String, String> = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
                map.into_iter()
                    .map(|(pool, hex_secret)| {
                        let secret = hex::decode(hex_secret.trim_start_matches("0x"))
                            .with_context(|| format!("{}: the secret of pool {pool} is not hex", path.display()))?;
                        anyhow::ensure!(secret.len() >= 16, "{}: the secret of pool {pool} is under 16 bytes", path.display());
                        Ok((pool, secret))
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            None => HashMap::new(),
        };
        let (rpc, key) = match (&args.chain_rpc, &args.chain_key_file) {
            (Some(rpc), Some(key)) => (rpc, key),
            _ => anyhow::bail!("--keepers needs --chain-rpc and --chain-key-file (keepers' claims are confirmed on chain)"),
        };
        let signer = computepool_chain::KeySource::File(key.clone()).load()?;
        let chain = Chain::connect(rpc, None, signer).await.with_context(|| format!("connecting to {rpc}"))?;
        let sender = format!("{:#x}", chain.address());
        let mut contracts = ChainConfirmer::contracts_of(&context);
        contracts.sort();
        contracts.dedup();
        let confirmer = Arc::new(ChainConfirmer::new(chain, contracts, tokio::runtime::Handle::current()));
        let service = Self::open(state_dir, host, context, confirmer, args.keeper.clone(), sender, secrets)?;
        Ok(Arc::new(service))
    }
}
