//! A harness for pipelines of real `computepool worker` processes: keys, a topology file, the workers
//! (each its own process, optionally inside a network namespace), and the `computepool generate`
//! client. Everything goes through the binary's command line, as an operator would use it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub mod http;
pub mod netns;

/// The engine's test support: seeded tiny checkpoints, and where the real SmolLM2 model is.
#[path = "../../../engine/tests/common/mod.rs"]
pub mod engine;

#[allow(unused_imports)] // not every test file needs it
pub use engine::smollm2_dir;

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_computepool"))
}

/// The `computepool` binary as a command, run inside network namespace `netns` when given.
pub fn bin_command(netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(bin());
            c
        }
        None => Command::new(bin()),
    }
}

/// One thread of a process, as `/proc/PID/task/TID/stat` shows it.
#[derive(Debug)]
pub struct ThreadStat {
    pub name: String,
    /// `R` running or runnable, `S` sleeping, …
    pub state: char,
    /// Its scheduling policy (`SCHED_IDLE` is 5).
    pub policy: u32,
}

/// The threads of process `pid` (threads that end while they are read are left out).
pub fn threads_of(pid: u32) -> Vec<ThreadStat> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads") {
        let Ok(stat) = std::fs::read_to_string(task.expect("a thread").path().join("stat")) else { continue };
        // The name (field 2) is in parentheses and may hold spaces: count the fields after it.
        let (open, close) = (stat.find('(').expect("a name"), stat.rfind(')').expect("a name"));
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        threads.push(ThreadStat {
            name: stat[open + 1..close].to_string(),
            state: rest[0].chars().next().expect("a state letter"),
            policy: rest[38].parse().expect("field 41 is the policy"),
        });
    }
    threads
}

/// The CPUs a thread may run on, from its `/proc/…/status`, as Linux writes them (`0-1`).
pub fn cpus_allowed(status: &str) -> String {
    let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).expect("the kernel lists allowed CPUs");
    list.trim().to_string()
}

/// The CPUs this process may run on (the workers it starts inherit its mask).
pub fn process_cpus() -> String {
    cpus_allowed(&std::fs::read_to_string("/proc/self/status").expect("this process's status"))
}

/// The lowest CPU this process may run on.
pub fn first_allowed_cpu() -> String {
    cpus_in(&process_cpus())[0].to_string()
}

/// The CPU numbers of a list as Linux writes it (`0-2,5` is 0, 1, 2 and 5).
pub fn cpus_in(list: &str) -> Vec<usize> {
    let number = |n: &str| -> usize { n.trim().parse().unwrap_or_else(|_| panic!("`{n}` in `{list}` is a CPU number")) };
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((first, last)) => number(first)..=number(last),
            None => number(part)..=number(part),
        })
        .collect()
}

/// A free UDP port on `ip`.
pub fn free_port(ip: &str) -> SocketAddr {
    UdpSocket::bind(format!("{ip}:0")).and_then(|s| s.local_addr()).expect("a free UDP port")
}

/// Makes a key file with `computepool keygen`; returns the peer id it printed.
pub fn keygen(path: &Path) -> String {
    let out = Command::new(bin()).arg("keygen").arg("--out").arg(path).output().expect("run keygen");
    assert!(out.status.success(), "keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
}

/// How to run one worker.
#[derive(Clone)]
pub struct WorkerSpec {
    pub layers: (u32, u32),
    pub addr: SocketAddr,
    /// Run it inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

/// A pipeline of worker processes and the files they share.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub specs: Vec<WorkerSpec>,
    pub peers: Vec<String>,
    pub client_peer: String,
    workers: Vec<Option<Child>>,
    /// Each worker's ready line (JSON), once started.
    pub ready: Vec<Value>,
    pub extra_args: Vec<String>,
    /// More arguments for one worker (index = shard), after `extra_args`.
    pub worker_args: Vec<Vec<String>>,
    /// The workers' RUST_LOG: `info`, or COMPUTEPOOL_TEST_WORKER_LOG where set (e.g.
    /// `computepool::worker=trace,info` for per-step and per-frame timings in a diagnosis).
    pub worker_log: String,
}

impl Cluster {
    /// Writes keys and the topology; starts nothing yet.
    pub fn new(model: &Path, num_layers: u32, specs: Vec<WorkerSpec>, extra_args: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let peers: Vec<String> =
            (0..specs.len()).map(|i| keygen(&dir.path().join(format!("worker-{i}.key")))).collect();
        let client_peer = keygen(&dir.path().join("client.key"));
        let shards: Vec<Value> = specs
            .iter()
            .zip(&peers)
            .map(|(s, p)| json!({"peer": p, "layers": format!("{}..{}", s.layers.0, s.layers.1), "addrs": [s.addr]}))
            .collect();
        let topology = json!({"num_layers": num_layers, "shards": shards, "clients": [client_peer]});
        std::fs::write(dir.path().join("topology.json"), topology.to_string()).expect("write topology");
        let n = specs.len();
        Self {
            dir,
            model: model.to_path_buf(),
            specs,
            peers,
            client_peer,
            workers: (0..n).map(|_| None).collect(),
            ready: vec![Value::Null; n],
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            worker_args: Vec::new(),
            worker_log: std::env::var("COMPUTEPOOL_TEST_WORKER_LOG").unwrap_or_else(|_| "info".into()),
        }
    }

    /// Even split of `num_layers` over `n` loopback workers.
    pub fn local(model: &Path, num_layers: u32, n: u32, extra_args: &[&str]) -> Self {
        let specs = (0..n)
            .map(|i| WorkerSpec {
                layers: (num_layers * i / n, num_layers * (i + 1) / n),
                addr: free_port("127.0.0.1"),
                netns: None,
            })
            .collect();
        Self::new(model, num_layers, specs, extra_args)
    }

    pub fn topology_path(&self) -> PathBuf {
        self.dir.path().join("topology.json")
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("worker-{i}.log"))
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Starts worker `i` and waits for its ready line.
    pub fn start(&mut self, i: usize) {
        let spec = &self.specs[i];
        let mut cmd = bin_command(spec.netns.as_deref());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(i)).expect("log file");
        cmd.arg("worker")
            .arg("--model")
            .arg(&self.model)
            .arg("--topology")
            .arg(self.topology_path())
            .arg("--key")
            .arg(self.dir.path().join(format!("worker-{i}.key")))
            .arg("--listen")
            .arg(spec.addr.to_string())
            .args(["--threads", "1"])
            .args(&self.extra_args)
            .args(self.worker_args.get(i).into_iter().flatten())
            .env("RUST_LOG", &self.worker_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("start a worker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(Some(Ok(line))) => {
                assert!(line.contains("\"ready\""), "worker {i} said {line}");
                self.ready[i] = serde_json::from_str(&line).unwrap_or_else(|e| panic!("worker {i}'s ready line {line}: {e}"));
            }
            other => panic!("worker {i} did not start ({other:?}):\n{}", self.log(i)),
        }
        self.workers[i] = Some(child);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.specs.len() {
            self.start(i);
        }
    }

    /// Worker `i`'s process id, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.workers[i].as_ref().map(|c| c.id())
    }

    /// Kills worker `i` (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.workers[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `computepool generate` against this cluster, as the listed client. Returns the process output.
    pub fn client(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin());
        cmd.arg("generate")
            .arg("--topology")
            .arg(self.topology_path())
            .arg("--key")
            .arg(self.dir.path().join("client.key"))
            .args(args);
        cmd
    }

    /// Starts a long streamed request, lets it generate for 1.5 s, then SIGKILLs worker `i` under it.
    /// Asserts the client fails on its own within 2 s of the kill (never hangs), with an `Unavailable`
    /// error that says `why`.
    pub fn kill_under_a_long_request(&mut self, i: usize, why: &str) {
        let mut long = self
            .client(&["--prompt", "Tell me a long story.", "--max-tokens", "4000", "--ignore-eos", "--wait-ready-s", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a long request");
        std::thread::sleep(Duration::from_millis(1500));
        assert!(long.try_wait().expect("poll").is_none(), "the long request ended early");
        let killed_at = Instant::now();
        self.kill(i);
        let finished = wait_for(Duration::from_secs(10), || long.try_wait().expect("poll").is_some());
        let took = killed_at.elapsed();
        assert!(finished, "the client hung after worker {i} was killed");
        let out = long.wait_with_output().expect("client output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the request should fail");
        assert!(stderr.contains("Unavailable") && stderr.contains(why), "unclear error: {stderr}");
        eprintln!("client error {took:?} after the kill: {}", stderr.trim());
        assert!(took < Duration::from_secs(2), "the error took {took:?}");
    }

    /// Gives every shard `relay` in the topology; with `keep_addrs` false, no address at all (so peers
    /// and the client find each worker only through the relay).
    pub fn reach_through_relay(&self, relay: &str, keep_addrs: bool) {
        let path = self.topology_path();
        let mut topology: Value = serde_json::from_str(&std::fs::read_to_string(&path).expect("read the topology"))
            .expect("the topology is JSON");
        for shard in topology["shards"].as_array_mut().expect("the topology lists shards") {
            shard["relay"] = json!(relay);
            if !keep_addrs {
                shard["addrs"] = json!([]);
            }
        }
        std::fs::write(&path, topology.to_string()).expect("write the topology");
    }

    /// Runs a client request to completion and returns the token ids it printed with --json.
    pub fn tokens(&self, args: &[&str]) -> Vec<u32> {
        let out = self.client(args).arg("--json").output().expect("run the client");
        json_tokens(&out, || (0..self.specs.len()).map(|i| self.log(i)).collect::<Vec<_>>().join("\n---\n"))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.workers.len() {
            self.kill(i);
        }
        // COMPUTEPOOL_TEST_KEEP_LOGS=DIR: the workers' logs outlive the cluster's temp dir, for a diagnosis.
        if let Some(keep) = std::env::var_os("COMPUTEPOOL_TEST_KEEP_LOGS") {
            let name = self.dir.path().file_name().expect("a temp dir has a name").to_string_lossy().trim_start_matches('.').to_string();
            for i in 0..self.workers.len() {
                if let Err(e) = std::fs::copy(self.log_path(i), Path::new(&keep).join(format!("{name}-worker-{i}.log"))) {
                    eprintln!("cannot keep worker {i}'s log in {}: {e}", Path::new(&keep).display());
                }
            }
        }
    }
}

/// A `computepool relay` process (inside a network namespace, optionally); killed on drop.
pub struct RelayProcess {
    child: Child,
    /// The URL it printed, for the topology.
    pub url: String,
}

impl RelayProcess {
    /// Starts a relay on `listen` that admits the peers of `topology` (any peer without one), and
    /// waits for its URL.
    pub fn start(listen: SocketAddr, topology: Option<&Path>, netns: Option<&str>) -> Self {
        let mut cmd = bin_command(netns);
        cmd.arg("relay").arg("--listen").arg(listen.to_string());
        if let Some(path) = topology {
            cmd.arg("--topology").arg(path);
        }
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("start the relay");
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let url = match lines.next() {
            Some(Ok(line)) if line.starts_with("http://") => line.trim().to_string(),
            other => {
                let _ = child.kill();
                panic!("the relay did not print its URL: {other:?}");
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Self { child, url }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `tokens` of the JSON line `generate --json` prints last on stderr.
pub fn json_tokens(out: &Output, context: impl Fn() -> String) -> Vec<u32> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "generate failed: {stderr}\n{}", context());
    let line = stderr.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON in {stderr}"));
    let v: Value = serde_json::from_str(line).expect("JSON");
    v["tokens"].as_array().expect("tokens").iter().map(|t| t.as_u64().expect("id") as u32).collect()
}

/// Token ids of the single-process run.
pub fn unsharded_tokens(model: &Path, args: &[&str]) -> Vec<u32> {
    let out = Command::new(bin())
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--threads", "1"])
        .args(args)
        .arg("--json")
        .output()
        .expect("run generate");
    json_tokens(&out, String::new)
}

/// Waits until `f` is true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
