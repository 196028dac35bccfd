//! The payments database: SQLite in WAL mode, its own file (the orchestrator passes the path, e.g.
//! `state/payments.db`). One connection behind a mutex; every multi-row change is one `BEGIN IMMEDIATE`
//! transaction, so two admissions (even from two processes on the same file) cannot both see the same
//! free balance.
//!
//! Amounts are `u128` atomic units stored as decimal TEXT (SQLite integers stop at i64); a stored amount
//! that does not parse is a [`SessionError::Corrupt`], never a zero.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::SessionError;
use super::state::SessionState;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
-- One row per session; a row exists only once a verified voucher is being settled (never per 402).
CREATE TABLE IF NOT EXISTS sessions (
    id             TEXT PRIMARY KEY,
    payer          TEXT NOT NULL,          -- lower-case 0x address
    secret_sha256  TEXT NOT NULL,          -- hex sha256 of the secret handed out at open
    state          TEXT NOT NULL,
    balance        TEXT NOT NULL,          -- credited minus drawn (reservations included)
    reserved       TEXT NOT NULL,          -- worst cases of admitted, unfinished requests
    overdraft      TEXT NOT NULL,          -- drawn beyond the balance (a stop that came late)
    requests       INTEGER NOT NULL,       -- finished requests
    seconds        INTEGER NOT NULL,       -- seconds streamed by finished requests
    cost           TEXT NOT NULL,          -- drawn by finished requests
    created_at_s   INTEGER NOT NULL,
    updated_at_s   INTEGER NOT NULL,
    note           TEXT                    -- why it closed or breached
);
CREATE INDEX IF NOT EXISTS sessions_by_payer ON sessions (payer, state);
-- One row per voucher (its idempotency key): pending while the facilitator settles, then settled or failed.
CREATE TABLE IF NOT EXISTS credits (
    voucher_key    TEXT PRIMARY KEY,
    session_id     TEXT NOT NULL,
    payer          TEXT NOT NULL,
    amount         TEXT NOT NULL,
    status         TEXT NOT NULL,          -- pending | settled | failed
    reference      TEXT,                   -- the settlement's transaction hash
    detail         TEXT,
    created_at_s   INTEGER NOT NULL,
    resolved_at_s  INTEGER
);
CREATE INDEX IF NOT EXISTS credits_by_session ON credits (session_id, status);
-- Every session state change, keyed by what caused it (a retried cause writes nothing twice).
CREATE TABLE IF NOT EXISTS transitions (
    idempotency_key  TEXT PRIMARY KEY,
    session_id       TEXT NOT NULL,
    from_state       TEXT NOT NULL,
    to_state         TEXT NOT NULL,
    at_s             INTEGER NOT NULL
);
-- One row per admitted request.
CREATE TABLE IF NOT EXISTS requests (
    id               TEXT PRIMARY KEY,
    session_id       TEXT NOT NULL,
    pool             TEXT NOT NULL,
    price_per_s      TEXT NOT NULL,
    max_seconds      INTEGER NOT NULL,
    reserved         TEXT NOT NULL,
    state            TEXT NOT NULL,        -- admitted | streaming | stopping | ended | failed
    final_state      TEXT,                 -- while stopping: ended or failed
    start_requested  INTEGER NOT NULL DEFAULT 0,  -- its first token is ready: the next change adds it
    start_key        TEXT,                 -- the flow change that added it
    start_reference  TEXT,
    start_at_s       INTEGER,
    stop_key         TEXT,                 -- the flow change that removed it
    stop_reference   TEXT,
    stop_at_s        INTEGER,
    seconds          INTEGER,
    cost             TEXT,
    end_reason       TEXT,
    admitted_at_s    INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_by_session ON requests (session_id, state);
CREATE INDEX IF NOT EXISTS requests_by_pool ON requests (pool, state);
-- The meter's journal: every rate change of a pool's flow, written before the rail is called (intent)
-- and completed with the rail's receipt (result). A row without a result is a change whose outcome is
-- unknown; it is resolved by calling the rail again with the same key before anything else on that pool.
CREATE TABLE IF NOT EXISTS flow_changes (
    idempotency_key  TEXT PRIMARY KEY,
    pool             TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    change           TEXT NOT NULL,        -- the FlowChange as JSON
    active           TEXT NOT NULL,        -- JSON array: the request ids flowing once it takes effect
    price_per_s      TEXT NOT NULL,
    intent_at_s      INTEGER NOT NULL,
    reference        TEXT,
    effective_at_s   INTEGER,
    flow_rate_per_s  TEXT,
    result_at_s      INTEGER,
    UNIQUE (pool, seq)
);
";

/// The database handle shared by [`super::Sessions`] and the meter.
pub(crate) struct Store {
    conn: Mutex<Connection>,
    /// Random per database file, set at creation: prefixes the meter's idempotency keys so a fresh
    /// database never reuses a key a rail already answered for another one.
    epoch: String,
}

impl Store {
    pub(crate) fn open(path: &Path) -> Result<Self, SessionError> {
        Self::init(Connection::open(path)?)
    }

    pub(crate) fn in_memory() -> Result<Self, SessionError> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> Result<Self, SessionError> {
        // WAL: readers never block the writer; a crash loses at most the transaction in flight.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        // FULL, not NORMAL: a committed intent must survive a power cut, or a rail effect could repeat
        // under a key the store forgot. Writes are one per paid event, so the fsync is affordable.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        let epoch: Option<String> =
            conn.query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |row| row.get(0)).optional()?;
        let epoch = match epoch {
            Some(epoch) => epoch,
            None => {
                let epoch = random_hex(8)?;
                conn.execute("INSERT INTO meta (key, value) VALUES ('epoch', ?1)", params![epoch])?;
                epoch
            }
        };
        Ok(Self { conn: Mutex::new(conn), epoch })
    }

    pub(crate) fn epoch(&self) -> &str {
        &self.epoch
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the database half-written (transactions are
        // atomic and roll back on drop), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `work` in one IMMEDIATE transaction (the write lock is taken at BEGIN, so read-then-write
    /// sequences such as admission cannot interleave), committing only if it returns `Ok`.
    pub(crate) fn write<T>(
        &self,
        work: impl FnOnce(&Transaction<'_>) -> Result<T, SessionError>,
    ) -> Result<T, SessionError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let value = work(&tx)?;
        tx.commit()?;
        Ok(value)
    }
}

pub(crate) fn now_s() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

pub(crate) fn random_hex(bytes: usize) -> Result<String, SessionError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| SessionError::Randomness(e.to_string()))?;
    Ok(hex::encode(buf))
}

pub(crate) fn parse_amount(column: &str, text: &str) -> Result<u128, SessionError> {
    text.parse::<u128>()
        .map_err(|_| SessionError::Corrupt(format!("{column} = {text:?} is not an amount")))
}

pub(crate) fn add(a: u128, b: u128) -> Result<u128, SessionError> {
    a.checked_add(b).ok_or(SessionError::Overflow)
}

/// A session's money columns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Money {
    pub balance: u128,
    pub reserved: u128,
    pub overdraft: u128,
}

pub(crate) fn session_state(tx: &Connection, session_id: &str) -> Result<SessionState, SessionError> {
    let state: Option<String> = tx
        .query_row("SELECT state FROM sessions WHERE id = ?1", params![session_id], |row| row.get(0))
        .optional()?;
    let state = state.ok_or_else(|| SessionError::UnknownSession(session_id.to_owned()))?;
    state.parse().map_err(SessionError::Corrupt)
}

pub(crate) fn money(tx: &Connection, session_id: &str) -> Result<Money, SessionError> {
    let row: Option<(String, String, String)> = tx
        .query_row(
            "SELECT balance, reserved, overdraft FROM sessions WHERE id = ?1",
            params![session_id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()?;
    let (balance, reserved, overdraft) = row.ok_or_else(|| SessionError::UnknownSession(session_id.to_owned()))?;
    Ok(Money {
        balance: parse_amount("balance", &balance)?,
        reserved: parse_amount("reserved", &reserved)?,
        overdraft: parse_amount("overdraft", &overdraft)?,
    })
}

pub(crate) fn set_money(tx: &Connection, session_id: &str, money: Money) -> Result<(), SessionError> {
    tx.execute(
        "UPDATE sessions SET balance = ?2, reserved = ?3, overdraft = ?4, updated_at_s = ?5 WHERE id = ?1",
        params![
            session_id,
            money.balance.to_string(),
            money.reserved.to_string(),
            money.overdraft.to_string(),
            now_s()
        ],
    )?;
    Ok(())
}

/// Moves a session to `to`, checked against the state machine, and journals it under `key`. The same
/// key applied twice is a no-op the second time (a retried cause), which returns the current state.
pub(crate) fn transition(
    tx: &Connection,
    session_id: &str,
    to: SessionState,
    key: &str,
    note: Option<&str>,
) -> Result<SessionState, SessionError> {
    let from = session_state(tx, session_id)?;
    let seen: Option<String> = tx
        .query_row("SELECT to_state FROM transitions WHERE idempotency_key = ?1", params![key], |row| row.get(0))
        .optional()?;
    if seen.is_some() {
        return Ok(from);
    }
    if !from.can_become(to) {
        return Err(SessionError::IllegalTransition { session_id: session_id.to_owned(), from, to });
    }
    let now = now_s();
    tx.execute(
        "INSERT INTO transitions (idempotency_key, session_id, from_state, to_state, at_s) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![key, session_id, from.as_str(), to.as_str(), now],
    )?;
    tx.execute(
        "UPDATE sessions SET state = ?2, updated_at_s = ?3, note = COALESCE(?4, note) WHERE id = ?1",
        params![session_id, to.as_str(), now, note],
    )?;
    tracing::debug!(session = session_id, %from, %to, key, "session transition");
    Ok(to)
}
