//! The Superfluid GDA rail: streams a pool's price to its members through a Superfluid General
//! Distribution Agreement pool, with the host's key (the pool's admin and the distributor) through the
//! host's `chain` capability, calling the `GDAv1Forwarder` the operator granted.
//!
//! `stream-start`: `updateMemberUnits(pool, member, units)` for each member of the change, then
//! `distributeFlow(token, sender, pool, rate)`; the receipt's `effective-at-s` is the block timestamp of
//! the `distributeFlow` transaction and its `flow-rate` what the distributor actually pays, read back with
//! `getFlowDistributionFlowRate` (the GDA floors the per-unit rate: `floor(rate / total units) × total
//! units`). `stream-stop`: `distributeFlow(…, 0)`. Each transaction's idempotency key is the change's key
//! plus its step, so a retried change re-sends nothing that was mined.
//!
//! Calldata is encoded by hand (five static words and an empty `bytes`): the selectors are the keccak of
//! the signatures below, and host/plugin-host's devnet test checks them against the real contracts.
//!
//! Every member listed in a change costs one `updateMemberUnits` transaction, so a change of the rate alone
//! (the meter's, as requests come and go) should list no members: members left out keep their units.
//!
//! Configuration (JSON): `{"forwarder": "0x…", "token": "0x…"}` — the GDAv1Forwarder's address (the
//! operator grants it in `[grants.chain]`) and, optionally, the one Super Token this pool streams (a change
//! naming another is refused). The pool comes with each change. quote / verify / settle answer
//! `unsupported` (clients pay through a payment rail such as x402-exact).
#![no_std]

use alloc::format;
use alloc::string::{String, ToString};
use computepool::host::chain;
use computepool::payment_rail::types::{
    FlowChange, FlowReceipt, PaymentRequirements, QuoteRequest, RailError, RailInfo, Settlement, VerifiedPayment,
};
use computepool_rail_kit::{Calldata, decode_int, hex0x, parse_address, parse_amount};
use exports::computepool::payment_rail::rail::Guest;
use serde::Deserialize;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/payment-rail/0.1.0"],
    world: "computepool:payment-rail/payment-rail@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

/// `updateMemberUnits(address,address,uint128,bytes)`
const UPDATE_MEMBER_UNITS: [u8; 4] = [0x39, 0x8c, 0x74, 0xe1];
/// `distributeFlow(address,address,address,int96,bytes)`
const DISTRIBUTE_FLOW: [u8; 4] = [0x5a, 0x6c, 0x6d, 0xbc];
/// `getFlowDistributionFlowRate(address,address,address)`
const GET_FLOW_DISTRIBUTION_FLOW_RATE: [u8; 4] = [0x44, 0x99, 0x9f, 0xf7];

/// The largest int96.
const MAX_INT96: u128 = (1 << 95) - 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    forwarder: String,
    #[serde(default)]
    token: Option<String>,
}

fn invalid(m: impl Into<String>) -> RailError {
    RailError::InvalidPayment(m.into())
}

fn config(text: &str) -> Result<Config, RailError> {
    let c: Config = serde_json::from_str(text).map_err(|e| invalid(format!("superfluid-gda config: {e}")))?;
    parse_address("forwarder", &c.forwarder).map_err(invalid)?;
    if let Some(token) = &c.token {
        parse_address("token", token).map_err(invalid)?;
    }
    Ok(c)
}

fn chain_error(what: &str, e: chain::ChainError) -> RailError {
    match e {
        chain::ChainError::ContractNotGranted(a) => {
            RailError::Unavailable(format!("{what}: the operator has not granted this rail the contract {a} (add it to [grants.chain])"))
        }
        chain::ChainError::Reverted(r) => RailError::Rejected(format!("{what} reverted: {r}")),
        chain::ChainError::InvalidCall(m) => invalid(format!("{what}: {m}")),
        chain::ChainError::Unavailable(m) => RailError::Unavailable(format!("{what}: {m}")),
        // Not retryable by the rail: the host will not resend it, and the caller must not assume either way.
        chain::ChainError::InDoubt(m) => RailError::Unavailable(format!("{what}: outcome unknown, the host will not resend it: {m}")),
    }
}

fn send(forwarder: &str, data: alloc::vec::Vec<u8>, key: String, what: &str) -> Result<chain::TxReceipt, RailError> {
    let tx = chain::Transaction { to: forwarder.to_string(), data, value_wei: "0".into(), idempotency_key: key };
    let receipt = chain::send_transaction(&tx).map_err(|e| chain_error(what, e))?;
    if !receipt.success {
        return Err(RailError::Rejected(format!("{what} was mined but reverted (transaction {})", receipt.hash)));
    }
    Ok(receipt)
}

fn change_flow(config_text: &str, change: FlowChange, stop: bool) -> Result<FlowReceipt, RailError> {
    let c = config(config_text)?;
    let pool = parse_address("pool", &change.pool).map_err(invalid)?;
    let token = parse_address("token", &change.token).map_err(invalid)?;
    if let Some(configured) = &c.token
        && parse_address("token", configured).map_err(invalid)? != token
    {
        return Err(invalid(format!("token {}: this pool streams {configured}", change.token)));
    }
    if change.idempotency_key.is_empty() {
        return Err(invalid("the idempotency key is empty"));
    }
    let rate = if stop { 0 } else { parse_amount("flow-rate", &change.flow_rate).map_err(invalid)? };
    if rate > MAX_INT96 {
        return Err(invalid(format!("flow rate {rate} does not fit in int96")));
    }
    let sender_text = chain::sender().map_err(|e| chain_error("reading the host's sender", e))?;
    let sender = parse_address("sender", &sender_text).map_err(|e| RailError::Unavailable(e))?;
    if !stop {
        for m in &change.members {
            let member = parse_address("member", &m.address).map_err(invalid)?;
            let data = Calldata::new(UPDATE_MEMBER_UNITS)
                .address(&pool)
                .address(&member)
                .uint(u128::from(m.units))
                .empty_bytes_last(4)
                .finish();
            let key = format!("{}/units/{}", change.idempotency_key, hex0x(&member));
            send(&c.forwarder, data, key, &format!("updateMemberUnits({}, {})", hex0x(&member), m.units))?;
        }
    }
    let data = Calldata::new(DISTRIBUTE_FLOW)
        .address(&token)
        .address(&sender)
        .address(&pool)
        .int(rate as i128)
        .empty_bytes_last(5)
        .finish();
    let receipt = send(&c.forwarder, data, format!("{}/flow", change.idempotency_key), &format!("distributeFlow({rate})"))?;
    let read = Calldata::new(GET_FLOW_DISTRIBUTION_FLOW_RATE).address(&token).address(&sender).address(&pool).finish();
    let answer = chain::call(&c.forwarder, &read).map_err(|e| chain_error("getFlowDistributionFlowRate", e))?;
    let actual = decode_int(&answer).map_err(|e| RailError::Unavailable(format!("getFlowDistributionFlowRate: {e}")))?;
    if actual < 0 {
        return Err(RailError::Unavailable(format!("getFlowDistributionFlowRate returned a negative rate {actual}")));
    }
    Ok(FlowReceipt { reference: receipt.hash, effective_at_s: receipt.block_timestamp, flow_rate: (actual as u128).to_string() })
}

const NO_PAYMENTS: &str = "superfluid-gda streams to a pool's members and takes no client payments; \
                           charge clients with a payment rail such as x402-exact";

struct Gda;

impl Guest for Gda {
    fn info(config_text: String) -> Result<RailInfo, RailError> {
        let c = config(&config_text)?;
        let chain_id = chain::chain_id().map_err(|e| chain_error("reading the chain id", e))?;
        Ok(RailInfo {
            name: "superfluid-gda".into(),
            scheme: "gda-stream".into(),
            network: format!("eip155:{chain_id}"),
            asset: c.token.unwrap_or_default(),
            payments: false,
            streams: true,
        })
    }

    fn quote(_: String, _: QuoteRequest) -> Result<PaymentRequirements, RailError> {
        Err(RailError::Unsupported(NO_PAYMENTS.into()))
    }

    fn verify(_: String, _: PaymentRequirements, _: String) -> Result<VerifiedPayment, RailError> {
        Err(RailError::Unsupported(NO_PAYMENTS.into()))
    }

    fn settle(_: String, _: VerifiedPayment) -> Result<Settlement, RailError> {
        Err(RailError::Unsupported(NO_PAYMENTS.into()))
    }

    fn stream_start(config: String, change: FlowChange) -> Result<FlowReceipt, RailError> {
        change_flow(&config, change, false)
    }

    fn stream_stop(config: String, change: FlowChange) -> Result<FlowReceipt, RailError> {
        change_flow(&config, change, true)
    }
}

export!(Gda);
