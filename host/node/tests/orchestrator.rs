//! The orchestrator as a separate process in front of a pipeline of real worker processes: its
//! OpenAI-compatible API returns exactly the tokens of a direct run, in OpenAI's shapes (JSON and SSE),
//! turns bad input into OpenAI-style 4xx errors and keeps serving, cancels a request at the entry when
//! its client hangs up (every shard's KV cache freed, seen in /metrics), records usage in SQLite, gets
//! its pools back after a restart, knows its workers from their registrations and heartbeats (down
//! when they stop; a pool without a live route answers 503 at once), and guards its write routes with
//! the operator token.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{self, EventStream};
use common::{Cluster, WorkerSpec, bin, free_port, smollm2_dir, wait_for};
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m-instruct";
/// The operator token the test orchestrators run with.
const TOKEN: &str = "test-operator-token";
/// The test orchestrators' heartbeat interval: short, so a dead worker shows within a second.
const HEARTBEAT_MS: u64 = 200;

/// A `computepool orchestrator` process.
struct Orchestrator {
    child: Child,
    addr: String,
    state_dir: PathBuf,
    log: PathBuf,
}

impl Orchestrator {
    /// Starts one on a free port with its state in `state_dir`, and waits for its ready line.
    fn start(state_dir: &Path) -> Self {
        Self::start_at(state_dir, "127.0.0.1:0")
    }

    /// Starts one listening on `listen`.
    fn start_at(state_dir: &Path, listen: &str) -> Self {
        let log = state_dir.join("orchestrator.log");
        std::fs::create_dir_all(state_dir).expect("state dir");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log");
        let mut child = Command::new(bin())
            .args(["orchestrator", "--listen", listen, "--heartbeat-ms", &HEARTBEAT_MS.to_string(), "--state-dir"])
            .arg(state_dir)
            .env("RUST_LOG", "info")
            .env("COMPUTEPOOL_OPERATOR_TOKEN", TOKEN)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("start the orchestrator");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("ready line");
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line {line:?} ({e}):\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        let addr = ready["url"].as_str().expect("url").trim_start_matches("http://").to_string();
        Self { child, addr, state_dir: state_dir.to_path_buf(), log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn db(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.state_dir.join("orchestrator.db")).expect("open the database")
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Two SmolLM2 workers and an orchestrator serving them as a pool (the orchestrator's key is the
/// topology's client); the workers register with the orchestrator and heartbeat every 200 ms.
fn setup(model: &Path) -> (Cluster, Orchestrator) {
    serve(Cluster::local(model, 30, 2, &[]), model)
}

/// Starts an orchestrator that serves `cluster`'s workers as pool `smol`, then the workers (reporting
/// to it).
fn serve(mut cluster: Cluster, model: &Path) -> (Cluster, Orchestrator) {
    let state_dir = cluster.dir.path().join("orchestrator");
    std::fs::create_dir_all(&state_dir).expect("state dir");
    std::fs::copy(cluster.dir.path().join("client.key"), state_dir.join("orchestrator.key")).expect("key");
    let orchestrator = Orchestrator::start(&state_dir);
    let token_file = cluster.dir.path().join("operator.token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    cluster.extra_args = vec![
        "--orchestrator".into(),
        format!("http://{}", orchestrator.addr),
        "--operator-token-file".into(),
        token_file.to_string_lossy().into_owned(),
    ];
    register(&cluster, &orchestrator, model);
    cluster.start_all();
    (cluster, orchestrator)
}

fn register(cluster: &Cluster, orchestrator: &Orchestrator, model: &Path) {
    let topology: Value =
        serde_json::from_str(&std::fs::read_to_string(cluster.topology_path()).expect("topology")).expect("JSON");
    let spec = json!({"id": "smol", "model": MODEL, "model_dir": model, "topology": topology});
    let r = http::post_as(&orchestrator.addr, "/pools", &spec, TOKEN);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["model"], MODEL);
}

/// Sends `body` until the pool answers 200 (its workers' links come up after they report ready).
fn post_when_ready(addr: &str, path: &str, body: &Value) -> http::Response {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http::post(addr, path, body);
        if r.status != 503 || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The value of the sample `series` (name and labels, exactly as exposed) in a /metrics text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        .parse()
        .expect("a number")
}

/// Every worker's value of a per-worker metric: (labels, value).
fn worker_metric(addr: &str, name: &str) -> Vec<(String, f64)> {
    let text = http::get(addr, "/metrics").body;
    text.lines()
        .filter_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix('{')))
        .filter_map(|rest| rest.split_once("} "))
        .map(|(labels, v)| (labels.to_string(), v.parse().expect("a number")))
        .collect()
}

/// What a direct one-process `computepool generate` run printed.
struct Direct {
    text: String,
    tokens: usize,
    prompt_tokens: usize,
    finish_reason: String,
}

fn direct(model: &Path, args: &[&str]) -> Direct {
    let out = Command::new(bin())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--threads", "1", "--temperature", "0", "--json"])
        .args(args)
        .output()
        .expect("run generate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let line = stderr.lines().rev().find(|l| l.starts_with('{')).expect("JSON line");
    let v: Value = serde_json::from_str(line).expect("JSON");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8");
    Direct {
        text: stdout.strip_suffix('\n').expect("a final newline").to_string(),
        tokens: v["tokens"].as_array().expect("tokens").len(),
        prompt_tokens: v["prompt_tokens"].as_u64().expect("prompt tokens") as usize,
        finish_reason: v["finish_reason"].as_str().expect("finish reason").to_string(),
    }
}

fn usage_of(v: &Value) -> (u64, u64, u64) {
    let u = &v["usage"];
    (u["prompt_tokens"].as_u64().expect("prompt"), u["completion_tokens"].as_u64().expect("completion"), u["total_tokens"].as_u64().expect("total"))
}

/// Checks an SSE body's shape and returns its text, finish reason and usage (when asked for).
fn read_stream(r: &http::Response, object: &str, chat: bool) -> (String, String, Option<Value>) {
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")), "{:?}", r.headers);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "the stream ends with [DONE]: {:?}", r.body);
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).expect("JSON chunk")).collect();
    let id = chunks[0]["id"].as_str().expect("id").to_string();
    let (mut text, mut finish, mut usage) = (String::new(), None, None);
    for (i, c) in chunks.iter().enumerate() {
        assert_eq!(c["object"], object);
        assert_eq!(c["id"], id.as_str(), "every chunk has the response's id");
        assert_eq!(c["model"], MODEL);
        assert!(c["created"].as_u64().is_some());
        let choices = c["choices"].as_array().expect("choices");
        if choices.is_empty() {
            assert_eq!(i, chunks.len() - 1, "the usage chunk is the last one");
            usage = Some(c["usage"].clone());
            continue;
        }
        assert!(finish.is_none(), "nothing but usage after the finish chunk");
        let choice = &choices[0];
        assert_eq!(choice["index"], 0);
        if chat {
            if i == 0 {
                assert_eq!(choice["delta"]["role"], "assistant", "the first chunk names the role");
            }
            text.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        } else {
            text.push_str(choice["text"].as_str().expect("text"));
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    (text, finish.expect("a finish chunk"), usage)
}

#[test]
fn the_openai_api_returns_the_direct_runs_tokens_in_openai_shapes() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let question = "What is the capital of France? Answer in one sentence.";
    let story = "Once upon a time";
    let want_chat = direct(&model, &["--chat", "--prompt", question, "--max-tokens", "40"]);
    let want_text = direct(&model, &["--prompt", story, "--max-tokens", "24"]);
    let want_stop = direct(&model, &["--prompt", story, "--max-tokens", "40", "--stop", ","]);
    assert!(want_chat.tokens > 3 && want_text.tokens == 24, "direct runs: {} and {} tokens", want_chat.tokens, want_text.tokens);
    let (_cluster, orchestrator) = setup(&model);
    let addr = orchestrator.addr.as_str();

    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 40, "temperature": 0});
    let r = post_when_ready(addr, "/v1/chat/completions", &chat);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want_chat.text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], want_chat.finish_reason.as_str());
    let total = (want_chat.prompt_tokens + want_chat.tokens) as u64;
    assert_eq!(usage_of(&v), (want_chat.prompt_tokens as u64, want_chat.tokens as u64, total));

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = http::post(addr, "/v1/chat/completions", &streamed);
    let (text, finish, usage) = read_stream(&r, "chat.completion.chunk", true);
    assert_eq!((text.as_str(), finish.as_str()), (want_chat.text.as_str(), want_chat.finish_reason.as_str()));
    let usage = usage.expect("include_usage gives a usage chunk");
    assert_eq!(usage["completion_tokens"], want_chat.tokens as u64);
    assert_eq!(usage["total_tokens"], total);

    // Without include_usage: no usage chunk, and no usage field on the chunks.
    streamed["stream_options"] = Value::Null;
    let r = http::post(addr, "/v1/chat/completions", &streamed);
    let (text, _, usage) = read_stream(&r, "chat.completion.chunk", true);
    assert_eq!((text.as_str(), usage), (want_chat.text.as_str(), None));
    assert!(!r.body.contains("\"usage\""));

    let completion = json!({"model": MODEL, "prompt": story, "max_tokens": 24, "temperature": 0});
    let r = http::post(addr, "/v1/completions", &completion);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want_text.text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(usage_of(&v).1, 24);

    let mut streamed = completion.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = http::post(addr, "/v1/completions", &streamed);
    let (text, finish, usage) = read_stream(&r, "text_completion", false);
    assert_eq!((text.as_str(), finish.as_str()), (want_text.text.as_str(), "length"));
    assert_eq!(usage.expect("usage")["completion_tokens"], 24);

    // The native route streams the same tokens as SSE events named like the entry's.
    let r = http::post(addr, "/pools/smol/infer", &json!({"prompt": story, "max_tokens": 24, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    let names: Vec<&str> = r.body.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names.first(), Some(&"started"), "{}", r.body);
    assert_eq!(names.last(), Some(&"done"), "{}", r.body);
    assert_eq!(names.iter().filter(|n| **n == "token").count(), 24, "{}", r.body);
    let data: Vec<Value> = r.sse_data().iter().map(|d| serde_json::from_str(d).expect("JSON")).collect();
    let text: String = data[1..data.len() - 1].iter().map(|t| t["text"].as_str().expect("text")).collect();
    assert_eq!(text, want_text.text);
    let done = data.last().expect("done");
    assert_eq!((done["finish_reason"].as_str(), done["completion_tokens"].as_u64()), (Some("length"), Some(24)));
    assert!(done["time_to_first_token_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{done}");
    // Token ids in, too.
    let ids: Vec<u64> = data[1..data.len() - 1].iter().take(3).map(|t| t["token"].as_u64().expect("id")).collect();
    let r = http::post(addr, "/pools/smol/infer", &json!({"prompt_tokens": ids, "max_tokens": 2}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("event: done"), "{}", r.body);

    // A stop string ends the text before it, with finish_reason "stop", as in the direct run.
    let stop = json!({"model": MODEL, "prompt": story, "max_tokens": 40, "temperature": 0, "stop": [","]});
    let v = http::post(addr, "/v1/completions", &stop).json();
    assert_eq!(want_stop.finish_reason, "stop", "the direct run stopped at the comma");
    assert_eq!(v["choices"][0]["text"], want_stop.text.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(usage_of(&v).1, want_stop.tokens as u64);

    // Every request left its usage in the database.
    let rows_query = || -> Vec<(String, i64, String, Option<f64>)> {
        orchestrator
            .db()
            .prepare("SELECT endpoint, completion_tokens, outcome, time_to_first_token_ms FROM requests WHERE outcome != 'error' ORDER BY started_at_ms")
            .expect("query")
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    // Rows are written as each request ends, off the serving threads: give the last one a moment.
    assert!(wait_for(Duration::from_secs(2), || rows_query().len() >= 8), "{:?}", rows_query());
    let rows = rows_query();
    let tail: Vec<(&str, i64)> = rows.iter().rev().take(8).rev().map(|r| (r.0.as_str(), r.1)).collect();
    let (c, t) = (want_chat.tokens as i64, want_stop.tokens as i64);
    assert_eq!(
        tail,
        [
            ("chat.completions", c),
            ("chat.completions", c),
            ("chat.completions", c),
            ("completions", 24),
            ("completions", 24),
            ("infer", 24),
            ("infer", 2),
            ("completions", t)
        ]
    );
    assert!(rows.iter().all(|r| r.3.is_some_and(|ms| ms > 0.0)), "time to first token recorded: {rows:?}");
}

#[test]
fn bad_input_gets_openai_errors_and_the_server_keeps_serving() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let (_cluster, orchestrator) = setup(&model);
    let addr = orchestrator.addr.as_str();
    let ok = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0});
    assert_eq!(post_when_ready(addr, "/v1/completions", &ok).status, 200);

    let messages = json!([{"role": "user", "content": "hi"}]);
    let long_prompt = "hello ".repeat(9000);
    // (what, path, body, status, error code, error param)
    type Case<'a> = (&'a str, &'a str, Vec<u8>, u16, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("malformed JSON", "/v1/chat/completions", b"{\"model\": \"x\", \"messages\": [".to_vec(), 400, "invalid_json", None),
        ("not an object", "/v1/completions", b"[1, 2]".to_vec(), 400, "invalid_value", None),
        ("unknown model", "/v1/chat/completions", json!({"model": "gpt-9", "messages": messages}).to_string().into_bytes(), 404, "model_not_found", Some("model")),
        ("max_tokens 0", "/v1/chat/completions", json!({"model": MODEL, "messages": messages, "max_tokens": 0}).to_string().into_bytes(), 400, "invalid_value", Some("max_tokens")),
        ("max_completion_tokens -1", "/v1/chat/completions", json!({"model": MODEL, "messages": messages, "max_completion_tokens": -1}).to_string().into_bytes(), 400, "invalid_value", Some("max_completion_tokens")),
        ("n 2", "/v1/chat/completions", json!({"model": MODEL, "messages": messages, "n": 2}).to_string().into_bytes(), 400, "invalid_value", Some("n")),
        ("prompt over the context window", "/v1/completions", json!({"model": MODEL, "prompt": long_prompt, "max_tokens": 4}).to_string().into_bytes(), 400, "context_length_exceeded", Some("prompt")),
        ("chat over the context window", "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}).to_string().into_bytes(), 400, "context_length_exceeded", Some("messages")),
        ("temperature 5", "/v1/completions", json!({"model": MODEL, "prompt": "a", "temperature": 5}).to_string().into_bytes(), 400, "invalid_value", Some("temperature")),
        ("a 10 MB body", "/v1/completions", [b"{\"model\":\"x\",\"prompt\":\"".as_slice(), &vec![b'a'; 10 << 20], b"\"}"].concat(), 413, "request_too_large", None),
        ("bad pool", "/pools", json!({"model": "m", "model_dir": "/nonexistent", "topology": {"num_layers": 1, "shards": []}}).to_string().into_bytes(), 400, "invalid_value", Some("topology")),
        ("infer: unknown pool", "/pools/nope/infer", json!({"prompt": "hi"}).to_string().into_bytes(), 404, "not_found", None),
        ("infer: an id", "/pools/smol/infer", json!({"prompt": "hi", "id": "mine"}).to_string().into_bytes(), 400, "invalid_value", Some("id")),
        ("infer: unknown field", "/pools/smol/infer", json!({"prompt": "hi", "n": 2}).to_string().into_bytes(), 400, "invalid_value", None),
        ("infer: max_tokens 0", "/pools/smol/infer", json!({"prompt": "hi", "max_tokens": 0}).to_string().into_bytes(), 400, "invalid_value", None),
        ("heartbeat: unknown worker", "/workers/nobody/heartbeat", json!({"active_requests": 0, "kv_caches": 0, "kv_cache_bytes": 0}).to_string().into_bytes(), 404, "worker_not_found", None),
        ("register: bad peer", "/workers", json!({"peer": "x", "addrs": ["127.0.0.1:1"], "model": "m", "layers": "0..1", "device": "cpu", "weight_bytes": 1, "speed": 1.0}).to_string().into_bytes(), 400, "invalid_value", Some("peer")),
    ];
    let auth = format!("Bearer {TOKEN}");
    for (what, path, body, status, code, param) in &cases {
        let r = http::request_with(addr, "POST", path, body, &[("Authorization", &auth)]);
        assert_eq!(r.status, *status, "{what}: {}", r.body);
        let e = &r.json()["error"];
        assert_eq!(e["code"], *code, "{what}: {e}");
        assert_eq!(e["param"].as_str(), *param, "{what}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| m.len() > 10), "{what}: {e}");
        assert!(e["type"].as_str().is_some(), "{what}: {e}");
        // The server is unharmed: a good request right after each bad one works.
        let r = http::post(addr, "/v1/completions", &ok);
        assert_eq!(r.status, 200, "after {what}: {}", r.body);
    }
    // A pool that does not list this orchestrator as a client is refused with the fix in the message.
    let topology: Value = serde_json::from_str(&std::fs::read_to_string(_cluster.topology_path()).expect("read")).expect("JSON");
    let mut stranger = topology.clone();
    stranger["clients"] = json!([]);
    let r = http::post_as(addr, "/pools", &json!({"id": "other", "model": "other", "model_dir": model, "topology": stranger}), TOKEN);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("add its peer id"), "{}", r.body);
    let spec = json!({"id": "smol", "model": MODEL, "model_dir": model, "topology": topology});
    let r = http::post_as(addr, "/pools", &spec, TOKEN);
    assert_eq!(r.status, 409, "the same pool twice: {}", r.body);
    // The write routes want the operator token: none, or a wrong one, is a 401 in OpenAI's shape.
    let registration = json!({"peer": _cluster.peers[0], "addrs": ["127.0.0.1:1"], "model": "m", "layers": "0..15",
                              "device": "cpu", "weight_bytes": 1, "speed": 1.0});
    let beat = json!({"active_requests": 0, "kv_caches": 0, "kv_cache_bytes": 0});
    let heartbeat_path = format!("/workers/{}/heartbeat", _cluster.peers[0]);
    for (path, body) in [("/pools", &spec), ("/workers", &registration), (heartbeat_path.as_str(), &beat)] {
        for r in [http::post(addr, path, body), http::post_as(addr, path, body, "not-the-token")] {
            assert_eq!(r.status, 401, "{path}: {}", r.body);
            assert_eq!(r.json()["error"]["code"], "invalid_api_key", "{path}: {}", r.body);
        }
    }
    assert_eq!(http::get(addr, "/v1/nothing").status, 404);
    assert_eq!(http::get(addr, "/pools/nope").status, 404);
}

#[test]
fn a_client_that_hangs_up_mid_stream_cancels_its_request_on_every_shard() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let (cluster, orchestrator) = setup(&model);
    let addr = orchestrator.addr.as_str();
    assert_eq!(post_when_ready(addr, "/v1/completions", &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2})).status, 200);

    let long = json!({"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut stream = EventStream::open(addr, "/v1/completions", &long);
    assert_eq!(stream.status, 200);
    let first: Value = serde_json::from_str(&stream.next_data().expect("a chunk")).expect("JSON");
    let id = first["id"].as_str().expect("id").to_string();
    for _ in 0..10 {
        stream.next_data().expect("more chunks");
    }
    let freed = |i: usize| cluster.log(i).lines().any(|l| l.contains(&id) && l.contains("KV cache freed"));
    assert!(!freed(0) && !freed(1), "nothing is freed while the client reads");
    // While the stream runs, both workers' heartbeats report the request's cache and its bytes. (A
    // heartbeat sent between the request's start and its first step on a shard reports the cache
    // still empty: 0 bytes. The loop waits for later ones.)
    let caches = || worker_metric(addr, "computepool_worker_kv_caches");
    let bytes = || worker_metric(addr, "computepool_worker_kv_cache_bytes");
    let holding = |caches: &[(String, f64)], bytes: &[(String, f64)]| {
        caches.len() == 2 && caches.iter().all(|(_, n)| *n >= 1.0) && bytes.len() == 2 && bytes.iter().all(|(_, b)| *b > 0.0)
    };
    let mut held = (Vec::new(), Vec::new());
    for _ in 0..200 {
        stream.next_data().expect("more chunks");
        held = (caches(), bytes());
        if holding(&held.0, &held.1) {
            break;
        }
    }
    assert!(holding(&held.0, &held.1), "caches and bytes held mid-stream per /metrics: {held:?}");
    let hung_up = Instant::now();
    drop(stream);
    assert!(
        wait_for(Duration::from_secs(1), || freed(0) && freed(1)),
        "the request's KV cache was not freed on every shard within 1 s:\nentry:\n{}\nexit:\n{}",
        cluster.log(0),
        cluster.log(1)
    );
    eprintln!("freed on both shards {:?} after the hang-up", hung_up.elapsed());
    // /metrics shows it: every worker reports 0 caches within 1 s plus one heartbeat.
    let limit = Duration::from_secs(1) + Duration::from_millis(HEARTBEAT_MS);
    let zero = || {
        let c = caches();
        c.len() == 2 && c.iter().all(|(_, n)| *n == 0.0)
    };
    assert!(wait_for(limit.saturating_sub(hung_up.elapsed()), zero), "after {:?}: {:?}", hung_up.elapsed(), caches());
    eprintln!("/metrics showed 0 caches on every worker {:?} after the hang-up", hung_up.elapsed());
    let text = http::get(addr, "/metrics").body;
    assert!(metric(&text, "computepool_requests_total{outcome=\"cancelled\"}") >= 1.0, "{text}");
    assert!(metric(&text, "computepool_tokens_generated_total") >= 10.0, "{text}");
    assert!(metric(&text, "computepool_time_to_first_token_seconds_count") >= 2.0, "{text}");
    assert_eq!(metric(&text, "computepool_queue_depth{pool=\"smol\"}"), 0.0, "{text}");
    let outcome = || -> Option<(String, i64)> {
        orchestrator
            .db()
            .query_row("SELECT outcome, completion_tokens FROM requests WHERE id = ?1", [&id], |r| Ok((r.get(0)?, r.get(1)?)))
            .ok()
    };
    assert!(wait_for(Duration::from_secs(2), || outcome().is_some()), "the request was not recorded");
    let (outcome, tokens) = outcome().expect("recorded");
    assert_eq!(outcome, "cancelled");
    assert!((10..4000).contains(&tokens), "{tokens} tokens before the hang-up");
    // And the pool still serves.
    let r = http::post(addr, "/v1/completions", &json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2, "ignore_eos": true}));
    assert_eq!((r.status, usage_of(&r.json()).1), (200, 2), "{}", r.body);
}

#[test]
fn a_restarted_orchestrator_gets_its_pools_back() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let (_cluster, mut orchestrator) = setup(&model);
    let request = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
    let before = post_when_ready(&orchestrator.addr, "/v1/completions", &request);
    assert_eq!(before.status, 200, "{}", before.body);

    // SIGKILL: no chance to save anything on the way out.
    orchestrator.kill();
    let log = orchestrator.log.clone();
    let restarted_at = Instant::now();
    let again = Orchestrator::start(&orchestrator.state_dir);
    let pools = http::get(&again.addr, "/pools").json();
    assert_eq!(pools["data"].as_array().map(Vec::len), Some(1), "{pools}");
    assert_eq!(pools["data"][0]["id"], "smol");
    assert_eq!(http::get(&again.addr, "/pools/smol").json()["model"], MODEL);
    assert_eq!(http::get(&again.addr, "/v1/models").json()["data"][0]["id"], MODEL);
    let after = post_when_ready(&again.addr, "/v1/completions", &request);
    assert_eq!(after.status, 200, "{}\n{}", after.body, std::fs::read_to_string(&log).unwrap_or_default());
    let took = restarted_at.elapsed();
    assert!(took < Duration::from_secs(5), "requests worked again only after {took:?}");
    assert_eq!(after.json()["choices"][0]["text"], before.json()["choices"][0]["text"]);
    let rows: i64 = again.db().query_row("SELECT COUNT(*) FROM requests", [], |r| r.get(0)).expect("count");
    assert!(rows >= 2, "requests from before the restart are kept: {rows}");
}

/// 32 streaming clients at once, each with its own prompt, each get exactly the greedy text of their
/// request run alone; all finish; p50 and p99 time to first token (from the orchestrator's records).
#[test]
fn concurrent_streaming_clients_each_get_their_own_single_run() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    const CLIENTS: usize = 32;
    let (_cluster, orchestrator) = setup(&model);
    let addr = orchestrator.addr.clone();
    let body = |i: usize, stream: bool| {
        json!({"model": MODEL, "prompt": format!("Fact number {i} about the number {}:", i * 7 + 3),
               "max_tokens": 12, "ignore_eos": true, "temperature": 0, "stream": stream})
    };
    assert_eq!(post_when_ready(&addr, "/v1/completions", &body(0, false)).status, 200);
    let alone: Vec<String> = (0..CLIENTS)
        .map(|i| {
            let r = http::post(&addr, "/v1/completions", &body(i, false));
            assert_eq!(r.status, 200, "{}", r.body);
            r.json()["choices"][0]["text"].as_str().expect("text").to_string()
        })
        .collect();
    let distinct: std::collections::HashSet<&String> = alone.iter().collect();
    assert!(distinct.len() > CLIENTS / 2, "the prompts should give different texts: {alone:?}");

    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (addr, barrier, body) = (addr.clone(), barrier.clone(), body(i, true));
            std::thread::spawn(move || {
                barrier.wait();
                let r = http::post(&addr, "/v1/completions", &body);
                let (text, finish, _) = read_stream(&r, "text_completion", false);
                let id: Value = serde_json::from_str(&r.sse_data()[0]).expect("JSON");
                (text, finish, id["id"].as_str().expect("id").to_string())
            })
        })
        .collect();
    let mut ids = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        let (text, finish, id) = h.join().expect("client thread");
        assert_eq!(finish, "length");
        assert_eq!(text, alone[i], "client {i} got another text under load");
        ids.push(id);
    }
    let ttft = |id: &String| -> Option<f64> {
        orchestrator
            .db()
            .query_row("SELECT time_to_first_token_ms FROM requests WHERE id = ?1 AND outcome = 'length'", [id], |r| r.get(0))
            .ok()
            .flatten()
    };
    assert!(wait_for(Duration::from_secs(2), || ids.iter().all(|id| ttft(id).is_some())), "every request is recorded");
    let mut ms: Vec<f64> = ids.iter().filter_map(ttft).collect();
    ms.sort_by(f64::total_cmp);
    let pct = |p: f64| ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1];
    eprintln!("{CLIENTS} concurrent streams: time to first token p50 {:.1} ms, p99 {:.1} ms", pct(0.50), pct(0.99));
}

/// Workers register and heartbeat; /workers and /topology show them per pool; a worker that stops
/// beating is down within 3 beats, and its pool then answers 503 at once (no live route) until it is
/// back; requests sent the moment it is back are served (the entry's link to it may still be in its
/// redial backoff: the orchestrator routes them again until it is up), each recorded with its routes;
/// after the orchestrator is killed and restarted, the workers register again on their own.
#[test]
fn workers_register_heartbeat_go_down_and_come_back_after_a_restart() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let (mut cluster, mut orchestrator) = setup(&model);
    let addr = orchestrator.addr.clone();
    let request = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    assert_eq!(post_when_ready(&addr, "/v1/completions", &request).status, 200);
    let statuses = |addr: &str| -> Vec<(String, String)> {
        let v = http::get(addr, "/workers").json();
        v["data"].as_array().expect("data").iter().map(|w| {
            (w["peer"].as_str().expect("peer").to_string(), w["status"].as_str().expect("status").to_string())
        }).collect()
    };
    let all_up = |addr: &str| {
        let s = statuses(addr);
        s.len() == 2 && s.iter().all(|(_, st)| st == "up")
    };
    assert!(wait_for(Duration::from_secs(5), || all_up(&addr)), "{:?}", statuses(&addr));
    let workers = http::get(&addr, "/workers").json();
    for w in workers["data"].as_array().expect("data") {
        let i = cluster.peers.iter().position(|p| w["peer"] == p.as_str()).expect("one of ours");
        assert_eq!(w["pools"], json!(["smol"]));
        assert_eq!(w["layers"], ["0..15", "15..30"][i]);
        assert!(w["device"].as_str().is_some_and(|d| d.starts_with("cpu")), "{w}");
        assert_eq!(w["model"], MODEL);
        assert!(w["speed"].as_f64().is_some_and(|s| s > 0.0), "measured speed: {w}");
        assert!(w["weight_bytes"].as_u64().is_some_and(|b| b > 1_000_000), "{w}");
        assert!(w["last_heartbeat_ms_ago"].as_i64().is_some_and(|ms| ms < 3 * HEARTBEAT_MS as i64), "{w}");
    }
    let topology = http::get(&addr, "/topology").json();
    let pool = &topology["pools"][0];
    assert_eq!((pool["pool"].as_str(), pool["ready"].as_bool()), (Some("smol"), Some(true)), "{topology}");
    let ranges: Vec<&str> = pool["shards"].as_array().expect("shards").iter().map(|s| s["layers"].as_str().expect("layers")).collect();
    assert_eq!(ranges, ["0..15", "15..30"]);
    assert!(pool["shards"].as_array().expect("shards").iter().all(|s| s["workers"][0]["status"] == "up"), "{topology}");
    let up_metrics = worker_metric(&addr, "computepool_worker_up");
    assert_eq!(up_metrics.iter().map(|(_, v)| *v).collect::<Vec<_>>(), [1.0, 1.0], "{up_metrics:?}");

    // The exit worker dies: down within 3 missed beats, and the pool has no live route.
    cluster.kill(1);
    let killed = Instant::now();
    let exit_down = |addr: &str| statuses(addr).iter().any(|(p, st)| p == &cluster.peers[1] && st == "down");
    assert!(wait_for(Duration::from_secs(3), || exit_down(&addr)), "{:?}", statuses(&addr));
    eprintln!("the killed worker was marked down after {:?}", killed.elapsed());
    assert_eq!(http::get(&addr, "/topology").json()["pools"][0]["ready"], false);
    let asked = Instant::now();
    let r = http::post(&addr, "/v1/completions", &request);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "pool_unavailable");
    assert!(r.body.contains("no live route") && r.body.contains("15..30"), "{}", r.body);
    assert!(asked.elapsed() < Duration::from_millis(500), "the 503 took {:?}", asked.elapsed());
    let r = http::post(&addr, "/pools/smol/infer", &json!({"prompt": "Hi", "max_tokens": 2}));
    assert_eq!(r.status, 503, "{}", r.body);

    // It comes back (same key and address): up again, and requests sent at once, side by side, are
    // served with no retry by the client (the entry's link to the restarted exit may still be backing
    // off: the orchestrator routes them again until it is up).
    cluster.start(1);
    assert!(wait_for(Duration::from_secs(10), || all_up(&addr)), "{:?}", statuses(&addr));
    let rerouted = |o: &Orchestrator| std::fs::read_to_string(&o.log).unwrap_or_default().matches("routing it again").count();
    let rerouted_before = rerouted(&orchestrator);
    let counted = |outcome: &str| metric(&http::get(&addr, "/metrics").body, &format!("computepool_requests_total{{outcome=\"{outcome}\"}}"));
    let finished = || counted("length") + counted("stop");
    let (finished_before, errors_before) = (finished(), counted("error"));
    let sent = Instant::now();
    let answers: Vec<http::Response> = std::thread::scope(|s| {
        let posts: Vec<_> = (0..3).map(|_| s.spawn(|| http::post(&addr, "/v1/completions", &request))).collect();
        posts.into_iter().map(|p| p.join().expect("a client thread")).collect()
    });
    let took = sent.elapsed();
    for r in &answers {
        assert_eq!(r.status, 200, "a request right after the restart: {}\n{}", r.body, cluster.log(0));
    }
    // Routed again inside the orchestrator: each request counted once, none as an error.
    assert_eq!((finished() - finished_before, counted("error") - errors_before), (3.0, 0.0));
    let rerouted = rerouted(&orchestrator) - rerouted_before;
    eprintln!("3 requests right after the restart: served in {took:?}, {rerouted} of their routes failed first and were routed again");
    // Each row says the routes its request took: the last one whole, the ones before it broken.
    let both = json!([cluster.peers[0], cluster.peers[1]]);
    let mut broken_legs = 0;
    for r in &answers {
        let id = r.json()["id"].as_str().expect("id").to_string();
        let routes = (0..50)
            .find_map(|_| {
                let row: Option<Option<String>> =
                    orchestrator.db().query_row("SELECT routes FROM requests WHERE id = ?1", [&id], |r| r.get(0)).ok();
                row.flatten().or_else(|| {
                    std::thread::sleep(Duration::from_millis(20));
                    None
                })
            })
            .unwrap_or_else(|| panic!("request {id} has no routes recorded"));
        let legs: Vec<Value> = serde_json::from_str(&routes).expect("the routes column is JSON");
        let (last, before) = legs.split_last().expect("at least one route");
        assert_eq!((&last["route"], &last["workers"], &last["from_token"]), (&json!(0), &both, &json!(0)), "{routes}");
        assert!(last.get("broke").is_none(), "{routes}");
        assert!(before.iter().all(|leg| leg["broke"].is_string() && leg["from_token"] == 0), "{routes}");
        broken_legs += before.len();
    }
    assert_eq!(broken_legs, rerouted, "each route failed before the first token is in its request's row");

    // The orchestrator is killed; the workers' heartbeats fail meanwhile. Restarted, it knows its
    // workers from the database, and they register again on their own.
    let registrations = |i: usize| cluster.log(i).matches("registered with the orchestrator").count();
    let before = [registrations(0), registrations(1)];
    orchestrator.kill();
    std::thread::sleep(Duration::from_millis(4 * HEARTBEAT_MS));
    // On the same address: that is where the workers were told to report.
    let again = Orchestrator::start_at(&orchestrator.state_dir, &addr);
    let restarted = Instant::now();
    assert!(
        wait_for(Duration::from_secs(5), || registrations(0) > before[0] && registrations(1) > before[1]),
        "the workers did not register again:\n{}\n{}",
        cluster.log(0),
        cluster.log(1)
    );
    assert!(wait_for(Duration::from_secs(5), || all_up(&again.addr)), "{:?}", statuses(&again.addr));
    eprintln!("both workers registered again {:?} after the restart", restarted.elapsed());
    assert_eq!(post_when_ready(&again.addr, "/v1/completions", &request).status, 200);
}

/// One streamed request on pool `smol`, as a client sees it.
struct Run {
    /// The workers (cluster indices, entry first) of the route that served the request until the
    /// kill: the one in `started`, or the last `route` event's before the first token.
    route: Vec<usize>,
    /// The routes (workers, entry first) the request moved to after the kill, and from which token.
    moves: Vec<(Vec<usize>, u64)>,
    ids: Vec<u64>,
    text: String,
    end: Value,
    killed: Option<Instant>,
    /// From the kill to the first token after it.
    resumed_after: Option<Duration>,
}

/// Streams `body` from pool `smol`; with `kill = Some((n, k))`, SIGKILLs the `k`-th worker of its route
/// (0: the entry) once `n` tokens have come.
fn run_killing(cluster: &mut Cluster, addr: &str, body: &Value, kill: Option<(usize, usize)>) -> Run {
    // No retry: a restarted worker whose links are still being redialled is the orchestrator's to
    // route around (or wait for), never a 503 while the pool is up.
    let mut stream = EventStream::open(addr, "/pools/smol/infer", body);
    assert_eq!(stream.status, 200);
    let index = |cluster: &Cluster, peer: &str| cluster.peers.iter().position(|p| p == peer).expect("a pool worker");
    let workers = |cluster: &Cluster, event: &Value| -> Vec<usize> {
        event["workers"].as_array().expect("workers").iter().map(|p| index(cluster, p.as_str().expect("peer id"))).collect()
    };
    let started: Value = serde_json::from_str(&stream.next_data().expect("started")).expect("JSON");
    let mut route = workers(cluster, &started);
    let (mut ids, mut text, mut killed, mut resumed_after, mut moves) = (Vec::new(), String::new(), None, None, Vec::new());
    loop {
        let event: Value = serde_json::from_str(&stream.next_data().expect("an event")).expect("JSON");
        // A `route` event: the request moved (rerouted before its first token, or a failover).
        if let Some(from) = event["from_token"].as_u64() {
            assert_eq!(from, ids.len() as u64, "a move names the token it goes on from: {event}");
            match killed {
                None => route = workers(cluster, &event),
                Some(_) => moves.push((workers(cluster, &event), from)),
            }
            continue;
        }
        if let Some(id) = event["token"].as_u64() {
            if let (Some(k), None) = (killed, resumed_after) {
                resumed_after = Some(Instant::now().duration_since(k));
            }
            ids.push(id);
            text.push_str(event["text"].as_str().expect("text"));
            if let Some((after, victim)) = kill
                && after == ids.len()
            {
                cluster.kill(route[victim]);
                killed = Some(Instant::now());
            }
            continue;
        }
        return Run { route, moves, ids, text, end: event, killed, resumed_after };
    }
}

/// One topology with two workers per layer range (two rings' worth: a1 b1 a2 b2): SIGKILL the exit of
/// the route a stream is on, mid-stream, and the stream goes on through another route with exactly the
/// tokens of an undisturbed run (no error, no token repeated or missing) — greedy, and seeded sampling
/// (temperature 0.9, seed 7). A route mixing the rings (a1 → b2) gives the undisturbed tokens too. Then,
/// with no other exit left, the same kill gives the client a clear error within 2 s; and a pool with no
/// live route answers 503 at once.
#[test]
fn streams_survive_their_exit_dying_and_routes_mix_workers_per_range() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let specs: Vec<WorkerSpec> = [(0, 15), (15, 30), (0, 15), (15, 30)]
        .into_iter()
        .map(|layers| WorkerSpec { layers, addr: free_port("127.0.0.1"), netns: None })
        .collect();
    let (mut cluster, orchestrator) = serve(Cluster::new(&model, 30, specs, &[]), &model);
    let addr = orchestrator.addr.clone();
    let logs = |cluster: &Cluster| (0..4).map(|i| cluster.log(i)).collect::<Vec<_>>().join("\n---\n");
    // The original rings: workers 0 and 1, workers 2 and 3.
    let ring = |i: usize| i / 2;

    const TOKENS: usize = 120;
    let prompt = "Once upon a time, in a village by the sea,";
    let greedy = json!({"prompt": prompt, "max_tokens": TOKENS, "ignore_eos": true, "temperature": 0});
    let seeded = json!({"prompt": prompt, "max_tokens": TOKENS, "ignore_eos": true, "temperature": 0.9, "seed": 7});
    // One streamed request; after `before_kill` tokens, SIGKILL the exit of its route.
    let run = |cluster: &mut Cluster, body: &Value, before_kill: Option<usize>| {
        run_killing(cluster, &addr, body, before_kill.map(|n| (n, 1)))
    };
    let statuses = |addr: &str| -> Vec<(String, String)> {
        http::get(addr, "/workers").json()["data"]
            .as_array()
            .expect("data")
            .iter()
            .map(|w| (w["peer"].as_str().unwrap_or_default().to_string(), w["status"].as_str().unwrap_or_default().to_string()))
            .collect()
    };
    let status_of = |cluster: &Cluster, i: usize| statuses(&addr).into_iter().find(|(p, _)| p == &cluster.peers[i]).map(|(_, s)| s);
    // The workers come up; then the undisturbed runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while http::post(&addr, "/pools/smol/infer", &json!({"prompt": "Hi", "max_tokens": 1})).status != 200 {
        assert!(Instant::now() < deadline, "the pool never served:\n{}", logs(&cluster));
        std::thread::sleep(Duration::from_millis(200));
    }
    let want_greedy = run(&mut cluster, &greedy, None);
    assert_eq!(want_greedy.end["completion_tokens"], TOKENS as u64, "{}", want_greedy.end);
    let want_seeded = run(&mut cluster, &seeded, None);
    assert_eq!(want_seeded.end["completion_tokens"], TOKENS as u64, "{}", want_seeded.end);
    assert_ne!(want_seeded.ids, want_greedy.ids, "temperature 0.9 samples something else than greedy");

    // Greedy, then seeded: the exit of the stream's route dies after 20 tokens; the stream goes on
    // through another route with the undisturbed tokens. The killed exit comes back in between.
    for (body, want, name) in [(&greedy, &want_greedy, "greedy"), (&seeded, &want_seeded, "seeded")] {
        assert!(wait_for(Duration::from_secs(10), || (0..4).all(|i| status_of(&cluster, i).as_deref() == Some("up"))), "{:?}", statuses(&addr));
        let replays = |cluster: &Cluster| (0..4).map(|i| cluster.log(i).matches("resuming a request").count()).sum::<usize>();
        let before = replays(&cluster);
        let moved = run(&mut cluster, body, Some(20));
        assert!(moved.end.get("error").is_none(), "{name}: the client saw an error: {}\n{}", moved.end, logs(&cluster));
        assert_eq!(moved.end["completion_tokens"], TOKENS as u64, "{}", moved.end);
        assert_eq!(moved.ids, want.ids, "{name}: the token ids differ from the undisturbed run");
        assert_eq!(moved.text, want.text);
        let exit = moved.route[1];
        assert_eq!(moved.moves.len(), 1, "{name}: one `route` event tells the client of the move: {:?}", moved.moves);
        let (to, from) = &moved.moves[0];
        assert_eq!(*from, 20, "{name}: the move goes on from token 20");
        assert!(!to.contains(&exit), "{name}: the new route {to:?} avoids the killed exit {exit}");
        let took = moved.resumed_after.expect("tokens came after the kill");
        eprintln!("{name}: route {:?}'s exit was killed; the next token came {took:?} later, through another route", moved.route);
        assert_eq!(replays(&cluster), before + 1, "an entry replayed it once:\n{}", logs(&cluster));
        cluster.start(exit);
    }

    assert!(wait_for(Duration::from_secs(10), || (0..4).all(|i| status_of(&cluster, i).as_deref() == Some("up"))), "{:?}", statuses(&addr));
    // Route a1 → b2 mixes the rings: eject a2 and b1 (no new request is routed through them), so the
    // only route left is the mixed one, and it gives the undisturbed tokens.
    for i in [1, 2] {
        let r = http::post_as(&addr, &format!("/workers/{}/eject", cluster.peers[i]), &json!({"reason": "test: force the mixed route"}), TOKEN);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let mixed = run(&mut cluster, &greedy, None);
    assert_eq!(mixed.route, [0, 3], "the one live route");
    assert_ne!(ring(mixed.route[0]), ring(mixed.route[1]), "entry and exit from different rings");
    assert_eq!(mixed.ids, want_greedy.ids, "a mixed route gives the same tokens");
    let topology = http::get(&addr, "/topology").json();
    let routed: Vec<u64> = topology["pools"][0]["shards"]
        .as_array()
        .expect("shards")
        .iter()
        .flat_map(|s| s["workers"].as_array().expect("workers").iter().map(|w| w["routed"].as_u64().expect("routed")))
        .collect();
    assert!(routed.iter().all(|&n| n > 0), "every worker took requests: {topology}");

    // Its exit then dies too: no exit is left, and the client hears so within 2 s.
    let last = run(&mut cluster, &greedy, Some(10));
    let killed = last.killed.expect("killed");
    let took = killed.elapsed();
    assert!(last.end.get("error").is_some(), "expected an error event, got {}", last.end);
    assert!(last.ids.len() < TOKENS);
    assert_eq!(last.ids[..], want_greedy.ids[..last.ids.len()]);
    let message = last.end["error"]["message"].as_str().expect("message");
    assert!(message.contains("no replica route is left"), "{message}");
    assert_eq!(last.end["error"]["code"], "pool_unavailable", "{}", last.end);
    assert!(took < Duration::from_secs(2), "the error came {took:?} after the kill");
    eprintln!("without another route the client got the error {took:?} after the kill: {message}");

    // No live route: 503 at once.
    let all_down = || http::get(&addr, "/topology").json()["pools"][0]["ready"] == false;
    assert!(wait_for(Duration::from_secs(3), all_down));
    let r = http::post(&addr, "/pools/smol/infer", &greedy);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains("no live route"), "{}", r.body);
}

/// A pool of two workers that each hold the whole model (two routes of one worker each): SIGKILL the
/// worker a seeded stream is on, mid-stream, and the stream goes on on the other with exactly the
/// undisturbed tokens: that worker replays the tokens so far, then samples on with the request's random
/// stream where the dead one left it.
#[test]
fn a_stream_moves_off_a_dead_whole_model_worker_with_the_undisturbed_tokens() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let specs: Vec<WorkerSpec> =
        [(0, 30), (0, 30)].into_iter().map(|layers| WorkerSpec { layers, addr: free_port("127.0.0.1"), netns: None }).collect();
    let (mut cluster, orchestrator) = serve(Cluster::new(&model, 30, specs, &[]), &model);
    let addr = orchestrator.addr.clone();
    let logs = |cluster: &Cluster| (0..2).map(|i| cluster.log(i)).collect::<Vec<_>>().join("\n---\n");
    let body = json!({"prompt": "Once upon a time,", "max_tokens": 60, "ignore_eos": true, "temperature": 0.9, "seed": 7});
    assert_eq!(post_when_ready(&addr, "/pools/smol/infer", &json!({"prompt": "Hi", "max_tokens": 1})).status, 200);
    let want = run_killing(&mut cluster, &addr, &body, None);
    assert_eq!(want.end["completion_tokens"], 60, "{}", want.end);
    assert_eq!(want.route.len(), 1, "a route of one worker: {:?}", want.route);

    let moved = run_killing(&mut cluster, &addr, &body, Some((20, 0)));
    assert!(moved.end.get("error").is_none(), "the client saw an error: {}\n{}", moved.end, logs(&cluster));
    assert_eq!(moved.ids, want.ids, "the token ids differ from the undisturbed run");
    assert_eq!(moved.text, want.text);
    let dead = moved.route[0];
    assert_eq!(moved.moves.len(), 1, "one `route` event tells the client of the move: {:?}", moved.moves);
    assert_eq!(moved.moves[0], (vec![1 - dead], 20), "it moves to the other worker from token 20");
    assert_eq!(cluster.log(1 - dead).matches("resuming a request").count(), 1, "{}", logs(&cluster));
    eprintln!("the next token came {:?} after the kill", moved.resumed_after.expect("tokens after the kill"));
}
