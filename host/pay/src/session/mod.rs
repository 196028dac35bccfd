//! Payment sessions: a payer's prepaid balance, durable in SQLite, that each of its requests draws its
//! exact metered cost from.
//!
//! # Life of a session (see [`SessionState`] for the transition table)
//! 1. A request arrives unpaid: the orchestrator answers 402. **Nothing is written**: a flood of unpaid
//!    requests costs no disk. Admission refusals (below) write nothing either.
//! 2. A voucher arrives and the facilitator's `/verify` accepts it. [`Sessions::begin_credit`] writes the
//!    intent to settle it (a `pending` credit, keyed by the voucher) into the payer's live session, or
//!    opens a new one in `quoted` and hands out its secret. Only verified vouchers reach the disk, a payer
//!    holds at most [`MAX_PENDING_CREDITS`] unsettled ones, and the same voucher twice is one row.
//! 3. The facilitator settles; [`Sessions::complete_credit`] credits the amount (once per voucher, however
//!    often it is called) and moves `quoted → paid`. A failed settlement is [`Sessions::fail_credit`].
//! 4. Each request is admitted with [`Sessions::admit`] (or the meter's `admit`, which fills in the pool's
//!    price): its worst case, price × max seconds, is reserved against the free balance, or it is refused
//!    with [`SessionError::Insufficient`] carrying the amount needed (answer it with a new 402).
//! 5. The meter (`crate::meter`) streams while it runs and, when it ends, draws price × seconds streamed
//!    and releases the reservation (`paid/idle → streaming → idle`).
//!
//! Durability: each action with an effect outside this process has its intent committed before it and its
//! result after — a voucher's settlement in `credits` (pending → settled/failed), a rate change of a
//! pool's flow in the meter's `flow_changes` (intent → receipt) — and every session state change is a
//! `transitions` row keyed by its cause, committed in the same transaction as the result that caused it,
//! so a retried cause changes nothing twice.
//!
//! The payer proves ownership of a session with the secret returned at open (stored only as its sha256):
//! [`Sessions::authenticate`], then [`Sessions::view`] for `GET /sessions/{id}`.
//!
//! All calls are blocking (SQLite, one short transaction each); call them from `spawn_blocking` or accept
//! a sub-millisecond stall on the async thread.

mod state;
mod store;

use std::path::Path;
use std::sync::Arc;

use rusqlite::{OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

pub use state::{RequestState, SessionState};
pub(crate) use store::Store;
use store::{add, money, now_s, parse_amount, random_hex, set_money, session_state, transition};

/// At most this many vouchers of one payer may be awaiting settlement at once; more is refused with
/// [`SessionError::TooManyPending`] so a stream of verified-but-never-settled vouchers cannot grow the
/// database without bound.
pub const MAX_PENDING_CREDITS: u32 = 8;

/// Everything that can go wrong with a session, each with what the caller needs to answer the client.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("payment store: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("payment store holds a value it cannot read: {0}")]
    Corrupt(String),
    #[error("no randomness from the operating system: {0}")]
    Randomness(String),
    #[error("amount arithmetic overflowed u128")]
    Overflow,
    #[error("payer {0:?} is not a 0x-prefixed 20-byte hex address")]
    InvalidPayer(String),
    #[error("invalid amount: {0}")]
    InvalidAmount(String),
    #[error("voucher key must be 1 to 256 characters")]
    InvalidVoucherKey,
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("no session {0:?}")]
    UnknownSession(String),
    #[error("no voucher {0:?} awaiting settlement")]
    UnknownVoucher(String),
    #[error("no admitted request {0:?}")]
    UnknownRequest(String),
    #[error("wrong session secret")]
    Unauthorized,
    #[error("voucher {voucher_key:?} was already recorded for another payer or amount")]
    VoucherConflict { voucher_key: String },
    #[error("request {0:?} was already admitted with other terms")]
    DuplicateRequest(String),
    #[error("payer {payer} already has {MAX_PENDING_CREDITS} vouchers awaiting settlement")]
    TooManyPending { payer: String },
    #[error("session {session_id} cannot go from {from} to {to}")]
    IllegalTransition { session_id: String, from: SessionState, to: SessionState },
    #[error("session {session_id} is {state} and admits no requests")]
    NotAdmitting { session_id: String, state: SessionState },
    /// The balance cannot cover the request's worst case: answer with a new 402 for at least `needed`.
    #[error("session {session_id}: the request needs {needed} reserved, {available} is free (short by {shortfall})")]
    Insufficient { session_id: String, needed: u128, available: u128, shortfall: u128 },
}

/// What [`Sessions::begin_credit`] hands back: where the voucher will be credited once it settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditTicket {
    pub session_id: String,
    pub voucher_key: String,
    /// Set only when this call opened the session: give it to the payer (it authenticates
    /// `GET /sessions/{id}`); it is stored only hashed and cannot be shown again.
    pub secret: Option<String>,
}

/// What [`Sessions::complete_credit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditOutcome {
    pub session_id: String,
    pub amount: u128,
    /// The session's balance after the credit.
    pub balance: u128,
    /// False when this voucher had already been credited (the call changed nothing).
    pub newly_credited: bool,
    /// Set when the session the voucher was meant for closed or breached while it settled, so the money
    /// went to a session opened for it now (`session_id`): give this secret to the payer.
    pub secret: Option<String>,
}

/// A voucher whose settlement was started and never resolved (a restart in between): settle it again
/// (or check the chain) and call `complete_credit` / `fail_credit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingCredit {
    pub voucher_key: String,
    pub session_id: String,
    pub payer: String,
    pub amount: u128,
}

/// What [`Sessions::admit`] is asked to reserve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmitRequest {
    pub session_id: String,
    /// Unique per request (the orchestrator's request id).
    pub request_id: String,
    pub pool: String,
    pub price_per_s: u128,
    /// The longest the request may stream; its reservation is price × this.
    pub max_seconds: u64,
}

/// A granted admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub session_id: String,
    pub request_id: String,
    pub reserved: u128,
    /// Free balance left after this reservation.
    pub available: u128,
}

/// `GET /sessions/{id}`: amounts are decimal strings of the token's atomic units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SessionView {
    pub id: String,
    pub payer: String,
    pub state: SessionState,
    #[serde(with = "decimal")]
    pub balance: u128,
    #[serde(with = "decimal")]
    pub reserved: u128,
    /// Balance minus reserved: what new requests can reserve.
    #[serde(with = "decimal")]
    pub available: u128,
    /// Drawn beyond the balance (a stop that came after the reservation ran out); normally zero.
    #[serde(with = "decimal")]
    pub overdraft: u128,
    pub usage: Usage,
    pub stream: StreamView,
    /// Why it closed or breached.
    pub note: Option<String>,
    pub created_at_s: i64,
    pub updated_at_s: i64,
}

/// Finished requests only: requests, seconds streamed, cost drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub requests: u64,
    pub seconds: u64,
    #[serde(with = "decimal")]
    pub cost: u128,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamView {
    /// `flowing` while any of its requests is in the pool's stream, else `stopped`.
    pub state: &'static str,
    /// Its unfinished requests.
    pub requests: Vec<ActiveRequest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActiveRequest {
    pub request_id: String,
    pub pool: String,
    pub state: RequestState,
    #[serde(with = "decimal")]
    pub reserved: u128,
    /// Rail time (block timestamp, or the ledger's clock) when it started flowing.
    pub started_at_s: Option<i64>,
    /// When its reserved seconds run out (`started_at_s + max_seconds`).
    pub deadline_s: Option<i64>,
}

/// Serialises a `u128` as a decimal string (JSON numbers lose precision above 2^53).
mod decimal {
    pub fn serialize<S: serde::Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }
}

/// The session store. Cheap to clone (one shared connection).
#[derive(Clone)]
pub struct Sessions {
    store: Arc<Store>,
}

fn normalize_payer(payer: &str) -> Result<String, SessionError> {
    let hex_part = payer.strip_prefix("0x").or_else(|| payer.strip_prefix("0X"));
    match hex_part {
        Some(digits) if digits.len() == 40 && digits.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(format!("0x{}", digits.to_ascii_lowercase()))
        }
        _ => Err(SessionError::InvalidPayer(payer.chars().take(64).collect())),
    }
}

/// The payer's live session (not closed, not breached), or a new one in `quoted` with its secret.
fn live_or_new_session(tx: &rusqlite::Connection, payer: &str) -> Result<(String, Option<String>), SessionError> {
    let live: Option<String> = tx
        .query_row(
            "SELECT id FROM sessions WHERE payer = ?1 AND state IN ('quoted', 'paid', 'streaming', 'idle')
             ORDER BY created_at_s DESC LIMIT 1",
            params![payer],
            |row| row.get(0),
        )
        .optional()?;
    if let Some(id) = live {
        return Ok((id, None));
    }
    let id = format!("ps_{}", random_hex(16)?);
    let secret = random_hex(32)?;
    let now = now_s();
    tx.execute(
        "INSERT INTO sessions (id, payer, secret_sha256, state, balance, reserved, overdraft,
                               requests, seconds, cost, created_at_s, updated_at_s)
         VALUES (?1, ?2, ?3, 'quoted', '0', '0', '0', 0, 0, '0', ?4, ?4)",
        params![id, payer, hash_secret(&secret), now],
    )?;
    tracing::info!(session = %id, %payer, "payment session opened (quoted)");
    Ok((id, Some(secret)))
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

impl Sessions {
    /// Opens (or creates) the payments database at `path` (WAL). Its own file, apart from the
    /// orchestrator's store, so payments can be backed up and inspected alone.
    pub fn open(path: &Path) -> Result<Self, SessionError> {
        Ok(Self { store: Arc::new(Store::open(path)?) })
    }

    /// A private in-memory database (tests, `--payments` experiments).
    pub fn in_memory() -> Result<Self, SessionError> {
        Ok(Self { store: Arc::new(Store::in_memory()?) })
    }

    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Records the intent to settle a verified voucher worth `amount` from `payer`, keyed by
    /// `voucher_key` (use the EIP-3009 nonce with the token and payer: unique per voucher). Call it after
    /// the facilitator's `/verify` succeeded and before `/settle`. The credit goes to the payer's live
    /// session, or to a new one (`quoted`) whose secret is returned. Calling it again with the same
    /// voucher returns the same ticket (without the secret).
    pub fn begin_credit(&self, payer: &str, voucher_key: &str, amount: u128) -> Result<CreditTicket, SessionError> {
        let payer = normalize_payer(payer)?;
        if amount == 0 {
            return Err(SessionError::InvalidAmount("a voucher for zero credits nothing".into()));
        }
        if voucher_key.is_empty() || voucher_key.len() > 256 {
            return Err(SessionError::InvalidVoucherKey);
        }
        self.store.write(|tx| {
            let existing: Option<(String, String, String)> = tx
                .query_row(
                    "SELECT session_id, payer, amount FROM credits WHERE voucher_key = ?1",
                    params![voucher_key],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?;
            if let Some((session_id, known_payer, known_amount)) = existing {
                if known_payer != payer || parse_amount("credits.amount", &known_amount)? != amount {
                    return Err(SessionError::VoucherConflict { voucher_key: voucher_key.to_owned() });
                }
                return Ok(CreditTicket { session_id, voucher_key: voucher_key.to_owned(), secret: None });
            }
            let pending: u32 = tx.query_row(
                "SELECT COUNT(*) FROM credits WHERE payer = ?1 AND status = 'pending'",
                params![payer],
                |row| row.get(0),
            )?;
            if pending >= MAX_PENDING_CREDITS {
                return Err(SessionError::TooManyPending { payer: payer.clone() });
            }
            let (session_id, secret) = live_or_new_session(tx, &payer)?;
            let now = now_s();
            tx.execute(
                "INSERT INTO credits (voucher_key, session_id, payer, amount, status, created_at_s)
                 VALUES (?1, ?2, ?3, ?4, 'pending', ?5)",
                params![voucher_key, session_id, payer, amount.to_string(), now],
            )?;
            Ok(CreditTicket { session_id, voucher_key: voucher_key.to_owned(), secret })
        })
    }

    /// The voucher settled (`reference`: the settlement's transaction hash): credit its amount. Counts
    /// once per voucher: a repeated call returns the first outcome with `newly_credited: false`.
    pub fn complete_credit(&self, voucher_key: &str, reference: &str) -> Result<CreditOutcome, SessionError> {
        self.store.write(|tx| {
            let row: Option<(String, String, String)> = tx
                .query_row(
                    "SELECT session_id, amount, status FROM credits WHERE voucher_key = ?1",
                    params![voucher_key],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?;
            let (session_id, amount, status) = row.ok_or_else(|| SessionError::UnknownVoucher(voucher_key.to_owned()))?;
            let amount = parse_amount("credits.amount", &amount)?;
            match status.as_str() {
                "settled" => {
                    let balance = money(tx, &session_id)?.balance;
                    return Ok(CreditOutcome { session_id, amount, balance, newly_credited: false, secret: None });
                }
                "pending" => {}
                _ => return Err(SessionError::UnknownVoucher(voucher_key.to_owned())),
            }
            let mut state = session_state(tx, &session_id)?;
            let mut secret = None;
            let mut session_id = session_id;
            if !state.takes_credit() {
                // The session closed or breached while the voucher settled. The money arrived, so it is
                // credited to the payer's live session, or to one opened for it now.
                let payer: String =
                    tx.query_row("SELECT payer FROM sessions WHERE id = ?1", params![session_id], |row| row.get(0))?;
                let (live, new_secret) = live_or_new_session(tx, &payer)?;
                tracing::warn!(from = %session_id, to = %live, voucher_key, "voucher settled after its session ended; credited to the payer's live session");
                tx.execute("UPDATE credits SET session_id = ?2 WHERE voucher_key = ?1", params![voucher_key, live])?;
                session_id = live;
                secret = new_secret;
                state = session_state(tx, &session_id)?;
            }
            let mut funds = money(tx, &session_id)?;
            funds.balance = add(funds.balance, amount)?;
            set_money(tx, &session_id, funds)?;
            tx.execute(
                "UPDATE credits SET status = 'settled', reference = ?2, resolved_at_s = ?3 WHERE voucher_key = ?1",
                params![voucher_key, reference, now_s()],
            )?;
            if state == SessionState::Quoted {
                transition(tx, &session_id, SessionState::Paid, &format!("credit:{voucher_key}"), None)?;
            }
            tracing::info!(session = %session_id, amount = %amount, reference, "voucher credited");
            Ok(CreditOutcome { session_id, amount, balance: funds.balance, newly_credited: true, secret })
        })
    }

    /// The voucher did not settle: forget the pending credit. A `quoted` session left with nothing paid
    /// and nothing pending closes.
    pub fn fail_credit(&self, voucher_key: &str, reason: &str) -> Result<(), SessionError> {
        self.store.write(|tx| {
            let row: Option<(String, String)> = tx
                .query_row(
                    "SELECT session_id, status FROM credits WHERE voucher_key = ?1",
                    params![voucher_key],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            let (session_id, status) = row.ok_or_else(|| SessionError::UnknownVoucher(voucher_key.to_owned()))?;
            match status.as_str() {
                "failed" => return Ok(()),
                "settled" => return Err(SessionError::UnknownVoucher(voucher_key.to_owned())),
                _ => {}
            }
            tx.execute(
                "UPDATE credits SET status = 'failed', detail = ?2, resolved_at_s = ?3 WHERE voucher_key = ?1",
                params![voucher_key, reason, now_s()],
            )?;
            let others: u32 = tx.query_row(
                "SELECT COUNT(*) FROM credits WHERE session_id = ?1 AND status IN ('pending', 'settled')",
                params![session_id],
                |row| row.get(0),
            )?;
            if others == 0 && session_state(tx, &session_id)? == SessionState::Quoted {
                let note = format!("settlement failed: {reason}");
                transition(tx, &session_id, SessionState::Closed, &format!("credit-failed:{voucher_key}"), Some(&note))?;
            }
            tracing::warn!(session = %session_id, voucher_key, reason, "voucher settlement failed");
            Ok(())
        })
    }

    /// Vouchers whose settlement never got an answer recorded (see [`PendingCredit`]).
    pub fn pending_credits(&self) -> Result<Vec<PendingCredit>, SessionError> {
        let conn = self.store.conn();
        let mut stmt = conn.prepare(
            "SELECT voucher_key, session_id, payer, amount FROM credits WHERE status = 'pending' ORDER BY created_at_s",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, String>(2)?, row.get::<_, String>(3)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (voucher_key, session_id, payer, amount) = row?;
            out.push(PendingCredit { voucher_key, session_id, payer, amount: parse_amount("credits.amount", &amount)? });
        }
        Ok(out)
    }

    /// The payer's live (not closed, not breached) session, if any.
    pub fn live_session_of(&self, payer: &str) -> Result<Option<String>, SessionError> {
        let payer = normalize_payer(payer)?;
        Ok(self
            .store
            .conn()
            .query_row(
                "SELECT id FROM sessions WHERE payer = ?1 AND state IN ('quoted', 'paid', 'streaming', 'idle')
                 ORDER BY created_at_s DESC LIMIT 1",
                params![payer],
                |row| row.get(0),
            )
            .optional()?)
    }

    /// Checks the session's secret. Compares sha256 digests, so the comparison's timing reveals nothing
    /// usable about the secret. An unknown session is `Unauthorized` too (no probing for ids).
    pub fn authenticate(&self, session_id: &str, secret: &str) -> Result<(), SessionError> {
        let stored: Option<String> = self
            .store
            .conn()
            .query_row("SELECT secret_sha256 FROM sessions WHERE id = ?1", params![session_id], |row| row.get(0))
            .optional()?;
        match stored {
            Some(hash) if hash == hash_secret(secret) => Ok(()),
            _ => Err(SessionError::Unauthorized),
        }
    }

    /// Reserves the request's worst case (price × max seconds) against the session's free balance, or
    /// refuses with [`SessionError::Insufficient`]. Atomic: concurrent admissions cannot overdraw. The
    /// same request id admitted again with the same terms returns the first admission.
    pub fn admit(&self, request: &AdmitRequest) -> Result<Admission, SessionError> {
        if request.request_id.is_empty() || request.request_id.len() > 256 {
            return Err(SessionError::InvalidRequest("request id must be 1 to 256 characters".into()));
        }
        if request.max_seconds == 0 || request.max_seconds > i64::MAX as u64 {
            return Err(SessionError::InvalidRequest("max seconds must be at least 1".into()));
        }
        if request.price_per_s == 0 {
            return Err(SessionError::InvalidRequest("price per second must be positive".into()));
        }
        let needed = request.price_per_s.checked_mul(u128::from(request.max_seconds)).ok_or(SessionError::Overflow)?;
        self.store.write(|tx| {
            let existing: Option<(String, String, String)> = tx
                .query_row(
                    "SELECT session_id, pool, reserved FROM requests WHERE id = ?1",
                    params![request.request_id],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()?;
            if let Some((session_id, pool, reserved)) = existing {
                if session_id != request.session_id || pool != request.pool || parse_amount("requests.reserved", &reserved)? != needed {
                    return Err(SessionError::DuplicateRequest(request.request_id.clone()));
                }
                let funds = money(tx, &session_id)?;
                return Ok(Admission {
                    session_id,
                    request_id: request.request_id.clone(),
                    reserved: needed,
                    available: funds.balance.saturating_sub(funds.reserved),
                });
            }
            let state = session_state(tx, &request.session_id)?;
            if !state.admits() {
                return Err(SessionError::NotAdmitting { session_id: request.session_id.clone(), state });
            }
            let mut funds = money(tx, &request.session_id)?;
            let available = funds.balance.saturating_sub(funds.reserved);
            if needed > available {
                // Refused without writing: the rollback on drop leaves the database untouched.
                return Err(SessionError::Insufficient {
                    session_id: request.session_id.clone(),
                    needed,
                    available,
                    shortfall: needed - available,
                });
            }
            funds.reserved = add(funds.reserved, needed)?;
            set_money(tx, &request.session_id, funds)?;
            tx.execute(
                "INSERT INTO requests (id, session_id, pool, price_per_s, max_seconds, reserved, state, admitted_at_s)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'admitted', ?7)",
                params![
                    request.request_id,
                    request.session_id,
                    request.pool,
                    request.price_per_s.to_string(),
                    request.max_seconds as i64,
                    needed.to_string(),
                    now_s()
                ],
            )?;
            Ok(Admission {
                session_id: request.session_id.clone(),
                request_id: request.request_id.clone(),
                reserved: needed,
                available: available - needed,
            })
        })
    }

    /// Closes a session with nothing in flight (`paid`/`idle` → `closed`, or an operator closing a
    /// `breached` one). The remaining balance stays recorded; refunds are outside this crate.
    pub fn close(&self, session_id: &str, reason: &str) -> Result<SessionView, SessionError> {
        self.store.write(|tx| {
            let unfinished: u32 = tx.query_row(
                "SELECT COUNT(*) FROM requests WHERE session_id = ?1 AND state IN ('admitted', 'streaming', 'stopping')",
                params![session_id],
                |row| row.get(0),
            )?;
            let state = session_state(tx, session_id)?;
            if unfinished > 0 && state != SessionState::Breached {
                return Err(SessionError::IllegalTransition {
                    session_id: session_id.to_owned(),
                    from: state,
                    to: SessionState::Closed,
                });
            }
            transition(tx, session_id, SessionState::Closed, &format!("close:{session_id}"), Some(reason))?;
            Ok(())
        })?;
        self.view(session_id)
    }

    /// Balance, reservations, usage and stream state (`GET /sessions/{id}`; authenticate first).
    pub fn view(&self, session_id: &str) -> Result<SessionView, SessionError> {
        let conn = self.store.conn();
        type Row = (String, String, String, String, String, String, i64, i64, String, Option<String>, i64, i64);
        let row: Option<Row> = conn
            .query_row(
                "SELECT id, payer, state, balance, reserved, overdraft, requests, seconds, cost, note, created_at_s, updated_at_s
                 FROM sessions WHERE id = ?1",
                params![session_id],
                |r| {
                    Ok((
                        r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, r.get(7)?,
                        r.get(8)?, r.get(9)?, r.get(10)?, r.get(11)?,
                    ))
                },
            )
            .optional()?;
        let (id, payer, state, balance, reserved, overdraft, requests, seconds, cost, note, created_at_s, updated_at_s) =
            row.ok_or_else(|| SessionError::UnknownSession(session_id.to_owned()))?;
        let balance = parse_amount("balance", &balance)?;
        let reserved = parse_amount("reserved", &reserved)?;
        let mut stmt = conn.prepare(
            "SELECT id, pool, state, reserved, start_at_s, max_seconds FROM requests
             WHERE session_id = ?1 AND state IN ('admitted', 'streaming', 'stopping') ORDER BY admitted_at_s, id",
        )?;
        let rows = stmt.query_map(params![session_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut active = Vec::new();
        for row in rows {
            let (request_id, pool, state, reserved, started_at_s, max_seconds) = row?;
            active.push(ActiveRequest {
                request_id,
                pool,
                state: state.parse().map_err(SessionError::Corrupt)?,
                reserved: parse_amount("requests.reserved", &reserved)?,
                started_at_s,
                deadline_s: started_at_s.map(|s| s.saturating_add(max_seconds)),
            });
        }
        let flowing = active.iter().any(|r| matches!(r.state, RequestState::Streaming | RequestState::Stopping));
        Ok(SessionView {
            id,
            payer,
            state: state.parse().map_err(SessionError::Corrupt)?,
            balance,
            reserved,
            available: balance.saturating_sub(reserved),
            overdraft: parse_amount("overdraft", &overdraft)?,
            usage: Usage { requests: requests as u64, seconds: seconds as u64, cost: parse_amount("cost", &cost)? },
            stream: StreamView { state: if flowing { "flowing" } else { "stopped" }, requests: active },
            note,
            created_at_s,
            updated_at_s,
        })
    }
}

/// Funds of a session, for the meter's draws.
pub(crate) use store::Money as SessionMoney;
pub(crate) use store::{
    money as read_money, session_state as read_state, set_money as write_money, transition as write_transition,
};

#[cfg(test)]
mod tests;
