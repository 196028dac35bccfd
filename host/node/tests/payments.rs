//! Paid pools end to end, on a real local chain (anvil with Superfluid and the test USDC, the facilitator
//! settling vouchers with `transferWithAuthorization`):
//! - the official x402 clients (PyPI `x402` with httpx, requests and the `openai` async client; npm
//!   `@x402/fetch`) pay `computepool up` unchanged, and every voucher settles on chain;
//! - while a paid request streams the operators' USDCx balances rise at the pool's rate, they stop within
//!   one block of its end, and the session's recorded cost equals what the operators received to the wei;
//! - hostile payments get a 402 with their x402 reason and nothing is served; a pool's flow rail swapped
//!   with `PUT /pools/{id}/payments` (Superfluid → ledger) serves the next request, no restart;
//! - an orchestrator killed mid-stream finds the open flow when it restarts, stops it, and charges the
//!   session for exactly the seconds served;
//! - a payout address a worker registers after its pool was priced is paid from the next request on.
//!
//! `make test` installs the clients (scripts/x402-clients.sh) and passes them as COMPUTEPOOL_X402_PYTHON
//! and COMPUTEPOOL_X402_NODE_MODULES; anvil comes from COMPUTEPOOL_CHAIN_TOOLS.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::http::{self, EventStream};
use common::{Cluster, bin, smollm2_dir, wait_for};
use computepool_chain::alloy::primitives::{Address, B256, U256};
use computepool_chain::alloy::providers::Provider;
use computepool_chain::alloy::signers::local::PrivateKeySigner;
use computepool_chain::devnet::mine_at;
use computepool_chain::eip3009::{sign_transfer, token_domain};
use computepool_chain::pools::super_token_balance;
use computepool_chain::{Chain, ChainTools, DEVNET_CHAIN_ID, Gda};
use computepool_pay::devnet::{PaidDevnet, PaidDevnetOptions, address_of};
use computepool_pay::x402::{ExactEvmPayload, PaymentPayload, PaymentRequired, decode_header, encode_header};
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m-instruct";
const TOKEN: &str = "test-operator-token";
/// Atomic USDC units per second: a multiple of the 30 layers (the operators' total units).
const PRICE: u128 = 600;

/// The tests here each start a chain and a pool (up to six worker processes) with sub-second liveness
/// timeouts: on a 2-core runner, run side by side, they starve one another's heartbeats. One at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
/// USDCx wei per USDC atomic unit (18 − 6 decimals).
const SCALE: u128 = 1_000_000_000_000;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tools() -> Option<ChainTools> {
    ChainTools::for_tests(&repo())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// Reads the chain as of `block` (latest if None): each operator's USDCx balance.
async fn balances(chain: &Chain, usdcx: Address, operators: &[Address], block: Option<u64>) -> Vec<U256> {
    let mut out = Vec::new();
    for op in operators {
        out.push(super_token_balance(chain, usdcx, *op, block).await.expect("balance"));
    }
    out
}

fn total(v: &[U256]) -> U256 {
    v.iter().fold(U256::ZERO, |a, b| a + b)
}

/// The session's view, with its token.
fn session_view(addr: &str, id: &str, token: &str) -> Value {
    let r = http::request_with(addr, "GET", &format!("/sessions/{id}"), b"", &[("authorization", &format!("Bearer {token}"))]);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn cost_of(view: &Value) -> u128 {
    view["usage"]["cost"].as_str().expect("cost").parse().expect("decimal")
}

/// A voucher for `requirements`, signed by `payer` (the fields a client fills, each overridable).
struct Voucher {
    value: U256,
    to: Address,
    valid_after: u64,
    valid_before: u64,
    chain_id: u64,
    domain: (String, String),
    nonce: B256,
}

fn voucher_for(required: &PaymentRequired) -> Voucher {
    let r = &required.accepts[0];
    let (name, version) = r.eip712_domain().expect("domain");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    Voucher {
        value: r.amount.parse().expect("amount"),
        to: r.pay_to.parse().expect("payTo"),
        valid_after: 0,
        valid_before: now + 300,
        chain_id: DEVNET_CHAIN_ID,
        domain: (name.to_string(), version.to_string()),
        nonce: B256::from(rand_bytes()),
    }
}

/// 32 fresh random bytes (a voucher's nonce), from a fresh key's secret.
fn rand_bytes() -> [u8; 32] {
    PrivateKeySigner::random().to_bytes().0
}

fn sign(required: &PaymentRequired, payer: &PrivateKeySigner, signer: &PrivateKeySigner, v: &Voucher) -> String {
    let r = &required.accepts[0];
    let asset: Address = r.asset.parse().expect("asset");
    let domain = token_domain(&v.domain.0, &v.domain.1, v.chain_id, asset);
    let signed = sign_transfer(signer, &domain, v.to, v.value, v.valid_after, v.valid_before, v.nonce).expect("sign");
    let mut payload = ExactEvmPayload::from_signed(&signed);
    // The voucher claims to be the payer's, whoever signed it.
    payload.authorization.from = address_of(payer);
    encode_header(&PaymentPayload {
        x402_version: 2,
        resource: required.resource.clone(),
        accepted: r.clone(),
        payload: payload.to_value(),
        extensions: None,
    })
}

const STORY: &str = "Tell me a long story about a lighthouse.";

fn chat(max_tokens: u32, stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": STORY}],
           "max_tokens": max_tokens, "temperature": 0, "stream": stream})
}

/// What `chat(max_tokens, _)` answers, from the whole model in one process (greedy: the text any honest
/// pipeline gives).
fn chat_in_one_process(model: &Path, max_tokens: u32) -> String {
    let out = Command::new(bin())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--threads", "1", "--temperature", "0", "--chat", "--prompt", STORY, "--max-tokens", &max_tokens.to_string()])
        .output()
        .expect("run generate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("UTF-8").strip_suffix('\n').expect("a final newline").to_string()
}

/// Posts `body` with `headers`; the 402's requirements when it is one.
fn post(addr: &str, body: &Value, headers: &[(&str, &str)]) -> http::Response {
    http::request_with(addr, "POST", "/v1/chat/completions", body.to_string().as_bytes(), headers)
}

fn required_of(r: &http::Response) -> PaymentRequired {
    assert_eq!(r.status, 402, "{}", r.body);
    decode_header(r.header("payment-required").expect("PAYMENT-REQUIRED")).expect("a v2 402")
}

/// A `computepool up --payments on` process and what it printed about its devnet.
struct Up {
    child: Child,
    info: Value,
    addr: String,
    _state: tempfile::TempDir,
}

impl Drop for Up {
    /// Ctrl-C, so `up` stops its workers and its devnet (anvil, the facilitator) too; a kill after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn start(model: &Path) -> Self {
        Self::start_with(model, PRICE, &[])
    }

    /// `up` at `price` per second, with `extra` arguments.
    fn start_with(model: &Path, price: u128, extra: &[&str]) -> Self {
        let state = tempfile::tempdir().expect("temp dir");
        let models_dir = model.parent().expect("models dir");
        let name = model.file_name().and_then(|n| n.to_str()).expect("model name");
        let mut child = Command::new(bin())
            .current_dir(repo())
            .args(["up", "--payments", "on", "--listen", "127.0.0.1:0", "--threads", "1", "--model", name, "--models-dir"])
            .arg(models_dir)
            .arg("--state-dir")
            .arg(state.path())
            .args(["--price-per-second", &price.to_string()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(state.path().join("up.log")).expect("log")))
            .spawn()
            .expect("start computepool up");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let info = lines.by_ref().map_while(Result::ok).find_map(|l| {
            let v: Value = serde_json::from_str(l.trim()).ok()?;
            (v["event"] == "payments").then_some(v)
        });
        let Some(info) = info else {
            let _ = child.kill();
            panic!("`computepool up --payments on` printed no payments line:\n{}",
                std::fs::read_to_string(state.path().join("up.log")).unwrap_or_default());
        };
        std::thread::spawn(move || for _ in lines {});
        let addr = info["url"].as_str().expect("url").trim_start_matches("http://").to_string();
        Self { child, info, addr, _state: state }
    }

    /// What `up` logged so far (for a failing assertion's message).
    fn log(&self) -> String {
        std::fs::read_to_string(self._state.path().join("up.log")).unwrap_or_default()
    }

    fn str(&self, key: &str) -> String {
        self.info[key].as_str().unwrap_or_else(|| panic!("{key} in {}", self.info)).to_string()
    }
}

/// The x402 clients `make test` installed, or `None` (skip) when they are not required.
fn clients() -> Option<(PathBuf, PathBuf)> {
    let python = std::env::var_os("COMPUTEPOOL_X402_PYTHON").map(PathBuf::from);
    let node_modules = std::env::var_os("COMPUTEPOOL_X402_NODE_MODULES").map(PathBuf::from);
    match (python, node_modules) {
        (Some(p), Some(n)) => Some((p, n)),
        _ => {
            assert!(
                std::env::var("COMPUTEPOOL_REQUIRE_X402").as_deref() != Ok("1"),
                "COMPUTEPOOL_REQUIRE_X402=1 but COMPUTEPOOL_X402_PYTHON / COMPUTEPOOL_X402_NODE_MODULES are not set \
                 (scripts/x402-clients.sh)"
            );
            eprintln!("skipped: the x402 clients are not installed (`make test` installs them)");
            None
        }
    }
}

/// Runs one client (`pay.py MODE` or `pay.mjs`) against `up`; returns its JSON report.
fn run_client(up: &Up, program: &Path, args: &[&Path], mode: Option<&str>) -> Value {
    let out = Command::new(program)
        .args(args)
        .args(mode)
        .env("COMPUTEPOOL_URL", up.info["url"].as_str().expect("url"))
        .env("X402_PAYER_KEY", up.str("payer_key"))
        .env("X402_NETWORK", up.str("network"))
        .env("X402_ASSET", up.str("asset"))
        .env("X402_MAX_AMOUNT", up.str("voucher_amount"))
        .env("X402_MODEL", MODEL)
        .output()
        .expect("run the client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{program:?} {mode:?} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn the_official_x402_clients_pay_computepool_up_and_the_operators_get_exactly_the_cost() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(model) = smollm2_dir() else { return };
    let Some(_tools) = tools() else { return };
    let Some((python, node_modules)) = clients() else { return };
    let up = Up::start(&model);
    let rt = runtime();
    let payer: PrivateKeySigner = up.str("payer_key").parse().expect("payer key");
    let chain = rt.block_on(Chain::connect(&up.str("rpc"), Some(DEVNET_CHAIN_ID), payer.clone())).expect("chain");
    let usdc: Address = up.str("asset").parse().expect("asset");
    let usdcx: Address = up.str("usdcx").parse().expect("usdcx");
    let operators: Vec<Address> =
        up.info["operators"].as_array().expect("operators").iter().map(|a| a.as_str().expect("addr").parse().expect("addr")).collect();
    let voucher: U256 = up.str("voucher_amount").parse().expect("amount");
    let usdc_balance = |who: Address| {
        let token = computepool_chain::bindings::TestUSD::new(usdc, chain.provider());
        rt.block_on(async { token.balanceOf(who).call().await.expect("balanceOf") })
    };
    let payer_before = usdc_balance(payer.address());
    let operators_before = rt.block_on(balances(&chain, usdcx, &operators, None));

    // An unpaid request is a 402 with the pool's requirements, and nothing else happens.
    let challenge = required_of(&post(&up.addr, &chat(4, false), &[]));
    assert_eq!(challenge.accepts[0].amount, voucher.to_string());
    assert_eq!(challenge.accepts[0].network, format!("eip155:{DEVNET_CHAIN_ID}"));

    // The official clients, unchanged: each pays one voucher and gets its completion.
    let script = repo().join("tests/x402/pay.py");
    let js_dir = tempfile::tempdir().expect("temp dir");
    std::fs::copy(repo().join("tests/x402/pay.mjs"), js_dir.path().join("pay.mjs")).expect("copy pay.mjs");
    std::fs::write(js_dir.path().join("package.json"), r#"{"type": "module"}"#).expect("package.json");
    std::os::unix::fs::symlink(node_modules.join("node_modules"), js_dir.path().join("node_modules")).expect("link node_modules");
    let mut reports = Vec::new();
    for mode in ["httpx", "requests", "openai"] {
        reports.push((mode, run_client(&up, &python, &[&script], Some(mode))));
    }
    reports.push(("@x402/fetch", run_client(&up, Path::new("node"), &[&js_dir.path().join("pay.mjs")], None)));
    let mut sessions = Vec::new();
    for (client, report) in &reports {
        assert_eq!(report["status"], 200, "{client}: {report}");
        assert!(!report["text"].as_str().unwrap_or_default().is_empty(), "{client}: {report}");
        let settled = &report["payment_response"];
        assert_eq!(settled["success"], true, "{client}: {report}");
        let tx: B256 = settled["transaction"].as_str().expect("tx").parse().expect("tx hash");
        let receipt = rt.block_on(chain.provider().get_transaction_receipt(tx)).expect("rpc").expect("the voucher's transaction");
        assert!(receipt.status(), "{client}: the settlement succeeded on chain");
        sessions.push((report["session"]["id"].as_str().expect("session").to_string(), report["session"]["token"].clone()));
    }
    // All four paid from the same payer: one session (opened by the first), four vouchers settled.
    assert_eq!(payer_before - usdc_balance(payer.address()), voucher * U256::from(4u64));
    assert!(sessions.iter().all(|(id, _)| *id == sessions[0].0), "{sessions:?}");
    let token = sessions[0].1.as_str().expect("the first payment opened the session and showed its token").to_string();
    let session = sessions[0].0.clone();

    // While a request streams, the operators' balances rise at price × scale per second in total.
    let view = session_view(&up.addr, &session, &token);
    let cost_before = cost_of(&view);
    // 600 tokens (the story runs past them) take ~6 s here: the request must still stream when the
    // blocks below are mined, 2.2 s in. (200 tokens took 2.0–2.4 s, and a fast run ended first.)
    let mut stream = EventStream::open_with(&up.addr, "/v1/chat/completions", &chat(600, true), &[("authorization", &format!("Bearer {token}"))]);
    assert!(stream.next_data().is_some(), "the stream starts");
    std::thread::sleep(Duration::from_millis(2200));
    let (t0, b0, t1, b1) = rt.block_on(async {
        let now = chain.provider().get_block(Default::default()).await.expect("rpc").expect("block").header.timestamp;
        mine_at(&chain, now + 1).await.expect("mine");
        let b0 = chain.provider().get_block_number().await.expect("rpc");
        mine_at(&chain, now + 2).await.expect("mine");
        let b1 = chain.provider().get_block_number().await.expect("rpc");
        (now + 1, b0, now + 2, b1)
    });
    let at0 = rt.block_on(balances(&chain, usdcx, &operators, Some(b0)));
    let at1 = rt.block_on(balances(&chain, usdcx, &operators, Some(b1)));
    assert_eq!(total(&at1) - total(&at0), U256::from(PRICE * SCALE * u128::from(t1 - t0)), "one request in flight");
    // The flow stops between the last token and [DONE]: how long that takes is the metering's stop
    // latency (one mined transaction), reported here, measured in docs/NOTES.md.
    let mut last_token = std::time::Instant::now();
    while let Some(d) = stream.next_data() {
        if d == "[DONE]" {
            break;
        }
        // The finish chunk comes after the stop; a content chunk before it.
        if !d.contains("\"finish_reason\":\"") {
            last_token = std::time::Instant::now();
        }
    }
    eprintln!("stop latency (last token → [DONE], the flow's stop mined in between): {:?}", last_token.elapsed());
    // It ended (the flow was stopped before [DONE] was sent): a block later, nothing more arrives.
    let (stopped, later) = rt.block_on(async {
        let head = chain.provider().get_block(Default::default()).await.expect("rpc").expect("block").header;
        let stopped = balances(&chain, usdcx, &operators, Some(head.number)).await;
        mine_at(&chain, head.timestamp + 30).await.expect("mine");
        (stopped, balances(&chain, usdcx, &operators, None).await)
    });
    assert_eq!(stopped, later, "no flow after the stream's end");

    // What the session paid is what the operators received, to the wei.
    let view = session_view(&up.addr, &session, &token);
    assert_eq!(view["stream"]["state"], "stopped", "{view}");
    let cost = cost_of(&view);
    assert!(cost > cost_before, "{view}");
    let received = total(&later) - total(&operators_before);
    assert_eq!(received, U256::from(cost) * U256::from(SCALE), "operators received exactly the session's cost × scale");
    // Each operator's share is its units (layers) over the total: two workers of 15 layers each.
    assert_eq!(later[0] - operators_before[0], later[1] - operators_before[1]);
}

/// A devnet, a pipeline whose workers register payout addresses, and an orchestrator process with
/// payments on (killable and restartable on the same state).
struct PaidCluster {
    devnet: PaidDevnet,
    rt: tokio::runtime::Runtime,
    cluster: Cluster,
    state_dir: PathBuf,
    orchestrator: Option<(Child, String)>,
    last_addr: Option<String>,
}

impl PaidCluster {
    fn start(model: &Path, tools: &ChainTools) -> Self {
        let rt = runtime();
        let devnet = rt.block_on(PaidDevnet::start(tools, &PaidDevnetOptions::default())).expect("devnet");
        let cluster = Cluster::local(model, 30, 2, &[]);
        let state_dir = cluster.dir.path().join("orchestrator");
        std::fs::create_dir_all(&state_dir).expect("state dir");
        std::fs::copy(cluster.dir.path().join("client.key"), state_dir.join("orchestrator.key")).expect("key");
        computepool_chain::client::write_key_file(&state_dir.join("chain.key"), &devnet.orchestrator).expect("chain key");
        std::fs::write(state_dir.join("rails.toml"), devnet.rail_config(None)).expect("rail config");
        let mut me = Self { devnet, rt, cluster, state_dir, orchestrator: None, last_addr: None };
        me.start_orchestrator();
        let addr = me.addr();
        let token_file = me.cluster.dir.path().join("operator.token");
        std::fs::write(&token_file, TOKEN).expect("token file");
        me.cluster.extra_args = vec![
            "--orchestrator".into(),
            format!("http://{addr}"),
            "--operator-token-file".into(),
            token_file.to_string_lossy().into_owned(),
        ];
        me.cluster.worker_args = me.devnet.operators.iter().map(|k| vec!["--payout".into(), address_of(k)]).collect();
        let topology: Value =
            serde_json::from_str(&std::fs::read_to_string(me.cluster.topology_path()).expect("topology")).expect("JSON");
        let spec = json!({"id": "smol", "model": MODEL, "model_dir": model, "topology": topology});
        let r = http::post_as(&addr, "/pools", &spec, TOKEN);
        assert_eq!(r.status, 201, "{}", r.body);
        me.cluster.start_all();
        // The pool is priced once both workers have registered their payout addresses.
        assert!(
            wait_for(Duration::from_secs(60), || {
                let w = http::get(&addr, "/workers").json();
                w["data"].as_array().is_some_and(|d| d.iter().filter(|w| w["payout"].is_string()).count() == 2)
            }),
            "the workers registered"
        );
        // Free until priced: wait until the pipeline answers, so the tests' payments meet a ready pool.
        assert!(
            wait_for(Duration::from_secs(60), || post(&addr, &chat(1, false), &[]).status == 200),
            "the pool serves"
        );
        let payments = me.devnet.pool_payments(PRICE, 60);
        let r = http::request_with(&addr, "PUT", "/pools/smol/payments", payments.to_string().as_bytes(),
            &[("authorization", &format!("Bearer {TOKEN}"))]);
        assert_eq!(r.status, 200, "{}", r.body);
        me
    }

    /// Starts the orchestrator on `listen` (its workers heartbeat to the address it had before).
    fn start_orchestrator(&mut self) {
        let listen = self.last_addr.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.state_dir.join("orchestrator.log")).expect("log");
        let mut child = Command::new(bin())
            .args(["orchestrator", "--listen", &listen, "--heartbeat-ms", "200", "--state-dir"])
            .arg(&self.state_dir)
            .args(["--payments", "--rails"])
            .arg(repo().join("plugins/rails"))
            .arg("--rail-config")
            .arg(self.state_dir.join("rails.toml"))
            .args(["--chain-rpc", self.devnet.rpc_url(), "--chain-key-file"])
            .arg(self.state_dir.join("chain.key"))
            .env("RUST_LOG", "info")
            .env("COMPUTEPOOL_OPERATOR_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start the orchestrator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
        let ready: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!("ready line {line:?} ({e}):\n{}", std::fs::read_to_string(self.state_dir.join("orchestrator.log")).unwrap_or_default())
        });
        let addr = ready["url"].as_str().expect("url").trim_start_matches("http://").to_string();
        self.last_addr = Some(addr.clone());
        self.orchestrator = Some((child, addr));
    }

    fn addr(&self) -> String {
        self.orchestrator.as_ref().expect("running").1.clone()
    }

    /// What the orchestrator logged so far (for a failing assertion's message).
    fn orchestrator_log(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("orchestrator.log")).unwrap_or_default()
    }

    fn kill_orchestrator(&mut self) {
        if let Some((mut child, _)) = self.orchestrator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn chain(&self) -> Chain {
        self.rt.block_on(Chain::connect(self.devnet.rpc_url(), Some(DEVNET_CHAIN_ID), self.devnet.payers[1].clone())).expect("chain")
    }

    fn operator_balances(&self, chain: &Chain, block: Option<u64>) -> Vec<U256> {
        let ops: Vec<Address> = self.devnet.operators.iter().map(|k| k.address()).collect();
        self.rt.block_on(balances(chain, self.devnet.deployment.usdcx, &ops, block))
    }

    /// Pays one voucher with payers[0] and returns (session id, its token when this opened it).
    fn open_session(&self) -> (String, Option<String>) {
        let addr = self.addr();
        let body = chat(2, false);
        let required = loop {
            let r = post(&addr, &body, &[]);
            if r.status == 402 {
                break required_of(&r);
            }
            assert_eq!(r.status, 503, "{}", r.body);
            std::thread::sleep(Duration::from_millis(200));
        };
        let payer = &self.devnet.payers[0];
        let header = sign(&required, payer, payer, &voucher_for(&required));
        let r = post(&addr, &body, &[("payment-signature", &header)]);
        assert_eq!(r.status, 200, "{}", r.body);
        (r.header("x-computepool-session").expect("session").to_string(),
         r.header("x-computepool-session-token").map(str::to_string))
    }
}

impl Drop for PaidCluster {
    fn drop(&mut self) {
        self.kill_orchestrator();
    }
}

#[test]
fn hostile_payments_get_their_x402_reason_and_nothing_is_served() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(model) = smollm2_dir() else { return };
    let Some(tools) = tools() else { return };
    let pc = PaidCluster::start(&model, &tools);
    let addr = pc.addr();
    let body = chat(4, false);
    let required = loop {
        let r = post(&addr, &body, &[]);
        if r.status == 402 {
            break required_of(&r);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let payer = &pc.devnet.payers[0];
    let stranger = PrivateKeySigner::random();
    let chain = pc.chain();
    let token = computepool_chain::bindings::TestUSD::new(pc.devnet.deployment.usdc.address, chain.provider());
    let balance = |who: Address| pc.rt.block_on(async { token.balanceOf(who).call().await.expect("balanceOf") });
    let payer_before = balance(payer.address());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();

    let good = voucher_for(&required);
    let cases: Vec<(&str, String, &str)> = vec![
        ("expired", sign(&required, payer, payer, &Voucher { valid_before: now - 10, ..voucher_for(&required) }), "invalid_exact_evm_payload_authorization_valid_before"),
        ("not yet valid", sign(&required, payer, payer, &Voucher { valid_after: now + 3600, ..voucher_for(&required) }), "invalid_exact_evm_payload_authorization_valid_after"),
        ("amount too low", sign(&required, payer, payer, &Voucher { value: good.value - U256::from(1u64), ..voucher_for(&required) }), "invalid_exact_evm_payload_authorization_value_mismatch"),
        ("wrong recipient", sign(&required, payer, payer, &Voucher { to: stranger.address(), ..voucher_for(&required) }), "invalid_exact_evm_payload_recipient_mismatch"),
        ("wrong chain", sign(&required, payer, payer, &Voucher { chain_id: 1, ..voucher_for(&required) }), "invalid_exact_evm_payload_signature"),
        ("wrong token domain", sign(&required, payer, payer, &Voucher { domain: ("USD Coin".into(), "1".into()), ..voucher_for(&required) }), "invalid_exact_evm_payload_signature"),
        ("another key's signature", sign(&required, payer, &stranger, &voucher_for(&required)), "invalid_exact_evm_payload_signature"),
        ("payer without funds", sign(&required, &stranger, &stranger, &voucher_for(&required)), "insufficient_funds"),
        ("malformed base64", "%%%not base64%%%".to_string(), "invalid_payload"),
        ("malformed JSON", base64_of(b"{\"x402Version\": 2, "), "invalid_payload"),
    ];
    for (what, header, reason) in &cases {
        let r = post(&addr, &body, &[("payment-signature", header)]);
        let again = required_of(&r);
        let error = again.error.clone().unwrap_or_default();
        assert!(error.starts_with(reason), "{what}: got {error:?}, want {reason}");
        assert!(r.header("payment-response").is_none(), "{what}: nothing settled");
    }
    // A good voucher pays; the same voucher again is a replay.
    let header = sign(&required, payer, payer, &good);
    let r = post(&addr, &body, &[("payment-signature", &header)]);
    assert_eq!(r.status, 200, "{}", r.body);
    let replay = post(&addr, &body, &[("payment-signature", &header)]);
    let error = required_of(&replay).error.unwrap_or_default();
    assert!(error.starts_with("invalid_exact_evm_nonce_already_used"), "replay: {error}");
    // Exactly one voucher moved money.
    let amount: U256 = required.accepts[0].amount.parse().expect("amount");
    assert_eq!(payer_before - balance(payer.address()), amount);

    // Swapping the flow rail is a config change the next request uses, no restart: the pool now pays
    // its operators through the ledger rail, and the session is charged the same way.
    let token = r.header("x-computepool-session-token").expect("the voucher opened a session").to_string();
    let session = r.header("x-computepool-session").expect("session").to_string();
    let mut settings = pc.devnet.pool_payments(PRICE, 60);
    settings["flow"] = json!({"plugin": "ledger", "config": {"unit": "usdc-atomic"}});
    let put = http::request_with(&addr, "PUT", "/pools/smol/payments", settings.to_string().as_bytes(),
        &[("authorization", &format!("Bearer {TOKEN}"))]);
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(http::get(&addr, "/pools/smol/payments").json()["flow"]["plugin"], "ledger");
    let before = session_view(&addr, &session, &token);
    let flow_before = pc.rt.block_on(async {
        let d = &pc.devnet;
        Gda::new(&chain, &d.deployment.superfluid).flow_rate(d.deployment.usdcx, d.orchestrator.address(), d.gda_pool).await
    });
    assert_eq!(flow_before.expect("rate"), 0);
    // The session's leftover is under a request's worst case: top it up with a second voucher. On
    // chain that is one transaction (the settlement); the Superfluid rail would have mined its start and
    // stop as well.
    let head = || pc.rt.block_on(chain.provider().get_block_number()).expect("rpc");
    let blocks_before = head();
    let second = sign(&required, payer, payer, &voucher_for(&required));
    let r = post(&addr, &chat(8, false), &[("payment-signature", &second)]);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(head() - blocks_before, 1, "only the voucher's settlement reached the chain");
    let after = session_view(&addr, &session, &token);
    assert_eq!(after["usage"]["requests"].as_u64(), before["usage"]["requests"].as_u64().map(|n| n + 1), "{after}");
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn an_orchestrator_killed_mid_stream_stops_the_flow_on_restart_and_charges_the_seconds_served() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(model) = smollm2_dir() else { return };
    let Some(tools) = tools() else { return };
    let mut pc = PaidCluster::start(&model, &tools);
    let (session, token) = pc.open_session();
    let token = token.expect("the first voucher opened the session");
    let chain = pc.chain();
    let before = pc.operator_balances(&chain, None);
    let cost_before = cost_of(&session_view(&pc.addr(), &session, &token));

    // A long stream; the orchestrator dies under it.
    let addr = pc.addr();
    // Paid with a voucher of its own (it tops up the same session): the opening request is charged a
    // second whenever its start and stop land in different block seconds, and then what the session has
    // left is under one request's worst case. No retry: a route that fails before the first token is
    // the orchestrator's to route again.
    let long = chat(400, true);
    let required = required_of(&post(&addr, &long, &[]));
    let payer = &pc.devnet.payers[0];
    let voucher = sign(&required, payer, payer, &voucher_for(&required));
    let mut stream = EventStream::open_with(&addr, "/v1/chat/completions", &long, &[("payment-signature", &voucher)]);
    let mut first = Vec::new();
    for _ in 0..3 {
        let data = stream.next_data();
        assert!(data.is_some(), "tokens arrive: status {}, data so far {first:?}\n{}", stream.status, pc.orchestrator_log());
        first.extend(data);
    }
    std::thread::sleep(Duration::from_millis(1500));
    pc.kill_orchestrator();
    // The client is told: its stream ends without [DONE].
    let mut rest = Vec::new();
    while let Some(d) = stream.next_data() {
        rest.push(d);
    }
    assert!(!rest.iter().any(|d| d == "[DONE]"), "the cut stream did not claim to be complete");
    // Still flowing on chain: nobody has stopped it yet.
    let flow_rate = |pc: &PaidCluster| {
        let d = &pc.devnet;
        pc.rt
            .block_on(Gda::new(&chain, &d.deployment.superfluid).flow_rate(d.deployment.usdcx, d.orchestrator.address(), d.gda_pool))
            .expect("rate")
    };
    assert_eq!(flow_rate(&pc), (PRICE * SCALE) as i128, "the flow outlived the orchestrator");

    // The restart finds it, stops it, and charges the seconds served.
    pc.start_orchestrator();
    assert_eq!(flow_rate(&pc), 0, "stopped at start-up");
    let view = session_view(&pc.addr(), &session, &token);
    assert_eq!(view["stream"]["state"], "stopped", "{view}");
    let cost = cost_of(&view) - cost_before;
    assert!(cost >= PRICE * 2, "at least the seconds before the kill: {view}");
    let after = pc.operator_balances(&chain, None);
    assert_eq!(total(&after) - total(&before), U256::from(cost) * U256::from(SCALE), "charged exactly what flowed");
    // And the pool serves again once the workers' heartbeats reach the new process: what is left of
    // the session is under one request's worst case, so a new voucher tops it up (the same session).
    let (again, _) = pc.open_session();
    assert_eq!(again, session, "the payer's live session is credited");
}

/// An operator who registers a new payout address after the pool was priced (here: a worker registering
/// again with another address) is paid from the pool's next stream on, and the address it replaced gets
/// nothing more, without the operator putting the pool's payments again.
#[test]
fn a_payout_address_registered_after_the_pool_was_priced_is_paid_from_the_next_request() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(model) = smollm2_dir() else { return };
    let Some(tools) = tools() else { return };
    let pc = PaidCluster::start(&model, &tools);
    let addr = pc.addr();
    // A first paid request: the flow's members are the two registered operators.
    pc.open_session();
    let (old, kept) = (pc.devnet.operators[1].address(), pc.devnet.operators[0].address());
    let workers = http::get(&addr, "/workers").json();
    let registration = workers["data"]
        .as_array()
        .expect("workers")
        .iter()
        .find(|w| w["payout"].as_str().is_some_and(|p| p.eq_ignore_ascii_case(&old.to_string())))
        .cloned()
        .unwrap_or_else(|| panic!("a worker pays {old}: {workers}"));
    // A new operator account, funded for gas and connected to the pool's GDA pool, as the devnet's
    // operators are (an unconnected member's share waits in the pool, off its balance).
    let newcomer = PrivateKeySigner::random();
    let new = newcomer.address();
    let chain = pc.chain();
    pc.rt.block_on(async {
        chain
            .provider()
            .raw_request::<_, Value>("anvil_setBalance".into(), (new, U256::from(10u128.pow(18))))
            .await
            .expect("fund the new operator");
        let member = Chain::connect(pc.devnet.rpc_url(), Some(DEVNET_CHAIN_ID), newcomer.clone()).await.expect("chain");
        Gda::new(&member, &pc.devnet.deployment.superfluid).connect_pool(pc.devnet.gda_pool).await.expect("connect");
    });
    let body = json!({
        "peer": registration["peer"], "addrs": registration["addrs"], "model": registration["model"],
        "layers": registration["layers"], "device": registration["device"],
        "weight_bytes": registration["weight_bytes"], "rss_bytes": registration["rss_bytes"],
        "speed": registration["speed"], "payout": new.to_string(),
    });
    let r = http::post_as(&addr, "/workers", &body, TOKEN);
    assert_eq!(r.status, 200, "{}", r.body);

    let usdcx = pc.devnet.deployment.usdcx;
    let before = pc.rt.block_on(balances(&chain, usdcx, &[kept, old, new], None));
    // Long enough to span block seconds: a request is charged per second its stream ran.
    concurrent_paid_chats(&addr, &pc.devnet.payers[0], 1, 200);
    let after = pc.rt.block_on(balances(&chain, usdcx, &[kept, old, new], None));
    let gained: Vec<U256> = after.iter().zip(&before).map(|(a, b)| *a - *b).collect();
    assert!(gained[0] > U256::ZERO, "the request was charged: {gained:?}\n{}", pc.orchestrator_log());
    assert_eq!(gained[1], U256::ZERO, "the replaced address is paid no more\n{}", pc.orchestrator_log());
    assert_eq!(gained[2], gained[0], "the new address gets the worker's share (15 of 30 layers, as the other's)");
}

/// Sends `n` paid requests at once, each with its own voucher from `payer`; their bodies' texts.
fn concurrent_paid_chats(addr: &str, payer: &PrivateKeySigner, n: usize, max_tokens: u32) -> Vec<String> {
    let body = chat(max_tokens, false);
    let required = required_of(&post(addr, &body, &[]));
    let headers: Vec<String> = (0..n).map(|_| sign(&required, payer, payer, &voucher_for(&required))).collect();
    let threads: Vec<_> = headers
        .into_iter()
        .map(|header| {
            let (addr, body) = (addr.to_string(), body.clone());
            std::thread::spawn(move || {
                let r = post(&addr, &body, &[("payment-signature", &header)]);
                assert_eq!(r.status, 200, "{}", r.body);
                let v: Value = serde_json::from_str(&r.body).expect("json");
                v["choices"][0]["message"]["content"].as_str().expect("content").to_string()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("request thread")).collect()
}

/// Issue 10's end-to-end case: three pipelines, each one operator's; pipeline 0's exit worker is made to
/// return wrong tokens (a fault drill). Output audits (every request) catch it; the coalition — three voter
/// plugins, two needed — votes its operator out; the local keeper's handle-breach zeroes its GDA units and
/// slashes its stake on the devnet; the pool's later requests complete on the other two pipelines, with the
/// honest tokens, paid as before.
#[test]
fn a_worker_returning_wrong_tokens_is_audited_voted_out_slashed_and_the_pool_serves_on() {
    let _one_at_a_time = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(model) = smollm2_dir() else { return };
    let Some(_tools) = tools() else { return };
    // 1800 per second: a multiple of every total of units (30 layers per pipeline: 90, then 60).
    let up = Up::start_with(
        &model,
        1800,
        &["--replicas", "3", "--audit-rate", "1", "--max-seconds-per-request", "20", "--fault-drill", "0:1:wrong-tokens-after:2"],
    );
    assert_eq!(up.info["keeper"], "local", "payments run through the local keeper by default: {}", up.info);
    let rt = runtime();
    let payer: PrivateKeySigner = up.str("payer_key").parse().expect("payer key");
    let chain = rt.block_on(Chain::connect(&up.str("rpc"), Some(DEVNET_CHAIN_ID), payer.clone())).expect("chain");
    let operators: Vec<Address> =
        up.info["operators"].as_array().expect("operators").iter().map(|a| a.as_str().expect("addr").parse().expect("addr")).collect();
    assert_eq!(operators.len(), 3, "one operator per pipeline");
    let (faulty, honest) = (operators[0], &operators[1..]);
    let gda_pool: Address = up.str("gda_pool").parse().expect("gda pool");
    let coalition: Address = up.str("coalition").parse().expect("coalition");
    let pool = computepool_chain::bindings::ISuperfluidPool::new(gda_pool, chain.provider());
    let stakes = computepool_chain::bindings::Coalition::new(coalition, chain.provider());
    let stake_of = |op: Address| rt.block_on(async { stakes.memberOf(op).call().await }).expect("memberOf").stake;
    let units_of = |op: Address| rt.block_on(async { pool.getUnits(op).call().await }).expect("getUnits");
    let stake_before = stake_of(faulty);
    assert!(stake_before > U256::ZERO);

    // Paid requests; every one is audited on the two other pipelines, so the drilled pipeline is
    // outvoted whether it served a user's request or an audit's re-run. (A user it served got its wrong
    // tokens: audits find a fault after the fact.)
    let texts = concurrent_paid_chats(&up.addr, &payer, 3, 8);

    // The audit convicts, the voters eject (2 of 3), the keeper acts on chain.
    let transitions = |addr: &str| -> Value {
        let r = http::get(addr, &format!("/transitions?pool={MODEL}&limit=200"));
        assert_eq!(r.status, 200, "{}", r.body);
        serde_json::from_str(&r.body).expect("json")
    };
    let handled = wait_for(Duration::from_secs(120), || {
        transitions(&up.addr)["transitions"]
            .as_array()
            .is_some_and(|ts| ts.iter().any(|t| t["kind"] == "handle-breach" && t["state"] == "recorded"))
    });
    assert!(handled, "no handle-breach recorded: {}\n{}", transitions(&up.addr), up.log());
    let page = transitions(&up.addr);
    let all = page["transitions"].as_array().expect("transitions");
    let breaches: Vec<_> = all.iter().filter(|t| t["kind"] == "handle-breach").collect();
    assert_eq!(breaches.len(), 1, "one breach, handled once: {page}");
    assert_eq!(breaches[0]["payload"]["operator"].as_str().map(str::to_ascii_lowercase), Some(format!("{faulty:#x}")));
    assert!(all.iter().any(|t| t["kind"] == "stream-start" && t["state"] == "recorded"), "flows went through the keeper: {page}");
    assert!(all.iter().any(|t| t["kind"] == "stream-stop" && t["state"] == "recorded"), "flows went through the keeper: {page}");

    // On chain: the faulty operator's units are 0 and its stake was slashed; the others keep theirs.
    assert_eq!(units_of(faulty), 0);
    assert!(stake_of(faulty) < stake_before, "slashed: {} → {}", stake_before, stake_of(faulty));
    for op in honest {
        assert!(units_of(*op) > 0, "{op} keeps its units");
        assert_eq!(stake_of(*op), stake_before, "{op} keeps its stake");
    }

    // Its workers are ejected; the pool serves on the other two pipelines, with the honest tokens.
    let workers: Value = serde_json::from_str(&http::get(&up.addr, "/workers").body).expect("workers json");
    let rows = workers["data"].as_array().expect("workers").clone();
    let faulty_hex = format!("{faulty:#x}");
    let ejected: Vec<_> = rows.iter().filter(|w| !w["ejected"].is_null()).collect();
    assert_eq!(ejected.len(), 2, "both workers of the faulty pipeline: {workers}");
    assert!(ejected.iter().all(|w| w["payout"].as_str().map(str::to_ascii_lowercase) == Some(faulty_hex.clone())), "{workers}");
    // Not the texts' majority: the router may have put two of them on the drilled pipeline.
    let honest_text = chat_in_one_process(&model, 8);
    assert!(texts.iter().all(|t| !t.is_empty()), "{texts:?}");
    for text in concurrent_paid_chats(&up.addr, &payer, 3, 8) {
        assert_eq!(text, honest_text, "after the ejection every request gets the honest tokens");
    }
}
