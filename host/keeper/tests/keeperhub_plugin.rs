//! The `keeperhub` keeper-adapter plugin (plugins/keepers/keeperhub) end to end on loopback, as
//! keeperhub_standin.rs does for the native client: the driver and `PluginKeeper` drive all five
//! workflow files on the KeeperHub stand-in through the wasm component (webhook trigger, run status and
//! execution list over the host's http capability, keys from the kv-store), a failing run is retried,
//! the runs' callbacks reach the webhook receiver, which refuses a bad signature, a stale timestamp and
//! a replay; and a process killed at each point resumes through the plugin without acting twice.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use computepool_keeper::driver::{Driven, Driver, RetryPolicy, TransitionSink};
use computepool_keeper::keeperhub::{DeploymentContext, KeeperHubPluginConfig};
use computepool_keeper::log::{AttemptAction, TransitionLog, TransitionRecord, TransitionState};
use computepool_keeper::plugin::PluginKeeper;
use computepool_keeper::standin::{ContractExecutor, StandIn, StandInConfig, Tamper};
use computepool_keeper::transition::{Keeper, KeeperError, Submission, Transition, TransitionKind};
use computepool_keeper::webhook::{self, ClaimedEffect, ConfirmError, EffectConfirmer, ReplayGuard, WebhookSink, WebhookState, WorkflowResult};
use computepool_keeper::workflows::{self, ContractCall};
use computepool_plugin_host::capability::Capability;
use computepool_plugin_host::{GrantPolicy, HostConfig, PluginHost};
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const POOL: &str = "pool-1";
const SECRET: &[u8] = b"pool-1 webhook secret, 32 bytes!";
const API_KEY: &str = "kh_test_org_key";
const WEBHOOK_KEY: &str = "wfb_test_user_key";
const PLUGIN: &str = "keeperhub";

/// plugins/keepers/keeperhub, checked to be built (scripts/build-plugins.sh, which `make test` runs).
fn plugin_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins/keepers/keeperhub");
    assert!(dir.join("keeperhub.wasm").is_file(), "{} is not built: run `bash scripts/build-plugins.sh`", dir.display());
    dir
}

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
            if self.0.issued.lock().unwrap().contains(&effect.tx_hash) { Ok(()) } else { Err(ConfirmError::Unknown(effect.tx_hash.clone())) }
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

fn workflow_id(kind: TransitionKind) -> String {
    format!("wf_{}", kind.as_str().replace('-', "_"))
}

fn workflow_ids() -> HashMap<TransitionKind, String> {
    TransitionKind::ALL.into_iter().map(|k| (k, workflow_id(k))).collect()
}

fn context(receiver: &str) -> DeploymentContext {
    DeploymentContext {
        chain_id: "16602".into(),
        callback_url: receiver.to_owned(),
        contracts: json!({"gdaV1Forwarder": "0x01", "coalition": "0x02", "poolInft": "0x03"}),
    }
}

/// A plugin host that grants `keeperhub` the kv-store and http to `grant` (host:port), with the
/// plugin loaded, and `config` (if any) written into its kv-store as the operator's config would be.
fn plugin_host(grant: &str, config: Option<&KeeperHubPluginConfig>) -> PluginHost {
    let mut grants = GrantPolicy::default();
    grants.plugins.insert(PLUGIN.into(), BTreeSet::from([Capability::KvStore, Capability::Http]));
    grants.http.insert(PLUGIN.into(), BTreeSet::from([grant.parse().unwrap()]));
    let host = PluginHost::new(HostConfig { grants, ..HostConfig::default() }).unwrap();
    let plugin = host.load_plugin(&plugin_dir()).unwrap();
    if let Some(config) = config {
        config.store(plugin.as_keeper().unwrap().kv()).unwrap();
    }
    host
}

fn plugin_keeper(standin_url: &str, receiver: &str) -> Arc<PluginKeeper> {
    let grant = standin_url.trim_start_matches("http://");
    let config = KeeperHubPluginConfig::new(standin_url, API_KEY, WEBHOOK_KEY, &workflow_ids());
    let host = plugin_host(grant, Some(&config));
    Arc::new(PluginKeeper::from_host(&host, PLUGIN, context(receiver)).unwrap())
}

struct Harness {
    _rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    standin: StandIn,
    chain: Arc<Chain>,
    delivered: Arc<Delivered>,
    receiver: String,
    db: PathBuf,
}

fn harness() -> Harness {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let chain = Arc::new(Chain::default());
    let delivered = Arc::new(Delivered::default());
    let workflows = workflows::builtin().unwrap().into_iter().map(|(k, w)| (workflow_id(k), (k, w))).collect();
    let config = StandInConfig {
        api_key: API_KEY.into(),
        webhook_key: WEBHOOK_KEY.into(),
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

fn policy() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        poll_interval: Duration::from_millis(10),
        pending_timeout: Duration::from_secs(20),
        ..RetryPolicy::default()
    }
}

impl Harness {
    fn keeper(&self) -> Arc<PluginKeeper> {
        plugin_keeper(&self.standin.url(), &self.receiver)
    }

    fn driver(&self, sink: Arc<Recorded>) -> Driver {
        Driver::new(Arc::new(TransitionLog::open(&self.db).unwrap()), self.keeper(), sink, policy())
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
fn keeperhub_plugin_drives_all_five_workflows_and_the_receiver_refuses_bad_callbacks() {
    let h = harness();
    h.standin.fail_next_runs(TransitionKind::StreamStart, 1);
    h.standin.tamper_next_callbacks(&[Tamper::BadSignature, Tamper::StaleTimestamp, Tamper::Replay]);
    let sink = Arc::new(Recorded(Mutex::default(), Some(h.chain.clone())));
    let driver = h.driver(sink.clone());
    for kind in TransitionKind::ALL {
        let rec = recorded(driver.run(&transition(kind)).unwrap());
        assert!(rec.reference.as_deref().is_some_and(|r| r.starts_with("exec_")), "{rec:?}");
        let effects = ClaimedEffect::of_record(&rec).unwrap();
        assert_eq!(effects.len(), h.chain.calls_for(&rec.idempotency_key).len(), "{kind}: one reported transaction per call");
        if kind == TransitionKind::StreamStart {
            assert_eq!(rec.run, 2, "the failed run is retried as a second run");
            let failed = rec.attempts.iter().find(|a| a.action == AttemptAction::Status && a.outcome.as_deref() == Some("failed")).expect("the failed run was seen");
            assert!(failed.detail.as_deref().is_some_and(|d| d.contains("scripted failure")), "{failed:?}");
        }
    }
    // Each transition's contract calls happened once (the failed run acted on nothing), with the
    // payload the plugin passed on as the trigger input (the members of the For Each).
    let key = |k: TransitionKind| transition(k).idempotency_key;
    assert_eq!(h.chain.calls_for(&key(TransitionKind::Propose)), ["mint"]);
    assert_eq!(h.chain.calls_for(&key(TransitionKind::ActivateAndPool)), ["createPool", "authorizeUsage"]);
    assert_eq!(h.chain.calls_for(&key(TransitionKind::StreamStart)), ["updateMemberUnits", "updateMemberUnits", "distributeFlow"]);
    assert_eq!(h.chain.calls_for(&key(TransitionKind::StreamStop)), ["distributeFlow"]);
    assert_eq!(h.chain.calls_for(&key(TransitionKind::HandleBreach)), ["updateMemberUnits", "proposeBreach"]);
    let members: Vec<_> = h.chain.calls.lock().unwrap().iter().filter(|(_, f, _)| f == "updateMemberUnits").filter_map(|(_, _, item)| item.clone()).map(|i| i["operator"].clone()).collect();
    assert_eq!(members, [json!("0xa1"), json!("0xa2")]);
    let executions = h.standin.executions();
    assert_eq!(executions.len(), 6, "five transitions, one retried: {executions:?}");
    assert_eq!(executions.iter().filter(|(_, s)| s == "error").count(), 1);
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
fn the_plugin_triggers_once_per_key_and_finds_a_run_it_did_not_hear_back_from() {
    let h = harness();
    let keeper = h.keeper();
    let t = transition(TransitionKind::StreamStop);
    let first = keeper.submit(&t).unwrap();
    assert_eq!(keeper.submit(&t).unwrap(), first, "a repeated submit returns the first run");
    assert_eq!(h.standin.executions().len(), 1, "KeeperHub's webhook is not idempotent: the plugin must not trigger twice");
    assert_eq!(keeper.lookup(&t.idempotency_key).unwrap(), Some(first.clone()));
    // A fresh plugin host (the process restarted, its kv-store in memory gone) finds the run in
    // KeeperHub's execution list by the trigger input's idempotencyKey.
    let restarted = h.keeper();
    assert_eq!(restarted.lookup(&t.idempotency_key).unwrap(), Some(first));
    assert_eq!(restarted.lookup("pool-1/stream-stop/404").unwrap(), None);
    assert_eq!(h.standin.executions().len(), 1);
}

#[test]
fn a_run_started_before_a_crash_is_found_by_its_key_not_triggered_again() {
    let h = harness();
    let t = transition(TransitionKind::StreamStop);
    {
        // The previous process wrote the transition, began the submit, KeeperHub started the run —
        // and the process died before it heard back (its plugin host, and the plugin's memory, with it).
        let log = TransitionLog::open(&h.db).unwrap();
        let id = log.write(&t).unwrap();
        log.begin_attempt(id, AttemptAction::Submit).unwrap();
        h.keeper().submit(&t).unwrap();
    }
    let sink = Arc::new(Recorded::default());
    let rec = recorded(h.driver(sink.clone()).resume().unwrap().remove(0));
    assert_eq!(h.standin.executions().len(), 1, "triggered again instead of found");
    assert_eq!(rec.reference.as_deref(), Some("exec_1"));
    assert!(rec.attempts.iter().any(|a| a.action == AttemptAction::Lookup && a.outcome.as_deref() == Some("found")));
    let start = Instant::now();
    while h.chain.calls_for(&t.idempotency_key).is_empty() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.chain.calls_for(&t.idempotency_key), ["distributeFlow"]);
    assert_eq!(*sink.0.lock().unwrap(), std::slice::from_ref(&t.idempotency_key));
}

#[test]
fn config_grant_and_auth_failures_are_typed() {
    let h = harness();
    let url = h.standin.url();
    let grant = url.trim_start_matches("http://").to_owned();
    let t = transition(TransitionKind::Propose);
    let keeper = |host: &PluginHost| PluginKeeper::from_host(host, PLUGIN, context(&h.receiver)).unwrap();

    // No config written yet: unavailable (the operator can fix it; the transition waits), nothing sent.
    let err = keeper(&plugin_host(&grant, None)).submit(&t).unwrap_err();
    assert!(matches!(&err, KeeperError::Unavailable(m) if m.contains("not configured")), "{err}");
    // The keys swapped: the plugin refuses before KeeperHub would.
    let swapped = KeeperHubPluginConfig::new(&url, WEBHOOK_KEY, API_KEY, &workflow_ids());
    let err = keeper(&plugin_host(&grant, Some(&swapped))).submit(&t).unwrap_err();
    assert!(matches!(&err, KeeperError::Unavailable(m) if m.contains("wfb_")), "{err}");
    // A wrong user key: KeeperHub's 401 is final.
    let wrong = KeeperHubPluginConfig::new(&url, API_KEY, "wfb_wrong", &workflow_ids());
    let err = keeper(&plugin_host(&grant, Some(&wrong))).submit(&t).unwrap_err();
    assert!(matches!(&err, KeeperError::Rejected(m) if m.contains("401")), "{err}");
    // KeeperHub's host not granted: the host refuses the request, and says where to grant it.
    let config = KeeperHubPluginConfig::new(&url, API_KEY, WEBHOOK_KEY, &workflow_ids());
    let err = keeper(&plugin_host("127.0.0.1:9", Some(&config))).submit(&t).unwrap_err();
    assert!(matches!(&err, KeeperError::Unavailable(m) if m.contains("[grants.http] keeperhub")), "{err}");
    // Granted but nobody listening: unavailable, retrying is safe.
    let down = KeeperHubPluginConfig::new("http://127.0.0.1:9", API_KEY, WEBHOOK_KEY, &workflow_ids());
    let err = keeper(&plugin_host("127.0.0.1:9", Some(&down))).submit(&t).unwrap_err();
    assert!(matches!(&err, KeeperError::Unavailable(m) if m.contains("unreachable")), "{err}");
    // A run id that would change the URL path never reaches KeeperHub.
    let good = keeper(&plugin_host(&grant, Some(&config)));
    assert!(matches!(good.status("../../etc"), Err(KeeperError::Rejected(m)) if m.contains("not a KeeperHub id")));
    assert!(matches!(good.status("exec_404"), Err(KeeperError::Rejected(m)) if m.contains("404")));
    assert!(h.standin.executions().is_empty(), "no failed call started a run");
}

// ---- Killing the process (abort, no unwinding, no destructors) at each point, then resuming ----

const CHILD_MODE: &str = "COMPUTEPOOL_KEEPER_PLUGIN_KILL_AT";

/// Where the child process aborts.
const KILL_AFTER_WRITTEN: &str = "written";
const KILL_AFTER_KEEPER_ACTED: &str = "keeper-acted";
const KILL_AFTER_ACTED_BEFORE_RECORDED: &str = "acted";

/// A keeper that kills the process right after the plugin's KeeperHub accepted the run.
struct KillAfterSubmit(Arc<PluginKeeper>);

impl Keeper for KillAfterSubmit {
    fn submit(&self, t: &Transition) -> Result<Submission, KeeperError> {
        let _ = self.0.submit(t)?;
        std::process::abort();
    }
    fn status(&self, reference: &str) -> Result<computepool_keeper::transition::RunStatus, KeeperError> {
        self.0.status(reference)
    }
    fn lookup(&self, key: &str) -> Result<Option<Submission>, KeeperError> {
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
    let keeper = plugin_keeper(&std::env::var("STANDIN_URL").unwrap(), &std::env::var("RECEIVER_URL").unwrap());
    let log = Arc::new(TransitionLog::open(Path::new(&std::env::var("KEEPER_DB").unwrap())).unwrap());
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

    // The parent's plugin host is new: nothing of the child's plugin memory survives the kill.
    let sink = Arc::new(Recorded::default());
    let rec = recorded(h.driver(sink.clone()).resume().unwrap().remove(0));
    assert_eq!(h.standin.executions().len(), 1, "the transition was triggered twice");
    assert_eq!(rec.reference.as_deref(), Some("exec_1"));
    // The run's contract calls, once: both members' units, then the flow.
    let start = Instant::now();
    while h.chain.calls_for(&t.idempotency_key).len() < 3 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(h.chain.calls_for(&t.idempotency_key), ["updateMemberUnits", "updateMemberUnits", "distributeFlow"]);
    assert_eq!(*sink.0.lock().unwrap(), std::slice::from_ref(&t.idempotency_key));
}

#[test]
fn killed_after_written_before_acted_resumes_through_the_plugin_and_acts_once() {
    kill_then_resume(KILL_AFTER_WRITTEN, TransitionState::Written);
}

#[test]
fn killed_after_keeperhub_acted_before_the_log_knew_resumes_through_the_plugin_without_acting_again() {
    kill_then_resume(KILL_AFTER_KEEPER_ACTED, TransitionState::Written);
}

#[test]
fn killed_after_acted_before_recorded_resumes_through_the_plugin_and_records_once() {
    kill_then_resume(KILL_AFTER_ACTED_BEFORE_RECORDED, TransitionState::Acted);
}
