//! Against a fresh anvil each: the real Superfluid protocol deployed from npm, a GDA pool streaming to three
//! operators (balances to the wei against the Rust model), EIP-3009 settlement, the INFT's proofs, and
//! coalition votes. anvil comes from `scripts/contracts.sh`; without it these tests skip, unless
//! COMPUTEPOOL_REQUIRE_ANVIL=1 (set by `make test`), which turns a missing anvil into a failure.

use std::path::Path;

use alloy::primitives::{Address, B256, FixedBytes, U256, keccak256};
use alloy::providers::Provider;
use alloy::signers::local::PrivateKeySigner;
use computepool_chain::bindings::{Coalition, ISuperToken, OracleVerifier, PoolINFT, TestUSD};
use computepool_chain::deploy::creation_code;
use computepool_chain::devnet::mine_at;
use computepool_chain::pools::super_token_balance;
use computepool_chain::{
    Anvil, Chain, ChainError, ChainTools, DEVNET_CHAIN_ID, DeployOptions, Deployment, Gda, GdaModel, deploy_all, eip3009,
    oracle,
};

fn tools() -> Option<ChainTools> {
    ChainTools::for_tests(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

async fn connect(anvil: &Anvil, key: &PrivateKeySigner) -> Chain {
    Chain::connect(anvil.rpc_url(), Some(DEVNET_CHAIN_ID), key.clone()).await.expect("connect to anvil")
}

fn reverted_with(result: Result<impl std::fmt::Debug, ChainError>, error_name: &str) {
    match result {
        Err(ChainError::Reverted { reason, .. }) => assert!(reason.contains(error_name), "reverted with {reason}, expected {error_name}"),
        other => panic!("expected a revert with {error_name}, got {other:?}"),
    }
}

async fn deploy_test_usd(owner: &Chain) -> TestUSD::TestUSDInstance<alloy::providers::DynProvider> {
    let code = creation_code(
        &TestUSD::BYTECODE,
        TestUSD::constructorCall { name_: "USD Coin".into(), symbol_: "USDC".into(), version_: "2".into(), owner_: owner.address() },
    );
    let (address, _) = owner.deploy("TestUSD", code).await.unwrap();
    TestUSD::new(address, owner.provider().clone())
}

async fn latest_block(chain: &Chain) -> (u64, u64) {
    let number = chain.provider().get_block_number().await.unwrap();
    (number, chain.timestamp_of(number).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gda_pool_pays_three_operators_exactly_as_modelled() {
    let Some(tools) = tools() else { return };
    let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).unwrap();
    let keys = anvil.keys().to_vec();
    let deployer = connect(&anvil, &keys[0]).await;
    let deployment = deploy_all(&deployer, &tools.superfluid().unwrap(), &DeployOptions::usdc_like(keys[9].address())).await.unwrap();
    let usdcx = deployment.usdcx;

    // The distributor wraps 1 000 000 USDC into USDCx (18 decimals).
    let usdc = TestUSD::new(deployment.usdc.address, deployer.provider());
    let whole = U256::from(1_000_000u64);
    deployer.send("mint", usdc.mint(deployer.address(), whole * U256::from(10u64).pow(U256::from(6)))).await.unwrap();
    deployer.send("approve", usdc.approve(usdcx, U256::MAX)).await.unwrap();
    let super_token = ISuperToken::new(usdcx, deployer.provider());
    deployer.send("upgrade", super_token.upgrade(whole * U256::from(10u64).pow(U256::from(18)))).await.unwrap();

    // The pool: admin keys[1] (not the distributor, so its adjustment flow is visible), operators 1:2:3.
    let admin = connect(&anvil, &keys[1]).await;
    let admin_gda = Gda::new(&admin, &deployment.superfluid);
    let (pool, _) = admin_gda.create_pool(usdcx, admin.address(), true).await.unwrap();
    let operators: Vec<Chain> = futures_join(keys[2..5].iter().map(|k| connect(&anvil, k))).await;
    for (op, units) in operators.iter().zip([1u128, 2, 3]) {
        admin_gda.update_member_units(pool, op.address(), units).await.unwrap();
        Gda::new(op, &deployment.superfluid).connect_pool(pool).await.unwrap();
    }
    assert_eq!(admin_gda.total_units(pool).await.unwrap(), 6);

    let gda = Gda::new(&deployer, &deployment.superfluid);
    let rules = gda.solvency_rules(usdcx).await.unwrap();
    assert_eq!(rules.liquidation_period, 4 * 3600, "the framework's default liquidation period");

    // The model starts from the chain's balances before the flow.
    let (start_block, start_time) = latest_block(&deployer).await;
    let mut model = GdaModel::new(pool, admin.address(), rules);
    let mut tracked = vec![deployer.address(), admin.address()];
    tracked.extend(operators.iter().map(Chain::address));
    for &account in &tracked {
        let b = super_token_balance(&deployer, usdcx, account, Some(start_block)).await.unwrap();
        model.track(account, i128::try_from(b).unwrap(), start_time);
    }
    model.track(pool, 0, start_time);
    for (op, units) in operators.iter().zip([1u128, 2, 3]) {
        model.set_units(op.address(), units, start_time);
        model.connect(op.address(), start_time);
    }

    let check_all = |block: u64, time: u64, model: GdaModel, deployer: Chain, tracked: Vec<Address>| async move {
        for account in tracked {
            let chain_balance = super_token_balance(&deployer, usdcx, account, Some(block)).await.unwrap();
            assert_eq!(
                i128::try_from(chain_balance).unwrap(),
                model.available_balance(account, time),
                "balance of {account} at t={time}"
            );
        }
    };

    // R not divisible by 6: the per-unit floor matters.
    let requested: i128 = 1_000_000_000_007;
    let receipt = gda.distribute_flow(usdcx, pool, requested).await.unwrap();
    let t1 = deployer.block_timestamp(&receipt).await.unwrap();
    let actual = model.distribute_flow(deployer.address(), requested, t1);
    let per_unit = requested / 6;
    assert_eq!(actual, per_unit * 6);
    assert_eq!(gda.flow_rate(usdcx, deployer.address(), pool).await.unwrap(), actual);
    assert_eq!(gda.flow_deposit(usdcx, deployer.address(), pool).await.unwrap(), U256::from(model.deposit_of(deployer.address())));
    for (op, units) in operators.iter().zip([1i128, 2, 3]) {
        assert_eq!(gda.member_flow_rate(pool, op.address()).await.unwrap(), per_unit * units);
    }

    // One hour of anvil time: each operator rose by exactly floor(R / 6) × units × 3600.
    let t = 3600u64;
    mine_at(&deployer, t1 + t).await.unwrap();
    let (b1, _) = latest_block(&deployer).await;
    for (op, units) in operators.iter().zip([1i128, 2, 3]) {
        let before = super_token_balance(&deployer, usdcx, op.address(), Some(receipt.block_number.unwrap())).await.unwrap();
        let after = super_token_balance(&deployer, usdcx, op.address(), Some(b1)).await.unwrap();
        assert_eq!(i128::try_from(after - before).unwrap(), per_unit * units * t as i128, "operator with {units} units");
    }
    check_all(b1, t1 + t, model.clone(), deployer.clone(), tracked.clone()).await;

    // Re-weighing under a running flow: 1:2:4 (7 units) re-floors the per-unit rate; the remainder flows
    // to the admin.
    let receipt = admin_gda.update_member_units(pool, operators[2].address(), 4).await.unwrap();
    let t2 = deployer.block_timestamp(&receipt).await.unwrap();
    model.set_units(operators[2].address(), 4, t2);
    assert!(model.flow().adjustment_rate > 0, "6 × floor(R/6) is not a multiple of 7");
    assert_eq!(gda.adjustment_flow_rate(pool).await.unwrap(), model.flow().adjustment_rate);
    mine_at(&deployer, t2 + 1000).await.unwrap();
    let (b2, _) = latest_block(&deployer).await;
    check_all(b2, t2 + 1000, model.clone(), deployer.clone(), tracked.clone()).await;

    // Stopping: no operator's balance moves afterwards, and the distributor's deposit comes back.
    let receipt = gda.distribute_flow(usdcx, pool, 0).await.unwrap();
    let t3 = deployer.block_timestamp(&receipt).await.unwrap();
    model.distribute_flow(deployer.address(), 0, t3);
    assert_eq!(gda.flow_deposit(usdcx, deployer.address(), pool).await.unwrap(), U256::ZERO);
    mine_at(&deployer, t3 + 5000).await.unwrap();
    let (b3, _) = latest_block(&deployer).await;
    for op in &operators {
        let at_stop = super_token_balance(&deployer, usdcx, op.address(), receipt.block_number).await.unwrap();
        let later = super_token_balance(&deployer, usdcx, op.address(), Some(b3)).await.unwrap();
        assert_eq!(at_stop, later, "balances stop with the flow");
    }
    check_all(b3, t3 + 5000, model, deployer.clone(), tracked).await;
}

async fn futures_join<F: std::future::Future<Output = Chain>>(futures: impl Iterator<Item = F>) -> Vec<Chain> {
    let mut out = Vec::new();
    for f in futures {
        out.push(f.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eip3009_settles_once_and_not_after_expiry() {
    let Some(tools) = tools() else { return };
    let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).unwrap();
    let keys = anvil.keys().to_vec();
    let owner = connect(&anvil, &keys[0]).await;
    let token = deploy_test_usd(&owner).await;
    let (payer, payee) = (&keys[2], keys[3].address());
    owner.send("mint", token.mint(payer.address(), U256::from(100_000_000u64))).await.unwrap();

    // A third party (the facilitator) submits; the payer never sends a transaction.
    let facilitator = connect(&anvil, &keys[4]).await;
    let token_f = TestUSD::new(*token.address(), facilitator.provider());
    let domain = eip3009::token_domain("USD Coin", "2", DEVNET_CHAIN_ID, *token.address());
    let (_, now) = latest_block(&owner).await;
    let value = U256::from(25_000_000u64);
    let auth = eip3009::sign_transfer(payer, &domain, payee, value, 0, now + 600, B256::from(keccak256("voucher-1"))).unwrap();
    let m = &auth.message;
    let settle = || token_f.transferWithAuthorization_0(m.from, m.to, m.value, m.validAfter, m.validBefore, m.nonce, auth.signature.clone());
    facilitator.send("settle", settle()).await.unwrap();
    assert_eq!(token_f.balanceOf(payee).call().await.unwrap(), value);
    assert_eq!(token_f.balanceOf(payer.address()).call().await.unwrap(), U256::from(75_000_000u64));
    assert!(token_f.authorizationState(payer.address(), m.nonce).call().await.unwrap());

    reverted_with(facilitator.send("replay", settle()).await, "AuthorizationAlreadyUsed");
    assert_eq!(token_f.balanceOf(payee).call().await.unwrap(), value, "a replay moves nothing");

    let short = eip3009::sign_transfer(payer, &domain, payee, value, 0, now + 30, B256::from(keccak256("voucher-2"))).unwrap();
    mine_at(&owner, now + 31).await.unwrap();
    let s = &short.message;
    reverted_with(
        facilitator
            .send("expired", token_f.transferWithAuthorization_0(s.from, s.to, s.value, s.validAfter, s.validBefore, s.nonce, short.signature.clone()))
            .await,
        "AuthorizationExpired",
    );
    assert_eq!(token_f.balanceOf(payee).call().await.unwrap(), value, "an expired voucher moves nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_inft_mints_and_transfers_with_oracle_proofs_only() {
    let Some(tools) = tools() else { return };
    let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).unwrap();
    let keys = anvil.keys().to_vec();
    let (oracle_key, forger) = (&keys[9], &keys[8]);
    let alice = connect(&anvil, &keys[2]).await;
    let (verifier, _) = alice
        .deploy(
            "OracleVerifier",
            creation_code(&OracleVerifier::BYTECODE, OracleVerifier::constructorCall { oracle_: oracle_key.address(), owner_: alice.address() }),
        )
        .await
        .unwrap();
    let (inft, _) = alice
        .deploy(
            "PoolINFT",
            creation_code(
                &PoolINFT::BYTECODE,
                PoolINFT::constructorCall { name_: "ComputePool pool".into(), symbol_: "POOL".into(), verifier_: verifier },
            ),
        )
        .await
        .unwrap();
    let inft = PoolINFT::new(inft, alice.provider());
    let verifier = OracleVerifier::new(verifier, alice.provider());
    let domain = oracle::verifier_domain(DEVNET_CHAIN_ID, *verifier.address());

    let weights = B256::from(keccak256("smollm2 shards, sealed"));
    let proof = oracle::preimage_proof(oracle_key, &domain, weights, B256::ZERO).unwrap();
    let receipt = alice.send("mint", inft.mint(vec![proof], vec!["model shards".into()], alice.address())).await.unwrap();
    let minted = receipt.decoded_log::<PoolINFT::Minted>().expect("Minted event");
    let id = minted.data.tokenId;
    assert_eq!(inft.ownerOf(id).call().await.unwrap(), alice.address());
    assert_eq!(inft.dataHashesOf(id).call().await.unwrap(), vec![weights]);

    let bob = keys[3].address();
    let resealed = B256::from(keccak256("shards re-encrypted for bob"));
    let sealed_key = FixedBytes::<16>::repeat_byte(0x5e);
    let forged = oracle::transfer_proof(forger, &domain, weights, resealed, bob, sealed_key, B256::ZERO).unwrap();
    // (A revert caught in gas estimation leaves alice's nonce free: the valid transfer below is not stuck
    // behind a gap.)
    reverted_with(alice.send("forged transfer", inft.transfer(bob, id, vec![forged])).await, "InvalidProof");
    assert_eq!(inft.ownerOf(id).call().await.unwrap(), alice.address(), "a forged proof moves nothing");

    let valid = oracle::transfer_proof(oracle_key, &domain, weights, resealed, bob, sealed_key, B256::ZERO).unwrap();
    let receipt = alice.send("transfer", inft.transfer(bob, id, vec![valid])).await.unwrap();
    assert!(receipt.decoded_log::<PoolINFT::Transferred>().is_some());
    let published = receipt.decoded_log::<PoolINFT::PublishedSealedKey>().expect("sealed key published");
    assert_eq!(published.data.sealedKeys, vec![sealed_key]);
    assert_eq!(inft.ownerOf(id).call().await.unwrap(), bob);
    assert_eq!(inft.dataHashesOf(id).call().await.unwrap(), vec![resealed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalition_two_of_three_slashes_one_does_not_and_votes_count_once() {
    let Some(tools) = tools() else { return };
    let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).unwrap();
    let keys = anvil.keys().to_vec();
    let owner = connect(&anvil, &keys[0]).await;
    let token = deploy_test_usd(&owner).await;
    let stake = U256::from(100_000_000u64);
    let treasury = keys[9].address();
    let coalition_address =
        computepool_chain::deploy_coalition(&owner, *token.address(), stake, 3600, treasury).await.unwrap();
    let coalition = Coalition::new(coalition_address, owner.provider());

    let voters: Vec<Chain> = futures_join(keys[5..8].iter().map(|k| connect(&anvil, k))).await;
    for v in &voters {
        owner.send("add voter", coalition.addVoter(v.address())).await.unwrap();
    }
    owner.send("threshold", coalition.setThreshold(2)).await.unwrap();

    let operators: Vec<Chain> = futures_join(keys[2..5].iter().map(|k| connect(&anvil, k))).await;
    for (op, units) in operators.iter().zip([1u128, 2, 3]) {
        owner.send("mint", token.mint(op.address(), stake)).await.unwrap();
        op.send("approve", TestUSD::new(*token.address(), op.provider()).approve(coalition_address, stake)).await.unwrap();
        let peer_id = keccak256(op.address());
        let receipt = op.send("join", Coalition::new(coalition_address, op.provider()).join(peer_id, units, stake)).await.unwrap();
        assert!(receipt.decoded_log::<Coalition::MemberJoined>().is_some());
    }
    assert_eq!(coalition.totalUnits().call().await.unwrap(), U256::from(6));

    let accused = operators[1].address();
    let as_voter = |i: usize| Coalition::new(coalition_address, voters[i].provider());
    // One of three: proposed (the proposer's vote), nothing slashed.
    let receipt = voters[0].send("propose", as_voter(0).proposeBreach(accused, U256::from(40_000_000u64), keccak256("bad activations"))).await.unwrap();
    let id = receipt.decoded_log::<Coalition::BreachProposed>().expect("BreachProposed").data.breachId;
    assert_eq!(coalition.memberOf(accused).call().await.unwrap().stake, stake, "1 of 3 does not slash");
    // The same voter again: refused, still one vote.
    reverted_with(voters[0].send("repeat vote", as_voter(0).vote(id)).await, "AlreadyVoted");
    assert_eq!(coalition.breachOf(id).call().await.unwrap().votes, 1, "a repeated vote does not count twice");
    assert_eq!(coalition.memberOf(accused).call().await.unwrap().stake, stake);
    // A second voter: quorum, slashed at once.
    let receipt = voters[1].send("second vote", as_voter(1).vote(id)).await.unwrap();
    let slashed = receipt.decoded_log::<Coalition::Slashed>().expect("Slashed event");
    assert_eq!(slashed.data.amount, U256::from(40_000_000u64));
    assert_eq!(coalition.memberOf(accused).call().await.unwrap().stake, stake - U256::from(40_000_000u64));
    assert_eq!(TestUSD::new(*token.address(), owner.provider()).balanceOf(treasury).call().await.unwrap(), U256::from(40_000_000u64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_is_deterministic_and_round_trips() {
    let Some(tools) = tools() else { return };
    {
        let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).unwrap();
        let refused = Chain::connect(anvil.rpc_url(), Some(1), anvil.keys()[0].clone()).await.unwrap_err();
        assert!(matches!(refused, ChainError::WrongChain { expected: 1, got: DEVNET_CHAIN_ID }), "{refused}");
    }
    let mut deployments = Vec::new();
    for _ in 0..2 {
        let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).unwrap();
        let deployer = connect(&anvil, &anvil.keys()[0]).await;
        let oracle = anvil.keys()[9].address();
        deployments.push(deploy_all(&deployer, &tools.superfluid().unwrap(), &DeployOptions::usdc_like(oracle)).await.unwrap());
    }
    assert_eq!(deployments[0], deployments[1], "the same addresses on every fresh chain");
    let d = &deployments[0];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deployment.json");
    d.write(&path).unwrap();
    assert_eq!(&Deployment::read(&path).unwrap(), d);
    // The note's addresses for the default anvil deployer.
    assert_eq!(d.superfluid.gda_v1_forwarder, "0xBcC58fb72409BA1CdEc5dBcDD3Cd6c42E3e04242".parse::<Address>().unwrap());
}

/// The model against the contracts over seeded random pools: member counts, units, requested rates, a
/// re-weighing and durations drawn per case; every balance must agree to the wei after each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gda_model_matches_the_contracts_on_random_pools() {
    let Some(tools) = tools() else { return };
    let anvil = Anvil::spawn(&tools, 0, DEVNET_CHAIN_ID).unwrap();
    let keys = anvil.keys().to_vec();
    let deployer = connect(&anvil, &keys[0]).await;
    let deployment = deploy_all(&deployer, &tools.superfluid().unwrap(), &DeployOptions::usdc_like(keys[9].address())).await.unwrap();
    let usdcx = deployment.usdcx;
    let usdc = TestUSD::new(deployment.usdc.address, deployer.provider());
    deployer.send("mint", usdc.mint(deployer.address(), U256::from(10u64).pow(U256::from(12)))).await.unwrap();
    deployer.send("approve", usdc.approve(usdcx, U256::MAX)).await.unwrap();
    let super_token = ISuperToken::new(usdcx, deployer.provider());
    deployer.send("upgrade", super_token.upgrade(U256::from(10u64).pow(U256::from(24)))).await.unwrap();
    let gda = Gda::new(&deployer, &deployment.superfluid);
    let rules = gda.solvency_rules(usdcx).await.unwrap();
    let members: Vec<Chain> = futures_join(keys[2..8].iter().map(|k| connect(&anvil, k))).await;
    let admin = connect(&anvil, &keys[1]).await;
    let admin_gda = Gda::new(&admin, &deployment.superfluid);

    // xorshift64*, fixed seed: the same cases every run, printed on failure.
    let mut state = 0x5eed_cafe_f00d_u64;
    let mut next = |bound: u64| {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    };
    for case in 0..4 {
        let n = 1 + next(members.len() as u64) as usize;
        let units: Vec<u128> = (0..n).map(|_| 1 + next(1000) as u128).collect();
        let requested = 1 + next(10_000_000_000_000) as i128;
        let (reweigh_index, reweigh_units) = (next(n as u64) as usize, next(1000) as u128);
        let (d1, d2, d3) = (1 + next(100_000), 1 + next(100_000), 1 + next(100_000));
        let what = format!("case {case}: units {units:?}, R {requested}, member {reweigh_index} -> {reweigh_units}, waits {d1}/{d2}/{d3}");

        let (pool, _) = admin_gda.create_pool(usdcx, admin.address(), true).await.unwrap();
        let mut tracked = vec![deployer.address(), admin.address()];
        for (m, u) in members.iter().zip(&units) {
            admin_gda.update_member_units(pool, m.address(), *u).await.unwrap();
            Gda::new(m, &deployment.superfluid).connect_pool(pool).await.unwrap();
            tracked.push(m.address());
        }
        let (start_block, start_time) = latest_block(&deployer).await;
        let mut model = GdaModel::new(pool, admin.address(), rules);
        for &a in &tracked {
            let b = super_token_balance(&deployer, usdcx, a, Some(start_block)).await.unwrap();
            model.track(a, i128::try_from(b).unwrap(), start_time);
        }
        for (m, u) in members.iter().zip(&units) {
            model.set_units(m.address(), *u, start_time);
            model.connect(m.address(), start_time);
        }
        let check = |model: &GdaModel, block: u64, time: u64| {
            let (model, tracked, deployer, what) = (model.clone(), tracked.clone(), deployer.clone(), what.clone());
            async move {
                for a in tracked {
                    let b = super_token_balance(&deployer, usdcx, a, Some(block)).await.unwrap();
                    assert_eq!(i128::try_from(b).unwrap(), model.available_balance(a, time), "{what}: {a} at {time}");
                }
            }
        };

        let r = gda.distribute_flow(usdcx, pool, requested).await.unwrap();
        let t = deployer.block_timestamp(&r).await.unwrap();
        let actual = model.distribute_flow(deployer.address(), requested, t);
        assert_eq!(gda.flow_rate(usdcx, deployer.address(), pool).await.unwrap(), actual, "{what}");
        mine_at(&deployer, t + d1).await.unwrap();
        check(&model, latest_block(&deployer).await.0, t + d1).await;

        let r = admin_gda.update_member_units(pool, members[reweigh_index].address(), reweigh_units).await.unwrap();
        let t = deployer.block_timestamp(&r).await.unwrap();
        model.set_units(members[reweigh_index].address(), reweigh_units, t);
        assert_eq!(gda.adjustment_flow_rate(pool).await.unwrap(), model.flow().adjustment_rate, "{what}");
        mine_at(&deployer, t + d2).await.unwrap();
        check(&model, latest_block(&deployer).await.0, t + d2).await;

        let r = gda.distribute_flow(usdcx, pool, 0).await.unwrap();
        let t = deployer.block_timestamp(&r).await.unwrap();
        model.distribute_flow(deployer.address(), 0, t);
        mine_at(&deployer, t + d3).await.unwrap();
        check(&model, latest_block(&deployer).await.0, t + d3).await;
    }
}
