//! HTTP routes. Handlers are thin: parse, call the function that does the work, map the result.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::openai::{ChatCompletionRequest, CompletionRequest, parse_body};
use super::metrics::WorkerSample;
use super::pools::PoolSpec;
use super::service;
use super::workers::{WorkerRegistration, WorkerStats};

/// Largest request body taken, in bytes (OpenAI-compatible servers commonly allow a few MiB; a prompt
/// that needs more would not fit a context window anyway).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// A JSON body, with OpenAI-shaped errors for a body too large, malformed JSON, or a bad field.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::BodyTooLarge { limit: MAX_BODY_BYTES }
            } else {
                ApiError::InvalidParameter { param: None, message: e.body_text() }
            }
        })?;
        parse_body(&bytes).map(JsonBody)
    }
}

pub async fn healthz(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"status": "ok", "pools": state.pools.all().len(), "peer": state.peer}))
}

pub async fn list_pools(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state.pools.all().iter().map(|p| p.describe()).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_pool(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let pool = state.pools.get(&id).ok_or(ApiError::PoolNotFound(id))?;
    Ok(Json(pool.describe()))
}

pub async fn create_pool(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    JsonBody(spec): JsonBody<PoolSpec>,
) -> Result<Response, ApiError> {
    state.token.check(&headers)?;
    let pool = state.pools.register(&state.store, spec, false)?;
    Ok((StatusCode::CREATED, Json(pool.describe())).into_response())
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state.pools.all().iter().map(|p| model_json(&p.record.model, p.record.created_at)).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_model(State(state): State<Arc<AppState>>, Path(model): Path<String>) -> Result<Json<Value>, ApiError> {
    let pool = state.pools.by_model(&model).ok_or(ApiError::ModelNotFound(model))?;
    Ok(Json(model_json(&pool.record.model, pool.record.created_at)))
}

fn model_json(model: &str, created: i64) -> Value {
    json!({"id": model, "object": "model", "created": created, "owned_by": "computepool"})
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    JsonBody(request): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    service::complete(&state, request.prepare()?, &headers, &resource_url(&headers, &uri)).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    JsonBody(request): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    service::complete(&state, request.prepare()?, &headers, &resource_url(&headers, &uri)).await
}

pub async fn infer(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
    JsonBody(request): JsonBody<service::InferRequest>,
) -> Result<Response, ApiError> {
    service::infer(&state, &id, request, &headers, &resource_url(&headers, &uri)).await
}

/// The URL a paid request pays for (x402's `resource`): this server's scheme-less `Host` and the path.
fn resource_url(headers: &HeaderMap, uri: &Uri) -> String {
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).filter(|h| h.len() <= 255).unwrap_or("localhost");
    format!("http://{host}{}", uri.path())
}

/// `GET /sessions/{id}`: a payment session's balance, usage and stream, to the holder of its token.
pub async fn get_session(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let payments = state.payments.as_ref().ok_or_else(|| ApiError::NoRoute(format!("/sessions/{id} (payments are off)")))?;
    let view = payments.session(&id, &headers).await?;
    Ok(Json(serde_json::to_value(view).map_err(|e| ApiError::Internal(e.to_string()))?))
}

/// `GET /pools/{id}/payments`: the pool's price and rails (404 for a free pool).
pub async fn get_pool_payments(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    let pool = state.pools.get(&id).ok_or_else(|| ApiError::PoolNotFound(id.clone()))?;
    let settings = state.payments.as_ref().and_then(|p| p.settings(&pool.record.id));
    let settings = settings.ok_or_else(|| ApiError::NoRoute(format!("/pools/{id}/payments (the pool is free)")))?;
    Ok(Json(serde_json::to_value(settings).map_err(|e| ApiError::Internal(e.to_string()))?))
}

/// `PUT /pools/{id}/payments` (operator token): sets the pool's price and rails; the next request uses
/// them, no restart.
pub async fn put_pool_payments(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(settings): JsonBody<super::payments::config::PoolPayments>,
) -> Result<Json<Value>, ApiError> {
    state.token.check(&headers)?;
    let payments = state
        .payments
        .as_ref()
        .ok_or_else(|| ApiError::invalid("payments", "payments are off on this orchestrator (start it with --payments)"))?;
    let pool = state.pools.get(&id).ok_or_else(|| ApiError::PoolNotFound(id.clone()))?;
    payments.configure(&pool, &state.workers, settings.clone()).await?;
    state.store.put_pool_payments(&pool.record.id, &settings)?;
    Ok(Json(serde_json::to_value(settings).map_err(|e| ApiError::Internal(e.to_string()))?))
}

pub async fn register_worker(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    JsonBody(registration): JsonBody<WorkerRegistration>,
) -> Result<Json<Value>, ApiError> {
    state.token.check(&headers)?;
    let answer = state.register_worker(registration).await?;
    Ok(Json(json!(answer)))
}

pub async fn heartbeat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(peer): Path<String>,
    JsonBody(stats): JsonBody<WorkerStats>,
) -> Result<StatusCode, ApiError> {
    state.token.check(&headers)?;
    state.workers.heartbeat(&state.store, &peer, stats)?;
    Ok(StatusCode::NO_CONTENT)
}

/// What `POST /workers/{peer}/eject` takes.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EjectRequest {
    /// Why, for the records (shown in `GET /workers`).
    pub reason: String,
}

/// Ejects a worker by hand (operator token): no new request is routed through it from now on, and
/// after a restart. Answers the ejection (the first one, if it was ejected before).
pub async fn eject_worker(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(peer): Path<String>,
    JsonBody(body): JsonBody<EjectRequest>,
) -> Result<Json<Value>, ApiError> {
    state.token.check(&headers)?;
    let ejection = state.workers.eject(&state.store, &peer, &body.reason)?;
    Ok(Json(json!({"peer": peer, "ejected": ejection})))
}

/// The latest output audits, newest first (operator token: their evidence holds users' prompts and
/// outputs). `?limit=N`, 1 to 1000, default 100.
pub async fn list_audits(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    state.token.check(&headers)?;
    let limit = match query.get("limit") {
        None => 100,
        Some(text) => match text.parse::<usize>() {
            Ok(n @ 1..=1000) => n,
            _ => return Err(ApiError::invalid("limit", format!("limit must be 1 to 1000, got {text:?}"))),
        },
    };
    let store = state.store.clone();
    let audits = tokio::task::spawn_blocking(move || store.audits(limit))
        .await
        .map_err(|e| ApiError::Internal(format!("reading audits: {e}")))??;
    // Stored by this process as JSON; a row that no longer parses is shown as text rather than hidden.
    let parse = |text: &str| serde_json::from_str::<Value>(text).unwrap_or_else(|_| Value::String(text.to_string()));
    let data: Vec<Value> = audits
        .iter()
        .map(|(id, a)| {
            json!({"id": id, "object": "audit", "pool": a.pool_id, "request_id": a.request_id, "at_ms": a.at_ms,
                   "outcome": a.outcome, "evidence": parse(&a.evidence), "reports": parse(&a.reports)})
        })
        .collect();
    Ok(Json(json!({"object": "list", "audit_rate": state.audits.rate(), "data": data})))
}

pub async fn list_workers(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .workers
        .all()
        .iter()
        .map(|w| {
            let pools: Vec<String> = state.assignments(&w.registration.peer).into_iter().map(|(p, _)| p).collect();
            state.workers.describe(w, &pools)
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Per pool, its layer ranges in order and the workers serving each (up, down, or never registered;
/// a range may have several; each with its requests in flight and routed so far), and its routes (one
/// worker per range, numbered); a pool is `ready` while some route has no worker down.
pub async fn topology(State(state): State<Arc<AppState>>) -> Json<Value> {
    let mut assigned = std::collections::BTreeSet::new();
    let describe = |peer: &str, addrs: &[std::net::SocketAddr]| {
        let (status, last) = match state.workers.get(peer) {
            Some(w) if state.workers.is_up(&w) => ("up", Some(w.last_seen_ms)),
            Some(w) => ("down", Some(w.last_seen_ms)),
            None => ("unregistered", None),
        };
        let ago = last.map(|t| (super::workers::now_ms() - t).max(0));
        json!({"peer": peer, "status": status, "addrs": addrs, "last_heartbeat_ms_ago": ago})
    };
    let pools: Vec<Value> = state
        .pools
        .all()
        .iter()
        .map(|pool| {
            let mut ranges: std::collections::BTreeMap<(u32, u32), Vec<Value>> = Default::default();
            for member in &pool.members {
                let shard = &member.shard;
                let peer = shard.peer.to_string();
                let mut worker = describe(&peer, &shard.addrs);
                worker["in_flight"] = json!(member.in_flight());
                worker["routed"] = json!(member.routed());
                ranges.entry((shard.layers.start, shard.layers.end)).or_default().push(worker);
                assigned.insert(peer);
            }
            let routes: Vec<Value> = (0..pool.routes.len())
                .map(|r| json!({"route": r, "workers": pool.route_peers(r)}))
                .collect();
            let shards: Vec<Value> = ranges
                .into_iter()
                .map(|((start, end), workers)| json!({"layers": format!("{start}..{end}"), "workers": workers}))
                .collect();
            json!({"pool": pool.record.id, "model": pool.record.model, "num_layers": pool.record.topology.num_layers,
                   "ready": state.check_route(pool).is_ok(), "queue_depth": state.metrics.queue_depth(&pool.record.id),
                   "shards": shards, "routes": routes})
        })
        .collect();
    let unassigned: Vec<String> =
        state.workers.all().into_iter().map(|w| w.registration.peer).filter(|p| !assigned.contains(p)).collect();
    Json(json!({"pools": pools, "unassigned_workers": unassigned}))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let workers = state.workers.all();
    let pools: Vec<String> = workers
        .iter()
        .map(|w| state.assignments(&w.registration.peer).into_iter().map(|(p, _)| p).collect::<Vec<_>>().join(","))
        .collect();
    let samples: Vec<WorkerSample<'_>> = workers
        .iter()
        .zip(&pools)
        .map(|(w, pool)| WorkerSample {
            peer: &w.registration.peer,
            layers: &w.registration.layers,
            pool,
            up: state.workers.is_up(w),
            active_requests: w.stats.active_requests,
            kv_caches: w.stats.kv_caches,
            kv_cache_bytes: w.stats.kv_cache_bytes,
            speed: w.registration.speed,
        })
        .collect();
    let mut body = state.metrics.render(&samples);
    state.audits.render_metrics(&mut body);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

pub async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_string())
}
