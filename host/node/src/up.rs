//! `computepool up`: a whole ComputePool on this machine. It fetches the default model if needed, starts
//! N worker processes (a local pipeline over QUIC on loopback), serves them as one pool through the
//! orchestrator, waits until the pool answers, prints how to use it, and stops everything on Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use computepool_axl::transport::load_or_create_secret_key;

use crate::orchestrator::auth::OperatorToken;
use crate::orchestrator::pools::PoolSpec;
use crate::orchestrator::{self, AppState, Settings};
use crate::pipeline::{LocalPipeline, PipelineOptions};
use crate::worker::api::{ErrorKind, Event, GenerateRequest};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The model to serve (fetched into --models-dir if missing).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// Worker processes (shards), at least 2.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// HTTP address of the API.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Weight dtype of the workers: f32 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Compute threads per worker (default: the cores shared out among the workers).
    #[arg(long)]
    threads: Option<usize>,
    /// Where each worker computes, in shard order, comma-separated (`cuda,cpu`); one entry applies to
    /// all. Default: cpu.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// Where the orchestrator keeps its database and key.
    #[arg(long, default_value = "computepool-state")]
    state_dir: PathBuf,
    /// How long the pool may take to answer its first request, in seconds.
    #[arg(long, default_value_t = 300)]
    ready_timeout_s: u64,
    /// How often the workers heartbeat to the orchestrator, in ms.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    /// Sampler plugins for every worker of the pool.
    #[command(flatten)]
    samplers: crate::samplers::SamplerArgs,
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.workers < 2 {
        bail!("--workers must be at least 2 (a pipeline has an entry and an exit shard)");
    }
    let model_dir = crate::model_fetch::fetch_model(&args.model, &args.models_dir, "f32", false)?;
    let model_dir = std::fs::canonicalize(&model_dir).with_context(|| format!("finding {}", model_dir.display()))?;
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let key = load_or_create_secret_key(&orchestrator::key_path(&args.state_dir))?;
    let token = OperatorToken::load_or_create(&args.state_dir)?;
    // Bound before the workers start, so they know where to register (they retry until it serves).
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("listening on {} (another server there? pass --listen)", args.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let threads = args.threads.unwrap_or_else(|| (crate::generate::default_threads() / args.workers).max(1));
    eprintln!("starting {} workers for {} ({threads} threads each)…", args.workers, args.model);
    // Dropping the pipeline stops its workers, on every path out of this function.
    let pipeline = LocalPipeline::start(&PipelineOptions {
        orchestrator: Some((format!("http://{addr}"), token.as_str().to_string())),
        model: model_dir.clone(),
        shards: args.workers,
        dtype: args.dtype.clone(),
        threads,
        peer_timeout_ms: 1000,
        devices: args.devices.clone(),
        client_key: Some(key.clone()),
        samplers: args.samplers.clone(),
        payouts: Vec::new(),
    })?;
    let settings = Settings { heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)), token };
    let state = Arc::new(AppState::open(&args.state_dir, key, settings)?);
    // The pool of a previous `up` had other workers (new keys, new ports): this one replaces it.
    let spec = PoolSpec {
        id: Some(args.model.clone()),
        model: args.model.clone(),
        model_dir,
        topology: pipeline.topology().clone(),
        replicas: Vec::new(),
    };
    state.pools.register(&state.store, spec, true).map_err(|e| anyhow::anyhow!("registering the pool: {e}"))?;

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(orchestrator::serve(
            listener,
            state.clone(),
            async move {
                let _ = stop_rx.await;
            },
            Duration::from_secs(1),
        ));
        let ready = tokio::select! {
            r = wait_until_ready(&state, &args.model, Duration::from_secs(args.ready_timeout_s)) => r,
            _ = orchestrator::shutdown_signal() => Err(anyhow::anyhow!("interrupted before the pool was ready")),
        };
        if let Err(e) = ready {
            let _ = stop_tx.send(());
            let _ = server.await;
            return Err(e);
        }
        println!("{}", banner(&format!("http://{addr}"), &args.model, args.workers));
        use std::io::Write;
        let _ = std::io::stdout().flush();
        orchestrator::shutdown_signal().await;
        eprintln!("stopping…");
        let _ = stop_tx.send(());
        let _ = server.await;
        state.pools.disconnect_all().await;
        anyhow::Ok(())
    })?;
    drop(pipeline);
    eprintln!("stopped");
    Ok(())
}

/// Sends one-token requests to the pool until one succeeds (the workers' links come up in the
/// background after they report ready).
async fn wait_until_ready(state: &AppState, model: &str, timeout: Duration) -> anyhow::Result<()> {
    let pool = state.pools.by_model(model).context("the pool is registered")?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        match pool.start(&GenerateRequest::text("ready?", 1), state.workers.clone()).await {
            Ok(mut request) => loop {
                match request.next_event().await {
                    Some(Event::Done { .. }) => return Ok(()),
                    Some(Event::Error { code: ErrorKind::Unavailable, message }) => {
                        last = message;
                        break;
                    }
                    Some(Event::Error { code, message }) => bail!("the pool failed a test request ({code:?}): {message}"),
                    Some(_) => {}
                    None => break,
                }
            },
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the pool was not ready within {timeout:?}: {last}")
}

fn banner(url: &str, model: &str, workers: usize) -> String {
    format!(
        r#"
ComputePool is up: {model} split across {workers} worker processes.

  OpenAI-compatible API:  {url}/v1
  pools:                  {url}/pools
  workers, topology:      {url}/workers  {url}/topology
  Prometheus metrics:     {url}/metrics

Try it (streaming):

curl -N {url}/v1/chat/completions \
  -H 'Content-Type: application/json' \
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 64, "stream": true}}'

Or from Python (pip install openai):

from openai import OpenAI
client = OpenAI(base_url="{url}/v1", api_key="unused")
stream = client.chat.completions.create(
    model="{model}",
    messages=[{{"role": "user", "content": "What is the capital of France?"}}],
    max_tokens=64,
    stream=True,
)
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()

Press Ctrl-C to stop.
"#
    )
}
