//! The local keeper plugin (plugins/keepers/local) on a real chain: anvil with Superfluid, the test USDC,
//! the pool INFT and the pool's Coalition (`PaidDevnet`). The driver runs all five workflow files through
//! it, and each transition's calls are checked in the chain's state (the INFT minted and authorised, a GDA
//! pool created, member units and the flow rate set and stopped, the breaching operator's units zeroed and
//! its stake slashed). Then a child process is killed at each point — after the log wrote the transition,
//! after the keeper acted on chain but before the log knew, after the log said acted but before it was
//! recorded — and after the restart each transition happened exactly once on chain: the orchestrator
//! key's nonce moved by the workflow's number of calls, and one `Slashed` event. Killed while a call was
//! being sent (its intent logged, the transaction never relayed), the transition stays unsettled after the
//! restart: the host will not send an in-doubt call again and the keeper does not guess.
//!
//! `make test` provides anvil (COMPUTEPOOL_CHAIN_TOOLS) and sets COMPUTEPOOL_REQUIRE_ANVIL=1, so these
//! cannot skip there; scripts/build-plugins.sh builds the plugin first.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use computepool_chain::alloy::primitives::{Address, B256, U256};
use computepool_chain::alloy::providers::Provider;
use computepool_chain::alloy::rpc::types::Filter;
use computepool_chain::alloy::signers::local::PrivateKeySigner;
use computepool_chain::alloy::sol_types::SolEvent;
use computepool_chain::bindings::{Coalition, IGeneralDistributionAgreementV1, ISuperfluidPool, PoolINFT, TestUSD};
use computepool_chain::client::parse_key;
use computepool_chain::oracle::{preimage_proof, verifier_domain};
use computepool_chain::{Chain, ChainTools, DEVNET_CHAIN_ID, Gda};
use computepool_keeper::driver::{Driven, Driver, RetryPolicy, TransitionSink};
use computepool_keeper::keeperhub::DeploymentContext;
use computepool_keeper::log::{TransitionLog, TransitionRecord, TransitionState};
use computepool_keeper::transition::{Keeper, KeeperError, RunState, RunStatus, Submission, Transition, TransitionKind};
use computepool_keeper::webhook::ClaimedEffect;
use computepool_pay::devnet::{PaidDevnet, PaidDevnetOptions, usdc};
use computepool_plugin_host::keeper::{self as plugin, KeeperCallError, KeeperPlugin};
use computepool_plugin_host::{ChainService, HostConfig, PluginHost, blocking};
use serde_json::{Value, json};

const POOL: &str = "pool-1";
const KEEPER_ID: &str = "local";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tools() -> Option<ChainTools> {
    ChainTools::for_tests(&repo())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// The `Keeper` over the plugin, as the host's driver sees it: the plugin's payload is the full trigger
/// body KeeperHub's webhook would get (the transition plus the deployment context).
struct LocalKeeper {
    plugin: Arc<KeeperPlugin>,
    context: DeploymentContext,
}

fn keeper_error(e: KeeperCallError) -> KeeperError {
    match e {
        KeeperCallError::Keeper { error: plugin::KeeperError::InvalidTransition(m), .. } => KeeperError::InvalidTransition(m),
        KeeperCallError::Keeper { error: plugin::KeeperError::Unavailable(m), .. } => KeeperError::Unavailable(m),
        KeeperCallError::Keeper { error: plugin::KeeperError::Rejected(m), .. } => KeeperError::Rejected(m),
        // A trap or a limit: the instance is replaced; the run record in the kv store is intact.
        KeeperCallError::Plugin(e) => KeeperError::Unavailable(e.to_string()),
    }
}

impl Keeper for LocalKeeper {
    fn submit(&self, t: &Transition) -> Result<Submission, KeeperError> {
        let kind = match t.kind {
            TransitionKind::Propose => plugin::TransitionKind::Propose,
            TransitionKind::ActivateAndPool => plugin::TransitionKind::ActivateAndPool,
            TransitionKind::StreamStart => plugin::TransitionKind::StreamStart,
            TransitionKind::StreamStop => plugin::TransitionKind::StreamStop,
            TransitionKind::HandleBreach => plugin::TransitionKind::HandleBreach,
        };
        let body = json!({
            "idempotencyKey": t.idempotency_key, "poolId": t.pool_id, "kind": t.kind.as_str(), "payload": t.payload,
            "chainId": self.context.chain_id, "callbackUrl": self.context.callback_url, "contracts": self.context.contracts,
        });
        let transition = plugin::Transition {
            kind,
            idempotency_key: t.idempotency_key.clone(),
            pool_id: t.pool_id.clone(),
            payload: body.to_string(),
        };
        self.plugin.submit(&transition).map(|s| Submission { reference: s.reference }).map_err(keeper_error)
    }

    fn status(&self, reference: &str) -> Result<RunStatus, KeeperError> {
        let s = self.plugin.status(reference).map_err(keeper_error)?;
        let state = match s.state {
            plugin::TransitionState::Pending => RunState::Pending,
            plugin::TransitionState::Succeeded => RunState::Succeeded,
            plugin::TransitionState::Failed => RunState::Failed,
        };
        Ok(RunStatus { state, detail: s.detail })
    }

    fn lookup(&self, key: &str) -> Result<Option<Submission>, KeeperError> {
        Ok(self.plugin.lookup(key).map_err(keeper_error)?.map(|s| Submission { reference: s.reference }))
    }
}

/// What a process needs to run the keeper: the chain, the key it signs with, the operator's grants and
/// the state directory (the plugins' kv store and the chain capability's send log).
#[derive(Clone)]
struct KeeperSetup {
    rpc: String,
    key_hex: String,
    grants: String,
    contracts: Value,
    state: PathBuf,
}

impl KeeperSetup {
    fn of(devnet: &PaidDevnet, state: &Path) -> Self {
        Self {
            rpc: devnet.rpc_url().to_string(),
            key_hex: hex::encode(devnet.orchestrator.to_bytes()),
            grants: devnet.rail_config(Some(KEEPER_ID)),
            contracts: devnet.keeper_contracts(),
            state: state.to_path_buf(),
        }
    }

    fn to_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("LK_RPC", self.rpc.clone()),
            ("LK_KEY", self.key_hex.clone()),
            ("LK_GRANTS", self.grants.clone()),
            ("LK_CONTRACTS", self.contracts.to_string()),
            ("LK_STATE", self.state.display().to_string()),
        ]
    }

    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the parent test"));
        Self {
            rpc: var("LK_RPC"),
            key_hex: var("LK_KEY"),
            grants: var("LK_GRANTS"),
            contracts: serde_json::from_str(&var("LK_CONTRACTS")).unwrap(),
            state: PathBuf::from(var("LK_STATE")),
        }
    }

    /// A fresh plugin host with the local keeper loaded, as a restarted process would make it.
    fn keeper(&self) -> (PluginHost, Arc<LocalKeeper>) {
        let key: PrivateKeySigner = parse_key(&self.key_hex, "the test key").unwrap();
        let rpc = self.rpc.clone();
        // Connected on the plugin host's I/O runtime, which outlives every call (ChainService::new).
        let chain = blocking::block_on(async move { Chain::connect(&rpc, Some(DEVNET_CHAIN_ID), key).await }, Duration::from_secs(60))
            .expect("connected in time")
            .expect("chain");
        let service = ChainService::new(chain, Some(&self.state)).unwrap();
        let mut config = HostConfig::from_toml(&self.grants).unwrap();
        config.state_dir = Some(self.state.clone());
        config.chain = Some(Arc::new(service));
        let host = PluginHost::new(config).unwrap();
        host.load_plugin(&repo().join("plugins/keepers/local")).expect("the local keeper loads (scripts/build-plugins.sh builds it)");
        let plugin = host.keeper(KEEPER_ID).expect("a keeper-adapter plugin");
        let context = DeploymentContext {
            chain_id: DEVNET_CHAIN_ID.to_string(),
            // The local keeper reports through `status`; it sends no webhook.
            callback_url: "http://127.0.0.1:9/webhooks/keeperhub".into(),
            contracts: self.contracts.clone(),
        };
        (host, Arc::new(LocalKeeper { plugin, context }))
    }
}

/// The pool's state machine on the polling path: records a transition once, with what it claimed.
#[derive(Default)]
struct Recorded(Mutex<Vec<(String, Vec<String>)>>);

impl TransitionSink for Recorded {
    fn record(&self, t: &TransitionRecord) -> Result<(), String> {
        let hashes = ClaimedEffect::of_record(t)?.into_iter().map(|e| e.tx_hash).collect();
        let mut recorded = self.0.lock().unwrap();
        if !recorded.iter().any(|(k, _)| *k == t.idempotency_key) {
            recorded.push((t.idempotency_key.clone(), hashes));
        }
        Ok(())
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy { poll_interval: Duration::from_millis(20), initial_backoff: Duration::from_millis(20), ..RetryPolicy::default() }
}

fn recorded(d: Driven) -> TransitionRecord {
    match d {
        Driven::Done(r) if r.state == TransitionState::Recorded => r,
        other => panic!("expected a recorded transition, got {other:?}"),
    }
}

fn transition(kind: TransitionKind, key: &str, payload: Value) -> Transition {
    Transition { kind, idempotency_key: key.into(), pool_id: POOL.into(), payload }
}

fn hex_of(a: Address) -> String {
    format!("{a:#x}")
}

/// Reads the chain from the test's runtime.
struct Reader<'a> {
    rt: &'a tokio::runtime::Runtime,
    chain: Chain,
}

impl Reader<'_> {
    fn nonce(&self, who: Address) -> u64 {
        self.rt.block_on(async { self.chain.provider().get_transaction_count(who).await }).unwrap()
    }

    fn receipt(&self, hash: &str) -> computepool_chain::alloy::rpc::types::TransactionReceipt {
        self.rt.block_on(async { self.chain.provider().get_transaction_receipt(hash.parse().unwrap()).await }).unwrap().expect("mined")
    }

    fn slashed_events(&self, coalition: Address) -> Vec<Coalition::Slashed> {
        let filter = Filter::new().address(coalition).event_signature(Coalition::Slashed::SIGNATURE_HASH).from_block(0);
        let logs = self.rt.block_on(async { self.chain.provider().get_logs(&filter).await }).unwrap();
        logs.iter().map(|l| Coalition::Slashed::decode_log_data(l.data()).unwrap()).collect()
    }

    fn stake(&self, coalition: Address, operator: Address) -> U256 {
        let c = Coalition::new(coalition, self.chain.provider());
        self.rt.block_on(async { c.memberOf(operator).call().await }).unwrap().stake
    }
}

fn reader<'a>(rt: &'a tokio::runtime::Runtime, devnet: &PaidDevnet) -> Reader<'a> {
    let chain = rt.block_on(Chain::connect(devnet.rpc_url(), Some(DEVNET_CHAIN_ID), devnet.payers[0].clone())).unwrap();
    Reader { rt, chain }
}

fn handle_breach(devnet: &PaidDevnet, key: &str) -> Transition {
    transition(
        TransitionKind::HandleBreach,
        key,
        json!({
            "pool": hex_of(devnet.gda_pool), "operator": hex_of(devnet.operators[1].address()),
            "slashAmount": usdc(7).to_string(), "evidenceHash": format!("{:#x}", B256::repeat_byte(0xe5)),
        }),
    )
}

#[test]
fn the_five_workflows_run_through_the_local_keeper_and_act_on_chain() {
    let Some(tools) = tools() else { return };
    let rt = runtime();
    let devnet = rt.block_on(PaidDevnet::start(&tools, &PaidDevnetOptions::default())).expect("devnet");
    let state = tempfile::tempdir().unwrap();
    let setup = KeeperSetup::of(&devnet, state.path());
    let (_host, keeper) = setup.keeper();
    let sink = Arc::new(Recorded::default());
    let log = Arc::new(TransitionLog::open(&state.path().join("keeper.db")).unwrap());
    let driver = Driver::new(log, keeper.clone(), sink.clone(), policy());
    let r = reader(&rt, &devnet);
    let orchestrator = devnet.orchestrator.address();
    let (op0, op1) = (devnet.operators[0].address(), devnet.operators[1].address());
    let nonce_before = r.nonce(orchestrator);

    // propose: PoolINFT.mint with an oracle proof of the pool's data.
    let oracle = devnet.anvil.keys().last().unwrap().clone();
    let data_hash = B256::repeat_byte(0x5a);
    let domain = verifier_domain(DEVNET_CHAIN_ID, devnet.deployment.oracle_verifier);
    let proof = preimage_proof(&oracle, &domain, data_hash, B256::ZERO).unwrap();
    let rec = recorded(
        driver
            .run(&transition(
                TransitionKind::Propose,
                "pool-1/propose/1",
                json!({"proofs": [proof.to_string()], "dataDescriptions": ["smollm2-135m-instruct shard plan"], "owner": hex_of(orchestrator)}),
            ))
            .unwrap(),
    );
    let inft = PoolINFT::new(devnet.deployment.pool_inft, r.chain.provider());
    let minted = r.receipt(&ClaimedEffect::of_record(&rec).unwrap()[0].tx_hash);
    let token_id = minted.decoded_log::<PoolINFT::Minted>().expect("Minted").data.tokenId;
    assert_eq!(rt.block_on(async { inft.ownerOf(token_id).call().await }).unwrap(), orchestrator);
    assert_eq!(rt.block_on(async { inft.dataHashesOf(token_id).call().await }).unwrap(), vec![data_hash]);

    // activate-and-pool: a new GDA pool (the tuple argument from an object) and the INFT's usage grant.
    let user = devnet.payers[1].address();
    let rec = recorded(
        driver
            .run(&transition(
                TransitionKind::ActivateAndPool,
                "pool-1/activate/1",
                json!({"token": hex_of(devnet.deployment.usdcx), "admin": hex_of(orchestrator),
                       "poolConfig": {"transferabilityForUnitsOwner": false, "distributionFromAnyAddress": false},
                       "tokenId": token_id.to_string(), "orchestrator": hex_of(user)}),
            ))
            .unwrap(),
    );
    let effects = ClaimedEffect::of_record(&rec).unwrap();
    assert_eq!(effects.iter().map(|e| e.node_id.as_str()).collect::<Vec<_>>(), ["create-gda-pool", "authorize-orchestrator"]);
    let created = r.receipt(&effects[0].tx_hash).decoded_log::<IGeneralDistributionAgreementV1::PoolCreated>().expect("PoolCreated").data;
    assert_eq!((created.token, created.admin), (devnet.deployment.usdcx, orchestrator));
    assert!(rt.block_on(async { inft.isAuthorized(token_id, user).call().await }).unwrap());

    // stream-start on the devnet's pool (its operators are connected): units 1 and 2, then the rate.
    let gda = Gda::new(&r.chain, &devnet.deployment.superfluid);
    let rate: i128 = 3_000_000_000;
    let flow = |kind, key: &str, extra: Value| {
        let mut p = json!({"pool": hex_of(devnet.gda_pool), "token": hex_of(devnet.deployment.usdcx), "from": hex_of(orchestrator)});
        p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        transition(kind, key, p)
    };
    let start = flow(
        TransitionKind::StreamStart,
        "pool-1/stream-start/1",
        json!({"flowRate": rate.to_string(), "members": [{"operator": hex_of(op0), "units": "1"}, {"operator": hex_of(op1), "units": "2"}]}),
    );
    let rec = recorded(driver.run(&start).unwrap());
    assert_eq!(ClaimedEffect::of_record(&rec).unwrap().len(), 3, "two members' units, then the flow");
    assert_eq!(rt.block_on(gda.total_units(devnet.gda_pool)).unwrap(), 3);
    assert_eq!(rt.block_on(gda.flow_rate(devnet.deployment.usdcx, orchestrator, devnet.gda_pool)).unwrap(), rate);
    assert_eq!(rt.block_on(gda.member_flow_rate(devnet.gda_pool, op1)).unwrap(), rate / 3 * 2);

    // stream-stop: the flow to zero.
    recorded(driver.run(&flow(TransitionKind::StreamStop, "pool-1/stream-stop/1", json!({}))).unwrap());
    assert_eq!(rt.block_on(gda.flow_rate(devnet.deployment.usdcx, orchestrator, devnet.gda_pool)).unwrap(), 0);

    // handle-breach: operator 1's units to 0, and its stake slashed by the proposal (threshold 1).
    let stake_before = r.stake(devnet.coalition, op1);
    assert_eq!(stake_before, usdc(100));
    let usdc_token = TestUSD::new(devnet.deployment.usdc.address, r.chain.provider());
    let recipient_before = rt.block_on(async { usdc_token.balanceOf(orchestrator).call().await }).unwrap();
    recorded(driver.run(&handle_breach(&devnet, "pool-1/handle-breach/1")).unwrap());
    let units = ISuperfluidPool::new(devnet.gda_pool, r.chain.provider());
    assert_eq!(rt.block_on(async { units.getUnits(op1).call().await }).unwrap(), 0);
    assert_eq!(rt.block_on(async { units.getUnits(op0).call().await }).unwrap(), 1, "the others keep theirs");
    assert_eq!(r.stake(devnet.coalition, op1), usdc(93));
    let slashed = r.slashed_events(devnet.coalition);
    assert_eq!(slashed.len(), 1);
    assert_eq!((slashed[0].operator, slashed[0].amount), (op1, usdc(7)));
    assert_eq!(rt.block_on(async { usdc_token.balanceOf(orchestrator).call().await }).unwrap(), recipient_before + usdc(7));

    // Nine calls in all (1 + 2 + 3 + 1 + 2), each once; every claimed hash is a successful transaction.
    assert_eq!(r.nonce(orchestrator) - nonce_before, 9);
    let claimed: Vec<String> = sink.0.lock().unwrap().iter().flat_map(|(_, h)| h.clone()).collect();
    assert_eq!(claimed.len(), 9);
    assert!(claimed.iter().all(|h| r.receipt(h).status()));

    // Again, the same transitions: the log has them recorded and the keeper its runs; nothing is sent.
    recorded(driver.run(&start).unwrap());
    let again = keeper.submit(&start).unwrap();
    assert_eq!(again.reference, "run/pool-1/stream-start/1");
    assert_eq!(r.nonce(orchestrator) - nonce_before, 9);
}

#[test]
fn a_payload_the_workflow_cannot_encode_fails_without_touching_the_chain() {
    let Some(tools) = tools() else { return };
    let rt = runtime();
    let devnet = rt.block_on(PaidDevnet::start(&tools, &PaidDevnetOptions::default())).expect("devnet");
    let state = tempfile::tempdir().unwrap();
    let (_host, keeper) = KeeperSetup::of(&devnet, state.path()).keeper();
    let log = Arc::new(TransitionLog::open(&state.path().join("keeper.db")).unwrap());
    let driver = Driver::new(log, keeper, Arc::new(Recorded::default()), policy());
    let r = reader(&rt, &devnet);
    let nonce_before = r.nonce(devnet.orchestrator.address());
    let mut t = handle_breach(&devnet, "pool-1/handle-breach/bad");
    t.payload["evidenceHash"] = json!("0x1234");
    let Driven::Done(rec) = driver.run(&t).unwrap() else { panic!("not settled") };
    assert_eq!(rec.state, TransitionState::Failed);
    let detail = rec.detail.unwrap();
    assert!(detail.contains("propose-breach") && detail.contains("evidence"), "{detail}");
    assert_eq!(r.nonce(devnet.orchestrator.address()), nonce_before, "nothing was sent, not even the units");
}

// ---- Killing the process (abort: no unwinding, no destructors) at each point, then resuming ----

const CHILD_MODE: &str = "COMPUTEPOOL_LOCAL_KEEPER_KILL_AT";
const KILL_AFTER_WRITTEN: &str = "written";
const KILL_AFTER_KEEPER_ACTED: &str = "keeper-acted";
const KILL_AFTER_ACTED_BEFORE_RECORDED: &str = "acted";
const KILL_WHILE_SENDING_THE_SECOND_CALL: &str = "mid-run";

/// A JSON-RPC relay to anvil that kills the process when the `n`-th `eth_sendRawTransaction` arrives,
/// before relaying it: the host has logged that send's intent, the chain never sees it.
fn kill_on_raw_send(anvil: String, n: usize) -> String {
    use axum::body::Bytes;
    let sends = Arc::new(Mutex::new(0usize));
    let relay = move |body: Bytes| {
        let (anvil, sends) = (anvil.clone(), sends.clone());
        async move {
            if String::from_utf8_lossy(&body).contains("eth_sendRawTransaction") {
                let mut count = sends.lock().unwrap();
                *count += 1;
                if *count == n {
                    std::process::abort();
                }
            }
            let answer = tokio::task::spawn_blocking(move || {
                let mut response = ureq::post(&anvil).header("Content-Type", "application/json").send(&body[..]).expect("anvil answers");
                response.body_mut().read_to_vec().expect("anvil's answer")
            })
            .await
            .unwrap();
            ([(axum::http::header::CONTENT_TYPE, "application/json")], answer)
        }
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let rt = runtime();
        rt.block_on(async move {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, axum::Router::new().fallback(axum::routing::post(relay))).await.unwrap();
        });
    });
    url
}

/// Kills the process as soon as the keeper's submit returns: the calls are mined, the log does not know.
struct KillAfterSubmit(Arc<LocalKeeper>);

impl Keeper for KillAfterSubmit {
    fn submit(&self, t: &Transition) -> Result<Submission, KeeperError> {
        let _ = self.0.submit(t)?;
        std::process::abort();
    }
    fn status(&self, reference: &str) -> Result<RunStatus, KeeperError> {
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

/// The child process's side of the kill tests (started by them, not on its own).
#[test]
#[ignore = "entry point of the child process the kill tests start"]
fn local_keeper_kill_child() {
    let mode = std::env::var(CHILD_MODE).expect("started by a kill test");
    let setup = KeeperSetup::from_env();
    let t: Transition = serde_json::from_str(&std::env::var("LK_TRANSITION").unwrap()).unwrap();
    let log = Arc::new(TransitionLog::open(&setup.state.join("keeper.db")).unwrap());
    let (_host, keeper) = setup.keeper();
    match mode.as_str() {
        KILL_AFTER_WRITTEN => {
            log.write(&t).unwrap();
            std::process::abort();
        }
        KILL_AFTER_KEEPER_ACTED => {
            let driver = Driver::new(log, Arc::new(KillAfterSubmit(keeper)), Arc::new(Recorded::default()), policy());
            let _ = driver.run(&t);
        }
        KILL_AFTER_ACTED_BEFORE_RECORDED => {
            let driver = Driver::new(log, keeper, Arc::new(KillInRecord), policy());
            let _ = driver.run(&t);
        }
        KILL_WHILE_SENDING_THE_SECOND_CALL => {
            let (_host, keeper) = KeeperSetup { rpc: kill_on_raw_send(setup.rpc.clone(), 2), ..setup.clone() }.keeper();
            let driver = Driver::new(log, keeper, Arc::new(Recorded::default()), policy());
            let _ = driver.run(&t);
        }
        other => panic!("unknown kill point {other}"),
    }
    unreachable!("the child should have been killed at {mode}");
}

/// Runs handle-breach in a child killed at `kill_at`, resumes here, and checks it happened once.
fn kill_then_resume(kill_at: &str, expected_state: TransitionState, calls_before_resume: u64) {
    let Some(tools) = tools() else { return };
    let rt = runtime();
    let devnet = rt.block_on(PaidDevnet::start(&tools, &PaidDevnetOptions::default())).expect("devnet");
    let state = tempfile::tempdir().unwrap();
    let setup = KeeperSetup::of(&devnet, state.path());
    let r = reader(&rt, &devnet);
    let orchestrator = devnet.orchestrator.address();
    let op1 = devnet.operators[1].address();
    let nonce_before = r.nonce(orchestrator);
    let t = handle_breach(&devnet, "pool-1/handle-breach/1");

    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "local_keeper_kill_child", "--ignored", "--test-threads=1", "--nocapture"])
        .env(CHILD_MODE, kill_at)
        .env("LK_TRANSITION", serde_json::to_string(&t).unwrap())
        .envs(setup.to_env())
        .status()
        .unwrap();
    assert!(!status.success(), "the child was not killed");
    let db = state.path().join("keeper.db");
    let rec = TransitionLog::open(&db).unwrap().find_by_key(&t.idempotency_key).unwrap().unwrap();
    assert_eq!(rec.state, expected_state, "where the kill left the log");
    assert_eq!(r.nonce(orchestrator) - nonce_before, calls_before_resume, "what the child had done on chain");

    // The restart: a new plugin host over the same state directory, a new driver over the same log.
    let (_host, keeper) = setup.keeper();
    let sink = Arc::new(Recorded::default());
    let driver = Driver::new(Arc::new(TransitionLog::open(&db).unwrap()), keeper, sink.clone(), policy());
    let done = driver.resume().unwrap();
    assert_eq!(done.len(), 1);
    let rec = recorded(done.into_iter().next().unwrap());
    assert_eq!(rec.run, 1, "one keeper run");

    // Exactly once on chain: two transactions (units to 0, the proposal), one Slashed event, 7 USDC.
    assert_eq!(r.nonce(orchestrator) - nonce_before, 2, "the transition acted twice");
    let slashed = r.slashed_events(devnet.coalition);
    assert_eq!(slashed.len(), 1, "slashed twice");
    assert_eq!(r.stake(devnet.coalition, op1), usdc(93));
    let recorded = sink.0.lock().unwrap().clone();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].1.len(), 2);
    assert!(recorded[0].1.iter().all(|h| r.receipt(h).status()));
    assert!(driver.resume().unwrap().is_empty());
}

#[test]
fn killed_after_written_before_acted_resumes_and_acts_once_on_chain() {
    kill_then_resume(KILL_AFTER_WRITTEN, TransitionState::Written, 0);
}

#[test]
fn killed_after_the_keeper_acted_on_chain_before_the_log_knew_resumes_without_acting_again() {
    kill_then_resume(KILL_AFTER_KEEPER_ACTED, TransitionState::Written, 2);
}

#[test]
fn killed_after_acted_before_recorded_resumes_and_records_once() {
    kill_then_resume(KILL_AFTER_ACTED_BEFORE_RECORDED, TransitionState::Acted, 2);
}

/// The one window the host cannot close: killed while the second call of the run was being sent (its
/// intent logged, the transaction not relayed). After the restart the run's first call is not sent again
/// and the second is in doubt — the host will not send it again and the keeper will not guess — so the
/// transition stays unsettled for an operator, and nothing happened twice.
#[test]
fn killed_while_a_call_was_being_sent_stays_unsettled_and_never_sends_twice() {
    let Some(tools) = tools() else { return };
    let rt = runtime();
    let devnet = rt.block_on(PaidDevnet::start(&tools, &PaidDevnetOptions::default())).expect("devnet");
    let state = tempfile::tempdir().unwrap();
    let setup = KeeperSetup::of(&devnet, state.path());
    let r = reader(&rt, &devnet);
    let orchestrator = devnet.orchestrator.address();
    let nonce_before = r.nonce(orchestrator);
    let t = handle_breach(&devnet, "pool-1/handle-breach/1");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "local_keeper_kill_child", "--ignored", "--test-threads=1", "--nocapture"])
        .env(CHILD_MODE, KILL_WHILE_SENDING_THE_SECOND_CALL)
        .env("LK_TRANSITION", serde_json::to_string(&t).unwrap())
        .envs(setup.to_env())
        .status()
        .unwrap();
    assert!(!status.success(), "the child was not killed");
    assert_eq!(r.nonce(orchestrator) - nonce_before, 1, "the units went out, the proposal did not");

    let (_host, keeper) = setup.keeper();
    let db = state.path().join("keeper.db");
    let quick = RetryPolicy { pending_timeout: Duration::from_secs(1), ..policy() };
    let driver = Driver::new(Arc::new(TransitionLog::open(&db).unwrap()), keeper.clone(), Arc::new(Recorded::default()), quick);
    for _ in 0..2 {
        let Driven::Pending(rec) = driver.resume().unwrap().remove(0) else { panic!("an in-doubt run was settled") };
        assert_eq!(rec.state, TransitionState::Submitted, "adopted, not re-submitted");
        assert_eq!(rec.run, 1);
    }
    let status = keeper.status("run/pool-1/handle-breach/1").unwrap();
    assert_eq!(status.state, RunState::Pending);
    assert!(status.detail.contains("propose-breach") && status.detail.contains("in doubt"), "{}", status.detail);
    assert_eq!(r.nonce(orchestrator) - nonce_before, 1, "nothing sent twice, nothing guessed");
    assert!(r.slashed_events(devnet.coalition).is_empty());
    assert_eq!(r.stake(devnet.coalition, devnet.operators[1].address()), usdc(100));
}
