//! The KeeperHub path end to end on loopback: the driver and `KeeperHubKeeper` drive all five workflow
//! files on the stand-in (webhook trigger, run status, execution list), the runs' signed callbacks reach
//! the webhook receiver, and the receiver refuses a bad signature, a stale timestamp, a replay and an
//! unconfirmed on-chain claim. A failing run is retried; a run started before a crash is found by its
//! idempotency key instead of being triggered again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use computepool_keeper::driver::{Driven, Driver, RetryPolicy, TransitionSink};
use computepool_keeper::keeperhub::{DeploymentContext, KeeperHubClient, KeeperHubError, KeeperHubKeeper};
use computepool_keeper::log::{AttemptAction, TransitionLog, TransitionRecord, TransitionState};
use computepool_keeper::standin::{ContractExecutor, StandIn, StandInConfig, Tamper};
use computepool_keeper::transition::{Keeper, KeeperError, Transition, TransitionKind};
use computepool_keeper::webhook::{
    self, ClaimedEffect, ConfirmError, EffectConfirmer, ReplayGuard, WebhookSink, WebhookState, WorkflowResult,
};
use computepool_keeper::workflows::{self, ContractCall};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const POOL: &str = "pool-1";
const SECRET: &[u8] = b"pool-1 webhook secret, 32 bytes!";

/// The stand-in's chain: records every contract call and the hashes it issued.
#[derive(Default)]
struct Chain {
    calls: Mutex<Vec<(String, String, Option<Value>)>>,
    issued: Mutex<HashSet<String>>,
}

impl ContractExecutor for Chain {
    fn execute(&self, input: &Value, call: &ContractCall, item: Option<&Value>) -> Result<String, String> {
        let key = input["idempotencyKey"].as_str().ok_or("no idempotencyKey in the trigger input")?.to_owned();
        let mut calls = self.calls.lock().unwrap();
        calls.push((key.clone(), call.function.clone(), item.cloned()));
        let hash = format!("0x{}", hex::encode(Sha256::digest(format!("{key}/{}/{}", call.node_id, calls.len()))));
        self.issued.lock().unwrap().insert(hash.clone());
        Ok(hash)
    }
}

impl Chain {
    fn calls_for(&self, key: &str) -> Vec<String> {
        self.calls.lock().unwrap().iter().filter(|(k, _, _)| k.split('#').next() == Some(key)).map(|(_, f, _)| f.clone()).collect()
    }
}

struct Confirmer(Arc<Chain>);

impl EffectConfirmer for Confirmer {
    fn confirm<'a>(&'a self, effect: &'a ClaimedEffect) -> BoxFuture<'a, Result<(), ConfirmError>> {
        Box::pin(async move {
            if self.0.issued.lock().unwrap().contains(&effect.tx_hash) {
                Ok(())
            } else {
                Err(ConfirmError::Unknown(effect.tx_hash.clone()))
            }
        })
    }
}

#[derive(Default)]
struct Delivered(Mutex<Vec<WorkflowResult>>);

impl WebhookSink for Delivered {
    fn deliver<'a>(&'a self, result: &'a WorkflowResult) -> BoxFuture<'a, Result<(), String>> {
        self.0.lock().unwrap().push(result.clone());
        Box::pin(async { Ok(()) })
    }
}

/// The pool's state machine on the polling path: it records a transition only once every effect the
/// keeper reported is one the chain knows (when it has a chain to ask).
#[derive(Default)]
struct Recorded(Mutex<Vec<String>>, Option<Arc<Chain>>);

impl TransitionSink for Recorded {
    fn record(&self, t: &TransitionRecord) -> Result<(), String> {
        if let Some(chain) = &self.1 {
            let effects = ClaimedEffect::of_record(t)?;
            if effects.is_empty() {
                return Err(format!("{} reports no transaction", t.idempotency_key));
            }
            for e in effects {
                if !chain.issued.lock().unwrap().contains(&e.tx_hash) {
                    return Err(format!("{} not on chain", e.tx_hash));
                }
            }
        }
        self.0.lock().unwrap().push(t.idempotency_key.clone());
        Ok(())
    }
}

struct Harness {
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    standin: StandIn,
    chain: Arc<Chain>,
    delivered: Arc<Delivered>,
    receiver: String,
    db: std::path::PathBuf,
}

fn workflow_id(kind: TransitionKind) -> String {
    format!("wf_{}", kind.as_str().replace('-', "_"))
}

fn harness() -> Harness {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chain = Arc::new(Chain::default());
    let delivered = Arc::new(Delivered::default());
    let workflows = workflows::builtin().unwrap().into_iter().map(|(k, w)| (workflow_id(k), (k, w))).collect();
    let config = StandInConfig {
        api_key: "kh_test_org_key".into(),
        webhook_key: "wfb_test_user_key".into(),
        workflows,
        secrets: HashMap::from([(POOL.to_owned(), SECRET.to_vec())]),
    };
    let replay = Arc::new(ReplayGuard::open(&dir.path().join("webhooks.db"), webhook::DEFAULT_WINDOW_S).unwrap());
    let state = Arc::new(WebhookState {
        secrets: Arc::new(HashMap::from([(POOL.to_owned(), SECRET.to_vec())])),
        replay,
        confirmer: Arc::new(Confirmer(chain.clone())),
        sink: delivered.clone(),
        window_s: webhook::DEFAULT_WINDOW_S,
        clock: WebhookState::system_clock(),
    });
    let (standin, receiver) = rt.block_on(async {
        let standin = StandIn::start(config, chain.clone()).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, webhook::router(state)).await.unwrap() });
        (standin, format!("http://{addr}/webhooks/keeperhub"))
    });
    let db = dir.path().join("keeper.db");
    Harness { _rt: rt, _dir: dir, standin, chain, delivered, receiver, db }
}

impl Harness {
    fn keeper(&self) -> Arc<KeeperHubKeeper> {
        let client = KeeperHubClient::new(&self.standin.url(), "kh_test_org_key", "wfb_test_user_key");
        let workflows = TransitionKind::ALL.into_iter().map(|k| (k, workflow_id(k))).collect();
        let context = DeploymentContext {
            chain_id: "16602".into(),
            callback_url: self.receiver.clone(),
            contracts: json!({"gdaV1Forwarder": "0x01", "coalition": "0x02", "poolInft": "0x03"}),
        };
        Arc::new(KeeperHubKeeper::new(client, workflows, context))
    }

    fn driver(&self, sink: Arc<Recorded>) -> Driver {
        let policy = RetryPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            poll_interval: Duration::from_millis(10),
            pending_timeout: Duration::from_secs(20),
            ..RetryPolicy::default()
        };
        Driver::new(Arc::new(TransitionLog::open(&self.db).unwrap()), self.keeper(), sink, policy)
    }

    fn wait_for_callbacks(&self, n: usize) -> Vec<computepool_keeper::standin::CallbackRecord> {
        let start = Instant::now();
        loop {
            let callbacks = self.standin.callbacks();
            if callbacks.len() >= n || start.elapsed() > Duration::from_secs(20) {
                return callbacks;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn transition(kind: TransitionKind) -> Transition {
    let payload = match kind {
        TransitionKind::Propose => json!({"proofs": ["0x01"], "dataDescriptions": ["weights"], "owner": "0x0a"}),
        TransitionKind::ActivateAndPool => json!({"token": "0x0b", "admin": "0x0c", "poolConfig": {"transferabilityForUnitsOwner": false, "distributionFromAnyAddress": false}, "tokenId": "1", "orchestrator": "0x0d"}),
        TransitionKind::StreamStart => json!({"pool": "0x0e", "token": "0x0b", "from": "0x0c", "flowRate": "1000", "members": [{"operator": "0xa1", "units": "1"}, {"operator": "0xa2", "units": "2"}]}),
        TransitionKind::StreamStop => json!({"pool": "0x0e", "token": "0x0b", "from": "0x0c"}),
        TransitionKind::HandleBreach => json!({"pool": "0x0e", "operator": "0xa2", "slashAmount": "100", "evidenceHash": "0x00"}),
    };
    Transition { kind, idempotency_key: format!("{POOL}/{}/1", kind.as_str()), pool_id: POOL.into(), payload }
}

fn recorded(d: Driven) -> TransitionRecord {
    match d {
        Driven::Done(r) if r.state == TransitionState::Recorded => r,
        other => panic!("not recorded: {other:?}"),
    }
}

#[test]
fn keeperhub_adapter_drives_all_five_workflows_and_the_receiver_refuses_bad_callbacks() {
    let h = harness();
    h.standin.fail_next_runs(TransitionKind::StreamStart, 1);
    h.standin.tamper_next_callbacks(&[Tamper::BadSignature, Tamper::StaleTimestamp, Tamper::Replay]);
    let sink = Arc::new(Recorded(Mutex::default(), Some(h.chain.clone())));
    let driver = h.driver(sink.clone());
    for kind in TransitionKind::ALL {
        let rec = recorded(driver.run(&transition(kind)).unwrap());
        assert!(rec.reference.as_deref().is_some_and(|r| r.starts_with("exec_")));
        let effects = ClaimedEffect::of_record(&rec).unwrap();
        assert_eq!(effects.len(), h.chain.calls_for(&rec.idempotency_key).len(), "{kind}: one reported transaction per call");
        if kind == TransitionKind::StreamStart {
            assert_eq!(rec.run, 2, "the failed run is retried as a second run");
            assert!(rec.attempts.iter().any(|a| a.action == AttemptAction::Status && a.outcome.as_deref() == Some("failed")));
        }
    }
    // Each transition's contract calls happened once (the failed run acted on nothing).
    let key = |k: TransitionKind| transition(k).idempotency_key;
    assert_eq!(h.chain.calls_for(&key(TransitionKind::Propose)), ["mint"]);
    assert_eq!(h.chain.calls_for(&key(TransitionKind::ActivateAndPool)), ["createPool", "authorizeUsage"]);
    assert_eq!(h.chain.calls_for(&key(TransitionKind::StreamStart)), ["updateMemberUnits", "updateMemberUnits", "distributeFlow"]);
    assert_eq!(h.chain.calls_for(&key(TransitionKind::StreamStop)), ["distributeFlow"]);
    assert_eq!(h.chain.calls_for(&key(TransitionKind::HandleBreach)), ["updateMemberUnits", "proposeBreach"]);
    let members: Vec<_> = h.chain.calls.lock().unwrap().iter().filter(|(_, f, _)| f == "updateMemberUnits").filter_map(|(_, _, item)| item.clone()).map(|i| i["operator"].clone()).collect();
    assert_eq!(members, [json!("0xa1"), json!("0xa2")]);
    assert_eq!(h.standin.executions().iter().filter(|(_, s)| s == "error").count(), 1);
    assert_eq!(sink.0.lock().unwrap().len(), 5);

    // Callbacks in run order: propose (bad signature), activate (stale), stream-start (replayed),
    // stream-stop and handle-breach (honest). The failed run sent none.
    let callbacks = h.wait_for_callbacks(6);
    let statuses: Vec<_> = callbacks.iter().map(|c| (c.tamper, c.status)).collect();
    assert_eq!(
        statuses,
        [
            (Some(Tamper::BadSignature), 401),
            (Some(Tamper::StaleTimestamp), 401),
            (Some(Tamper::Replay), 200),
            (Some(Tamper::Replay), 409),
            (None, 200),
            (None, 200)
        ]
    );
    let delivered: Vec<_> = h.delivered.0.lock().unwrap().iter().map(|r| r.kind.clone()).collect();
    assert_eq!(delivered, ["stream-start", "stream-stop", "handle-breach"]);
}

#[test]
fn a_callback_claiming_an_unknown_transaction_is_not_delivered() {
    let h = harness();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let body = json!({
        "deliveryId": "forged-1", "poolId": POOL, "idempotencyKey": "pool-1/stream-stop/9", "kind": "stream-stop",
        "status": "success", "chainId": "16602",
        "transactionHashes": [{"nodeId": "distribute-flow", "hash": format!("0x{}", "ab".repeat(32))}],
    })
    .to_string();
    let post = |body: &str, pool: &str| -> u16 {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        agent
            .post(&h.receiver)
            .header(webhook::HEADER_POOL, pool)
            .header(webhook::HEADER_TIMESTAMP, &now.to_string())
            .header(webhook::HEADER_DELIVERY, "forged-1")
            .header(webhook::HEADER_SIGNATURE, &webhook::sign(SECRET, now, body.as_bytes()))
            .send(body.as_bytes())
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(post(&body, POOL), 422, "an unconfirmed on-chain claim must not move the state machine");
    assert_eq!(post(&body, "pool-2"), 401, "a pool without a secret");
    assert!(h.delivered.0.lock().unwrap().is_empty());
}

#[test]
fn a_run_started_before_a_crash_is_found_by_its_key_not_triggered_again() {
    let h = harness();
    let t = transition(TransitionKind::StreamStop);
    {
        // The previous process wrote the transition, began the submit, KeeperHub started the run —
        // and the process died before it heard back.
        let log = TransitionLog::open(&h.db).unwrap();
        let id = log.write(&t).unwrap();
        log.begin_attempt(id, AttemptAction::Submit).unwrap();
        h.keeper().submit(&t).unwrap();
    }
    let sink = Arc::new(Recorded::default());
    let rec = recorded(h.driver(sink.clone()).resume().unwrap().remove(0));
    assert_eq!(h.standin.executions().len(), 1, "triggered again instead of found");
    assert_eq!(rec.reference.as_deref(), Some("exec_1"));
    let start = Instant::now();
    while h.chain.calls_for(&t.idempotency_key).is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.chain.calls_for(&t.idempotency_key), ["distributeFlow"]);
    assert_eq!(*sink.0.lock().unwrap(), std::slice::from_ref(&t.idempotency_key));
}

#[test]
fn keeperhub_auth_errors_are_typed_and_final() {
    let h = harness();
    // An org key where the webhook trigger wants a user key: KeeperHub's wrong_key_type 401.
    let client = KeeperHubClient::new(&h.standin.url(), "kh_test_org_key", "kh_test_org_key");
    let err = client.trigger(&workflow_id(TransitionKind::Propose), &json!({})).unwrap_err();
    assert!(matches!(&err, KeeperHubError::Http { status: 401, body } if body.contains("wrong_key_type")), "{err}");
    assert!(matches!(KeeperError::from(err), KeeperError::Rejected(_)));
    let client = KeeperHubClient::new(&h.standin.url(), "kh_wrong", "wfb_test_user_key");
    assert!(matches!(client.status("exec_1"), Err(KeeperHubError::Http { status: 401, .. })));
    assert!(matches!(client.status("../../etc"), Err(KeeperHubError::Decode(_))));
    let unreachable = KeeperHubClient::new("http://127.0.0.1:9", "kh_x", "wfb_x");
    let err = unreachable.trigger("wf_propose", &json!({})).unwrap_err();
    assert!(matches!(KeeperError::from(err), KeeperError::Unavailable(_)));
}

// ---- Killing the process (abort, no unwinding, no destructors) at each point, then resuming ----

const CHILD_MODE: &str = "COMPUTEPOOL_KEEPER_KILL_AT";

/// Where the child process aborts.
const KILL_AFTER_WRITTEN: &str = "written";
const KILL_AFTER_KEEPER_ACTED: &str = "keeper-acted";
const KILL_AFTER_ACTED_BEFORE_RECORDED: &str = "acted";

/// A keeper that kills the process right after KeeperHub accepted the run.
struct KillAfterSubmit(Arc<KeeperHubKeeper>);

impl Keeper for KillAfterSubmit {
    fn submit(&self, t: &Transition) -> Result<computepool_keeper::transition::Submission, KeeperError> {
        let _ = self.0.submit(t)?;
        std::process::abort();
    }
    fn status(&self, reference: &str) -> Result<computepool_keeper::transition::RunStatus, KeeperError> {
        self.0.status(reference)
    }
    fn lookup(&self, key: &str) -> Result<Option<computepool_keeper::transition::Submission>, KeeperError> {
        self.0.lookup(key)
    }
}

struct KillInRecord;

impl TransitionSink for KillInRecord {
    fn record(&self, _: &TransitionRecord) -> Result<(), String> {
        std::process::abort();
    }
}

/// The child process's side of the kill tests (run by them, not on its own).
#[test]
#[ignore = "entry point of the child process the kill tests start"]
fn kill_child() {
    let mode = std::env::var(CHILD_MODE).expect("started by a kill test");
    let client = KeeperHubClient::new(&std::env::var("STANDIN_URL").unwrap(), "kh_test_org_key", "wfb_test_user_key");
    let workflows = TransitionKind::ALL.into_iter().map(|k| (k, workflow_id(k))).collect();
    let context = DeploymentContext {
        chain_id: "16602".into(),
        callback_url: std::env::var("RECEIVER_URL").unwrap(),
        contracts: json!({"gdaV1Forwarder": "0x01", "coalition": "0x02", "poolInft": "0x03"}),
    };
    let keeper = Arc::new(KeeperHubKeeper::new(client, workflows, context));
    let log = Arc::new(TransitionLog::open(std::path::Path::new(&std::env::var("KEEPER_DB").unwrap())).unwrap());
    let policy = RetryPolicy { poll_interval: Duration::from_millis(10), ..RetryPolicy::default() };
    let t = transition(TransitionKind::StreamStart);
    match mode.as_str() {
        KILL_AFTER_WRITTEN => {
            log.write(&t).unwrap();
            std::process::abort();
        }
        KILL_AFTER_KEEPER_ACTED => {
            let driver = Driver::new(log, Arc::new(KillAfterSubmit(keeper)), Arc::new(Recorded::default()), policy);
            let _ = driver.run(&t);
        }
        KILL_AFTER_ACTED_BEFORE_RECORDED => {
            let driver = Driver::new(log, keeper, Arc::new(KillInRecord), policy);
            let _ = driver.run(&t);
        }
        other => panic!("unknown kill point {other}"),
    }
    unreachable!("the child should have been killed at {mode}");
}

fn kill_then_resume(kill_at: &str, expected_state: TransitionState) {
    let h = harness();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill_child", "--ignored", "--test-threads=1", "--nocapture"])
        .env(CHILD_MODE, kill_at)
        .env("STANDIN_URL", h.standin.url())
        .env("RECEIVER_URL", &h.receiver)
        .env("KEEPER_DB", &h.db)
        .status()
        .unwrap();
    assert!(!status.success(), "the child was not killed");
    let t = transition(TransitionKind::StreamStart);
    let state = TransitionLog::open(&h.db).unwrap().find_by_key(&t.idempotency_key).unwrap().unwrap().state;
    assert_eq!(state, expected_state, "where the kill left the log");

    let sink = Arc::new(Recorded::default());
    let rec = recorded(h.driver(sink.clone()).resume().unwrap().remove(0));
    assert_eq!(h.standin.executions().len(), 1, "the transition was triggered twice");
    assert_eq!(rec.reference.as_deref(), Some("exec_1"));
    // The run's contract calls, once: both members' units, then the flow.
    assert_eq!(h.chain.calls_for(&t.idempotency_key), ["updateMemberUnits", "updateMemberUnits", "distributeFlow"]);
    assert_eq!(*sink.0.lock().unwrap(), std::slice::from_ref(&t.idempotency_key));
}

#[test]
fn killed_after_written_before_acted_resumes_and_acts_once() {
    kill_then_resume(KILL_AFTER_WRITTEN, TransitionState::Written);
}

#[test]
fn killed_after_keeperhub_acted_before_the_log_knew_resumes_without_acting_again() {
    kill_then_resume(KILL_AFTER_KEEPER_ACTED, TransitionState::Written);
}

#[test]
fn killed_after_acted_before_recorded_resumes_and_records_once() {
    kill_then_resume(KILL_AFTER_ACTED_BEFORE_RECORDED, TransitionState::Acted);
}
