//! Pipelines of real worker processes on loopback: sharded runs give exactly the unsharded tokens, a
//! killed shard is reported quickly and cleanly, and strangers are turned away.

mod common;

use std::time::{Duration, Instant};

use common::engine as tiny;
use common::{Cluster, RelayProcess, smollm2_dir, unsharded_tokens, wait_for};

const GREEDY: &[&str] = &["--max-tokens", "64", "--ignore-eos"];
const SAMPLED: &[&str] =
    &["--max-tokens", "64", "--ignore-eos", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "50", "--seed", "1234"];

#[test]
fn sharded_equals_unsharded_on_tiny_checkpoints() {
    for family in tiny::Family::ALL {
        let ckpt = tiny::checkpoint(family);
        let prompt = ["--prompt", "w5 w9 w17 w33 w65 w129"];
        for (dtype, modes) in [("bf16", [GREEDY, SAMPLED]), ("f32", [GREEDY, SAMPLED])] {
            let with = |m: &[&'static str]| -> Vec<&'static str> { [&prompt[..], m, &["--dtype", dtype]].concat() };
            let expected: Vec<Vec<u32>> = modes.iter().map(|m| unsharded_tokens(ckpt.dir(), &with(m))).collect();
            // One worker serving the whole model is a pool too: its tokens go to its own entry.
            for n in [1, 2, 3] {
                let mut cluster = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, n, &["--dtype", dtype]);
                cluster.start_all();
                for (m, want) in modes.iter().zip(&expected) {
                    assert_eq!(want.len(), 64);
                    let got = cluster.tokens(&[&prompt[..], m].concat());
                    assert_eq!(&got, want, "{} {dtype}, {n} shards, {m:?}", family.name());
                }
            }
        }
    }
}

#[test]
fn sharded_equals_unsharded_on_smollm2() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let plain = ["--prompt", "The capital of France is"];
    let chat = ["--prompt", "Write a haiku about the sea.", "--chat"];
    let cases: [(&[&str], &[&str]); 2] = [(&plain, GREEDY), (&chat, SAMPLED)];
    let expected: Vec<Vec<u32>> = cases.iter().map(|(p, m)| unsharded_tokens(&model, &[*p, *m].concat())).collect();
    for n in [1, 2, 3] {
        // Two workers of one thread each fit this machine's cores: their compute threads poll for the
        // next job between steps (`--busy-poll-us`, as on hosts of their own); three sleep, and so does
        // one (its next job is its own token, handed over in-process).
        let args: &[&str] = if n == 2 { &["--busy-poll-us", "20000"] } else { &[] };
        let mut cluster = Cluster::local(&model, 30, n, args);
        cluster.start_all();
        for ((p, m), want) in cases.iter().zip(&expected) {
            assert_eq!(want.len(), 64);
            assert_eq!(&cluster.tokens(&[*p, *m].concat()), want, "{n} shards, {p:?} {m:?}");
        }
    }
}

/// `--split-head`: the entry and the exit each compute half the vocabulary's logits and the entry
/// samples; the tokens are the single-process ones, greedy and seeded, for tied heads (Qwen2, SmolLM2)
/// and untied ones, with and without a middle shard.
#[test]
fn a_split_head_gives_the_unsharded_tokens() {
    let modes = [GREEDY, SAMPLED];
    for family in tiny::Family::ALL {
        let ckpt = tiny::checkpoint(family);
        let prompt = ["--prompt", "w5 w9 w17 w33 w65 w129"];
        let expected = modes.map(|m| unsharded_tokens(ckpt.dir(), &[&prompt[..], m].concat()));
        for n in [2, 3] {
            let mut cluster = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, n, &["--split-head"]);
            cluster.worker_log = "computepool::worker::engine_loop=debug,info".into();
            cluster.start_all();
            for (m, want) in modes.iter().zip(&expected) {
                assert_eq!(want.len(), 64);
                let got = cluster.tokens(&[&prompt[..], m].concat());
                assert_eq!(&got, want, "{}, {n} shards with a split head, {m:?}", family.name());
            }
            // A greedy request's exit sent only its largest logit each step; a sampled one's, its logits.
            let parts = |part: &str| cluster.log(0).lines().filter(|l| l.contains("exit's part of the head") && l.contains(part)).count();
            assert_eq!((parts("part=\"max\""), parts("part=\"logits\"")), (64, 64), "{}, {n} shards", family.name());
        }
    }
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped the SmolLM2 half: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let chat = ["--prompt", "Write a haiku about the sea.", "--chat"];
    let want = unsharded_tokens(&model, &[&chat[..], SAMPLED].concat());
    for n in [2, 3] {
        let mut cluster = Cluster::local(&model, 30, n, &["--split-head"]);
        cluster.start_all();
        assert_eq!(cluster.tokens(&[&chat[..], SAMPLED].concat()), want, "SmolLM2, {n} shards with a split head");
    }
}

/// A split head needs both ends: an exit started with `--split-head` under an entry without it fails
/// each request with a clear error (the entry holds no part of the head), and the reverse is a whole
/// head (the exit samples, as without the flag).
#[test]
fn a_split_head_on_one_end_only_fails_clearly_or_runs_whole() {
    let ckpt = tiny::checkpoint(tiny::Family::Qwen2);
    let args = [&["--prompt", "w5 w9 w17 w33"][..], SAMPLED].concat();
    let want = unsharded_tokens(ckpt.dir(), &args);
    let mut exit_only = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, 2, &[]);
    exit_only.worker_args = vec![vec![], vec!["--split-head".into()]];
    exit_only.start_all();
    for round in 0..2 {
        let started = Instant::now();
        let out = exit_only.client(&[&args[..], &["--wait-ready-s", "20"]].concat()).output().expect("run the client");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("--split-head"), "request {round}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "request {round} failed in {:?}", started.elapsed());
    }
    let mut entry_only = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, 2, &[]);
    entry_only.worker_args = vec![vec!["--split-head".into()], vec![]];
    entry_only.start_all();
    assert_eq!(entry_only.tokens(&args), want, "an entry with --split-head under a whole-head exit");
}

/// `--compute-cpus` puts each worker's compute thread on the CPUs given and nothing else there: its
/// network thread keeps every CPU the process may use. The tokens are the single-process ones.
#[test]
fn compute_cpus_place_the_compute_thread_alone_and_change_no_token() {
    let allowed = common::process_cpus();
    let first = common::first_allowed_cpu();
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let args = [&["--prompt", "w5 w9 w17 w33"][..], GREEDY].concat();
    let want = unsharded_tokens(ckpt.dir(), &args);
    let mut cluster = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, 2, &["--compute-cpus", &first]);
    cluster.start_all();
    assert_eq!(cluster.tokens(&args), want, "2 shards with their compute on CPU {first}");
    for i in 0..2 {
        let pid = cluster.pid(i).expect("the worker runs");
        let mut placed = std::collections::HashMap::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the worker's threads") {
            let task = task.expect("a thread").path();
            let (Ok(comm), Ok(status)) =
                (std::fs::read_to_string(task.join("comm")), std::fs::read_to_string(task.join("status")))
            else {
                continue; // a thread that just ended
            };
            placed.insert(comm.trim().to_string(), common::cpus_allowed(&status));
        }
        assert_eq!(placed.get("engine"), Some(&first), "worker {i}'s compute thread: {placed:?}");
        assert_eq!(placed.get("net"), Some(&allowed), "worker {i}'s network thread: {placed:?}");
    }
    // A CPU the process may not use is refused before anything loads.
    let out = std::process::Command::new(common::bin())
        .args(["worker", "--model"])
        .arg(ckpt.dir())
        .args(["--topology"])
        .arg(cluster.topology_path())
        .args(["--key"])
        .arg(cluster.dir.path().join("worker-0.key"))
        .args(["--compute-cpus", "1023"])
        .output()
        .expect("run a worker");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--compute-cpus 1023") && stderr.contains(&allowed), "{stderr}");
}

/// `--keep-cpus-awake`: each worker holds one `SCHED_IDLE` spinner per CPU it may use, parked once no
/// request is live, and the tokens are the single-process ones.
#[test]
fn workers_keeping_their_cpus_awake_park_the_spinners_between_requests_and_change_no_token() {
    let cpus = common::process_cpus();
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let args = [&["--prompt", "w5 w9 w17 w33"][..], SAMPLED].concat();
    let want = unsharded_tokens(ckpt.dir(), &args);
    let mut cluster = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, 2, &["--keep-cpus-awake"]);
    cluster.start_all();
    for round in 0..2 {
        assert_eq!(cluster.tokens(&args), want, "2 shards keeping CPUs {cpus} awake, request {round}");
    }
    for i in 0..2 {
        let pid = cluster.pid(i).expect("the worker runs");
        let spinners = || -> Vec<common::ThreadStat> {
            common::threads_of(pid).into_iter().filter(|t| t.name.starts_with("awake-")).collect()
        };
        assert!(
            wait_for(Duration::from_secs(5), || spinners().iter().all(|t| t.state == 'S')),
            "worker {i}'s spinners park once its requests are over: {:?}",
            spinners()
        );
        let spinners = spinners();
        let mut names: Vec<String> = spinners.iter().map(|t| t.name.clone()).collect();
        names.sort();
        let mut want_names: Vec<String> = common::cpus_in(&cpus).iter().map(|c| format!("awake-{c}")).collect();
        want_names.sort();
        assert_eq!(names, want_names, "worker {i}: one spinner per CPU of {cpus}");
        assert!(spinners.iter().all(|t| t.policy == 5), "worker {i}'s spinners are SCHED_IDLE: {spinners:?}");
    }
}

/// A pool whose topology gives no worker an address, only the pool's relay (`computepool relay`,
/// admitting the pool's peers alone): the workers and the client find each other through it, and the
/// tokens are the single-process ones. (On one host the peers then move to a direct path they learn
/// through the relay; tests/netns.rs has hosts with no path but the relay.)
#[test]
fn workers_listed_without_addresses_find_each_other_through_the_pools_relay() {
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let args = [&["--prompt", "w5 w9 w17 w33 w65 w129"][..], GREEDY].concat();
    let want = unsharded_tokens(ckpt.dir(), &args);
    let mut cluster = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, 2, &[]);
    let relay = RelayProcess::start("127.0.0.1:0".parse().expect("address"), Some(&cluster.topology_path()), None);
    cluster.reach_through_relay(&relay.url, false);
    cluster.start_all();
    for (i, ready) in cluster.ready.iter().enumerate() {
        assert_eq!(ready["relay"], serde_json::json!({"url": relay.url, "connected": true}), "worker {i}");
    }
    assert_eq!(cluster.tokens(&args), want, "2 shards through the relay");
}

/// The same on the original Q4_1 GGUF, read natively (weights quantized in memory in every worker): a
/// two-shard pipeline gives exactly the one-process tokens.
#[test]
fn sharded_quantized_gguf_equals_unsharded() {
    let Some(gguf) = tiny::smollm2_gguf() else {
        eprintln!("skipped: no SmolLM2 GGUF (run `make model`)");
        return;
    };
    let args = ["--prompt", "The capital of France is", "--max-tokens", "32", "--ignore-eos"];
    let want = unsharded_tokens(&gguf, &args);
    assert_eq!(want.len(), 32);
    let mut cluster = Cluster::local(&gguf, 30, 2, &[]);
    cluster.start_all();
    assert_eq!(cluster.tokens(&args), want);
}

/// `generate --shards N --shard-speeds …` shares the layers in proportion to the speeds given (the
/// workers load what the plan gives them) and generates the single-process run's tokens.
#[test]
fn shard_speeds_share_the_layers_in_proportion_and_the_tokens_stay_the_same() {
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let args = ["--prompt", "w5 w9 w17 w33", "--max-tokens", "16", "--ignore-eos", "--temperature", "0.9", "--seed", "7"];
    let want = unsharded_tokens(ckpt.dir(), &args);
    let layers = computepool_engine::model::ModelSource::from_path(ckpt.dir()).and_then(|s| s.config()).expect("config").num_layers;
    for (speeds, shards) in [("1,3", 2), ("2,1,1", 3)] {
        let out = std::process::Command::new(common::bin())
            .arg("generate")
            .arg("--model")
            .arg(ckpt.dir())
            .args(["--shards", &shards.to_string(), "--shard-speeds", speeds, "--threads", "1", "--json"])
            .args(args)
            .output()
            .expect("run generate");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(common::json_tokens(&out, || stderr.clone()), want, "--shard-speeds {speeds}");
        let report: serde_json::Value =
            serde_json::from_str(stderr.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line")).expect("JSON");
        let got: Vec<String> = serde_json::from_value(report["layers"].clone()).expect("the workers' layers");
        let weights: Vec<usize> = speeds.split(',').map(|s| s.parse().expect("a speed")).collect();
        let total: usize = weights.iter().sum();
        // Every share is within one layer of its proportional part (Sainte-Laguë), covering the model.
        let mut start = 0;
        for (range, weight) in got.iter().zip(&weights) {
            let (a, b) = range.split_once("..").expect("A..B");
            let (a, b): (usize, usize) = (a.parse().expect("start"), b.parse().expect("end"));
            assert_eq!(a, start, "contiguous: {got:?}");
            let exact = layers as f64 * *weight as f64 / total as f64;
            assert!(((b - a) as f64 - exact).abs() < 1.0, "{got:?} for speeds {speeds} over {layers} layers");
            start = b;
        }
        assert_eq!((got.len(), start), (shards, layers), "{got:?}");
    }
    // A speed per shard, or the command says what is wrong before starting anything.
    let out = std::process::Command::new(common::bin())
        .arg("generate")
        .arg("--model")
        .arg(ckpt.dir())
        .args(["--shards", "2", "--shard-speeds", "1,2,3", "--prompt", "w5"])
        .output()
        .expect("run generate");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 shard speeds given for 2 shards"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Kill the middle of three shards mid-generation: the client gets a clear error within 2 s, the
/// surviving shards free the request, new requests fail fast, and once the shard is back they work.
#[test]
fn a_killed_shard_fails_requests_fast_and_the_pipeline_recovers() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let mut cluster = Cluster::local(&model, 30, 3, &[]);
    cluster.start_all();
    let short = ["--prompt", "Hello", "--max-tokens", "8", "--wait-ready-s", "20"];
    assert_eq!(cluster.tokens(&short).len(), 8, "the pipeline works before the fault");

    // Let a long request generate for a while, then kill the middle shard under it without warning.
    cluster.kill_under_a_long_request(1, "pipeline");

    // The surviving shards free the request's KV cache.
    assert!(
        wait_for(Duration::from_secs(5), || cluster.log(0).contains("KV cache freed")
            && cluster.log(2).contains("KV cache freed")),
        "entry log:\n{}\nexit log:\n{}",
        cluster.log(0),
        cluster.log(2)
    );

    // New requests fail fast while the shard is gone.
    let started = Instant::now();
    let out = cluster.client(&["--prompt", "Hello", "--max-tokens", "4", "--wait-ready-s", "0"]).output().expect("run");
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(2), "failing took {:?}", started.elapsed());
    assert!(String::from_utf8_lossy(&out.stderr).contains("incomplete"), "{}", String::from_utf8_lossy(&out.stderr));

    // Back again: same key, same address. The restarted shard dials the entry as it starts, and the
    // entry, seeing it back, redials its own link to it at once: not whenever its pending dial's next
    // QUIC retransmission happens to reach the new process (seconds, once the peer was away a while).
    let entry_links_up = |cluster: &Cluster| {
        let line = format!("links: link up peer={}", &cluster.peers[1][..10]);
        cluster.log(0).matches(line.as_str()).count()
    };
    let before = entry_links_up(&cluster);
    // Away long enough that a dial the entry started when it lost the shard is between retransmissions.
    std::thread::sleep(Duration::from_secs(1));
    cluster.start(1);
    let back = Instant::now();
    assert!(
        wait_for(Duration::from_secs(1), || entry_links_up(&cluster) > before),
        "the entry's link to the restarted shard was not up within 1 s:\n{}",
        cluster.log(0)
    );
    eprintln!("the entry's link to the restarted shard was up {:?} after it started", back.elapsed());
    let now = ["--prompt", "Hello", "--max-tokens", "8", "--wait-ready-s", "0"];
    assert_eq!(cluster.tokens(&now).len(), 8, "the pipeline works as soon as the shard is back");
}

#[test]
fn a_client_that_is_not_in_the_topology_is_refused() {
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let mut cluster = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, 2, &[]);
    cluster.start_all();
    let stranger = cluster.dir.path().join("stranger.key");
    common::keygen(&stranger);
    let out = std::process::Command::new(common::bin())
        .arg("generate")
        .arg("--topology")
        .arg(cluster.topology_path())
        .arg("--key")
        .arg(&stranger)
        .args(["--prompt", "w5", "--max-tokens", "4", "--wait-ready-s", "0"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("unknown peer"), "{stderr}");
    // The listed client still gets served.
    assert_eq!(cluster.tokens(&["--prompt", "w5", "--max-tokens", "4", "--ignore-eos", "--wait-ready-s", "20"]).len(), 4);
}

#[test]
fn bad_requests_get_clear_errors_and_the_entry_keeps_serving() {
    let ckpt = tiny::checkpoint(tiny::Family::Qwen2);
    let mut cluster = Cluster::local(ckpt.dir(), tiny::LAYERS as u32, 2, &[]);
    cluster.start_all();
    let run = |args: &[&str]| cluster.client(&[args, &["--wait-ready-s", "20"]].concat()).output().expect("run");
    let too_long = run(&["--prompt", "w5", "--max-tokens", "100000"]);
    assert!(!too_long.status.success());
    assert!(String::from_utf8_lossy(&too_long.stderr).contains("context window"));
    let bad_sampling = run(&["--prompt", "w5", "--temperature=-1"]);
    assert!(String::from_utf8_lossy(&bad_sampling.stderr).contains("temperature"));
    assert_eq!(cluster.tokens(&["--prompt", "w5", "--max-tokens", "3", "--ignore-eos"]).len(), 3);
}

/// A pipeline may put any shard on a GPU (`--devices cuda,cpu`). Where there is none, the worker refuses
/// to start with the reason, and the pipeline reports it instead of hanging.
#[test]
fn a_cuda_worker_without_a_gpu_says_cuda_is_not_available() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!("this machine has an NVIDIA device; the no-GPU path is not exercised here");
        return;
    }
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let out = std::process::Command::new(common::bin())
        .arg("generate")
        .arg("--model")
        .arg(ckpt.dir())
        .args(["--shards", "2", "--devices", "cuda,cpu", "--prompt", "w5", "--max-tokens", "4"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("worker 0 exited before it was ready"), "{stderr}");
    assert!(stderr.contains("CUDA not available"), "{stderr}");
    // A device list that does not fit the shards is refused before anything starts.
    let out = std::process::Command::new(common::bin())
        .arg("generate")
        .arg("--model")
        .arg(ckpt.dir())
        .args(["--shards", "3", "--devices", "cpu,cpu", "--prompt", "w5", "--max-tokens", "4"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("2 devices given for 3 shards"), "{stderr}");
}

/// Start frames whose route names a stranger, does not chain, or names a non-entry as the entry fail
/// their request with an `invalid_request` error frame sent to the request's entry; the link stays
/// open and the worker serves on. The test plays a second entry of the pool over real QUIC.
#[test]
fn hostile_start_frames_fail_their_request_and_the_worker_serves_on() {
    use computepool_axl::frame::{ControlHeader, ErrorCode, Frame, FrameHeader, FrameLimits, RequestId, RouteHeader, SamplingHeader};
    use computepool_axl::transport::{FRAMES_ALPN, FrameReader, FrameWriter, Transport, TransportConfig, read_secret_key};

    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let layers = tiny::LAYERS as u32;
    let half = layers / 2;
    // An entry, an exit, and a second entry that the test itself plays.
    let specs = [(0, half), (half, layers), (0, half)]
        .into_iter()
        .map(|layers| common::WorkerSpec { layers, addr: common::free_port("127.0.0.1"), netns: None })
        .collect();
    let mut cluster = Cluster::new(ckpt.dir(), layers, specs, &[]);
    cluster.start(0);
    cluster.start(1);
    let ok = ["--prompt", "w5", "--max-tokens", "4", "--ignore-eos", "--wait-ready-s", "20"];
    assert_eq!(cluster.tokens(&ok).len(), 4, "the pool serves before");

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let answers = runtime.block_on(async {
        let key = read_secret_key(&cluster.dir.path().join("worker-2.key")).expect("key");
        let mut config = TransportConfig::new(key);
        config.bind = vec![cluster.specs[2].addr];
        let transport = Transport::bind(config).await.expect("bind");
        let me = transport.id().to_string();
        let exit: computepool_axl::transport::PeerId = cluster.peers[1].parse().expect("peer id");
        let conn = transport.connect(exit, &[cluster.specs[1].addr], None, FRAMES_ALPN).await.expect("the exit takes a pool member");
        let mut ack = conn.accept_uni().await.expect("confirmation stream");
        let mut byte = [0u8; 1];
        ack.read_exact(&mut byte).await.expect("confirmation");
        assert_eq!(byte, [1]);
        let mut writer = FrameWriter::new(conn.open_uni().await.expect("stream"), FrameLimits::DEFAULT);
        let stranger = computepool_axl::transport::SecretKey::generate().public().to_string();
        let routes = [
            ("bad-key", vec!["ab".repeat(32)], me.clone()),
            ("bad-stranger", vec![stranger], me.clone()),
            ("bad-chain", vec![cluster.peers[0].clone()], me.clone()),
            ("bad-entry", vec![], cluster.peers[1].clone()),
        ];
        for (id, next, entry) in &routes {
            let route = RouteHeader { next: next.clone(), entry: entry.clone() };
            let frame = Frame::start_routed(RequestId::new(*id).expect("id"), SamplingHeader::default(), Some(route), None);
            writer.send(&frame).await.expect("sent");
        }
        // The exit answers each over a link of its own to the request's entry: us.
        let incoming = tokio::time::timeout(Duration::from_secs(5), transport.accept(|_, _| Ok(())))
            .await
            .expect("the exit dials the entry")
            .expect("a connection");
        let mut confirm = incoming.open_uni().await.expect("confirmation stream");
        confirm.write_all(&[1]).await.expect("confirm");
        let _ = confirm.finish();
        let mut reader = FrameReader::new(incoming.accept_uni().await.expect("frames"), FrameLimits::DEFAULT);
        let mut answers = Vec::new();
        for _ in 0..routes.len() {
            let frame = tokio::time::timeout(Duration::from_secs(5), reader.next()).await.expect("in time").expect("a frame").expect("open");
            match frame.header {
                FrameHeader::Control(ControlHeader::Error { request, code, message, .. }) => {
                    answers.push((request.to_string(), code, message))
                }
                other => panic!("expected an error frame, got {other:?}"),
            }
        }
        assert!(conn.close_reason().is_none(), "a bad route fails its request, not the link");
        transport.close().await;
        answers
    });
    assert_eq!(answers.len(), 4);
    for ((id, code, message), (want_id, needle)) in answers.iter().zip([
        ("bad-key", "not a peer id"),
        ("bad-stranger", "not in this pool's topology"),
        ("bad-chain", "does not chain"),
        ("bad-entry", "not an entry's"),
    ]) {
        assert_eq!(id, want_id);
        assert_eq!(*code, ErrorCode::InvalidRequest);
        assert!(message.contains(needle), "{id}: {message}");
    }
    assert_eq!(cluster.tokens(&ok).len(), 4, "the pool serves after");
}
