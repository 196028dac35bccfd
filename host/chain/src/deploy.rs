//! A ComputePool deployment: the Superfluid protocol, the test token (USDC stand-in) and its SuperToken
//! wrapper (USDCx), the INFT verifier and the pool INFT; recorded in a deployment file that the
//! orchestrator reads. Coalitions are per pool: `deploy_coalition` makes one when a pool is formed.

use std::path::Path;

use alloy::primitives::{Address, U256};
use alloy::sol_types::SolConstructor;
use serde::{Deserialize, Serialize};

use crate::bindings::{Coalition, ISuperTokenFactory, OracleVerifier, PoolINFT, TestUSD};
use crate::client::{Chain, ChainError};
use crate::superfluid::{SuperfluidAddresses, SuperfluidArtifacts, deploy_framework};

/// Format version of the deployment file; bumped when a field changes meaning.
pub const DEPLOYMENT_FORMAT: u32 = 1;

/// The test token's EIP-712 domain and metadata: USDC's, so x402 clients build the same messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub address: Address,
    pub name: String,
    pub symbol: String,
    /// EIP-712 domain version.
    pub version: String,
    pub decimals: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Deployment {
    pub format: u32,
    pub chain_id: u64,
    pub deployer: Address,
    pub superfluid: SuperfluidAddresses,
    /// The underlying token (TestUSD on chains without USDC).
    pub usdc: TokenInfo,
    /// Its Superfluid wrapper, the token streams are paid in.
    pub usdcx: Address,
    pub oracle_verifier: Address,
    /// The key `oracle_verifier` accepts attestations from.
    pub oracle: Address,
    pub pool_inft: Address,
}

impl Deployment {
    pub fn write(&self, path: &Path) -> Result<(), ChainError> {
        let err = |reason: String| ChainError::DeploymentFile { path: path.to_path_buf(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| err(e.to_string()))?;
        // Written beside and renamed, so a reader never sees half a file.
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n").map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }

    pub fn read(path: &Path) -> Result<Self, ChainError> {
        let err = |reason: String| ChainError::DeploymentFile { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let deployment: Self = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        if deployment.format != DEPLOYMENT_FORMAT {
            return Err(err(format!("format {} (this build reads {DEPLOYMENT_FORMAT})", deployment.format)));
        }
        Ok(deployment)
    }
}

/// What to deploy besides the protocol.
#[derive(Clone, Debug)]
pub struct DeployOptions {
    /// The key the INFT verifier trusts.
    pub oracle: Address,
    pub token_name: String,
    pub token_symbol: String,
    pub token_version: String,
}

impl DeployOptions {
    /// USDC's own name and version ("USD Coin", "2"), so EIP-3009 clients written for USDC work unchanged.
    pub fn usdc_like(oracle: Address) -> Self {
        Self { oracle, token_name: "USD Coin".into(), token_symbol: "USDC".into(), token_version: "2".into() }
    }
}

/// Deploys everything with `chain`'s signer (who becomes the owner of the token and the verifier).
pub async fn deploy_all(chain: &Chain, artifacts: &SuperfluidArtifacts, options: &DeployOptions) -> Result<Deployment, ChainError> {
    let superfluid = deploy_framework(chain, artifacts).await?;
    let owner = chain.address();

    let (usdc, _) = chain
        .deploy(
            "deploying TestUSD",
            creation_code(
                &TestUSD::BYTECODE,
                TestUSD::constructorCall {
                    name_: options.token_name.clone(),
                    symbol_: options.token_symbol.clone(),
                    version_: options.token_version.clone(),
                    owner_: owner,
                },
            ),
        )
        .await?;

    let factory = ISuperTokenFactory::new(superfluid.super_token_factory, chain.provider());
    // SEMI_UPGRADABLE (1): the wrapper's logic follows the factory's, as Superfluid's own wrappers do.
    let receipt = chain
        .send(
            "creating the USDCx wrapper",
            factory.createERC20Wrapper(usdc, 6, 1, format!("Super {}", options.token_name), format!("{}x", options.token_symbol)),
        )
        .await?;
    let usdcx = receipt
        .decoded_log::<ISuperTokenFactory::SuperTokenCreated>()
        .map(|log| log.data.token)
        .ok_or(ChainError::MissingInReceipt { what: "creating the USDCx wrapper".into(), missing: "SuperTokenCreated event" })?;

    let (oracle_verifier, _) = chain
        .deploy(
            "deploying OracleVerifier",
            creation_code(&OracleVerifier::BYTECODE, OracleVerifier::constructorCall { oracle_: options.oracle, owner_: owner }),
        )
        .await?;
    let (pool_inft, _) = chain
        .deploy(
            "deploying PoolINFT",
            creation_code(
                &PoolINFT::BYTECODE,
                PoolINFT::constructorCall { name_: "ComputePool pool".into(), symbol_: "POOL".into(), verifier_: oracle_verifier },
            ),
        )
        .await?;

    Ok(Deployment {
        format: DEPLOYMENT_FORMAT,
        chain_id: chain.chain_id(),
        deployer: owner,
        superfluid,
        usdc: TokenInfo {
            address: usdc,
            name: options.token_name.clone(),
            symbol: options.token_symbol.clone(),
            version: options.token_version.clone(),
            decimals: 6,
        },
        usdcx,
        oracle_verifier,
        oracle: options.oracle,
        pool_inft,
    })
}

/// A pool's coalition: stake in `stake_token`, at least `min_stake`, breach votes open `voting_period`
/// seconds, slashed stake to `slash_recipient`; the signer is its owner (the pool admin).
pub async fn deploy_coalition(
    chain: &Chain,
    stake_token: Address,
    min_stake: U256,
    voting_period: u64,
    slash_recipient: Address,
) -> Result<Address, ChainError> {
    let (address, _) = chain
        .deploy(
            "deploying Coalition",
            creation_code(
                &Coalition::BYTECODE,
                Coalition::constructorCall {
                    stakeToken_: stake_token,
                    minStake_: min_stake,
                    votingPeriod_: voting_period,
                    slashRecipient_: slash_recipient,
                    owner_: chain.address(),
                },
            ),
        )
        .await?;
    Ok(address)
}

/// A contract's creation code: its bytecode followed by the ABI-encoded constructor arguments.
pub fn creation_code(bytecode: &[u8], constructor: impl SolConstructor) -> Vec<u8> {
    let mut code = bytecode.to_vec();
    code.extend_from_slice(&constructor.abi_encode());
    code
}
