//! Typed bindings. ComputePool's own contracts come from the forge artifacts committed in `artifacts/`
//! (ABI and creation bytecode; `scripts/chain-artifacts.sh` refreshes them and a test checks they match
//! contracts/). Superfluid's are the few functions ComputePool calls, declared with the signatures of
//! `@superfluid-finance/ethereum-contracts` 1.15.2.

#![allow(clippy::too_many_arguments)]

use alloy::sol;

sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    TestUSD,
    "artifacts/TestUSD.json"
);
sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    OracleVerifier,
    "artifacts/OracleVerifier.json"
);
sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    PoolINFT,
    "artifacts/PoolINFT.json"
);
sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    Coalition,
    "artifacts/Coalition.json"
);

sol! {
    /// The package's `SuperfluidFrameworkDeployer` (a test-framework deployer that runs the protocol's
    /// deployment in numbered steps).
    #[sol(rpc)]
    interface SuperfluidFrameworkDeployer {
        struct Framework {
            address governance;
            address host;
            address cfa;
            address ida;
            address gda;
            address superTokenFactory;
            address superTokenLogic;
            address resolver;
            address superfluidLoader;
            address cfaV1Forwarder;
            address gdaV1Forwarder;
            address macroForwarder;
            address clearMacroForwarderV1WithPermit2;
            address batchLiquidator;
            address toga;
        }
        function getNumSteps() external pure returns (uint8);
        function executeStep(uint8 step) external;
        function getFramework() external view returns (Framework memory sf);
    }

    #[sol(rpc)]
    interface ISuperTokenFactory {
        event SuperTokenCreated(address indexed token);
        function createERC20Wrapper(
            address underlyingToken,
            uint8 underlyingDecimals,
            uint8 upgradability,
            string calldata name,
            string calldata symbol
        ) external returns (address superToken);
    }

    #[sol(rpc)]
    interface ISuperToken {
        function upgrade(uint256 amount) external;
        function downgrade(uint256 amount) external;
        function balanceOf(address account) external view returns (uint256);
        function realtimeBalanceOfNow(address account)
            external
            view
            returns (int256 availableBalance, uint256 deposit, uint256 owedDeposit, uint256 timestamp);
        function getUnderlyingToken() external view returns (address);
        function getHost() external view returns (address);
        function decimals() external view returns (uint8);
        function symbol() external view returns (string memory);
    }

    #[sol(rpc)]
    interface IGDAv1Forwarder {
        struct PoolConfig {
            bool transferabilityForUnitsOwner;
            bool distributionFromAnyAddress;
        }
        function createPool(address token, address admin, PoolConfig memory config)
            external
            returns (bool success, address pool);
        function updateMemberUnits(address pool, address memberAddress, uint128 newUnits, bytes memory userData)
            external
            returns (bool success);
        function connectPool(address pool, bytes memory userData) external returns (bool);
        function disconnectPool(address pool, bytes memory userData) external returns (bool);
        function distributeFlow(address token, address from, address pool, int96 requestedFlowRate, bytes memory userData)
            external
            returns (bool);
        function getFlowDistributionFlowRate(address token, address from, address to) external view returns (int96);
        function estimateFlowDistributionActualFlowRate(address token, address from, address to, int96 requestedFlowRate)
            external
            view
            returns (int96 actualFlowRate, int96 totalDistributionFlowRate);
        function getPoolAdjustmentFlowRate(address pool) external view returns (int96);
        function getNetFlow(address token, address account) external view returns (int96);
        function isMemberConnected(address pool, address member) external view returns (bool);
    }

    #[sol(rpc)]
    interface IGeneralDistributionAgreementV1 {
        event PoolCreated(address indexed token, address indexed admin, address pool);
        function getFlow(address token, address from, address to)
            external
            view
            returns (uint256 lastUpdated, int96 flowRate, uint256 deposit);
    }

    #[sol(rpc)]
    interface ISuperfluidPool {
        function admin() external view returns (address);
        function getUnits(address memberAddr) external view returns (uint128);
        function getTotalUnits() external view returns (uint128);
        function getMemberFlowRate(address memberAddr) external view returns (int96);
        function getTotalFlowRate() external view returns (int96);
    }

    #[sol(rpc)]
    interface ISuperfluid {
        function getGovernance() external view returns (address);
    }

    #[sol(rpc)]
    interface ISuperfluidGovernance {
        function getConfigAsUint256(address host, address superToken, bytes32 key) external view returns (uint256);
    }
}
