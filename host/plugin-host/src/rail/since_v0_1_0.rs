//! `computepool:payment-rail@0.1.0` (wit/payment-rail/0.1.0). Frozen once released: a new version is a
//! new file next to this one and one arm in `super::RailBindings`.

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use super::{FlowChange, PaymentRequirements, QuoteRequest, RailError, RailInfo, VerifiedPayment};
use crate::host_state::HostState;

wasmtime::component::bindgen!({
    path: ["../../wit/host/0.1.0", "../../wit/payment-rail/0.1.0"],
    world: "computepool:payment-rail/payment-rail@0.1.0",
    with: { "computepool:host": crate::capability_impls::since_v0_1_0::computepool::host },
    imports: { default: trappable },
});

use computepool::payment_rail::types as wit;

/// Interfaces of this version that hold only types; importing them needs no capability.
pub(super) const TYPE_ONLY_IMPORTS: &[&str] = &["computepool:payment-rail/types@0.1.0"];

/// The interface a rail of this version exports.
pub(super) const EXPORT: &str = "computepool:payment-rail/rail@0.1.0";

pub(super) fn pre(linker: &Linker<HostState>, component: &Component) -> wasmtime::Result<PaymentRailPre<HostState>> {
    PaymentRailPre::new(linker.instantiate_pre(component)?)
}

pub(super) fn instantiate(pre: &PaymentRailPre<HostState>, store: &mut Store<HostState>) -> wasmtime::Result<PaymentRail> {
    pre.instantiate(store)
}

/// A call's outcome: the outer error is a trap, the inner one the rail's own `rail-error`.
pub(super) type Outcome<T> = wasmtime::Result<Result<T, RailError>>;

fn rail_error(e: wit::RailError) -> RailError {
    match e {
        wit::RailError::InvalidPayment(m) => RailError::InvalidPayment(m),
        wit::RailError::Rejected(m) => RailError::Rejected(m),
        wit::RailError::Unavailable(m) => RailError::Unavailable(m),
        wit::RailError::Unsupported(m) => RailError::Unsupported(m),
    }
}

pub(super) fn info(rail: &PaymentRail, store: &mut Store<HostState>, config: &str) -> Outcome<RailInfo> {
    let r = rail.computepool_payment_rail_rail().call_info(store, &config.to_string())?;
    Ok(r.map(|i| RailInfo {
        name: i.name,
        scheme: i.scheme,
        network: i.network,
        asset: i.asset,
        payments: i.payments,
        streams: i.streams,
    })
    .map_err(rail_error))
}

/// Raw results keep amounts as the plugin wrote them: `super` parses and checks them.
pub(super) struct RawRequirements {
    pub body: String,
    pub max_amount: String,
    pub valid_until: u64,
}

pub(super) fn quote(rail: &PaymentRail, store: &mut Store<HostState>, config: &str, q: &QuoteRequest) -> Outcome<RawRequirements> {
    let request = wit::QuoteRequest {
        request_id: q.request_id.clone(),
        resource: q.resource.clone(),
        model: q.model.clone(),
        max_seconds: q.max_seconds,
        price_per_second: q.price_per_second.to_string(),
        pay_to: q.pay_to.clone(),
    };
    let r = rail.computepool_payment_rail_rail().call_quote(store, &config.to_string(), &request)?;
    Ok(r.map(|p| RawRequirements { body: p.body, max_amount: p.max_amount, valid_until: p.valid_until }).map_err(rail_error))
}

fn requirements(p: &PaymentRequirements) -> wit::PaymentRequirements {
    wit::PaymentRequirements { body: p.body.clone(), max_amount: p.max_amount.to_string(), valid_until: p.valid_until }
}

pub(super) struct RawVerified {
    pub request_id: String,
    pub payer: String,
    pub amount: String,
    pub settlement_data: String,
}

pub(super) fn verify(
    rail: &PaymentRail,
    store: &mut Store<HostState>,
    config: &str,
    p: &PaymentRequirements,
    header: &str,
) -> Outcome<RawVerified> {
    let r = rail.computepool_payment_rail_rail().call_verify(store, &config.to_string(), &requirements(p), header)?;
    Ok(r.map(|v| RawVerified { request_id: v.request_id, payer: v.payer, amount: v.amount, settlement_data: v.settlement_data })
        .map_err(rail_error))
}

pub(super) struct RawSettlement {
    pub reference: String,
    pub amount: String,
    pub payer: String,
    pub network: String,
}

pub(super) fn settle(rail: &PaymentRail, store: &mut Store<HostState>, config: &str, v: &VerifiedPayment) -> Outcome<RawSettlement> {
    let payment = wit::VerifiedPayment {
        request_id: v.request_id.clone(),
        payer: v.payer.clone(),
        amount: v.amount.to_string(),
        settlement_data: v.settlement_data.clone(),
    };
    let r = rail.computepool_payment_rail_rail().call_settle(store, &config.to_string(), &payment)?;
    Ok(r.map(|s| RawSettlement { reference: s.reference, amount: s.amount, payer: s.payer, network: s.network }).map_err(rail_error))
}

pub(super) struct RawReceipt {
    pub reference: String,
    pub effective_at_s: u64,
    pub flow_rate: String,
}

fn change(c: &FlowChange) -> wit::FlowChange {
    wit::FlowChange {
        idempotency_key: c.idempotency_key.clone(),
        pool: c.pool.clone(),
        token: c.token.clone(),
        members: c.members.iter().map(|m| wit::FlowMember { address: m.address.clone(), units: m.units }).collect(),
        flow_rate: c.flow_rate.to_string(),
    }
}

fn receipt(r: wit::FlowReceipt) -> RawReceipt {
    RawReceipt { reference: r.reference, effective_at_s: r.effective_at_s, flow_rate: r.flow_rate }
}

pub(super) fn stream_start(rail: &PaymentRail, store: &mut Store<HostState>, config: &str, c: &FlowChange) -> Outcome<RawReceipt> {
    let r = rail.computepool_payment_rail_rail().call_stream_start(store, &config.to_string(), &change(c))?;
    Ok(r.map(receipt).map_err(rail_error))
}

pub(super) fn stream_stop(rail: &PaymentRail, store: &mut Store<HostState>, config: &str, c: &FlowChange) -> Outcome<RawReceipt> {
    let r = rail.computepool_payment_rail_rail().call_stream_stop(store, &config.to_string(), &change(c))?;
    Ok(r.map(receipt).map_err(rail_error))
}
