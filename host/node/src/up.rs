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

use computepool_pay::devnet::{PaidDevnet, PaidDevnetOptions, address_of};

use computepool_orchestrator::auth::OperatorToken;
use computepool_orchestrator::payments::config::PoolPayments;
use computepool_orchestrator::payments::setup::{PaymentArgs, RailHost};
use computepool_orchestrator::pools::PoolSpec;
use computepool_orchestrator::{self as orchestrator, AppState, Settings};
use crate::pipeline::{LocalPipeline, PipelineOptions};
use computepool_entry_api::{ErrorKind, Event, GenerateRequest};

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The model to serve (fetched into --models-dir if missing).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// Worker processes (shards); 1 serves the whole model from one worker.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Each worker's relative speed, entry first, comma-separated (`1,2` gives the exit twice the
    /// layers of the entry: 10 and 20 of 30). Default: all equal, an even split.
    #[arg(long, value_delimiter = ',')]
    shard_speeds: Vec<u64>,
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
    /// `on`: a local chain (anvil) with Superfluid, test USDC and a facilitator is started, and the pool
    /// charges per second (x402 vouchers, operators paid through a Superfluid GDA pool); a funded test
    /// key is printed. `off`: the pool serves free.
    #[arg(long, default_value = "on")]
    payments: String,
    /// (Payments on) the payment-rail plugins' folder.
    #[arg(long, default_value = "plugins/rails")]
    rails: PathBuf,
    /// (Payments on) the pool's price, in atomic units of USDC (6 decimals) per second a request
    /// streams; a multiple of the model's layer count (the operators' total units).
    #[arg(long, default_value_t = 600)]
    price_per_second: u128,
    /// (Payments on) the longest one request may stream, in seconds (one voucher pays for this).
    #[arg(long, default_value_t = 60)]
    max_seconds_per_request: u32,
    /// Pipelines of --workers shards each, each its own topology file (so routes do not mix them: the
    /// coalition voters judge by operator, and each pipeline is one operator's — its workers share a
    /// payout address). Requests are spread over them, fail over between them, and output audits compare
    /// them. A pool whose topology lists several workers per range mixes them (POST /pools).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// The share of finished requests re-run on other routes to check their tokens (0 to 1).
    #[arg(long, default_value_t = orchestrator::audits::DEFAULT_RATE, value_parser = orchestrator::audits::parse_rate)]
    audit_rate: f64,
    /// (Payments on) the keeper the pool's payment transitions run through: a keeper-adapter plugin
    /// of --keepers (`local` runs the workflows itself on the devnet), or `none` to send flows straight
    /// to the superfluid-gda rail.
    #[arg(long, default_value = "local")]
    keeper: String,
    /// (Payments on) the keeper-adapter plugins' folder.
    #[arg(long, default_value = "plugins/keepers")]
    keepers: PathBuf,
    /// (Payments on, a keeper) the coalition-voter plugins' folder; the coalition is the voters named
    /// by --coalition-voters, k of which must agree before anyone is ejected and slashed.
    #[arg(long, default_value = "plugins/voters")]
    voters: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "audit-majority,audit-unanimous,liveness")]
    coalition_voters: Vec<String>,
    /// Ballots needed to act (default: a strict majority of the voters).
    #[arg(long)]
    coalition_k: Option<u32>,
    /// A fault drill, for tests and demos: `PIPELINE:SHARD:FAULT` starts that worker with `--fault FAULT`
    /// (e.g. `2:1:wrong-tokens-after:3`).
    #[arg(long, hide = true)]
    fault_drill: Option<String>,
}

/// `--fault-drill PIPELINE:SHARD:FAULT`.
fn parse_drill(text: &str) -> anyhow::Result<(usize, usize, String)> {
    let mut parts = text.splitn(3, ':');
    let (Some(p), Some(s), Some(fault)) = (parts.next(), parts.next(), parts.next()) else {
        bail!("--fault-drill {text:?}: give PIPELINE:SHARD:FAULT");
    };
    Ok((p.parse().context("--fault-drill: PIPELINE is a number")?, s.parse().context("--fault-drill: SHARD is a number")?, fault.to_string()))
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    if args.workers < 1 {
        bail!("--workers must be at least 1");
    }
    let paid = match args.payments.as_str() {
        "on" => true,
        "off" => false,
        other => bail!("--payments {other}: give on or off"),
    };
    let model_dir = crate::model_fetch::fetch_model(&args.model, &args.models_dir, "f32", false)?;
    let model_dir = std::fs::canonicalize(&model_dir).with_context(|| format!("finding {}", model_dir.display()))?;
    std::fs::create_dir_all(&args.state_dir).with_context(|| format!("creating {}", args.state_dir.display()))?;
    let key = load_or_create_secret_key(&orchestrator::key_path(&args.state_dir))?;
    let token = OperatorToken::load_or_create(&args.state_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    // The devnet lives as long as this function: dropping it stops anvil and the facilitator.
    let devnet = if paid { Some(runtime.block_on(start_devnet(&args))?) } else { None };
    // Bound before the workers start, so they know where to register (they retry until it serves).
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("listening on {} (another server there? pass --listen)", args.listen))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let total_workers = args.workers * args.replicas;
    let threads = args.threads.unwrap_or_else(|| (crate::generate::default_threads() / total_workers).max(1));
    eprintln!("starting {total_workers} workers for {} ({threads} threads each)…", args.model);
    let drill = args.fault_drill.as_deref().map(parse_drill).transpose()?;
    // Dropping the pipelines stops their workers, on every path out of this function.
    let mut pipelines = Vec::with_capacity(args.replicas);
    for r in 0..args.replicas {
        let operators: Vec<String> = devnet.as_ref().map(|d| d.devnet.operators.iter().map(address_of).collect()).unwrap_or_default();
        // One pipeline: an operator per shard. Several: each pipeline is one operator's.
        let payouts = match args.replicas {
            1 => operators,
            _ => operators.get(r).map(|op| vec![op.clone(); args.workers]).unwrap_or_default(),
        };
        let mut worker_args = vec![Vec::new(); args.workers];
        if let Some((p, shard, fault)) = &drill
            && *p == r
        {
            let slot = worker_args.get_mut(*shard).with_context(|| format!("--fault-drill: no shard {shard}"))?;
            // `wrong-tokens-after:3` is the worker's `--fault wrong-tokens-after 3`.
            *slot = std::iter::once("--fault").chain(fault.split(':')).map(str::to_string).collect();
        }
        pipelines.push(LocalPipeline::start(&PipelineOptions {
            replicas: 1,
            orchestrator: Some((format!("http://{addr}"), token.as_str().to_string())),
            model: model_dir.clone(),
            shards: args.workers,
            speeds: args.shard_speeds.clone(),
            dtype: args.dtype.clone(),
            threads,
            peer_timeout_ms: 1000,
            devices: args.devices.clone(),
            client_key: Some(key.clone()),
            samplers: args.samplers.clone(),
            transport: crate::worker::FrameTransport::Iroh,
            payouts,
            worker_args,
        })?);
    }
    let settings = Settings { heartbeat: Duration::from_millis(args.heartbeat_ms.max(10)), token, audit_rate: args.audit_rate };
    let mut state = AppState::open(&args.state_dir, key, settings)?;
    // The pool of a previous `up` had other workers (new keys, new ports): this one replaces it.
    let spec = PoolSpec {
        id: Some(args.model.clone()),
        model: args.model.clone(),
        model_dir,
        topology: pipelines[0].topology().clone(),
        replicas: pipelines[1..].iter().map(|p| p.topology().clone()).collect(),
    };
    state.pools.register(&state.store, spec, true).map_err(|e| anyhow::anyhow!("registering the pool: {e}"))?;
    let rails_host = match &devnet {
        Some(d) => {
            let rails = runtime.block_on(RailHost::start(&d.rail_args, &d.state_dir))?;
            if d.rail_args.keepers.is_some() {
                runtime.block_on(state.enable_keepers(&d.rail_args, &d.state_dir, rails.host.clone()))?;
            }
            runtime.block_on(state.enable_payments(&d.state_dir, rails.host.clone()))?;
            Some(rails)
        }
        None => None,
    };
    let state = Arc::new(state);

    runtime.block_on(async {
        let coalition = devnet.as_ref().and_then(|d| d.rail_args.coalition.as_deref());
        let breach_dir = devnet.as_ref().map_or(args.state_dir.as_path(), |d| d.state_dir.as_path());
        state.start_breach_handler(coalition, rails_host.as_ref().map(|r| r.host.clone()), breach_dir)?;
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
            r = async {
                wait_until_ready(&state, &args.model, Duration::from_secs(args.ready_timeout_s)).await?;
                if let Some(d) = &devnet {
                    set_price(&state, &args.model, d, args.price_per_second, args.max_seconds_per_request).await?;
                }
                anyhow::Ok(())
            } => r,
            _ = orchestrator::shutdown_signal() => Err(anyhow::anyhow!("interrupted before the pool was ready")),
        };
        if let Err(e) = ready {
            let _ = stop_tx.send(());
            let _ = server.await;
            return Err(e);
        }
        let url = format!("http://{addr}");
        println!("{}", banner(&url, &args.model, total_workers));
        if let Some(d) = &devnet {
            println!("{}", payments_banner(&url, &args.model, d, args.price_per_second, args.max_seconds_per_request));
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        orchestrator::shutdown_signal().await;
        eprintln!("stopping…");
        let _ = stop_tx.send(());
        let _ = server.await;
        state.pools.disconnect_all().await;
        anyhow::Ok(())
    })?;
    drop(pipelines);
    eprintln!("stopped");
    Ok(())
}

/// `up --payments on`: the devnet behind the pool, and where the rails' state of this run lives.
struct UpDevnet {
    devnet: PaidDevnet,
    rail_args: PaymentArgs,
    /// Payments state of this run (its chain is new each run, so is this folder).
    state_dir: PathBuf,
}

async fn start_devnet(args: &UpArgs) -> anyhow::Result<UpDevnet> {
    let tools = crate::chain::tools()?;
    eprintln!("starting a local chain (anvil) with Superfluid, test USDC and a facilitator…");
    let operators = if args.replicas > 1 { args.replicas } else { args.workers };
    let options = PaidDevnetOptions { operators, ..PaidDevnetOptions::default() };
    let devnet = PaidDevnet::start(&tools, &options).await.context("starting the payments devnet")?;
    // A previous run's payments belong to a chain that is gone.
    let state_dir = args.state_dir.join("devnet-payments");
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir).with_context(|| format!("clearing {}", state_dir.display()))?;
    }
    std::fs::create_dir_all(&state_dir)?;
    let key_file = state_dir.join("orchestrator-chain.key");
    computepool_chain::client::write_key_file(&key_file, &devnet.orchestrator)?;
    let keeper = (args.keeper != "none").then(|| args.keeper.clone());
    // The rails' grants, and the keeper's (the contracts its workflows call) when there is one.
    let rail_config = state_dir.join("rails.toml");
    std::fs::write(&rail_config, devnet.rail_config(keeper.as_deref()))?;
    let mut rail_args = PaymentArgs {
        payments: true,
        rails: Some(args.rails.clone()),
        rail_config: Some(rail_config),
        chain_rpc: Some(devnet.rpc_url().to_string()),
        chain_key_file: Some(key_file),
        rail_poll_ms: 500,
        ..PaymentArgs::default()
    };
    if let Some(keeper) = keeper {
        let context = state_dir.join("keeper-context.json");
        let body = serde_json::json!({
            "chainId": computepool_chain::DEVNET_CHAIN_ID,
            "callbackUrl": "",
            "contracts": devnet.keeper_contracts(),
        });
        std::fs::write(&context, serde_json::to_vec_pretty(&body)?)?;
        let k = args.coalition_k.unwrap_or(args.coalition_voters.len() as u32 / 2 + 1);
        let coalition = state_dir.join("coalition.json");
        let body = serde_json::json!({
            "voters": args.coalition_voters,
            "k": k,
            // A tenth of each operator's stake per upheld breach.
            "slash_amount": (u128::from(PaidDevnetOptions::default().operator_stake_usdc) * 100_000).to_string(),
        });
        std::fs::write(&coalition, serde_json::to_vec_pretty(&body)?)?;
        rail_args.keepers = Some(args.keepers.clone());
        rail_args.keeper_context = Some(context);
        rail_args.keeper = keeper;
        rail_args.voters = Some(args.voters.clone());
        rail_args.coalition = Some(coalition);
    }
    Ok(UpDevnet { devnet, rail_args, state_dir })
}

/// Prices the pool once every worker has registered its payout address (the flow's members).
async fn set_price(state: &AppState, model: &str, d: &UpDevnet, price: u128, max_seconds: u32) -> anyhow::Result<()> {
    let pool = state.pools.by_model(model).context("the pool is registered")?;
    let mut settings: PoolPayments = serde_json::from_value(d.devnet.pool_payments(price, max_seconds))?;
    if d.rail_args.keepers.is_some() {
        // The same GDA pool and Super Token, through the keeper's stream-start / stream-stop workflows.
        settings.flow.plugin = d.rail_args.keeper.clone();
        settings.flow.config = serde_json::Value::Null;
    }
    let payouts: usize = pool.members.len();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let registered = pool
            .members
            .iter()
            .map(|m| &m.shard)
            .filter(|s| state.workers.get(&s.peer.to_string()).is_some_and(|w| w.registration.payout.is_some()))
            .count();
        if registered == payouts {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {registered} of {payouts} workers registered a payout address within a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let payments = state.payments.as_ref().context("payments are on")?;
    payments.configure(&pool, &state.workers, settings.clone()).await.map_err(|e| anyhow::anyhow!("pricing the pool: {e}"))?;
    state.store.put_pool_payments(&pool.record.id, &settings)?;
    Ok(())
}

/// Sends one-token requests to the pool until one succeeds (the workers' links come up in the
/// background after they report ready).
async fn wait_until_ready(state: &AppState, model: &str, timeout: Duration) -> anyhow::Result<()> {
    let pool = state.pools.by_model(model).context("the pool is registered")?;
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let routes = computepool_orchestrator::pools::RouteLog::default();
        match pool.start(&GenerateRequest::text("ready?", 1), state.workers.clone(), &routes).await {
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
    let served = match workers {
        1 => "served by one worker process".to_string(),
        n => format!("split across {n} worker processes"),
    };
    format!(
        r#"
ComputePool is up: {model} {served}.

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

fn payments_banner(url: &str, model: &str, d: &UpDevnet, price: u128, max_seconds: u32) -> String {
    let devnet = &d.devnet;
    let payer = &devnet.payers[0];
    let key = format!("0x{}", hex::encode(payer.to_bytes()));
    let asset = format!("{:#x}", devnet.deployment.usdc.address);
    let worst = price * u128::from(max_seconds);
    let ready = serde_json::json!({
        "event": "payments", "url": url, "rpc": devnet.rpc_url(), "network": format!("eip155:{}", computepool_chain::DEVNET_CHAIN_ID),
        "asset": asset, "usdcx": format!("{:#x}", devnet.deployment.usdcx), "gda_pool": format!("{:#x}", devnet.gda_pool),
        "pay_to": address_of(&devnet.orchestrator), "payer_key": key, "payer": address_of(payer),
        "operators": devnet.operators.iter().map(address_of).collect::<Vec<_>>(),
        "price_per_second": price.to_string(), "max_seconds_per_request": max_seconds, "voucher_amount": worst.to_string(),
        "facilitator": devnet.facilitator_url, "coalition": format!("{:#x}", devnet.coalition),
        "keeper": d.rail_args.keepers.as_ref().map(|_| d.rail_args.keeper.clone()),
    });
    format!(
        r#"Payments are on: every request pays {price} USDC atomic units per second it streams (a voucher covers
{max_seconds} s: {worst} units), streamed to the pool's {operators} through Superfluid on a local chain.

  chain (anvil):   {rpc}  (chain id {chain_id})
  test USDC:       {asset}
  facilitator:     {facilitator}
  funded test key: {key}   (a public anvil key: devnet only)

Pay with the official x402 client (pip install "x402[httpx,evm]" openai) — allow the test token first:

import asyncio
from eth_account import Account
from openai import AsyncOpenAI
from x402 import x402Client
from x402.http.clients.httpx import x402HttpxClient
from x402.mechanisms.evm.exact.register import register_exact_evm_client

async def main():
    client = x402Client()
    register_exact_evm_client(client, Account.from_key("{key}"))
    client.set_spend_controls({{"allowed_assets": [{{"network": "eip155:{chain_id}", "asset": "{asset}", "max_amount_per_payment": "{worst}"}}]}})
    async with x402HttpxClient(client, timeout=120) as http:
        api = AsyncOpenAI(base_url="{url}/v1", api_key="unused", http_client=http, max_retries=0)
        stream = await api.chat.completions.create(model="{model}", stream=True, max_tokens=64,
            messages=[{{"role": "user", "content": "What is the capital of France?"}}])
        async for chunk in stream:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()

asyncio.run(main())

{ready}
"#,
        operators = match devnet.operators.len() {
            1 => "operator".to_string(),
            n => format!("{n} operators"),
        },
        rpc = devnet.rpc_url(),
        chain_id = computepool_chain::DEVNET_CHAIN_ID,
        facilitator = devnet.facilitator_url,
    )
}
