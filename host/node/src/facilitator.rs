//! `computepool facilitator`: the self-hosted x402 facilitator (`POST /verify`, `POST /settle`,
//! `GET /supported`) for one EVM chain, settling with its own key. The work is computepool-pay's; this is
//! the command line around it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use computepool_chain::alloy::primitives::Address;
use computepool_chain::{Chain, Deployment, KeySource};
use computepool_pay::exact::DEFAULT_EXPIRY_MARGIN_S;
use computepool_pay::facilitator::{Facilitator, FacilitatorConfig, router};

#[derive(Args)]
pub struct FacilitatorArgs {
    /// The chain's JSON-RPC URL (http or https).
    #[arg(long)]
    rpc: String,
    /// A file holding the settling key (hex). It pays the gas of every settlement; fund it with the
    /// chain's native coin only.
    #[arg(long, conflicts_with = "key_env", required_unless_present = "key_env")]
    key_file: Option<PathBuf>,
    /// An environment variable holding the settling key (hex).
    #[arg(long)]
    key_env: Option<String>,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:4020")]
    listen: SocketAddr,
    /// Refuse to start unless the endpoint serves this chain id.
    #[arg(long)]
    chain_id: Option<u64>,
    /// A token to settle (repeatable). Without --token or --deployment: any EIP-3009 token on the chain.
    #[arg(long = "token")]
    tokens: Vec<Address>,
    /// A deployment file (`computepool chain devnet|deploy`): settle its USDC, and check its chain id.
    #[arg(long)]
    deployment: Option<PathBuf>,
    /// Seconds before a voucher's validBefore that it is already refused (time to mine the settlement).
    #[arg(long, default_value_t = DEFAULT_EXPIRY_MARGIN_S)]
    expiry_margin_s: u64,
}

pub fn run(args: FacilitatorArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: FacilitatorArgs) -> anyhow::Result<()> {
    let source = match (args.key_file, args.key_env) {
        (Some(path), _) => KeySource::File(path),
        (None, Some(var)) => KeySource::Env(var),
        (None, None) => anyhow::bail!("--key-file or --key-env is required"),
    };
    let signer = source.load()?;
    let mut tokens = args.tokens;
    let mut chain_id = args.chain_id;
    if let Some(path) = &args.deployment {
        let deployment = Deployment::read(path)?;
        if let Some(expected) = chain_id
            && expected != deployment.chain_id
        {
            anyhow::bail!("--chain-id {expected}, but {} is a deployment on chain {}", path.display(), deployment.chain_id);
        }
        chain_id = Some(deployment.chain_id);
        tokens.push(deployment.usdc.address);
    }
    let chain = Chain::connect(&args.rpc, chain_id, signer).await.with_context(|| format!("connecting to {}", args.rpc))?;
    let config = FacilitatorConfig { tokens: (!tokens.is_empty()).then_some(tokens.clone()), expiry_margin_s: args.expiry_margin_s };
    let facilitator = Arc::new(Facilitator::new(chain, config));
    let network = facilitator.network();
    let settler = facilitator.chain().address();
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let token_list = if tokens.is_empty() { "any EIP-3009 token".to_string() } else { tokens.iter().map(Address::to_string).collect::<Vec<_>>().join(", ") };
    println!("facilitator on http://{addr} for exact payments on {network} in {token_list}; settling from {settler}");
    axum::serve(listener, router(facilitator)).with_graceful_shutdown(computepool_orchestrator::shutdown_signal()).await?;
    Ok(())
}
