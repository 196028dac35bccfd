//! A test keeper adapter: each transition "runs" at once, in the plugin's kv-store. `submit` records a
//! run under a new reference (`mem-<n>`) and the idempotency key, and returns the existing run for a key
//! it has seen; `status` says `succeeded` (detail: the kind and pool) or `failed` when the payload asked
//! for it (`"fail": true`); `lookup` finds a run by key. A payload that is not a JSON object is an
//! `invalid-transition`; a payload with `"trap": true` traps, to test the host's instance replacement.
//! Everything lives in the kv-store, so a restarted host (with a state dir) sees the same runs.
#![no_std]

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use computepool::host::kv_store;
use computepool::keeper_adapter::types::{KeeperError, Submission, Transition, TransitionKind, TransitionState, TransitionStatus};
use exports::computepool::keeper_adapter::keeper::Guest;
use serde::{Deserialize, Serialize};
use serde_json::Value;
// Linked for its `memcmp`/`bcmp`: string comparisons lower to them and a no_std guest has no libc.
use computepool_rail_kit as _;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/keeper-adapter/0.1.0"],
    world: "computepool:keeper-adapter/keeper-adapter@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

#[derive(Serialize, Deserialize)]
struct Run {
    key: String,
    kind: String,
    pool: String,
    fail: bool,
}

fn unavailable(e: kv_store::KvError) -> KeeperError {
    KeeperError::Unavailable(match e {
        kv_store::KvError::InvalidKey(n) => format!("kv key over {n} bytes"),
        kv_store::KvError::QuotaExceeded(n) => format!("kv quota of {n} bytes"),
        kv_store::KvError::Unavailable(m) => m,
    })
}

fn get(key: &str) -> Result<Option<Vec<u8>>, KeeperError> {
    kv_store::get(key).map_err(unavailable)
}

fn set(key: &str, value: &[u8]) -> Result<(), KeeperError> {
    kv_store::set(key, value).map_err(unavailable)
}

fn kind_name(k: TransitionKind) -> &'static str {
    match k {
        TransitionKind::Propose => "propose",
        TransitionKind::ActivateAndPool => "activate-and-pool",
        TransitionKind::StreamStart => "stream-start",
        TransitionKind::StreamStop => "stream-stop",
        TransitionKind::HandleBreach => "handle-breach",
    }
}

fn by_key(key: &str) -> Result<Option<Submission>, KeeperError> {
    Ok(get(&format!("key:{key}"))?.map(|r| Submission { reference: String::from_utf8_lossy(&r).into_owned() }))
}

struct Memory;

impl Guest for Memory {
    fn submit(t: Transition) -> Result<Submission, KeeperError> {
        let payload: Value =
            serde_json::from_str(&t.payload).map_err(|e| KeeperError::InvalidTransition(format!("payload is not JSON: {e}")))?;
        let Some(object) = payload.as_object() else {
            return Err(KeeperError::InvalidTransition("payload is not a JSON object".into()));
        };
        if object.get("trap").and_then(Value::as_bool) == Some(true) {
            core::arch::wasm32::unreachable();
        }
        if let Some(existing) = by_key(&t.idempotency_key)? {
            return Ok(existing);
        }
        let n = get("next")?.and_then(|b| String::from_utf8(b).ok()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(1);
        let reference = format!("mem-{n}");
        let run = Run {
            key: t.idempotency_key.clone(),
            kind: kind_name(t.kind).into(),
            pool: t.pool_id,
            fail: object.get("fail").and_then(Value::as_bool) == Some(true),
        };
        let bytes = serde_json::to_vec(&run).map_err(|e| KeeperError::Rejected(e.to_string()))?;
        set(&format!("run:{reference}"), &bytes)?;
        set(&format!("key:{}", t.idempotency_key), reference.as_bytes())?;
        set("next", (n + 1).to_string().as_bytes())?;
        Ok(Submission { reference })
    }

    fn status(reference: String) -> Result<TransitionStatus, KeeperError> {
        let bytes = get(&format!("run:{reference}"))?.ok_or_else(|| KeeperError::Rejected(format!("no run {reference}")))?;
        let run: Run = serde_json::from_slice(&bytes).map_err(|e| KeeperError::Rejected(e.to_string()))?;
        Ok(if run.fail {
            TransitionStatus { state: TransitionState::Failed, detail: format!("{} on {} failed as asked", run.kind, run.pool) }
        } else {
            TransitionStatus { state: TransitionState::Succeeded, detail: format!("{} on {} ({})", run.kind, run.pool, run.key) }
        })
    }

    fn lookup(idempotency_key: String) -> Result<Option<Submission>, KeeperError> {
        by_key(&idempotency_key)
    }
}

export!(Memory);
