//! Output audits across processes: an orchestrator auditing every request (`--audit-rate 1`) in front of
//! three SmolLM2 pipelines (routes) that share nothing but the model, each run by its own operator (one
//! payout address per route). A clean pool: every audit agrees and nothing is reported. Then route 0's
//! exit worker is restarted with the fault drill `--fault wrong-tokens-after 2`: the audit of a request
//! it served convicts it with exactly one breach report, naming its operator, whose evidence shows the
//! divergence at token 2. After its workers are ejected, requests complete on the two other routes
//! with the honest tokens, and the ejection outlives an orchestrator restart.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http;
use common::{Cluster, bin, smollm2_dir, wait_for};
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m-instruct";
const TOKEN: &str = "test-operator-token";
const HEARTBEAT_MS: u64 = 200;
/// One operator per route.
const OPERATORS: [&str; 3] = [
    "0x00000000000000000000000000000000000000a0",
    "0x00000000000000000000000000000000000000b1",
    "0x00000000000000000000000000000000000000c2",
];
/// The drill's first wrong token.
const WRONG_FROM: usize = 2;
const TOKENS: usize = 8;

/// A `computepool orchestrator` process auditing every finished request.
struct Orchestrator {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Orchestrator {
    fn start(state_dir: &Path, listen: &str) -> Self {
        let log = state_dir.join("orchestrator.log");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log");
        let mut child = Command::new(bin())
            .args(["orchestrator", "--listen", listen, "--heartbeat-ms", &HEARTBEAT_MS.to_string(), "--audit-rate", "1"])
            .arg("--state-dir")
            .arg(state_dir)
            .env("RUST_LOG", "info")
            .env("COMPUTEPOOL_OPERATOR_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start the orchestrator");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line {line:?} ({e}):\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        let addr = ready["url"].as_str().expect("url").trim_start_matches("http://").to_string();
        Self { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One finished `POST /pools/smol/infer`: its id, the route that made its tokens, and their ids; `None` if it was refused (503
/// while a route comes up) or ended in an error.
fn infer(addr: &str, prompt: &str) -> Option<(String, usize, Vec<u64>)> {
    let body = json!({"prompt": prompt, "max_tokens": TOKENS, "ignore_eos": true, "temperature": 0});
    let r = http::post(addr, "/pools/smol/infer", &body);
    if r.status != 200 {
        return None;
    }
    let events: Vec<Value> = r.sse_data().iter().map(|d| serde_json::from_str(d).expect("JSON event")).collect();
    let started = events.first()?;
    if events.last().is_none_or(|e| e.get("finish_reason").is_none()) {
        return None;
    }
    let tokens = events.iter().filter_map(|e| e["token"].as_u64()).collect();
    // The route that made the tokens: `started`'s, or the last `route` event's if the request moved.
    let route = events.iter().rev().find_map(|e| e["route"].as_u64())?;
    Some((started["id"].as_str()?.to_string(), route as usize, tokens))
}

/// Every audit stored so far (`GET /audits`, newest first).
fn audits(addr: &str) -> Vec<Value> {
    let auth = format!("Bearer {TOKEN}");
    let r = http::request_with(addr, "GET", "/audits?limit=1000", b"", &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["data"].as_array().expect("data").clone()
}

/// The audit of `request`, once it has concluded (waiting up to `timeout`).
fn audit_of(addr: &str, request: &str, timeout: Duration) -> Option<Value> {
    let mut found = None;
    wait_for(timeout, || {
        found = audits(addr).into_iter().find(|a| a["request_id"] == request);
        found.is_some()
    });
    found
}

/// Sends `prompt` until a request's audit has three voting runs (every route up); returns its id, its
/// route, the tokens the user got, and the audit.
fn audited_everywhere(orchestrator: &Orchestrator, prompt: &str, logs: impl Fn() -> String) -> (String, usize, Vec<u64>, Value) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "no audit had three voting runs:\n{}\n{}", orchestrator.log(), logs());
        let Some((id, route, tokens)) = infer(&orchestrator.addr, prompt) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        // A request that moved routes while its pool came up is not audited (its tokens came from two).
        let Some(audit) = audit_of(&orchestrator.addr, &id, Duration::from_secs(20)) else { continue };
        if audit["evidence"]["voting_runs"] == 3 {
            return (id, route, tokens, audit);
        }
    }
}

/// The value of the sample `series` (name and labels, exactly as exposed) in `GET /metrics`.
fn metric(addr: &str, series: &str) -> f64 {
    let text = http::get(addr, "/metrics").body;
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn run_tokens(run: &Value) -> Vec<u64> {
    run["tokens"].as_array().map(|t| t.iter().map(|v| v.as_u64().expect("id")).collect()).unwrap_or_default()
}

#[test]
fn a_wrong_token_exit_worker_is_reported_once_and_the_pool_serves_on_without_it() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let mut rings = [Cluster::local(&model, 30, 2, &[]), Cluster::local(&model, 30, 2, &[]), Cluster::local(&model, 30, 2, &[])];
    // Every route takes requests from one client: the orchestrator, with the first ring's key.
    let client = rings[0].client_peer.clone();
    let mut topologies = Vec::new();
    for ring in &rings {
        let mut t: Value = serde_json::from_str(&std::fs::read_to_string(ring.topology_path()).expect("read")).expect("JSON");
        t["clients"] = json!([client]);
        std::fs::write(ring.topology_path(), t.to_string()).expect("write");
        topologies.push(t);
    }
    let state_dir = rings[0].dir.path().join("orchestrator");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    std::fs::copy(rings[0].dir.path().join("client.key"), state_dir.join("orchestrator.key")).expect("key");
    let mut orchestrator = Orchestrator::start(&state_dir, "127.0.0.1:0");
    let addr = orchestrator.addr.clone();
    let spec = json!({"id": "smol", "model": MODEL, "model_dir": model, "topology": topologies[0],
                      "replicas": [topologies[1], topologies[2]]});
    let r = http::post_as(&addr, "/pools", &spec, TOKEN);
    assert_eq!(r.status, 201, "{}", r.body);
    let token_file = state_dir.join("token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    for (ring, operator) in rings.iter_mut().zip(OPERATORS) {
        ring.extra_args = vec![
            "--orchestrator".into(),
            format!("http://{addr}"),
            "--operator-token-file".into(),
            token_file.to_string_lossy().into_owned(),
            "--payout".into(),
            operator.into(),
        ];
        ring.start_all();
    }
    let logs = |rings: &[Cluster; 3]| (0..6).map(|i| rings[i / 2].log(i % 2)).collect::<Vec<_>>().join("\n---\n");
    assert_eq!(http::get(&addr, "/audits").status, 401, "audits hold users' prompts: operator token only");

    // A clean pool. Requests until one is audited on all three routes (a ring's links come up after
    // its workers say ready; an audit run on a route not up yet fails and does not vote).
    let prompt = "The capital of France is";
    let (_, _, honest, clean_audit) = audited_everywhere(&orchestrator, prompt, || logs(&rings));
    assert_eq!(honest.len(), TOKENS);
    assert_eq!(clean_audit["outcome"], "agreed", "{clean_audit}");
    let routes: Vec<u64> = clean_audit["evidence"]["runs"].as_array().expect("runs").iter().map(|r| r["route"].as_u64().expect("route")).collect();
    let mut sorted = routes.clone();
    sorted.sort();
    assert_eq!(sorted, [0, 1, 2], "the user's route and both others: {clean_audit}");
    for run in clean_audit["evidence"]["runs"].as_array().expect("runs") {
        assert_eq!(run_tokens(run), honest, "every honest route gives the same tokens: {run}");
    }
    let all = audits(&addr);
    assert!(all.iter().all(|a| a["reports"] == json!([]) && a["outcome"] != "convicted"), "a clean pool reports nobody: {all:?}");
    assert_eq!(metric(&addr, "computepool_breach_reports_total"), 0.0);
    assert!(metric(&addr, "computepool_audits_total{outcome=\"agreed\"}") >= 1.0);

    // Route 0's exit comes back with the drill: from its third token on, each is wrong.
    let faulty = rings[0].peers[1].clone();
    rings[0].kill(1);
    rings[0].worker_args = vec![vec![], vec!["--fault".into(), "wrong-tokens-after".into(), WRONG_FROM.to_string()]];
    rings[0].start(1);
    assert!(rings[0].log(1).contains("FAULT DRILL"), "the drill says so:\n{}", rings[0].log(1));
    // Until a request is audited on all three routes again: route 0 is either the user's (who got the
    // wrong tokens) or one of the audit runs; either way two honest routes outvote it.
    let (_, user_route, user_tokens, audit) = audited_everywhere(&orchestrator, prompt, || logs(&rings));
    if user_route == 0 {
        assert_ne!(user_tokens, honest, "the user got the drill's tokens");
    } else {
        assert_eq!(user_tokens, honest);
    }
    assert_eq!(audit["outcome"], "convicted", "{audit}");
    let reports = audit["reports"].as_array().expect("reports");
    assert_eq!(reports.len(), 1, "exactly one report: {audit}");
    let report = &reports[0];
    assert_eq!(report["operator"], OPERATORS[0], "{report}");
    assert_eq!(report["kind"], "wrong-output");
    assert_eq!(report["poolId"], "smol");
    let evidence: Value = serde_json::from_str(report["evidence"].as_str().expect("evidence text")).expect("JSON");
    assert_eq!(evidence, audit["evidence"], "the report carries the stored evidence");
    assert_eq!(evidence["version"], 1);
    assert_eq!(evidence["first_divergence"], WRONG_FROM as u64);
    assert_eq!(evidence["request"]["max_tokens"], TOKENS as u64);
    let runs = evidence["runs"].as_array().expect("runs");
    assert_eq!((runs[0]["role"].as_str(), runs[0]["route"].as_u64()), (Some("original"), Some(user_route as u64)));
    assert_eq!(run_tokens(&runs[0]), user_tokens);
    for run in runs {
        if run["route"] == 0 {
            let wrong = run_tokens(run);
            assert_eq!(wrong.len(), TOKENS);
            assert_eq!(wrong[..WRONG_FROM], honest[..WRONG_FROM], "right up to the drill's start: {run}");
            assert_ne!(wrong[WRONG_FROM], honest[WRONG_FROM], "the drill changed token {WRONG_FROM}: {run}");
            assert_eq!((run["agrees"].as_bool(), run["divergence"].as_u64()), (Some(false), Some(WRONG_FROM as u64)));
        } else {
            assert_eq!(run_tokens(run), honest, "the two honest routes outvote it: {run}");
            assert_eq!(run["agrees"], true);
        }
    }
    let accused: Vec<&str> = evidence["accused"].as_array().expect("accused").iter().map(|a| a["peer"].as_str().expect("peer")).collect();
    assert!(accused.contains(&faulty.as_str()), "the faulty exit is accused: {accused:?}");
    assert!(evidence["accused"].as_array().expect("accused").iter().all(|a| a["operator"] == OPERATORS[0]));
    // Whatever else was audited meanwhile, only route 0's operator was ever reported.
    for a in audits(&addr) {
        for r in a["reports"].as_array().expect("reports") {
            assert_eq!(r["operator"], OPERATORS[0], "an honest operator was reported: {a}");
        }
    }
    let convicted = audits(&addr).iter().filter(|a| a["outcome"] == "convicted").count() as f64;
    assert_eq!(metric(&addr, "computepool_audits_total{outcome=\"convicted\"}"), convicted);
    assert_eq!(metric(&addr, "computepool_breach_reports_total"), convicted, "one report per convicting audit");
    eprintln!("the drill's wrong token {WRONG_FROM} was caught; accused {accused:?}");

    // The verdict's action: the accused are ejected. Requests complete on the other two routes, with the
    // honest tokens, and audits there report nobody.
    for peer in &accused {
        let r = http::post_as(&addr, &format!("/workers/{peer}/eject"), &json!({"reason": "wrong output (test)"}), TOKEN);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let r = http::post(&addr, &format!("/workers/{faulty}/eject"), &json!({"reason": "x"}));
    assert_eq!(r.status, 401, "ejecting needs the operator token");
    let workers = http::get(&addr, "/workers").json();
    let shown = workers["data"].as_array().expect("data").iter().find(|w| w["peer"] == faulty.as_str()).expect("listed").clone();
    assert_eq!(shown["ejected"]["reason"], "wrong output (test)", "{shown}");
    let reported = |addr: &str| audits(addr).iter().map(|a| a["reports"].as_array().map_or(0, Vec::len)).sum::<usize>();
    let before = reported(&addr);
    // Three at once: an idle pool of three routes would give each one; now two routes take them all.
    let clients: Vec<_> = (0..3).map(|_| {
        let addr = addr.clone();
        std::thread::spawn(move || infer(&addr, prompt))
    }).collect();
    for client in clients {
        let (id, route, tokens) = client.join().expect("client thread")
            .unwrap_or_else(|| panic!("a request failed after the ejection:\n{}", orchestrator.log()));
        assert_ne!(route, 0, "no request goes through an ejected worker");
        assert_eq!(tokens, honest);
        let audit = audit_of(&addr, &id, Duration::from_secs(60)).expect("audited");
        assert_eq!(audit["outcome"], "agreed", "{audit}");
        assert!(audit["evidence"]["runs"].as_array().expect("runs").iter().all(|r| r["route"] != 0), "{audit}");
    }
    assert_eq!(reported(&addr), before, "no new report once the faulty route is out");

    // A restarted orchestrator keeps the ejection.
    drop(orchestrator);
    orchestrator = Orchestrator::start(&state_dir, &addr);
    let shown = |addr: &str| {
        http::get(addr, "/workers").json()["data"].as_array().expect("data").iter().find(|w| w["peer"] == faulty.as_str()).cloned()
    };
    assert!(shown(&addr).is_some_and(|w| w["ejected"]["reason"] == "wrong output (test)"), "{:?}", shown(&addr));
    let deadline = Instant::now() + Duration::from_secs(30);
    let (_, route, tokens) = loop {
        if let Some(done) = infer(&addr, prompt) {
            break done;
        }
        assert!(Instant::now() < deadline, "no request served after the restart:\n{}", orchestrator.log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_ne!(route, 0, "still ejected after a restart");
    assert_eq!(tokens, honest);
}
