//! Paid pools: the x402 gate in front of the completion routes, payment sessions, and the flow that pays
//! the operators while a request streams. The money logic is computepool-pay's (sessions, the meter) and
//! the rails' (WebAssembly plugins: `x402-exact` takes the client's voucher through the facilitator,
//! `superfluid-gda` or `ledger` pays the operators); this module decides, per request, which to call and
//! when.
//!
//! # A paid request
//! 1. No payment and no session token: **402**, the rail's requirements in `PAYMENT-REQUIRED` (x402 v2)
//!    and in the body (v1). Nothing is written (a flood of unpaid requests costs no disk).
//! 2. A voucher (`PAYMENT-SIGNATURE`, or v1's `X-PAYMENT`): the challenge rail verifies it, the session
//!    store writes the intent to credit it, the rail settles it, the store credits the payer's session.
//!    The response carries `PAYMENT-RESPONSE` (and `X-PAYMENT-RESPONSE`) and, when the session is new,
//!    its token in `X-ComputePool-Session-Token` (later requests may spend the balance with
//!    `Authorization: Bearer <token>` instead of a new voucher).
//! 3. The request reserves its worst case (price × the pool's max seconds) from the session, or gets a
//!    new 402 saying how much is missing.
//! 4. At its first token the meter adds it to the pool's flow (the flow rail's transaction is mined
//!    before the token is sent: nothing is served unpaid); when it ends — end of stream, error, client
//!    gone, or its paid seconds run out — the meter removes it and draws exactly price × seconds streamed.
//!
//! - [`config`]: a pool's price and rails.
//! - [`rails`]: the rail plugins behind the meter's `FlowRail` and the challenge calls.
//! - [`setup`]: `--payments`, `--rails`: the rails' plugin host.

pub mod config;
pub mod rails;
pub mod setup;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use computepool_pay::meter::{EndReason, Meter, MeterError, PoolFlow, RetryPolicy, StreamController};
use computepool_pay::session::{SessionError, SessionView, Sessions};
use computepool_pay::x402::{
    PaymentRequired, PaymentRequiredV1, PaymentRequirements, ResourceInfo, SettleResponse, encode_header,
};
use computepool_plugin_host::PluginHost;

use self::config::PoolPayments;
use self::rails::{ChallengeFailure, PluginRails};
use super::error::ApiError;
use super::pools::Pool;
use super::workers::Workers;

/// x402 v2: the 402's requirements, base64 JSON.
pub const PAYMENT_REQUIRED: &str = "payment-required";
/// x402 v2: the client's payment, base64 JSON.
pub const PAYMENT_SIGNATURE: &str = "payment-signature";
/// x402 v1: the client's payment.
pub const X_PAYMENT: &str = "x-payment";
/// x402 v2: the settlement, base64 JSON.
pub const PAYMENT_RESPONSE: &str = "payment-response";
/// x402 v1: the settlement.
pub const X_PAYMENT_RESPONSE: &str = "x-payment-response";
/// The session a request drew from.
pub const SESSION_ID: &str = "x-computepool-session";
/// A new session's bearer token (shown once).
pub const SESSION_TOKEN: &str = "x-computepool-session-token";
/// Session tokens start with this, so they are told apart from other bearer keys.
const TOKEN_PREFIX: &str = "cps_";
/// The largest payment header taken, in bytes (a voucher is under 1 KiB; base64 JSON of one well under 4).
const MAX_PAYMENT_HEADER_BYTES: usize = 16 << 10;

/// A 402: what the client must pay, and why the last attempt (if any) was refused.
#[derive(Debug)]
pub struct PaymentChallenge {
    pub required: PaymentRequired,
    pub v1: PaymentRequiredV1,
}

impl PaymentChallenge {
    /// The 402's `PAYMENT-REQUIRED` header value.
    pub fn header(&self) -> String {
        encode_header(&self.required)
    }

    /// The 402's body: x402 v1's shape, which v1 clients read (v2 clients read the header).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(&self.v1).expect("402 bodies serialise")
    }

    pub fn error(&self) -> &str {
        self.required.error.as_deref().unwrap_or("payment required")
    }
}

/// A pool's payment settings in force, with what was derived from them.
struct Terms {
    settings: PoolPayments,
    price: u128,
}

/// Payments of every paid pool. `None` in [`super::AppState`] when payments are off.
pub struct Payments {
    rails: Arc<PluginRails>,
    /// The orchestrator's store: the journal of vouchers being settled.
    store: Arc<super::store::Store>,
    controller: StreamController,
    terms: RwLock<HashMap<String, Arc<Terms>>>,
}

/// Where a request's money comes from, decided by [`Payments::gate`].
pub struct PaidRequest {
    payments: Arc<Payments>,
    pub request_id: String,
    /// Headers for the response (settlement, session).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    max_seconds: u32,
    /// Set once the request is in the pool's flow: when its paid seconds run out (local clock).
    deadline: Option<Instant>,
    ended: bool,
}

impl Payments {
    /// Opens the payment store at `db`, recovers what a previous run left streaming (every open flow is
    /// stopped and its requests charged for exactly the seconds served) and serves pools' payments
    /// through the rail plugins of `plugins`.
    pub async fn open(
        db: &std::path::Path,
        plugins: Arc<PluginHost>,
        keepers: Option<Arc<crate::keeping::KeeperService>>,
        saved: &[(String, PoolPayments)],
        store: Arc<super::store::Store>,
    ) -> anyhow::Result<Arc<Self>> {
        let sessions = Sessions::open(db)?;
        let rails = Arc::new(PluginRails::new(plugins, keepers));
        // The flows left running are stopped through the rails they were started with.
        for (pool, settings) in saved {
            rails.bind_flow(pool, &settings.flow);
        }
        let meter = Meter::open(sessions, rails.clone(), RetryPolicy::default())?;
        let controller = StreamController::new(Arc::new(meter));
        let report = controller.recover().await?;
        for ended in &report.failed_requests {
            tracing::warn!(request = %ended.request_id, seconds = ended.seconds, cost = %ended.cost,
                "request open at the last shutdown: stopped, charged for the seconds it was served");
        }
        for (pool, why) in &report.unresolved {
            tracing::error!(%pool, "could not stop the flow left from the last run (retrying): {why}");
        }
        // Vouchers verified and sent to settle when the last run stopped: finish them (idempotently).
        let (pending_rails, sessions, journal) = (rails.clone(), controller.meter().sessions().clone(), store.clone());
        let credited = tokio::task::spawn_blocking(move || pending_rails.settle_pending(&sessions, &journal)).await?;
        if credited > 0 {
            tracing::info!(credited, "vouchers left pending by the last run are credited");
        }
        Ok(Arc::new(Self { rails, store, controller, terms: RwLock::new(HashMap::new()) }))
    }

    fn terms(&self, pool: &str) -> Option<Arc<Terms>> {
        self.terms.read().unwrap_or_else(|p| p.into_inner()).get(pool).cloned()
    }

    /// Keeps `pool` paid with `settings` whose rails could not be set up: its requests get 503 (from the
    /// meter, which has no terms for it) until `configure` succeeds.
    pub fn hold(&self, pool: &str, settings: PoolPayments) {
        let price = settings.validate().unwrap_or(0);
        self.terms.write().unwrap_or_else(|p| p.into_inner()).insert(pool.to_string(), Arc::new(Terms { settings, price }));
    }

    /// A pool's payment settings, if it is paid.
    pub fn settings(&self, pool: &str) -> Option<PoolPayments> {
        self.terms(pool).map(|t| t.settings.clone())
    }

    /// Sets (or replaces) a pool's payments; the next request uses them. The rails must be loaded and
    /// accept their configs.
    pub async fn configure(&self, pool: &Pool, workers: &Workers, settings: PoolPayments) -> Result<(), ApiError> {
        let price = settings.validate()?;
        let rails = self.rails.clone();
        let checked = settings.clone();
        tokio::task::spawn_blocking(move || rails.check(&checked))
            .await
            .map_err(|e| ApiError::Internal(format!("checking rails: {e}")))??;
        let flow = self.pool_flow(pool, workers, &settings, price)?;
        self.rails.bind_flow(&pool.record.id, &settings.flow);
        self.controller.meter().configure_pool(flow).map_err(meter_error)?;
        self.terms.write().unwrap_or_else(|p| p.into_inner()).insert(pool.record.id.clone(), Arc::new(Terms { settings, price }));
        tracing::info!(pool = %pool.record.id, price, "payments configured");
        Ok(())
    }

    /// Recomputes a paid pool's flow members (after a worker was ejected) under its current settings.
    pub async fn reconfigure(&self, pool: &Pool, workers: &Workers) -> Result<(), ApiError> {
        match self.settings(&pool.record.id) {
            Some(settings) => self.configure(pool, workers, settings).await,
            None => Ok(()),
        }
    }

    /// The pool's flow members: each operator (a worker's payout address) with units = the layers it
    /// serves, over all the pool's pipelines.
    fn pool_flow(&self, pool: &Pool, workers: &Workers, settings: &PoolPayments, price: u128) -> Result<PoolFlow, ApiError> {
        let mut units: std::collections::BTreeMap<String, u128> = Default::default();
        // Each worker once, however many routes it is on.
        for shard in pool.members.iter().map(|m| &m.shard) {
            // An ejected worker's operator is paid no more for it (its units go to 0 on chain too).
            if workers.ejection(&shard.peer.to_string()).is_some() {
                continue;
            }
            let Some(worker) = workers.get(&shard.peer.to_string()) else { continue };
            let Some(payout) = worker.registration.payout.clone() else { continue };
            *units.entry(payout.to_ascii_lowercase()).or_default() += u128::from(shard.layers.end - shard.layers.start);
        }
        if units.is_empty() {
            return Err(ApiError::invalid(
                "flow",
                format!("no worker of pool {} has registered a payout address (--payout): nobody to pay", pool.record.id),
            ));
        }
        let token = rails::flow_token(&settings.flow);
        let members = units.into_iter().map(|(operator, units)| computepool_pay::meter::FlowMember { operator, units }).collect();
        let flow = PoolFlow { pool: pool.record.id.clone(), token, members, price_per_s: price };
        flow.validate().map_err(|e| ApiError::invalid("price_per_second", e.to_string()))?;
        Ok(flow)
    }

    /// Decides how the request to `pool` is paid, before any shard works: `Ok(None)` for a free pool,
    /// a [`PaidRequest`] holding its reservation, or a 402 ([`ApiError::PaymentRequired`]).
    pub async fn gate(
        self: &Arc<Self>,
        pool: &Pool,
        request_id: &str,
        headers: &HeaderMap,
        resource: &str,
    ) -> Result<Option<PaidRequest>, ApiError> {
        let Some(terms) = self.terms(&pool.record.id) else { return Ok(None) };
        let quote = || self.challenge(pool, &terms, request_id, resource, None);
        let mut response_headers = Vec::new();
        let payment = payment_header(headers)?;
        let session_id = if let Some((version, payment)) = payment {
            let rails = self.rails.clone();
            let (settings, model, id, url) = (
                terms.settings.clone(),
                pool.record.model.clone(),
                request_id.to_string(),
                resource.to_string(),
            );
            let sessions = self.controller.meter().sessions().clone();
            let journal = self.store.clone();
            let price = terms.price;
            let paid = tokio::task::spawn_blocking(move || {
                rails.take_payment(&sessions, &settings, price, &model, &id, &url, &payment, &journal)
            })
            .await
            .map_err(|e| ApiError::Internal(format!("taking the payment: {e}")))?;
            match paid {
                Ok(paid) => {
                    let settle = SettleResponse {
                        success: true,
                        error_reason: None,
                        error_message: None,
                        payer: Some(paid.payer.clone()),
                        transaction: paid.reference.clone(),
                        network: paid.network.clone(),
                        amount: Some(paid.amount.to_string()),
                    };
                    let value = encode_header(&settle);
                    let name = if version == 1 { X_PAYMENT_RESPONSE } else { PAYMENT_RESPONSE };
                    response_headers.push((HeaderName::from_static(name), header_value(&value)?));
                    if let Some(secret) = &paid.secret {
                        let token = format!("{TOKEN_PREFIX}{}_{secret}", paid.session_id);
                        response_headers.push((HeaderName::from_static(SESSION_TOKEN), header_value(&token)?));
                    }
                    paid.session_id
                }
                Err(ChallengeFailure::Refused { reason, message }) => {
                    let error = format!("{}: {message}", reason.as_str());
                    return Err(self.challenge(pool, &terms, request_id, resource, Some(error)).await);
                }
                Err(ChallengeFailure::Internal(e)) => return Err(e),
            }
        } else if let Some(token) = session_token(headers)? {
            let sessions = self.controller.meter().sessions().clone();
            let (id, secret) = token;
            let id2 = id.clone();
            tokio::task::spawn_blocking(move || sessions.authenticate(&id2, &secret))
                .await
                .map_err(|e| ApiError::Internal(format!("authenticating the session: {e}")))?
                .map_err(session_error)?;
            id
        } else {
            return Err(quote().await);
        };
        response_headers.push((HeaderName::from_static(SESSION_ID), header_value(&session_id)?));
        let max_seconds = terms.settings.max_seconds_per_request;
        match self.controller.admit(&session_id, request_id, &pool.record.id, u64::from(max_seconds)).await {
            Ok(_) => {}
            Err(MeterError::Session(SessionError::Insufficient { needed, available, .. })) => {
                let why = format!(
                    "insufficient_funds: the session's free balance is {available}, a request reserves {needed} \
                     (price × max_seconds_per_request); pay again"
                );
                let mut challenge = self.challenge(pool, &terms, request_id, resource, Some(why)).await;
                if let ApiError::PaymentRequired(c) = &mut challenge {
                    c.extra_headers = response_headers;
                }
                return Err(challenge);
            }
            Err(e) => return Err(meter_error(e)),
        }
        Ok(Some(PaidRequest {
            payments: self.clone(),
            request_id: request_id.to_string(),
            headers: response_headers,
            max_seconds,
            deadline: None,
            ended: false,
        }))
    }

    /// A 402 for `pool`, with `error` saying why (a refused payment, a short balance).
    async fn challenge(&self, pool: &Pool, terms: &Terms, request_id: &str, resource: &str, error: Option<String>) -> ApiError {
        let rails = self.rails.clone();
        let (settings, model, id, url) =
            (terms.settings.clone(), pool.record.model.clone(), request_id.to_string(), resource.to_string());
        let price = terms.price;
        let quoted = tokio::task::spawn_blocking(move || rails.quote(&settings, price, &model, &id, &url)).await;
        let requirements: PaymentRequirements = match quoted {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return e,
            Err(e) => return ApiError::Internal(format!("quoting: {e}")),
        };
        let resource = ResourceInfo {
            url: resource.to_string(),
            description: Some(format!("{} on ComputePool pool {}", pool.record.model, pool.record.id)),
            mime_type: Some("application/json".into()),
        };
        let error = error.or_else(|| Some("payment required".into()));
        let v1 = PaymentRequiredV1 { x402_version: 1, error: error.clone(), accepts: vec![requirements.to_v1(&resource)] };
        let required = PaymentRequired { x402_version: 2, error, resource: Some(resource), accepts: vec![requirements], extensions: None };
        ApiError::PaymentRequired(Box::new(Challenge402 { challenge: PaymentChallenge { required, v1 }, extra_headers: Vec::new() }))
    }

    /// `GET /sessions/{id}`: the session, to the holder of its token.
    pub async fn session(&self, id: &str, headers: &HeaderMap) -> Result<SessionView, ApiError> {
        let Some((token_id, secret)) = session_token(headers)? else {
            return Err(ApiError::Unauthorized("give the session's token: Authorization: Bearer cps_…".into()));
        };
        if token_id != id {
            return Err(ApiError::Unauthorized("the token is another session's".into()));
        }
        let sessions = self.controller.meter().sessions().clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || {
            sessions.authenticate(&id, &secret)?;
            sessions.view(&id)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("reading the session: {e}")))?
        .map_err(session_error)
    }
}

/// A 402 with the headers to send beside it.
#[derive(Debug)]
pub struct Challenge402 {
    pub challenge: PaymentChallenge,
    /// Headers of what did happen (a voucher settled, but the balance still falls short).
    pub extra_headers: Vec<(HeaderName, HeaderValue)>,
}

impl PaidRequest {
    /// The request's first token is ready: put it in the pool's flow (returns once the rail has it).
    pub async fn started(&mut self) -> Result<(), ApiError> {
        if self.deadline.is_some() {
            return Ok(());
        }
        self.payments.controller.request_started(&self.request_id).await.map_err(meter_error)?;
        self.deadline = Some(Instant::now() + Duration::from_secs(u64::from(self.max_seconds)));
        Ok(())
    }

    /// When its paid seconds run out, once it streams.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The request ended: take it out of the flow and charge it. Returns what it cost.
    pub async fn ended(&mut self, reason: EndReason) -> Option<u128> {
        if self.ended {
            return None;
        }
        self.ended = true;
        match self.payments.controller.request_ended(&self.request_id, reason).await {
            Ok(ended) => Some(ended.cost),
            Err(e) => {
                tracing::error!(request = %self.request_id, "could not end the request's payment: {e}");
                None
            }
        }
    }
}

impl Drop for PaidRequest {
    /// A request dropped without [`ended`](Self::ended) (the client went away): end it off this task.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let controller = self.payments.controller.clone();
        let id = std::mem::take(&mut self.request_id);
        let reason = EndReason::ClientDisconnected;
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    if let Err(e) = controller.request_ended(&id, reason).await {
                        tracing::error!(request = %id, "could not end the payment of a cancelled request: {e}");
                    }
                });
            }
            Err(_) => tracing::error!(request = %id, "request dropped outside a runtime: its payment ends at the next start"),
        }
    }
}

/// The payment header, if any: (x402 version, value).
fn payment_header(headers: &HeaderMap) -> Result<Option<(u32, String)>, ApiError> {
    for (name, version) in [(PAYMENT_SIGNATURE, 2), (X_PAYMENT, 1)] {
        if let Some(value) = headers.get(name) {
            if value.len() > MAX_PAYMENT_HEADER_BYTES {
                return Err(ApiError::invalid(name, format!("{name} is longer than {MAX_PAYMENT_HEADER_BYTES} bytes")));
            }
            let text = value.to_str().map_err(|_| ApiError::invalid(name, format!("{name} is not ASCII")))?;
            return Ok(Some((version, text.trim().to_string())));
        }
    }
    Ok(None)
}

/// A session token from `Authorization: Bearer cps_<session>_<secret>`, if the request carries one.
fn session_token(headers: &HeaderMap) -> Result<Option<(String, String)>, ApiError> {
    let Some(value) = headers.get(header::AUTHORIZATION) else { return Ok(None) };
    let Ok(text) = value.to_str() else { return Ok(None) };
    let Some(token) = text.strip_prefix("Bearer ").map(str::trim).and_then(|t| t.strip_prefix(TOKEN_PREFIX)) else {
        return Ok(None);
    };
    // The secret is hex; the session id may hold underscores.
    let (id, secret) = token
        .rsplit_once('_')
        .ok_or_else(|| ApiError::Unauthorized("a session token is cps_<session>_<secret>".into()))?;
    Ok(Some((id.to_string(), secret.to_string())))
}

fn header_value(text: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(text).map_err(|e| ApiError::Internal(format!("header value: {e}")))
}

fn session_error(e: SessionError) -> ApiError {
    match e {
        SessionError::Unauthorized | SessionError::UnknownSession(_) => {
            ApiError::Unauthorized("no session matches this token".into())
        }
        SessionError::NotAdmitting { session_id, state } => {
            ApiError::Unauthorized(format!("session {session_id} is {state} and takes no requests"))
        }
        other => ApiError::Internal(format!("payments: {other}")),
    }
}

fn meter_error(e: MeterError) -> ApiError {
    match e {
        MeterError::Session(s) => session_error(s),
        MeterError::UnknownPool(pool) => ApiError::PaymentUnavailable(format!("the payments of pool {pool} are not set up")),
        MeterError::InvalidPool { .. } | MeterError::PriceNotMultipleOfUnits { .. } => {
            ApiError::invalid("price_per_second", e.to_string())
        }
        other => ApiError::Internal(format!("payments: {other}")),
    }
}
