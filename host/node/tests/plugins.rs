//! Sampler plugins in the node, as an operator runs them: `computepool plugin test|list|inspect` on every
//! plugin in plugins/, and a pool started by `computepool up --plugins DIR` whose OpenAI API runs the
//! sampler a request names on the exit shard — the greedy and top-p plugins giving exactly the native
//! tokens sharded, an unknown id refused with a 400, a broken plugin failing only its request, and a
//! plugin replaced on disk while a stream runs serving new requests while the stream finishes unharmed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::http::{self, EventStream};
use common::{bin, smollm2_dir};
use serde_json::{Value, json};

const MODEL: &str = "smollm2-135m-instruct";

fn plugins_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../plugins")
}

fn plugin(args: &[&str]) -> std::process::Output {
    Command::new(bin()).arg("plugin").args(args).output().expect("run computepool plugin")
}

#[test]
fn plugin_test_passes_every_sampler_in_plugins_and_fails_broken_ones() {
    let samplers = plugins_dir().join("samplers");
    // The operator grants mirostat the key-value store it keeps its state in.
    let tmp = tempfile::tempdir().expect("temp dir");
    let config = tmp.path().join("plugins.toml");
    std::fs::write(&config, "[grants]\ndefault = [\"log\", \"clock\", \"random\"]\n[grants.plugins]\nmirostat = [\"kv-store\"]\n")
        .expect("write config");
    let config = config.to_str().expect("UTF-8 path");
    let mut tested = Vec::new();
    for entry in std::fs::read_dir(&samplers).expect("plugins/samplers") {
        let dir = entry.expect("entry").path();
        if !dir.join("plugin.toml").is_file() {
            continue;
        }
        let out = plugin(&["test", dir.to_str().expect("UTF-8 path"), "--config", config]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}:\n{stdout}\n{}", dir.display(), String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains(": conforms"), "{stdout}");
        tested.push(dir.file_name().expect("name").to_string_lossy().to_string());
    }
    tested.sort();
    assert!(tested.len() >= 3 && tested.contains(&"greedy".to_string()), "{tested:?}");
    // Without the grant, mirostat is refused, and the error names what is missing.
    let out = plugin(&["test", samplers.join("mirostat").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kv-store"), "{}", String::from_utf8_lossy(&out.stderr));

    // A plugin that breaks the contract fails its suite (exit 1); one the host refuses cannot be tested
    // (exit 1 with the reason on stderr).
    let out = plugin(&["test", plugins_dir().join("bad/out-of-range-token").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("FAIL") && stdout.contains("does NOT conform"), "{stdout}");
    let out = plugin(&["test", plugins_dir().join("bad/wrong-sha256").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sha256"), "{}", String::from_utf8_lossy(&out.stderr));

    let out = plugin(&["list", plugins_dir().to_str().unwrap()]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for id in ["greedy", "top-p"] {
        assert!(stdout.lines().any(|l| l.starts_with("loaded") && l.split_whitespace().nth(1) == Some(id)), "{stdout}");
    }
    assert!(stdout.lines().any(|l| l.starts_with("refused") && l.contains("wrong-sha256")), "{stdout}");

    let out = plugin(&["inspect", plugins_dir().join("samplers/top-p").to_str().unwrap()]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("id:           top-p") && stdout.contains("capabilities: random"), "{stdout}");
}

/// Copies plugin folder `from` (relative to plugins/) to `to`, giving it the id `id`.
fn install(from: &str, to: &Path, id: &str) {
    let from = plugins_dir().join(from);
    std::fs::create_dir_all(to).expect("plugin folder");
    for entry in std::fs::read_dir(&from).expect("plugin folder") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name");
        if path.extension().is_some_and(|e| e == "wasm") {
            std::fs::copy(&path, to.join(name)).expect("copy wasm");
        }
    }
    let manifest = std::fs::read_to_string(from.join("plugin.toml")).expect("plugin.toml");
    let manifest: String = manifest
        .lines()
        .map(|l| if l.starts_with("id = ") { format!("id = \"{id}\"") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    // The manifest last: a watcher that sees it finds its wasm already there.
    std::fs::write(to.join("plugin.toml.tmp"), manifest + "\n").expect("write manifest");
    std::fs::rename(to.join("plugin.toml.tmp"), to.join("plugin.toml")).expect("rename manifest");
}

/// `computepool up` with two workers and a plugins folder, on a free port.
struct Pool {
    child: Child,
    addr: String,
}

impl Pool {
    fn start(model: &Path, plugins: &Path, state: &Path) -> Self {
        let log = std::fs::File::create(state.with_extension("log")).expect("log");
        let mut child = Command::new(bin())
            .args(["up", "--payments", "off", "--workers", "2", "--threads", "1", "--listen", "127.0.0.1:0", "--model", MODEL])
            .arg("--models-dir")
            .arg(model.parent().expect("models dir"))
            .arg("--state-dir")
            .arg(state)
            .arg("--plugins")
            .arg(plugins)
            .args(["--plugin-poll-ms", "100"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start computepool up");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = loop {
            let line = lines.next().expect("up printed its banner").expect("UTF-8");
            if let Some(url) = line.trim().strip_prefix("OpenAI-compatible API:") {
                break url.trim().trim_start_matches("http://").trim_end_matches("/v1").to_string();
            }
        };
        // Keep draining stdout so the process never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Self { child, addr }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Ctrl-C, so `up` stops its workers too.
        let _ = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn complete(addr: &str, body: Value) -> http::Response {
    let mut body = body;
    body["model"] = json!(MODEL);
    body["prompt"] = json!("Once upon a time");
    http::post(addr, "/v1/completions", &body)
}

fn text(r: &http::Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["text"].as_str().expect("text").to_string()
}

#[test]
fn the_exit_runs_the_requested_sampler_plugin_and_swaps_it_under_a_live_stream() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let plugins = tmp.path().join("plugins");
    install("samplers/greedy", &plugins.join("greedy"), "greedy");
    install("samplers/top-p", &plugins.join("top-p"), "top-p");
    install("bad/out-of-range-token", &plugins.join("broken"), "broken");
    install("samplers/greedy", &plugins.join("swap"), "swap");
    let pool = Pool::start(&model, &plugins, &tmp.path().join("state"));
    let addr = pool.addr.as_str();

    // Greedy: the plugin gives exactly the native tokens through a 2-shard pipeline.
    let greedy = json!({"max_tokens": 32, "temperature": 0, "ignore_eos": true});
    let native = text(&complete(addr, greedy.clone()));
    let mut with_plugin = greedy.clone();
    with_plugin["sampler"] = json!("greedy");
    assert_eq!(text(&complete(addr, with_plugin)), native);
    // Seeded sampling with penalties: the top-p plugin is the native sampler bit for bit.
    let sampled = json!({"max_tokens": 32, "temperature": 0.9, "top_p": 0.95, "top_k": 100, "min_p": 0.01,
        "presence_penalty": 0.3, "frequency_penalty": 0.2, "seed": 11, "ignore_eos": true});
    let native_sampled = text(&complete(addr, sampled.clone()));
    assert_ne!(native_sampled, native, "temperature 0.9 should leave the greedy path");
    let mut with_plugin = sampled.clone();
    with_plugin["sampler"] = json!("top-p");
    assert_eq!(text(&complete(addr, with_plugin)), native_sampled);

    // An unknown sampler is a 400 naming what the pool serves.
    let r = complete(addr, json!({"max_tokens": 4, "sampler": "nope"}));
    assert_eq!(r.status, 400, "{}", r.body);
    let message = r.json()["error"]["message"].as_str().expect("message").to_string();
    assert!(message.contains("unknown sampler `nope`") && message.contains("greedy") && message.contains("native"), "{message}");
    // A plugin returning an out-of-range token fails its request with the reason; the pool serves on.
    let r = complete(addr, json!({"max_tokens": 4, "sampler": "broken"}));
    assert!(r.status >= 400, "{}", r.body);
    assert!(r.body.contains("out of range") || r.body.contains("outside"), "{}", r.body);
    assert_eq!(text(&complete(addr, greedy.clone())), native);

    // Hot swap. `swap` is the greedy plugin: at temperature 1 it still gives the greedy text.
    let long = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 1.0,
        "seed": 7, "ignore_eos": true, "stream": true, "sampler": "swap"});
    let mut stream = EventStream::open(addr, "/v1/completions", &long);
    assert_eq!(stream.status, 200);
    let first = stream.next_data().expect("a first chunk");
    let reader = std::thread::spawn(move || {
        let mut chunks = vec![(first, Instant::now())];
        while let Some(data) = stream.next_data() {
            chunks.push((data, Instant::now()));
        }
        chunks
    });
    let probe = json!({"max_tokens": 16, "temperature": 1.0, "seed": 7, "ignore_eos": true, "sampler": "swap"});
    let before = text(&complete(addr, probe.clone()));
    let mut as_greedy = greedy.clone();
    as_greedy["max_tokens"] = json!(16);
    assert_eq!(before, text(&complete(addr, as_greedy)), "`swap` starts as greedy");
    // Replace its files with the top-p build; new requests sample at temperature 1.
    install("samplers/top-p", &plugins.join("swap"), "swap");
    let mut native_t1 = probe.clone();
    native_t1.as_object_mut().expect("object").remove("sampler");
    let want_after = text(&complete(addr, native_t1));
    assert_ne!(want_after, before);
    let deadline = Instant::now() + Duration::from_secs(20);
    let swapped_at = loop {
        let now = text(&complete(addr, probe.clone()));
        if now != before {
            assert_eq!(now, want_after, "the new `swap` is the top-p plugin: native sampling's tokens");
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "the replaced plugin was never picked up");
        std::thread::sleep(Duration::from_millis(100));
    };
    let chunks = reader.join().expect("reader");
    assert!(
        chunks.iter().any(|(_, at)| *at > swapped_at),
        "the long stream must still have been running when the new plugin served"
    );
    // The running stream finished on the old plugin: the greedy text, whole.
    let streamed: String = chunks
        .iter()
        .filter(|(d, _)| d != "[DONE]")
        .filter_map(|(d, _)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    let mut as_greedy = greedy;
    as_greedy["max_tokens"] = json!(400);
    assert_eq!(streamed, text(&complete(addr, as_greedy)));
}
