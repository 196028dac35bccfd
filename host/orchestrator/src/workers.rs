//! Workers as the control plane knows them: each registers itself (`POST /workers`: its P2P peer id,
//! addresses, model, layer range, device, memory and measured speed) and then heartbeats
//! (`POST /workers/{peer}/heartbeat`: what it holds now). A worker that misses
//! [`MISSED_HEARTBEATS`] beats in a row is down. Registrations are stored, so a restarted orchestrator
//! knows its workers at once; a worker whose heartbeat is refused or unanswered registers again.
//!
//! A worker belongs to the pool whose topology lists its peer id (the pool's shard plan names its
//! workers); a registered worker that no pool lists yet is shown as unassigned.
//!
//! A worker can be ejected ([`Workers::eject`]: a coalition's verdict, or an operator by hand): no new
//! request is routed through it, whatever its heartbeats say, until the orchestrator's database says
//! otherwise. The ejection is stored by peer id, apart from the registration, so registering again
//! (or a restart of either side) does not undo it; requests already on its route finish there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::Duration;

use computepool_axl::transport::Layers;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::error::ApiError;
use super::store::Store;

/// A worker is down after this many heartbeat intervals without one.
pub const MISSED_HEARTBEATS: u32 = 3;

/// What a worker says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerRegistration {
    /// Its P2P peer id (ed25519 public key).
    pub peer: String,
    /// Where its QUIC endpoint listens.
    pub addrs: Vec<SocketAddr>,
    /// The model it serves (its directory or file name).
    pub model: String,
    /// The layer range it holds, `START..END`.
    pub layers: String,
    /// `cpu`, or the GPU's name.
    pub device: String,
    /// Bytes of weights it holds.
    pub weight_bytes: u64,
    /// Its resident memory when it registered, where the OS tells.
    #[serde(default)]
    pub rss_bytes: Option<u64>,
    /// Measured speed: layers per second of a one-row decode step over its range (higher is faster).
    pub speed: f64,
    /// The operator's payout address (0x-prefixed, 20 bytes hex): where the pool's payment stream pays
    /// this worker's share. A worker without one serves free (it gets no units in paid pools).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payout: Option<String>,
}

/// What a worker holds now, sent with every heartbeat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerStats {
    /// Requests in flight through this worker.
    pub active_requests: u64,
    /// KV caches it holds (one per request that crossed it and has not ended).
    pub kv_caches: u64,
    /// Bytes those caches take.
    pub kv_cache_bytes: u64,
}

/// The answer to a registration: how often to beat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationAnswer {
    pub heartbeat_interval_ms: u64,
}

/// One worker as stored and served.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRecord {
    pub registration: WorkerRegistration,
    /// Unix milliseconds.
    pub registered_at_ms: i64,
    /// Unix milliseconds of the last registration or heartbeat.
    pub last_seen_ms: i64,
    pub stats: WorkerStats,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl WorkerRegistration {
    /// Checks what a worker sent (it is input from the network).
    pub fn validate(&self) -> Result<Layers, ApiError> {
        self.peer
            .parse::<computepool_axl::transport::PeerId>()
            .map_err(|e| ApiError::invalid("peer", format!("peer {:?} is not a peer id: {e}", self.peer)))?;
        let layers: Layers =
            self.layers.parse().map_err(|e| ApiError::invalid("layers", format!("layers {:?}: {e}", self.layers)))?;
        if self.addrs.is_empty() || self.addrs.len() > 16 {
            return Err(ApiError::invalid("addrs", "give 1 to 16 addresses"));
        }
        for (name, value) in [("model", &self.model), ("device", &self.device)] {
            if value.is_empty() || value.len() > 256 {
                return Err(ApiError::invalid(name, format!("{name} must be 1 to 256 characters")));
            }
        }
        if !self.speed.is_finite() || self.speed < 0.0 {
            return Err(ApiError::invalid("speed", "speed must be a finite number, at least 0"));
        }
        if let Some(payout) = &self.payout
            && !is_address(payout)
        {
            return Err(ApiError::invalid("payout", format!("payout {payout:?} is not a 0x-prefixed 20-byte hex address")));
        }
        Ok(layers)
    }
}

/// `0x` and 40 hex digits (either case; EIP-55 checksums are not required).
pub fn is_address(text: &str) -> bool {
    text.len() == 42 && text.starts_with("0x") && text[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Why and when a worker was ejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ejection {
    /// For the operator's records (a verdict's digest, an operator's note).
    pub reason: String,
    /// Unix milliseconds.
    pub ejected_at_ms: i64,
}

/// Longest ejection reason kept, in bytes (it is shown in `GET /workers`).
pub const MAX_EJECTION_REASON: usize = 1024;

/// Every registered worker, by peer id, and the ejected ones (registered or not).
pub struct Workers {
    by_peer: RwLock<BTreeMap<String, WorkerRecord>>,
    ejected: RwLock<BTreeMap<String, Ejection>>,
    heartbeat: Duration,
}

impl Workers {
    /// The stored workers; they count as up until they miss their beats, like any other.
    pub fn load(store: &Store, heartbeat: Duration) -> rusqlite::Result<Self> {
        let by_peer = store.workers()?.into_iter().map(|w| (w.registration.peer.clone(), w)).collect();
        let ejected = store.ejections()?.into_iter().collect();
        Ok(Self { by_peer: RwLock::new(by_peer), ejected: RwLock::new(ejected), heartbeat })
    }

    /// Ejects `peer`: stored first, then no route through it is picked again. Ejecting an ejected
    /// worker keeps the first ejection. A peer that never registered can be ejected too (a pool's plan
    /// may name it before it comes up).
    pub fn eject(&self, store: &Store, peer: &str, reason: &str) -> Result<Ejection, ApiError> {
        peer.parse::<computepool_axl::transport::PeerId>()
            .map_err(|e| ApiError::invalid("peer", format!("peer {peer:?} is not a peer id: {e}")))?;
        if reason.trim().is_empty() || reason.len() > MAX_EJECTION_REASON {
            return Err(ApiError::invalid("reason", format!("give a reason of 1 to {MAX_EJECTION_REASON} bytes")));
        }
        let mut ejected = self.ejected.write().unwrap_or_else(|p| p.into_inner());
        if let Some(first) = ejected.get(peer) {
            return Ok(first.clone());
        }
        let ejection = Ejection { reason: reason.to_string(), ejected_at_ms: now_ms() };
        store.put_ejection(peer, &ejection)?;
        ejected.insert(peer.to_string(), ejection.clone());
        tracing::warn!(%peer, %reason, "worker ejected: no new request is routed through it");
        Ok(ejection)
    }

    /// Whether (and why) `peer` is ejected.
    pub fn ejection(&self, peer: &str) -> Option<Ejection> {
        self.ejected.read().unwrap_or_else(|p| p.into_inner()).get(peer).cloned()
    }

    /// Whether `peer` may take new requests: not ejected, and not known to be down (a worker that never
    /// registered is not judged).
    pub fn routable(&self, peer: &str) -> bool {
        self.ejection(peer).is_none() && self.get(peer).is_none_or(|w| self.is_up(&w))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, WorkerRecord>> {
        // Every change is one map operation: a panic elsewhere cannot leave the map inconsistent.
        self.by_peer.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, WorkerRecord>> {
        self.by_peer.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or registers again) a worker; `expected` is the layer range a pool's plan gives its
    /// peer id, if a pool lists it.
    pub fn register(
        &self,
        store: &Store,
        registration: WorkerRegistration,
        expected: Option<(String, Layers)>,
    ) -> Result<RegistrationAnswer, ApiError> {
        let layers = registration.validate()?;
        if let Some((pool, want)) = expected
            && want != layers
        {
            return Err(ApiError::invalid(
                "layers",
                format!("pool {pool} gives peer {} layers {want}, not {layers}", registration.peer),
            ));
        }
        let now = now_ms();
        let record = WorkerRecord { registration, registered_at_ms: now, last_seen_ms: now, stats: WorkerStats::default() };
        store.put_worker(&record)?;
        let known = self.write().insert(record.registration.peer.clone(), record.clone()).is_some();
        tracing::info!(peer = %record.registration.peer, layers = %record.registration.layers, again = known, "worker registered");
        Ok(RegistrationAnswer { heartbeat_interval_ms: self.heartbeat.as_millis() as u64 })
    }

    /// Takes a heartbeat; an unknown peer must register first.
    pub fn heartbeat(&self, store: &Store, peer: &str, stats: WorkerStats) -> Result<(), ApiError> {
        let now = now_ms();
        {
            let mut workers = self.write();
            let record = workers.get_mut(peer).ok_or_else(|| ApiError::WorkerNotFound(peer.to_string()))?;
            if !is_up(record.last_seen_ms, now, self.heartbeat) {
                tracing::info!(%peer, "worker is back");
            }
            record.last_seen_ms = now;
            record.stats = stats;
        }
        store.touch_worker(peer, now, &stats)?;
        Ok(())
    }

    pub fn get(&self, peer: &str) -> Option<WorkerRecord> {
        self.read().get(peer).cloned()
    }

    pub fn all(&self) -> Vec<WorkerRecord> {
        self.read().values().cloned().collect()
    }

    /// Whether `record` is up now.
    pub fn is_up(&self, record: &WorkerRecord) -> bool {
        is_up(record.last_seen_ms, now_ms(), self.heartbeat)
    }

    /// A worker as `GET /workers` shows it.
    pub fn describe(&self, record: &WorkerRecord, pools: &[String]) -> Value {
        let r = &record.registration;
        json!({
            "peer": r.peer,
            "object": "worker",
            "status": if self.is_up(record) { "up" } else { "down" },
            "pools": pools,
            "model": r.model,
            "layers": r.layers,
            "addrs": r.addrs,
            "device": r.device,
            "weight_bytes": r.weight_bytes,
            "rss_bytes": r.rss_bytes,
            "speed": r.speed,
            "payout": r.payout,
            "registered_at_ms": record.registered_at_ms,
            "last_heartbeat_ms_ago": (now_ms() - record.last_seen_ms).max(0),
            "active_requests": record.stats.active_requests,
            "kv_caches": record.stats.kv_caches,
            "kv_cache_bytes": record.stats.kv_cache_bytes,
            // `status` stays liveness; an ejected worker takes no new request whatever it says.
            "ejected": self.ejection(&r.peer),
        })
    }
}

fn is_up(last_seen_ms: i64, now_ms: i64, heartbeat: Duration) -> bool {
    let limit = heartbeat.as_millis() as i64 * MISSED_HEARTBEATS as i64;
    now_ms - last_seen_ms <= limit
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(layers: &str) -> WorkerRegistration {
        WorkerRegistration {
            peer: computepool_axl::transport::SecretKey::generate().public().to_string(),
            addrs: vec!["127.0.0.1:4000".parse().expect("address")],
            model: "m".into(),
            layers: layers.into(),
            device: "cpu".into(),
            weight_bytes: 10,
            rss_bytes: None,
            speed: 100.0,
            payout: None,
        }
    }

    #[test]
    fn a_payout_must_be_an_address() {
        let mut r = registration("0..2");
        r.payout = Some("0x00000000000000000000000000000000000000aB".into());
        assert!(r.validate().is_ok());
        for bad in ["", "0x", "00000000000000000000000000000000000000aB00", "0x00000000000000000000000000000000000000zz"] {
            r.payout = Some(bad.into());
            let e = r.validate().expect_err("refused");
            assert!(e.to_string().contains("payout"), "{e}");
        }
    }

    #[test]
    fn workers_register_beat_go_down_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db")).expect("opens");
        let workers = Workers::load(&store, Duration::from_millis(20)).expect("loads");
        let reg = registration("0..2");
        let peer = reg.peer.clone();
        assert!(matches!(workers.heartbeat(&store, &peer, WorkerStats::default()), Err(ApiError::WorkerNotFound(_))));
        let answer = workers.register(&store, reg.clone(), None).expect("registers");
        assert_eq!(answer.heartbeat_interval_ms, 20);
        let stats = WorkerStats { active_requests: 1, kv_caches: 2, kv_cache_bytes: 3 };
        workers.heartbeat(&store, &peer, stats).expect("beats");
        assert!(workers.is_up(&workers.get(&peer).expect("known")));
        std::thread::sleep(Duration::from_millis(80));
        assert!(!workers.is_up(&workers.get(&peer).expect("known")), "down after 3 missed beats");
        workers.heartbeat(&store, &peer, stats).expect("beats");
        assert!(workers.is_up(&workers.get(&peer).expect("known")), "up again");

        let restored = Workers::load(&store, Duration::from_millis(20)).expect("reloads");
        let record = restored.get(&peer).expect("stored");
        assert_eq!(record.registration, reg);
        assert_eq!(record.stats, stats);
    }

    #[test]
    fn an_ejection_is_stored_shown_and_outlives_registering_again_and_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("db")).expect("opens");
        let workers = Workers::load(&store, Duration::from_secs(60)).expect("loads");
        let reg = registration("0..2");
        let peer = reg.peer.clone();
        workers.register(&store, reg.clone(), None).expect("registers");
        assert!(workers.routable(&peer));
        assert!(matches!(workers.eject(&store, "nope", "x"), Err(ApiError::InvalidParameter { .. })));
        assert!(matches!(workers.eject(&store, &peer, " "), Err(ApiError::InvalidParameter { .. })));
        let first = workers.eject(&store, &peer, "coalition verdict 1234").expect("ejects");
        assert!(!workers.routable(&peer), "an ejected worker takes no new request");
        assert!(workers.is_up(&workers.get(&peer).expect("known")), "it still beats: liveness is apart");
        let again = workers.eject(&store, &peer, "another reason").expect("ejecting twice is fine");
        assert_eq!(again, first, "the first ejection stays");
        workers.register(&store, reg, None).expect("registers again");
        assert!(!workers.routable(&peer), "registering again does not undo it");
        let shown = workers.describe(&workers.get(&peer).expect("known"), &[]);
        assert_eq!(shown["status"], "up");
        assert_eq!(shown["ejected"]["reason"], "coalition verdict 1234");
        // A peer that never registered can be ejected too; both survive a restart.
        let stranger = computepool_axl::transport::SecretKey::generate().public().to_string();
        assert!(workers.routable(&stranger), "never registered: not judged");
        workers.eject(&store, &stranger, "named by a verdict").expect("ejects");
        let restored = Workers::load(&store, Duration::from_secs(60)).expect("reloads");
        assert_eq!(restored.ejection(&peer), Some(first));
        assert!(!restored.routable(&peer) && !restored.routable(&stranger));
    }

    #[test]
    fn bad_registrations_are_refused_by_field() {
        let store = Store::in_memory().expect("opens");
        let workers = Workers::load(&store, Duration::from_secs(1)).expect("loads");
        let param = |r: WorkerRegistration, expected| match workers.register(&store, r, expected) {
            Err(ApiError::InvalidParameter { param, .. }) => param,
            other => panic!("{other:?}"),
        };
        let mut r = registration("0..2");
        r.peer = "nope".into();
        assert_eq!(param(r, None).as_deref(), Some("peer"));
        assert_eq!(param(registration("2..1"), None).as_deref(), Some("layers"));
        let mut r = registration("0..2");
        r.addrs.clear();
        assert_eq!(param(r, None).as_deref(), Some("addrs"));
        let mut r = registration("0..2");
        r.speed = f64::NAN;
        assert_eq!(param(r, None).as_deref(), Some("speed"));
        let want = Some(("p".to_string(), "0..3".parse().expect("layers")));
        assert_eq!(param(registration("0..2"), want).as_deref(), Some("layers"));
    }
}
