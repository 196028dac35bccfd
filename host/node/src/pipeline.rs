//! A local N-shard pipeline: each shard a separate `computepool worker` process on loopback, with its
//! own key, talking to its neighbours over QUIC exactly as workers on different hosts do, or (with
//! [`FrameTransport::Axl`]) through one stand-in Gensyn AXL daemon each, run in this process.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use computepool_axl::bridge::AxlPeerId;
use computepool_axl::bridge::standin::{StandinConfig, StandinNetwork, StandinNode};
use computepool_axl::transport::{Layers, SecretKey, ShardPeer, Topology, write_secret_key};
use computepool_axl::{ModelFootprint, ShardPlan, WorkerCapacity};
use computepool_entry_api::client::EntryClient;

use crate::worker::FrameTransport;

/// How to start a local pipeline.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub model: PathBuf,
    pub shards: usize,
    /// Each shard's relative speed, entry first (`--shard-speeds`): layers are shared out in proportion
    /// by a [`ShardPlan`]. Empty: all equal, an even split.
    pub speeds: Vec<u64>,
    /// Workers per layer range (1 or more): the topology lists `shards × replicas` workers, ring by
    /// ring, so routes may mix them.
    pub replicas: usize,
    pub dtype: String,
    /// Compute threads per worker.
    pub threads: usize,
    /// Passed to every worker as `--peer-timeout-ms`.
    pub peer_timeout_ms: u64,
    /// Each worker's `--device`, in shard order; empty is all `cpu`, one entry applies to all.
    pub devices: Vec<String>,
    /// The key of the client the topology allows (an orchestrator's); a fresh one when `None`.
    pub client_key: Option<SecretKey>,
    /// An orchestrator the workers register with and heartbeat to: its URL and operator token.
    pub orchestrator: Option<(String, String)>,
    /// Each worker's `--payout` address, in worker order (ring by ring; paid pools); empty: none.
    pub payouts: Vec<String>,
    /// Extra arguments for each worker, in worker order (ring by ring; fault drills); missing entries
    /// add none.
    pub worker_args: Vec<Vec<String>>,
    /// Every worker's sampler plugins (`--plugins`, `--plugin-config`, `--default-sampler`).
    pub samplers: crate::samplers::SamplerArgs,
    /// How frames travel between the workers. `Axl` starts a stand-in AXL daemon per worker in this
    /// process (host/axl/src/bridge/standin.rs: the daemon's HTTP API and its 100-slot queue, delivering
    /// in memory as the mesh does) and passes each worker `--transport axl --axl-api` its own. Clients
    /// reach the entry over QUIC either way.
    pub transport: FrameTransport,
}

/// What a worker reported when it was ready.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct WorkerReady {
    pub peer: String,
    pub layers: String,
    pub weight_bytes: u64,
    pub rss_bytes: Option<u64>,
    /// How the worker passes frames: `iroh` or `axl`.
    pub transport: String,
}

/// Running worker processes; dropping it stops them.
pub struct LocalPipeline {
    dir: tempfile::TempDir,
    children: Vec<Child>,
    topology: Topology,
    client_key: SecretKey,
    /// With [`FrameTransport::Axl`]: the workers' daemons, in worker order.
    axl: Option<AxlStandins>,
    pub ready: Vec<WorkerReady>,
}

/// Stand-in AXL daemons, one per worker, and the runtime their HTTP servers run on.
struct AxlStandins {
    nodes: Vec<StandinNode>,
    runtime: tokio::runtime::Runtime,
}

impl AxlStandins {
    /// One daemon per key, each with that worker's key (an AXL daemon runs with its operator's key).
    /// Started on a thread of its own: the caller may be inside an async runtime, where blocking on
    /// another is not allowed.
    fn start(keys: &[SecretKey]) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("axl-standin")
            .enable_all()
            .build()
            .context("starting the stand-in AXL daemons' runtime")?;
        let network = StandinNetwork::new();
        let ids: Vec<AxlPeerId> = keys.iter().map(|k| crate::worker::axl::axl_id(&k.public())).collect();
        let nodes = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    runtime.block_on(async {
                        let mut nodes = Vec::with_capacity(ids.len());
                        for id in &ids {
                            nodes.push(network.start_node_with(StandinConfig { key: Some(*id), ..StandinConfig::default() }).await?);
                        }
                        Ok::<_, std::io::Error>(nodes)
                    })
                })
                .join()
                .expect("starting stand-in daemons does not panic")
        })
        .context("starting the stand-in AXL daemons")?;
        Ok(AxlStandins { nodes, runtime })
    }
}

/// The layer ranges of `n` shards whose workers have the relative `speeds` (entry first; empty: all
/// equal), planned by [`ShardPlan`]: shares in proportion to speed, every shard at least one layer, a
/// remainder to the earlier shards. The workers share this machine's memory, so it does not limit them.
pub fn plan_layers(layers: u32, n: usize, speeds: &[u64]) -> anyhow::Result<Vec<Layers>> {
    let speeds = if speeds.is_empty() { vec![1; n] } else { speeds.to_vec() };
    if speeds.len() != n {
        bail!("{} shard speeds given for {n} shards: give one per shard", speeds.len());
    }
    let model = ModelFootprint::uniform(layers as usize, 1, 0, 0);
    let workers: Vec<WorkerCapacity> = speeds.iter().map(|&speed| WorkerCapacity { free_memory_bytes: u64::MAX, speed }).collect();
    let plan = ShardPlan::new(&model, &workers).map_err(|e| anyhow::anyhow!("cannot split {layers} layers into {n} shards: {e}"))?;
    Ok(plan.shards().iter().map(|s| Layers::try_from(s.layers.clone())).collect::<Result<_, _>>()?)
}

/// A free UDP port on 127.0.0.1 (bound and released; the worker binds it right after).
pub fn free_udp_addr() -> anyhow::Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("finding a free UDP port")?;
    Ok(socket.local_addr()?)
}

impl LocalPipeline {
    /// Starts the workers and waits until each has loaded its layers and bound its socket.
    pub fn start(options: &PipelineOptions) -> anyhow::Result<Self> {
        if options.shards < 1 {
            bail!("a pipeline needs at least 1 shard");
        }
        if options.devices.len() > 1 && options.devices.len() != options.shards {
            bail!("{} devices given for {} shards: give one per shard, or one for all", options.devices.len(), options.shards);
        }
        let config = computepool_engine::model::ModelSource::from_path(&options.model)?.config()?;
        let ranges = plan_layers(config.num_layers as u32, options.shards, &options.speeds)?;
        let dir = tempfile::Builder::new().prefix("computepool-pipeline-").tempdir()?;
        let workers = options.shards * options.replicas.max(1);
        let keys: Vec<SecretKey> = (0..workers).map(|_| SecretKey::generate()).collect();
        let client_key = options.client_key.clone().unwrap_or_else(SecretKey::generate);
        let mut shards = Vec::new();
        for (i, (key, layers)) in keys.iter().zip(ranges.iter().cycle()).enumerate() {
            write_secret_key(&dir.path().join(format!("worker-{i}.key")), key)?;
            shards.push(ShardPeer { peer: key.public(), layers: *layers, addrs: vec![free_udp_addr()?], relay: None });
        }
        let topology = Topology { num_layers: config.num_layers as u32, shards, clients: vec![client_key.public()] };
        topology.validate()?;
        let topology_path = dir.path().join("topology.json");
        std::fs::write(&topology_path, topology.to_json())?;
        let axl = match options.transport {
            FrameTransport::Iroh => None,
            FrameTransport::Axl => Some(AxlStandins::start(&keys)?),
        };
        let mut pipeline = Self { dir, children: Vec::new(), topology, client_key, axl, ready: Vec::new() };
        for i in 0..workers {
            let child = pipeline.spawn_worker(i, options)?;
            pipeline.children.push(child);
        }
        let mut ready = Vec::new();
        for i in 0..workers {
            let worker = pipeline.wait_ready(i)?;
            if worker.transport != options.transport.name() {
                bail!("worker {i} passes frames over {}, not {}", worker.transport, options.transport.name());
            }
            ready.push(worker);
        }
        pipeline.ready = ready;
        Ok(pipeline)
    }

    fn spawn_worker(&self, i: usize, options: &PipelineOptions) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("finding the computepool binary")?;
        let log = std::fs::File::create(self.log_path(i))?;
        let mut command = Command::new(exe);
        command
            .arg("worker")
            .arg("--model")
            .arg(&options.model)
            .arg("--topology")
            .arg(self.dir.path().join("topology.json"))
            .arg("--key")
            .arg(self.dir.path().join(format!("worker-{i}.key")))
            .arg("--listen")
            .arg(self.topology.shards[i].addrs[0].to_string())
            .args(["--dtype", &options.dtype])
            .args(["--threads", &options.threads.to_string()])
            .args(["--peer-timeout-ms", &options.peer_timeout_ms.to_string()])
            .args(["--device", options.devices.get(i % options.shards).or(options.devices.first()).map_or("cpu", String::as_str)]);
        if let Some((url, token)) = &options.orchestrator {
            // The token goes in the environment, not on the command line (which any local user can read).
            command.args(["--orchestrator", url]).env(computepool_orchestrator::auth::TOKEN_ENV, token);
            if let Some(payout) = options.payouts.get(i) {
                command.args(["--payout", payout]);
            }
        }
        if let Some(axl) = &self.axl {
            command.args(["--transport", "axl", "--axl-api", &axl.nodes[i].base_url()]);
        }
        if let Some(extra) = options.worker_args.get(i) {
            command.args(extra);
        }
        command.args(options.samplers.to_args()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log));
        // Tied: workers stop with their parent even when it is killed outright (no Drop runs then).
        let child = computepool_process::spawn_tied(command).context("starting a worker process")?;
        Ok(child)
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("worker-{i}.log"))
    }

    fn wait_ready(&mut self, i: usize) -> anyhow::Result<WorkerReady> {
        let stdout = self.children[i].stdout.take().context("worker stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let first = lines.next();
            let _ = tx.send(first);
            // Keep draining so the worker never blocks on a full pipe.
            for _ in lines {}
        });
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Some(Ok(line))) => {
                    let ready: WorkerReady =
                        serde_json::from_str(&line).with_context(|| format!("worker {i} said {line:?}"))?;
                    tracing::info!(peer = %ready.peer, layers = %ready.layers, "worker {i} ready");
                    return Ok(ready);
                }
                Ok(_) => bail!("worker {i} exited before it was ready:\n{}", self.log_tail(i)),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(_) => bail!("worker {i} was not ready within 5 minutes:\n{}", self.log_tail(i)),
            }
        }
    }

    /// The last lines a worker wrote to stderr.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.log_path(i)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// With [`FrameTransport::Axl`]: how many messages the stand-in daemons have delivered so far, to
    /// all workers together (every frame between workers is one); `None` over QUIC.
    pub fn axl_messages(&self) -> Option<u64> {
        self.axl.as_ref().map(|axl| axl.nodes.iter().map(StandinNode::arrivals).sum())
    }

    /// The pipeline's topology.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// A client connection to the entry.
    pub async fn client(&self) -> anyhow::Result<EntryClient> {
        EntryClient::connect(self.client_key.clone(), self.topology.entry()).await
    }
}

impl Drop for LocalPipeline {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(AxlStandins { nodes, runtime }) = self.axl.take() {
            drop(nodes);
            // Not a blocking shutdown: this may run inside an async runtime.
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lengths(ranges: &[Layers]) -> Vec<u32> {
        ranges.iter().map(|l| l.len()).collect()
    }

    #[test]
    fn equal_speeds_split_evenly_and_cover_every_layer() {
        let s = plan_layers(30, 4, &[]).expect("splits");
        assert_eq!(lengths(&s), [8, 8, 7, 7]);
        assert_eq!((s[0].start, s[3].end), (0, 30));
        assert!(s.windows(2).all(|w| w[0].end == w[1].start), "contiguous: {s:?}");
        assert_eq!(lengths(&plan_layers(30, 2, &[]).expect("splits")), [15, 15]);
        let e = plan_layers(3, 4, &[]).expect_err("3 layers cannot make 4 shards").to_string();
        assert!(e.contains("3 layers") && e.contains("4 shards"), "{e}");
    }

    #[test]
    fn speeds_share_the_layers_in_proportion() {
        assert_eq!(lengths(&plan_layers(30, 2, &[1, 2]).expect("splits")), [10, 20]);
        assert_eq!(lengths(&plan_layers(30, 3, &[3, 1, 1]).expect("splits")), [18, 6, 6]);
        let e = plan_layers(30, 2, &[1, 2, 3]).expect_err("one speed per shard").to_string();
        assert!(e.contains("3 shard speeds given for 2 shards"), "{e}");
        let e = plan_layers(30, 2, &[1, 0]).expect_err("speed 0").to_string();
        assert!(e.contains("speed 0"), "{e}");
    }
}
