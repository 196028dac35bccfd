//! `computepool-plugin`: the conformance kit and plugin inspection from the command line.
//!
//!     computepool-plugin test PLUGIN_DIR [--config operator.toml] [--suites DIR]
//!     computepool-plugin inspect PLUGIN_DIR [--config operator.toml]
//!
//! `test` loads the plugin with the production settings (the operator's config, or the defaults), runs its
//! kind's suite for the WIT version it implements, then the plugin's own `conformance/` cases, and exits
//! non-zero on any refusal or failure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use computepool_plugin_host::conformance::run_sampler_suite;
use computepool_plugin_host::{HostConfig, PluginHost};

#[derive(Parser)]
#[command(name = "computepool-plugin", about = "ComputePool plugin conformance kit")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load a plugin and run its kind's conformance suite and its own cases.
    Test {
        plugin_dir: PathBuf,
        /// The operator's plugin config (TOML); default: the host's defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Folder of kind suites (`<kind>/<version>/<case>/case.toml`). Default: the suites in the source tree.
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance"))]
        suites: PathBuf,
    },
    /// Load a plugin and print what it is, what it imports and its limits.
    Inspect {
        plugin_dir: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn host(config: Option<&PathBuf>) -> Result<PluginHost> {
    let config = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            HostConfig::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => HostConfig::default(),
    };
    Ok(PluginHost::new(config)?)
}

fn run() -> Result<bool> {
    match Cli::parse().command {
        Command::Test { plugin_dir, config, suites } => {
            let host = host(config.as_ref())?;
            let plugin = host.load_plugin(&plugin_dir)?;
            let manifest = &plugin.manifest;
            let Some(sampler) = plugin.as_sampler() else {
                bail!("plugin `{}` is a {}; this kit has suites for samplers only so far", manifest.id, manifest.kind);
            };
            let mut suites_run = vec![suites.join(manifest.kind.to_string()).join(manifest.wit.version.to_string())];
            let own = plugin_dir.join("conformance");
            if own.is_dir() {
                suites_run.push(own);
            }
            let mut passed = true;
            for suite in suites_run {
                let report = run_sampler_suite(sampler, &suite);
                println!("{}:", suite.display());
                for case in &report.cases {
                    match &case.failure {
                        None => println!("  ok    {}", case.name),
                        Some(why) => println!("  FAIL  {}: {why}", case.name),
                    }
                }
                passed &= report.passed();
            }
            println!("{}: {}", manifest.id, if passed { "conforms" } else { "does NOT conform" });
            Ok(passed)
        }
        Command::Inspect { plugin_dir, config } => {
            let host = host(config.as_ref())?;
            let plugin = host.load_plugin(&plugin_dir)?;
            let m = &plugin.manifest;
            println!("id:           {}", m.id);
            println!("version:      {}", m.version);
            println!("kind:         {}", m.kind);
            println!("world:        {}@{}", m.wit.world, m.wit.version);
            println!("wasm:         {} (sha256 {})", m.wasm.file, m.wasm.sha256);
            let caps: Vec<&str> = m.capabilities.iter().map(|c| c.name()).collect();
            println!("capabilities: {}", if caps.is_empty() { "none".to_string() } else { caps.join(", ") });
            println!("limits:       {} fuel per call, {} bytes of memory, on failure {:?}", m.limits.fuel_per_call, m.limits.memory_bytes, m.limits.failure_policy);
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
