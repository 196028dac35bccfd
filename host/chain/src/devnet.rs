//! The local devnet: anvil from the npm toolchain (`scripts/contracts.sh`), started with chain id 16602
//! (0G Galileo's, so the same deployment file shape serves both) and no contract size limit (Superfluid's
//! framework deployer exceeds 24 KB). The process is killed when its `Anvil` is dropped.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::signers::local::PrivateKeySigner;
use serde::Deserialize;

use crate::client::{ChainError, parse_key};
use crate::superfluid::SuperfluidArtifacts;

/// 0G Galileo's chain id, used by the devnet too.
pub const DEVNET_CHAIN_ID: u64 = 16602;

/// The folder `scripts/contracts.sh` prints: forge, anvil, solc-js, OpenZeppelin and the Superfluid package.
#[derive(Clone, Debug)]
pub struct ChainTools {
    root: PathBuf,
}

impl ChainTools {
    /// `COMPUTEPOOL_CHAIN_TOOLS` if set; otherwise runs `scripts/contracts.sh` from `repo` (which installs
    /// the toolchain on first use).
    pub fn locate(repo: Option<&Path>) -> Result<Self, ChainError> {
        if let Some(dir) = std::env::var_os("COMPUTEPOOL_CHAIN_TOOLS") {
            return Self::at(PathBuf::from(dir));
        }
        let Some(repo) = repo else {
            return Err(ChainError::Anvil(
                "the chain toolchain (anvil, Superfluid's artifacts) was not found: run from the repository root, \
                 or set COMPUTEPOOL_CHAIN_TOOLS=$(bash scripts/contracts.sh)"
                    .into(),
            ));
        };
        let script = repo.join("scripts/contracts.sh");
        let output = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .map_err(|e| ChainError::Anvil(format!("running {}: {e}", script.display())))?;
        if !output.status.success() {
            return Err(ChainError::Anvil(format!("{} failed ({}): npm and the npm registry are needed", script.display(), output.status)));
        }
        Self::at(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
    }

    /// For a test: the toolchain, or `None` (the test skips, saying why) when it is not installed —
    /// unless `COMPUTEPOOL_REQUIRE_ANVIL=1` (as `make test` sets), where its absence is a failure.
    /// `repo` is the repository root.
    pub fn for_tests(repo: &Path) -> Option<Self> {
        let required = std::env::var("COMPUTEPOOL_REQUIRE_ANVIL").is_ok_and(|v| v == "1");
        match Self::locate(Some(repo)) {
            Ok(tools) => Some(tools),
            Err(e) if required => panic!("COMPUTEPOOL_REQUIRE_ANVIL=1, but anvil is not available: {e}"),
            Err(e) => {
                eprintln!("skipping: anvil is not available ({e}); `make test` installs it");
                None
            }
        }
    }

    pub fn at(root: PathBuf) -> Result<Self, ChainError> {
        let tools = Self { root };
        if !tools.anvil().is_file() {
            return Err(ChainError::Anvil(format!("no anvil at {} (re-run scripts/contracts.sh)", tools.anvil().display())));
        }
        Ok(tools)
    }

    pub fn anvil(&self) -> PathBuf {
        self.root.join("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
    }

    pub fn superfluid(&self) -> Result<SuperfluidArtifacts, ChainError> {
        SuperfluidArtifacts::open(&self.root.join("node_modules/@superfluid-finance/ethereum-contracts"))
    }
}

/// A running anvil.
#[derive(Debug)]
pub struct Anvil {
    child: Child,
    rpc_url: String,
    keys: Vec<PrivateKeySigner>,
    _config_dir: tempfile::TempDir,
}

#[derive(Deserialize)]
struct AnvilConfig {
    private_keys: Vec<String>,
}

impl Anvil {
    /// Starts anvil on 127.0.0.1:`port` (0: a free port, picked by anvil itself) and waits until it
    /// listens. The address comes from anvil's own "Listening on" line, not from probing the port: a probe
    /// can reach another anvil that took the port first (parallel tests did exactly that).
    pub fn spawn(tools: &ChainTools, port: u16, chain_id: u64) -> Result<Self, ChainError> {
        let config_dir = tempfile::tempdir().map_err(|e| ChainError::Anvil(format!("temporary folder: {e}")))?;
        let config_path = config_dir.path().join("anvil.json");
        let mut command = Command::new(tools.anvil());
        command
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--chain-id", &chain_id.to_string()])
            .arg("--disable-code-size-limit")
            .arg("--config-out")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Tied: a killed test or `computepool up` must not leave a chain running behind it.
        let mut child = computepool_process::spawn_tied(command)
            .map_err(|e| ChainError::Anvil(format!("starting {}: {e}", tools.anvil().display())))?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut anvil = Self { child, rpc_url: String::new(), keys: Vec::new(), _config_dir: config_dir };
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads anvil's log for as long as it runs (a full pipe would stall it), passing on the address.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("Listening on ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let status = anvil.child.try_wait().ok().flatten();
                return Err(ChainError::Anvil(match status {
                    Some(status) => format!("exited at start ({status}); is port {port} taken?"),
                    None => "did not start listening within 30 s".to_string(),
                }));
            }
        };
        anvil.rpc_url = format!("http://{addr}");
        anvil.read_keys(&config_path)?;
        Ok(anvil)
    }

    fn read_keys(&mut self, config_path: &Path) -> Result<(), ChainError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // anvil writes its config (with the funded keys) as it starts listening.
            if let Ok(text) = std::fs::read_to_string(config_path)
                && let Ok(config) = serde_json::from_str::<AnvilConfig>(&text)
            {
                self.keys = config
                    .private_keys
                    .iter()
                    .map(|k| parse_key(k, "anvil's config"))
                    .collect::<Result<_, _>>()?;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ChainError::Anvil(format!("no funded keys in {} after 30 s", config_path.display())));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn rpc_url(&self) -> &str {
        &self.rpc_url
    }

    /// anvil's funded accounts (10 000 ether each); the first deploys.
    pub fn keys(&self) -> &[PrivateKeySigner] {
        &self.keys
    }

    /// anvil's exit status if it has exited (e.g. on a Ctrl-C, which reaches it too).
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>, ChainError> {
        self.child.try_wait().map_err(|e| ChainError::Anvil(e.to_string()))
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// anvil's time travel: the next block is mined at exactly `timestamp`.
pub async fn mine_at(chain: &crate::Chain, timestamp: u64) -> Result<(), ChainError> {
    use alloy::providers::Provider;
    let provider = chain.provider();
    provider
        .raw_request::<_, serde_json::Value>("evm_setNextBlockTimestamp".into(), (timestamp,))
        .await
        .map_err(|e| crate::client::rpc_error("evm_setNextBlockTimestamp", e))?;
    provider
        .raw_request::<_, serde_json::Value>("evm_mine".into(), ())
        .await
        .map_err(|e| crate::client::rpc_error("evm_mine", e))?;
    Ok(())
}
