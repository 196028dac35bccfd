//! `computepool chain`: a local devnet with everything deployed, or a deployment to a real network. The work
//! is computepool-chain's; this is the command line around it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use computepool_chain::alloy::primitives::{Address, U256};
use computepool_chain::alloy::signers::local::PrivateKeySigner;
use computepool_chain::bindings::TestUSD;
use computepool_chain::{Anvil, Chain, ChainTools, DEVNET_CHAIN_ID, DeployOptions, Deployment, KeySource, deploy_all};

#[derive(Subcommand)]
pub enum ChainCommand {
    /// Start anvil (chain id 16602) on this machine, deploy Superfluid and ComputePool's contracts, fund the
    /// test accounts with USDC, print their keys and write the deployment file; runs until Ctrl-C.
    Devnet(DevnetArgs),
    /// Deploy Superfluid and ComputePool's contracts to a network and write the deployment file.
    Deploy(DeployArgs),
}

#[derive(Args)]
pub struct DevnetArgs {
    /// anvil's port on 127.0.0.1.
    #[arg(long, default_value_t = 8545)]
    port: u16,
    /// Where to write the deployment file.
    #[arg(long, default_value = "deployments/devnet-16602.json")]
    out: PathBuf,
    /// USDC minted to each funded account (whole tokens).
    #[arg(long, default_value_t = 1_000_000)]
    usdc_per_account: u64,
}

#[derive(Args)]
pub struct DeployArgs {
    /// The network's JSON-RPC URL (http or https).
    #[arg(long)]
    rpc: String,
    /// A file holding the deployer's private key (hex).
    #[arg(long, conflicts_with = "key_env", required_unless_present = "key_env")]
    key_file: Option<PathBuf>,
    /// An environment variable holding the deployer's private key (hex).
    #[arg(long)]
    key_env: Option<String>,
    /// Refuse to deploy unless the endpoint serves this chain id.
    #[arg(long)]
    chain_id: Option<u64>,
    /// The address whose attestations the INFT verifier accepts (default: the deployer's).
    #[arg(long)]
    oracle: Option<Address>,
    /// Where to write the deployment file (default: deployments/<chain id>.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(command: ChainCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        match command {
            ChainCommand::Devnet(args) => devnet(args).await,
            ChainCommand::Deploy(args) => deploy(args).await,
        }
    })
}

/// The chain toolchain: COMPUTEPOOL_CHAIN_TOOLS, or scripts/contracts.sh run from the current directory
/// (the repository root, where `make` runs).
pub fn tools() -> anyhow::Result<ChainTools> {
    let cwd = std::env::current_dir()?;
    let repo = cwd.join("scripts/contracts.sh").is_file().then_some(cwd.as_path());
    Ok(ChainTools::locate(repo)?)
}

async fn devnet(args: DevnetArgs) -> anyhow::Result<()> {
    let tools = tools()?;
    let superfluid = tools.superfluid()?;
    let mut anvil = Anvil::spawn(&tools, args.port, DEVNET_CHAIN_ID).context("starting anvil")?;
    let keys = anvil.keys().to_vec();
    let deployer = Chain::connect(anvil.rpc_url(), Some(DEVNET_CHAIN_ID), keys[0].clone()).await?;
    // The last funded account is the devnet's INFT oracle.
    let oracle = keys.last().context("anvil reported no funded accounts")?.address();
    let deployment = deploy_all(&deployer, &superfluid, &DeployOptions::usdc_like(oracle)).await.context("deploying")?;
    let usdc = TestUSD::new(deployment.usdc.address, deployer.provider());
    let per_account = U256::from(args.usdc_per_account) * U256::from(1_000_000u64);
    for key in &keys {
        deployer.send("minting test USDC", usdc.mint(key.address(), per_account)).await?;
    }
    deployment.write(&args.out)?;
    print_deployment(&deployment, &args.out);
    println!("\nFunded accounts (10 000 ETH and {} USDC each; devnet keys, public, never for real funds):", args.usdc_per_account);
    for (i, key) in keys.iter().enumerate() {
        let role = match i {
            0 => "  deployer, owner of the token and verifier",
            _ if i + 1 == keys.len() => "  INFT oracle",
            _ => "",
        };
        println!("  ({i}) {}  0x{}{role}", key.address(), hex_key(key));
    }
    println!("\nanvil: {} (chain id {DEVNET_CHAIN_ID}). Ctrl-C stops it.", anvil.rpc_url());
    // Ctrl-C reaches anvil through the terminal's process group; a SIGTERM to this process alone would
    // orphan it, so both end here, where dropping `anvil` kills it.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = poll.tick() => {
                if let Some(status) = anvil.try_wait()? {
                    anyhow::bail!("anvil exited: {status}");
                }
            }
        }
    }
    Ok(())
}

fn hex_key(key: &PrivateKeySigner) -> String {
    key.to_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

async fn deploy(args: DeployArgs) -> anyhow::Result<()> {
    let source = match (args.key_file, args.key_env) {
        (Some(path), _) => KeySource::File(path),
        (None, Some(var)) => KeySource::Env(var),
        (None, None) => anyhow::bail!("give --key-file or --key-env"),
    };
    let signer = source.load()?;
    let tools = tools()?;
    let superfluid = tools.superfluid()?;
    let chain = Chain::connect(&args.rpc, args.chain_id, signer).await?;
    let oracle = args.oracle.unwrap_or(chain.address());
    eprintln!("deploying to chain {} from {}", chain.chain_id(), chain.address());
    let deployment = deploy_all(&chain, &superfluid, &DeployOptions::usdc_like(oracle)).await.context("deploying")?;
    let out = args.out.unwrap_or_else(|| PathBuf::from(format!("deployments/{}.json", chain.chain_id())));
    deployment.write(&out)?;
    print_deployment(&deployment, &out);
    Ok(())
}

fn print_deployment(d: &Deployment, path: &Path) {
    println!("Deployed on chain {} (deployment file: {}):", d.chain_id, path.display());
    println!("  Superfluid {} host       {}", d.superfluid.version, d.superfluid.host);
    println!("  GDAv1Forwarder           {}", d.superfluid.gda_v1_forwarder);
    println!("  CFAv1Forwarder           {}", d.superfluid.cfa_v1_forwarder);
    println!("  SuperTokenFactory        {}", d.superfluid.super_token_factory);
    println!("  {} (EIP-3009)          {}", d.usdc.symbol, d.usdc.address);
    println!("  {}x (SuperToken)       {}", d.usdc.symbol, d.usdcx);
    println!("  OracleVerifier           {} (oracle {})", d.oracle_verifier, d.oracle);
    println!("  PoolINFT                 {}", d.pool_inft);
}
