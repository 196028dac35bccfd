//! The `keeperhub` keeper adapter: each pool transition is a run of its workflow on KeeperHub
//! (keeperhub/workflows/*.workflow.json, imported into the operator's KeeperHub organisation), driven
//! through KeeperHub's REST API over the host's `http` capability, to the KeeperHub host the operator
//! granted. The same three calls as host/keeper's native `KeeperHubKeeper`:
//!
//! - `submit`: `POST {baseUrl}/api/workflows/{id}/webhook` with the user key (`Authorization: Bearer
//!   wfb_…`) and the transition's payload — the full trigger body — as the run's input; answers the
//!   `executionId`. The run is remembered under its idempotency key (kv `run:<key>`), so a repeated
//!   submit returns the first run instead of triggering KeeperHub again (its webhook is not idempotent).
//! - `status`: `GET {baseUrl}/api/workflows/executions/{id}/status` with the organisation key
//!   (`Bearer kh_…`). `success` → succeeded, detail = the run's `transactionHashes` (JSON); `error`,
//!   `cancelled`, `system_error` → failed, detail = the status and `errorContext`; anything else is
//!   pending (KeeperHub documents its status set as a lower bound).
//! - `lookup`: the remembered run, else the run whose input carries the idempotency key in a configured
//!   workflow's `GET {baseUrl}/api/workflows/{id}/executions` (a run KeeperHub started before the host
//!   heard back).
//!
//! Configuration: the JSON object under kv key `config`, which the host writes from the operator's
//! config (host/keeper's `KeeperHubPluginConfig`): `{"baseUrl": "https://app.keeperhub.com",
//! "apiKey": "kh_…", "webhookKey": "wfb_…", "workflows": {"propose": "<workflow id>", …}}`. The keys
//! are never in this component. A missing or bad config is `unavailable` (the operator can fix it, and
//! the transition waits), as are transport failures, 429 and 5xx; other HTTP answers are `rejected`.
#![no_std]

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use computepool::host::{http, kv_store, log};
use computepool::keeper_adapter::types::{KeeperError, Submission, Transition, TransitionKind, TransitionState, TransitionStatus};
// Linked for its `memcmp`/`bcmp`: string comparisons lower to them and a no_std guest has no libc.
use computepool_rail_kit as _;
use exports::computepool::keeper_adapter::keeper::Guest;
use serde::Deserialize;
use serde_json::{Value, json};

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/keeper-adapter/0.1.0"],
    world: "computepool:keeper-adapter/keeper-adapter@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

/// The kv key of the operator's configuration.
const CONFIG_KEY: &str = "config";

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    base_url: String,
    api_key: String,
    webhook_key: String,
    /// Transition kind (kebab-case) → KeeperHub workflow id.
    workflows: BTreeMap<String, String>,
}

fn unavailable(m: impl Into<String>) -> KeeperError {
    KeeperError::Unavailable(m.into())
}

fn kv_error(e: kv_store::KvError) -> KeeperError {
    match e {
        kv_store::KvError::InvalidKey(n) => KeeperError::InvalidTransition(format!("the idempotency key makes a kv key over {n} bytes")),
        kv_store::KvError::QuotaExceeded(n) => unavailable(format!("the plugin's kv-store is full ({n} bytes)")),
        kv_store::KvError::Unavailable(m) => unavailable(format!("kv-store: {m}")),
    }
}

fn config() -> Result<Config, KeeperError> {
    let bytes = kv_store::get(CONFIG_KEY)
        .map_err(kv_error)?
        .ok_or_else(|| unavailable("not configured: the host has not written this plugin's KeeperHub config (kv key `config`)"))?;
    let c: Config = serde_json::from_slice(&bytes).map_err(|e| unavailable(format!("keeperhub config: {e}")))?;
    if !(c.base_url.starts_with("https://") || c.base_url.starts_with("http://")) {
        return Err(unavailable(format!("keeperhub config: baseUrl `{}` is not an http(s) URL", c.base_url)));
    }
    // KeeperHub refuses the other kind of key on each route; say so before it does.
    if !c.webhook_key.starts_with("wfb_") {
        return Err(unavailable("keeperhub config: webhookKey must be a user webhook key (wfb_…)"));
    }
    if !c.api_key.starts_with("kh_") {
        return Err(unavailable("keeperhub config: apiKey must be an organisation API key (kh_…)"));
    }
    for id in c.workflows.values() {
        path_segment(id)?;
    }
    Ok(c)
}

fn kind_name(k: TransitionKind) -> &'static str {
    match k {
        TransitionKind::Propose => "propose",
        TransitionKind::ActivateAndPool => "activate-and-pool",
        TransitionKind::StreamStart => "stream-start",
        TransitionKind::StreamStop => "stream-stop",
        TransitionKind::HandleBreach => "handle-breach",
    }
}

/// Ids go into URL paths: refuse anything that could change the path.
fn path_segment(id: &str) -> Result<&str, KeeperError> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        Ok(id)
    } else {
        Err(KeeperError::Rejected(format!("{id:?} is not a KeeperHub id")))
    }
}

/// One request to KeeperHub; the parsed JSON body of a 2xx answer.
fn call(config: &Config, method: &str, path: &str, key: &str, body: Option<&str>) -> Result<Value, KeeperError> {
    let url = format!("{}{path}", config.base_url.trim_end_matches('/'));
    let mut headers = alloc::vec![
        http::Header { name: "authorization".into(), value: format!("Bearer {key}") },
        http::Header { name: "accept".into(), value: "application/json".into() },
    ];
    if body.is_some() {
        headers.push(http::Header { name: "content-type".into(), value: "application/json".into() });
    }
    let request = http::Request { method: method.into(), url: url.clone(), headers, body: body.unwrap_or_default().as_bytes().to_vec() };
    let response = http::send(&request).map_err(|e| {
        unavailable(match e {
            http::HttpError::HostNotGranted(h) => format!("the operator has not granted this plugin http to {h} (add it to [grants.http] keeperhub)"),
            http::HttpError::InvalidRequest(m) => format!("request to {url} refused by the host: {m}"),
            http::HttpError::TooLarge(n) => format!("KeeperHub's answer to {path} passed {n} bytes"),
            http::HttpError::Timeout => format!("KeeperHub at {url} did not answer in time"),
            http::HttpError::Transport(m) => format!("KeeperHub unreachable at {url}: {m}"),
        })
    })?;
    let text = String::from_utf8_lossy(&response.body);
    if !(200..300).contains(&response.status) {
        let excerpt: String = text.chars().take(500).collect();
        let message = format!("KeeperHub answered {} to {method} {path}: {excerpt}", response.status);
        // Rate limits (429, with Retry-After) and server errors pass; the rest are for good.
        return Err(if response.status == 429 || response.status >= 500 { unavailable(message) } else { KeeperError::Rejected(message) });
    }
    serde_json::from_str(&text).map_err(|e| {
        KeeperError::Rejected(format!("unexpected KeeperHub answer to {path}: {e}: {}", text.chars().take(200).collect::<String>()))
    })
}

fn run_key(idempotency_key: &str) -> String {
    format!("run:{idempotency_key}")
}

fn remembered(idempotency_key: &str) -> Result<Option<Submission>, KeeperError> {
    Ok(kv_store::get(&run_key(idempotency_key))
        .map_err(kv_error)?
        .map(|r| Submission { reference: String::from_utf8_lossy(&r).into_owned() }))
}

fn remember(idempotency_key: &str, reference: &str) -> Result<(), KeeperError> {
    kv_store::set(&run_key(idempotency_key), reference.as_bytes()).map_err(kv_error)
}

struct KeeperHub;

impl Guest for KeeperHub {
    fn submit(t: Transition) -> Result<Submission, KeeperError> {
        // The payload is the trigger body; it must name this transition, or a lookup by key would miss it.
        let body: Value =
            serde_json::from_str(&t.payload).map_err(|e| KeeperError::InvalidTransition(format!("payload is not JSON: {e}")))?;
        if body.get("idempotencyKey").and_then(Value::as_str) != Some(t.idempotency_key.as_str()) {
            return Err(KeeperError::InvalidTransition(format!(
                "the payload's idempotencyKey is not the transition's ({})",
                t.idempotency_key
            )));
        }
        if let Some(run) = remembered(&t.idempotency_key)? {
            return Ok(run);
        }
        let config = config()?;
        let kind = kind_name(t.kind);
        let workflow = config
            .workflows
            .get(kind)
            .ok_or_else(|| KeeperError::InvalidTransition(format!("no KeeperHub workflow configured for {kind}")))?;
        let path = format!("/api/workflows/{}/webhook", path_segment(workflow)?);
        let answer = call(&config, "POST", &path, &config.webhook_key, Some(&t.payload))?;
        let reference = answer
            .get("executionId")
            .and_then(Value::as_str)
            .ok_or_else(|| KeeperError::Rejected(format!("KeeperHub's trigger answer has no executionId: {answer}")))?
            .to_string();
        path_segment(&reference)?;
        // KeeperHub acted; if this write fails, `lookup` still finds the run in the execution list.
        if let Err(e) = remember(&t.idempotency_key, &reference) {
            log::log(log::Level::Warn, &format!("run {reference} of {} not remembered: {e:?}", t.idempotency_key));
        }
        Ok(Submission { reference })
    }

    fn status(reference: String) -> Result<TransitionStatus, KeeperError> {
        let config = config()?;
        let path = format!("/api/workflows/executions/{}/status", path_segment(&reference)?);
        let answer = call(&config, "GET", &path, &config.api_key, None)?;
        let status = answer
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| KeeperError::Rejected(format!("KeeperHub's status answer has no status: {answer}")))?;
        Ok(match status {
            "success" => {
                let hashes = answer.get("transactionHashes").cloned().unwrap_or_else(|| json!([]));
                TransitionStatus { state: TransitionState::Succeeded, detail: hashes.to_string() }
            }
            "error" | "cancelled" | "system_error" => {
                let context = match answer.get("errorContext") {
                    Some(Value::Null) | None => "no error context".to_string(),
                    Some(c) => c.to_string(),
                };
                TransitionStatus { state: TransitionState::Failed, detail: format!("{status}: {context}") }
            }
            "pending" | "running" => TransitionStatus { state: TransitionState::Pending, detail: status.to_string() },
            other => {
                log::log(log::Level::Warn, &format!("unknown KeeperHub execution status `{other}` for {reference}, polling on"));
                TransitionStatus { state: TransitionState::Pending, detail: other.to_string() }
            }
        })
    }

    fn lookup(idempotency_key: String) -> Result<Option<Submission>, KeeperError> {
        if let Some(run) = remembered(&idempotency_key)? {
            return Ok(Some(run));
        }
        let config = config()?;
        for workflow in config.workflows.values() {
            let path = format!("/api/workflows/{}/executions", path_segment(workflow)?);
            let answer = call(&config, "GET", &path, &config.api_key, None)?;
            let runs = answer.as_array().ok_or_else(|| KeeperError::Rejected(format!("KeeperHub's execution list for {workflow} is not a list")))?;
            let found = runs.iter().find(|r| r.get("input").and_then(|i| i.get("idempotencyKey")).and_then(Value::as_str) == Some(idempotency_key.as_str()));
            if let Some(id) = found.and_then(|r| r.get("id")).and_then(Value::as_str) {
                path_segment(id)?;
                if let Err(e) = remember(&idempotency_key, id) {
                    log::log(log::Level::Warn, &format!("run {id} of {idempotency_key} not remembered: {e:?}"));
                }
                return Ok(Some(Submission { reference: id.to_string() }));
            }
        }
        Ok(None)
    }
}

export!(KeeperHub);
