//! `computepool plan`: a topology from what each worker offers, the model's footprint read from its
//! config. Layers follow speed; a worker's memory caps its share (weights and the KV budget); a worker
//! too small for any shard, or a model too big for all of them, is refused with the numbers.

mod common;

use std::process::{Command, Output};

use common::smollm2_dir;
use computepool_axl::transport::{SecretKey, Topology};
use computepool_engine::DType;
use computepool_engine::model::ModelSource;

fn plan(model: &std::path::Path, args: &[String]) -> Output {
    Command::new(common::bin()).arg("plan").arg("--model").arg(model).args(args).output().expect("run plan")
}

fn peer() -> String {
    SecretKey::generate().public().to_string()
}

fn worker(peer: &str, port: u16, memory: u64, speed: u64) -> [String; 2] {
    ["--worker".into(), format!("peer={peer},addr=127.0.0.1:{port},memory={memory},speed={speed}")]
}

#[test]
fn a_plan_shares_layers_by_speed_within_each_workers_memory() {
    // SmolLM2's 30 layers (only its config is read): enough to tell shares apart.
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let cfg = ModelSource::from_path(&model).and_then(|s| s.config()).expect("config");
    let layers = cfg.num_layers;
    assert_eq!(layers, 30);
    let (context, requests) = (256u64, 2u64);
    let layer = cfg.layer_weight_bytes(DType::Bf16) as u64 + cfg.kv_bytes_per_position() as u64 * context * requests;
    let vocab = cfg.vocab_matrix_bytes(DType::Bf16) as u64;
    let budget = ["--context".to_string(), context.to_string(), "--requests".into(), requests.to_string()];
    let peers = [peer(), peer(), peer()];
    let client = peer();
    let plenty = 1u64 << 40;

    // Plenty of memory: layers follow speed (1:1:2; the tie between the first two goes to the first),
    // clients listed.
    let mut args: Vec<String> = budget.to_vec();
    for (i, speed) in [1, 1, 2].into_iter().enumerate() {
        args.extend(worker(&peers[i], 7001 + i as u16, plenty, speed));
    }
    args.extend(["--client".to_string(), client.clone()]);
    let out = plan(&model, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let topology = Topology::from_json(&String::from_utf8_lossy(&out.stdout)).expect("a valid topology");
    assert_eq!(topology.num_layers as usize, layers);
    assert_eq!(topology.clients.iter().map(|c| c.to_string()).collect::<Vec<_>>(), [client.as_str()]);
    let counts = |t: &Topology| t.shards.iter().map(|s| s.layers.len()).collect::<Vec<_>>();
    assert_eq!(counts(&topology), [8, 7, 15]);
    assert_eq!(topology.shards.iter().map(|s| s.peer.to_string()).collect::<Vec<_>>(), peers);
    assert_eq!(topology.shards[1].addrs[0].to_string(), "127.0.0.1:7002");

    // The fast exit has room for its head and one layer only: it gets one, the others share the rest.
    let mut args: Vec<String> = budget.to_vec();
    args.extend(worker(&peers[0], 7001, plenty, 1));
    args.extend(worker(&peers[1], 7002, plenty, 1));
    args.extend(worker(&peers[2], 7003, vocab + layer, 100));
    let out = plan(&model, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let topology = Topology::from_json(&String::from_utf8_lossy(&out.stdout)).expect("a valid topology");
    assert_eq!(counts(&topology), [15, 14, 1]);
    // The same, written to a file.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pool.json");
    let mut with_out = args.clone();
    with_out.extend(["--out".to_string(), path.to_string_lossy().into_owned()]);
    assert!(plan(&model, &with_out).status.success());
    assert_eq!(Topology::from_file(&path).expect("the file").shards, topology.shards);

    // One byte short of the entry's smallest shard (embedding and one layer): refused, with the numbers.
    let mut args: Vec<String> = budget.to_vec();
    args.extend(worker(&peers[0], 7001, vocab + layer - 1, 1));
    args.extend(worker(&peers[1], 7002, plenty, 1));
    let out = plan(&model, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("worker 0") && stderr.contains(&(vocab + layer).to_string()), "{stderr}");

    // Together too small: refused, saying how many layers fit.
    let mut args: Vec<String> = budget.to_vec();
    args.extend(worker(&peers[0], 7001, vocab + layer, 1));
    args.extend(worker(&peers[1], 7002, vocab + layer, 1));
    let out = plan(&model, &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not fit") && stderr.contains(&format!("2 of its {layers} layers")), "{stderr}");
}
