//! `computepool plan`: a pool's topology from what its workers offer.
//!
//! Each `--worker` names a peer, its addresses, the memory it gives the model and its relative speed.
//! The model's footprint comes from its config alone (nothing is loaded): each layer's matrices in the
//! workers' dtype plus the KV cache it must hold for `--requests` requests of `--context` positions;
//! the embedding for the entry, lm_head for the exit. [`ShardPlan`] shares the layers out by speed,
//! capped by memory, and the topology file every worker and client of the pool takes is written.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use computepool_axl::transport::{Layers, PeerId, RelayUrl, ShardPeer, Topology, check_relay_url, parse_peer_id};
use computepool_axl::{ModelFootprint, ShardPlan, WorkerCapacity};
use computepool_engine::DType;
use computepool_engine::model::ModelSource;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// The model, a Hugging Face layout directory.
    #[arg(long)]
    model: PathBuf,
    /// The dtype the workers will hold weights in (their `--dtype`): f32 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// A worker, in pipeline order (the first is the entry, the last the exit):
    /// `peer=ID,addr=HOST:PORT,memory=24GiB,speed=2`. `addr` may repeat; `relay=URL` names the relay
    /// (`computepool relay`) the worker keeps open, for a worker behind NAT (a worker needs an addr, a
    /// relay, or both); `speed` (relative, any unit shared by all workers, at least 1) defaults to 1; `memory` is what the worker gives the model
    /// (weights and KV caches), in bytes or with a unit: KiB, MiB, GiB, TiB, KB, MB, GB, TB.
    #[arg(long = "worker", required = true)]
    workers: Vec<String>,
    /// A client allowed to submit requests (an orchestrator's or a CLI's peer id); repeatable.
    #[arg(long = "client")]
    clients: Vec<String>,
    /// Positions of KV cache each worker budgets per request. Default: the model's context window.
    #[arg(long)]
    context: Option<usize>,
    /// Requests whose KV caches every worker must hold at once.
    #[arg(long, default_value_t = 1)]
    requests: usize,
    /// Where to write the topology; default: standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One `--worker`.
#[derive(Debug, Clone, PartialEq)]
struct WorkerOffer {
    peer: PeerId,
    addrs: Vec<SocketAddr>,
    relay: Option<RelayUrl>,
    memory: u64,
    speed: u64,
}

pub fn run(args: PlanArgs) -> anyhow::Result<()> {
    let offers = args.workers.iter().map(|w| parse_worker(w).with_context(|| format!("--worker {w}"))).collect::<anyhow::Result<Vec<_>>>()?;
    let clients = args.clients.iter().map(|c| parse_peer_id(c).with_context(|| format!("--client {c}"))).collect::<anyhow::Result<Vec<_>>>()?;
    let dtype: DType = args.dtype.parse()?;
    let source = ModelSource::from_path(&args.model)?;
    if matches!(source, ModelSource::Gguf(_)) {
        bail!("plan reads a Hugging Face layout directory; a GGUF's quantized footprint is not modelled yet");
    }
    let cfg = source.config()?;
    let context = args.context.unwrap_or(cfg.max_position_embeddings);
    anyhow::ensure!(args.requests >= 1, "--requests must be at least 1");
    let kv = (cfg.kv_bytes_per_position() as u64).saturating_mul(context as u64).saturating_mul(args.requests as u64);
    let footprint = ModelFootprint::uniform(
        cfg.num_layers,
        (cfg.layer_weight_bytes(dtype) as u64).saturating_add(kv),
        cfg.vocab_matrix_bytes(dtype) as u64,
        cfg.vocab_matrix_bytes(dtype) as u64,
    );
    let capacities: Vec<WorkerCapacity> =
        offers.iter().map(|o| WorkerCapacity { free_memory_bytes: o.memory, speed: o.speed }).collect();
    let plan = ShardPlan::new(&footprint, &capacities)?;

    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    let mut shards = Vec::with_capacity(offers.len());
    for (offer, shard) in offers.iter().zip(plan.shards()) {
        let layers = Layers::try_from(shard.layers.clone())?;
        shards.push(ShardPeer { peer: offer.peer, layers, addrs: offer.addrs.clone(), relay: offer.relay.clone() });
        eprintln!(
            "{}  layers {:<8}  {:>10.1} MiB of {:>10.1} MiB  speed {}",
            offer.peer.fmt_short(),
            layers.to_string(),
            mib(shard.bytes),
            mib(offer.memory),
            offer.speed
        );
    }
    let topology = Topology { num_layers: u32::try_from(cfg.num_layers)?, shards, clients };
    topology.validate()?;
    match &args.out {
        Some(path) => std::fs::write(path, topology.to_json()).with_context(|| format!("writing {}", path.display()))?,
        None => println!("{}", topology.to_json()),
    }
    Ok(())
}

/// `peer=ID,addr=HOST:PORT[,addr=…][,relay=URL],memory=BYTES[,speed=N]`.
fn parse_worker(text: &str) -> anyhow::Result<WorkerOffer> {
    const KEYS: &str = "keys: peer, addr, relay, memory, speed";
    let (mut peer, mut addrs, mut relay, mut memory, mut speed) = (None, Vec::new(), None, None, None);
    for field in text.split(',') {
        let Some((key, value)) = field.split_once('=') else {
            bail!("{field:?} is not key=value ({KEYS})");
        };
        let value = value.trim();
        match key.trim() {
            "peer" => peer = Some(parse_peer_id(value)?),
            "addr" => addrs.push(value.parse::<SocketAddr>().with_context(|| format!("addr {value:?} is not HOST:PORT"))?),
            "relay" => relay = Some(parse_relay_url(value)?),
            "memory" => memory = Some(parse_bytes(value)?),
            "speed" => speed = Some(value.parse::<u64>().with_context(|| format!("speed {value:?} is not a whole number"))?),
            other => bail!("unknown key {other:?} ({KEYS})"),
        }
    }
    let peer = peer.context("no peer=ID (the worker's peer id, from `computepool keygen`)")?;
    if addrs.is_empty() && relay.is_none() {
        bail!("no addr=HOST:PORT (where the worker listens) and no relay=URL (where it can be reached)");
    }
    let memory = memory.context("no memory=… (what the worker gives the model, e.g. memory=24GiB)")?;
    Ok(WorkerOffer { peer, addrs, relay, memory, speed: speed.unwrap_or(1) })
}

/// A relay's URL: `http://` or `https://`, with a host.
fn parse_relay_url(text: &str) -> anyhow::Result<RelayUrl> {
    let url: RelayUrl = text.parse().with_context(|| format!("relay {text:?} is not a URL"))?;
    check_relay_url(&url).map_err(anyhow::Error::msg)?;
    Ok(url)
}

/// Bytes, plain or with a unit (KiB, MiB, GiB, TiB, or the powers of ten KB, MB, GB, TB).
fn parse_bytes(text: &str) -> anyhow::Result<u64> {
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => bail!("unknown unit {other:?} in {text:?} (KiB, MiB, GiB, TiB, KB, MB, GB, TB)"),
    };
    let number: f64 = number.parse().with_context(|| format!("{text:?} is not a size"))?;
    let bytes = number * scale as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
        bail!("{text:?} is not a size in bytes");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: &str = "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29";

    #[test]
    fn sizes_take_binary_and_decimal_units() {
        assert_eq!(parse_bytes("24GiB").expect("size"), 24 << 30);
        assert_eq!(parse_bytes("1.5 GiB").expect("size"), 3 << 29);
        assert_eq!(parse_bytes("500MB").expect("size"), 500_000_000);
        assert_eq!(parse_bytes("4096").expect("size"), 4096);
        for bad in ["", "GiB", "12 parsecs", "-1GiB", "0", "1e30TB"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_worker_names_its_peer_addresses_memory_and_speed() {
        let w = parse_worker(&format!("peer={PEER},addr=10.0.0.2:7001,addr=[::1]:7001,memory=24GiB,speed=2")).expect("parses");
        assert_eq!(w.peer.to_string(), PEER);
        assert_eq!(w.addrs.len(), 2);
        assert_eq!((w.memory, w.speed), (24 << 30, 2));
        assert_eq!(parse_worker(&format!("peer={PEER},addr=10.0.0.2:7001,memory=1GiB")).expect("parses").speed, 1);
        let behind_nat = parse_worker(&format!("peer={PEER},relay=http://relay.example:3340,memory=1GiB")).expect("parses");
        assert!(behind_nat.addrs.is_empty());
        assert_eq!(behind_nat.relay.expect("a relay").as_str(), "http://relay.example:3340/");
        for (bad, says) in [
            ("addr=10.0.0.2:7001,memory=1GiB".to_string(), "no peer"),
            (format!("peer={PEER},memory=1GiB"), "no relay"),
            (format!("peer={PEER},relay=relay.example,memory=1GiB"), "not a URL"),
            (format!("peer={PEER},relay=ftp://relay.example,memory=1GiB"), "http:// or https://"),
            (format!("peer={PEER},addr=10.0.0.2:7001"), "no memory"),
            (format!("peer={PEER},addr=10.0.0.2,memory=1GiB"), "HOST:PORT"),
            (format!("peer={PEER},addr=10.0.0.2:7001,memory=1GiB,colour=blue"), "unknown key"),
            (format!("peer={PEER},addr=10.0.0.2:7001,memory=1GiB,speed"), "key=value"),
            ("peer=nope,addr=10.0.0.2:7001,memory=1GiB".to_string(), "peer"),
        ] {
            let e = format!("{:#}", parse_worker(&bad).expect_err(&bad));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
