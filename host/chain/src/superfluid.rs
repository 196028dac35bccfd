//! Deploys the real Superfluid protocol from the compiled artifacts that npm's
//! `@superfluid-finance/ethereum-contracts` ships (`build/hardhat/**`), the way the package's own
//! `dev-scripts/deploy-test-framework.js` does, without its JS toolchain: the ERC-1820 registry from its
//! presigned transaction, 16 deployer libraries (linked where they use each other), the
//! `SuperfluidFrameworkDeployer` linked to them, then each of its deployment steps. Nothing is compiled.
//!
//! The framework deployer and several libraries exceed EIP-170's 24 KB code limit: the chain must allow
//! large contracts (anvil `--disable-code-size-limit`). Addresses follow from the deployer's address and
//! nonce: the same key on a fresh chain gets the same addresses every time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alloy::primitives::{Address, U256, address};
use alloy::providers::Provider;
use serde::{Deserialize, Serialize};

use crate::bindings::SuperfluidFrameworkDeployer;
use crate::client::{Chain, ChainError, rpc_error};

/// The package version whose artifacts (and ABIs in `bindings.rs`) this module follows.
pub const SUPERFLUID_VERSION: &str = "1.15.2";

/// The ERC-1820 registry's address on every chain (Nick's method: a presigned, chain-independent deploy).
pub const ERC1820_ADDRESS: Address = address!("0x1820a4B7618BdE71Dce8cdc73aAB6C95905faD24");
/// The one-off sender of that presigned deploy; it needs 0.08 ether for the transaction's gas.
const ERC1820_DEPLOYER: Address = address!("0xa990077c3205cbDf861e17Fa532eeB069cE9fF96");
const ERC1820_FUNDING_WEI: u128 = 80_000_000_000_000_000;
const ERC1820_TX_PREFIX: &str = "f90a388085174876e800830c35008080b909e5";
const ERC1820_TX_SUFFIX: &str = "1ba01820182018201820182018201820182018201820182018201820182018201820a01820182018201820182018201820182018201820182018201820182018201820";

const STEPS: &str = "contracts/utils/SuperfluidFrameworkDeploymentSteps.t.sol";

/// Libraries in deployment order: (artifact path under build/hardhat, contract name). Later ones link to
/// earlier ones through the artifacts' `linkReferences`.
const LIBRARIES: &[(&str, &str)] = &[
    ("contracts/libs/SlotsBitmapLibrary.sol", "SlotsBitmapLibrary"),
    (STEPS, "SuperfluidGovDeployerLibrary"),
    (STEPS, "SuperfluidHostDeployerLibrary"),
    (STEPS, "SuperfluidCFAv1DeployerLibrary"),
    (STEPS, "SuperfluidIDAv1DeployerLibrary"),
    ("contracts/agreements/gdav1/SuperfluidPoolDeployerLibrary.sol", "SuperfluidPoolDeployerLibrary"),
    (STEPS, "SuperfluidGDAv1DeployerLibrary"),
    (STEPS, "SuperTokenDeployerLibrary"),
    (STEPS, "SuperfluidPeripheryDeployerLibrary"),
    (STEPS, "SuperfluidPoolLogicDeployerLibrary"),
    (STEPS, "SuperfluidPoolNFTLogicDeployerLibrary"),
    (STEPS, "ProxyDeployerLibrary"),
    (STEPS, "CFAv1ForwarderDeployerLibrary"),
    (STEPS, "GDAv1ForwarderDeployerLibrary"),
    (STEPS, "SuperTokenFactoryDeployerLibrary"),
    (STEPS, "TokenDeployerLibrary"),
];
const FRAMEWORK_DEPLOYER: (&str, &str) =
    ("contracts/utils/SuperfluidFrameworkDeployer.t.sol", "SuperfluidFrameworkDeployer");

/// Where the protocol's addresses are recorded (the deployment file's `superfluid` section).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SuperfluidAddresses {
    pub version: String,
    pub host: Address,
    pub governance: Address,
    pub cfa: Address,
    pub ida: Address,
    pub gda: Address,
    pub super_token_factory: Address,
    pub super_token_logic: Address,
    pub resolver: Address,
    pub superfluid_loader: Address,
    pub cfa_v1_forwarder: Address,
    pub gda_v1_forwarder: Address,
    pub macro_forwarder: Address,
    pub batch_liquidator: Address,
    pub toga: Address,
    pub framework_deployer: Address,
    pub erc1820_registry: Address,
}

/// The `build/hardhat` folder of an unpacked `@superfluid-finance/ethereum-contracts`.
#[derive(Clone, Debug)]
pub struct SuperfluidArtifacts {
    package: PathBuf,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HardhatArtifact {
    bytecode: String,
    #[serde(default)]
    link_references: BTreeMap<String, BTreeMap<String, Vec<LinkReference>>>,
}

#[derive(Deserialize)]
struct LinkReference {
    start: usize,
    length: usize,
}

impl SuperfluidArtifacts {
    /// `package` is the npm package's root (holding `package.json` and `build/hardhat`).
    pub fn open(package: &Path) -> Result<Self, ChainError> {
        let manifest = package.join("package.json");
        let text = std::fs::read_to_string(&manifest)
            .map_err(|e| ChainError::Artifact(format!("{}: {e} (run scripts/contracts.sh)", manifest.display())))?;
        let version = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(str::to_owned))
            .ok_or_else(|| ChainError::Artifact(format!("{}: no version", manifest.display())))?;
        if version != SUPERFLUID_VERSION {
            return Err(ChainError::Artifact(format!(
                "{} is version {version}; ComputePool's bindings follow {SUPERFLUID_VERSION}",
                package.display()
            )));
        }
        Ok(Self { package: package.to_path_buf() })
    }

    fn read(&self, source: &str, name: &str) -> Result<HardhatArtifact, ChainError> {
        let path = self.package.join("build/hardhat").join(source).join(format!("{name}.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| ChainError::Artifact(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| ChainError::Artifact(format!("{}: {e}", path.display())))
    }

    /// The creation code of `name` with every library reference replaced by its deployed address.
    pub fn linked_bytecode(
        &self,
        source: &str,
        name: &str,
        deployed: &BTreeMap<String, Address>,
    ) -> Result<Vec<u8>, ChainError> {
        let artifact = self.read(source, name)?;
        link(&artifact.bytecode, &artifact.link_references, deployed)
            .map_err(|e| ChainError::Artifact(format!("{name}: {e}")))
    }

    fn erc1820_deploy_transaction(&self) -> Result<Vec<u8>, ChainError> {
        let path = self.package.join("dev-scripts/artifacts/ERC1820Registry.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ChainError::Artifact(format!("{}: {e}", path.display())))?;
        let bin = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("bin").and_then(|b| b.as_str()).map(str::to_owned))
            .ok_or_else(|| ChainError::Artifact(format!("{}: no bin", path.display())))?;
        hex::decode(format!("{ERC1820_TX_PREFIX}{bin}{ERC1820_TX_SUFFIX}"))
            .map_err(|e| ChainError::Artifact(format!("ERC-1820 transaction: {e}")))
    }
}

/// Replaces each 20-byte placeholder at the artifact's link offsets with the library's address.
fn link(
    bytecode: &str,
    references: &BTreeMap<String, BTreeMap<String, Vec<LinkReference>>>,
    deployed: &BTreeMap<String, Address>,
) -> Result<Vec<u8>, String> {
    let mut code = bytecode.strip_prefix("0x").unwrap_or(bytecode).to_string();
    for libraries in references.values() {
        for (library, places) in libraries {
            let address = deployed.get(library).ok_or_else(|| format!("library {library} is not deployed yet"))?;
            let hex_address = hex::encode(address.as_slice());
            for place in places {
                if place.length != 20 {
                    return Err(format!("link reference for {library} is {} bytes, not 20", place.length));
                }
                let range = place.start * 2..(place.start + 20) * 2;
                if range.end > code.len() {
                    return Err(format!("link reference for {library} lies past the bytecode's end"));
                }
                code.replace_range(range, &hex_address);
            }
        }
    }
    hex::decode(&code).map_err(|e| format!("bytecode after linking: {e} (a library reference without a link entry?)"))
}

/// Deploys the whole framework with `chain`'s signer and returns its addresses.
pub async fn deploy_framework(chain: &Chain, artifacts: &SuperfluidArtifacts) -> Result<SuperfluidAddresses, ChainError> {
    deploy_erc1820(chain, artifacts).await?;
    let mut deployed = BTreeMap::new();
    for (source, name) in LIBRARIES {
        let code = artifacts.linked_bytecode(source, name, &deployed)?;
        let (address, _) = chain.deploy(&format!("deploying Superfluid's {name}"), code).await?;
        tracing::info!(%address, "{name}");
        deployed.insert((*name).to_string(), address);
    }
    let (source, name) = FRAMEWORK_DEPLOYER;
    let code = artifacts.linked_bytecode(source, name, &deployed)?;
    let (deployer_address, _) = chain.deploy("deploying SuperfluidFrameworkDeployer", code).await?;
    let deployer = SuperfluidFrameworkDeployer::new(deployer_address, chain.provider());
    let steps = deployer.getNumSteps().call().await.map_err(|e| rpc_error("SuperfluidFrameworkDeployer.getNumSteps", e))?;
    for step in 0..steps {
        chain.send(&format!("Superfluid deployment step {step} of {steps}"), deployer.executeStep(step)).await?;
    }
    let sf = deployer.getFramework().call().await.map_err(|e| rpc_error("SuperfluidFrameworkDeployer.getFramework", e))?;
    Ok(SuperfluidAddresses {
        version: SUPERFLUID_VERSION.to_string(),
        host: sf.host,
        governance: sf.governance,
        cfa: sf.cfa,
        ida: sf.ida,
        gda: sf.gda,
        super_token_factory: sf.superTokenFactory,
        super_token_logic: sf.superTokenLogic,
        resolver: sf.resolver,
        superfluid_loader: sf.superfluidLoader,
        cfa_v1_forwarder: sf.cfaV1Forwarder,
        gda_v1_forwarder: sf.gdaV1Forwarder,
        macro_forwarder: sf.macroForwarder,
        batch_liquidator: sf.batchLiquidator,
        toga: sf.toga,
        framework_deployer: deployer_address,
        erc1820_registry: ERC1820_ADDRESS,
    })
}

/// The ERC-1820 registry, unless the chain has it. Its funding is mined before the presigned deploy is
/// sent: sending both at once failed about one run in eight with "insufficient funds".
async fn deploy_erc1820(chain: &Chain, artifacts: &SuperfluidArtifacts) -> Result<(), ChainError> {
    let code = chain.provider().get_code_at(ERC1820_ADDRESS).await.map_err(|e| rpc_error("eth_getCode", e))?;
    if !code.is_empty() {
        tracing::info!("ERC-1820 registry already deployed");
        return Ok(());
    }
    let balance = chain.provider().get_balance(ERC1820_DEPLOYER).await.map_err(|e| rpc_error("eth_getBalance", e))?;
    let needed = U256::from(ERC1820_FUNDING_WEI);
    if balance < needed {
        chain.send_value(ERC1820_DEPLOYER, needed - balance).await?;
    }
    let raw = artifacts.erc1820_deploy_transaction()?;
    let pending = chain
        .provider()
        .send_raw_transaction(&raw)
        .await
        .map_err(|e| rpc_error("sending the ERC-1820 registry's presigned deploy (the node must accept pre-EIP-155 transactions)", e))?;
    let receipt = pending.get_receipt().await.map_err(|e| rpc_error("waiting for the ERC-1820 deploy", e))?;
    if !receipt.status() {
        return Err(ChainError::Failed { what: "deploying the ERC-1820 registry".into(), tx_hash: receipt.transaction_hash });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_replaces_placeholders_at_their_offsets() {
        let placeholder = "__$0123456789abcdef0123456789abcdef01$__";
        assert_eq!(placeholder.len(), 40);
        let code = format!("0x6000{placeholder}60{placeholder}");
        let mut refs = BTreeMap::new();
        refs.insert(
            "x.sol".to_string(),
            BTreeMap::from([("Lib".to_string(), vec![LinkReference { start: 2, length: 20 }, LinkReference { start: 23, length: 20 }])]),
        );
        let lib = Address::repeat_byte(0xab);
        let linked = link(&code, &refs, &BTreeMap::from([("Lib".to_string(), lib)])).unwrap();
        assert_eq!(linked.len(), 43);
        assert_eq!(&linked[2..22], lib.as_slice());
        assert_eq!(&linked[23..43], lib.as_slice());
        let missing = link(&code, &refs, &BTreeMap::new()).unwrap_err();
        assert!(missing.contains("Lib"), "{missing}");
        // A placeholder with no link entry cannot be decoded: an error, not a silently broken contract.
        assert!(link(&code, &BTreeMap::new(), &BTreeMap::new()).is_err());
    }
}
