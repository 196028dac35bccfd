//! Payment-rail plugins (`computepool:payment-rail`): what the orchestrator calls to price a request, check
//! and settle a client's payment, and start, change and stop the flow of money to a pool's members. Each
//! supported WIT version is a file (`since_v0_1_0.rs`); this module is what callers see.
//!
//! Calls block: a rail reaches its facilitator and the chain through the host's `http` and `chain`
//! capabilities, which wait for the network (seconds, for a transaction). Call them from a thread that
//! may block — on a tokio runtime, inside `tokio::task::spawn_blocking` — never from an async task (the
//! host does not deadlock there, see [`crate::blocking`], but it stalls the task's worker thread).
//!
//! Every call runs with the plugin's fuel and memory limits in a pooled instance; a trapped instance is
//! dropped, never reused. Fuel bounds the plugin's own work; time spent waiting in `http` and `chain` is
//! bounded by those capabilities' deadlines. The flow calls of one pool are serialised (a rail keeps a
//! pool's state in its kv-store or on chain, read-modify-write), so concurrent callers cannot interleave
//! a pool's changes. Amounts cross the WIT boundary as decimal strings and are `u128` here; a plugin that
//! returns something else broke its contract ([`CallError::ContractBreach`]).
//!
//! ```no_run
//! # fn demo(host: &computepool_plugin_host::PluginHost) -> Result<(), Box<dyn std::error::Error>> {
//! use computepool_plugin_host::rail::{FlowChange, FlowMember};
//! let rail = host.rail("ledger").expect("loaded");
//! let bound = rail.bind(r#"{"unit": "wei"}"#)?;          // checks the pool's config (`info`)
//! let change = FlowChange {
//!     idempotency_key: "req-1/start".into(),
//!     pool: "pool-7".into(),
//!     token: "wei".into(),
//!     members: vec![FlowMember { address: "op-a".into(), units: 1 }],
//!     flow_rate: 1_000,
//! };
//! let receipt = bound.stream_start(&change)?;           // blocks
//! # Ok(()) }
//! ```

mod since_v0_1_0;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, Store};

use crate::chain_capability::ChainAccess;
use crate::error::{CallError, LoadError};
use crate::host_state::HostState;
use crate::http_capability::HttpAccess;
use crate::kv_store::KvScope;
use crate::manifest::PluginManifest;
use crate::pool::{Failed, Grants, InstancePool, Instantiate, unsupported_version, world_mismatch};
use crate::world::WitVersion;

/// The payment-rail versions this host serves, oldest first.
pub const SUPPORTED_VERSIONS: &[WitVersion] = &[WitVersion::V0_1_0];

/// What a rail is, under one configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RailInfo {
    pub name: String,
    /// e.g. "exact", "gda-stream", "ledger".
    pub scheme: String,
    /// e.g. "eip155:16602", or "ledger".
    pub network: String,
    /// The asset's address, or the ledger's unit.
    pub asset: String,
    /// Whether quote / verify / settle take client payments.
    pub payments: bool,
    /// Whether stream-start / stream-stop move money.
    pub streams: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteRequest {
    /// The host's request id; the idempotency key of what follows.
    pub request_id: String,
    /// The resource paid for (the request's URL).
    pub resource: String,
    pub model: String,
    /// The most the request may run, in seconds.
    pub max_seconds: u32,
    /// Atomic units of the asset per second.
    pub price_per_second: u128,
    /// The recipient; empty for the rail's configured one.
    pub pay_to: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRequirements {
    /// The x402 `PaymentRequirements` JSON object.
    pub body: String,
    pub max_amount: u128,
    /// Unix seconds.
    pub valid_until: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedPayment {
    pub request_id: String,
    pub payer: String,
    pub amount: u128,
    /// Opaque rail data `settle` needs.
    pub settlement_data: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// Transaction hash or facilitator receipt id.
    pub reference: String,
    pub amount: u128,
    pub payer: String,
    pub network: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowMember {
    pub address: String,
    pub units: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowChange {
    /// A retried change with the same key returns the first receipt and changes nothing.
    pub idempotency_key: String,
    /// The GDA pool's address, or the ledger account.
    pub pool: String,
    /// The Super Token's address, or the ledger's unit.
    pub token: String,
    pub members: Vec<FlowMember>,
    /// Total atomic units per second to all members (ignored by stream-stop).
    pub flow_rate: u128,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowReceipt {
    /// Transaction hash, or ledger entry id.
    pub reference: String,
    /// When the rate took effect, Unix seconds (block timestamp, or the host clock for the ledger).
    pub effective_at_s: u64,
    /// What flows after the rail's rounding.
    pub flow_rate: u128,
}

/// The rail's own answer when it refuses (WIT's `rail-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RailError {
    #[error("invalid: {0}")]
    InvalidPayment(String),
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("unavailable (retrying is safe): {0}")]
    Unavailable(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
}

/// A failed rail call: the rail refused (typed), or the plugin failed (trap, fuel, memory, contract).
#[derive(Debug, thiserror::Error)]
pub enum RailCallError {
    #[error("rail `{id}`: {error}")]
    Rail { id: String, error: RailError },
    #[error(transparent)]
    Plugin(#[from] CallError),
}

impl RailCallError {
    /// The rail's own error, if it was one.
    pub fn rail_error(&self) -> Option<&RailError> {
        match self {
            RailCallError::Rail { error, .. } => Some(error),
            RailCallError::Plugin(_) => None,
        }
    }
}

enum RailBindings {
    V0_1_0(since_v0_1_0::PaymentRail),
}

/// A loaded payment-rail plugin. Shared between threads; each call takes an instance from the pool.
pub struct RailPlugin {
    pool: InstancePool<RailBindings>,
    /// One lock per pool: a pool's flow changes run one at a time.
    pool_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// Network capabilities a rail was granted, handed to its instances.
pub(crate) struct RailNetwork {
    pub http: Option<HttpAccess>,
    pub chain: Option<ChainAccess>,
}

impl RailPlugin {
    pub(crate) fn type_only_imports(version: WitVersion) -> &'static [&'static str] {
        match version {
            WitVersion::V0_1_0 => since_v0_1_0::TYPE_ONLY_IMPORTS,
            _ => &[],
        }
    }

    pub(crate) fn required_export(version: WitVersion) -> Option<&'static str> {
        match version {
            WitVersion::V0_1_0 => Some(since_v0_1_0::EXPORT),
            _ => None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        engine: &Engine,
        linker: &Linker<HostState>,
        component: &Component,
        manifest: &PluginManifest,
        kv: KvScope,
        network: RailNetwork,
        max_idle: usize,
        metered: bool,
    ) -> Result<Self, LoadError> {
        let instantiate: Instantiate<RailBindings> = match manifest.wit.version {
            WitVersion::V0_1_0 => {
                let pre = since_v0_1_0::pre(linker, component).map_err(world_mismatch(manifest))?;
                Box::new(move |store| Ok(RailBindings::V0_1_0(since_v0_1_0::instantiate(&pre, store)?)))
            }
            _ => return Err(unsupported_version(manifest, SUPPORTED_VERSIONS)),
        };
        let grants = Grants { kv, http: network.http, chain: network.chain };
        Ok(Self {
            pool: InstancePool::new(engine, manifest, "rail", grants, max_idle, metered, instantiate)?,
            pool_locks: Mutex::new(HashMap::new()),
        })
    }

    pub fn id(&self) -> &str {
        self.pool.id()
    }

    pub fn is_disabled(&self) -> bool {
        self.pool.is_disabled()
    }

    pub fn idle_instances(&self) -> usize {
        self.pool.idle_instances()
    }

    /// Runs one call in a pooled instance (see [`InstancePool::call`]). `check` turns the plugin's raw
    /// answer into the caller's type; a failed check is a contract breach.
    fn run<R, T>(
        &self,
        call: impl FnOnce(&mut RailBindings, &mut Store<HostState>) -> wasmtime::Result<Result<R, RailError>>,
        check: impl FnOnce(R) -> Result<T, String>,
    ) -> Result<T, RailCallError> {
        let checked = |raw: R| check(raw).map_err(|message| self.pool.breach(message));
        self.pool.call(call, checked).map_err(|failed| match failed {
            Failed::Refused(error) => RailCallError::Rail { id: self.id().to_string(), error },
            Failed::Plugin(e) => e.into(),
        })
    }

    fn pool_lock(&self, pool: &str) -> Arc<Mutex<()>> {
        let mut locks = self.pool_locks.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(pool.to_string()).or_default().clone()
    }

    /// Describes the rail under `config` (a JSON object), or says what is wrong with it.
    pub fn info(&self, config: &str) -> Result<RailInfo, RailCallError> {
        self.run(
            |b, store| match b {
                RailBindings::V0_1_0(r) => since_v0_1_0::info(r, store, config),
            },
            Ok,
        )
    }

    /// Checks `config` and binds it: the handle a pool keeps and calls.
    pub fn bind(self: &Arc<Self>, config: impl Into<String>) -> Result<BoundRail, RailCallError> {
        let config = config.into();
        let info = self.info(&config)?;
        Ok(BoundRail { plugin: self.clone(), config, info })
    }

    pub fn quote(&self, config: &str, request: &QuoteRequest) -> Result<PaymentRequirements, RailCallError> {
        self.run(
            |b, store| match b {
                RailBindings::V0_1_0(r) => since_v0_1_0::quote(r, store, config, request),
            },
            |raw| {
                Ok(PaymentRequirements {
                    body: raw.body,
                    max_amount: parse_amount("max-amount", &raw.max_amount)?,
                    valid_until: raw.valid_until,
                })
            },
        )
    }

    pub fn verify(&self, config: &str, requirements: &PaymentRequirements, payment_header: &str) -> Result<VerifiedPayment, RailCallError> {
        self.run(
            |b, store| match b {
                RailBindings::V0_1_0(r) => since_v0_1_0::verify(r, store, config, requirements, payment_header),
            },
            |raw| {
                Ok(VerifiedPayment {
                    request_id: raw.request_id,
                    payer: raw.payer,
                    amount: parse_amount("amount", &raw.amount)?,
                    settlement_data: raw.settlement_data,
                })
            },
        )
    }

    pub fn settle(&self, config: &str, payment: &VerifiedPayment) -> Result<Settlement, RailCallError> {
        self.run(
            |b, store| match b {
                RailBindings::V0_1_0(r) => since_v0_1_0::settle(r, store, config, payment),
            },
            |raw| {
                Ok(Settlement {
                    reference: raw.reference,
                    amount: parse_amount("amount", &raw.amount)?,
                    payer: raw.payer,
                    network: raw.network,
                })
            },
        )
    }

    /// Sets the members' units and the total rate (also to change the rate while flowing). Blocks until
    /// the change took effect (a GDA rail: until its transactions are mined).
    pub fn stream_start(&self, config: &str, change: &FlowChange) -> Result<FlowReceipt, RailCallError> {
        let lock = self.pool_lock(&change.pool);
        let _serialised = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.run(
            |b, store| match b {
                RailBindings::V0_1_0(r) => since_v0_1_0::stream_start(r, store, config, change),
            },
            |raw| flow_receipt(raw, Some(change.flow_rate)),
        )
    }

    /// Stops the flow (rate 0).
    pub fn stream_stop(&self, config: &str, change: &FlowChange) -> Result<FlowReceipt, RailCallError> {
        let lock = self.pool_lock(&change.pool);
        let _serialised = lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.run(
            |b, store| match b {
                RailBindings::V0_1_0(r) => since_v0_1_0::stream_stop(r, store, config, change),
            },
            |raw| flow_receipt(raw, Some(0)),
        )
    }
}

fn parse_amount(what: &str, text: &str) -> Result<u128, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} `{text}` is not a decimal amount"));
    }
    text.parse().map_err(|_| format!("{what} `{text}` does not fit in 128 bits"))
}

/// A receipt's rate may be rounded down from the requested one, never up.
fn flow_receipt(raw: since_v0_1_0::RawReceipt, at_most: Option<u128>) -> Result<FlowReceipt, String> {
    let flow_rate = parse_amount("flow-rate", &raw.flow_rate)?;
    if let Some(max) = at_most
        && flow_rate > max
    {
        return Err(format!("the receipt's flow rate {flow_rate} is above the requested {max}"));
    }
    Ok(FlowReceipt { reference: raw.reference, effective_at_s: raw.effective_at_s, flow_rate })
}

/// A rail bound to one pool's configuration: what the orchestrator keeps per pool. Cheap to clone.
#[derive(Clone)]
pub struct BoundRail {
    plugin: Arc<RailPlugin>,
    config: String,
    info: RailInfo,
}

impl std::fmt::Debug for BoundRail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundRail").field("plugin", &self.plugin.id()).field("info", &self.info).finish_non_exhaustive()
    }
}

impl BoundRail {
    pub fn plugin(&self) -> &Arc<RailPlugin> {
        &self.plugin
    }

    /// The config's JSON text.
    pub fn config(&self) -> &str {
        &self.config
    }

    /// What `info` said when the config was bound.
    pub fn info(&self) -> &RailInfo {
        &self.info
    }

    pub fn quote(&self, request: &QuoteRequest) -> Result<PaymentRequirements, RailCallError> {
        self.plugin.quote(&self.config, request)
    }

    pub fn verify(&self, requirements: &PaymentRequirements, payment_header: &str) -> Result<VerifiedPayment, RailCallError> {
        self.plugin.verify(&self.config, requirements, payment_header)
    }

    pub fn settle(&self, payment: &VerifiedPayment) -> Result<Settlement, RailCallError> {
        self.plugin.settle(&self.config, payment)
    }

    pub fn stream_start(&self, change: &FlowChange) -> Result<FlowReceipt, RailCallError> {
        self.plugin.stream_start(&self.config, change)
    }

    pub fn stream_stop(&self, change: &FlowChange) -> Result<FlowReceipt, RailCallError> {
        self.plugin.stream_stop(&self.config, change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_decimal_u128() {
        assert_eq!(parse_amount("a", "0"), Ok(0));
        assert_eq!(parse_amount("a", &u128::MAX.to_string()), Ok(u128::MAX));
        assert!(parse_amount("a", "340282366920938463463374607431768211456").unwrap_err().contains("128 bits"));
        for bad in ["", "-1", "1e3", " 1", "0x10"] {
            assert!(parse_amount("a", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_receipt_may_round_down_never_up() {
        let raw = |rate: &str| since_v0_1_0::RawReceipt { reference: "r".into(), effective_at_s: 1, flow_rate: rate.into() };
        assert_eq!(flow_receipt(raw("99"), Some(100)).unwrap().flow_rate, 99);
        assert!(flow_receipt(raw("101"), Some(100)).unwrap_err().contains("above"));
        assert!(flow_receipt(raw("1"), Some(0)).is_err());
    }
}
