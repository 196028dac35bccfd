//! `computepool worker`: one shard of a pool, serving its layer range to the requests routed through it.
//!
//! ```text
//!   client ──generate stream──▶ entry ──frames──▶ middle … ──frames──▶ exit
//!                                 ▲                                     │
//!                                 └──────────── token frames ───────────┘
//! ```
//!
//! A pool may have several workers per layer range. Each request carries its route (one worker per
//! range) in its `start` frame; every worker accepts links from any worker of the pool and dials, on
//! first use, the peers its requests are routed to (one persistent link per peer). It owns the KV
//! caches of the requests that cross it; an `end` frame, a lost link, an `unload` or an idle timeout
//! frees them. A worker whose card holds the whole model is a pool of one: its entry and exit are the
//! same process, and its tokens go from its compute thread to its own entry without a frame.
//!
//! - [`engine_loop`]: the compute thread (batching, KV caches, sampling on the exit).
//! - [`cpus`]: which CPUs that thread computes on (`--compute-cpus`).
//! - [`links`]: the outgoing links (dial, redial, numbering) and the router that sends each request's
//!   frames to its next hop.
//! - [`axl`]: frames between workers through a Gensyn AXL daemon instead (`--transport axl`): the
//!   one poller of the daemon's receive queue that feeds this worker as QUIC links do.
//! - [`entry`]: the entry's requests: tokenize, route, feed tokens back, stop rules, stream to the client.
//! - [`api`]: the JSON-lines request API clients speak to the entry.
//! - [`report`]: registration and heartbeats to an orchestrator (`--orchestrator`).
//! - [`fault`]: fault drills (`--fault`, hidden): a worker that misbehaves on purpose, for tests.

pub mod axl;
pub mod cpus;
pub mod engine_loop;
pub mod entry;
pub mod fault;
pub mod keep_awake;
pub mod links;
pub mod report;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use computepool_axl::frame::{
    ActivationCursor, ControlHeader, DType as WireDType, ErrorCode, Frame, FrameHeader, FrameLimits, HeadHeader, RequestId,
    RouteHeader, SequenceTracker, TokenHeader, f32_values,
};
use computepool_axl::transport::{
    FRAMES_ALPN, FrameReader, GENERATE_ALPN, LinkError, PeerId, PeerRole, Topology, Transport, TransportConfig,
    describe_close, load_or_create_secret_key,
};
use computepool_engine::DType;
use computepool_engine::model::{Device, DeviceShard, LoadOptions, ModelSource};
use computepool_engine::shard::LayerRange;
use computepool_engine::tokenizer::Tokenizer;
use iroh::endpoint::{Connection, VarInt};
use tokio::sync::mpsc;

use engine_loop::{EngineJob, EngineLoopConfig, StepData};
use entry::{Entry, EntryConfig};
use links::{Carrier, Links, Outbound, ToEntry};

/// A whole-model worker's default `--busy-poll-us`. Its compute thread's next job is the token it just
/// sampled, back from its own entry through the network thread: polling a little longer than that
/// hand-off saves a wake per token (tg128 on SmolLM2, 1 thread, 2-vCPU VM: 1.02× the same worker
/// sleeping, 0.97–1.09 over 6 alternating rounds), and costs one window of spinning after a request's
/// last step.
pub const WHOLE_MODEL_POLL_US: u64 = 1000;

/// A worker's `--busy-poll-us` when none is given: [`WHOLE_MODEL_POLL_US`] for a worker that serves the
/// whole model, else 0 (it sleeps at once).
pub fn default_busy_poll_us(whole_model: bool) -> u64 {
    if whole_model { WHOLE_MODEL_POLL_US } else { 0 }
}

/// How long a starting worker waits to be connected to its relay (when the topology gives it one)
/// before it serves anyway: a new endpoint picks its home relay after its first probes (seconds).
const RELAY_WAIT: Duration = Duration::from_secs(15);

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// A Hugging Face layout model directory (every worker of a pool has the same model).
    #[arg(long)]
    pub model: PathBuf,
    /// The pool's topology (JSON): every worker of the pool (several may serve one layer range), their
    /// peer ids, layer ranges and addresses, and the clients.
    #[arg(long)]
    pub topology: PathBuf,
    /// This worker's secret key file (made if missing); its public key must be one of the shards.
    #[arg(long)]
    pub key: PathBuf,
    /// The layer range to serve, `START..END`; must match the topology's entry for this key (it is
    /// taken from there when omitted).
    #[arg(long)]
    pub layers: Option<String>,
    /// UDP address to listen on (repeatable); default: any address, any port.
    #[arg(long)]
    pub listen: Vec<SocketAddr>,
    /// Weight dtype: f32 or bf16.
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the shard computes: `cpu`, or `cuda` / `cuda:N` (bf16 weights on GPU N). One pipeline may mix
    /// CPU and CUDA workers.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// After each step, the compute thread polls for its next job for up to this many µs before it
    /// sleeps (0: it sleeps at once). Waking the sleeping thread costs every hop tens of µs, more on a
    /// VM whose idle cores halt; polling saves that but keeps one core busy while the other shards
    /// compute. For a worker with a core to spare (its own machine, a GPU worker, or --threads below
    /// the cores it has to itself); never where shards share cores, where the poller slows the shard
    /// that computes. A value a little above one round trip through the other shards covers every gap
    /// of a stream. Default: [`default_busy_poll_us`] (0, except for a worker that serves the whole
    /// model, whose next job is its own token handed over in-process: [`WHOLE_MODEL_POLL_US`]).
    #[arg(long)]
    pub busy_poll_us: Option<u64>,
    /// CPUs this worker computes on, as Linux writes them (`0`, `0,2`, `0-3`): its compute thread, and
    /// with --threads above 1 that thread's helpers, run only there; its network thread runs anywhere.
    /// For hosts that run several shards of one pipeline and serve one stream at a time: giving them
    /// all the same core saves each step the cost of starting on a core that sat idle (on a VM, a
    /// step handed to another vCPU runs slower; see worker/cpus.rs), but shards sharing a core never
    /// compute at once, which concurrent requests need. Each CPU must be one this process may use.
    /// Default: wherever the OS puts them.
    #[arg(long)]
    pub compute_cpus: Option<cpus::CpuSet>,
    /// While it has a live request, keep every CPU this process may use from idling: one thread per
    /// CPU, in Linux's `SCHED_IDLE` class, spins there, so it runs only when nothing else would and
    /// yields the moment anything wakes (worker/keep_awake.rs). For VMs, whose idle vCPUs halt and
    /// wake slowly (the kernel's `idle=poll`, for this worker and only while it serves): it costs the
    /// CPUs' rest (power; on a VM, the host's CPU time) while requests are live, and no compute time.
    /// Default: off.
    #[arg(long)]
    pub keep_cpus_awake: bool,
    /// Split the output head (lm_head) between the entry and the exit, which then compute half the
    /// vocabulary's logits each, at the same time: the exit sends the entry its last layer's normed
    /// state as soon as it has it, then its half's logits, and the entry samples. Per token, half the
    /// head's time leaves the critical path, for 4 bytes a vocabulary row more on the exit → entry link.
    /// The entry holds its half of lm_head (from the embedding when the model ties them), the exit
    /// only its own half. Both the entry and the exit must be started with it; middle shards ignore
    /// it, as does a worker that serves the whole model. CPU only. Default: off.
    #[arg(long)]
    pub split_head: bool,
    /// A neighbour silent for this long is gone, in ms.
    #[arg(long, default_value_t = 1000)]
    pub peer_timeout_ms: u64,
    /// A request with no new frame for this long is freed, in seconds.
    #[arg(long, default_value_t = 300)]
    pub request_idle_timeout_s: u64,
    /// (Entry) a request that gets no token for this long fails, in seconds.
    #[arg(long, default_value_t = 120)]
    pub step_timeout_s: u64,
    /// The orchestrator to register with and heartbeat to (`http://HOST:PORT`); its operator token
    /// comes from COMPUTEPOOL_OPERATOR_TOKEN or --operator-token-file.
    #[arg(long)]
    pub orchestrator: Option<String>,
    /// A file holding the orchestrator's operator token (instead of the environment variable).
    #[arg(long, requires = "orchestrator")]
    pub operator_token_file: Option<PathBuf>,
    /// The operator's payout address (0x…): paid pools stream this worker's share of the pool's rate
    /// there. Sent to the orchestrator when it registers.
    #[arg(long, requires = "orchestrator")]
    pub payout: Option<String>,
    #[command(flatten)]
    pub samplers: crate::samplers::SamplerArgs,
    /// A fault drill, for testing the defences: `--fault wrong-tokens-after N` makes the exit shard emit
    /// a different valid token in place of each one it samples from the N-th token of every request on.
    /// Output audits convict such a worker's operator: never run it in a real pool.
    #[arg(long, hide = true, num_args = 2, value_names = ["KIND", "N"])]
    pub fault: Option<Vec<String>>,
    /// How frames travel between the pool's workers: `iroh` (QUIC links of this worker's own) or
    /// `axl` (through the operator's Gensyn AXL daemon at --axl-api; the daemon's key must be this
    /// worker's key). Clients reach the entry over QUIC either way.
    #[arg(long, value_enum, default_value_t = FrameTransport::Iroh)]
    pub transport: FrameTransport,
    /// The AXL daemon's local HTTP API (with --transport axl).
    #[arg(long, default_value = computepool_axl::bridge::api::DEFAULT_BASE_URL)]
    pub axl_api: String,
    /// (Entry, --transport axl) a request whose next token does not arrive within this many ms fails.
    /// AXL has no connection state, so silence is how a stopped worker is noticed; it must exceed the
    /// longest step (the prefill of the longest prompt) on the slowest route.
    #[arg(long, default_value_t = 1000)]
    pub progress_timeout_ms: u64,
    /// (--transport axl) the daemons' `max_message_size`, in bytes: no frame is made larger (long
    /// prompts go as more chunks). Every AXL worker of the pool must use the same value.
    #[arg(long, default_value_t = computepool_axl::bridge::api::DEFAULT_MAX_MESSAGE_SIZE)]
    pub axl_max_message_bytes: u64,
}

/// How frames travel between workers.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameTransport {
    /// QUIC through iroh (docs/PROTOCOL.md §11).
    Iroh,
    /// A Gensyn AXL daemon's HTTP API (docs/PROTOCOL.md §13).
    Axl,
}

impl FrameTransport {
    /// The name the command line and the worker's ready line use.
    pub fn name(self) -> &'static str {
        match self {
            FrameTransport::Iroh => "iroh",
            FrameTransport::Axl => "axl",
        }
    }
}

/// Runs a worker until it is interrupted.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let topology = Topology::from_file(&args.topology)?;
    let key = load_or_create_secret_key(&args.key)?;
    let me = topology.position(&key.public()).with_context(|| {
        format!("this worker's peer id {} is not one of the shards in {}", key.public(), args.topology.display())
    })?;
    let layers = topology.shards[me].layers;
    if let Some(given) = &args.layers
        && given.parse::<computepool_axl::transport::Layers>()? != layers
    {
        bail!("--layers {given} does not match the topology, which gives this worker layers {layers}");
    }
    let dtype: DType = args.dtype.parse()?;
    let device: Device = args.device.parse()?;
    let threads = args.threads.unwrap_or_else(crate::generate::default_threads);
    let source = ModelSource::from_path(&args.model)?;
    let config = source.config()?;
    if config.num_layers != topology.num_layers as usize {
        bail!("the model has {} layers, the topology {}", config.num_layers, topology.num_layers);
    }
    let range = LayerRange::new(layers.start as usize, layers.end as usize, config.num_layers)?;
    let fault = args.fault.as_deref().map(fault::Fault::parse).transpose().map_err(anyhow::Error::msg)?;
    if let Some(fault) = fault {
        if args.split_head && !range.is_entry() {
            bail!("--fault {fault} changes the tokens the exit samples, and with --split-head the entry samples them");
        }
        if !range.is_exit() {
            bail!("--fault {fault} is a drill for the exit shard (it samples the tokens); this worker serves layers {layers}");
        }
        tracing::warn!(%fault, "FAULT DRILL: this worker emits wrong tokens on purpose; output audits will convict its operator");
    }
    if let Some(cpus) = &args.compute_cpus {
        cpus.check_allowed().map_err(|e| anyhow::anyhow!("--compute-cpus {cpus}: {e}"))?;
    }
    let shard = {
        // A CPU backend starts its helper threads as it loads: started inside the scope, they keep
        // the compute CPUs.
        let _pinned = args.compute_cpus.as_ref().map(cpus::PinnedScope::enter).transpose().context("--compute-cpus")?;
        DeviceShard::load(&source, &LoadOptions { dtype, range: Some(range), progress: false, split_head: args.split_head }, device, threads)
            .with_context(|| format!("loading layers {layers} of {} on {device}", args.model.display()))?
    };
    tracing::info!(layers = %layers, device = %shard.device_name(), "shard loaded");
    let tokenizer = if layers.start == 0 { Some(Arc::new(source.tokenizer()?)) } else { None };
    let report = match &args.orchestrator {
        Some(url) => {
            let target = report::ReportTarget::new(url, args.operator_token_file.as_ref())?;
            let speed = report::measure_speed(&shard);
            tracing::info!(speed_layers_per_s = speed, "measured this shard's speed");
            Some((target, speed))
        }
        None => None,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("net")
        .build()
        .context("starting the network runtime")?;
    runtime.block_on(serve(args, topology, key, me, shard, tokenizer, report))
}

/// What the readers of incoming links need to act on frames.
struct Ctx {
    me: usize,
    topology: Arc<Topology>,
    is_exit: bool,
    hidden: usize,
    limits: FrameLimits,
    engine: mpsc::Sender<EngineJob>,
    outbound: mpsc::Sender<Outbound>,
    entry: Option<Arc<Entry>>,
    /// Generation of the current incoming connection per peer; an older one going down after a newer
    /// one replaced it still fails its own requests, but leaves the peer's state alone.
    generations: std::sync::Mutex<HashMap<PeerId, u64>>,
    next_generation: AtomicU64,
}

async fn serve(
    args: WorkerArgs,
    topology: Topology,
    key: iroh::SecretKey,
    me: usize,
    shard: DeviceShard,
    tokenizer: Option<Arc<Tokenizer>>,
    report: Option<(report::ReportTarget, f64)>,
) -> anyhow::Result<()> {
    let mut tconfig = TransportConfig::new(key);
    tconfig.bind = args.listen.clone();
    tconfig.relays = topology.relays_for(&topology.shards[me].peer);
    tconfig.peer_timeout = Duration::from_millis(args.peer_timeout_ms);
    tconfig.keep_alive = tconfig.peer_timeout / 6;
    let transport = Transport::bind(tconfig).await?;
    // Peers that reach this worker only through its relay find it once it is connected there. Without
    // the relay it still serves whoever reaches its addresses, and iroh keeps trying the relay.
    let relay = match &topology.shards[me].relay {
        None => serde_json::Value::Null,
        Some(url) => {
            let connected = match transport.wait_for_relay(RELAY_WAIT).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!("{e}; serving on the direct addresses meanwhile");
                    false
                }
            };
            serde_json::json!({"url": url, "connected": connected})
        }
    };
    let limits = match args.transport {
        FrameTransport::Iroh => FrameLimits::DEFAULT,
        FrameTransport::Axl => axl::frame_limits(args.axl_max_message_bytes)?,
    };
    let hidden = shard.config().hidden_size;
    let cfg = shard.config().clone();
    let is_exit = shard.range().is_exit();
    let weight_bytes = shard.weight_bytes();
    let device_name = shard.device_name();
    let stats = Arc::new(report::ShardStats::new(shard.range().is_entry()));

    let samplers = Arc::new(crate::samplers::Samplers::start(&args.samplers)?);
    let keep_awake = match args.keep_cpus_awake {
        true => {
            let cpus = cpus::CpuSet::allowed().context("--keep-cpus-awake: reading this process's CPUs")?;
            let awake = keep_awake::KeepAwake::start(&cpus).context("--keep-cpus-awake")?;
            tracing::info!(%cpus, "keeping these CPUs awake while requests are live");
            Some(awake)
        }
        false => None,
    };
    let topology = Arc::new(topology);
    let (out_tx, out_rx) = mpsc::channel::<Outbound>(1024);
    let engine_config = EngineLoopConfig {
        limits,
        request_idle_timeout: Duration::from_secs(args.request_idle_timeout_s),
        busy_poll: match args.busy_poll_us.unwrap_or_else(|| default_busy_poll_us(shard.range().is_entry() && is_exit)) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        },
        stats: stats.clone(),
        samplers: samplers.clone(),
        fault: args.fault.as_deref().map(fault::Fault::parse).transpose().map_err(anyhow::Error::msg)?,
        cpus: args.compute_cpus.clone(),
        keep_awake,
    };
    let (engine_tx, engine_thread) = engine_loop::spawn(shard, out_tx.clone(), engine_config);

    let is_entry = tokenizer.is_some();
    let (carrier, axl_inbox) = match args.transport {
        FrameTransport::Iroh => (Carrier::Quic(transport.clone()), None),
        FrameTransport::Axl => {
            let client = axl::connect(&args.axl_api, &transport.id(), limits).await?;
            (Carrier::Axl(client.clone()), Some(axl::inbox(client)))
        }
    };
    let (local_tx, mut local_rx) = mpsc::unbounded_channel();
    let links: Arc<Links> = links::spawn_router(
        transport.id(),
        carrier,
        topology.clone(),
        limits,
        out_rx,
        engine_tx.clone(),
        is_entry.then_some(local_tx),
    );
    let entry = tokenizer.map(|tokenizer| {
        let entry_config = EntryConfig {
            context: cfg.max_position_embeddings,
            vocab: cfg.vocab_size,
            step_timeout: match args.transport {
                FrameTransport::Iroh => Duration::from_secs(args.step_timeout_s),
                FrameTransport::Axl => Duration::from_millis(args.progress_timeout_ms),
            },
            lost_frame_probe: (args.transport == FrameTransport::Axl).then_some(axl::LOST_FRAME_PROBE),
            return_links: axl_inbox.as_ref().map(axl::ReturnLinks::new),
            samplers: samplers.clone(),
            split_head: args.split_head,
        };
        let routing = entry::Routing { topology: topology.clone(), me, links: links.clone() };
        Arc::new(Entry::new(tokenizer, entry_config, engine_tx.clone(), out_tx.clone(), routing, stats.clone()))
    });
    if let Some(entry) = &entry {
        // What the router has for the entry's own requests: failures (its compute thread, or a link of
        // theirs being down), and in a one-worker pool their tokens.
        let e = entry.clone();
        tokio::spawn(async move {
            while let Some(msg) = local_rx.recv().await {
                match msg {
                    ToEntry::Failed { request, code, message } => e.deliver_failure(&request, code, message),
                    ToEntry::Tokens { request, tokens } => e.deliver_own_tokens(&request, &tokens),
                }
            }
        });
    }
    let ctx = Arc::new(Ctx {
        me,
        topology: topology.clone(),
        is_exit,
        hidden,
        limits,
        engine: engine_tx,
        outbound: out_tx,
        entry,
        generations: std::sync::Mutex::new(HashMap::new()),
        next_generation: AtomicU64::new(0),
    });

    // Tell whoever started us that we are ready (the local launcher waits for this line).
    let ready = serde_json::json!({
        "event": "ready",
        "peer": transport.id().to_string(),
        "layers": topology.shards[me].layers.to_string(),
        "addrs": transport.bound_addrs(),
        "relay": relay,
        "transport": args.transport.name(),
        "weight_bytes": weight_bytes,
        "rss_bytes": crate::memory::resident_bytes(),
    });
    println!("{ready}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if let Some((target, speed)) = report {
        let model = args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let registration = computepool_orchestrator::workers::WorkerRegistration {
            peer: transport.id().to_string(),
            addrs: topology.shards[me].addrs.clone(),
            model,
            layers: topology.shards[me].layers.to_string(),
            device: device_name,
            weight_bytes: weight_bytes as u64,
            rss_bytes: crate::memory::resident_bytes(),
            speed,
            payout: args.payout.clone(),
        };
        report::spawn(target, registration, stats);
    }

    if let Some(inbox) = axl_inbox {
        tokio::spawn(axl::receive(inbox, ctx.clone()));
    } else {
        // Dial the shards that send to this one. If this worker restarted, they lost it and are
        // redialling: the connection tells them it is back, and they reconnect at once.
        let start = topology.shards[me].layers.start;
        for upstream in topology.shards.iter().filter(|s| s.layers.end == start) {
            links.open(&upstream.peer);
        }
    }

    // Any worker of the pool may send this worker frames (the routes of its requests decide who);
    // clients may open requests on an entry. Everyone else is refused during the handshake.
    let allow = {
        let topology = topology.clone();
        move |peer: &iroh::PublicKey, alpn: &[u8]| -> Result<(), String> {
            match topology.role_of(me, peer) {
                Some(PeerRole::Member) if alpn == FRAMES_ALPN => Ok(()),
                Some(PeerRole::Client) if alpn == GENERATE_ALPN => Ok(()),
                _ => Err("unknown peer: not in this pool's topology".to_string()),
            }
        }
    };
    let mut current: HashMap<PeerId, Connection> = HashMap::new();
    loop {
        let conn = tokio::select! {
            conn = transport.accept(&allow) => match conn {
                Some(conn) => conn,
                None => break,
            },
            _ = tokio::signal::ctrl_c() => break,
        };
        if conn.alpn() == GENERATE_ALPN {
            if let Some(entry) = &ctx.entry {
                tokio::spawn(serve_client(conn, entry.clone()));
            }
            continue;
        }
        let peer = conn.remote_id();
        links.peer_is_up(&peer);
        current.retain(|_, c| c.close_reason().is_none());
        if let Some(old) = current.insert(peer, conn.clone()) {
            old.close(VarInt::from_u32(computepool_axl::transport::endpoint::CLOSE_SHUTDOWN), b"replaced by a new connection");
        }
        let generation = ctx.next_generation.fetch_add(1, Ordering::SeqCst) + 1;
        ctx.generations.lock().expect("generations lock").insert(peer, generation);
        tokio::spawn(incoming_link(conn, ctx.clone(), generation));
    }
    if let Some(entry) = &ctx.entry {
        // The pool is going away: answer the requests in flight, and tell every shard to free what it
        // holds rather than wait for timeouts.
        // Each request's handler sends `end` down its route as it fails, so every shard frees it.
        entry.fail_all("the entry worker is shutting down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    transport.close().await;
    drop(ctx);
    let _ = engine_thread.join();
    Ok(())
}

/// One client connection to the entry: each bidirectional stream is a request.
async fn serve_client(conn: Connection, entry: Arc<Entry>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        tokio::spawn(entry.clone().serve_request(send, recv));
    }
}

/// Per-request receive state of an incoming link.
struct Inbound {
    tracker: SequenceTracker,
    cursor: ActivationCursor,
    pending: Vec<f32>,
    /// The request's entry (from its start frame).
    entry: PeerId,
}

/// Reads an incoming link (from another worker of the pool) until it ends, acting on each frame; then
/// fails the requests that came over it.
async fn incoming_link(conn: Connection, ctx: Arc<Ctx>, generation: u64) {
    let peer_id = conn.remote_id();
    let peer = peer_id.fmt_short().to_string();
    tracing::info!(%peer, "incoming link up");
    let mut inbound: HashMap<RequestId, Inbound> = HashMap::new();
    let result: Result<(), String> = async {
        // Confirm the link to the dialer: only now does it count it as up.
        let mut ack = conn.open_uni().await.map_err(|e| describe_close(&e))?;
        ack.write_all(&[links::LINK_ACK]).await.map_err(|e| e.to_string())?;
        let _ = ack.finish();
        let recv = tokio::select! {
            s = conn.accept_uni() => s.map_err(|e| describe_close(&e))?,
            e = conn.closed() => return Err(describe_close(&e)),
        };
        let mut reader = FrameReader::new(recv, ctx.limits);
        loop {
            let frame = tokio::select! {
                f = reader.next() => f,
                e = conn.closed() => return Err(describe_close(&e)),
            };
            match frame {
                Ok(Some(frame)) => {
                    tracing::trace!(kind = ?frame.header.kind(), seq = ?frame.header.seq(), "frame in");
                    if let Err(violation) = ctx.dispatch(&peer_id, &mut inbound, frame).await {
                        conn.close(VarInt::from_u32(computepool_axl::transport::endpoint::CLOSE_PROTOCOL), violation.as_bytes());
                        return Err(format!("protocol violation: {violation}"));
                    }
                }
                Ok(None) => return Err("the peer closed the link".into()),
                Err(LinkError::Frame(e)) => {
                    let reason = format!("bad frame: {e}");
                    conn.close(VarInt::from_u32(computepool_axl::transport::endpoint::CLOSE_PROTOCOL), reason.as_bytes());
                    return Err(reason);
                }
                Err(LinkError::Io(e)) => return Err(e.to_string()),
            }
        }
    }
    .await;
    let reason = result.err().unwrap_or_default();
    let replaced = ctx.generations.lock().expect("generations lock").get(&peer_id) != Some(&generation);
    let layers = ctx.topology.shard(&peer_id).map(|s| s.layers.to_string()).unwrap_or_default();
    let why = format!("shard {layers} (peer {peer}) was lost: {reason}");
    if !replaced {
        tracing::warn!(%peer, "incoming link lost: {reason}");
    }
    match &ctx.entry {
        // The entry: its requests routed through that peer cannot finish.
        Some(entry) if !replaced => entry.fail_through(&peer_id, &format!("the pipeline broke: {why}")),
        Some(_) => {}
        // Every request that came over the link is freed here and reported towards its entry.
        None => {
            if !inbound.is_empty() {
                let requests: Vec<RequestId> = inbound.into_keys().collect();
                let _ = ctx.engine.send(EngineJob::Fail { requests, reason: format!("the pipeline broke: {why}") }).await;
            }
        }
    }
}

impl Ctx {
    /// Acts on one frame from `from`. `Err` is a protocol violation: the link is dropped.
    async fn dispatch(&self, from: &PeerId, inbound: &mut HashMap<RequestId, Inbound>, frame: Frame) -> Result<(), String> {
        if let Some(entry) = &self.entry {
            return match frame.header {
                FrameHeader::Token(h) => {
                    entry.deliver_tokens(&h.request, from, h.seq, &h.tokens);
                    Ok(())
                }
                FrameHeader::Head(h) => {
                    if let Some(job) = entry.deliver_head(&h, from, &frame.payload) {
                        self.job(job).await;
                    }
                    Ok(())
                }
                FrameHeader::Control(ControlHeader::Error { request, code, message, .. }) => {
                    entry.deliver_failure(&request, code, message);
                    Ok(())
                }
                other => Err(format!("an entry takes token and error frames, not {} frames", other.kind())),
            };
        }
        let forward = |f: Frame| Outbound::Frame(f);
        match frame.header {
            FrameHeader::Control(ControlHeader::Start { request, seq, sampling, route, resumed }) => {
                if seq != 0 {
                    return Err(format!("start frame of request {request} has seq {seq}, not 0"));
                }
                // A request that starts again (a failover through this worker) starts afresh.
                inbound.remove(&request);
                let me = &self.topology.shards[self.me];
                let (next, entry) = match self.resolve(me, route.as_ref()) {
                    Ok(resolved) => resolved,
                    Err(message) => {
                        // Fails the request, not the link: tell its entry if it names a real one, else
                        // the sender when that is an entry (a route of two shards).
                        tracing::warn!(%request, "refused a start frame: {message}");
                        let entry = route
                            .as_ref()
                            .and_then(|r| r.entry.parse::<PeerId>().ok())
                            .filter(|p| self.topology.shard(p).is_some_and(|s| s.layers.start == 0))
                            .or_else(|| self.topology.shard(from).filter(|s| s.layers.start == 0).map(|s| s.peer));
                        if let Some(entry) = entry {
                            self.send_out(Outbound::Route { request: request.clone(), next: entry, entry }).await;
                            self.send_out(forward(Frame::error(request, 0, ErrorCode::InvalidRequest, message))).await;
                        }
                        return Ok(());
                    }
                };
                let mut tracker = SequenceTracker::new();
                tracker.check(0).expect("a fresh tracker takes 0");
                inbound.insert(request.clone(), Inbound { tracker, cursor: ActivationCursor::new(0), pending: Vec::new(), entry });
                let (params, sampler) = crate::samplers::from_header(&sampling);
                match next.split_first() {
                    Some((hop, rest)) => {
                        self.send_out(Outbound::Route { request: request.clone(), next: *hop, entry }).await;
                        let route = RouteHeader { next: rest.iter().map(|p| p.to_string()).collect(), entry: entry.to_string() };
                        self.send_out(forward(Frame::start_routed(request.clone(), sampling, Some(route), resumed))).await;
                    }
                    // The exit: its tokens go to the entry.
                    None => self.send_out(Outbound::Route { request: request.clone(), next: entry, entry }).await,
                }
                let resumed = resumed.unwrap_or(0);
                self.job(EngineJob::Start { request, sampling: params, sampler, resumed }).await;
            }
            FrameHeader::Activations(h) => {
                let Some(state) = inbound.get_mut(&h.request) else {
                    // Its request was failed or ended here already; ignore what is still on its way.
                    return Ok(());
                };
                let failed = |code: ErrorCode, message: String| (code, message);
                let outcome = (|| {
                    state.tracker.check(h.seq).map_err(|e| failed(ErrorCode::Sequence, e.to_string()))?;
                    if h.hidden != self.hidden as u64 {
                        return Err(failed(
                            ErrorCode::InvalidRequest,
                            format!("activations of width {} for a model of hidden size {}", h.hidden, self.hidden),
                        ));
                    }
                    let progress = state.cursor.accept(&h).map_err(|e| failed(ErrorCode::Sequence, e.to_string()))?;
                    match h.dtype {
                        // Little-endian on the wire (docs/PROTOCOL.md §2); the shape check made the
                        // payload a whole number of values.
                        WireDType::F32 => state.pending.extend(f32_values(&frame.payload)),
                        WireDType::Bf16 => state.pending.extend(
                            frame.payload.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
                        ),
                    }
                    Ok(progress)
                })();
                match outcome {
                    Ok(progress) if progress.step_complete => {
                        let rows = state.pending.len() / self.hidden;
                        let start_pos = h.end_pos().unwrap_or(0) - rows as u64;
                        let input = StepData::Hidden(std::mem::take(&mut state.pending));
                        self.job(EngineJob::Step { request: h.request, start_pos, input }).await;
                    }
                    Ok(_) => {}
                    Err((code, message)) => {
                        inbound.remove(&h.request);
                        self.job(EngineJob::End { request: h.request.clone() }).await;
                        self.send_out(forward(Frame::error(h.request, 0, code, message))).await;
                    }
                }
            }
            FrameHeader::Control(ControlHeader::End { request, .. }) => {
                if inbound.remove(&request).is_none() {
                    return Ok(()); // failed here already: its route is gone, nothing to forward
                }
                self.job(EngineJob::End { request: request.clone() }).await;
                if self.is_exit {
                    self.send_out(Outbound::Forget(request)).await;
                } else {
                    self.send_out(forward(Frame::end(request, 0))).await;
                }
            }
            FrameHeader::Control(ControlHeader::Error { request, code, message, .. }) => {
                inbound.remove(&request);
                self.job(EngineJob::End { request: request.clone() }).await;
                self.send_out(forward(Frame::error(request, 0, code, message))).await;
            }
            FrameHeader::Control(ControlHeader::Unload) => {
                // The sender is going away: every request that came over this link ends.
                let requests: Vec<RequestId> = inbound.drain().map(|(r, _)| r).collect();
                self.job(EngineJob::Fail { requests, reason: "the upstream shard is unloading".into() }).await;
            }
            FrameHeader::Token(TokenHeader { request, .. }) | FrameHeader::Head(HeadHeader { request, .. }) => {
                return Err(format!(
                    "token and head frames flow from an exit to an entry only; shard {} got one for {request}",
                    self.topology.shards[self.me].layers
                ));
            }
        }
        Ok(())
    }

    /// The shards after `me` and the entry of a request, from its start frame's route (checked against
    /// the topology) or, without one, the topology's default route.
    fn resolve(&self, me: &computepool_axl::transport::ShardPeer, route: Option<&RouteHeader>) -> Result<(Vec<PeerId>, PeerId), String> {
        match route {
            None => {
                let next = self.topology.default_route(me).iter().map(|s| s.peer).collect();
                Ok((next, self.topology.entry().peer))
            }
            Some(route) => {
                let parse = |id: &str| id.parse::<PeerId>().map_err(|e| format!("the route names {id:.16}…, not a peer id: {e}"));
                let next: Vec<PeerId> = route.next.iter().map(|id| parse(id)).collect::<Result<_, _>>()?;
                let entry = parse(&route.entry)?;
                let (shards, entry) = self.topology.resolve_route(me, &next, &entry)?;
                Ok((shards.iter().map(|s| s.peer).collect(), entry.peer))
            }
        }
    }

    async fn job(&self, job: EngineJob) {
        let _ = self.engine.send(job).await;
    }

    async fn send_out(&self, msg: Outbound) {
        let _ = self.outbound.send(msg).await;
    }
}
