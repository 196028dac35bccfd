//! A local stand-in for KeeperHub, for tests and `make test` (no machine here reaches the real
//! service). It serves the documented routes a keeper uses — the webhook trigger with a `wfb_` bearer
//! key, the execution status and execution list with a `kh_` key, with KeeperHub's answers and error
//! codes — and runs ComputePool's workflow files: each `web3/write-contract` node goes to a
//! `ContractExecutor` (the test's chain), then the run reports to the workflow's callback URL with
//! the signature headers, as the workflows' last two nodes do. Scriptable: fail a workflow's next runs,
//! and tamper with the next callbacks (bad signature, stale timestamp, replay).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use crate::transition::TransitionKind;
use crate::webhook::{self, HEADER_DELIVERY, HEADER_POOL, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use crate::workflows::{ContractCall, WorkflowExport};

/// Carries out one contract call of a run (the stand-in's "chain"); returns the transaction hash.
pub trait ContractExecutor: Send + Sync {
    /// `item` is the For Each element when the call runs inside a loop over the payload's members.
    fn execute(&self, input: &Value, call: &ContractCall, item: Option<&Value>) -> Result<String, String>;
}

/// How the stand-in spoils a callback (to test the receiver).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Signed with the wrong secret.
    BadSignature,
    /// Signed correctly, ten minutes old.
    StaleTimestamp,
    /// Sent correctly, then the identical delivery again.
    Replay,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackRecord {
    pub execution_id: String,
    pub delivery_id: String,
    pub tamper: Option<Tamper>,
    /// The receiver's HTTP status (0 if it could not be reached).
    pub status: u16,
}

pub struct StandInConfig {
    pub api_key: String,
    pub webhook_key: String,
    /// Workflow id → the workflow (as imported into KeeperHub).
    pub workflows: HashMap<String, (TransitionKind, WorkflowExport)>,
    /// Each pool's webhook secret, as baked into its imported workflows.
    pub secrets: HashMap<String, Vec<u8>>,
}

#[derive(Debug, Clone)]
struct Execution {
    id: String,
    workflow_id: String,
    status: &'static str,
    input: Value,
    transaction_hashes: Vec<Value>,
    error: Option<Value>,
}

struct Inner {
    config: StandInConfig,
    executor: Arc<dyn ContractExecutor>,
    executions: Mutex<Vec<Execution>>,
    fail_next: Mutex<HashMap<TransitionKind, u32>>,
    tamper_next: Mutex<VecDeque<Tamper>>,
    callbacks: Mutex<Vec<CallbackRecord>>,
}

pub struct StandIn {
    inner: Arc<Inner>,
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl StandIn {
    /// Serves on an ephemeral loopback port, on the current tokio runtime.
    pub async fn start(config: StandInConfig, executor: Arc<dyn ContractExecutor>) -> std::io::Result<Self> {
        let inner = Arc::new(Inner {
            config,
            executor,
            executions: Mutex::new(Vec::new()),
            fail_next: Mutex::new(HashMap::new()),
            tamper_next: Mutex::new(VecDeque::new()),
            callbacks: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/api/workflows/{workflow_id}/webhook", post(trigger))
            .route("/api/workflows/{workflow_id}/executions", get(executions))
            .route("/api/workflows/executions/{execution_id}/status", get(status))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async { drop(rx.await) }).await;
        });
        Ok(Self { inner, addr, shutdown: Some(tx) })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next `n` runs of `kind`'s workflow fail at their first contract call, acting on nothing.
    pub fn fail_next_runs(&self, kind: TransitionKind, n: u32) {
        *lock(&self.inner.fail_next).entry(kind).or_default() += n;
    }

    /// The next callbacks (in the order runs finish) are spoiled as given.
    pub fn tamper_next_callbacks(&self, tampers: &[Tamper]) {
        lock(&self.inner.tamper_next).extend(tampers.iter().copied());
    }

    pub fn callbacks(&self) -> Vec<CallbackRecord> {
        lock(&self.inner.callbacks).clone()
    }

    /// Execution ids and statuses, in trigger order.
    pub fn executions(&self) -> Vec<(String, String)> {
        lock(&self.inner.executions).iter().map(|e| (e.id.clone(), e.status.to_owned())).collect()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn error(status: StatusCode, message: &str, extra: Value) -> Response {
    let mut body = json!({"error": message});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    (status, axum::Json(body)).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let h = headers.get("authorization")?.to_str().ok()?;
    Some(h.strip_prefix("Bearer ").unwrap_or(h))
}

/// `kh_` keys on the REST routes, as KeeperHub's endpoint scope says.
fn check_api_key(inner: &Inner, headers: &HeaderMap) -> Result<(), Box<Response>> {
    match bearer(headers) {
        Some(k) if k == inner.config.api_key => Ok(()),
        Some(_) => Err(Box::new(error(StatusCode::UNAUTHORIZED, "Invalid API key", json!({})))),
        None => Err(Box::new(error(StatusCode::UNAUTHORIZED, "Unauthorized", json!({})))),
    }
}

async fn trigger(State(inner): State<Arc<Inner>>, Path(workflow_id): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some((kind, workflow)) = inner.config.workflows.get(&workflow_id).cloned() else {
        return error(StatusCode::NOT_FOUND, "Workflow not found", json!({}));
    };
    match bearer(&headers) {
        None => return error(StatusCode::UNAUTHORIZED, "Missing Authorization header", json!({})),
        Some(k) if k.starts_with("kh_") => {
            return error(
                StatusCode::UNAUTHORIZED,
                "Wrong API key type. This endpoint requires a user webhook key (wfb_*).",
                json!({"code": "wrong_key_type", "expected": "wfb_*", "received": "kh_*"}),
            );
        }
        Some(k) if !k.starts_with("wfb_") => {
            return error(StatusCode::UNAUTHORIZED, "Invalid API key format. Expected a user webhook key starting with wfb_.", json!({"code": "invalid_key_format"}));
        }
        Some(k) if k != inner.config.webhook_key => return error(StatusCode::UNAUTHORIZED, "Invalid API key", json!({})),
        Some(_) => {}
    }
    // Like KeeperHub: the whole body is the trigger input; a body that is not JSON becomes {}.
    let input: Value = serde_json::from_slice(&body).unwrap_or_else(|_| json!({}));
    let id = {
        let mut executions = lock(&inner.executions);
        let id = format!("exec_{}", executions.len() + 1);
        executions.push(Execution {
            id: id.clone(),
            workflow_id,
            status: "running",
            input: input.clone(),
            transaction_hashes: Vec::new(),
            error: None,
        });
        id
    };
    tokio::spawn(run(inner.clone(), id.clone(), kind, workflow, input));
    axum::Json(json!({"executionId": id, "status": "running"})).into_response()
}

async fn status(State(inner): State<Arc<Inner>>, Path(execution_id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = check_api_key(&inner, &headers) {
        return *r;
    }
    let executions = lock(&inner.executions);
    let Some(e) = executions.iter().find(|e| e.id == execution_id) else {
        return error(StatusCode::NOT_FOUND, "Execution not found", json!({}));
    };
    axum::Json(json!({
        "status": e.status,
        "transactionHashes": e.transaction_hashes,
        "errorContext": e.error,
    }))
    .into_response()
}

async fn executions(State(inner): State<Arc<Inner>>, Path(workflow_id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(r) = check_api_key(&inner, &headers) {
        return *r;
    }
    if !inner.config.workflows.contains_key(&workflow_id) {
        return error(StatusCode::NOT_FOUND, "Workflow not found", json!({}));
    }
    let list: Vec<Value> = lock(&inner.executions)
        .iter()
        .filter(|e| e.workflow_id == workflow_id)
        .map(|e| json!({"id": e.id, "workflowId": e.workflow_id, "status": e.status, "input": e.input, "transactionHashes": e.transaction_hashes}))
        .collect();
    axum::Json(Value::Array(list)).into_response()
}

/// Resolves `{{@trigger:<label>.<path>}}` against the trigger input (the only references the
/// stand-in needs to follow).
fn resolve_trigger_ref<'a>(input: &'a Value, template: &str) -> Option<&'a Value> {
    let inner = template.strip_prefix("{{@trigger:")?.strip_suffix("}}")?;
    let path = inner.split_once('.')?.1;
    path.split('.').try_fold(input, |v, key| v.get(key))
}

async fn run(inner: Arc<Inner>, id: String, kind: TransitionKind, workflow: WorkflowExport, input: Value) {
    let fail = {
        let mut f = lock(&inner.fail_next);
        let n = f.entry(kind).or_default();
        let fail = *n > 0;
        *n = n.saturating_sub(1);
        fail
    };
    let result = if fail {
        Err(("scripted failure: execution reverted".to_owned(), workflow.contract_calls().ok().and_then(|c| c.first().map(|c| c.node_id.clone()))))
    } else {
        execute_steps(&inner, &workflow, &input).await
    };
    let hashes = match result {
        Ok(hashes) => hashes,
        Err((message, node)) => {
            set(&inner, &id, |e| {
                e.status = "error";
                e.error = Some(json!({"error": message, "failedNodeId": node}));
            });
            return;
        }
    };
    set(&inner, &id, |e| e.transaction_hashes = hashes.clone());
    send_callback(&inner, &id, &input, &hashes).await;
    set(&inner, &id, |e| e.status = "success");
}

fn set(inner: &Inner, id: &str, f: impl FnOnce(&mut Execution)) {
    if let Some(e) = lock(&inner.executions).iter_mut().find(|e| e.id == id) {
        f(e);
    }
}

async fn execute_steps(inner: &Arc<Inner>, workflow: &WorkflowExport, input: &Value) -> Result<Vec<Value>, (String, Option<String>)> {
    let calls: HashMap<String, ContractCall> = workflow
        .contract_calls()
        .map_err(|e| (e.to_string(), None))?
        .into_iter()
        .map(|c| (c.node_id.clone(), c))
        .collect();
    let mut hashes = Vec::new();
    let mut loop_items: Option<Vec<Value>> = None;
    for node in workflow.steps() {
        let action = node.data.config.get("actionType").and_then(|v| v.as_str()).unwrap_or_default();
        if action == "For Each" {
            let items = node.data.config.get("items").and_then(|v| v.as_str()).and_then(|t| resolve_trigger_ref(input, t));
            loop_items = Some(items.and_then(|v| v.as_array().cloned()).unwrap_or_default());
            continue;
        }
        let Some(call) = calls.get(&node.id).cloned() else { continue };
        // The node right after a For Each is its body.
        let in_loop = loop_items.is_some();
        let items: Vec<Option<Value>> = match loop_items.take() {
            Some(items) => items.into_iter().map(Some).collect(),
            None => vec![None],
        };
        for (i, item) in items.into_iter().enumerate() {
            let executor = inner.executor.clone();
            let (run_input, call) = (input.clone(), call.clone());
            let node_id = call.node_id.clone();
            let label = call.label.clone();
            let hash = tokio::task::spawn_blocking(move || executor.execute(&run_input, &call, item.as_ref()))
                .await
                .map_err(|e| (e.to_string(), Some(node_id.clone())))?
                .map_err(|e| (e, Some(node_id.clone())))?;
            let mut receipt = json!({"hash": hash, "nodeId": node_id, "nodeName": label});
            if let Some(chain) = input["chainId"].as_str().and_then(|c| c.parse::<u64>().ok()) {
                receipt["chainId"] = chain.into();
            }
            if in_loop {
                receipt["iterationIndex"] = i.into();
            }
            hashes.push(receipt);
        }
    }
    Ok(hashes)
}

/// What the workflows' "Sign result" and "Report result" nodes do.
async fn send_callback(inner: &Arc<Inner>, id: &str, input: &Value, hashes: &[Value]) {
    let Some(url) = input["callbackUrl"].as_str().map(str::to_owned) else { return };
    let pool = input["poolId"].as_str().unwrap_or_default().to_owned();
    let Some(secret) = inner.config.secrets.get(&pool).cloned() else {
        tracing::warn!(pool, "stand-in has no webhook secret for this pool, no callback");
        return;
    };
    let tamper = lock(&inner.tamper_next).pop_front();
    let now = crate::log::now_ms() / 1000;
    let timestamp = if tamper == Some(Tamper::StaleTimestamp) { now - 600 } else { now };
    let delivery_id = format!("{}:{}:{id}", input["idempotencyKey"].as_str().unwrap_or_default(), timestamp);
    let body = json!({
        "deliveryId": delivery_id,
        "poolId": pool,
        "idempotencyKey": input["idempotencyKey"],
        "kind": input["kind"],
        "status": "success",
        "chainId": input["chainId"],
        "transactionHashes": hashes.iter().map(|h| json!({"nodeId": h["nodeId"], "hash": h["hash"]})).collect::<Vec<_>>(),
    })
    .to_string();
    let key = if tamper == Some(Tamper::BadSignature) { b"not-the-pool-secret".to_vec() } else { secret };
    let signature = webhook::sign(&key, timestamp, body.as_bytes());
    let sends = if tamper == Some(Tamper::Replay) { 2 } else { 1 };
    for _ in 0..sends {
        let (url, pool, body, signature, delivery) = (url.clone(), pool.clone(), body.clone(), signature.clone(), delivery_id.clone());
        let status = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
            agent
                .post(&url)
                .header("Content-Type", "application/json")
                .header(HEADER_POOL, &pool)
                .header(HEADER_TIMESTAMP, &timestamp.to_string())
                .header(HEADER_DELIVERY, &delivery)
                .header(HEADER_SIGNATURE, &signature)
                .send(body.as_bytes())
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        })
        .await
        .unwrap_or(0);
        lock(&inner.callbacks).push(CallbackRecord { execution_id: id.to_owned(), delivery_id: delivery_id.clone(), tamper, status });
    }
}
