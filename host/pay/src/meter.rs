//! The per-second meter: one flow per pool, its rate kept at price × (requests in flight), every change
//! journalled before the rail is called and its receipt after, and each request charged exactly the
//! seconds it was in the flow.
//!
//! # Accounting
//! A rate change takes effect at its receipt's `effective_at_s` (a block timestamp on chain, the host
//! clock for the ledger rail). A request joins the flow at the receipt of the change that added it and
//! leaves it at the receipt of the change that removed it; its cost is `price × (stop − start)`. Between
//! two consecutive receipts the rate is `price × n` for the `n` requests then in the flow, so the sum of
//! all requests' costs equals `Σ rate × Δt` over the receipts — what the members received — to the wei.
//! That needs the rail to pay exactly the rate asked: a Superfluid GDA pays `floor(rate / total units)`
//! per unit, so [`PoolFlow`] refuses a price that is not a multiple of the pool's total units.
//!
//! # Durability (invariant 4)
//! Each change is a row in `flow_changes` (its idempotency key, the members, the rate, the set of requests
//! flowing after it) committed **before** the rail call; the receipt, the requests' start/stop times,
//! their costs drawn from their sessions and the sessions' transitions are committed together **after**.
//! A pool holds at most one change without a receipt, and nothing else is done on that pool until the
//! rail answers for it under the same key (a rail that already did it returns its first receipt), so an
//! unknown outcome never becomes a guess.
//!
//! # Failures
//! Every rail call is retried with backoff ([`RetryPolicy`], same key each time). A start that still
//! fails is an error to the caller; the change stays pending and is resolved by the next call on that pool.
//! A stop that still fails moves the sessions of the requests it should have removed to `breached` (money
//! may be flowing that nobody uses): they admit nothing more, [`Meter::retry_stuck`] keeps trying, and
//! once the rail answers the requests are charged up to the receipt that finally removed them (the
//! overrun is charged beyond the reservation, as overdraft if the balance is gone: it was paid to members).
//!
//! # Crash recovery
//! [`Meter::open`] reads the journal back: the flows still running and any change without a receipt.
//! [`Meter::recover`] (call it once at start-up, before admitting anything) resolves those changes under
//! their own keys, stops every flow, charges each open request for exactly the seconds served (up to the
//! stop's `effective_at_s`) and marks it failed ("orchestrator restarted").
//!
//! # Using it (the orchestrator)
//! 1. At start-up: `Sessions::open(path)`, [`Meter::open`] with the rail adapter, [`Meter::recover`],
//!    then [`Meter::configure_pool`] for each paid pool (again whenever its terms change).
//! 2. Per request: [`Meter::admit`] (an `Insufficient` error is a new 402), [`Meter::request_started`] at
//!    the first token (its `deadline_s` is when to cut it), [`Meter::request_ended`] at the end, whatever
//!    the end was — every admitted request must be ended, even one whose start failed.
//! 3. Every few seconds while anything is breached or stuck: [`Meter::retry_stuck`].
//!    [`StreamController`] wraps these for async code.
//!
//! # Timing
//! The meter adds three SQLite commits around each rail call (the ask, the intent, the receipt), each an
//! fsync (`synchronous = FULL`: an intent lost to a power cut would be a flow nobody knows to stop); the
//! stop latency is otherwise the rail's (one block on chain). Calls on one pool are serialised (the rail sees one change at a time per pool);
//! pools do not wait for each other. [`StreamController`] runs the blocking calls on tokio's blocking pool.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::session::{
    AdmitRequest, Admission, RequestState, SessionError, SessionMoney, SessionState, Sessions, Store, read_money, read_state,
    write_money, write_transition,
};

/// One member of a pool's flow: an operator and its units (its share of the pool's work).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowMember {
    /// The operator's address (GDA pool member) or ledger account.
    pub operator: String,
    pub units: u128,
}

/// A rate change asked of a rail: set the members' units and the pool's total flow rate (0 stops it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowChange {
    /// Stable across retries and restarts: a rail that already applied it returns its first receipt.
    pub idempotency_key: String,
    /// GDA pool address, or the ledger account.
    pub pool: String,
    pub token: String,
    pub members: Vec<FlowMember>,
    /// Atomic units per second, in total (price × requests in flight).
    pub flow_rate_per_s: u128,
}

impl FlowChange {
    /// Rate 0: the rail's `stream-stop`; any other rate is `stream-start` (which also changes a running flow).
    pub fn is_stop(&self) -> bool {
        self.flow_rate_per_s == 0
    }
}

/// What the rail did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowReceipt {
    /// Transaction hash, or ledger entry id.
    pub reference: String,
    /// When the new rate took effect (block timestamp, or the ledger's clock), Unix seconds.
    pub effective_at_s: u64,
    /// What actually flows to the members after the rail's rounding.
    pub flow_rate_per_s: u128,
}

/// A rail call that did not produce a receipt. Its effect is unknown (a transaction may have been mined
/// after a timeout), so the meter only ever retries it under the same key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct RailFailure {
    pub message: String,
}

impl RailFailure {
    pub fn new(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

/// How money moves for one pool; the orchestrator adapts the rail plugin to it. Blocking: the meter
/// calls it from a blocking thread, one call at a time per pool.
pub trait FlowRail: Send + Sync {
    fn set_flow(&self, change: &FlowChange) -> Result<FlowReceipt, RailFailure>;
}

/// A pool's payment terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolFlow {
    pub pool: String,
    pub token: String,
    pub members: Vec<FlowMember>,
    /// What one request in flight pays per second, in atomic units.
    pub price_per_s: u128,
}

impl PoolFlow {
    /// Checks the terms can be paid exactly (see the module docs), returning the total units.
    pub fn validate(&self) -> Result<u128, MeterError> {
        let invalid = |why: String| MeterError::InvalidPool { pool: self.pool.clone(), why };
        if self.pool.is_empty() || self.token.is_empty() {
            return Err(invalid("pool and token must be named".into()));
        }
        if self.members.is_empty() {
            return Err(invalid("a flow needs at least one member".into()));
        }
        let mut seen = BTreeSet::new();
        let mut total: u128 = 0;
        for member in &self.members {
            if !seen.insert(member.operator.to_ascii_lowercase()) {
                return Err(invalid(format!("operator {} is listed twice", member.operator)));
            }
            total = total.checked_add(member.units).ok_or_else(|| invalid("total units overflow u128".into()))?;
        }
        if total == 0 {
            return Err(invalid("the members' units add up to zero".into()));
        }
        if self.price_per_s == 0 {
            return Err(invalid("price per second must be positive".into()));
        }
        if !self.price_per_s.is_multiple_of(total) {
            return Err(MeterError::PriceNotMultipleOfUnits {
                pool: self.pool.clone(),
                price_per_s: self.price_per_s,
                total_units: total,
            });
        }
        Ok(total)
    }
}

/// How rail calls are retried: `attempts` tries in all, sleeping `first_backoff`, then twice that, … at
/// most `max_backoff` between them. Default: 5 tries, 100 ms doubling to 800 ms (1.5 s of waiting) —
/// long enough to ride out a dropped RPC connection, short enough that a dead rail is reported (and its
/// sessions breached) within seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 5, first_backoff: Duration::from_millis(100), max_backoff: Duration::from_millis(800) }
    }
}

/// Why a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// End of stream (EOS or the token limit).
    Completed,
    ClientDisconnected,
    /// Its reserved seconds ran out and the orchestrator cut it.
    DeadlineReached,
    Error(String),
    ShardFault(String),
    OrchestratorRestarted,
}

impl EndReason {
    fn final_state(&self) -> RequestState {
        match self {
            Self::Completed | Self::ClientDisconnected | Self::DeadlineReached => RequestState::Ended,
            Self::Error(_) | Self::ShardFault(_) | Self::OrchestratorRestarted => RequestState::Failed,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Completed => "completed".into(),
            Self::ClientDisconnected => "client disconnected".into(),
            Self::DeadlineReached => "reserved seconds ran out".into(),
            Self::Error(e) => format!("error: {e}"),
            Self::ShardFault(e) => format!("shard fault: {e}"),
            Self::OrchestratorRestarted => "orchestrator restarted".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("pool {pool}: {why}")]
    InvalidPool { pool: String, why: String },
    #[error(
        "pool {pool}: a price of {price_per_s} per second is not a multiple of the pool's {total_units} total units; \
         a Superfluid GDA floors the per-unit rate (rate / total units), so members would receive less than \
         requests are charged. Choose a price that is a multiple of {total_units}"
    )]
    PriceNotMultipleOfUnits { pool: String, price_per_s: u128, total_units: u128 },
    #[error("pool {0} has no payment terms configured")]
    UnknownPool(String),
    #[error("pool {pool} is flowing at {price_per_s} per second; its price changes only while nothing flows")]
    PoolBusy { pool: String, price_per_s: u128 },
    #[error("request {request_id} was admitted at {admitted} per second; pool {pool} now charges {now}")]
    PriceChanged { request_id: String, pool: String, admitted: u128, now: u128 },
    #[error("request {request_id} is {state:?} and cannot start")]
    NotStartable { request_id: String, state: RequestState },
    /// An earlier change on the pool has no receipt and the rail still fails: nothing new was attempted.
    #[error("pool {pool}: the rail did not answer for an earlier change ({message}); nothing new was attempted")]
    RailUnavailable { pool: String, message: String },
    /// The start could not be confirmed; the change stays pending (the request may or may not be in the
    /// flow). End the request with `request_ended`, which resolves it first.
    #[error("pool {pool}: starting request {request_id} failed: {message}")]
    StartFailed { pool: String, request_id: String, message: String },
    /// The stop could not be made; the listed sessions are now `breached`.
    #[error("pool {pool}: stopping failed ({message}); sessions {breached:?} are breached")]
    StopFailed { pool: String, message: String, breached: Vec<String> },
    /// The rail confirmed a different rate than asked: members are paid `actual` while requests are
    /// charged `requested`. Recorded as the rail reported it; an honest rail with validated terms never
    /// does this.
    #[error("pool {pool}: the rail set {actual} per second where {requested} was asked (change {key})")]
    RateMismatch { pool: String, key: String, requested: u128, actual: u128 },
    #[error("meter journal: {0}")]
    Corrupt(String),
}

impl From<rusqlite::Error> for MeterError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Session(SessionError::Database(e))
    }
}

/// A request now in the flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub request_id: String,
    /// The receipt that added it.
    pub reference: String,
    pub started_at_s: u64,
    /// When its reserved seconds run out (`started_at_s + max_seconds`, rail time): cut it before then
    /// (by the rail's stop latency) or its overrun is charged beyond its reservation.
    pub deadline_s: u64,
}

/// A finished request and what it cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub request_id: String,
    pub session_id: String,
    pub state: RequestState,
    pub reason: String,
    pub seconds: u64,
    pub cost: u128,
    pub start_reference: Option<String>,
    pub stop_reference: Option<String>,
    pub started_at_s: Option<u64>,
    pub stopped_at_s: Option<u64>,
}

/// What [`Meter::recover`] found and did.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Changes that had no receipt, answered again under their own key.
    pub resolved_changes: Vec<String>,
    /// Pools whose flow was still running and is now stopped.
    pub stopped_pools: Vec<String>,
    /// Every request that was open, now failed and charged for the seconds it was served.
    pub failed_requests: Vec<Ended>,
    /// Pools the rail still would not answer for (their sessions are breached; retry with `retry_stuck`).
    pub unresolved: Vec<(String, String)>,
}

struct PendingChange {
    change: FlowChange,
    /// The requests flowing once it takes effect.
    active: BTreeSet<String>,
    price_per_s: u128,
}

/// One pool's flow as the journal has it.
struct PoolState {
    pool: String,
    terms: Option<PoolFlow>,
    /// Requests in the flow per the last change with a receipt.
    active: BTreeSet<String>,
    price_per_s: u128,
    last_effective_at_s: Option<u64>,
    /// The last change sent (token and members for a stop after a restart, when no terms are configured).
    last_change: Option<FlowChange>,
    next_seq: u64,
    pending: Option<PendingChange>,
}

/// A request row, as the meter needs it.
struct RequestRow {
    session_id: String,
    pool: String,
    price_per_s: u128,
    max_seconds: u64,
    state: RequestState,
    start_at_s: Option<u64>,
    start_reference: Option<String>,
}

/// The meter: blocking, shareable (`Arc<Meter>`). See the module docs.
pub struct Meter {
    sessions: Sessions,
    rail: Arc<dyn FlowRail>,
    retry: RetryPolicy,
    pools: Mutex<HashMap<String, Arc<Mutex<PoolState>>>>,
    /// The configured terms, apart from the pool states so admission and the start of a request never
    /// wait behind a rail call in flight.
    terms: Mutex<HashMap<String, PoolFlow>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic mid-call leaves the journal consistent (it is re-read only from SQLite on open) and the
    // in-memory state at worst behind a pending change, which the next call resolves.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn amount(column: &str, text: &str) -> Result<u128, MeterError> {
    text.parse().map_err(|_| MeterError::Corrupt(format!("{column} = {text:?} is not an amount")))
}

fn parse_active(json: &str) -> Result<BTreeSet<String>, MeterError> {
    serde_json::from_str(json).map_err(|e| MeterError::Corrupt(format!("flow_changes.active: {e}")))
}

impl Meter {
    /// Opens the meter over the sessions' database and reads every pool's flow back from the journal.
    pub fn open(sessions: Sessions, rail: Arc<dyn FlowRail>, retry: RetryPolicy) -> Result<Self, MeterError> {
        let mut pools = HashMap::new();
        {
            let conn = sessions.store().conn();
            let mut stmt = conn.prepare(
                "SELECT pool, seq, change, active, price_per_s, effective_at_s FROM flow_changes ORDER BY pool, seq",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })?;
            for row in rows {
                let (pool, seq, change, active, price, effective_at_s) = row?;
                let change: FlowChange =
                    serde_json::from_str(&change).map_err(|e| MeterError::Corrupt(format!("flow_changes.change: {e}")))?;
                let active = parse_active(&active)?;
                let price_per_s = amount("flow_changes.price_per_s", &price)?;
                let state = pools.entry(pool.clone()).or_insert_with(|| PoolState {
                    pool: pool.clone(),
                    terms: None,
                    active: BTreeSet::new(),
                    price_per_s,
                    last_effective_at_s: None,
                    last_change: None,
                    next_seq: 1,
                    pending: None,
                });
                if state.pending.is_some() {
                    return Err(MeterError::Corrupt(format!("pool {pool}: a change follows one without a receipt")));
                }
                state.next_seq = seq as u64 + 1;
                state.last_change = Some(change.clone());
                match effective_at_s {
                    Some(at) => {
                        state.active = active;
                        state.price_per_s = price_per_s;
                        state.last_effective_at_s = Some(at as u64);
                    }
                    None => state.pending = Some(PendingChange { change, active, price_per_s }),
                }
            }
        }
        let pools = pools.into_iter().map(|(pool, state)| (pool, Arc::new(Mutex::new(state)))).collect();
        Ok(Self { sessions, rail, retry, pools: Mutex::new(pools), terms: Mutex::new(HashMap::new()) })
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    fn store(&self) -> &Store {
        self.sessions.store()
    }

    fn price(&self, pool: &str) -> Result<u128, MeterError> {
        lock(&self.terms)
            .get(pool)
            .map(|terms| terms.price_per_s)
            .ok_or_else(|| MeterError::UnknownPool(pool.to_owned()))
    }

    fn pool(&self, pool: &str) -> Option<Arc<Mutex<PoolState>>> {
        lock(&self.pools).get(pool).cloned()
    }

    /// Sets (or replaces) a pool's payment terms, after [`PoolFlow::validate`]. Members may change at any
    /// time (the next rate change carries them); the price only while nothing of the pool flows.
    pub fn configure_pool(&self, terms: PoolFlow) -> Result<(), MeterError> {
        terms.validate()?;
        let state = {
            let mut pools = lock(&self.pools);
            pools
                .entry(terms.pool.clone())
                .or_insert_with(|| {
                    Arc::new(Mutex::new(PoolState {
                        pool: terms.pool.clone(),
                        terms: None,
                        active: BTreeSet::new(),
                        price_per_s: terms.price_per_s,
                        last_effective_at_s: None,
                        last_change: None,
                        next_seq: 1,
                        pending: None,
                    }))
                })
                .clone()
        };
        let mut state = lock(&state);
        let flowing = !state.active.is_empty() || state.pending.is_some();
        if flowing && state.price_per_s != terms.price_per_s {
            return Err(MeterError::PoolBusy { pool: terms.pool, price_per_s: state.price_per_s });
        }
        state.price_per_s = terms.price_per_s;
        state.terms = Some(terms.clone());
        lock(&self.terms).insert(terms.pool.clone(), terms);
        Ok(())
    }

    /// Admits a request of `session_id` on `pool` at the pool's price (see [`Sessions::admit`]).
    pub fn admit(&self, session_id: &str, request_id: &str, pool: &str, max_seconds: u64) -> Result<Admission, MeterError> {
        let price_per_s = self.price(pool)?;
        Ok(self.sessions.admit(&AdmitRequest {
            session_id: session_id.to_owned(),
            request_id: request_id.to_owned(),
            pool: pool.to_owned(),
            price_per_s,
            max_seconds,
        })?)
    }

    /// The request's first token is ready: add it to its pool's flow (rate = price × requests in flight).
    /// Idempotent: a request already flowing returns its start. Starts that arrive while the pool's rail
    /// call is in flight are batched into the next change (one rail call for all of them).
    ///
    /// Every admitted request must end with [`Meter::request_ended`], whatever happened here: a start
    /// that failed may still take effect when the rail answers later.
    pub fn request_started(&self, request_id: &str) -> Result<Started, MeterError> {
        let row = self.request(request_id)?;
        if let Some(started) = self.started(request_id, &row) {
            return Ok(started);
        }
        if row.state != RequestState::Admitted {
            return Err(MeterError::NotStartable { request_id: request_id.to_owned(), state: row.state });
        }
        let price_changed = |now: u128| MeterError::PriceChanged {
            request_id: request_id.to_owned(),
            pool: row.pool.clone(),
            admitted: row.price_per_s,
            now,
        };
        let price = self.price(&row.pool)?;
        if price != row.price_per_s {
            return Err(price_changed(price));
        }
        let state = self.pool(&row.pool).ok_or_else(|| MeterError::UnknownPool(row.pool.clone()))?;
        // Marked before waiting for the pool: a change being prepared by another call takes it along
        // (`next_target` takes only requests admitted at the pool's current price).
        self.store().conn().execute(
            "UPDATE requests SET start_requested = 1 WHERE id = ?1 AND state = 'admitted'",
            params![request_id],
        )?;
        let mut state = lock(&state);
        if state.price_per_s != row.price_per_s {
            return Err(price_changed(state.price_per_s));
        }
        self.resolve_pending(&mut state)
            .map_err(|message| MeterError::RailUnavailable { pool: row.pool.clone(), message })?;
        let row = self.request(request_id)?;
        if let Some(started) = self.started(request_id, &row) {
            return Ok(started);
        }
        if row.state != RequestState::Admitted {
            return Err(MeterError::NotStartable { request_id: request_id.to_owned(), state: row.state });
        }
        let target = self.next_target(&state)?;
        match self.propose(&mut state, target) {
            Ok(mismatch) => {
                mismatch.map_or(Ok(()), Err)?;
                let row = self.request(request_id)?;
                self.started(request_id, &row)
                    .ok_or_else(|| MeterError::Corrupt(format!("{request_id} was proposed but did not start")))
            }
            Err(ProposeError::Meter(e)) => Err(e),
            Err(ProposeError::Rail(message)) => {
                Err(MeterError::StartFailed { pool: row.pool, request_id: request_id.to_owned(), message })
            }
        }
    }

    fn started(&self, request_id: &str, row: &RequestRow) -> Option<Started> {
        match (row.state, row.start_at_s, &row.start_reference) {
            (RequestState::Streaming, Some(at), Some(reference)) => Some(Started {
                request_id: request_id.to_owned(),
                reference: reference.clone(),
                started_at_s: at,
                deadline_s: at.saturating_add(row.max_seconds),
            }),
            _ => None,
        }
    }

    /// The request ended (end of stream, disconnect, deadline, error, shard fault): remove it from the
    /// flow, charge `price × seconds in the flow`, release its reservation. A request that never started
    /// is released at no cost. Idempotent: an ended request returns its record. Ends that arrive while the
    /// pool's rail call is in flight are batched into the next change.
    pub fn request_ended(&self, request_id: &str, reason: EndReason) -> Result<Ended, MeterError> {
        let row = self.request(request_id)?;
        if row.state.is_final() {
            return self.ended(request_id);
        }
        // Marked before waiting for the pool: a change being prepared by another call takes it along.
        self.mark_stopping(request_id, &reason)?;
        let state = match self.pool(&row.pool) {
            Some(state) => state,
            // No flow was ever set up for this pool: the request cannot be in one.
            None => return self.release(request_id, &reason),
        };
        let mut state = lock(&state);
        let in_flow = |s: &PoolState| {
            s.active.contains(request_id) || s.pending.as_ref().is_some_and(|p| p.active.contains(request_id))
        };
        if !in_flow(&state) {
            // Never added, or already removed by another call's change (then `release` only reads it back).
            return self.release(request_id, &reason);
        }
        if let Err(message) = self.resolve_pending(&mut state) {
            let breached = self.breach_stopping(&state, &message)?;
            return Err(MeterError::StopFailed { pool: row.pool, message, breached });
        }
        if !state.active.contains(request_id) {
            // The change that had no receipt removed it (an earlier try), or never added it.
            return self.release(request_id, &reason);
        }
        let target = self.next_target(&state)?;
        match self.propose(&mut state, target) {
            Ok(mismatch) => {
                mismatch.map_or(Ok(()), Err)?;
                self.ended(request_id)
            }
            Err(ProposeError::Meter(e)) => Err(e),
            Err(ProposeError::Rail(message)) => {
                let breached = self.breach_stopping(&state, &message)?;
                Err(MeterError::StopFailed { pool: row.pool, message, breached })
            }
        }
    }

    /// When the request's reserved seconds run out (rail time), once it flows.
    pub fn deadline(&self, request_id: &str) -> Result<Option<u64>, MeterError> {
        let row = self.request(request_id)?;
        Ok(row.start_at_s.filter(|_| !row.state.is_final()).map(|at| at.saturating_add(row.max_seconds)))
    }

    /// Every flowing request with its deadline, earliest first: what the orchestrator's cutter watches.
    pub fn deadlines(&self) -> Result<Vec<(String, u64)>, MeterError> {
        let conn = self.store().conn();
        let mut stmt = conn.prepare(
            "SELECT id, start_at_s + max_seconds AS deadline FROM requests
             WHERE state = 'streaming' AND start_at_s IS NOT NULL ORDER BY deadline, id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Retries what a failing rail left behind: changes without a receipt, and requests that ended but
    /// are still in the flow. Call it periodically (every few seconds) while any session is breached.
    pub fn retry_stuck(&self) -> Vec<(String, MeterError)> {
        let pools: Vec<_> = lock(&self.pools).values().cloned().collect();
        let mut failures = Vec::new();
        for state in pools {
            let mut state = lock(&state);
            let pool = state.pool.clone();
            if let Err(e) = self.unstick(&mut state) {
                failures.push((pool, e));
            }
        }
        failures
    }

    /// After a restart, before admitting anything: answers every change that has no receipt (same key),
    /// stops every flow still running, and fails every open request, charged for exactly the seconds it
    /// was served. Safe to call again (a second call finds nothing to do).
    pub fn recover(&self) -> Result<RecoveryReport, MeterError> {
        let mut report = RecoveryReport::default();
        let open: Vec<(String, String)> = {
            let conn = self.store().conn();
            let mut stmt = conn.prepare(
                "SELECT id, pool FROM requests WHERE state IN ('admitted', 'streaming', 'stopping') ORDER BY admitted_at_s, id",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<Result<_, _>>()?
        };
        let pools: Vec<_> = lock(&self.pools).values().cloned().collect();
        for state in pools {
            let mut state = lock(&state);
            let pool = state.pool.clone();
            let in_flow: BTreeSet<String> = state
                .active
                .iter()
                .chain(state.pending.iter().flat_map(|p| p.active.iter()))
                .cloned()
                .collect();
            for request_id in &in_flow {
                if !self.request(request_id)?.state.is_final() {
                    self.mark_stopping(request_id, &EndReason::OrchestratorRestarted)?;
                }
            }
            if let Some(pending) = &state.pending {
                let key = pending.change.idempotency_key.clone();
                if let Err(message) = self.resolve_pending(&mut state) {
                    self.breach_stopping(&state, &message)?;
                    report.unresolved.push((pool, message));
                    continue;
                }
                report.resolved_changes.push(key);
            }
            if !state.active.is_empty() {
                match self.propose(&mut state, BTreeSet::new()) {
                    Ok(mismatch) => {
                        if let Some(e) = mismatch {
                            tracing::error!(%pool, error = %e, "recovery stop");
                        }
                        report.stopped_pools.push(pool.clone());
                    }
                    Err(ProposeError::Meter(e)) => return Err(e),
                    Err(ProposeError::Rail(message)) => {
                        self.breach_stopping(&state, &message)?;
                        report.unresolved.push((pool, message));
                    }
                }
            }
        }
        for (request_id, _pool) in open {
            let row = self.request(&request_id)?;
            if row.state == RequestState::Admitted {
                // Admitted, never in any flow: nothing was served, nothing is charged.
                self.release(&request_id, &EndReason::OrchestratorRestarted)?;
            }
            if self.request(&request_id)?.state.is_final() {
                report.failed_requests.push(self.ended(&request_id)?);
            }
        }
        tracing::info!(
            resolved = report.resolved_changes.len(),
            stopped = report.stopped_pools.len(),
            failed = report.failed_requests.len(),
            unresolved = report.unresolved.len(),
            "meter recovery"
        );
        Ok(report)
    }

    // ---- internals -------------------------------------------------------------------------------

    /// Resolves the pool's pending change and removes the requests that ended but still flow.
    fn unstick(&self, state: &mut PoolState) -> Result<(), MeterError> {
        let pool = state.pool.clone();
        if let Err(message) = self.resolve_pending(state) {
            let breached = self.breach_stopping(state, &message)?;
            return Err(MeterError::StopFailed { pool, message, breached });
        }
        let target = self.next_target(state)?;
        if target != state.active {
            match self.propose(state, target) {
                Ok(mismatch) => mismatch.map_or(Ok(()), Err)?,
                Err(ProposeError::Meter(e)) => return Err(e),
                Err(ProposeError::Rail(message)) => {
                    let breached = self.breach_stopping(state, &message)?;
                    return Err(MeterError::StopFailed { pool, message, breached });
                }
            }
        }
        Ok(())
    }

    fn request(&self, request_id: &str) -> Result<RequestRow, MeterError> {
        let conn = self.store().conn();
        type Row = (String, String, String, i64, String, Option<i64>, Option<String>);
        let row: Option<Row> = conn
            .query_row(
                "SELECT session_id, pool, price_per_s, max_seconds, state, start_at_s, start_reference
                 FROM requests WHERE id = ?1",
                params![request_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)),
            )
            .optional()?;
        let (session_id, pool, price, max_seconds, state, start_at_s, start_reference) =
            row.ok_or_else(|| SessionError::UnknownRequest(request_id.to_owned()))?;
        Ok(RequestRow {
            session_id,
            pool,
            price_per_s: amount("requests.price_per_s", &price)?,
            max_seconds: max_seconds as u64,
            state: state.parse().map_err(MeterError::Corrupt)?,
            start_at_s: start_at_s.map(|s| s as u64),
            start_reference,
        })
    }

    fn ended(&self, request_id: &str) -> Result<Ended, MeterError> {
        let conn = self.store().conn();
        type Row = (String, String, Option<String>, Option<i64>, Option<String>, Option<String>, Option<String>, Option<i64>, Option<i64>);
        let (session_id, state, reason, seconds, cost, start_reference, stop_reference, started, stopped): Row = conn
            .query_row(
                "SELECT session_id, state, end_reason, seconds, cost, start_reference, stop_reference, start_at_s, stop_at_s
                 FROM requests WHERE id = ?1",
                params![request_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?, r.get(8)?)),
            )
            .optional()?
            .ok_or_else(|| SessionError::UnknownRequest(request_id.to_owned()))?;
        Ok(Ended {
            request_id: request_id.to_owned(),
            session_id,
            state: state.parse().map_err(MeterError::Corrupt)?,
            reason: reason.unwrap_or_default(),
            seconds: seconds.unwrap_or(0) as u64,
            cost: cost.as_deref().map(|c| amount("requests.cost", c)).transpose()?.unwrap_or(0),
            start_reference,
            stop_reference,
            started_at_s: started.map(|s| s as u64),
            stopped_at_s: stopped.map(|s| s as u64),
        })
    }

    /// Finishes a request that never flowed: cost 0, reservation released.
    fn release(&self, request_id: &str, reason: &EndReason) -> Result<Ended, MeterError> {
        self.store().write(|tx| {
            let row: Option<(String, String, String)> = tx
                .query_row("SELECT session_id, reserved, state FROM requests WHERE id = ?1", params![request_id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()?;
            let (session_id, reserved, state) = row.ok_or_else(|| SessionError::UnknownRequest(request_id.to_owned()))?;
            let state: RequestState = state.parse().map_err(SessionError::Corrupt)?;
            if state.is_final() {
                return Ok(());
            }
            let reserved: u128 = reserved.parse().map_err(|_| SessionError::Corrupt("requests.reserved".into()))?;
            let mut funds = read_money(tx, &session_id)?;
            funds.reserved = funds.reserved.checked_sub(reserved).ok_or_else(|| {
                SessionError::Corrupt(format!("session {session_id} reserves less than request {request_id}"))
            })?;
            write_money(tx, &session_id, funds)?;
            tx.execute(
                "UPDATE requests SET state = ?2, final_state = NULL, seconds = 0, cost = '0', end_reason = ?3 WHERE id = ?1",
                params![request_id, reason.final_state().as_str(), reason.describe()],
            )?;
            tx.execute(
                "UPDATE sessions SET requests = requests + 1 WHERE id = ?1",
                params![session_id],
            )?;
            Ok(())
        })?;
        self.ended(request_id)
    }

    fn mark_stopping(&self, request_id: &str, reason: &EndReason) -> Result<(), MeterError> {
        self.store().conn().execute(
            // The first reason wins: a request that ended normally and then met a restart before its
            // stop was confirmed still ended normally for its client.
            "UPDATE requests SET state = 'stopping', final_state = COALESCE(final_state, ?2),
                 end_reason = COALESCE(end_reason, ?3)
             WHERE id = ?1 AND state IN ('admitted', 'streaming', 'stopping')",
            params![request_id, reason.final_state().as_str(), reason.describe()],
        )?;
        Ok(())
    }

    /// The set the pool's next change should leave flowing: the current flow minus the requests that
    /// ended, plus the admitted ones whose start was asked for.
    fn next_target(&self, state: &PoolState) -> Result<BTreeSet<String>, MeterError> {
        let conn = self.store().conn();
        let mut stmt = conn.prepare(
            "SELECT id, state, start_requested, price_per_s FROM requests
             WHERE pool = ?1 AND state IN ('admitted', 'streaming', 'stopping')",
        )?;
        let rows = stmt.query_map(params![state.pool], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
        })?;
        let mut target = BTreeSet::new();
        for row in rows {
            let (id, request_state, start_requested, price) = row?;
            let keep = match request_state.parse::<RequestState>().map_err(MeterError::Corrupt)? {
                RequestState::Admitted => {
                    start_requested != 0 && amount("requests.price_per_s", &price)? == state.price_per_s
                }
                RequestState::Streaming => state.active.contains(&id),
                _ => false,
            };
            if keep {
                target.insert(id);
            }
        }
        Ok(target)
    }

    /// Marks breached the sessions of requests that ended but are still (possibly) in the flow.
    fn breach_stopping(&self, state: &PoolState, message: &str) -> Result<Vec<String>, MeterError> {
        let mut stuck: BTreeSet<String> = state.active.clone();
        if let Some(pending) = &state.pending {
            stuck.extend(pending.active.iter().cloned());
        }
        let mut breached = BTreeSet::new();
        for request_id in stuck {
            let row = self.request(&request_id)?;
            if row.state == RequestState::Stopping {
                breached.insert(row.session_id);
            }
        }
        let note = format!("pool {}: the stream could not be stopped: {message}", state.pool);
        for session_id in &breached {
            self.store().write(|tx| {
                let current = read_state(tx, session_id)?;
                if current.can_become(SessionState::Breached) {
                    write_transition(tx, session_id, SessionState::Breached, &format!("breach:{session_id}"), Some(&note))?;
                }
                Ok(())
            })?;
            tracing::error!(session = %session_id, pool = %state.pool, %message, "payment session breached");
        }
        Ok(breached.into_iter().collect())
    }

    /// Calls the rail with retries (same key every time).
    fn call_rail(&self, change: &FlowChange) -> Result<FlowReceipt, String> {
        let mut backoff = self.retry.first_backoff;
        let attempts = self.retry.attempts.max(1);
        let mut last = String::new();
        for attempt in 1..=attempts {
            match self.rail.set_flow(change) {
                Ok(receipt) => return Ok(receipt),
                Err(failure) => {
                    tracing::warn!(pool = %change.pool, key = %change.idempotency_key, attempt, error = %failure, "rail call failed");
                    last = failure.message;
                }
            }
            if attempt < attempts {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(self.retry.max_backoff);
            }
        }
        Err(format!("{last} (after {attempts} tries)"))
    }

    /// Answers the pool's change without a receipt, if any.
    fn resolve_pending(&self, state: &mut PoolState) -> Result<(), String> {
        let Some(pending) = state.pending.as_ref() else { return Ok(()) };
        let receipt = self.call_rail(&pending.change)?;
        let pending = state.pending.take().expect("checked above");
        if let Some(e) = self.apply(state, pending, receipt).map_err(|e| e.to_string())? {
            tracing::error!(error = %e, "rate mismatch while resolving a pending change");
        }
        Ok(())
    }

    /// Journals a change to `target`, calls the rail, and applies the receipt. Assumes nothing pending.
    fn propose(&self, state: &mut PoolState, target: BTreeSet<String>) -> Result<Option<MeterError>, ProposeError> {
        debug_assert!(state.pending.is_none(), "a change is proposed only once the previous one has its receipt");
        let (token, members) = match (&state.terms, &state.last_change) {
            (Some(terms), _) => (terms.token.clone(), terms.members.clone()),
            (None, Some(last)) => (last.token.clone(), last.members.clone()),
            (None, None) => return Err(ProposeError::Meter(MeterError::UnknownPool(state.pool.clone()))),
        };
        let price_per_s = state.price_per_s;
        let rate = price_per_s
            .checked_mul(target.len() as u128)
            .ok_or(ProposeError::Meter(MeterError::Session(SessionError::Overflow)))?;
        let seq = state.next_seq;
        let change = FlowChange {
            idempotency_key: format!("{}:{}:{}", self.store().epoch(), state.pool, seq),
            pool: state.pool.clone(),
            token,
            members,
            flow_rate_per_s: rate,
        };
        let change_json = serde_json::to_string(&change).expect("a flow change serialises");
        let active_json = serde_json::to_string(&target).expect("a set of ids serialises");
        self.store()
            .conn()
            .execute(
                "INSERT INTO flow_changes (idempotency_key, pool, seq, change, active, price_per_s, intent_at_s)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, strftime('%s', 'now'))",
                params![change.idempotency_key, state.pool, seq as i64, change_json, active_json, price_per_s.to_string()],
            )
            .map_err(|e| ProposeError::Meter(e.into()))?;
        state.next_seq += 1;
        state.pending = Some(PendingChange { change: change.clone(), active: target, price_per_s });
        let receipt = self.call_rail(&change).map_err(ProposeError::Rail)?;
        let pending = state.pending.take().expect("set above");
        self.apply(state, pending, receipt).map_err(ProposeError::Meter)
    }

    /// Records a receipt: the change's result, the requests it added (their start) and removed (their
    /// stop and cost, drawn from their sessions), and the sessions' transitions — one transaction.
    /// Returns a rate mismatch to report (the receipt is recorded either way).
    fn apply(
        &self,
        state: &mut PoolState,
        pending: PendingChange,
        receipt: FlowReceipt,
    ) -> Result<Option<MeterError>, MeterError> {
        let key = pending.change.idempotency_key.clone();
        let mut effective = receipt.effective_at_s;
        if let Some(last) = state.last_effective_at_s.filter(|last| *last > effective) {
            // A clock that went backwards would make a negative interval: hold it at the last one.
            tracing::warn!(pool = %state.pool, %key, reported = effective, last, "rail receipt earlier than the previous one");
            effective = last;
        }
        if effective > i64::MAX as u64 {
            return Err(MeterError::Corrupt(format!("receipt time {effective} out of range")));
        }
        let added: Vec<String> = pending.active.difference(&state.active).cloned().collect();
        let removed: Vec<String> = state.active.difference(&pending.active).cloned().collect();
        let price = state.price_per_s;
        self.store().write(|tx| {
            tx.execute(
                "UPDATE flow_changes SET reference = ?2, effective_at_s = ?3, flow_rate_per_s = ?4, result_at_s = strftime('%s', 'now')
                 WHERE idempotency_key = ?1",
                params![key, receipt.reference, effective as i64, receipt.flow_rate_per_s.to_string()],
            )?;
            for request_id in &added {
                tx.execute(
                    "UPDATE requests SET start_key = ?2, start_reference = ?3, start_at_s = ?4,
                         state = CASE WHEN state = 'admitted' THEN 'streaming' ELSE state END
                     WHERE id = ?1",
                    params![request_id, key, receipt.reference, effective as i64],
                )?;
                let session_id: String =
                    tx.query_row("SELECT session_id FROM requests WHERE id = ?1", params![request_id], |r| r.get(0))?;
                let current = read_state(tx, &session_id)?;
                if current.can_become(SessionState::Streaming) {
                    write_transition(tx, &session_id, SessionState::Streaming, &format!("{key}:start:{request_id}"), None)?;
                }
            }
            for request_id in &removed {
                let (session_id, start_at_s, reserved, final_state, request_price): (String, Option<i64>, String, Option<String>, String) = tx
                    .query_row(
                        "SELECT session_id, start_at_s, reserved, final_state, price_per_s FROM requests WHERE id = ?1",
                        params![request_id],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )?;
                let start = start_at_s
                    .ok_or_else(|| SessionError::Corrupt(format!("request {request_id} left a flow it never joined")))?
                    as u64;
                let seconds = effective.saturating_sub(start);
                let request_price: u128 =
                    request_price.parse().map_err(|_| SessionError::Corrupt("requests.price_per_s".into()))?;
                debug_assert_eq!(request_price, price, "a pool's price changes only while nothing flows");
                let cost = request_price.checked_mul(u128::from(seconds)).ok_or(SessionError::Overflow)?;
                let reserved: u128 = reserved.parse().map_err(|_| SessionError::Corrupt("requests.reserved".into()))?;
                let final_state = final_state.unwrap_or_else(|| RequestState::Ended.as_str().to_owned());
                tx.execute(
                    "UPDATE requests SET stop_key = ?2, stop_reference = ?3, stop_at_s = ?4, seconds = ?5, cost = ?6,
                         state = ?7, final_state = NULL
                     WHERE id = ?1",
                    params![request_id, key, receipt.reference, effective as i64, seconds as i64, cost.to_string(), final_state],
                )?;
                let mut funds: SessionMoney = read_money(tx, &session_id)?;
                funds.reserved = funds.reserved.checked_sub(reserved).ok_or_else(|| {
                    SessionError::Corrupt(format!("session {session_id} reserves less than request {request_id}"))
                })?;
                if cost <= funds.balance {
                    funds.balance -= cost;
                } else {
                    funds.overdraft = funds.overdraft.checked_add(cost - funds.balance).ok_or(SessionError::Overflow)?;
                    funds.balance = 0;
                }
                write_money(tx, &session_id, funds)?;
                let total_cost: String =
                    tx.query_row("SELECT cost FROM sessions WHERE id = ?1", params![session_id], |r| r.get(0))?;
                let total_cost: u128 = total_cost.parse().map_err(|_| SessionError::Corrupt("sessions.cost".into()))?;
                tx.execute(
                    "UPDATE sessions SET requests = requests + 1, seconds = seconds + ?2, cost = ?3 WHERE id = ?1",
                    params![
                        session_id,
                        seconds as i64,
                        total_cost.checked_add(cost).ok_or(SessionError::Overflow)?.to_string()
                    ],
                )?;
                let still_flowing: u32 = tx.query_row(
                    "SELECT COUNT(*) FROM requests WHERE session_id = ?1 AND state IN ('streaming', 'stopping')",
                    params![session_id],
                    |r| r.get(0),
                )?;
                let current = read_state(tx, &session_id)?;
                if still_flowing == 0 && current == SessionState::Streaming {
                    write_transition(tx, &session_id, SessionState::Idle, &format!("{key}:idle:{session_id}"), None)?;
                }
                tracing::info!(request = %request_id, session = %session_id, seconds, cost = %cost, "request metered");
            }
            Ok(())
        })?;
        state.active = pending.active;
        state.price_per_s = pending.price_per_s;
        state.last_effective_at_s = Some(effective);
        state.last_change = Some(pending.change.clone());
        if receipt.flow_rate_per_s != pending.change.flow_rate_per_s {
            let e = MeterError::RateMismatch {
                pool: state.pool.clone(),
                key,
                requested: pending.change.flow_rate_per_s,
                actual: receipt.flow_rate_per_s,
            };
            tracing::error!(error = %e, "rail rate mismatch");
            return Ok(Some(e));
        }
        Ok(None)
    }
}

enum ProposeError {
    /// The journal could not be written or read: nothing was sent, or the receipt is not recorded.
    Meter(MeterError),
    /// The rail failed after the retries: the change stays pending.
    Rail(String),
}

/// The async face of the [`Meter`] for the orchestrator: each call runs on tokio's blocking pool, so
/// rail calls (a transaction and its receipt) never stall the runtime.
#[derive(Clone)]
pub struct StreamController {
    meter: Arc<Meter>,
}

impl StreamController {
    pub fn new(meter: Arc<Meter>) -> Self {
        Self { meter }
    }

    pub fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Meter) -> Result<T, MeterError> + Send + 'static,
    ) -> Result<T, MeterError> {
        let meter = self.meter.clone();
        match tokio::task::spawn_blocking(move || work(&meter)).await {
            Ok(result) => result,
            Err(join) => Err(MeterError::Corrupt(format!("meter task did not finish: {join}"))),
        }
    }

    pub async fn admit(&self, session_id: &str, request_id: &str, pool: &str, max_seconds: u64) -> Result<Admission, MeterError> {
        let (session_id, request_id, pool) = (session_id.to_owned(), request_id.to_owned(), pool.to_owned());
        self.blocking(move |m| m.admit(&session_id, &request_id, &pool, max_seconds)).await
    }

    pub async fn request_started(&self, request_id: &str) -> Result<Started, MeterError> {
        let request_id = request_id.to_owned();
        self.blocking(move |m| m.request_started(&request_id)).await
    }

    pub async fn request_ended(&self, request_id: &str, reason: EndReason) -> Result<Ended, MeterError> {
        let request_id = request_id.to_owned();
        self.blocking(move |m| m.request_ended(&request_id, reason)).await
    }

    pub async fn recover(&self) -> Result<RecoveryReport, MeterError> {
        self.blocking(|m| m.recover()).await
    }

    pub async fn retry_stuck(&self) -> Vec<(String, MeterError)> {
        self.blocking(|m| Ok(m.retry_stuck())).await.unwrap_or_else(|e| vec![(String::new(), e)])
    }
}

#[cfg(test)]
mod tests;
