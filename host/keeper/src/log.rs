//! The durable transition log (SQLite, WAL): every transition is written before it is acted on, and
//! every attempt to act on it is written before it is made and again with its result. The driver
//! (`driver.rs`) reads it back after a crash; `GET /transitions` pages through it.
//!
//! States: `written` → `submitted` (the keeper accepted a run; its reference is known) → `acted` (the
//! keeper reports the run succeeded) → `recorded` (the pool's state machine applied the result); or
//! `failed` with a reason. Each statement commits on its own, so a crash loses at most the attempt
//! in flight, which is left without an outcome and read as interrupted on the next start.

use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::transition::{Transition, TransitionKind};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("transition log database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("no transition with id {0}")]
    NotFound(i64),
    #[error(
        "idempotency key {key:?} is already logged for a different transition ({existing}); a key names exactly one transition"
    )]
    KeyConflict { key: String, existing: String },
    #[error("transition {id} is {state}, cannot move it to {to}")]
    BadState { id: i64, state: TransitionState, to: TransitionState },
    #[error("invalid idempotency key {0:?}: 1 to 256 printable ASCII characters, no '#' (the log appends #<run> for retried runs)")]
    InvalidKey(String),
    #[error("corrupt transition log row {id}: {what}")]
    Corrupt { id: i64, what: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransitionState {
    Written,
    Submitted,
    Acted,
    Recorded,
    Failed,
}

impl TransitionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Submitted => "submitted",
            Self::Acted => "acted",
            Self::Recorded => "recorded",
            Self::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Self::Written, Self::Submitted, Self::Acted, Self::Recorded, Self::Failed].into_iter().find(|x| x.as_str() == s)
    }
    pub fn is_final(self) -> bool {
        matches!(self, Self::Recorded | Self::Failed)
    }
}

impl std::fmt::Display for TransitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an attempt asked the keeper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttemptAction {
    Submit,
    Lookup,
    Status,
    Record,
}

impl AttemptAction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Lookup => "lookup",
            Self::Status => "status",
            Self::Record => "record",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Self::Submit, Self::Lookup, Self::Status, Self::Record].into_iter().find(|x| x.as_str() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attempt {
    pub number: u32,
    /// The keeper run this attempt belongs to (1 for the first run; a failed run is followed by another).
    pub run: u32,
    pub action: AttemptAction,
    pub started_at_ms: u64,
    pub finished_at_ms: Option<u64>,
    /// `None` while in flight, and for good if the process died during it ("interrupted").
    pub outcome: Option<String>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransitionRecord {
    pub id: i64,
    pub kind: TransitionKind,
    pub idempotency_key: String,
    pub pool_id: String,
    pub payload: serde_json::Value,
    pub state: TransitionState,
    /// The current keeper run (1-based).
    pub run: u32,
    pub reference: Option<String>,
    /// What the keeper reported when it succeeded (transaction hashes), or why it failed.
    pub detail: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub attempts: Vec<Attempt>,
}

impl TransitionRecord {
    /// The transition as sent to the keeper for the current run: the first run carries the logged
    /// idempotency key; run n > 1 carries `<key>#<n>`, so a keeper that saw the failed run starts a new
    /// one instead of returning the failure.
    pub fn for_keeper(&self) -> Transition {
        Transition {
            kind: self.kind,
            idempotency_key: run_key(&self.idempotency_key, self.run),
            pool_id: self.pool_id.clone(),
            payload: self.payload.clone(),
        }
    }
}

pub fn run_key(key: &str, run: u32) -> String {
    if run <= 1 { key.to_owned() } else { format!("{key}#{run}") }
}

/// A page of `transitions(pool, page)`: newest first, `before` an id from the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Page {
    pub limit: u32,
    pub before: Option<i64>,
}

impl Page {
    pub const MAX_LIMIT: u32 = 200;
    pub fn first(limit: u32) -> Self {
        Self { limit, before: None }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TransitionPage {
    pub transitions: Vec<TransitionRecord>,
    /// Pass as `before` for the next (older) page; `None` at the end.
    pub next_before: Option<i64>,
}

pub struct TransitionLog {
    conn: Mutex<Connection>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    pool_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    run INTEGER NOT NULL DEFAULT 1,
    reference TEXT,
    detail TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_by_pool ON transitions (pool_id, id);
CREATE INDEX IF NOT EXISTS transitions_open ON transitions (state) WHERE state NOT IN ('recorded', 'failed');
CREATE TABLE IF NOT EXISTS attempts (
    transition_id INTEGER NOT NULL REFERENCES transitions (id),
    number INTEGER NOT NULL,
    run INTEGER NOT NULL,
    action TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER,
    outcome TEXT,
    detail TEXT,
    PRIMARY KEY (transition_id, number)
);
";

impl TransitionLog {
    /// Opens (creating if needed) the log at `path`, in WAL mode with full fsync on commit: a
    /// transition the log says is written survives a power cut.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (every statement is atomic).
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `transition` (state `written`) and returns its id. Writing the same transition again
    /// returns the first id; the same key with a different kind, pool or payload is refused.
    pub fn write(&self, transition: &Transition) -> Result<i64, LogError> {
        let key = &transition.idempotency_key;
        if key.is_empty() || key.len() > 256 || !key.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
            return Err(LogError::InvalidKey(key.clone()));
        }
        let conn = self.conn();
        let payload = transition.payload.to_string();
        let existing: Option<(i64, String, String, String)> = conn
            .query_row(
                "SELECT id, kind, pool_id, payload FROM transitions WHERE idempotency_key = ?1",
                [&transition.idempotency_key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        if let Some((id, kind, pool, existing_payload)) = existing {
            if kind == transition.kind.as_str() && pool == transition.pool_id && existing_payload == payload {
                return Ok(id);
            }
            return Err(LogError::KeyConflict {
                key: transition.idempotency_key.clone(),
                existing: format!("{kind} on pool {pool}"),
            });
        }
        let now = now_ms() as i64;
        conn.execute(
            "INSERT INTO transitions (idempotency_key, kind, pool_id, payload, state, created_at_ms, updated_at_ms)
             VALUES (?1, ?2, ?3, ?4, 'written', ?5, ?5)",
            params![transition.idempotency_key, transition.kind.as_str(), transition.pool_id, payload, now],
        )?;
        let id = conn.last_insert_rowid();
        tracing::debug!(id, key = %transition.idempotency_key, kind = %transition.kind, "transition written");
        Ok(id)
    }

    /// Records that an attempt is about to be made; returns its number. Written before the call, so
    /// an attempt without an outcome after a restart is one the process died in.
    pub fn begin_attempt(&self, id: i64, action: AttemptAction) -> Result<u32, LogError> {
        let conn = self.conn();
        let run: u32 = conn
            .query_row("SELECT run FROM transitions WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .ok_or(LogError::NotFound(id))?;
        let number: u32 = conn.query_row(
            "SELECT COALESCE(MAX(number), 0) + 1 FROM attempts WHERE transition_id = ?1",
            [id],
            |r| r.get(0),
        )?;
        conn.execute(
            "INSERT INTO attempts (transition_id, number, run, action, started_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, number, run, action.as_str(), now_ms() as i64],
        )?;
        Ok(number)
    }

    pub fn finish_attempt(&self, id: i64, number: u32, outcome: &str, detail: Option<&str>) -> Result<(), LogError> {
        self.conn().execute(
            "UPDATE attempts SET finished_at_ms = ?3, outcome = ?4, detail = ?5 WHERE transition_id = ?1 AND number = ?2",
            params![id, number, now_ms() as i64, outcome, detail],
        )?;
        Ok(())
    }

    /// Whether a `submit` of the current run was ever started: if so, the keeper may have the run
    /// even though the log has no reference for it.
    pub fn submit_started(&self, id: i64) -> Result<bool, LogError> {
        let conn = self.conn();
        let n: i64 = conn.query_row(
            "SELECT COUNT(*) FROM attempts a JOIN transitions t ON t.id = a.transition_id
             WHERE a.transition_id = ?1 AND a.action = 'submit' AND a.run = t.run",
            [id],
            |r| r.get(0),
        )?;
        Ok(n > 0)
    }

    /// Failed attempts (keeper unavailable, interrupted) of `action` in the current run since its last
    /// success, which sets the backoff.
    pub fn consecutive_failures(&self, id: i64) -> Result<u32, LogError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT a.outcome FROM attempts a JOIN transitions t ON t.id = a.transition_id
             WHERE a.transition_id = ?1 AND a.run = t.run ORDER BY a.number DESC",
        )?;
        let outcomes = stmt.query_map([id], |r| r.get::<_, Option<String>>(0))?;
        let mut n = 0;
        for outcome in outcomes {
            match outcome?.as_deref() {
                Some("unavailable") | None => n += 1,
                // A lookup that found no run is neither a failure nor progress.
                Some("none") => {}
                _ => break,
            }
        }
        Ok(n)
    }

    fn transition_state(conn: &Connection, id: i64) -> Result<TransitionState, LogError> {
        let s: String = conn
            .query_row("SELECT state FROM transitions WHERE id = ?1", [id], |r| r.get(0))
            .optional()?
            .ok_or(LogError::NotFound(id))?;
        TransitionState::parse(&s).ok_or_else(|| LogError::Corrupt { id, what: format!("state {s:?}") })
    }

    fn transit(
        &self,
        id: i64,
        from: &[TransitionState],
        to: TransitionState,
        set: &str,
        value: Option<&str>,
    ) -> Result<(), LogError> {
        let conn = self.conn();
        let state = Self::transition_state(&conn, id)?;
        if state == to {
            return Ok(());
        }
        if !from.contains(&state) {
            return Err(LogError::BadState { id, state, to });
        }
        let sql = format!("UPDATE transitions SET state = ?2, {set} = ?3, updated_at_ms = ?4 WHERE id = ?1");
        conn.execute(&sql, params![id, to.as_str(), value, now_ms() as i64])?;
        tracing::debug!(id, from = %state, to = %to, "transition state");
        Ok(())
    }

    pub fn mark_submitted(&self, id: i64, reference: &str) -> Result<(), LogError> {
        self.transit(id, &[TransitionState::Written], TransitionState::Submitted, "reference", Some(reference))
    }

    pub fn mark_acted(&self, id: i64, detail: &str) -> Result<(), LogError> {
        self.transit(id, &[TransitionState::Submitted], TransitionState::Acted, "detail", Some(detail))
    }

    pub fn mark_recorded(&self, id: i64) -> Result<(), LogError> {
        let conn = self.conn();
        let state = Self::transition_state(&conn, id)?;
        match state {
            TransitionState::Recorded => Ok(()),
            TransitionState::Acted => {
                conn.execute(
                    "UPDATE transitions SET state = 'recorded', updated_at_ms = ?2 WHERE id = ?1",
                    params![id, now_ms() as i64],
                )?;
                Ok(())
            }
            state => Err(LogError::BadState { id, state, to: TransitionState::Recorded }),
        }
    }

    pub fn mark_failed(&self, id: i64, reason: &str) -> Result<(), LogError> {
        self.transit(
            id,
            &[TransitionState::Written, TransitionState::Submitted],
            TransitionState::Failed,
            "detail",
            Some(reason),
        )
    }

    /// After a failed run: back to `written` with the next run number and no reference.
    pub fn start_next_run(&self, id: i64, failure: &str) -> Result<u32, LogError> {
        let conn = self.conn();
        let state = Self::transition_state(&conn, id)?;
        if state != TransitionState::Submitted {
            return Err(LogError::BadState { id, state, to: TransitionState::Written });
        }
        conn.execute(
            "UPDATE transitions SET state = 'written', run = run + 1, reference = NULL, detail = ?2, updated_at_ms = ?3
             WHERE id = ?1",
            params![id, failure, now_ms() as i64],
        )?;
        Ok(conn.query_row("SELECT run FROM transitions WHERE id = ?1", [id], |r| r.get(0))?)
    }

    pub fn get(&self, id: i64) -> Result<TransitionRecord, LogError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{SELECT_TRANSITION} WHERE id = ?1"))?;
        let row = stmt.query_row([id], raw_row).optional()?.ok_or(LogError::NotFound(id))?;
        record(&conn, row)
    }

    pub fn find_by_key(&self, key: &str) -> Result<Option<TransitionRecord>, LogError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!("{SELECT_TRANSITION} WHERE idempotency_key = ?1"))?;
        match stmt.query_row([key], raw_row).optional()? {
            Some(row) => Ok(Some(record(&conn, row)?)),
            None => Ok(None),
        }
    }

    /// Ids of the transitions not yet recorded or failed, oldest first: what a restart resumes.
    pub fn unfinished(&self) -> Result<Vec<i64>, LogError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT id FROM transitions WHERE state NOT IN ('recorded', 'failed') ORDER BY id")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<i64>, _>>()?;
        Ok(ids)
    }

    /// A page of a pool's transitions with their attempts, newest first (for `GET /transitions`).
    pub fn transitions(&self, pool_id: &str, page: Page) -> Result<TransitionPage, LogError> {
        let limit = page.limit.clamp(1, Page::MAX_LIMIT);
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{SELECT_TRANSITION} WHERE pool_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
        ))?;
        let rows = stmt
            .query_map(params![pool_id, page.before.unwrap_or(i64::MAX), limit + 1], raw_row)?
            .collect::<Result<Vec<_>, _>>()?;
        let more = rows.len() > limit as usize;
        let mut transitions = Vec::with_capacity(limit as usize);
        for row in rows.into_iter().take(limit as usize) {
            transitions.push(record(&conn, row)?);
        }
        let next_before = if more { transitions.last().map(|t| t.id) } else { None };
        Ok(TransitionPage { transitions, next_before })
    }
}

const SELECT_TRANSITION: &str = "SELECT id, kind, idempotency_key, pool_id, payload, state, run, reference, detail, \
                                 created_at_ms, updated_at_ms FROM transitions";

type RawRow = (i64, String, String, String, String, String, u32, Option<String>, Option<String>, i64, i64);

fn raw_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
    ))
}

fn record(conn: &Connection, row: RawRow) -> Result<TransitionRecord, LogError> {
    let (id, kind, key, pool_id, payload, state, run, reference, detail, created, updated) = row;
    let kind = kind.parse().map_err(|e| LogError::Corrupt { id, what: format!("{e}") })?;
    let payload =
        serde_json::from_str(&payload).map_err(|e| LogError::Corrupt { id, what: format!("payload: {e}") })?;
    let state = TransitionState::parse(&state).ok_or_else(|| LogError::Corrupt { id, what: format!("state {state:?}") })?;
    let mut stmt = conn.prepare(
        "SELECT number, run, action, started_at_ms, finished_at_ms, outcome, detail FROM attempts
         WHERE transition_id = ?1 ORDER BY number",
    )?;
    let attempts = stmt
        .query_map([id], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, u32>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })?
        .map(|row| {
            let (number, run, action, started, finished, outcome, detail) = row?;
            let action = AttemptAction::parse(&action)
                .ok_or_else(|| LogError::Corrupt { id, what: format!("attempt action {action:?}") })?;
            Ok(Attempt {
                number,
                run,
                action,
                started_at_ms: started as u64,
                finished_at_ms: finished.map(|f| f as u64),
                outcome,
                detail,
            })
        })
        .collect::<Result<Vec<_>, LogError>>()?;
    Ok(TransitionRecord {
        id,
        kind,
        idempotency_key: key,
        pool_id,
        payload,
        state,
        run,
        reference,
        detail,
        created_at_ms: created as u64,
        updated_at_ms: updated as u64,
        attempts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(key: &str, pool: &str) -> Transition {
        Transition {
            kind: TransitionKind::StreamStart,
            idempotency_key: key.into(),
            pool_id: pool.into(),
            payload: serde_json::json!({"flowRate": "100"}),
        }
    }

    #[test]
    fn write_is_idempotent_and_refuses_a_reused_key() {
        let dir = tempfile::tempdir().unwrap();
        let log = TransitionLog::open(&dir.path().join("keeper.db")).unwrap();
        let a = log.write(&transition("k1", "p")).unwrap();
        assert_eq!(log.write(&transition("k1", "p")).unwrap(), a);
        let mut other = transition("k1", "p");
        other.payload = serde_json::json!({"flowRate": "200"});
        assert!(matches!(log.write(&other), Err(LogError::KeyConflict { .. })));
        for bad in ["", "a#2", "with space", &"x".repeat(257)] {
            assert!(matches!(log.write(&transition(bad, "p")), Err(LogError::InvalidKey(_))), "{bad:?}");
        }
        assert_eq!(log.get(a).unwrap().state, TransitionState::Written);
    }

    #[test]
    fn states_only_move_forward() {
        let dir = tempfile::tempdir().unwrap();
        let log = TransitionLog::open(&dir.path().join("keeper.db")).unwrap();
        let id = log.write(&transition("k", "p")).unwrap();
        assert!(matches!(log.mark_acted(id, "x"), Err(LogError::BadState { .. })));
        assert!(matches!(log.mark_recorded(id), Err(LogError::BadState { .. })));
        log.mark_submitted(id, "run-1").unwrap();
        log.mark_acted(id, "0xabc").unwrap();
        log.mark_recorded(id).unwrap();
        assert!(matches!(log.mark_failed(id, "late"), Err(LogError::BadState { .. })));
        let r = log.get(id).unwrap();
        assert_eq!((r.state, r.reference.as_deref(), r.detail.as_deref()), (TransitionState::Recorded, Some("run-1"), Some("0xabc")));
        assert!(log.unfinished().unwrap().is_empty());
    }

    #[test]
    fn survives_reopen_and_pages_newest_first_per_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.db");
        {
            let log = TransitionLog::open(&path).unwrap();
            for i in 0..5 {
                log.write(&transition(&format!("a{i}"), "pool-a")).unwrap();
                log.write(&transition(&format!("b{i}"), "pool-b")).unwrap();
            }
            let id = log.find_by_key("a0").unwrap().unwrap().id;
            let n = log.begin_attempt(id, AttemptAction::Submit).unwrap();
            log.finish_attempt(id, n, "unavailable", Some("connection refused")).unwrap();
        }
        let log = TransitionLog::open(&path).unwrap();
        let first = log.transitions("pool-a", Page::first(2)).unwrap();
        let keys: Vec<_> = first.transitions.iter().map(|t| t.idempotency_key.as_str()).collect();
        assert_eq!(keys, ["a4", "a3"]);
        let second = log.transitions("pool-a", Page { limit: 2, before: first.next_before }).unwrap();
        let third = log.transitions("pool-a", Page { limit: 2, before: second.next_before }).unwrap();
        assert_eq!(third.transitions.len(), 1);
        assert_eq!(third.next_before, None);
        let a0 = &third.transitions[0];
        assert_eq!(a0.idempotency_key, "a0");
        assert_eq!(a0.attempts.len(), 1);
        assert_eq!(a0.attempts[0].outcome.as_deref(), Some("unavailable"));
        assert_eq!(log.unfinished().unwrap().len(), 10);
    }

    #[test]
    fn a_failed_run_is_followed_by_a_run_with_its_own_key() {
        let dir = tempfile::tempdir().unwrap();
        let log = TransitionLog::open(&dir.path().join("keeper.db")).unwrap();
        let id = log.write(&transition("k", "p")).unwrap();
        assert_eq!(log.get(id).unwrap().for_keeper().idempotency_key, "k");
        log.mark_submitted(id, "run-1").unwrap();
        assert_eq!(log.start_next_run(id, "reverted").unwrap(), 2);
        let r = log.get(id).unwrap();
        assert_eq!((r.state, r.reference.clone()), (TransitionState::Written, None));
        assert_eq!(r.for_keeper().idempotency_key, "k#2");
        assert!(!log.submit_started(id).unwrap());
    }
}
