//! `computepool`: the command-line edge of ComputePool. Errors are reported here with `anyhow`; the work
//! lives in the library crates.

mod bench;
mod bench_api;
mod chain;
mod facilitator;
mod generate;
mod keeper_cli;
mod memory;
mod model_fetch;
mod pipeline;
mod plan;
mod plugin_cli;
mod relay;
mod sampler_bench;
mod samplers;
mod up;
mod worker;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "computepool", version, about = "Run one big language model across many small GPUs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage local models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Generate text from a prompt with the whole model in this process, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Measure prompt processing and generation speed (llama-bench's metrics).
    Bench(bench::BenchArgs),
    /// Serve one shard (a layer range) of a pipeline described by a topology file.
    Worker(worker::WorkerArgs),
    /// Share a model's layers among workers by the memory and speed each offers; write the topology.
    Plan(plan::PlanArgs),
    /// Relay encrypted traffic for a pool's workers that cannot reach each other directly (NAT).
    Relay(relay::RelayArgs),
    /// Start a whole pool on this machine (orchestrator and N workers) and serve it until Ctrl-C.
    Up(up::UpArgs),
    /// Serve pools through an OpenAI-compatible HTTP API (and the pool REST API).
    Orchestrator(computepool_orchestrator::OrchestratorArgs),
    /// The chain side: a local devnet with everything deployed, or a deployment to a network.
    Chain {
        #[command(subcommand)]
        command: chain::ChainCommand,
    },
    /// The self-hosted x402 facilitator: verify and settle exact (EIP-3009) payments on one chain.
    Facilitator(facilitator::FacilitatorArgs),
    /// The keepers' transition log: `keeper status` shows a pool's payment transitions.
    Keeper {
        #[command(subcommand)]
        command: keeper_cli::KeeperCommand,
    },
    /// Sandboxed WebAssembly plugins: conformance tests, listing, inspection.
    Plugin {
        #[command(subcommand)]
        command: plugin_cli::PluginCommand,
    },
    /// Make a new secret key file and print its peer id (the public key).
    Keygen {
        /// Where to write the key (refuses to overwrite).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Download a known model and import it into a Hugging Face layout directory.
    Fetch {
        /// Model name, e.g. smollm2-135m-instruct.
        name: String,
        /// Where models live; the model goes into DIR/NAME.
        #[arg(long, default_value = "models")]
        models_dir: PathBuf,
        /// The dtype model.safetensors is written in.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Re-import even if a complete import exists.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: workers' and orchestrators' logs usually go to files, which tools
        // and tests read as text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Model { command: ModelCommand::Fetch { name, models_dir, dtype, force } } => {
            let dir = model_fetch::fetch_model(&name, &models_dir, &dtype, force)?;
            println!("{}", dir.display());
            Ok(())
        }
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Relay(args) => relay::run(args),
        Command::Orchestrator(args) => computepool_orchestrator::run(args),
        Command::Up(args) => up::run(args),
        Command::Chain { command } => chain::run(command),
        Command::Facilitator(args) => facilitator::run(args),
        Command::Keeper { command } => keeper_cli::run(command),
        Command::Plugin { command } => {
            if !plugin_cli::run(command)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Keygen { out } => {
            let key = computepool_axl::transport::SecretKey::generate();
            computepool_axl::transport::write_secret_key(&out, &key)?;
            println!("{}", key.public());
            Ok(())
        }
    }
}
