//! Durable state in SQLite (WAL): the pools this orchestrator serves, the workers that registered (and
//! those ejected), every request with its usage, and the output audits with their evidence. A restarted orchestrator reads its pools and workers back from here. Secrets never go in: a pool row holds the
//! topology (public peer ids and addresses), not the orchestrator's key.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use computepool_axl::transport::Topology;

use super::payments::config::PoolPayments;
use super::pools::RouteLeg;
use super::workers::{Ejection, WorkerRecord, WorkerStats};
use rusqlite::{Connection, params};

/// A registered pool, as stored.
#[derive(Debug, Clone)]
pub struct PoolRecord {
    pub id: String,
    /// The model name clients ask for (`model` in OpenAI requests).
    pub model: String,
    /// The model's Hugging Face layout directory (config, tokenizer, chat template).
    pub model_dir: PathBuf,
    pub topology: Topology,
    /// More pipelines of the same model (failover and load spreading).
    pub replicas: Vec<Topology>,
    /// Unix seconds.
    pub created_at: i64,
}

/// One concluded output audit, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub pool_id: String,
    /// The user's request that was audited.
    pub request_id: String,
    /// Unix milliseconds when it concluded.
    pub at_ms: i64,
    /// `agreed`, `convicted` or `inconclusive`.
    pub outcome: String,
    /// The evidence JSON (the schema in `audits.rs`).
    pub evidence: String,
    /// The breach reports it made, a JSON array (empty unless convicted).
    pub reports: String,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Stop,
    Length,
    Error,
    /// The client went away first.
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
        }
    }
}

/// One request and its usage.
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub id: String,
    pub pool_id: String,
    pub model: String,
    /// `chat.completions` or `completions`.
    pub endpoint: &'static str,
    pub stream: bool,
    /// Unix milliseconds.
    pub started_at_ms: i64,
    pub prompt_tokens: Option<usize>,
    pub completion_tokens: usize,
    pub time_to_first_token_ms: Option<f64>,
    pub duration_ms: f64,
    pub outcome: Outcome,
    pub error: Option<String>,
    /// Every route the request was sent on, in order (a failover or a route that failed before the
    /// first token adds one); empty when none took it. Stored as JSON in the `routes` column.
    pub routes: Vec<RouteLeg>,
}

/// The topology column: the topology alone (as before replicas existed), or an array with the replicas.
fn topologies_json(pool: &PoolRecord) -> String {
    if pool.replicas.is_empty() {
        return pool.topology.to_json();
    }
    let all: Vec<serde_json::Value> = std::iter::once(&pool.topology)
        .chain(&pool.replicas)
        .map(|t| serde_json::from_str(&t.to_json()).expect("a topology serialises to JSON"))
        .collect();
    serde_json::Value::Array(all).to_string()
}

/// The database. One connection behind a mutex: writes are a row per request, far below SQLite's limits.
pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS pools (
    id          TEXT PRIMARY KEY,
    model       TEXT NOT NULL UNIQUE,
    model_dir   TEXT NOT NULL,
    topology    TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id                      TEXT PRIMARY KEY,
    pool_id                 TEXT NOT NULL,
    model                   TEXT NOT NULL,
    endpoint                TEXT NOT NULL,
    stream                  INTEGER NOT NULL,
    started_at_ms           INTEGER NOT NULL,
    prompt_tokens           INTEGER,
    completion_tokens       INTEGER NOT NULL,
    time_to_first_token_ms  REAL,
    duration_ms             REAL NOT NULL,
    outcome                 TEXT NOT NULL,
    error                   TEXT,
    routes                  TEXT
);
CREATE INDEX IF NOT EXISTS requests_by_pool ON requests (pool_id, started_at_ms);
CREATE TABLE IF NOT EXISTS pool_payments (
    pool_id     TEXT PRIMARY KEY,
    settings    TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS pending_vouchers (
    voucher_key  TEXT PRIMARY KEY,
    rail         TEXT NOT NULL,
    config       TEXT NOT NULL,
    payment      TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    peer              TEXT PRIMARY KEY,
    registration      TEXT NOT NULL,
    registered_at_ms  INTEGER NOT NULL,
    last_seen_ms      INTEGER NOT NULL,
    stats             TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS ejections (
    peer           TEXT PRIMARY KEY,
    reason         TEXT NOT NULL,
    ejected_at_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audits (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    pool_id      TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    at_ms        INTEGER NOT NULL,
    outcome      TEXT NOT NULL,
    evidence     TEXT NOT NULL,
    reports      TEXT NOT NULL
);
";

/// Brings a database made by an older orchestrator up to [`SCHEMA`]: `CREATE TABLE IF NOT EXISTS` leaves
/// an existing table as it was, so the columns added since are added here (their old rows get NULL).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_column = |table: &str, column: &str| -> rusqlite::Result<bool> {
        let mut stmt = conn.prepare(&format!("SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"))?;
        stmt.exists([column])
    };
    // The routes a request took (session 8).
    if !has_column("requests", "routes")? {
        conn.execute_batch("ALTER TABLE requests ADD COLUMN routes TEXT")?;
    }
    Ok(())
}

/// The routes column: a JSON array of [`RouteLeg`]s, NULL when no route took the request.
fn routes_json(routes: &[RouteLeg]) -> Option<String> {
    // A list of plain fields always serialises.
    (!routes.is_empty()).then(|| serde_json::to_string(routes).expect("route legs serialise to JSON"))
}

impl Store {
    /// Opens (or creates) the database at `path` in WAL mode.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn)
    }

    /// A private in-memory database (tests).
    #[cfg(test)]
    pub fn in_memory() -> rusqlite::Result<Self> {
        Self::init(Connection::open_in_memory()?)
    }

    fn init(conn: Connection) -> rusqlite::Result<Self> {
        // WAL: readers never block the writer, and a crash loses at most the transaction in flight.
        let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the connection half-written (SQLite transactions
        // are atomic), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every stored pool. A row whose topology no longer parses is an error, not skipped silently.
    pub fn pools(&self) -> rusqlite::Result<Vec<PoolRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, model, model_dir, topology, created_at FROM pools ORDER BY created_at, id")?;
        let rows = stmt.query_map([], |row| {
            // One topology object, or (with replicas) an array of them, the pool's own first.
            let text: String = row.get(3)?;
            let bad = |e: String| rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, e.into());
            let mut topologies = if text.trim_start().starts_with('[') {
                let values: Vec<serde_json::Value> = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
                values
                    .iter()
                    .map(|v| Topology::from_json(&v.to_string()).map_err(|e| bad(e.to_string())))
                    .collect::<rusqlite::Result<Vec<_>>>()?
            } else {
                vec![Topology::from_json(&text).map_err(|e| bad(e.to_string()))?]
            };
            if topologies.is_empty() {
                return Err(bad("no topology".into()));
            }
            let topology = topologies.remove(0);
            Ok(PoolRecord {
                id: row.get(0)?,
                model: row.get(1)?,
                model_dir: PathBuf::from(row.get::<_, String>(2)?),
                topology,
                replicas: topologies,
                created_at: row.get(4)?,
            })
        })?;
        rows.collect()
    }

    /// Stores a pool; with `replace`, a pool with the same id or model is replaced.
    pub fn put_pool(&self, pool: &PoolRecord, replace: bool) -> rusqlite::Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        if replace {
            tx.execute("DELETE FROM pools WHERE id = ?1 OR model = ?2", params![pool.id, pool.model])?;
        }
        tx.execute(
            "INSERT INTO pools (id, model, model_dir, topology, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![pool.id, pool.model, pool.model_dir.to_string_lossy(), topologies_json(pool), pool.created_at],
        )?;
        tx.commit()
    }

    /// Every stored worker.
    pub fn workers(&self) -> rusqlite::Result<Vec<WorkerRecord>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT registration, registered_at_ms, last_seen_ms, stats FROM workers ORDER BY peer")?;
        let json_column = |i: usize, text: String| -> rusqlite::Result<serde_json::Value> {
            serde_json::from_str(&text)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e)))
        };
        let rows = stmt.query_map([], |row| {
            let registration = serde_json::from_value(json_column(0, row.get(0)?)?)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))?;
            let stats = serde_json::from_value(json_column(3, row.get(3)?)?)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, Box::new(e)))?;
            Ok(WorkerRecord { registration, registered_at_ms: row.get(1)?, last_seen_ms: row.get(2)?, stats })
        })?;
        rows.collect()
    }

    /// Every paid pool's payment settings (`PUT /pools/{id}/payments`).
    pub fn pool_payments(&self) -> rusqlite::Result<Vec<(String, PoolPayments)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT pool_id, settings FROM pool_payments ORDER BY pool_id")?;
        let rows = stmt.query_map([], |row| {
            let text: String = row.get(1)?;
            let settings = serde_json::from_str(&text)
                .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e)))?;
            Ok((row.get(0)?, settings))
        })?;
        rows.collect()
    }

    /// Records a verified voucher about to be settled (the rail, its config and the verified payment as
    /// JSON), so a restart can finish what it started.
    pub fn put_pending_voucher(&self, key: &str, rail: &str, config: &str, payment: &str) -> rusqlite::Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        self.conn().execute(
            "INSERT OR REPLACE INTO pending_vouchers (voucher_key, rail, config, payment, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![key, rail, config, payment, now],
        )?;
        Ok(())
    }

    /// A voucher recorded by [`put_pending_voucher`](Self::put_pending_voucher): (rail, config, payment).
    pub fn pending_voucher(&self, key: &str) -> rusqlite::Result<Option<(String, String, String)>> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row("SELECT rail, config, payment FROM pending_vouchers WHERE voucher_key = ?1", params![key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()
    }

    /// Forgets a voucher whose settlement is resolved (credited or refused).
    pub fn forget_pending_voucher(&self, key: &str) -> rusqlite::Result<()> {
        self.conn().execute("DELETE FROM pending_vouchers WHERE voucher_key = ?1", params![key])?;
        Ok(())
    }

    /// Stores a pool's payment settings, replacing what it had.
    pub fn put_pool_payments(&self, pool_id: &str, settings: &PoolPayments) -> rusqlite::Result<()> {
        let text = serde_json::to_string(settings).expect("settings serialise");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        self.conn().execute(
            "INSERT OR REPLACE INTO pool_payments (pool_id, settings, updated_at) VALUES (?1, ?2, ?3)",
            params![pool_id, text, now],
        )?;
        Ok(())
    }

    /// Stores a worker's registration (replacing an earlier one of the same peer).
    pub fn put_worker(&self, w: &WorkerRecord) -> rusqlite::Result<()> {
        let registration = serde_json::to_string(&w.registration).expect("registrations serialise");
        let stats = serde_json::to_string(&w.stats).expect("stats serialise");
        self.conn().execute(
            "INSERT OR REPLACE INTO workers (peer, registration, registered_at_ms, last_seen_ms, stats)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![w.registration.peer, registration, w.registered_at_ms, w.last_seen_ms, stats],
        )?;
        Ok(())
    }

    /// Records a heartbeat.
    pub fn touch_worker(&self, peer: &str, last_seen_ms: i64, stats: &WorkerStats) -> rusqlite::Result<()> {
        let stats = serde_json::to_string(stats).expect("stats serialise");
        self.conn().execute(
            "UPDATE workers SET last_seen_ms = ?2, stats = ?3 WHERE peer = ?1",
            params![peer, last_seen_ms, stats],
        )?;
        Ok(())
    }

    /// Stores an ejection (the first one of a peer stays).
    pub fn put_ejection(&self, peer: &str, ejection: &Ejection) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO ejections (peer, reason, ejected_at_ms) VALUES (?1, ?2, ?3)",
            params![peer, ejection.reason, ejection.ejected_at_ms],
        )?;
        Ok(())
    }

    /// Every stored ejection, by peer.
    pub fn ejections(&self) -> rusqlite::Result<Vec<(String, Ejection)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT peer, reason, ejected_at_ms FROM ejections ORDER BY peer")?;
        let rows = stmt.query_map([], |row| Ok((row.get(0)?, Ejection { reason: row.get(1)?, ejected_at_ms: row.get(2)? })))?;
        rows.collect()
    }

    /// Records a concluded output audit: its outcome, its evidence (JSON text, as the reports carry it)
    /// and the breach reports it made (a JSON array).
    pub fn record_audit(&self, audit: &AuditRecord) -> rusqlite::Result<i64> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO audits (pool_id, request_id, at_ms, outcome, evidence, reports) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![audit.pool_id, audit.request_id, audit.at_ms, audit.outcome, audit.evidence, audit.reports],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// The latest `limit` audits, newest first.
    pub fn audits(&self, limit: usize) -> rusqlite::Result<Vec<(i64, AuditRecord)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, pool_id, request_id, at_ms, outcome, evidence, reports FROM audits ORDER BY id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |row| {
            let record = AuditRecord {
                pool_id: row.get(1)?,
                request_id: row.get(2)?,
                at_ms: row.get(3)?,
                outcome: row.get(4)?,
                evidence: row.get(5)?,
                reports: row.get(6)?,
            };
            Ok((row.get(0)?, record))
        })?;
        rows.collect()
    }

    /// Records a finished (or failed, or cancelled) request.
    pub fn record_request(&self, r: &RequestRecord) -> rusqlite::Result<()> {
        self.conn().execute(
            "INSERT OR REPLACE INTO requests (id, pool_id, model, endpoint, stream, started_at_ms, prompt_tokens,
                completion_tokens, time_to_first_token_ms, duration_ms, outcome, error, routes)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                r.id,
                r.pool_id,
                r.model,
                r.endpoint,
                r.stream,
                r.started_at_ms,
                r.prompt_tokens.map(|n| n as i64),
                r.completion_tokens as i64,
                r.time_to_first_token_ms,
                r.duration_ms,
                r.outcome.as_str(),
                r.error,
                routes_json(&r.routes),
            ],
        )?;
        Ok(())
    }

    /// The routes column of one request, if recorded.
    #[cfg(test)]
    pub fn request_routes(&self, id: &str) -> rusqlite::Result<Option<Option<String>>> {
        use rusqlite::OptionalExtension;
        self.conn().query_row("SELECT routes FROM requests WHERE id = ?1", [id], |row| row.get(0)).optional()
    }

    /// The outcome and token counts of one request, if recorded.
    #[cfg(test)]
    pub fn request_usage(&self, id: &str) -> rusqlite::Result<Option<(String, Option<i64>, i64)>> {
        use rusqlite::OptionalExtension;
        self.conn()
            .query_row("SELECT outcome, prompt_tokens, completion_tokens FROM requests WHERE id = ?1", [id], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .optional()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology() -> Topology {
        let shard = |s, e| {
            let key = computepool_axl::transport::SecretKey::generate();
            computepool_axl::transport::ShardPeer {
                peer: key.public(),
                layers: computepool_axl::transport::Layers { start: s, end: e },
                addrs: vec!["127.0.0.1:4000".parse().expect("address")],
                relay: None,
            }
        };
        Topology { num_layers: 4, shards: vec![shard(0, 2), shard(2, 4)], clients: vec![] }
    }

    #[test]
    fn pools_round_trip_and_conflict_unless_replaced() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        let pool = PoolRecord {
            id: "p1".into(),
            model: "m".into(),
            model_dir: "/models/m".into(),
            topology: topology(),
            replicas: vec![],
            created_at: 7,
        };
        {
            let store = Store::open(&path).expect("opens");
            store.put_pool(&pool, false).expect("stores");
            assert!(store.put_pool(&pool, false).is_err(), "the same id twice is refused");
            store.put_pool(&pool, true).expect("replaces");
        }
        let store = Store::open(&path).expect("reopens");
        let pools = store.pools().expect("reads");
        assert_eq!(pools.len(), 1);
        assert_eq!(pools[0].topology, pool.topology);
        assert_eq!(pools[0].model_dir, PathBuf::from("/models/m"));
        assert!(pools[0].replicas.is_empty());
        let with_replicas = PoolRecord { id: "p2".into(), model: "m2".into(), replicas: vec![topology(), topology()], ..pool.clone() };
        store.put_pool(&with_replicas, false).expect("stores");
        let back = store.pools().expect("reads").into_iter().find(|p| p.id == "p2").expect("stored");
        assert_eq!((back.topology, back.replicas), (with_replicas.topology, with_replicas.replicas));
        let mode: String = store.conn().query_row("PRAGMA journal_mode", [], |r| r.get(0)).expect("mode");
        assert_eq!(mode, "wal");
    }

    #[test]
    fn requests_are_recorded_with_usage() {
        let store = Store::in_memory().expect("opens");
        let record = RequestRecord {
            id: "chatcmpl-1".into(),
            pool_id: "p1".into(),
            model: "m".into(),
            endpoint: "chat.completions",
            stream: true,
            started_at_ms: 1,
            prompt_tokens: Some(12),
            completion_tokens: 5,
            time_to_first_token_ms: Some(3.5),
            duration_ms: 9.0,
            outcome: Outcome::Length,
            error: None,
            routes: vec![
                RouteLeg { route: 0, workers: vec!["a".into(), "b".into()], from_token: 0, broke: Some("b died".into()) },
                RouteLeg { route: 1, workers: vec!["c".into(), "d".into()], from_token: 3, broke: None },
            ],
        };
        store.record_request(&record).expect("records");
        assert_eq!(store.request_usage("chatcmpl-1").expect("reads"), Some(("length".into(), Some(12), 5)));
        assert_eq!(store.request_usage("nope").expect("reads"), None);
        let routes = store.request_routes("chatcmpl-1").expect("reads").flatten().expect("routes stored");
        let routes: serde_json::Value = serde_json::from_str(&routes).expect("JSON");
        assert_eq!(
            routes,
            serde_json::json!([
                {"route": 0, "workers": ["a", "b"], "from_token": 0, "broke": "b died"},
                {"route": 1, "workers": ["c", "d"], "from_token": 3}
            ])
        );
        let unrouted = RequestRecord { id: "chatcmpl-2".into(), routes: vec![], outcome: Outcome::Error, ..record };
        store.record_request(&unrouted).expect("records");
        assert_eq!(store.request_routes("chatcmpl-2").expect("reads"), Some(None), "no route: NULL");
    }

    /// A database made before the `routes` column existed opens, keeps its rows, and records routes.
    #[test]
    fn an_older_database_gains_the_routes_column() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).expect("opens");
            conn.execute_batch(
                "CREATE TABLE requests (id TEXT PRIMARY KEY, pool_id TEXT NOT NULL, model TEXT NOT NULL,
                    endpoint TEXT NOT NULL, stream INTEGER NOT NULL, started_at_ms INTEGER NOT NULL,
                    prompt_tokens INTEGER, completion_tokens INTEGER NOT NULL, time_to_first_token_ms REAL,
                    duration_ms REAL NOT NULL, outcome TEXT NOT NULL, error TEXT);
                 INSERT INTO requests VALUES ('old', 'p1', 'm', 'completions', 0, 1, 4, 2, 1.0, 2.0, 'stop', NULL);",
            )
            .expect("an old schema");
        }
        for _ in 0..2 {
            // Twice: the migration runs once and is a no-op after.
            let store = Store::open(&path).expect("opens and migrates");
            assert_eq!(store.request_usage("old").expect("reads"), Some(("stop".into(), Some(4), 2)));
            assert_eq!(store.request_routes("old").expect("reads"), Some(None), "old rows have no routes");
        }
        let store = Store::open(&path).expect("opens");
        let record = RequestRecord {
            id: "new".into(),
            pool_id: "p1".into(),
            model: "m".into(),
            endpoint: "completions",
            stream: false,
            started_at_ms: 2,
            prompt_tokens: Some(4),
            completion_tokens: 1,
            time_to_first_token_ms: None,
            duration_ms: 1.0,
            outcome: Outcome::Stop,
            error: None,
            routes: vec![RouteLeg { route: 0, workers: vec!["a".into()], from_token: 0, broke: None }],
        };
        store.record_request(&record).expect("records");
        assert!(store.request_routes("new").expect("reads").flatten().is_some_and(|r| r.contains("\"route\":0")));
    }
}
