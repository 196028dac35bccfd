//! Pools: a model served by a pipeline of shards, reached only through its entry shard's request API
//! (`client::EntryClient`). The orchestrator never sees activations; it sends text or messages and
//! reads token events back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use computepool_axl::transport::{SecretKey, Topology};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::ApiError;
use super::store::{PoolRecord, Store};
use crate::client::{EntryClient, RequestStream};
use crate::worker::api::GenerateRequest;

/// How long connecting to an entry may take before the pool counts as unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What `POST /pools` takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// 1–64 of `A-Z a-z 0-9 . _ -`; default: the model name.
    #[serde(default)]
    pub id: Option<String>,
    /// The name clients give as `model`.
    pub model: String,
    /// The model's Hugging Face layout directory, on the orchestrator's machine.
    pub model_dir: PathBuf,
    /// The pool's topology (the workers' topology file); it must list this orchestrator as a client.
    pub topology: Topology,
}

/// The parts of a model's `config.json` the orchestrator reads.
#[derive(Deserialize)]
struct ModelLimits {
    num_hidden_layers: u32,
    max_position_embeddings: usize,
}

fn read_limits(dir: &Path) -> Result<ModelLimits, String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One pool and its (lazily made, remade when broken) connection to the entry.
pub struct Pool {
    pub record: PoolRecord,
    /// The model's context window in tokens.
    pub context_window: usize,
    key: SecretKey,
    entry: tokio::sync::Mutex<Option<Arc<EntryClient>>>,
}

/// A request in flight on a pool. Dropping it cancels the request at the entry.
pub struct PoolRequest {
    // Dropped first: stopping the stream is the cancel signal, and it needs the connection alive.
    pub events: RequestStream,
    _client: Arc<EntryClient>,
}

impl Pool {
    fn new(record: PoolRecord, key: SecretKey) -> Result<Self, String> {
        let limits = read_limits(&record.model_dir)?;
        if limits.num_hidden_layers != record.topology.num_layers {
            return Err(format!(
                "the model in {} has {} layers, the topology {}",
                record.model_dir.display(),
                limits.num_hidden_layers,
                record.topology.num_layers
            ));
        }
        if !record.topology.clients.contains(&key.public()) {
            return Err(format!(
                "the topology does not list this orchestrator as a client: add its peer id {} to `clients`",
                key.public()
            ));
        }
        Ok(Self { record, context_window: limits.max_position_embeddings, key, entry: tokio::sync::Mutex::new(None) })
    }

    async fn client(&self, fresh: bool) -> Result<Arc<EntryClient>, String> {
        let mut entry = self.entry.lock().await;
        if let Some(client) = entry.as_ref()
            && !fresh
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        let connect = EntryClient::connect(self.key.clone(), self.record.topology.entry());
        let client = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(client)) => Arc::new(client),
            Ok(Err(e)) => return Err(format!("cannot connect to the entry shard: {e:#}")),
            Err(_) => return Err(format!("the entry shard did not answer within {CONNECT_TIMEOUT:?}")),
        };
        *entry = Some(client.clone());
        Ok(client)
    }

    /// Sends `request` to the entry, reconnecting once if the cached connection turns out to be dead.
    pub async fn start(&self, request: &GenerateRequest) -> Result<PoolRequest, ApiError> {
        let unavailable = |reason: String| ApiError::Unavailable { model: self.record.model.clone(), reason };
        let mut last = String::new();
        for fresh in [false, true] {
            let client = self.client(fresh).await.map_err(unavailable)?;
            match client.start(request).await {
                Ok(events) => return Ok(PoolRequest { events, _client: client }),
                Err(e) => last = format!("{e:#}"),
            }
        }
        Err(unavailable(last))
    }

    /// Closes the connection to the entry (when no request holds it any more).
    pub async fn disconnect(&self) {
        let client = self.entry.lock().await.take();
        if let Some(client) = client.and_then(Arc::into_inner) {
            client.close().await;
        }
    }

    /// The pool as `GET /pools` shows it.
    pub fn describe(&self) -> Value {
        let r = &self.record;
        json!({
            "id": r.id,
            "object": "pool",
            "model": r.model,
            "model_dir": r.model_dir,
            "context_window": self.context_window,
            "num_layers": r.topology.num_layers,
            "entry": r.topology.entry().peer.to_string(),
            "shards": r.topology.shards,
            "created_at": r.created_at,
        })
    }
}

/// Every pool, by id; the model name picks a pool for OpenAI requests.
pub struct Pools {
    key: SecretKey,
    by_id: RwLock<BTreeMap<String, Arc<Pool>>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl Pools {
    /// Loads the stored pools. A stored pool that no longer checks out (its model directory moved, say)
    /// is skipped with a warning rather than keeping the orchestrator from starting.
    pub fn load(store: &Store, key: SecretKey) -> rusqlite::Result<Self> {
        let pools = Self { key, by_id: RwLock::new(BTreeMap::new()) };
        for record in store.pools()? {
            let id = record.id.clone();
            match Pool::new(record, pools.key.clone()) {
                Ok(pool) => {
                    tracing::info!(pool = %id, model = %pool.record.model, "pool restored");
                    pools.write().insert(id, Arc::new(pool));
                }
                Err(why) => tracing::warn!(pool = %id, "stored pool not served: {why}"),
            }
        }
        Ok(pools)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Pool>>> {
        // Inserts are single map operations: a panic elsewhere cannot leave the map inconsistent.
        self.by_id.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Pool>>> {
        self.by_id.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `spec`, stores it, and starts serving it. With `replace`, a pool with the same id or
    /// model is replaced; otherwise that is a conflict.
    pub fn register(&self, store: &Store, spec: PoolSpec, replace: bool) -> Result<Arc<Pool>, ApiError> {
        let id = spec.id.clone().unwrap_or_else(|| spec.model.clone());
        if !valid_id(&id) {
            return Err(ApiError::invalid("id", format!("pool id {id:?} must be 1-64 of A-Z a-z 0-9 . _ -")));
        }
        if spec.model.trim().is_empty() {
            return Err(ApiError::invalid("model", "model must not be empty"));
        }
        spec.topology.validate().map_err(|e| ApiError::invalid("topology", e.to_string()))?;
        let created_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let record = PoolRecord { id: id.clone(), model: spec.model, model_dir: spec.model_dir, topology: spec.topology, created_at };
        let pool = Arc::new(Pool::new(record, self.key.clone()).map_err(|e| ApiError::invalid("topology", e))?);
        let mut pools = self.write();
        let clash = pools.values().find(|p| p.record.id == id || p.record.model == pool.record.model);
        if let (Some(existing), false) = (clash, replace) {
            return Err(ApiError::Conflict(format!(
                "pool {} already serves model {}",
                existing.record.id, existing.record.model
            )));
        }
        store.put_pool(&pool.record, replace)?;
        pools.retain(|_, p| p.record.id != id && p.record.model != pool.record.model);
        pools.insert(id.clone(), pool.clone());
        tracing::info!(pool = %id, model = %pool.record.model, "pool registered");
        Ok(pool)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Pool>> {
        self.read().get(id).cloned()
    }

    pub fn by_model(&self, model: &str) -> Option<Arc<Pool>> {
        self.read().values().find(|p| p.record.model == model).cloned()
    }

    /// Closes every pool's entry connection (shutting down).
    pub async fn disconnect_all(&self) {
        for pool in self.all() {
            pool.disconnect().await;
        }
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.read().values().cloned().collect()
    }
}
