//! Superfluid GDA pools on chain, through the `GDAv1Forwarder`: create a pool, set members' units,
//! connect, distribute a flow, and read back rates, deposits, balances and the token's solvency rules.

use alloy::primitives::aliases::I96;
use alloy::primitives::{Address, B256, Bytes, U256, keccak256};
use alloy::rpc::types::TransactionReceipt;

use crate::bindings::{
    IGDAv1Forwarder, IGeneralDistributionAgreementV1, ISuperToken, ISuperfluid, ISuperfluidGovernance, ISuperfluidPool,
};
use crate::client::{Chain, ChainError, rpc_error};
use crate::gda::SolvencyRules;
use crate::superfluid::SuperfluidAddresses;

/// `keccak256("org.superfluid-finance.agreements.ConstantFlowAgreement.v1.PPPConfiguration")`: the
/// liquidation and patrician periods, which the GDA reads too.
fn ppp_config_key() -> B256 {
    keccak256("org.superfluid-finance.agreements.ConstantFlowAgreement.v1.PPPConfiguration")
}

fn minimum_deposit_key() -> B256 {
    keccak256("org.superfluid-finance.superfluid.superTokenMinimumDeposit")
}

/// GDA operations signed by one `Chain`.
#[derive(Clone, Debug)]
pub struct Gda<'a> {
    chain: &'a Chain,
    host: Address,
    gda: Address,
    forwarder: Address,
}

fn to_i96(rate: i128, what: &str) -> Result<I96, ChainError> {
    I96::try_from(rate).map_err(|_| ChainError::Contract { what: what.into(), message: format!("flow rate {rate} does not fit in int96") })
}

fn from_i96(rate: I96) -> i128 {
    // Every int96 fits in an i128.
    i128::try_from(rate).expect("an int96 fits in i128")
}

impl<'a> Gda<'a> {
    pub fn new(chain: &'a Chain, superfluid: &SuperfluidAddresses) -> Self {
        Self { chain, host: superfluid.host, gda: superfluid.gda, forwarder: superfluid.gda_v1_forwarder }
    }

    fn forwarder(&self) -> IGDAv1Forwarder::IGDAv1ForwarderInstance<&alloy::providers::DynProvider> {
        IGDAv1Forwarder::new(self.forwarder, self.chain.provider())
    }

    /// Creates a pool of `token` administered by `admin`; returns its address (from the GDA's
    /// `PoolCreated` event). `distribution_from_any_address` lets others than the admin distribute.
    pub async fn create_pool(
        &self,
        token: Address,
        admin: Address,
        distribution_from_any_address: bool,
    ) -> Result<(Address, TransactionReceipt), ChainError> {
        let config = IGDAv1Forwarder::PoolConfig { transferabilityForUnitsOwner: false, distributionFromAnyAddress: distribution_from_any_address };
        let receipt = self.chain.send("creating a GDA pool", self.forwarder().createPool(token, admin, config)).await?;
        let pool = receipt
            .decoded_log::<IGeneralDistributionAgreementV1::PoolCreated>()
            .map(|log| log.data.pool)
            .ok_or(ChainError::MissingInReceipt { what: "creating a GDA pool".into(), missing: "PoolCreated event" })?;
        Ok((pool, receipt))
    }

    /// Sets `member`'s units (the signer must be the pool's admin).
    pub async fn update_member_units(&self, pool: Address, member: Address, units: u128) -> Result<TransactionReceipt, ChainError> {
        self.chain
            .send(&format!("setting {member}'s units to {units}"), self.forwarder().updateMemberUnits(pool, member, units, Bytes::new()))
            .await
    }

    /// Connects the signer to `pool`, so its share reaches its balance in real time.
    pub async fn connect_pool(&self, pool: Address) -> Result<TransactionReceipt, ChainError> {
        self.chain.send("connecting to a GDA pool", self.forwarder().connectPool(pool, Bytes::new())).await
    }

    /// Distributes `requested` wei/s of `token` from the signer to `pool` (0 stops the flow).
    pub async fn distribute_flow(&self, token: Address, pool: Address, requested: i128) -> Result<TransactionReceipt, ChainError> {
        let what = format!("distributing {requested} wei/s to pool {pool}");
        let rate = to_i96(requested, &what)?;
        self.chain.send(&what, self.forwarder().distributeFlow(token, self.chain.address(), pool, rate, Bytes::new())).await
    }

    /// The distributor's actual flow rate into `pool`.
    pub async fn flow_rate(&self, token: Address, from: Address, pool: Address) -> Result<i128, ChainError> {
        let r = self.forwarder().getFlowDistributionFlowRate(token, from, pool).call().await.map_err(|e| rpc_error("getFlowDistributionFlowRate", e))?;
        Ok(from_i96(r))
    }

    pub async fn adjustment_flow_rate(&self, pool: Address) -> Result<i128, ChainError> {
        let r = self.forwarder().getPoolAdjustmentFlowRate(pool).call().await.map_err(|e| rpc_error("getPoolAdjustmentFlowRate", e))?;
        Ok(from_i96(r))
    }

    /// The deposit the distribution flow `from` → `pool` holds.
    pub async fn flow_deposit(&self, token: Address, from: Address, pool: Address) -> Result<U256, ChainError> {
        let gda = IGeneralDistributionAgreementV1::new(self.gda, self.chain.provider());
        let flow = gda.getFlow(token, from, pool).call().await.map_err(|e| rpc_error("GDA.getFlow", e))?;
        Ok(flow.deposit)
    }

    pub async fn member_flow_rate(&self, pool: Address, member: Address) -> Result<i128, ChainError> {
        let pool = ISuperfluidPool::new(pool, self.chain.provider());
        let r = pool.getMemberFlowRate(member).call().await.map_err(|e| rpc_error("SuperfluidPool.getMemberFlowRate", e))?;
        Ok(from_i96(r))
    }

    pub async fn total_units(&self, pool: Address) -> Result<u128, ChainError> {
        let pool = ISuperfluidPool::new(pool, self.chain.provider());
        pool.getTotalUnits().call().await.map_err(|e| rpc_error("SuperfluidPool.getTotalUnits", e))
    }

    /// The liquidation period and minimum deposit that govern `token`'s buffers.
    pub async fn solvency_rules(&self, token: Address) -> Result<SolvencyRules, ChainError> {
        let host = ISuperfluid::new(self.host, self.chain.provider());
        let governance = host.getGovernance().call().await.map_err(|e| rpc_error("Superfluid.getGovernance", e))?;
        let gov = ISuperfluidGovernance::new(governance, self.chain.provider());
        let ppp = gov.getConfigAsUint256(self.host, token, ppp_config_key()).call().await.map_err(|e| rpc_error("governance PPP config", e))?;
        let minimum = gov
            .getConfigAsUint256(self.host, token, minimum_deposit_key())
            .call()
            .await
            .map_err(|e| rpc_error("governance minimum deposit", e))?;
        // SuperfluidGovernanceConfigs.decodePPPConfig: liquidation period in bits 32..64.
        let liquidation_period: u64 = ((ppp >> 32usize) & U256::from(u32::MAX)).to::<u64>();
        let minimum_deposit = u128::try_from(minimum).map_err(|_| ChainError::Contract {
            what: "governance minimum deposit".into(),
            message: format!("{minimum} does not fit in u128"),
        })?;
        Ok(SolvencyRules { liquidation_period, minimum_deposit })
    }
}

/// `SuperToken.balanceOf(account)` (the available balance, deposits excluded) as of `block` (latest if None).
pub async fn super_token_balance(chain: &Chain, token: Address, account: Address, block: Option<u64>) -> Result<U256, ChainError> {
    let token = ISuperToken::new(token, chain.provider());
    let call = token.balanceOf(account);
    let call = match block {
        Some(b) => call.block(b.into()),
        None => call,
    };
    call.call().await.map_err(|e| rpc_error("SuperToken.balanceOf", e))
}
