//! A native client for the parts of KeeperHub's REST API a keeper needs (keeperhub/README.md has the
//! sources): trigger a workflow through its webhook (`POST /api/workflows/{id}/webhook`, user key
//! `wfb_…`), read a run's status (`GET /api/workflows/executions/{id}/status`, org key `kh_…`) and list
//! a workflow's runs (`GET /api/workflows/{id}/executions`, to find a run by idempotency key after a
//! crash: the webhook trigger itself is not idempotent). `KeeperHubKeeper` is the `Keeper` over it;
//! the `keeperhub` adapter plugin makes the same calls through the host's http capability.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::transition::{Keeper, KeeperError, RunState, RunStatus, Submission, Transition, TransitionKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeeperHubError {
    #[error("KeeperHub unreachable: {0}")]
    Transport(String),
    #[error("KeeperHub answered {status}: {body}")]
    Http { status: u16, body: String },
    #[error("unexpected KeeperHub response: {0}")]
    Decode(String),
}

impl From<KeeperHubError> for KeeperError {
    fn from(e: KeeperHubError) -> Self {
        match &e {
            KeeperHubError::Transport(_) => KeeperError::Unavailable(e.to_string()),
            // Rate limits (429, with Retry-After) and server errors pass; the rest are for good.
            KeeperHubError::Http { status, .. } if *status == 429 || *status >= 500 => KeeperError::Unavailable(e.to_string()),
            KeeperHubError::Http { .. } | KeeperHubError::Decode(_) => KeeperError::Rejected(e.to_string()),
        }
    }
}

/// `{"executionId": …, "status": "running"}` from the webhook trigger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TriggeredRun {
    pub execution_id: String,
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransactionReceipt {
    pub hash: String,
    pub node_id: String,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub chain_id: Option<u64>,
}

/// The execution status endpoint's answer (the fields a keeper reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionStatus {
    /// `pending`, `running`, `success`, `error`, `cancelled` — documented as a lower bound.
    pub status: String,
    #[serde(default)]
    pub transaction_hashes: Vec<TransactionReceipt>,
    #[serde(default)]
    pub error_context: Option<serde_json::Value>,
}

/// One entry of a workflow's execution history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExecutionSummary {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub input: serde_json::Value,
}

pub struct KeeperHubClient {
    base_url: String,
    api_key: String,
    webhook_key: String,
    agent: ureq::Agent,
}

impl KeeperHubClient {
    /// `base_url` like `https://app.keeperhub.com`; `api_key` the organisation key (`kh_…`, REST);
    /// `webhook_key` the user key (`wfb_…`, webhook triggers only). Calls time out after 30 s.
    pub fn new(base_url: &str, api_key: &str, webhook_key: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .user_agent(concat!("computepool/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            webhook_key: webhook_key.to_owned(),
            agent,
        }
    }

    fn read<T: serde::de::DeserializeOwned>(
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<T, KeeperHubError> {
        let mut response = result.map_err(|e| KeeperHubError::Transport(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(4 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| KeeperHubError::Transport(e.to_string()))?;
        if !(200..300).contains(&status) {
            let body: String = body.chars().take(500).collect();
            return Err(KeeperHubError::Http { status, body });
        }
        serde_json::from_str(&body).map_err(|e| KeeperHubError::Decode(format!("{e}: {}", body.chars().take(200).collect::<String>())))
    }

    /// Starts a run of `workflow_id` with `input` as its trigger data.
    pub fn trigger(&self, workflow_id: &str, input: &serde_json::Value) -> Result<TriggeredRun, KeeperHubError> {
        let url = format!("{}/api/workflows/{}/webhook", self.base_url, path_segment(workflow_id)?);
        Self::read(
            self.agent
                .post(&url)
                .header("Authorization", &format!("Bearer {}", self.webhook_key))
                .header("Content-Type", "application/json")
                .send(input.to_string().as_bytes()),
        )
    }

    pub fn status(&self, execution_id: &str) -> Result<ExecutionStatus, KeeperHubError> {
        let url = format!("{}/api/workflows/executions/{}/status", self.base_url, path_segment(execution_id)?);
        Self::read(self.agent.get(&url).header("Authorization", &format!("Bearer {}", self.api_key)).call())
    }

    pub fn executions(&self, workflow_id: &str) -> Result<Vec<ExecutionSummary>, KeeperHubError> {
        let url = format!("{}/api/workflows/{}/executions", self.base_url, path_segment(workflow_id)?);
        Self::read(self.agent.get(&url).header("Authorization", &format!("Bearer {}", self.api_key)).call())
    }
}

/// Ids go into URL paths: refuse anything that could change the path.
fn path_segment(id: &str) -> Result<&str, KeeperHubError> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        Ok(id)
    } else {
        Err(KeeperHubError::Decode(format!("{id:?} is not a KeeperHub id")))
    }
}

/// What every trigger carries besides the transition (the workflows read these fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeploymentContext {
    pub chain_id: String,
    /// Where the workflow reports its result (the orchestrator's `/webhooks/keeperhub`).
    pub callback_url: String,
    /// `gdaV1Forwarder`, `coalition`, `poolInft` addresses.
    pub contracts: serde_json::Value,
}

impl DeploymentContext {
    /// The input a workflow run of `t` gets: the transition and this context, flat (a KeeperHub webhook
    /// trigger takes the whole body as its input; keeper plugins get the same text as their payload).
    pub fn trigger_body(&self, t: &Transition) -> serde_json::Value {
        serde_json::json!({
            "idempotencyKey": t.idempotency_key,
            "poolId": t.pool_id,
            "kind": t.kind.as_str(),
            "payload": t.payload,
            "chainId": self.chain_id,
            "callbackUrl": self.callback_url,
            "contracts": self.contracts,
        })
    }
}

/// The `Keeper` that runs transitions as KeeperHub workflow runs.
pub struct KeeperHubKeeper {
    client: KeeperHubClient,
    workflows: HashMap<TransitionKind, String>,
    context: DeploymentContext,
}

impl KeeperHubKeeper {
    /// `workflows`: the KeeperHub workflow id each imported keeperhub/workflows file got.
    pub fn new(client: KeeperHubClient, workflows: HashMap<TransitionKind, String>, context: DeploymentContext) -> Self {
        Self { client, workflows, context }
    }

    /// The trigger body: the transition and the deployment context, flat (a webhook trigger takes the
    /// whole body as its input).
    pub fn trigger_body(&self, t: &Transition) -> serde_json::Value {
        self.context.trigger_body(t)
    }
}

impl Keeper for KeeperHubKeeper {
    fn submit(&self, t: &Transition) -> Result<Submission, KeeperError> {
        let workflow = self
            .workflows
            .get(&t.kind)
            .ok_or_else(|| KeeperError::InvalidTransition(format!("no KeeperHub workflow configured for {}", t.kind)))?;
        let run = self.client.trigger(workflow, &self.trigger_body(t))?;
        tracing::info!(key = %t.idempotency_key, kind = %t.kind, execution = %run.execution_id, "KeeperHub run started");
        Ok(Submission { reference: run.execution_id })
    }

    fn status(&self, reference: &str) -> Result<RunStatus, KeeperError> {
        let s = self.client.status(reference)?;
        let state = match s.status.as_str() {
            "success" => RunState::Succeeded,
            "error" | "cancelled" | "system_error" => RunState::Failed,
            "pending" | "running" => RunState::Pending,
            other => {
                // The status set is documented as a lower bound: an unknown one is not final.
                tracing::warn!(execution = reference, status = other, "unknown KeeperHub execution status, polling on");
                RunState::Pending
            }
        };
        let detail = match state {
            RunState::Succeeded => serde_json::to_string(&s.transaction_hashes).unwrap_or_default(),
            RunState::Failed => format!(
                "{}: {}",
                s.status,
                s.error_context.as_ref().map_or_else(|| "no error context".to_owned(), |c| c.to_string())
            ),
            RunState::Pending => s.status.clone(),
        };
        Ok(RunStatus { state, detail })
    }

    fn lookup(&self, idempotency_key: &str) -> Result<Option<Submission>, KeeperError> {
        for workflow in self.workflows.values() {
            let runs = self.client.executions(workflow)?;
            if let Some(run) = runs.iter().find(|r| r.input["idempotencyKey"] == idempotency_key) {
                return Ok(Some(Submission { reference: run.id.clone() }));
            }
        }
        Ok(None)
    }
}

/// What the `keeperhub` keeper-adapter plugin reads from its kv-store (key [`KeeperHubPluginConfig::KV_KEY`]):
/// where KeeperHub is, the two keys and the workflow ids. The host writes it from the operator's config
/// before the first transition, so the keys live in the operator's config and the host's state dir, never
/// in the plugin's component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeeperHubPluginConfig {
    /// Like `https://app.keeperhub.com`; the operator grants the plugin http to this host.
    pub base_url: String,
    /// The organisation key (`kh_…`): run status and execution lists.
    pub api_key: String,
    /// The user key (`wfb_…`): webhook triggers.
    pub webhook_key: String,
    /// Transition kind (kebab-case) → the KeeperHub workflow id its file was imported as.
    pub workflows: std::collections::BTreeMap<String, String>,
}

impl KeeperHubPluginConfig {
    pub const KV_KEY: &'static str = "config";

    pub fn new(base_url: &str, api_key: &str, webhook_key: &str, workflows: &HashMap<TransitionKind, String>) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: api_key.to_owned(),
            webhook_key: webhook_key.to_owned(),
            workflows: workflows.iter().map(|(k, id)| (k.as_str().to_owned(), id.clone())).collect(),
        }
    }

    /// Writes it into the plugin's kv scope (`PluginHost::kv_scope("keeperhub")`, or `KeeperPlugin::kv`).
    pub fn store(&self, kv: &computepool_plugin_host::kv_store::KvScope) -> Result<(), computepool_plugin_host::kv_store::KvError> {
        kv.set(Self::KV_KEY, serde_json::to_vec(self).expect("a config serialises"))
    }
}
