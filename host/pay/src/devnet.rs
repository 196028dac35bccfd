//! A paid pool's chain, ready on a local anvil: Superfluid and the test USDC deployed, a GDA pool its
//! operators are connected to, an orchestrator key holding USDCx to stream from, funded payers, the pool's
//! Coalition with every operator staked in it, and the facilitator serving on loopback. `computepool up
//! --payments on` and the payment tests start from it.
//!
//! The Coalition's voting, on chain and off: breaches are judged off chain by the coalition-voter plugins,
//! whose ed25519 ballots the orchestrator tallies k of n (host/keeper's `coalition`); only a quorum
//! triggers the `handle-breach` workflow. On chain, the orchestrator's key — the key the keeper sends
//! with — is the Coalition's one registered voter and the threshold is 1, so its `proposeBreach` (which
//! counts as its vote) slashes in the same transaction. The voters' ballot keys are ed25519 and hold no
//! funds, so they cannot vote on chain themselves; registering them as on-chain voters with a threshold of
//! k would need k funded secp256k1 accounts and k transactions per breach and add no check the signed
//! ballots (kept with the breach, their sha256 as the proposal's evidence) do not already give.
//!
//! Every key here is one of anvil's public development keys: never use them for real funds.

use std::sync::Arc;

use computepool_chain::alloy::primitives::{Address, B256, U256};
use computepool_chain::alloy::signers::local::PrivateKeySigner;
use computepool_chain::bindings::{Coalition, ISuperToken, TestUSD};
use computepool_chain::{Anvil, Chain, ChainTools, DEVNET_CHAIN_ID, DeployOptions, Deployment, Gda, deploy_all, deploy_coalition};

use crate::facilitator::{Facilitator, FacilitatorConfig, router};

/// What to fund.
#[derive(Debug, Clone)]
pub struct PaidDevnetOptions {
    /// Operators (GDA pool members, connected so their balances rise in real time). Default 2.
    pub operators: usize,
    /// Payers funded with test USDC. Default 2.
    pub payers: usize,
    /// Whole USDC minted to each payer. Default 1000.
    pub usdc_per_payer: u64,
    /// Whole USDC the orchestrator upgrades to USDCx to stream from (its deposits are the rate × 4 h
    /// liquidation period of each flow). Default 100 000.
    pub treasury_usdc: u64,
    /// Whole USDC each operator stakes in the pool's Coalition (minted to it first). Default 100; the
    /// Coalition's minimum stake is a tenth of it.
    pub operator_stake_usdc: u64,
    /// Each operator's peer id (its worker's ed25519 public key) as it joins the Coalition, in the order of
    /// `operators`. Missing ones join with zero: not yet bound to a worker key.
    pub operator_peer_ids: Vec<B256>,
}

impl Default for PaidDevnetOptions {
    fn default() -> Self {
        Self { operators: 2, payers: 2, usdc_per_payer: 1000, treasury_usdc: 100_000, operator_stake_usdc: 100, operator_peer_ids: Vec::new() }
    }
}

/// How long a breach vote stays open on the devnet's Coalition (one day). With the threshold at 1 it is
/// settled by the proposal itself; the period only bounds a proposal that could not slash.
pub const COALITION_VOTING_PERIOD_S: u64 = 86_400;

/// A running paid devnet. Dropping it stops anvil and the facilitator.
pub struct PaidDevnet {
    pub anvil: Anvil,
    pub deployment: Deployment,
    /// The GDA pool the operators are members of (administered by, and distributed to from, the
    /// orchestrator's key).
    pub gda_pool: Address,
    /// The pool's Coalition: stake in test USDC, every operator joined with `operator_stake_usdc`, the
    /// orchestrator's key its owner, its one voter (threshold 1: module docs) and its slash recipient.
    pub coalition: Address,
    /// The orchestrator's key: GDA pool admin and distributor, x402 `payTo`, signer of the rails'
    /// transactions.
    pub orchestrator: PrivateKeySigner,
    /// The facilitator's key (it pays the settlement gas).
    pub facilitator_key: PrivateKeySigner,
    pub operators: Vec<PrivateKeySigner>,
    pub payers: Vec<PrivateKeySigner>,
    /// `http://127.0.0.1:PORT`.
    pub facilitator_url: String,
    facilitator: tokio::task::JoinHandle<()>,
}

impl Drop for PaidDevnet {
    fn drop(&mut self) {
        self.facilitator.abort();
    }
}

/// USDC's 6 decimals in atomic units.
pub fn usdc(whole: u64) -> U256 {
    U256::from(whole) * U256::from(1_000_000u64)
}

impl PaidDevnet {
    /// Starts anvil (chain id 16602, a free port), deploys everything, funds and connects, and serves the
    /// facilitator on a loopback port from the current tokio runtime.
    pub async fn start(tools: &ChainTools, options: &PaidDevnetOptions) -> anyhow::Result<Self> {
        let anvil = Anvil::spawn(tools, 0, DEVNET_CHAIN_ID)?;
        let keys = anvil.keys().to_vec();
        // [0] orchestrator, [1] facilitator, operators, payers; the last key is the INFT oracle.
        let needed = 2 + options.operators + options.payers + 1;
        if keys.len() < needed {
            anyhow::bail!("anvil funds {} accounts, {needed} are needed", keys.len());
        }
        let url = anvil.rpc_url().to_string();
        let orchestrator = keys[0].clone();
        let facilitator_key = keys[1].clone();
        let operators = keys[2..2 + options.operators].to_vec();
        let payers = keys[2 + options.operators..2 + options.operators + options.payers].to_vec();
        let oracle = keys[keys.len() - 1].address();

        let chain = Chain::connect(&url, Some(DEVNET_CHAIN_ID), orchestrator.clone()).await?;
        let artifacts = tools.superfluid()?;
        let deployment = deploy_all(&chain, &artifacts, &DeployOptions::usdc_like(oracle)).await?;
        let token = TestUSD::new(deployment.usdc.address, chain.provider());
        for payer in &payers {
            chain.send("minting a payer's test USDC", token.mint(payer.address(), usdc(options.usdc_per_payer))).await?;
        }
        chain.send("minting the treasury's test USDC", token.mint(chain.address(), usdc(options.treasury_usdc))).await?;
        chain.send("approving USDCx", token.approve(deployment.usdcx, U256::MAX)).await?;
        // USDCx has 18 decimals: upgrading n whole tokens takes n × 10^18.
        let whole_x = U256::from(options.treasury_usdc) * U256::from(10u64).pow(U256::from(18));
        chain.send("upgrading USDC to USDCx", ISuperToken::new(deployment.usdcx, chain.provider()).upgrade(whole_x)).await?;
        let gda = Gda::new(&chain, &deployment.superfluid);
        let (gda_pool, _) = gda.create_pool(deployment.usdcx, chain.address(), false).await?;
        for operator in &operators {
            let member = Chain::connect(&url, Some(DEVNET_CHAIN_ID), operator.clone()).await?;
            Gda::new(&member, &deployment.superfluid).connect_pool(gda_pool).await?;
        }
        let coalition = Self::form_coalition(&chain, &url, &deployment, &operators, options).await?;

        let settler = Chain::connect(&url, Some(DEVNET_CHAIN_ID), facilitator_key.clone()).await?;
        let config = FacilitatorConfig { tokens: Some(vec![deployment.usdc.address]), ..FacilitatorConfig::default() };
        let facilitator = Arc::new(Facilitator::new(settler, config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let facilitator = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router(facilitator)).await {
                tracing::error!("the devnet facilitator stopped: {e}");
            }
        });
        Ok(Self {
            anvil,
            deployment,
            gda_pool,
            coalition,
            orchestrator,
            facilitator_key,
            operators,
            payers,
            facilitator_url: format!("http://{addr}"),
            facilitator,
        })
    }

    /// Deploys the pool's Coalition, registers the orchestrator as its voter with threshold 1, and has
    /// every operator stake and join.
    async fn form_coalition(
        chain: &Chain,
        url: &str,
        deployment: &Deployment,
        operators: &[PrivateKeySigner],
        options: &PaidDevnetOptions,
    ) -> anyhow::Result<Address> {
        let stake = usdc(options.operator_stake_usdc);
        let min_stake = stake / U256::from(10u64);
        let address = deploy_coalition(chain, deployment.usdc.address, min_stake, COALITION_VOTING_PERIOD_S, chain.address()).await?;
        let coalition = Coalition::new(address, chain.provider());
        chain.send("registering the orchestrator as the coalition's voter", coalition.addVoter(chain.address())).await?;
        chain.send("setting the coalition's threshold to 1", coalition.setThreshold(1)).await?;
        let token = TestUSD::new(deployment.usdc.address, chain.provider());
        for (i, operator) in operators.iter().enumerate() {
            chain.send("minting an operator's stake", token.mint(operator.address(), stake)).await?;
            let member = Chain::connect(url, Some(DEVNET_CHAIN_ID), operator.clone()).await?;
            let peer_id = options.operator_peer_ids.get(i).copied().unwrap_or(B256::ZERO);
            member.send("approving the coalition stake", TestUSD::new(deployment.usdc.address, member.provider()).approve(address, stake)).await?;
            member.send("joining the coalition", Coalition::new(address, member.provider()).join(peer_id, 1, stake)).await?;
        }
        Ok(address)
    }

    pub fn rpc_url(&self) -> &str {
        self.anvil.rpc_url()
    }

    /// The contracts the keeper's workflows name (keeperhub/workflows: `contracts.gdaV1Forwarder`,
    /// `contracts.coalition`, `contracts.poolInft`), as the `contracts` of its deployment context.
    pub fn keeper_contracts(&self) -> serde_json::Value {
        serde_json::json!({
            "gdaV1Forwarder": format!("{:#x}", self.deployment.superfluid.gda_v1_forwarder),
            "coalition": format!("{:#x}", self.coalition),
            "poolInft": format!("{:#x}", self.deployment.pool_inft),
        })
    }

    /// The operator's plugin grants for this devnet (TOML for `--rail-config`): x402-exact may reach the
    /// facilitator, superfluid-gda may send to the GDA forwarder, ledger keeps its kv-store; and, given a
    /// keeper's plugin id, that keeper its kv-store (run records) and the three contracts its workflows
    /// call (see [`PaidDevnet::keeper_contracts`]).
    pub fn rail_config(&self, keeper: Option<&str>) -> String {
        let facilitator = self.facilitator_url.trim_start_matches("http://");
        let forwarder = format!("{:#x}", self.deployment.superfluid.gda_v1_forwarder);
        let mut plugins = String::from("x402-exact = [\"http\", \"kv-store\"]\nsuperfluid-gda = [\"chain\"]\nledger = [\"kv-store\"]\n");
        let mut chain = format!("superfluid-gda = [\"{forwarder}\"]\n");
        if let Some(keeper) = keeper {
            plugins.push_str(&format!("{keeper} = [\"chain\", \"kv-store\"]\n"));
            chain.push_str(&format!(
                "{keeper} = [\"{forwarder}\", \"{:#x}\", \"{:#x}\"]\n",
                self.coalition, self.deployment.pool_inft
            ));
        }
        format!("[grants.plugins]\n{plugins}[grants.http]\nx402-exact = [\"{facilitator}\"]\n[grants.chain]\n{chain}")
    }

    /// A pool's payment settings on this devnet (the orchestrator's `PUT /pools/{id}/payments` body):
    /// vouchers in USDC through x402-exact, operators paid in USDCx through superfluid-gda.
    /// `price_per_second` is in USDC's atomic units (6 decimals); the flow pays 10^12 USDCx wei for each.
    pub fn pool_payments(&self, price_per_second: u128, max_seconds_per_request: u32) -> serde_json::Value {
        serde_json::json!({
            "price_per_second": price_per_second.to_string(),
            "max_seconds_per_request": max_seconds_per_request,
            "challenge": {"plugin": "x402-exact", "config": {
                "facilitator": self.facilitator_url,
                "network": crate::x402::eip155_network(DEVNET_CHAIN_ID),
                "asset": format!("{:#x}", self.deployment.usdc.address),
                "payTo": format!("{:#x}", self.orchestrator.address()),
                "name": self.deployment.usdc.name,
                "version": self.deployment.usdc.version,
                "maxTimeoutSeconds": 300,
            }},
            "flow": {
                "plugin": "superfluid-gda",
                "config": {"forwarder": format!("{:#x}", self.deployment.superfluid.gda_v1_forwarder),
                           "token": format!("{:#x}", self.deployment.usdcx)},
                "target": format!("{:#x}", self.gda_pool),
                "token": format!("{:#x}", self.deployment.usdcx),
                "scale": "1000000000000",
            },
        })
    }
}

/// The address of a devnet key, 0x-hex.
pub fn address_of(key: &PrivateKeySigner) -> String {
    format!("{:#x}", key.address())
}
