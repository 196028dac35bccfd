//! Pipelines whose workers pass frames through Gensyn AXL daemons (`worker --transport axl`): each worker
//! talks to its own stand-in daemon (host/axl/src/bridge/standin.rs, the daemon's HTTP API), and the
//! stand-ins deliver to each other as the AXL mesh does. Sharded runs give exactly the single-process
//! tokens; a lost message fails its request with a sequence error and the next request works; a killed
//! worker whose daemon lives on (so sends still succeed) fails the request within 2 s.

mod common;

use std::time::{Duration, Instant};

use computepool_axl::bridge::AxlPeerId;
use computepool_axl::bridge::standin::{StandinConfig, StandinNetwork, StandinNode};
use computepool_axl::frame::{Frame, FrameLimits, RequestId, TokenHeader};
use common::engine as tiny;
use common::{Cluster, smollm2_dir, unsharded_tokens, wait_for};

const GREEDY: &[&str] = &["--max-tokens", "32", "--ignore-eos"];
const SAMPLED: &[&str] =
    &["--max-tokens", "32", "--ignore-eos", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "50", "--seed", "1234"];

/// A cluster whose workers each use their own stand-in AXL daemon, running with the worker's key.
struct AxlCluster {
    cluster: Cluster,
    nodes: Vec<StandinNode>,
    // Last: the stand-ins' servers run on it, so it outlives them.
    _runtime: tokio::runtime::Runtime,
}

impl AxlCluster {
    fn local(model: &std::path::Path, num_layers: u32, n: u32, extra_args: &[&str]) -> Self {
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
        let mut cluster = Cluster::local(model, num_layers, n, extra_args);
        let network = StandinNetwork::new();
        let nodes: Vec<StandinNode> = cluster
            .peers
            .iter()
            .map(|peer| {
                let key = AxlPeerId::parse(peer).expect("a peer id is an AXL key");
                runtime
                    .block_on(network.start_node_with(StandinConfig { key: Some(key), ..StandinConfig::default() }))
                    .expect("a stand-in daemon starts")
            })
            .collect();
        cluster.worker_args = nodes
            .iter()
            .map(|node| vec!["--transport".into(), "axl".into(), "--axl-api".into(), node.base_url()])
            .collect();
        AxlCluster { cluster, nodes, _runtime: runtime }
    }

    fn logs(&self) -> String {
        (0..self.cluster.specs.len()).map(|i| self.cluster.log(i)).collect::<Vec<_>>().join("\n---\n")
    }
}

/// The tiny checkpoint (keep it while the workers run), a running 3-shard AXL pipeline of it, a
/// request's arguments, and the tokens the single process gives for them.
fn tiny_three_shards() -> (tiny::Checkpoint, AxlCluster, [&'static str; 7], Vec<u32>) {
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let args = ["--prompt", "w5 w9 w17", "--max-tokens", "16", "--ignore-eos", "--wait-ready-s", "20"];
    let want = unsharded_tokens(ckpt.dir(), &args);
    let mut axl = AxlCluster::local(ckpt.dir(), tiny::LAYERS as u32, 3, &[]);
    axl.cluster.start_all();
    (ckpt, axl, args, want)
}

#[test]
fn axl_pipelines_equal_the_single_process_run() {
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let prompt = ["--prompt", "w5 w9 w17 w33 w65 w129"];
    let mut cases: Vec<(std::path::PathBuf, u32, Vec<&str>)> = vec![(ckpt.dir().to_path_buf(), tiny::LAYERS as u32, prompt.to_vec())];
    match smollm2_dir() {
        Some(model) => cases.push((model, 30, vec!["--prompt", "Write a haiku about the sea.", "--chat"])),
        None => eprintln!("SmolLM2 part skipped: it is not downloaded (run `make model`)"),
    }
    for (model, layers, prompt) in &cases {
        let with = |m: &[&'static str]| -> Vec<&str> { [&prompt[..], m].concat() };
        let expected: Vec<Vec<u32>> = [GREEDY, SAMPLED].iter().map(|m| unsharded_tokens(model, &with(m))).collect();
        for n in [2, 3] {
            let mut axl = AxlCluster::local(model, *layers, n, &[]);
            axl.cluster.start_all();
            for (m, want) in [GREEDY, SAMPLED].iter().zip(&expected) {
                assert_eq!(want.len(), 32);
                let got = axl.cluster.tokens(&with(m));
                assert_eq!(&got, want, "{}, {n} shards over AXL, {m:?}", model.display());
            }
            // Every frame went through the daemons: nothing is left waiting, nothing overflowed.
            assert!(axl.nodes.iter().all(|node| node.arrivals() > 0 && node.overflow_drops() == 0));
            assert!(axl.logs().contains("frames go through the AXL daemon"), "{}", axl.logs());
        }
    }
}

/// `generate --shards N --transport axl`: a local pipeline whose workers pass every frame through stand-in
/// AXL daemons run by the generate process gives the single-process tokens (seeded sampling).
#[test]
fn generate_over_local_axl_daemons_equals_the_single_process_run() {
    let ckpt = tiny::checkpoint(tiny::Family::Llama3);
    let args = ["--prompt", "w5 w9 w17 w33", "--max-tokens", "24", "--ignore-eos", "--temperature", "0.9", "--top-k", "50", "--seed", "7"];
    let want = unsharded_tokens(ckpt.dir(), &args);
    assert_eq!(want.len(), 24);
    for n in [2u64, 3] {
        let out = std::process::Command::new(common::bin())
            .arg("generate")
            .arg("--model")
            .arg(ckpt.dir())
            .args(["--shards", &n.to_string(), "--transport", "axl", "--threads", "1", "--json"])
            .args(args)
            .output()
            .expect("run generate");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(common::json_tokens(&out, || stderr.clone()), want, "{n} shards over local AXL daemons");
        // Each token crossed the daemons n times (n - 1 activations frames and the token frame back).
        let report: serde_json::Value =
            serde_json::from_str(stderr.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line")).expect("JSON");
        let messages = report["axl_messages"].as_u64().unwrap_or_else(|| panic!("no axl_messages in {report}"));
        assert!(messages >= 24 * n, "only {messages} messages went through the daemons for 24 tokens over {n} shards");
    }
}

/// A message the network loses (the stand-in of the last shard drops one activations frame) fails
/// that request with a sequence error, never wrong tokens; the next request gives the right tokens.
/// Bytes from a key outside the pool are dropped with a log line.
#[test]
fn a_lost_axl_message_fails_its_request_and_the_next_one_works() {
    let (_ckpt, axl, args, want) = tiny_three_shards();
    assert_eq!(axl.cluster.tokens(&args), want, "the pipeline works before the loss");

    // Lose the next request's start frame on its way to the middle shard: its activations then arrive
    // with a gap in their numbers, and the request fails with a sequence error from there.
    // (Once the first request's `end` has reached it, so that the count is the next request's.)
    assert!(wait_for(Duration::from_secs(5), || axl.cluster.log(1).contains("KV cache freed")), "{}", axl.logs());
    let middle = &axl.nodes[1];
    middle.drop_arrival(middle.arrivals());
    let out = axl.cluster.client(&args).arg("--json").output().expect("run the client");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a request that lost a frame must fail, not finish: {stderr}");
    assert!(stderr.contains("Sequence") && stderr.contains("dropped"), "unclear error: {stderr}\n{}", axl.logs());
    assert_eq!(axl.cluster.tokens(&args), want, "the next request works");

    // Lose a decode step's activations on their way to the exit: the request stalls (nothing follows
    // the lost frame), its entry gives up after the progress timeout and ends it, and the exit, seeing
    // the gap before the `end`, answers with a sequence error — within 2 s, never wrong tokens.
    let exit = &axl.nodes[2];
    let settled = |node: &StandinNode| {
        let before = node.arrivals();
        std::thread::sleep(Duration::from_millis(200));
        node.arrivals() == before
    };
    assert!(wait_for(Duration::from_secs(5), || settled(exit)), "the exit's daemon keeps receiving");
    // Per request the exit gets a start, the prefill's activations, then one frame per token.
    exit.drop_arrival(exit.arrivals() + 5);
    let started = Instant::now();
    let out = axl.cluster.client(&args).arg("--json").output().expect("run the client");
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a request that lost a frame must fail, not finish: {stderr}");
    assert!(stderr.contains("Sequence") && stderr.contains("dropped"), "unclear error: {stderr}\n{}", axl.logs());
    assert!(took < Duration::from_secs(3), "the request took {took:?} to fail");
    assert_eq!(axl.cluster.tokens(&args), want, "the next request works");

    // A stranger's frame reaches the entry's daemon: dropped, logged, and the pool serves on.
    let stranger = AxlPeerId::from_bytes([0x5a; 32]);
    let token = TokenHeader { request: RequestId::new("stranger-1").expect("id"), seq: 0, tokens: vec![1], finish: None };
    axl.nodes[0].inject(&stranger, Frame::token(token).to_bytes(&FrameLimits::DEFAULT).expect("encodes"));
    assert_eq!(axl.cluster.tokens(&args), want, "the next request works");
    assert!(
        wait_for(Duration::from_secs(5), || axl.cluster.log(0).contains("not in this pool's topology")),
        "{}",
        axl.cluster.log(0)
    );
}

/// A request id used again once its request is over, through the same workers: what a failover back
/// through the same pair of workers looks like to each receiving daemon's sequence gate, which closed
/// the id with the first request's `end`. The new `start` opens it afresh: the same tokens again,
/// with no wait for a timeout.
#[test]
fn an_axl_pipeline_serves_a_request_id_again_once_its_request_is_over() {
    let (_ckpt, axl, args, want) = tiny_three_shards();
    let with_id = [&args[..], &["--request-id", "again-1"]].concat();
    assert_eq!(axl.cluster.tokens(&with_id), want, "the first request");
    // Its `end` has reached every shard (each freed its cache), so every link has closed the id.
    let freed = |i: usize| axl.cluster.log(i).contains("request=again-1") && axl.cluster.log(i).contains("KV cache freed");
    assert!(wait_for(Duration::from_secs(5), || (0..3).all(freed)), "{}", axl.logs());
    let started = Instant::now();
    assert_eq!(axl.cluster.tokens(&with_id), want, "the same id again\n{}", axl.logs());
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "the second request took {took:?}: it waited for a timeout\n{}", axl.logs());
}

/// Kill the middle of three shards mid-generation while its daemon lives on (sends to it still
/// succeed, the frames go nowhere): the entry's progress timeout fails the request with a clear error
/// within 2 s, the exit frees its cache at once, and the worker restarted behind the same daemon
/// serves again.
#[test]
fn a_killed_axl_worker_fails_its_request_within_2_s() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let mut axl = AxlCluster::local(&model, 30, 3, &[]);
    axl.cluster.start_all();
    let short = ["--prompt", "Hello", "--max-tokens", "8", "--wait-ready-s", "20"];
    assert_eq!(axl.cluster.tokens(&short).len(), 8, "the pipeline works before the fault");
    let freed = |cluster: &Cluster, i: usize| cluster.log(i).matches("KV cache freed").count();
    assert!(wait_for(Duration::from_secs(5), || freed(&axl.cluster, 2) == 1), "the exit frees the first request\n{}", axl.logs());

    axl.cluster.kill_under_a_long_request(1, "no token from the pipeline");
    // The exit frees the failed request's cache now, not at its idle timeout (5 minutes): the entry's
    // `end` reaches it straight, past the dead worker's daemon, which swallows the one sent down the route.
    assert!(wait_for(Duration::from_secs(3), || freed(&axl.cluster, 2) == 2), "the exit kept the failed request\n{}", axl.logs());

    // Back again behind the same daemon (whose queue still holds frames of the failed request).
    axl.cluster.start(1);
    assert_eq!(axl.cluster.tokens(&short).len(), 8, "the pipeline works after the worker is back\n{}", axl.logs());
}
