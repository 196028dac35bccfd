//! The work behind the completion routes: pick the pool (by model for the OpenAI routes, by id for
//! `POST /pools/{id}/infer`), send the request to its entry, and relay the token events as one JSON
//! response or as an SSE stream. Every request leaves a row with its usage in the store and its counts
//! in the metrics, however it ends (finished, failed, or cancelled by the client going away).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};

use serde::Deserialize;

use axum::http::HeaderMap;
use computepool_pay::meter::EndReason;

use super::AppState;
use super::error::ApiError;
use super::payments::PaidRequest;
use super::metrics::Metrics;
use super::openai::{Endpoint, Prepared, ResponseMeta, TextChunks, Usage};
use super::pools::{Pool, PoolRequest, RouteLog, legs};
use super::store::{Outcome, RequestRecord, Store};
use computepool_entry_api::{ErrorKind, Event, FinishReason, GenerateRequest};

/// Sends `entry` to `pool` and waits for the entry's `started` (or its refusal): until then the client
/// can still get a proper status code. `prompt_param` names the prompt in context-length errors.
async fn begin(
    state: &AppState,
    pool: &Arc<Pool>,
    entry: &GenerateRequest,
    log: &mut RequestLog,
    prompt_param: &'static str,
) -> Result<PoolRequest, ApiError> {
    if let Err(e) = state.check_route(pool) {
        return Err(log.fail(e));
    }
    let mut request = match pool.start(entry, state.workers.clone(), &log.routes).await {
        Ok(request) => request,
        Err(e) => return Err(log.fail(e)),
    };
    request.audit_with(state.audits.clone());
    match request.next_event().await {
        Some(Event::Started { prompt_tokens, .. }) => log.record.prompt_tokens = Some(prompt_tokens),
        Some(Event::Error { code, message }) => return Err(log.fail(entry_error(pool, prompt_param, code, message))),
        other => return Err(log.fail(ApiError::Internal(format!("the entry answered {other:?} before `started`")))),
    }
    Ok(request)
}

/// How a request is paid for, decided before any shard works (a 402 ends it here, unrecorded: a flood
/// of unpaid requests writes nothing). `None` for a free pool or with payments off.
async fn gate(
    state: &AppState,
    pool: &Pool,
    request_id: &str,
    headers: &HeaderMap,
    resource: &str,
) -> Result<Option<PaidRequest>, ApiError> {
    match &state.payments {
        Some(payments) => payments.gate(pool, request_id, headers, resource).await,
        None => Ok(None),
    }
}

/// The next event of a request, with its payment kept in step: the request joins the pool's flow before
/// its first token is passed on (nothing is served unpaid), a request whose paid seconds ran out ends as
/// `length`, and the flow stops (and the request is charged) before its last event is passed on.
async fn next_event(request: &mut PoolRequest, paid: &mut Option<PaidRequest>, log: &RequestLog) -> Option<Event> {
    let Some(payment) = paid.as_mut() else { return request.next_event().await };
    let event = match payment.deadline() {
        Some(deadline) => match tokio::time::timeout_at(deadline.into(), request.next_event()).await {
            Ok(event) => event,
            Err(_) => {
                payment.ended(EndReason::DeadlineReached).await;
                return Some(Event::Done {
                    finish_reason: FinishReason::Length,
                    prompt_tokens: log.record.prompt_tokens.unwrap_or(0),
                    completion_tokens: log.record.completion_tokens,
                });
            }
        },
        None => request.next_event().await,
    };
    match &event {
        Some(Event::Token { .. }) => {
            if let Err(e) = payment.started().await {
                payment.ended(EndReason::Error(e.to_string())).await;
                return Some(Event::Error { code: ErrorKind::Unavailable, message: format!("payments: {e}") });
            }
        }
        Some(Event::Done { .. }) => {
            payment.ended(EndReason::Completed).await;
        }
        Some(Event::Error { code, message }) => {
            let reason = match code {
                ErrorKind::Unavailable | ErrorKind::Sequence => EndReason::ShardFault(message.clone()),
                _ => EndReason::Error(message.clone()),
            };
            payment.ended(reason).await;
        }
        Some(Event::Started { .. }) => {}
        None => {
            payment.ended(EndReason::ShardFault("the entry closed the stream".into())).await;
        }
    }
    event
}

/// Adds the payment's headers (settlement, session) to a response.
fn with_payment_headers(mut response: Response, headers: Vec<(axum::http::HeaderName, axum::http::HeaderValue)>) -> Response {
    response.headers_mut().extend(headers);
    response
}

/// Serves one checked completion request; `headers` carry its payment, `resource` is the URL it pays for.
pub async fn complete(state: &AppState, prepared: Prepared, headers: &HeaderMap, resource: &str) -> Result<Response, ApiError> {
    let pool = state.pools.by_model(&prepared.model).ok_or_else(|| ApiError::ModelNotFound(prepared.model.clone()))?;
    let meta = ResponseMeta::new(prepared.endpoint, prepared.model.clone());
    // A pool known to be down takes no payment.
    state.check_route(&pool)?;
    let mut paid = gate(state, &pool, &meta.id, headers, resource).await?;
    let payment_headers = paid.as_mut().map(|p| std::mem::take(&mut p.headers)).unwrap_or_default();
    let mut entry = prepared.entry;
    entry.id = Some(meta.id.clone());
    let mut log = RequestLog::new(state, &pool, &meta.id, meta.endpoint.name(), prepared.stream);
    let request = match begin(state, &pool, &entry, &mut log, meta.endpoint.prompt_param()).await {
        Ok(request) => request,
        Err(e) => {
            if let Some(p) = paid.as_mut() {
                p.ended(EndReason::Error(e.to_string())).await;
            }
            return Err(e);
        }
    };
    let response = if prepared.stream {
        stream(request, paid, log, meta, prepared.include_usage)
    } else {
        collect(request, paid, log, meta).await?
    };
    Ok(with_payment_headers(response, payment_headers))
}

/// Reads the whole answer and returns it as one response.
async fn collect(
    mut request: PoolRequest,
    mut paid: Option<PaidRequest>,
    mut log: RequestLog,
    meta: ResponseMeta,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match next_event(&mut request, &mut paid, &log).await {
            Some(Event::Token { text: piece, .. }) => {
                log.token();
                text.push_str(&piece);
            }
            Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                let usage = Usage { prompt_tokens, completion_tokens };
                log.finish(finish_reason, usage);
                log.write().await;
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
    paid: Option<PaidRequest>,
    log: RequestLog,
    meta: ResponseMeta,
    include_usage: bool,
    /// Renders the per-token chunks.
    chunks: TextChunks,
    queue: VecDeque<SseEvent>,
    over: bool,
}

impl Relay {
    fn push(&mut self, value: serde_json::Value) {
        self.queue.push_back(SseEvent::default().data(value.to_string()));
    }

    /// Waits for the next entry event and queues the SSE events it makes.
    async fn advance(&mut self) {
        match next_event(&mut self.request, &mut self.paid, &self.log).await {
            Some(Event::Token { text, .. }) => {
                self.log.token();
                // Text held back (inside a character or a possible stop string) comes with a later token.
                if !text.is_empty() {
                    self.queue.push_back(SseEvent::default().data(self.chunks.render(&text)));
                }
            }
            Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                let usage = Usage { prompt_tokens, completion_tokens };
                self.log.finish(finish_reason, usage);
                self.log.write().await;
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

fn stream(request: PoolRequest, paid: Option<PaidRequest>, log: RequestLog, meta: ResponseMeta, include_usage: bool) -> Response {
    let chunks = meta.text_chunks(include_usage);
    let mut relay = Relay { request, paid, log, meta, include_usage, chunks, queue: VecDeque::new(), over: false };
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

/// `POST /pools/{id}/infer`: the entry's own request shape (prompt text, chat messages or token ids;
/// sampling parameters), answered as SSE events named like the entry's events: `started`, `token`
/// (`{"token", "text"}`), then `done` (finish reason and usage) or `error` (an OpenAI-shaped error body).
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct InferRequest(pub GenerateRequest);

pub async fn infer(
    state: &AppState,
    pool_id: &str,
    InferRequest(mut entry): InferRequest,
    headers: &HeaderMap,
    resource: &str,
) -> Result<Response, ApiError> {
    let pool = state.pools.get(pool_id).ok_or_else(|| ApiError::PoolNotFound(pool_id.to_string()))?;
    if entry.id.is_some() {
        return Err(ApiError::invalid("id", "the request id is assigned here: leave `id` out"));
    }
    let id = {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        format!("infer-{:x}{:06x}", now.as_micros(), NEXT.fetch_add(1, Ordering::Relaxed))
    };
    entry.id = Some(id.clone());
    state.check_route(&pool)?;
    let mut paid = gate(state, &pool, &id, headers, resource).await?;
    let payment_headers = paid.as_mut().map(|p| std::mem::take(&mut p.headers)).unwrap_or_default();
    let prompt_param = if entry.messages.is_some() { "messages" } else { "prompt" };
    let mut log = RequestLog::new(state, &pool, &id, "infer", true);
    let request = match begin(state, &pool, &entry, &mut log, prompt_param).await {
        Ok(request) => request,
        Err(e) => {
            if let Some(p) = paid.as_mut() {
                p.ended(EndReason::Error(e.to_string())).await;
            }
            return Err(e);
        }
    };
    // `route`: the number of the route that took the request (its topologies that are rings first: 0 the
    // topology, then its replicas; then the routes that mix workers); `workers`: its peer ids, entry first.
    let started = SseEvent::default().event("started").data(
        serde_json::json!({"id": id, "pool": pool.record.id, "route": request.route(), "workers": request.route_peers(),
            "prompt_tokens": log.record.prompt_tokens})
            .to_string(),
    );
    let model = pool.record.model.clone();
    let stream = InferStream { route: request.route(), request, paid, log, model, pending: Some(started), over: false };
    let events = futures_util::stream::unfold(stream, |mut st| async move {
        let event = st.next().await?;
        Some((Ok::<_, Infallible>(event), st))
    });
    let response = Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(5))).into_response();
    Ok(with_payment_headers(response, payment_headers))
}

/// The state of one `POST /pools/{id}/infer` stream. Dropping it cancels the request and records it.
struct InferStream {
    request: PoolRequest,
    paid: Option<PaidRequest>,
    log: RequestLog,
    model: String,
    /// The route the client was last told of (in `started` or `route`).
    route: usize,
    /// An event to send before reading the next one from the request.
    pending: Option<SseEvent>,
    /// The final event has been sent.
    over: bool,
}

impl InferStream {
    /// The next SSE event, `None` after the final one. A request that moved to another route (rerouted
    /// before its first token, or a failover) announces it with a `route` event before the first token
    /// from the new route, so the client always knows which workers made the tokens that follow.
    async fn next(&mut self) -> Option<SseEvent> {
        if let Some(event) = self.pending.take() {
            return Some(event);
        }
        if self.over {
            return None;
        }
        let event = match next_event(&mut self.request, &mut self.paid, &self.log).await {
            Some(Event::Token { token, text }) => {
                self.log.token();
                SseEvent::default().event("token").data(serde_json::json!({"token": token, "text": text}).to_string())
            }
            Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                self.log.finish(finish_reason, Usage { prompt_tokens, completion_tokens });
                self.log.write().await;
                self.over = true;
                let done = serde_json::json!({"finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens, "time_to_first_token_ms": self.log.ttft_ms()});
                SseEvent::default().event("done").data(done.to_string())
            }
            Some(Event::Error { code, message }) => {
                self.over = true;
                let error = self.log.fail(midway_error(&self.model, code, message));
                SseEvent::default().event("error").data(error.body().to_string())
            }
            other => {
                self.over = true;
                let error = self.log.fail(ApiError::Internal(format!("unexpected event from the entry: {other:?}")));
                SseEvent::default().event("error").data(error.body().to_string())
            }
        };
        let route = self.request.route();
        if route == self.route {
            return Some(event);
        }
        self.route = route;
        self.pending = Some(event);
        let from_token = legs(&self.log.routes).last().map_or(0, |leg| leg.from_token);
        let moved = serde_json::json!({"route": route, "workers": self.request.route_peers(), "from_token": from_token});
        Some(SseEvent::default().event("route").data(moved.to_string()))
    }
}

/// An entry error before the request started: the client's fault or the pool's.
fn entry_error(pool: &Pool, prompt_param: &'static str, code: ErrorKind, message: String) -> ApiError {
    match code {
        ErrorKind::InvalidRequest => ApiError::InvalidParameter { param: None, message },
        ErrorKind::ContextLengthExceeded => ApiError::ContextLengthExceeded { param: prompt_param, message },
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
    metrics: Arc<Metrics>,
    record: RequestRecord,
    /// The routes the request took, filled in by its [`PoolRequest`] and copied into the row when written.
    routes: RouteLog,
    started: Instant,
    first_token: Option<Instant>,
    ended: bool,
    /// Written to the store already (by [`RequestLog::write`]); dropping it then writes nothing.
    written: bool,
}

impl RequestLog {
    fn new(state: &AppState, pool: &Pool, id: &str, endpoint: &'static str, stream: bool) -> Self {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        state.metrics.request_started(&pool.record.id);
        let record = RequestRecord {
            id: id.to_string(),
            pool_id: pool.record.id.clone(),
            model: pool.record.model.clone(),
            endpoint,
            stream,
            started_at_ms: now.as_millis() as i64,
            prompt_tokens: None,
            completion_tokens: 0,
            time_to_first_token_ms: None,
            duration_ms: 0.0,
            outcome: Outcome::Cancelled,
            error: None,
            routes: Vec::new(),
        };
        let (store, metrics) = (state.store.clone(), state.metrics.clone());
        let routes = RouteLog::default();
        Self { store, metrics, record, routes, started: Instant::now(), first_token: None, ended: false, written: false }
    }

    fn token(&mut self) {
        if self.first_token.is_none() {
            let now = Instant::now();
            self.first_token = Some(now);
            self.metrics.first_token(now - self.started);
        }
        self.metrics.token();
        self.record.completion_tokens += 1;
    }

    fn ttft_ms(&self) -> Option<f64> {
        self.first_token.map(|t| (t - self.started).as_secs_f64() * 1e3)
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

impl RequestLog {
    /// The row as it stands now, and the request counted as ended in the metrics (once).
    fn close(&mut self) -> (Arc<Store>, RequestRecord) {
        self.written = true;
        self.record.duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.record.time_to_first_token_ms = self.ttft_ms();
        self.record.routes = legs(&self.routes).clone();
        self.metrics.request_ended(&self.record.pool_id, self.record.outcome);
        (self.store.clone(), self.record.clone())
    }

    /// Writes the finished request's row and waits until it is stored, so that a response the client
    /// has seen complete is on disk before its last byte goes out (a crash right after loses nothing).
    async fn write(&mut self) {
        if self.written {
            return;
        }
        let (store, record) = self.close();
        let id = record.id.clone();
        match tokio::task::spawn_blocking(move || store.record_request(&record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(request = %id, "could not record the request: {e}"),
            Err(e) => tracing::warn!(request = %id, "could not record the request: {e}"),
        }
    }
}

impl Drop for RequestLog {
    /// The paths that do not end in [`RequestLog::write`] (a client gone mid-stream, an early error)
    /// are recorded here, in the background.
    fn drop(&mut self) {
        if self.written {
            return;
        }
        if !self.ended {
            tracing::info!(request = %self.record.id, "the client went away: request cancelled");
        }
        let (store, record) = self.close();
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
