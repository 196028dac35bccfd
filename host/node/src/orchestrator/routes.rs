//! HTTP routes. Handlers are thin: parse, call the function that does the work, map the result.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::openai::{ChatCompletionRequest, CompletionRequest, parse_body};
use super::pools::PoolSpec;
use super::service;

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
    JsonBody(spec): JsonBody<PoolSpec>,
) -> Result<Response, ApiError> {
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
    JsonBody(request): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    service::complete(&state, request.prepare()?).await
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    service::complete(&state, request.prepare()?).await
}

pub async fn no_route(uri: Uri) -> ApiError {
    ApiError::NoRoute(uri.path().to_string())
}
