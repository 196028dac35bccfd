//! The rail plugins as the orchestrator uses them: the challenge rail's quote / verify / settle around the
//! session store, and the flow rail behind the meter's [`FlowRail`]. Every call here blocks (a rail waits
//! for its facilitator or for a mined transaction): callers run them on tokio's blocking pool.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use computepool_pay::meter::{FlowChange, FlowRail, FlowReceipt, RailFailure};
use computepool_pay::session::Sessions;
use computepool_pay::x402::{
    ErrorReason, ExactEvmPayload, PaymentPayload, PaymentPayloadV1, PaymentRequirements, decode_header,
};
use computepool_plugin_host::PluginHost;
use computepool_plugin_host::rail::{self as plugin, RailCallError, RailError, RailPlugin};
use sha2::{Digest, Sha256};

use super::config::{PoolPayments, RailChoice};
use crate::keeping::KeeperService;
use computepool_keeper::transition::{Transition, TransitionKind};
use crate::error::ApiError;
use crate::store::Store;

/// Why a payment was not taken.
#[derive(Debug)]
pub enum ChallengeFailure {
    /// The payment is bad (answer with a 402 carrying the reason).
    Refused { reason: ErrorReason, message: String },
    /// Something on our side failed (the rail, the store): a 5xx.
    Internal(ApiError),
}

/// A payment taken: settled, and credited to the payer's session.
#[derive(Debug)]
pub struct TakenPayment {
    pub payer: String,
    pub amount: u128,
    pub reference: String,
    pub network: String,
    pub session_id: String,
    /// The session's secret, when this payment opened the session.
    pub secret: Option<String>,
}

/// The rail plugins of a [`PluginHost`], and which flow rail each pool uses.
pub struct PluginRails {
    host: Arc<PluginHost>,
    /// Set when keepers are on: a flow whose plugin is a keeper-adapter runs each change as a
    /// stream-start / stream-stop transition through it (logged, confirmed on chain).
    keepers: Option<Arc<KeeperService>>,
    flows: RwLock<HashMap<String, RailChoice>>,
    /// Per pool, the members (with units) the flow rail last confirmed. A change whose members are the
    /// same lists none (a rail keeps the units it has: on chain each listed member is a transaction).
    confirmed_members: Mutex<HashMap<String, Vec<plugin::FlowMember>>>,
}

impl PluginRails {
    pub fn new(host: Arc<PluginHost>, keepers: Option<Arc<KeeperService>>) -> Self {
        Self { host, keepers, flows: RwLock::new(HashMap::new()), confirmed_members: Mutex::new(HashMap::new()) }
    }

    /// The keeper service, when `id` names one of its keeper plugins.
    fn keeper_for(&self, id: &str) -> Option<&Arc<KeeperService>> {
        self.keepers.as_ref().filter(|k| k.is_keeper(id))
    }

    fn rail(&self, id: &str) -> Result<Arc<RailPlugin>, ApiError> {
        self.host.rail(id).ok_or_else(|| {
            ApiError::PaymentUnavailable(format!("the payment rail `{id}` is not loaded"))
        })
    }

    /// Both rails are loaded and accept their configs, and each does its part (the challenge rail takes
    /// payments, the flow rail streams).
    pub fn check(&self, settings: &PoolPayments) -> Result<(), ApiError> {
        for (role, choice) in [("challenge", &settings.challenge), ("flow", &settings.flow)] {
            if role == "flow" && self.keeper_for(&choice.plugin).is_some() {
                // A keeper runs the pool's stream workflows on its GDA pool and Super Token.
                if choice.target.is_none() || choice.token.is_none() {
                    return Err(ApiError::invalid(
                        "flow",
                        format!("flow through keeper `{}` needs `target` (the GDA pool) and `token` (the Super Token)", choice.plugin),
                    ));
                }
                continue;
            }
            let rail = self.host.rail(&choice.plugin).ok_or_else(|| {
                ApiError::invalid(format!("{role}.plugin"), format!("no payment-rail plugin `{}` is loaded", choice.plugin))
            })?;
            let info = rail
                .info(&config_text(choice))
                .map_err(|e| ApiError::invalid(format!("{role}.config"), format!("rail `{}` refused its config: {e}", choice.plugin)))?;
            let fits = if role == "challenge" { info.payments } else { info.streams };
            if !fits {
                let what = if role == "challenge" { "take client payments" } else { "stream to members" };
                return Err(ApiError::invalid(format!("{role}.plugin"), format!("rail `{}` does not {what}", choice.plugin)));
            }
        }
        Ok(())
    }

    /// Makes `choice` the flow rail of `pool` (the meter's rate changes for it go there). A different
    /// choice than before (another rail, target or config) makes the next change list the members
    /// afresh: a swapped-in rail has not seen them. The same choice again (the pool's members were
    /// recomputed) keeps what the rail confirmed, so the next change sets a member that left to 0
    /// units there; forgetting it would leave that member its units, and its share of every flow.
    pub fn bind_flow(&self, pool: &str, choice: &RailChoice) {
        let previous = self.flows.write().unwrap_or_else(|p| p.into_inner()).insert(pool.to_string(), choice.clone());
        if previous.as_ref() != Some(choice) {
            self.confirmed_members.lock().unwrap_or_else(|p| p.into_inner()).remove(pool);
        }
    }

    /// The requirements a client must pay for one request: price × the pool's max seconds.
    pub fn quote(
        &self,
        settings: &PoolPayments,
        price: u128,
        model: &str,
        request_id: &str,
        resource: &str,
    ) -> Result<PaymentRequirements, ApiError> {
        let rail = self.rail(&settings.challenge.plugin)?;
        let quote = quote_request(settings, price, model, request_id, resource);
        let quoted = rail.quote(&config_text(&settings.challenge), &quote).map_err(|e| rail_unavailable(&rail, e))?;
        serde_json::from_str(&quoted.body)
            .map_err(|e| ApiError::Internal(format!("rail `{}` quoted requirements that do not parse: {e}", rail.id())))
    }

    /// Verifies the client's payment, writes the intent to credit it, settles it and credits the payer's
    /// session: the voucher is credited once however often this runs for it.
    #[allow(clippy::too_many_arguments)]
    pub fn take_payment(
        &self,
        sessions: &Sessions,
        settings: &PoolPayments,
        price: u128,
        model: &str,
        request_id: &str,
        resource: &str,
        payment: &str,
        journal: &Store,
    ) -> Result<TakenPayment, ChallengeFailure> {
        let rail = self.rail(&settings.challenge.plugin).map_err(ChallengeFailure::Internal)?;
        let config = config_text(&settings.challenge);
        let plugin_quote = quote_request(settings, price, model, request_id, resource);
        let requirements = rail.quote(&config, &plugin_quote).map_err(|e| ChallengeFailure::Internal(rail_unavailable(&rail, e)))?;
        let verified = rail.verify(&config, &requirements, payment).map_err(|e| refused(&rail, e))?;
        let voucher = voucher_key(payment, &verified.payer);
        let ticket = sessions
            .begin_credit(&verified.payer, &voucher, verified.amount)
            .map_err(|e| ChallengeFailure::Internal(ApiError::Internal(format!("recording the payment: {e}"))))?;
        journal
            .put_pending_voucher(&voucher, rail.id(), &config, &verified_json(&verified))
            .map_err(|e| ChallengeFailure::Internal(ApiError::Internal(format!("recording the payment: {e}"))))?;
        let settlement = match rail.settle(&config, &verified) {
            Ok(s) => s,
            Err(e) => {
                let failure = refused(&rail, e);
                // Only a definite refusal releases the voucher; an unknown outcome stays pending.
                if let ChallengeFailure::Refused { message, .. } = &failure {
                    if let Err(e) = sessions.fail_credit(&voucher, message) {
                        tracing::error!(voucher, "could not record a refused settlement: {e}");
                    } else if let Err(e) = journal.forget_pending_voucher(&voucher) {
                        tracing::warn!(voucher, "could not clear a resolved voucher: {e}");
                    }
                }
                return Err(failure);
            }
        };
        let credited = sessions
            .complete_credit(&voucher, &settlement.reference)
            .map_err(|e| ChallengeFailure::Internal(ApiError::Internal(format!("crediting the payment: {e}"))))?;
        if let Err(e) = journal.forget_pending_voucher(&voucher) {
            tracing::warn!(voucher, "could not clear a resolved voucher: {e}");
        }
        Ok(TakenPayment {
            payer: verified.payer,
            amount: settlement.amount,
            reference: settlement.reference,
            network: settlement.network,
            // The credit may have gone to a session opened just now (the ticket's closed meanwhile).
            secret: credited.secret.or(ticket.secret),
            session_id: credited.session_id,
        })
    }
}

impl PluginRails {
    /// Settles the vouchers a previous run verified and began to settle but never saw answered (it
    /// stopped in between): settling is idempotent per voucher (the facilitator returns the first
    /// transaction if there was one), so the payer is credited exactly once. Returns how many were
    /// credited.
    pub fn settle_pending(&self, sessions: &Sessions, journal: &Store) -> usize {
        let pending = match sessions.pending_credits() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("reading the vouchers awaiting settlement: {e}");
                return 0;
            }
        };
        let mut credited = 0;
        for credit in pending {
            let key = credit.voucher_key.as_str();
            let record = match journal.pending_voucher(key) {
                Ok(Some(record)) => record,
                Ok(None) => {
                    tracing::error!(voucher = key, "a voucher awaits settlement but its payment was not recorded: check the chain");
                    continue;
                }
                Err(e) => {
                    tracing::error!(voucher = key, "reading a pending voucher: {e}");
                    continue;
                }
            };
            let (rail_id, config, payment) = record;
            let Some(rail) = self.host.rail(&rail_id) else {
                tracing::error!(voucher = key, rail = rail_id, "the rail of a pending voucher is not loaded: retried at the next start");
                continue;
            };
            let Some(verified) = verified_from_json(&payment) else {
                tracing::error!(voucher = key, "a pending voucher's record does not parse");
                continue;
            };
            match rail.settle(&config, &verified) {
                Ok(settlement) => match sessions.complete_credit(key, &settlement.reference) {
                    Ok(_) => {
                        credited += 1;
                        let _ = journal.forget_pending_voucher(key);
                        tracing::info!(voucher = key, tx = settlement.reference, "a voucher left pending by the last run is credited");
                    }
                    Err(e) => tracing::error!(voucher = key, "crediting a pending voucher: {e}"),
                },
                Err(e) if matches!(e.rail_error(), Some(RailError::Rejected(_) | RailError::InvalidPayment(_))) => {
                    if sessions.fail_credit(key, &e.to_string()).is_ok() {
                        let _ = journal.forget_pending_voucher(key);
                    }
                    tracing::warn!(voucher = key, "a voucher left pending by the last run did not settle: {e}");
                }
                Err(e) => tracing::error!(voucher = key, "settling a pending voucher (retried at the next start): {e}"),
            }
        }
        credited
    }
}

fn verified_json(v: &plugin::VerifiedPayment) -> String {
    serde_json::json!({"request_id": v.request_id, "payer": v.payer, "amount": v.amount.to_string(),
                       "settlement_data": v.settlement_data})
    .to_string()
}

fn verified_from_json(text: &str) -> Option<plugin::VerifiedPayment> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    Some(plugin::VerifiedPayment {
        request_id: v["request_id"].as_str()?.to_string(),
        payer: v["payer"].as_str()?.to_string(),
        amount: v["amount"].as_str()?.parse().ok()?,
        settlement_data: v["settlement_data"].as_str()?.to_string(),
    })
}

impl FlowRail for PluginRails {
    fn set_flow(&self, change: &FlowChange) -> Result<FlowReceipt, RailFailure> {
        let choice = self
            .flows
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&change.pool)
            .cloned()
            .ok_or_else(|| RailFailure::new(format!("pool {} has no flow rail configured", change.pool)))?;
        let members = change
            .members
            .iter()
            .map(|m| {
                let units = u64::try_from(m.units).map_err(|_| RailFailure::new(format!("{} units do not fit 64 bits", m.operator)))?;
                Ok(plugin::FlowMember { address: m.operator.clone(), units })
            })
            .collect::<Result<Vec<_>, RailFailure>>()?;
        // Members the rail has that the change leaves out go to 0 units (a rail keeps unlisted members').
        let listed = {
            let confirmed = self.confirmed_members.lock().unwrap_or_else(|p| p.into_inner());
            match confirmed.get(&change.pool) {
                Some(previous) if *previous == members => Vec::new(),
                Some(previous) => {
                    let mut listed = members.clone();
                    for gone in previous.iter().filter(|p| !members.iter().any(|m| m.address == p.address)) {
                        listed.push(plugin::FlowMember { address: gone.address.clone(), units: 0 });
                    }
                    listed
                }
                None => members.clone(),
            }
        };
        let mut plugin_change = plugin::FlowChange {
            idempotency_key: change.idempotency_key.clone(),
            pool: choice.target.clone().unwrap_or_else(|| change.pool.clone()),
            token: change.token.clone(),
            members: if change.is_stop() { Vec::new() } else { listed },
            flow_rate: change.flow_rate_per_s,
        };
        let scale = choice.scale().map_err(|e| RailFailure::new(e.to_string()))?;
        plugin_change.flow_rate = change
            .flow_rate_per_s
            .checked_mul(scale)
            .ok_or_else(|| RailFailure::new(format!("rate {} × scale {scale} overflows", change.flow_rate_per_s)))?;
        let receipt = match self.keeper_for(&choice.plugin) {
            Some(keepers) => keeper_flow(keepers, &choice.plugin, &change.pool, &plugin_change, change.is_stop())?,
            None => {
                let rail = self
                    .host
                    .rail(&choice.plugin)
                    .ok_or_else(|| RailFailure::new(format!("the flow rail `{}` is not loaded", choice.plugin)))?;
                let config = config_text(&choice);
                if change.is_stop() { rail.stream_stop(&config, &plugin_change) } else { rail.stream_start(&config, &plugin_change) }
                    .map_err(|e| RailFailure::new(e.to_string()))?
            }
        };
        if !change.is_stop() {
            self.confirmed_members.lock().unwrap_or_else(|p| p.into_inner()).insert(change.pool.clone(), members);
        }
        // Back in the price's unit: a rate that is not a whole number of them was rounded by the rail.
        if receipt.flow_rate % scale != 0 {
            return Err(RailFailure::new(format!(
                "rail `{}` flows {} per second, not a multiple of the scale {scale}: its rounding would lose money",
                choice.plugin, receipt.flow_rate
            )));
        }
        Ok(FlowReceipt { reference: receipt.reference, effective_at_s: receipt.effective_at_s, flow_rate_per_s: receipt.flow_rate / scale })
    }
}

/// One flow change as a keeper transition (stream-start, or stream-stop at rate 0), under the meter's
/// idempotency key: a retry or a restart picks the logged transition up instead of acting again. The
/// receipt's time is the block of the last transaction, read back from the chain.
fn keeper_flow(
    keepers: &KeeperService,
    keeper: &str,
    pool_id: &str,
    change: &plugin::FlowChange,
    stop: bool,
) -> Result<plugin::FlowReceipt, RailFailure> {
    let members: Vec<serde_json::Value> = change
        .members
        .iter()
        .map(|m| serde_json::json!({"operator": m.address, "units": m.units.to_string()}))
        .collect();
    let (kind, payload) = if stop {
        (TransitionKind::StreamStop, serde_json::json!({"pool": change.pool, "token": change.token, "from": keepers.sender()}))
    } else {
        (
            TransitionKind::StreamStart,
            serde_json::json!({"pool": change.pool, "token": change.token, "from": keepers.sender(),
                               "flowRate": change.flow_rate.to_string(), "members": members}),
        )
    };
    let transition = Transition { kind, idempotency_key: change.idempotency_key.clone(), pool_id: pool_id.to_string(), payload };
    let settled = keepers.run(keeper, &transition).map_err(|e| RailFailure::new(e.to_string()))?;
    let last = settled
        .transactions
        .last()
        .ok_or_else(|| RailFailure::new(format!("keeper `{keeper}` settled {} without a transaction", change.idempotency_key)))?;
    Ok(plugin::FlowReceipt { reference: last.hash.clone(), effective_at_s: last.block_timestamp, flow_rate: change.flow_rate })
}

/// What the challenge rail is asked to price: one request of the pool's max seconds, paid to the rail's
/// configured recipient. The same inputs give the same requirements, so the voucher a client signed for
/// a 402 is checked against what it was shown.
fn quote_request(settings: &PoolPayments, price: u128, model: &str, request_id: &str, resource: &str) -> plugin::QuoteRequest {
    plugin::QuoteRequest {
        request_id: request_id.to_string(),
        resource: resource.to_string(),
        model: model.to_string(),
        max_seconds: settings.max_seconds_per_request,
        price_per_second: price,
        pay_to: String::new(),
    }
}

/// The JSON config a rail gets (an empty object when the pool gives none).
fn config_text(choice: &RailChoice) -> String {
    if choice.config.is_null() { "{}".to_string() } else { choice.config.to_string() }
}

/// What the flow pays in (see [`RailChoice::token`]).
pub fn flow_token(choice: &RailChoice) -> String {
    let from_config = |key: &str| choice.config.get(key).and_then(|t| t.as_str()).map(str::to_string);
    choice.token.clone().or_else(|| from_config("token")).or_else(|| from_config("unit")).unwrap_or_else(|| choice.plugin.clone())
}

/// One key per voucher: for exact EVM the network, token, payer and EIP-3009 nonce (what the token itself
/// refuses to use twice); for anything else the payment's hash.
fn voucher_key(payment: &str, payer: &str) -> String {
    let exact = |network: &str, asset: &str, payload: &serde_json::Value| {
        let auth = ExactEvmPayload::from_value(payload).ok()?.authorization;
        Some(format!("{network}/{}/{}/{}", asset.to_ascii_lowercase(), auth.from.to_ascii_lowercase(), auth.nonce.to_ascii_lowercase()))
    };
    if let Ok(p) = decode_header::<PaymentPayload>(payment)
        && let Some(key) = exact(&p.accepted.network, &p.accepted.asset, &p.payload)
    {
        return key;
    }
    if let Ok(p) = decode_header::<PaymentPayloadV1>(payment)
        && let Some(key) = exact(&p.network, "", &p.payload)
    {
        return key;
    }
    format!("sha256/{}/{}", payer.to_ascii_lowercase(), hex::encode(Sha256::digest(payment.as_bytes())))
}

/// A rail's refusal as a 402 reason: the x402-exact rail puts the facilitator's reason first
/// (`reason: message`); anything else is `invalid_payload`.
fn refused(rail: &RailPlugin, e: RailCallError) -> ChallengeFailure {
    match e.rail_error() {
        Some(RailError::InvalidPayment(m) | RailError::Rejected(m)) => {
            let (reason, message) = match m.split_once(':') {
                Some((head, rest)) if head.parse::<ErrorReason>().is_ok_and(|r| !matches!(r, ErrorReason::Other(_))) => {
                    (head.parse().expect("checked"), rest.trim().to_string())
                }
                _ => (ErrorReason::InvalidPayload, m.clone()),
            };
            ChallengeFailure::Refused { reason, message }
        }
        _ => ChallengeFailure::Internal(rail_unavailable(rail, e)),
    }
}

fn rail_unavailable(rail: &RailPlugin, e: RailCallError) -> ApiError {
    ApiError::PaymentUnavailable(format!("rail `{}`: {e}", rail.id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_vouchers_record_round_trips() {
        let v = plugin::VerifiedPayment {
            request_id: "0xabc".into(),
            payer: "0x00000000000000000000000000000000000000aa".into(),
            amount: u128::MAX,
            settlement_data: r#"{"x402Version":2}"#.into(),
        };
        assert_eq!(verified_from_json(&verified_json(&v)), Some(v));
        assert_eq!(verified_from_json(r#"{"payer": 1}"#), None);
    }

    #[test]
    fn vouchers_are_keyed_by_network_token_payer_and_nonce() {
        let payload = ExactEvmPayload {
            signature: "0x01".into(),
            authorization: computepool_pay::x402::ExactEvmAuthorization {
                from: "0xAA".into(),
                to: "0xbb".into(),
                value: "1".into(),
                valid_after: "0".into(),
                valid_before: "9".into(),
                nonce: "0xCC".into(),
            },
        };
        let accepted = PaymentRequirements::exact_evm(16602, "0xDD", "0xbb", 1, 60, "USD Coin", "2");
        let header = computepool_pay::x402::encode_header(&PaymentPayload {
            x402_version: 2,
            resource: None,
            accepted,
            payload: payload.to_value(),
            extensions: None,
        });
        assert_eq!(voucher_key(&header, "0xaa"), "eip155:16602/0xdd/0xaa/0xcc");
        // Anything else is keyed by its hash: the same bytes, the same key.
        assert_eq!(voucher_key("garbage", "0xaa"), voucher_key("garbage", "0xAA"));
        assert!(voucher_key("garbage", "0xaa").starts_with("sha256/0xaa/"));
    }
}
