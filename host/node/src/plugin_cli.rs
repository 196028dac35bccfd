//! `computepool plugin test|list|inspect`: the conformance kit and plugin inspection, with the production
//! host (`computepool_plugin_host`) and the operator's config when given.
//!
//! `test` exits non-zero when the plugin is refused or any case fails; `list` prints every plugin folder
//! under a directory, loaded or refused (and why); `inspect` prints one plugin's manifest as the host
//! checked it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use computepool_plugin_host::conformance::{KIND_SUITES_DIR, test_plugin};
use computepool_plugin_host::{HostConfig, LoadedPlugin, PluginHost};

#[derive(Subcommand, Debug)]
pub enum PluginCommand {
    /// Load a plugin with the production settings and run its kind's conformance suite and its own
    /// `conformance/` cases; exits non-zero on any refusal or failure.
    Test {
        /// The plugin's folder (holding plugin.toml).
        path: PathBuf,
        /// The operator's plugin config (TOML); default: the host's defaults.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Folder of kind suites (`<kind>/<version>/<case>/case.toml`). Default: the suites of the source
        /// tree this binary was built from.
        #[arg(long, default_value = KIND_SUITES_DIR)]
        suites: PathBuf,
    },
    /// List the plugins under a folder: loaded ones with their kind and version, refused ones with why.
    List {
        /// Default: `plugins`.
        #[arg(default_value = "plugins")]
        dir: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Per-token cost of the greedy and top-p plugins against native sampling, beside a decode step.
    Bench(crate::sampler_bench::SamplerBenchArgs),
    /// Load one plugin and print its manifest, capabilities and limits.
    Inspect {
        path: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn host(config: Option<&Path>) -> anyhow::Result<PluginHost> {
    let config = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            HostConfig::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => HostConfig::default(),
    };
    Ok(PluginHost::new(config)?)
}

/// Runs the command; `Ok(false)` when a test failed (the caller exits non-zero).
pub fn run(command: PluginCommand) -> anyhow::Result<bool> {
    match command {
        PluginCommand::Test { path, config, suites } => {
            let host = host(config.as_deref())?;
            let report = test_plugin(&host, &path, &suites).with_context(|| format!("plugin {}", path.display()))?;
            for (folder, suite) in &report.suites {
                println!("{}:", folder.display());
                for case in &suite.cases {
                    match &case.failure {
                        None => println!("  ok    {}", case.name),
                        Some(why) => println!("  FAIL  {}: {why}", case.name),
                    }
                }
            }
            let passed = report.passed();
            println!("{}: {}", report.id, if passed { "conforms" } else { "does NOT conform" });
            Ok(passed)
        }
        PluginCommand::List { dir, config } => {
            let host = host(config.as_deref())?;
            anyhow::ensure!(dir.is_dir(), "{}: not a folder", dir.display());
            let report = host.load_dir(&dir);
            for plugin in host.plugins() {
                println!("{}", summary(&plugin));
            }
            for refusal in &report.refused {
                println!("refused  {}: {}", refusal.dir.display(), refusal.error);
            }
            Ok(true)
        }
        PluginCommand::Bench(args) => crate::sampler_bench::run(args).map(|()| true),
        PluginCommand::Inspect { path, config } => {
            let host = host(config.as_deref())?;
            let plugin = host.load_plugin(&path).with_context(|| format!("plugin {}", path.display()))?;
            let m = &plugin.manifest;
            println!("id:           {}", m.id);
            println!("version:      {}", m.version);
            println!("kind:         {}", m.kind);
            println!("world:        {}@{}", m.wit.world, m.wit.version);
            println!("wasm:         {} (sha256 {})", m.wasm.file, m.wasm.sha256);
            let caps: Vec<&str> = m.capabilities.iter().map(|c| c.name()).collect();
            println!("capabilities: {}", if caps.is_empty() { "none".to_string() } else { caps.join(", ") });
            println!(
                "limits:       {} fuel per call, {} bytes of memory, on failure {:?}",
                m.limits.fuel_per_call, m.limits.memory_bytes, m.limits.failure_policy
            );
            Ok(true)
        }
    }
}

fn summary(plugin: &LoadedPlugin) -> String {
    let m = &plugin.manifest;
    format!("loaded   {:<24} {:<8} {:<10} {}@{}  {}", m.id, m.version, m.kind.to_string(), m.wit.world, m.wit.version, plugin.dir.display())
}
