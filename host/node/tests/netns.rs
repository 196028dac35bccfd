//! Across hosts: each shard in its own network namespace with 5 ms of one-way delay on every link, and
//! the pipeline still gives exactly the single-process tokens. Needs root; skipped (with a message)
//! where network namespaces are not permitted. See `common/netns.rs` for how the hosts are built.

mod common;

use std::time::{Duration, Instant};

use common::netns::{LINK_DELAY, LinkProbe, NetnsLab, output_with_timeout};
use common::{Cluster, WorkerSpec, json_tokens, smollm2_dir, unsharded_tokens};
use serde_json::Value;

const GREEDY: &[&str] = &["--max-tokens", "32", "--ignore-eos"];
const SAMPLED: &[&str] =
    &["--max-tokens", "32", "--ignore-eos", "--temperature", "0.9", "--top-p", "0.95", "--top-k", "50", "--seed", "1234"];
/// A client request over delayed links, links still coming up included.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);

fn lab_or_skip(shards: usize) -> Option<NetnsLab> {
    match NetnsLab::create(shards) {
        Ok(lab) => Some(lab),
        Err(reason) => {
            eprintln!("skipped: network namespaces are not permitted here: {reason}");
            None
        }
    }
}

fn report_links(shards: usize, probes: &[LinkProbe]) {
    for p in probes {
        eprintln!(
            "netns {shards} shards: link {} -> {}: UDP round trip min {:.2} ms, median {:.2} ms ({} samples)",
            p.from,
            p.to,
            p.min().as_secs_f64() * 1e3,
            p.median().as_secs_f64() * 1e3,
            p.round_trips.len()
        );
    }
}

/// The network alone (no model needed): every link of the ring, the client's included, has a round
/// trip of at least twice the one-way delay, and (with the relay) no host reaches another directly.
#[test]
fn every_link_is_delayed_and_there_is_no_path_around_it() {
    let Some(lab) = lab_or_skip(3) else { return };
    eprintln!("delay: {}", lab.delay_description());
    let probes = lab.probe_links();
    assert_eq!(probes.len(), 4, "three ring links and the client's");
    report_links(3, &probes);
    for p in &probes {
        assert!(p.min() >= 2 * LINK_DELAY);
    }
}

#[test]
fn sharded_across_namespaces_with_delayed_links_equals_unsharded_on_smollm2() {
    let Some(model) = smollm2_dir() else {
        eprintln!("skipped: SmolLM2 is not downloaded (run `make model`)");
        return;
    };
    let plain = ["--prompt", "The capital of France is"];
    let chat = ["--prompt", "Write a haiku about the sea.", "--chat"];
    let cases: [(&str, &[&str], &[&str]); 2] = [("greedy", &plain, GREEDY), ("sampled", &chat, SAMPLED)];
    let mut expected: Option<Vec<Vec<u32>>> = None;
    for n in [2usize, 3] {
        let started = Instant::now();
        let Some(lab) = lab_or_skip(n) else { return };
        // After the first lab, so a machine without namespaces skips at once.
        let expected = expected
            .get_or_insert_with(|| cases.iter().map(|(_, p, m)| unsharded_tokens(&model, &[*p, *m].concat())).collect());
        eprintln!("netns {n} shards: delay by {}", lab.delay_description());
        report_links(n, &lab.probe_links());

        let specs = (0..n)
            .map(|j| WorkerSpec {
                layers: ((30 * j / n) as u32, (30 * (j + 1) / n) as u32),
                addr: lab.listen_addr(j),
                netns: Some(lab.shard_ns(j).to_string()),
            })
            .collect();
        // Declared after `lab`, so dropped (workers killed) before the namespaces go. Each namespace
        // stands for a host of its own, so its worker polls for its next job between steps rather than
        // sleeping (`--busy-poll-us`: a woken thread costs every hop tens of µs or more on a VM).
        let mut cluster = Cluster::new(&model, 30, specs, &["--busy-poll-us", "20000"]);
        lab.point_topology_at_links(&cluster.topology_path());
        let relayed_before: Vec<Option<u64>> = (0..n).map(|j| lab.relayed_to(j)).collect();
        cluster.start_all();
        let logs = || (0..n).map(|i| format!("worker {i}:\n{}", cluster.log(i))).collect::<Vec<_>>().join("\n---\n");

        for ((name, prompt, mode), want) in cases.iter().zip(expected.iter()) {
            assert_eq!(want.len(), 32);
            let args = [*prompt, *mode, &["--wait-ready-s", "30", "--json"]].concat();
            let client = lab.exec(lab.client_ns(), &cluster.client(&args));
            let out = output_with_timeout(client, CLIENT_TIMEOUT)
                .unwrap_or_else(|| panic!("{n} shards, {name}: the client took over {CLIENT_TIMEOUT:?}\n{}", logs()));
            let got = json_tokens(&out, logs);
            assert_eq!(&got, want, "{n} shards across namespaces, {name}: not the single-process tokens");
            let stderr = String::from_utf8_lossy(&out.stderr);
            let stats: Value = stderr
                .lines()
                .rev()
                .find(|l| l.starts_with('{'))
                .and_then(|l| serde_json::from_str(l).ok())
                .expect("json_tokens found the JSON line");
            eprintln!(
                "netns {n} shards, {name}: {} tokens equal to the single-process run; decode {:.1} tokens/s, \
                 first token {:.0} ms",
                got.len(),
                stats["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
                stats["time_to_first_token_ms"].as_f64().unwrap_or(f64::NAN),
            );
        }

        // With the relay: the frames really went through it, to every shard.
        for (j, before) in relayed_before.iter().enumerate() {
            if let (Some(before), Some(after)) = (before, lab.relayed_to(j)) {
                assert!(after > before + 32, "only {} datagrams went through the relay to shard {j}", after - before);
                eprintln!("netns {n} shards: the relay delivered {} datagrams to shard {j}", after - before);
            }
        }
        drop(cluster);
        drop(lab);
        eprintln!("netns {n} shards: {:.1} s", started.elapsed().as_secs_f64());
    }
}
