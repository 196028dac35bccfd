//! The work behind the OpenAI routes: pick the pool by model, send the request to its entry, and
//! relay the token events as one JSON response or as an SSE stream. Every request leaves a row with
//! its usage in the store, however it ends (finished, failed, or cancelled by the client going away).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use super::openai::{Endpoint, Prepared, ResponseMeta, Usage};
use super::pools::{Pool, PoolRequest};
use super::store::{Outcome, RequestRecord, Store};
use crate::worker::api::{ErrorKind, Event, FinishReason};

/// Serves one checked completion request.
pub async fn complete(state: &AppState, prepared: Prepared) -> Result<Response, ApiError> {
    let pool = state.pools.by_model(&prepared.model).ok_or_else(|| ApiError::ModelNotFound(prepared.model.clone()))?;
    let meta = ResponseMeta::new(prepared.endpoint, prepared.model.clone());
    let mut entry = prepared.entry;
    entry.id = Some(meta.id.clone());
    let mut log = RequestLog::new(state.store.clone(), &pool, &meta, prepared.stream);
    let mut request = match pool.start(&entry).await {
        Ok(request) => request,
        Err(e) => return Err(log.fail(e)),
    };
    // The entry checks the request and says `started` (or why not) before any token: until then the
    // client can still get a proper status code.
    match request.events.next_event().await {
        Some(Event::Started { prompt_tokens, .. }) => log.record.prompt_tokens = Some(prompt_tokens),
        Some(Event::Error { code, message }) => return Err(log.fail(entry_error(&pool, meta.endpoint, code, message))),
        other => return Err(log.fail(ApiError::Internal(format!("the entry answered {other:?} before `started`")))),
    }
    if prepared.stream {
        Ok(stream(request, log, meta, prepared.include_usage))
    } else {
        collect(request, log, meta).await
    }
}

/// Reads the whole answer and returns it as one response.
async fn collect(mut request: PoolRequest, mut log: RequestLog, meta: ResponseMeta) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match request.events.next_event().await {
            Some(Event::Token { text: piece, .. }) => {
                log.token();
                text.push_str(&piece);
            }
            Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                let usage = Usage { prompt_tokens, completion_tokens };
                log.finish(finish_reason, usage);
                return Ok(Json(meta.response(&text, finish_reason, usage)).into_response());
            }
            Some(Event::Error { code, message }) => {
                return Err(log.fail(midway_error(&meta.model, code, message)));
            }
            other => return Err(log.fail(ApiError::Internal(format!("unexpected event from the entry: {other:?}")))),
        }
    }
}

/// What an SSE response is made of while it runs; dropping it (the client went away) drops the
/// request, which cancels it at the entry, and records it as cancelled.
struct Relay {
    request: PoolRequest,
    log: RequestLog,
    meta: ResponseMeta,
    include_usage: bool,
    queue: VecDeque<SseEvent>,
    over: bool,
}

impl Relay {
    fn push(&mut self, value: serde_json::Value) {
        self.queue.push_back(SseEvent::default().data(value.to_string()));
    }

    /// Waits for the next entry event and queues the SSE events it makes.
    async fn advance(&mut self) {
        match self.request.events.next_event().await {
            Some(Event::Token { text, .. }) => {
                self.log.token();
                // Text held back (inside a character or a possible stop string) comes with a later token.
                if !text.is_empty() {
                    self.push(self.meta.chunk(&text, false, None, self.include_usage));
                }
            }
            Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                let usage = Usage { prompt_tokens, completion_tokens };
                self.log.finish(finish_reason, usage);
                self.push(self.meta.chunk("", false, Some(finish_reason), self.include_usage));
                if self.include_usage {
                    self.push(self.meta.usage_chunk(usage));
                }
                self.queue.push_back(SseEvent::default().data("[DONE]"));
                self.over = true;
            }
            Some(Event::Error { code, message }) => {
                // Headers are sent: the error goes in the stream, OpenAI's way, and the stream ends.
                let error = self.log.fail(midway_error(&self.meta.model, code, message));
                self.push(error.body());
                self.over = true;
            }
            other => {
                let error = self.log.fail(ApiError::Internal(format!("unexpected event from the entry: {other:?}")));
                self.push(error.body());
                self.over = true;
            }
        }
    }
}

fn stream(request: PoolRequest, log: RequestLog, meta: ResponseMeta, include_usage: bool) -> Response {
    let mut relay = Relay { request, log, meta, include_usage, queue: VecDeque::new(), over: false };
    if relay.meta.endpoint == Endpoint::Chat {
        relay.push(relay.meta.chunk("", true, None, include_usage));
    }
    let events = futures_util::stream::unfold(relay, |mut relay| async move {
        loop {
            if let Some(event) = relay.queue.pop_front() {
                return Some((Ok::<_, Infallible>(event), relay));
            }
            if relay.over {
                return None;
            }
            relay.advance().await;
        }
    });
    // Keep-alive comments also reveal a client that left during a long prefill.
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(5))).into_response()
}

/// An entry error before the request started: the client's fault or the pool's.
fn entry_error(pool: &Pool, endpoint: Endpoint, code: ErrorKind, message: String) -> ApiError {
    match code {
        ErrorKind::InvalidRequest => ApiError::InvalidParameter { param: None, message },
        ErrorKind::ContextLengthExceeded => ApiError::ContextLengthExceeded { param: endpoint.prompt_param(), message },
        ErrorKind::Unavailable | ErrorKind::Sequence => {
            ApiError::Unavailable { model: pool.record.model.clone(), reason: message }
        }
        ErrorKind::Internal => ApiError::Internal(message),
    }
}

/// An entry error after the request started (a shard died, frames were lost).
fn midway_error(model: &str, code: ErrorKind, message: String) -> ApiError {
    match code {
        ErrorKind::Unavailable | ErrorKind::Sequence => ApiError::Unavailable { model: model.to_string(), reason: message },
        ErrorKind::InvalidRequest | ErrorKind::ContextLengthExceeded => ApiError::InvalidParameter { param: None, message },
        ErrorKind::Internal => ApiError::Internal(message),
    }
}

/// One request's row in the store, written when it is dropped: whatever path a request takes out of
/// the handler or the stream (finished, failed, client gone), it is recorded exactly once.
struct RequestLog {
    store: Arc<Store>,
    record: RequestRecord,
    started: Instant,
    first_token: Option<Instant>,
    ended: bool,
}

impl RequestLog {
    fn new(store: Arc<Store>, pool: &Pool, meta: &ResponseMeta, stream: bool) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let record = RequestRecord {
            id: meta.id.clone(),
            pool_id: pool.record.id.clone(),
            model: meta.model.clone(),
            endpoint: meta.endpoint.name(),
            stream,
            started_at_ms: now.as_millis() as i64,
            prompt_tokens: None,
            completion_tokens: 0,
            time_to_first_token_ms: None,
            duration_ms: 0.0,
            outcome: Outcome::Cancelled,
            error: None,
        };
        Self { store, record, started: Instant::now(), first_token: None, ended: false }
    }

    fn token(&mut self) {
        self.first_token.get_or_insert_with(Instant::now);
        self.record.completion_tokens += 1;
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage) {
        self.record.outcome = match reason {
            FinishReason::Stop => Outcome::Stop,
            FinishReason::Length => Outcome::Length,
        };
        self.record.prompt_tokens = Some(usage.prompt_tokens);
        self.record.completion_tokens = usage.completion_tokens;
        self.ended = true;
    }

    fn fail(&mut self, error: ApiError) -> ApiError {
        self.record.outcome = Outcome::Error;
        self.record.error = Some(error.to_string());
        self.ended = true;
        error
    }
}

impl Drop for RequestLog {
    fn drop(&mut self) {
        if !self.ended {
            tracing::info!(request = %self.record.id, "the client went away: request cancelled");
        }
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.record.time_to_first_token_ms = self.first_token.map(|t| (t - self.started).as_secs_f64() * 1e3);
        let (store, record) = (self.store.clone(), self.record.clone());
        let write = move || {
            if let Err(e) = store.record_request(&record) {
                tracing::warn!(request = %record.id, "could not record the request: {e}");
            }
        };
        // Off the async threads when there is a runtime (there always is while serving).
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => drop(handle.spawn_blocking(write)),
            Err(_) => write(),
        }
    }
}
