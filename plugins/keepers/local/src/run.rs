//! A transition's run: planned in full before anything is sent (every call resolved and ABI-encoded, so a
//! bad payload is refused while nothing has happened), recorded in the kv store, then advanced call by call
//! through the host's chain with one idempotency key per call: `<transition key>/<node id>`, or
//! `<transition key>/<node id>/<i>` for the i-th item of a For Each. The record is rewritten after every
//! mined call, so a run interrupted by a crash is continued by the next `status`: calls already recorded
//! are skipped, and a call the host sent but the record missed comes back from the host's send log with its
//! first receipt instead of being sent again.
//!
//! A run ends `success` (every call mined and successful), `error` (a call reverted, or the operator did not
//! grant a contract: final, the driver may start a new run under `<key>#<n>`, whose calls get new keys), or
//! `in-doubt`: the host had broadcast a call when it stopped and cannot say whether it was mined. The host
//! will not send that call again and this keeper will not guess: the run stays pending, with the reason,
//! until an operator settles it — never acting twice is worth a stuck transition.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::workflow::{Scope, Workflow};

/// The five workflow files, compiled in: the local keeper runs exactly what KeeperHub users import.
pub const WORKFLOWS: [(&str, &str); 5] = [
    ("propose", include_str!("../../../../keeperhub/workflows/propose.workflow.json")),
    ("activate-and-pool", include_str!("../../../../keeperhub/workflows/activate-and-pool.workflow.json")),
    ("stream-start", include_str!("../../../../keeperhub/workflows/stream-start.workflow.json")),
    ("stream-stop", include_str!("../../../../keeperhub/workflows/stream-stop.workflow.json")),
    ("handle-breach", include_str!("../../../../keeperhub/workflows/handle-breach.workflow.json")),
];

/// Longest key the host's chain capability and kv store take, in bytes.
const MAX_HOST_KEY: usize = 256;
/// Room kept in a chain idempotency key for `/<node id>/<i>`.
const NODE_SUFFIX_ROOM: usize = 64;

const RUN_PREFIX: &str = "run/";

/// How a chain call failed (WIT's `chain-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainFailure {
    NotGranted(String),
    Reverted(String),
    InvalidCall(String),
    Unavailable(String),
    InDoubt(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub hash: String,
    pub success: bool,
}

/// What the run needs from the host (the WIT imports in the plugin, a fake in the tests).
pub trait Host {
    fn chain_id(&self) -> Result<u64, ChainFailure>;
    fn send(&self, to: &str, data: Vec<u8>, idempotency_key: &str) -> Result<Receipt, ChainFailure>;
    fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, String>;
    fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), String>;
    fn warn(&self, message: &str);
}

/// WIT's `keeper-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeeperFailure {
    InvalidTransition(String),
    Unavailable(String),
    Rejected(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    Success,
    Error,
    InDoubt,
}

/// One mined call, as KeeperHub's `transactionHashes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SentCall {
    pub hash: String,
    pub node_id: String,
    pub node_name: String,
    pub chain_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration_index: Option<usize>,
}

/// The run record in the kv store under `run/<idempotency key>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub idempotency_key: String,
    pub kind: String,
    /// The trigger body the run resolves its templates against.
    pub trigger: Value,
    pub state: RunState,
    pub transactions: Vec<SentCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One planned call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedCall {
    pub node_id: String,
    pub node_name: String,
    pub iteration: Option<usize>,
    pub to: String,
    pub data: Vec<u8>,
    pub idempotency_key: String,
}

/// The status a caller sees: WIT's `transition-state` and `detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Pending(String),
    Succeeded(String),
    Failed(String),
}

/// The reference `submit` hands out for a run: its idempotency key, so that `status` after a restart
/// finds the record with nothing else kept.
pub fn reference_of(idempotency_key: &str) -> String {
    format!("{RUN_PREFIX}{idempotency_key}")
}

fn workflow_text(kind: &str) -> Result<&'static str, KeeperFailure> {
    WORKFLOWS
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, text)| *text)
        .ok_or_else(|| KeeperFailure::InvalidTransition(format!("no workflow for transition kind `{kind}`")))
}

/// Resolves and encodes every call of `kind`'s workflow for this trigger body, checking its chain id.
pub fn plan(kind: &str, trigger: &Value, chain_id: u64) -> Result<Vec<PlannedCall>, String> {
    let workflow = Workflow::parse(workflow_text(kind).map_err(|e| format!("{e:?}"))?).map_err(|e| format!("the built-in {kind} workflow: {e}"))?;
    let key = trigger.get("idempotencyKey").and_then(Value::as_str).ok_or("the trigger body has no idempotencyKey")?;
    let mut calls = Vec::new();
    for step in &workflow.steps {
        let outer = Scope { trigger, item: None };
        let network = outer.splice(&step.network).map_err(|e| format!("node {}: {e}", step.node_id))?;
        if network.trim().parse::<u64>().ok() != Some(chain_id) {
            return Err(format!("node {}: the transition is for chain `{network}`, the host is on chain {chain_id}", step.node_id));
        }
        let iterations: Vec<(Option<usize>, Option<Value>)> = match &step.for_each {
            Some(each) => outer.items(each)?.into_iter().enumerate().map(|(i, v)| (Some(i), Some(v))).collect(),
            None => alloc::vec![(None, None)],
        };
        for (iteration, item) in iterations {
            let scope = Scope { trigger, item: step.for_each.as_ref().zip(item.as_ref()).map(|(f, v)| (f.node_id.as_str(), v)) };
            let at = |e: String| match iteration {
                Some(i) => format!("node {} (item {i}): {e}", step.node_id),
                None => format!("node {}: {e}", step.node_id),
            };
            let to = scope.splice(&step.contract).map_err(at)?;
            let args = step.args.iter().map(|a| scope.resolve(a)).collect::<Result<Vec<_>, _>>().map_err(at)?;
            let data = step.function.encode_call(&args).map_err(|e| at(format!("{}: {e}", step.function.signature())))?;
            let idempotency_key = match iteration {
                Some(i) => format!("{key}/{}/{i}", step.node_id),
                None => format!("{key}/{}", step.node_id),
            };
            calls.push(PlannedCall { node_id: step.node_id.clone(), node_name: step.label.clone(), iteration, to, data, idempotency_key });
        }
    }
    Ok(calls)
}

pub struct Keeper<'h, H: Host> {
    pub host: &'h H,
}

impl<H: Host> Keeper<'_, H> {
    fn load(&self, idempotency_key: &str) -> Result<Option<RunRecord>, KeeperFailure> {
        let Some(bytes) = self.host.kv_get(&reference_of(idempotency_key)).map_err(KeeperFailure::Unavailable)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| KeeperFailure::Rejected(format!("the run record of `{idempotency_key}` is unreadable: {e}")))
    }

    fn save(&self, record: &RunRecord) -> Result<(), KeeperFailure> {
        let bytes = serde_json::to_vec(record).map_err(|e| KeeperFailure::Rejected(e.to_string()))?;
        self.host.kv_set(&reference_of(&record.idempotency_key), &bytes).map_err(KeeperFailure::Unavailable)
    }

    /// Starts a run of `payload` (the full trigger body, as KeeperHub's webhook would get it), or returns
    /// the run this idempotency key already has.
    pub fn submit(&self, kind: &str, idempotency_key: &str, pool_id: &str, payload: &str) -> Result<String, KeeperFailure> {
        let invalid = KeeperFailure::InvalidTransition;
        if idempotency_key.is_empty() || idempotency_key.len() + NODE_SUFFIX_ROOM > MAX_HOST_KEY {
            return Err(invalid(format!("the idempotency key must be 1 to {} bytes", MAX_HOST_KEY - NODE_SUFFIX_ROOM)));
        }
        if self.load(idempotency_key)?.is_some() {
            return Ok(reference_of(idempotency_key));
        }
        let trigger: Value = serde_json::from_str(payload).map_err(|e| invalid(format!("the payload is not JSON: {e}")))?;
        for (field, expected) in [("idempotencyKey", idempotency_key), ("kind", kind), ("poolId", pool_id)] {
            if trigger.get(field).and_then(Value::as_str) != Some(expected) {
                return Err(invalid(format!(
                    "the payload must be the workflow's trigger body, with {field} `{expected}` (got {})",
                    trigger.get(field).map_or_else(|| "none".to_string(), Value::to_string)
                )));
            }
        }
        let chain_id = self.host.chain_id().map_err(chain_unavailable)?;
        // Everything is resolved and encoded before anything is written or sent.
        plan(kind, &trigger, chain_id).map_err(invalid)?;
        let mut record = RunRecord {
            idempotency_key: idempotency_key.to_string(),
            kind: kind.to_string(),
            trigger,
            state: RunState::Running,
            transactions: Vec::new(),
            reason: None,
        };
        self.save(&record)?;
        match self.advance(&mut record) {
            // The run exists and `status` continues it; the driver polls.
            Ok(()) | Err(KeeperFailure::Unavailable(_)) => Ok(reference_of(idempotency_key)),
            Err(e) => Err(e),
        }
    }

    pub fn status(&self, reference: &str) -> Result<Outcome, KeeperFailure> {
        let key = reference.strip_prefix(RUN_PREFIX).ok_or_else(|| KeeperFailure::Rejected(format!("`{reference}` is not a local keeper run")))?;
        let mut record = self.load(key)?.ok_or_else(|| KeeperFailure::Rejected(format!("no run `{reference}`")))?;
        if record.state == RunState::Running {
            // Interrupted (the host stopped mid-run, or the chain was unreachable): continue it.
            self.advance(&mut record)?;
        }
        Ok(match record.state {
            RunState::Success => Outcome::Succeeded(serde_json::to_string(&record.transactions).map_err(|e| KeeperFailure::Rejected(e.to_string()))?),
            RunState::Error => Outcome::Failed(record.reason.clone().unwrap_or_default()),
            RunState::InDoubt => {
                let reason = record.reason.clone().unwrap_or_default();
                self.host.warn(&format!("run {reference} is in doubt and waits for an operator: {reason}"));
                Outcome::Pending(reason)
            }
            RunState::Running => Outcome::Pending("running".into()),
        })
    }

    pub fn lookup(&self, idempotency_key: &str) -> Result<Option<String>, KeeperFailure> {
        if idempotency_key.is_empty() || idempotency_key.len() + RUN_PREFIX.len() > MAX_HOST_KEY {
            return Ok(None);
        }
        Ok(self.load(idempotency_key)?.map(|_| reference_of(idempotency_key)))
    }

    /// Sends the calls the record does not have yet, saving after each. `Err(Unavailable)` leaves the
    /// run `running` (retrying is safe: every call has its idempotency key).
    fn advance(&self, record: &mut RunRecord) -> Result<(), KeeperFailure> {
        let chain_id = self.host.chain_id().map_err(chain_unavailable)?;
        let calls = match plan(&record.kind, &record.trigger, chain_id) {
            Ok(calls) => calls,
            Err(e) => return self.finish(record, RunState::Error, e),
        };
        for call in calls {
            if record.transactions.iter().any(|t| t.node_id == call.node_id && t.iteration_index == call.iteration) {
                continue;
            }
            let what = match call.iteration {
                Some(i) => format!("node {} (item {i})", call.node_id),
                None => format!("node {}", call.node_id),
            };
            match self.host.send(&call.to, call.data.clone(), &call.idempotency_key) {
                Ok(receipt) if receipt.success => {
                    record.transactions.push(SentCall {
                        hash: receipt.hash,
                        node_id: call.node_id.clone(),
                        node_name: call.node_name.clone(),
                        chain_id,
                        iteration_index: call.iteration,
                    });
                    self.save(record)?;
                }
                Ok(receipt) => return self.finish(record, RunState::Error, format!("{what}: transaction {} was mined but reverted", receipt.hash)),
                Err(ChainFailure::Unavailable(m)) => return Err(KeeperFailure::Unavailable(format!("{what}: {m}"))),
                Err(ChainFailure::InDoubt(m)) => {
                    let reason = format!("in doubt, {what}: {m}; the host will not send it again and an operator must settle it");
                    return self.finish(record, RunState::InDoubt, reason);
                }
                Err(ChainFailure::NotGranted(c)) => {
                    return self.finish(record, RunState::Error, format!("{what}: the operator has not granted this keeper the contract {c} ([grants.chain])"));
                }
                Err(ChainFailure::Reverted(r)) => return self.finish(record, RunState::Error, format!("{what} reverts: {r}")),
                Err(ChainFailure::InvalidCall(m)) => return self.finish(record, RunState::Error, format!("{what}: {m}")),
            }
        }
        self.finish(record, RunState::Success, String::new())
    }

    fn finish(&self, record: &mut RunRecord, state: RunState, reason: String) -> Result<(), KeeperFailure> {
        record.state = state;
        record.reason = (!reason.is_empty()).then_some(reason);
        self.save(record)
    }
}

fn chain_unavailable(e: ChainFailure) -> KeeperFailure {
    KeeperFailure::Unavailable(format!("reading the chain id: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use serde_json::json;
    use std::collections::HashMap;

    const A: &str = "0x00000000000000000000000000000000000000aa";
    const B: &str = "0x00000000000000000000000000000000000000bb";
    const C: &str = "0x00000000000000000000000000000000000000cc";

    /// The host's chain and kv store: sends are idempotent per key, as the host's send log makes them.
    #[derive(Default)]
    struct FakeHost {
        kv: RefCell<HashMap<String, Vec<u8>>>,
        /// Mined transactions: (to, calldata, key).
        mined: RefCell<Vec<(String, Vec<u8>, String)>>,
        receipts: RefCell<HashMap<String, Receipt>>,
        /// Failures to answer the next sends with, in order.
        fail_next: RefCell<Vec<ChainFailure>>,
        /// Sends whose receipt says reverted.
        revert_selector: Option<[u8; 4]>,
    }

    impl Host for FakeHost {
        fn chain_id(&self) -> Result<u64, ChainFailure> {
            Ok(16602)
        }
        fn send(&self, to: &str, data: Vec<u8>, key: &str) -> Result<Receipt, ChainFailure> {
            if let Some(r) = self.receipts.borrow().get(key) {
                return Ok(r.clone());
            }
            if !self.fail_next.borrow().is_empty() {
                return Err(self.fail_next.borrow_mut().remove(0));
            }
            let mut mined = self.mined.borrow_mut();
            mined.push((to.into(), data.clone(), key.into()));
            let receipt = Receipt { hash: format!("0x{:064x}", mined.len()), success: self.revert_selector != Some([data[0], data[1], data[2], data[3]]) };
            self.receipts.borrow_mut().insert(key.into(), receipt.clone());
            Ok(receipt)
        }
        fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, String> {
            Ok(self.kv.borrow().get(key).cloned())
        }
        fn kv_set(&self, key: &str, value: &[u8]) -> Result<(), String> {
            self.kv.borrow_mut().insert(key.into(), value.to_vec());
            Ok(())
        }
        fn warn(&self, _: &str) {}
    }

    fn trigger(kind: &str, key: &str, payload: Value) -> String {
        json!({
            "idempotencyKey": key, "poolId": "pool-1", "kind": kind, "payload": payload, "chainId": "16602",
            "callbackUrl": "http://127.0.0.1:1/webhooks/keeperhub",
            "contracts": {"gdaV1Forwarder": A, "coalition": B, "poolInft": C},
        })
        .to_string()
    }

    fn start_payload() -> Value {
        json!({"pool": B, "token": C, "from": A, "flowRate": "1000", "members": [{"operator": A, "units": "1"}, {"operator": C, "units": "2"}]})
    }

    #[test]
    fn stream_start_sends_each_member_then_the_flow_and_reports_in_keeperhubs_shape() {
        let host = FakeHost::default();
        let k = Keeper { host: &host };
        let r = k.submit("stream-start", "p/1", "pool-1", &trigger("stream-start", "p/1", start_payload())).unwrap();
        assert_eq!(r, "run/p/1");
        let keys: Vec<String> = host.mined.borrow().iter().map(|m| m.2.clone()).collect();
        assert_eq!(keys, ["p/1/update-member-units/0", "p/1/update-member-units/1", "p/1/distribute-flow"]);
        assert!(host.mined.borrow().iter().all(|m| m.0 == A), "all to the forwarder");
        let Outcome::Succeeded(detail) = k.status(&r).unwrap() else { panic!("not succeeded") };
        let detail: Value = serde_json::from_str(&detail).unwrap();
        assert_eq!(detail[0]["nodeId"], "update-member-units");
        assert_eq!(detail[0]["iterationIndex"], 0);
        assert_eq!(detail[2]["nodeId"], "distribute-flow");
        assert_eq!(detail[2]["chainId"], 16602);
        assert!(detail[2].get("iterationIndex").is_none());
        // The same key again is the same run: nothing more is sent.
        assert_eq!(k.submit("stream-start", "p/1", "pool-1", &trigger("stream-start", "p/1", start_payload())).unwrap(), r);
        assert_eq!(host.mined.borrow().len(), 3);
        assert_eq!(k.lookup("p/1").unwrap(), Some(r));
        assert_eq!(k.lookup("p/2").unwrap(), None);
    }

    #[test]
    fn a_bad_payload_is_refused_before_anything_is_sent_or_recorded() {
        let host = FakeHost::default();
        let k = Keeper { host: &host };
        let mut bad = start_payload();
        bad["flowRate"] = json!("39614081257132168796771975168"); // 2^95: not an int96
        let err = k.submit("stream-start", "p/1", "pool-1", &trigger("stream-start", "p/1", bad)).unwrap_err();
        let KeeperFailure::InvalidTransition(m) = err else { panic!("{err:?}") };
        assert!(m.contains("distribute-flow") && m.contains("int96"), "{m}");
        let mut bad = start_payload();
        bad["members"][1]["operator"] = json!("0x12");
        let err = k.submit("stream-start", "p/1", "pool-1", &trigger("stream-start", "p/1", bad)).unwrap_err();
        assert!(matches!(&err, KeeperFailure::InvalidTransition(m) if m.contains("item 1")), "{err:?}");
        // Not the trigger body, or another chain.
        let err = k.submit("stream-start", "p/1", "pool-1", &start_payload().to_string()).unwrap_err();
        assert!(matches!(&err, KeeperFailure::InvalidTransition(m) if m.contains("trigger body")), "{err:?}");
        let other_chain = trigger("stream-start", "p/1", start_payload()).replace("\"16602\"", "\"1\"");
        assert!(matches!(k.submit("stream-start", "p/1", "pool-1", &other_chain), Err(KeeperFailure::InvalidTransition(m)) if m.contains("chain")));
        assert!(host.mined.borrow().is_empty());
        assert!(host.kv.borrow().is_empty());
        assert_eq!(k.lookup("p/1").unwrap(), None);
    }

    #[test]
    fn an_unreachable_chain_leaves_the_run_running_and_status_finishes_it_once() {
        let host = FakeHost::default();
        *host.fail_next.borrow_mut() = alloc::vec![ChainFailure::Unavailable("connection refused".into())];
        let k = Keeper { host: &host };
        // The first send fails: the run is recorded and waits for the next status.
        let r = k.submit("stream-start", "p/1", "pool-1", &trigger("stream-start", "p/1", start_payload())).unwrap();
        assert!(host.mined.borrow().is_empty());
        assert!(matches!(k.status(&r).unwrap(), Outcome::Succeeded(_)));
        assert_eq!(host.mined.borrow().len(), 3);
    }

    #[test]
    fn a_run_cut_short_resumes_where_it_stopped_without_resending() {
        let host = FakeHost::default();
        let k = Keeper { host: &host };
        let body = trigger("stream-start", "p/1", start_payload());
        let r = k.submit("stream-start", "p/1", "pool-1", &body).unwrap();
        // As if the host had died after the second call was mined but before the record said so: the
        // record lost its last two calls and is still running.
        let mut record: RunRecord = serde_json::from_slice(&host.kv.borrow()["run/p/1"]).unwrap();
        record.transactions.truncate(1);
        record.state = RunState::Running;
        host.kv.borrow_mut().insert("run/p/1".into(), serde_json::to_vec(&record).unwrap());
        let Outcome::Succeeded(detail) = k.status(&r).unwrap() else { panic!() };
        assert_eq!(host.mined.borrow().len(), 3, "nothing sent twice");
        assert_eq!(serde_json::from_str::<Vec<SentCall>>(&detail).unwrap().len(), 3);
    }

    #[test]
    fn reverts_fail_the_run_and_in_doubt_keeps_it_pending() {
        let host = FakeHost { revert_selector: Some([0x5a, 0x6c, 0x6d, 0xbc]), ..FakeHost::default() };
        let k = Keeper { host: &host };
        let r = k.submit("stream-stop", "p/2", "pool-1", &trigger("stream-stop", "p/2", json!({"pool": B, "token": C, "from": A}))).unwrap();
        assert!(matches!(k.status(&r).unwrap(), Outcome::Failed(m) if m.contains("mined but reverted")));

        let host = FakeHost::default();
        *host.fail_next.borrow_mut() = alloc::vec![ChainFailure::InDoubt("no receipt".into())];
        let k = Keeper { host: &host };
        let r = k.submit("stream-stop", "p/3", "pool-1", &trigger("stream-stop", "p/3", json!({"pool": B, "token": C, "from": A}))).unwrap();
        assert!(matches!(k.status(&r).unwrap(), Outcome::Pending(m) if m.contains("no receipt") && m.starts_with("in doubt")));
        assert!(matches!(k.status(&r).unwrap(), Outcome::Pending(_)), "never re-sent");
        assert!(host.mined.borrow().is_empty());

        let host = FakeHost::default();
        *host.fail_next.borrow_mut() = alloc::vec![ChainFailure::NotGranted(A.into())];
        let k = Keeper { host: &host };
        let r = k.submit("stream-stop", "p/4", "pool-1", &trigger("stream-stop", "p/4", json!({"pool": B, "token": C, "from": A}))).unwrap();
        assert!(matches!(k.status(&r).unwrap(), Outcome::Failed(m) if m.contains("grants.chain")));
    }

    #[test]
    fn every_workflow_plans_its_calls_from_a_documented_payload() {
        let payloads = [
            ("propose", json!({"proofs": ["0x0102"], "dataDescriptions": ["smollm2"], "owner": A})),
            ("activate-and-pool", json!({"token": C, "admin": A, "poolConfig": {"transferabilityForUnitsOwner": false, "distributionFromAnyAddress": false}, "tokenId": "1", "orchestrator": B})),
            ("stream-start", start_payload()),
            ("stream-stop", json!({"pool": B, "token": C, "from": A})),
            ("handle-breach", json!({"pool": B, "operator": C, "slashAmount": "5", "evidenceHash": format!("0x{}", "ab".repeat(32))})),
        ];
        let counts: Vec<usize> = payloads
            .iter()
            .map(|(kind, p)| {
                let t: Value = serde_json::from_str(&trigger(kind, "k", p.clone())).unwrap();
                plan(kind, &t, 16602).unwrap_or_else(|e| panic!("{kind}: {e}")).len()
            })
            .collect();
        assert_eq!(counts, [1, 2, 3, 1, 2]);
        let t: Value = serde_json::from_str(&trigger("handle-breach", "k", payloads[4].1.clone())).unwrap();
        let calls = plan("handle-breach", &t, 16602).unwrap();
        assert_eq!(calls[1].to, B, "proposeBreach goes to the coalition");
        assert_eq!(&calls[1].data[4 + 64..], &[0xab; 32], "the evidence hash is the third word");
    }
}
