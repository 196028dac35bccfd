//! `POST /webhooks/keeperhub`: workflow results reported by KeeperHub runs. KeeperHub does not sign its
//! outgoing webhooks, so each workflow signs its own report (keeperhub/README.md): HMAC-SHA256 over
//! `timestamp + "." + raw body` with the pool's secret, sent as `X-ComputePool-Signature: v1=<hex>`
//! beside `X-ComputePool-Timestamp` (Unix seconds), `X-ComputePool-Delivery` (unique per delivery) and
//! `X-ComputePool-Pool`. A delivery is refused unless its signature matches (compared in constant
//! time), its timestamp is within 5 minutes, and neither its delivery id nor its signature was seen
//! before (kept durably in SQLite); a result that claims on-chain effects is confirmed on chain
//! (`EffectConfirmer`) before it reaches the pool's state machine (`WebhookSink`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::future::BoxFuture;
use hmac::{Hmac, Mac};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const HEADER_SIGNATURE: &str = "X-ComputePool-Signature";
pub const HEADER_TIMESTAMP: &str = "X-ComputePool-Timestamp";
pub const HEADER_DELIVERY: &str = "X-ComputePool-Delivery";
pub const HEADER_POOL: &str = "X-ComputePool-Pool";
/// The signature scheme's version prefix, so a later scheme can be told apart.
pub const SIGNATURE_PREFIX: &str = "v1=";
/// How far a delivery's timestamp may be from the receiver's clock, either way.
pub const DEFAULT_WINDOW_S: u64 = 300;
/// Webhook bodies are small JSON reports; anything larger is refused before it is read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("malformed header {header}: {reason}")]
    MalformedHeader { header: &'static str, reason: String },
    #[error("no webhook secret is configured for pool {0:?}")]
    UnknownPool(String),
    #[error("signature does not match the body and timestamp")]
    BadSignature,
    #[error("timestamp is {skew_s} s away from now, outside the {window_s} s window")]
    OutsideWindow { skew_s: u64, window_s: u64 },
    #[error("delivery {0:?} was already received (replay)")]
    Replayed(String),
    #[error("malformed body: {0}")]
    MalformedBody(String),
    #[error("body names pool {body:?} but the delivery was signed for pool {header:?}")]
    PoolMismatch { header: String, body: String },
    #[error("claimed on-chain effect not confirmed: {0}")]
    Unconfirmed(#[from] ConfirmError),
    #[error("the pool's state machine refused the result: {0}")]
    Sink(String),
    #[error("replay store: {0}")]
    Store(String),
}

impl WebhookError {
    fn status(&self) -> StatusCode {
        match self {
            Self::MissingHeader(_) | Self::MalformedHeader { .. } | Self::MalformedBody(_) | Self::PoolMismatch { .. } => {
                StatusCode::BAD_REQUEST
            }
            Self::UnknownPool(_) | Self::BadSignature | Self::OutsideWindow { .. } => StatusCode::UNAUTHORIZED,
            Self::Replayed(_) => StatusCode::CONFLICT,
            Self::Unconfirmed(ConfirmError::NotYet(_)) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unconfirmed(_) | Self::Sink(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable code for the response body and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingHeader(_) => "missing_header",
            Self::MalformedHeader { .. } => "malformed_header",
            Self::UnknownPool(_) => "unknown_pool",
            Self::BadSignature => "bad_signature",
            Self::OutsideWindow { .. } => "stale_timestamp",
            Self::Replayed(_) => "replayed",
            Self::MalformedBody(_) => "malformed_body",
            Self::PoolMismatch { .. } => "pool_mismatch",
            Self::Unconfirmed(_) => "unconfirmed",
            Self::Sink(_) => "refused",
            Self::Store(_) => "internal",
        }
    }
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        (self.status(), axum::Json(body)).into_response()
    }
}

/// `v1=` + hex HMAC-SHA256 of `timestamp + "." + body` under `secret`: what a workflow sends.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("{SIGNATURE_PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
}

/// The signed headers of one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryHeaders {
    pub pool_id: String,
    pub timestamp: u64,
    pub delivery_id: String,
    /// Hex of the MAC, without the `v1=` prefix.
    pub signature_hex: String,
}

impl DeliveryHeaders {
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, WebhookError> {
        fn get<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, WebhookError> {
            let value = headers.get(name).ok_or(WebhookError::MissingHeader(name))?;
            let value = value
                .to_str()
                .map_err(|_| WebhookError::MalformedHeader { header: name, reason: "not visible ASCII".into() })?
                .trim();
            if value.is_empty() || value.len() > 512 {
                return Err(WebhookError::MalformedHeader { header: name, reason: "empty or longer than 512 bytes".into() });
            }
            Ok(value)
        }
        let timestamp = get(headers, HEADER_TIMESTAMP)?;
        let timestamp = timestamp.parse::<u64>().map_err(|_| WebhookError::MalformedHeader {
            header: HEADER_TIMESTAMP,
            reason: format!("{timestamp:?} is not Unix seconds"),
        })?;
        let signature = get(headers, HEADER_SIGNATURE)?;
        let signature_hex = signature
            .strip_prefix(SIGNATURE_PREFIX)
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| WebhookError::MalformedHeader {
                header: HEADER_SIGNATURE,
                reason: format!("expected {SIGNATURE_PREFIX} and 64 hex digits"),
            })?
            .to_ascii_lowercase();
        Ok(Self {
            pool_id: get(headers, HEADER_POOL)?.to_owned(),
            timestamp,
            delivery_id: get(headers, HEADER_DELIVERY)?.to_owned(),
            signature_hex,
        })
    }
}

/// Checks a delivery's signature (constant time) and then its timestamp. Pure: the replay check is
/// the `ReplayGuard`'s.
pub fn verify(secret: &[u8], headers: &DeliveryHeaders, body: &[u8], now_s: u64, window_s: u64) -> Result<(), WebhookError> {
    let claimed = hex::decode(&headers.signature_hex).map_err(|_| WebhookError::BadSignature)?;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(headers.timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    // `verify_slice` compares in constant time (the `subtle` crate underneath).
    mac.verify_slice(&claimed).map_err(|_| WebhookError::BadSignature)?;
    let skew_s = now_s.abs_diff(headers.timestamp);
    if skew_s > window_s {
        return Err(WebhookError::OutsideWindow { skew_s, window_s });
    }
    Ok(())
}

/// Deliveries already accepted, by delivery id and by signature (a replay with a fresh delivery id
/// still carries the old signature), kept in SQLite so a restart does not reopen the window.
/// Entries older than twice the window are pruned: such a replay fails the timestamp check anyway.
pub struct ReplayGuard {
    conn: Mutex<Connection>,
    window_s: u64,
}

impl ReplayGuard {
    pub fn open(path: &Path, window_s: u64) -> Result<Self, WebhookError> {
        let store = |e: rusqlite::Error| WebhookError::Store(e.to_string());
        let conn = Connection::open(path).map_err(store)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(store)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(store)?;
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(store)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS webhook_deliveries (
                delivery_id TEXT PRIMARY KEY,
                signature TEXT NOT NULL UNIQUE,
                pool_id TEXT NOT NULL,
                timestamp_s INTEGER NOT NULL
            );
            CREATE INDEX IF NOT EXISTS webhook_deliveries_by_time ON webhook_deliveries (timestamp_s);",
        )
        .map_err(store)?;
        Ok(Self { conn: Mutex::new(conn), window_s })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `headers` as received; `Replayed` if its delivery id or signature was seen.
    pub fn claim(&self, headers: &DeliveryHeaders, now_s: u64) -> Result<(), WebhookError> {
        let conn = self.conn();
        let store = |e: rusqlite::Error| WebhookError::Store(e.to_string());
        conn.execute(
            "DELETE FROM webhook_deliveries WHERE timestamp_s < ?1",
            [now_s.saturating_sub(2 * self.window_s) as i64],
        )
        .map_err(store)?;
        let inserted = conn
            .execute(
                "INSERT OR IGNORE INTO webhook_deliveries (delivery_id, signature, pool_id, timestamp_s) VALUES (?1, ?2, ?3, ?4)",
                params![headers.delivery_id, headers.signature_hex, headers.pool_id, headers.timestamp as i64],
            )
            .map_err(store)?;
        if inserted == 0 {
            return Err(WebhookError::Replayed(headers.delivery_id.clone()));
        }
        Ok(())
    }

    /// Forgets a claim whose processing failed for a reason a later retry may not have (the chain
    /// had not confirmed yet), so the retry is not taken for a replay.
    pub fn release(&self, headers: &DeliveryHeaders) -> Result<(), WebhookError> {
        self.conn()
            .execute("DELETE FROM webhook_deliveries WHERE delivery_id = ?1", [&headers.delivery_id])
            .map_err(|e| WebhookError::Store(e.to_string()))?;
        Ok(())
    }
}

/// The report a workflow's last step sends (keeperhub/README.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkflowResult {
    pub delivery_id: String,
    pub pool_id: String,
    pub idempotency_key: String,
    pub kind: String,
    /// `success` or `error`.
    pub status: String,
    #[serde(default)]
    pub chain_id: Option<serde_json::Value>,
    #[serde(default)]
    pub transaction_hashes: Vec<ReportedTransaction>,
    #[serde(default)]
    pub error: Option<String>,
}

impl WorkflowResult {
    /// The transition's idempotency key: a retried run reports `<key>#<run>` (see `log::run_key`).
    pub fn transition_key(&self) -> &str {
        self.idempotency_key.split('#').next().unwrap_or(&self.idempotency_key)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedTransaction {
    pub node_id: String,
    pub hash: String,
}

/// One on-chain effect a result claims: its transaction must be mined and successful before the
/// pool's state machine moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedEffect {
    pub pool_id: String,
    pub idempotency_key: String,
    pub node_id: String,
    pub tx_hash: String,
}

impl ClaimedEffect {
    /// The effects a settled transition claims, from what the keeper reported when its run succeeded
    /// (the log's `detail`: KeeperHub's `transactionHashes`, a JSON array of `{hash, nodeId, …}`). The
    /// orchestrator's `TransitionSink` confirms these before the state machine moves, as the webhook
    /// path does — a transition can settle through either.
    pub fn of_record(record: &crate::log::TransitionRecord) -> Result<Vec<Self>, String> {
        let detail = record.detail.as_deref().unwrap_or("[]");
        let hashes: Vec<ReportedTransaction> =
            serde_json::from_str(detail).map_err(|e| format!("transition {}: detail is not a list of transactions: {e}", record.id))?;
        Ok(hashes
            .into_iter()
            .map(|t| ClaimedEffect {
                pool_id: record.pool_id.clone(),
                idempotency_key: record.idempotency_key.clone(),
                node_id: t.node_id,
                tx_hash: t.hash,
            })
            .collect())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    #[error("transaction {0} is not known to the chain")]
    Unknown(String),
    #[error("transaction {0} reverted")]
    Reverted(String),
    /// Not mined (or not final) yet: the delivery may be retried later.
    #[error("transaction {0} is not confirmed yet")]
    NotYet(String),
    #[error("transaction {tx} does not do what {node} claims: {reason}")]
    Mismatch { tx: String, node: String, reason: String },
    #[error("chain: {0}")]
    Chain(String),
}

/// Implemented by the orchestrator with its chain client: receipt found, status 1, sent to the
/// contract and function the workflow node names.
pub trait EffectConfirmer: Send + Sync {
    fn confirm<'a>(&'a self, effect: &'a ClaimedEffect) -> BoxFuture<'a, Result<(), ConfirmError>>;
}

/// The pool's state machine: receives verified, confirmed results. Keyed by idempotency key.
pub trait WebhookSink: Send + Sync {
    fn deliver<'a>(&'a self, result: &'a WorkflowResult) -> BoxFuture<'a, Result<(), String>>;
}

/// Per-pool webhook secrets.
pub trait WebhookSecrets: Send + Sync {
    fn secret(&self, pool_id: &str) -> Option<Vec<u8>>;
}

impl WebhookSecrets for HashMap<String, Vec<u8>> {
    fn secret(&self, pool_id: &str) -> Option<Vec<u8>> {
        self.get(pool_id).cloned()
    }
}

/// What the handler needs; the orchestrator builds it once and mounts `router(state)`.
pub struct WebhookState {
    pub secrets: Arc<dyn WebhookSecrets>,
    pub replay: Arc<ReplayGuard>,
    pub confirmer: Arc<dyn EffectConfirmer>,
    pub sink: Arc<dyn WebhookSink>,
    pub window_s: u64,
    /// Unix seconds; the system clock unless a test sets another.
    pub clock: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl WebhookState {
    pub fn system_clock() -> Arc<dyn Fn() -> u64 + Send + Sync> {
        Arc::new(|| crate::log::now_ms() / 1000)
    }
}

/// `POST /webhooks/keeperhub`, with the body limit.
pub fn router(state: Arc<WebhookState>) -> Router {
    Router::new()
        .route("/webhooks/keeperhub", post(keeperhub_webhook))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

pub async fn keeperhub_webhook(State(state): State<Arc<WebhookState>>, headers: HeaderMap, body: Bytes) -> Response {
    match receive(&state, &headers, &body).await {
        Ok(result) => (StatusCode::OK, axum::Json(serde_json::json!({"accepted": result.delivery_id}))).into_response(),
        Err(e) => {
            tracing::warn!(code = e.code(), error = %e, "keeperhub webhook refused");
            e.into_response()
        }
    }
}

/// Verifies, de-duplicates, confirms and delivers one webhook; the handler's whole job.
pub async fn receive(state: &WebhookState, headers: &HeaderMap, body: &[u8]) -> Result<WorkflowResult, WebhookError> {
    let delivery = DeliveryHeaders::from_headers(headers)?;
    let secret = state.secrets.secret(&delivery.pool_id).ok_or_else(|| WebhookError::UnknownPool(delivery.pool_id.clone()))?;
    let now = (state.clock)();
    verify(&secret, &delivery, body, now, state.window_s)?;
    let result: WorkflowResult = serde_json::from_slice(body).map_err(|e| WebhookError::MalformedBody(e.to_string()))?;
    if result.pool_id != delivery.pool_id {
        return Err(WebhookError::PoolMismatch { header: delivery.pool_id, body: result.pool_id });
    }
    if result.delivery_id != delivery.delivery_id {
        return Err(WebhookError::MalformedBody("deliveryId differs from the delivery header".into()));
    }
    if !matches!(result.status.as_str(), "success" | "error") {
        return Err(WebhookError::MalformedBody(format!("status {:?} (expected success or error)", result.status)));
    }
    for tx in &result.transaction_hashes {
        let h = tx.hash.strip_prefix("0x").unwrap_or_default();
        if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(WebhookError::MalformedBody(format!("node {}: {:?} is not a transaction hash", tx.node_id, tx.hash)));
        }
    }
    let replay = state.replay.clone();
    let claimed = delivery.clone();
    tokio::task::spawn_blocking(move || replay.claim(&claimed, now))
        .await
        .map_err(|e| WebhookError::Store(e.to_string()))??;
    match confirm_and_deliver(state, &result).await {
        Ok(()) => Ok(result),
        Err(e) => {
            // The delivery was authentic; a retry of it after the chain catches up must get through.
            if matches!(e, WebhookError::Unconfirmed(ConfirmError::NotYet(_)) | WebhookError::Sink(_)) {
                let replay = state.replay.clone();
                let d = delivery.clone();
                let _ = tokio::task::spawn_blocking(move || replay.release(&d)).await;
            }
            Err(e)
        }
    }
}

async fn confirm_and_deliver(state: &WebhookState, result: &WorkflowResult) -> Result<(), WebhookError> {
    for tx in &result.transaction_hashes {
        let effect = ClaimedEffect {
            pool_id: result.pool_id.clone(),
            idempotency_key: result.idempotency_key.clone(),
            node_id: tx.node_id.clone(),
            tx_hash: tx.hash.clone(),
        };
        state.confirmer.confirm(&effect).await?;
    }
    state.sink.deliver(result).await.map_err(WebhookError::Sink)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const SECRET: &[u8] = b"pool-secret-0123456789";

    fn headers(pool: &str, ts: u64, delivery: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER_POOL, HeaderValue::from_str(pool).unwrap());
        h.insert(HEADER_TIMESTAMP, HeaderValue::from_str(&ts.to_string()).unwrap());
        h.insert(HEADER_DELIVERY, HeaderValue::from_str(delivery).unwrap());
        h.insert(HEADER_SIGNATURE, HeaderValue::from_str(sig).unwrap());
        h
    }

    #[test]
    fn a_signature_verifies_and_any_change_breaks_it() {
        let body = br#"{"a":1}"#;
        let sig = sign(SECRET, 1000, body);
        let d = DeliveryHeaders::from_headers(&headers("p", 1000, "d1", &sig)).unwrap();
        verify(SECRET, &d, body, 1000, 300).unwrap();
        assert!(matches!(verify(b"other", &d, body, 1000, 300), Err(WebhookError::BadSignature)));
        assert!(matches!(verify(SECRET, &d, br#"{"a":2}"#, 1000, 300), Err(WebhookError::BadSignature)));
        let moved = DeliveryHeaders { timestamp: 1001, ..d.clone() };
        assert!(matches!(verify(SECRET, &moved, body, 1000, 300), Err(WebhookError::BadSignature)));
    }

    #[test]
    fn the_window_is_five_minutes_either_way() {
        let body = b"{}";
        for (ts, ok) in [(700, true), (699, false), (1300, true), (1301, false)] {
            let d = DeliveryHeaders::from_headers(&headers("p", ts, "d", &sign(SECRET, ts, body))).unwrap();
            let r = verify(SECRET, &d, body, 1000, DEFAULT_WINDOW_S);
            assert_eq!(r.is_ok(), ok, "timestamp {ts}: {r:?}");
            if !ok {
                assert!(matches!(r, Err(WebhookError::OutsideWindow { .. })));
            }
        }
    }

    #[test]
    fn malformed_headers_get_typed_errors() {
        let mut h = headers("p", 1, "d", &sign(SECRET, 1, b""));
        h.remove(HEADER_DELIVERY);
        assert!(matches!(DeliveryHeaders::from_headers(&h), Err(WebhookError::MissingHeader(HEADER_DELIVERY))));
        let h = headers("p", 1, "d", "sha256=abc");
        assert!(matches!(
            DeliveryHeaders::from_headers(&h),
            Err(WebhookError::MalformedHeader { header: HEADER_SIGNATURE, .. })
        ));
        let mut h = headers("p", 1, "d", &sign(SECRET, 1, b""));
        h.insert(HEADER_TIMESTAMP, HeaderValue::from_static("yesterday"));
        assert!(matches!(
            DeliveryHeaders::from_headers(&h),
            Err(WebhookError::MalformedHeader { header: HEADER_TIMESTAMP, .. })
        ));
    }

    #[test]
    fn replays_are_refused_by_id_or_signature_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("webhooks.db");
        let d = DeliveryHeaders { pool_id: "p".into(), timestamp: 1000, delivery_id: "d1".into(), signature_hex: "aa".repeat(32) };
        {
            let guard = ReplayGuard::open(&path, 300).unwrap();
            guard.claim(&d, 1000).unwrap();
            assert!(matches!(guard.claim(&d, 1001), Err(WebhookError::Replayed(_))));
        }
        let guard = ReplayGuard::open(&path, 300).unwrap();
        assert!(matches!(guard.claim(&d, 1002), Err(WebhookError::Replayed(_))), "forgotten across a restart");
        let new_id_same_sig = DeliveryHeaders { delivery_id: "d2".into(), ..d.clone() };
        assert!(matches!(guard.claim(&new_id_same_sig, 1002), Err(WebhookError::Replayed(_))));
        let released = DeliveryHeaders { delivery_id: "d3".into(), signature_hex: "bb".repeat(32), ..d.clone() };
        guard.claim(&released, 1002).unwrap();
        guard.release(&released).unwrap();
        guard.claim(&released, 1003).unwrap();
    }
}
