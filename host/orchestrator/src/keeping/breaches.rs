//! From a breach report to an ejected operator: output audits (and, later, liveness checks) send
//! [`BreachReport`]s here; the pool's coalition of voter plugins judges each one; only a k-of-n quorum
//! for `eject` acts. Acting is, in this order: the operator's workers are ejected from the pool's routes
//! (durably — the pool stops sending them requests at once), the pool's flow members are recomputed
//! without them, and the `handle-breach` transition runs through the keeper (its units to 0 on the GDA
//! pool, its stake slashed through Coalition.sol), under the report's digest as idempotency key, so a
//! report delivered twice acts once, and a handle-breach left unfinished is resumed at start-up. Known
//! gap: a crash after the ejection and before the transition is written leaves the operator ejected
//! but not slashed (later reports about an ejected operator are not judged again); keying handle-breach
//! by the operator's ejection instead of the report would close it.

use std::sync::Arc;

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use computepool_keeper::coalition::{BreachReport, Decision};
use computepool_keeper::judge::{Judge, JudgeConfig, Judgement, Voter};
use computepool_keeper::transition::{Transition, TransitionKind};
use computepool_plugin_host::PluginHost;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::KeeperService;
use crate::AppState;

/// `--coalition FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoalitionConfig {
    /// The voter plugins' ids (loaded from --voters), each with its own ballot key.
    pub voters: Vec<String>,
    /// Ballots for one decision needed to act (a strict majority of `voters` at least).
    pub k: u32,
    /// How long one voter may take, in ms (a late voter casts nothing). Default 10 000: a voter judges
    /// the evidence it is handed, but a busy host may take seconds to run it.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Stake slashed per upheld breach, in the stake token's atomic units (decimal string).
    pub slash_amount: String,
}

fn default_deadline_ms() -> u64 {
    10_000
}

/// Acts on verdicts: ejects, recomputes the flow, runs handle-breach.
pub struct BreachHandler {
    pub judge: Judge,
    pub keepers: Arc<KeeperService>,
    pub keeper: String,
    pub slash_amount: u128,
}

impl BreachHandler {
    /// `--coalition FILE`: the voter plugins it names (loaded in `host`), their ballot keys and the
    /// coalition's records under `state_dir`.
    pub fn from_config(path: &Path, keepers: Arc<KeeperService>, host: Arc<PluginHost>, state_dir: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let config: CoalitionConfig = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let slash_amount = crate::payments::config::parse_amount(&config.slash_amount)
            .map_err(|e| anyhow::anyhow!("{}: slash_amount {e}", path.display()))?;
        let voters = config
            .voters
            .iter()
            .map(|id| {
                host.voter(id)
                    .map(|v| v as Arc<dyn Voter>)
                    .with_context(|| format!("{}: no coalition-voter plugin `{id}` is loaded (see --voters)", path.display()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let judge = Judge::open(
            state_dir,
            voters,
            JudgeConfig { k: Some(config.k), deadline: Duration::from_millis(config.deadline_ms.max(1)) },
        )
        .with_context(|| format!("setting up the coalition of {}", path.display()))?;
        tracing::info!(voters = ?config.voters, k = config.k, "coalition judges breach reports");
        let keeper = keepers.default_keeper().to_string();
        Ok(Self { judge, keepers, keeper, slash_amount })
    }

    /// Judges reports from `reports` one at a time until the channel closes.
    pub async fn run(self: Arc<Self>, state: Arc<AppState>, mut reports: mpsc::Receiver<BreachReport>) {
        while let Some(report) = reports.recv().await {
            if let Err(e) = self.handle(&state, report.clone()).await {
                tracing::error!(pool = %report.pool_id, operator = %report.operator, "breach report not acted on: {e}");
            }
        }
    }

    /// sha256 over the report's digest and the ballots the coalition holds for it: what goes on chain
    /// as the breach's evidence (the ballots and the report stay in the coalition's store).
    fn evidence_hash(&self, judgement: &Judgement) -> Result<String, String> {
        let ballots = self.judge.store().ballots(&judgement.digest).map_err(|e| e.to_string())?;
        let mut hasher = Sha256::new();
        hasher.update(judgement.digest.as_bytes());
        hasher.update(serde_json::to_vec(&ballots).map_err(|e| e.to_string())?);
        Ok(format!("0x{}", hex::encode(hasher.finalize())))
    }

    pub async fn handle(&self, state: &AppState, report: BreachReport) -> Result<Option<Judgement>, String> {
        // Audits in flight when an operator was voted out report it again: it is out, and one breach is
        // slashed once (a new report about a re-admitted operator is judged anew).
        if let Some(pool) = state.pools.get(&report.pool_id)
            && state.operator_ejected(&pool, &report.operator)
        {
            tracing::info!(pool = %report.pool_id, operator = %report.operator, "breach report about an operator already ejected: not judged again");
            return Ok(None);
        }
        let judgement = self.judge.judge(report.clone()).await.map_err(|e| e.to_string())?;
        tracing::info!(pool = %report.pool_id, operator = %report.operator, verdict = ?judgement.verdict(),
            eject = judgement.tally.votes_for(Decision::Eject), k = judgement.tally.k, n = judgement.tally.n, "coalition verdict");
        if judgement.verdict() != Some(Decision::Eject) {
            return Ok(Some(judgement));
        }
        let evidence_hash = self.evidence_hash(&judgement)?;
        let pool = state.pools.get(&report.pool_id).ok_or_else(|| format!("pool {} is gone", report.pool_id))?;
        let reason = format!("ejected by the coalition (breach {})", judgement.digest);
        let ejected = state.eject_operator(&pool, &report.operator, &reason)?;
        tracing::warn!(pool = %report.pool_id, operator = %report.operator, workers = ?ejected, "operator ejected");
        if let Some(payments) = &state.payments
            && let Err(e) = payments.reconfigure(&pool, &state.workers).await
        {
            // The breach is still handled below: its units go to 0 on chain, which is what pays it.
            tracing::error!(pool = %report.pool_id, "the flow's members could not be recomputed without the ejected operator: {e}");
        }
        let gda_pool = state
            .payments
            .as_ref()
            .and_then(|p| p.settings(&report.pool_id))
            .and_then(|s| s.flow.target)
            .ok_or_else(|| format!("pool {} has no GDA pool to take the operator's units from", report.pool_id))?;
        let transition = Transition {
            kind: TransitionKind::HandleBreach,
            idempotency_key: format!("{}/handle-breach/{}", report.pool_id, judgement.digest),
            pool_id: report.pool_id.clone(),
            payload: serde_json::json!({
                "pool": gda_pool,
                "operator": report.operator,
                "slashAmount": self.slash_amount.to_string(),
                "evidenceHash": evidence_hash,
            }),
        };
        let (keepers, keeper) = (self.keepers.clone(), self.keeper.clone());
        let settled = tokio::task::spawn_blocking(move || keepers.run(&keeper, &transition))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        tracing::warn!(pool = %report.pool_id, operator = %report.operator,
            txs = ?settled.transactions.iter().map(|t| &t.hash).collect::<Vec<_>>(), "breach handled on chain");
        Ok(Some(judgement))
    }
}
