//! `PluginKeeper`: the `Keeper` over a keeper-adapter plugin (`keeperhub`, `local`) loaded by the plugin
//! host. The plugin gets the transition's kind, key and pool as WIT fields, and as its `payload` the full
//! trigger body ([`DeploymentContext::trigger_body`]: idempotencyKey, poolId, kind, payload, chainId,
//! callbackUrl, contracts) — the same input a KeeperHub workflow run gets, so every keeper plugin reads
//! the workflow files' `{{@trigger:...}}` references against the same object.
//!
//! Plugin faults (a trap, fuel or memory exhausted, a broken contract, a plugin disabled by its failure
//! policy) are `unavailable`, never final: a submit that trapped may already have reached KeeperHub or
//! the chain, and the driver looks the run up by its idempotency key before it submits again.

use std::sync::Arc;

use computepool_plugin_host::keeper::{self as wit, KeeperPlugin};
use computepool_plugin_host::{KeeperCallError, PluginHost};

use crate::keeperhub::DeploymentContext;
use crate::transition::{Keeper, KeeperError, RunState, RunStatus, Submission, Transition, TransitionKind};

/// The plugin host has no keeper adapter under that id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no keeper-adapter plugin `{0}` is loaded (is its folder under the plugins dir, and its kind keeper-adapter?)")]
pub struct NotLoaded(pub String);

pub struct PluginKeeper {
    plugin: Arc<KeeperPlugin>,
    context: DeploymentContext,
}

impl PluginKeeper {
    pub fn new(plugin: Arc<KeeperPlugin>, context: DeploymentContext) -> Self {
        Self { plugin, context }
    }

    /// The keeper adapter `id` loaded in `host`.
    pub fn from_host(host: &PluginHost, id: &str, context: DeploymentContext) -> Result<Self, NotLoaded> {
        host.keeper(id).map(|plugin| Self::new(plugin, context)).ok_or_else(|| NotLoaded(id.to_owned()))
    }

    pub fn plugin(&self) -> &Arc<KeeperPlugin> {
        &self.plugin
    }

    /// The transition as the plugin gets it.
    pub fn to_plugin(&self, t: &Transition) -> wit::Transition {
        wit::Transition {
            kind: match t.kind {
                TransitionKind::Propose => wit::TransitionKind::Propose,
                TransitionKind::ActivateAndPool => wit::TransitionKind::ActivateAndPool,
                TransitionKind::StreamStart => wit::TransitionKind::StreamStart,
                TransitionKind::StreamStop => wit::TransitionKind::StreamStop,
                TransitionKind::HandleBreach => wit::TransitionKind::HandleBreach,
            },
            idempotency_key: t.idempotency_key.clone(),
            pool_id: t.pool_id.clone(),
            payload: self.context.trigger_body(t).to_string(),
        }
    }
}

fn keeper_error(e: KeeperCallError) -> KeeperError {
    match e {
        KeeperCallError::Keeper { error, id } => match error {
            wit::KeeperError::InvalidTransition(m) => KeeperError::InvalidTransition(format!("{id}: {m}")),
            wit::KeeperError::Unavailable(m) => KeeperError::Unavailable(format!("{id}: {m}")),
            wit::KeeperError::Rejected(m) => KeeperError::Rejected(format!("{id}: {m}")),
        },
        // See the module docs: a fault is never a final answer.
        KeeperCallError::Plugin(fault) => KeeperError::Unavailable(fault.to_string()),
    }
}

impl Keeper for PluginKeeper {
    fn submit(&self, t: &Transition) -> Result<Submission, KeeperError> {
        let run = self.plugin.submit(&self.to_plugin(t)).map_err(keeper_error)?;
        tracing::info!(plugin = %self.plugin.id(), key = %t.idempotency_key, kind = %t.kind, reference = %run.reference, "keeper run started");
        Ok(Submission { reference: run.reference })
    }

    fn status(&self, reference: &str) -> Result<RunStatus, KeeperError> {
        let s = self.plugin.status(reference).map_err(keeper_error)?;
        let state = match s.state {
            wit::TransitionState::Pending => RunState::Pending,
            wit::TransitionState::Succeeded => RunState::Succeeded,
            wit::TransitionState::Failed => RunState::Failed,
        };
        Ok(RunStatus { state, detail: s.detail })
    }

    fn lookup(&self, idempotency_key: &str) -> Result<Option<Submission>, KeeperError> {
        Ok(self.plugin.lookup(idempotency_key).map_err(keeper_error)?.map(|s| Submission { reference: s.reference }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use computepool_plugin_host::CallError;

    #[test]
    fn plugin_faults_are_never_final() {
        let trap = KeeperCallError::Plugin(CallError::Trap { id: "k".into(), message: "unreachable".into() });
        assert!(matches!(keeper_error(trap), KeeperError::Unavailable(m) if m.contains("trapped")));
        let disabled = KeeperCallError::Plugin(CallError::Disabled { id: "k".into(), failures: 3 });
        assert!(matches!(keeper_error(disabled), KeeperError::Unavailable(_)));
        let rejected = KeeperCallError::Keeper { id: "k".into(), error: wit::KeeperError::Rejected("401".into()) };
        assert_eq!(keeper_error(rejected), KeeperError::Rejected("k: 401".into()));
        let invalid = KeeperCallError::Keeper { id: "k".into(), error: wit::KeeperError::InvalidTransition("x".into()) };
        assert!(matches!(keeper_error(invalid), KeeperError::InvalidTransition(_)));
    }
}
