//! The ledger rail: per-second accrual in the host's kv-store, no chain — for private pools whose members
//! settle among themselves (or later, off this host). One record per pool holds its members' units, the
//! per-unit rate, the second the rate was set, each member's accrued balance and the receipts of the last
//! changes (for idempotency), written in one kv `set`, so a change is all or nothing.
//!
//! Time is the host's wall clock in whole seconds (`wall-now-ms / 1000`): a change at second `t` accrues
//! every member `per_unit × units × (t − since)` and then sets the new rate from `t`. The rate that flows
//! is `floor(rate / total_units) × total_units`, as on a GDA pool, so each member's share is exact to the
//! unit and the receipt says what actually flows.
//!
//! Configuration (JSON): `{"unit": "wei"}` — the name of what the ledger counts (default "wei"); a change
//! whose token is another name is refused.
//!
//! Client payments: none. A private pool is paid by its members' own arrangement, so `quote`, `verify` and
//! `settle` answer `unsupported`; pair the pool with a payment rail (x402-exact) to charge clients.
//!
//! kv layout (what a host-side reader may rely on): key `pool:<pool>` holds the JSON [`PoolRecord`].
#![no_std]

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use computepool::host::{clock, kv_store};
use computepool::payment_rail::types::{
    FlowChange, FlowReceipt, PaymentRequirements, QuoteRequest, RailError, RailInfo, Settlement, VerifiedPayment,
};
use computepool_rail_kit::parse_amount;
use exports::computepool::payment_rail::rail::Guest;
use serde::{Deserialize, Serialize};

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/payment-rail/0.1.0"],
    world: "computepool:payment-rail/payment-rail@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

/// Receipts kept per pool for idempotent retries.
const RECENT_RECEIPTS: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_unit")]
    unit: String,
}

fn default_unit() -> String {
    "wei".into()
}

#[derive(Serialize, Deserialize, Default)]
struct PoolRecord {
    unit: String,
    /// Units per member.
    units: BTreeMap<String, u64>,
    /// What one unit receives per second, decimal.
    per_unit_rate: String,
    /// The second the current rate took effect.
    since_s: u64,
    /// Accrued up to `since_s`, decimal, per member.
    balances: BTreeMap<String, String>,
    /// How many changes the pool has had (the receipts' references).
    changes: u64,
    /// (idempotency key, receipt) of the last changes, oldest first.
    recent: Vec<(String, StoredReceipt)>,
}

#[derive(Serialize, Deserialize, Clone)]
struct StoredReceipt {
    reference: String,
    effective_at_s: u64,
    flow_rate: String,
}

struct Ledger;

fn invalid(m: impl Into<String>) -> RailError {
    RailError::InvalidPayment(m.into())
}

fn config(text: &str) -> Result<Config, RailError> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(|e| invalid(format!("ledger config: {e}")))
}

fn kv_unavailable(e: kv_store::KvError) -> RailError {
    RailError::Unavailable(match e {
        kv_store::KvError::InvalidKey(n) => format!("kv key longer than {n} bytes (shorten the pool name)"),
        kv_store::KvError::QuotaExceeded(n) => format!("the ledger's kv-store is full ({n} bytes)"),
        kv_store::KvError::Unavailable(m) => m,
    })
}

fn load(pool: &str) -> Result<Option<PoolRecord>, RailError> {
    match kv_store::get(&format!("pool:{pool}")).map_err(kv_unavailable)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| RailError::Unavailable(format!("pool record unreadable: {e}"))),
    }
}

fn store(pool: &str, record: &PoolRecord) -> Result<(), RailError> {
    let bytes = serde_json::to_vec(record).map_err(|e| RailError::Unavailable(e.to_string()))?;
    kv_store::set(&format!("pool:{pool}"), &bytes).map_err(kv_unavailable)
}

fn overflow() -> RailError {
    invalid("the ledger's arithmetic would pass 128 bits")
}

/// Brings every member's balance to `now_s` at the current rate.
fn accrue(record: &mut PoolRecord, now_s: u64) -> Result<(), RailError> {
    let per_unit = parse_amount("per-unit rate", &record.per_unit_rate).map_err(|e| RailError::Unavailable(e))?;
    // A clock that stepped back accrues nothing rather than a negative amount; `since` stays put.
    let elapsed = u128::from(now_s.saturating_sub(record.since_s));
    for (member, units) in &record.units {
        let earned = per_unit.checked_mul(u128::from(*units)).and_then(|x| x.checked_mul(elapsed)).ok_or_else(overflow)?;
        let balance = record.balances.get(member).map(|b| parse_amount("balance", b)).transpose().map_err(RailError::Unavailable)?.unwrap_or(0);
        record.balances.insert(member.clone(), balance.checked_add(earned).ok_or_else(overflow)?.to_string());
    }
    record.since_s = record.since_s.max(now_s);
    Ok(())
}

fn change_flow(config_text: &str, change: FlowChange, stop: bool) -> Result<FlowReceipt, RailError> {
    let config = config(config_text)?;
    if change.pool.is_empty() {
        return Err(invalid("the pool (ledger account) is empty"));
    }
    if change.idempotency_key.is_empty() {
        return Err(invalid("the idempotency key is empty"));
    }
    if change.token != config.unit {
        return Err(invalid(format!("token `{}`: this ledger counts `{}`", change.token, config.unit)));
    }
    let requested = if stop { 0 } else { parse_amount("flow-rate", &change.flow_rate).map_err(invalid)? };
    let mut record = load(&change.pool)?.unwrap_or_else(|| PoolRecord { unit: config.unit.clone(), per_unit_rate: "0".into(), ..PoolRecord::default() });
    if let Some((_, r)) = record.recent.iter().find(|(k, _)| *k == change.idempotency_key) {
        return Ok(FlowReceipt { reference: r.reference.clone(), effective_at_s: r.effective_at_s, flow_rate: r.flow_rate.clone() });
    }
    let now_s = clock::wall_now_ms() / 1000;
    accrue(&mut record, now_s)?;
    if !stop {
        for m in &change.members {
            if m.address.is_empty() {
                return Err(invalid("a member's address is empty"));
            }
            record.units.insert(m.address.clone(), m.units);
        }
        record.units.retain(|_, u| *u > 0);
    }
    let total_units: u128 = record.units.values().map(|u| u128::from(*u)).sum();
    let per_unit = if total_units == 0 { 0 } else { requested / total_units };
    record.per_unit_rate = per_unit.to_string();
    record.changes += 1;
    let receipt = StoredReceipt {
        reference: format!("ledger:{}:{}", change.pool, record.changes),
        effective_at_s: record.since_s,
        flow_rate: (per_unit * total_units).to_string(),
    };
    record.recent.push((change.idempotency_key.clone(), receipt.clone()));
    if record.recent.len() > RECENT_RECEIPTS {
        record.recent.remove(0);
    }
    store(&change.pool, &record)?;
    Ok(FlowReceipt { reference: receipt.reference, effective_at_s: receipt.effective_at_s, flow_rate: receipt.flow_rate })
}

const NO_PAYMENTS: &str = "the ledger rail takes no client payments (a private pool's members settle among themselves); \
                           pair the pool with a payment rail such as x402-exact to charge clients";

impl Guest for Ledger {
    fn info(config_text: String) -> Result<RailInfo, RailError> {
        let config = config(&config_text)?;
        Ok(RailInfo { name: "ledger".into(), scheme: "ledger".into(), network: "ledger".into(), asset: config.unit, payments: false, streams: true })
    }

    fn quote(_: String, _: QuoteRequest) -> Result<PaymentRequirements, RailError> {
        Err(RailError::Unsupported(NO_PAYMENTS.to_string()))
    }

    fn verify(_: String, _: PaymentRequirements, _: String) -> Result<VerifiedPayment, RailError> {
        Err(RailError::Unsupported(NO_PAYMENTS.to_string()))
    }

    fn settle(_: String, _: VerifiedPayment) -> Result<Settlement, RailError> {
        Err(RailError::Unsupported(NO_PAYMENTS.to_string()))
    }

    fn stream_start(config: String, change: FlowChange) -> Result<FlowReceipt, RailError> {
        change_flow(&config, change, false)
    }

    fn stream_stop(config: String, change: FlowChange) -> Result<FlowReceipt, RailError> {
        change_flow(&config, change, true)
    }
}

export!(Ledger);
