//! The self-hosted x402 facilitator: `POST /verify`, `POST /settle`, `GET /supported` as the x402 spec
//! (v2 §7) defines them, for the exact scheme on one EVM chain, v2 and v1 requests alike.
//!
//! Settling is verifying again, then `transferWithAuthorization` from the facilitator's own key (which
//! pays the gas). It is idempotent per authorization (token, payer, nonce): a second settle of the same
//! voucher returns the first transaction and never sends a second one; settles of one nonce are
//! serialised, so two racing requests cannot both send. After a restart (or a send whose receipt was
//! lost) the in-memory record is gone, and the chain answers instead: a used nonce whose
//! `AuthorizationUsed` event sits beside a `Transfer` of exactly this voucher's value to its recipient
//! is that voucher's settlement.
//!
//! A replayed voucher is refused by `/verify` (`invalid_exact_evm_nonce_already_used`): a resource server
//! verifies before it settles and serves, so only its own retry of a settle gets the first transaction.

mod client;
mod routes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use computepool_chain::alloy::primitives::{Address, B256, U256};
use computepool_chain::alloy::providers::Provider;
use computepool_chain::bindings::TestUSD;
use computepool_chain::{Chain, ChainError};

pub use client::{FacilitatorClient, FacilitatorClientError};
pub use routes::{MAX_BODY_BYTES, router};

use crate::exact::{DEFAULT_EXPIRY_MARGIN_S, ExactPayment, ExactRequirements, ExactVerifier, Refusal, reason_for_revert, send_settlement};
use crate::x402::{ErrorReason, FacilitatorRequest, SCHEME_EXACT, SettleResponse, SupportedKind, SupportedResponse, VerifyResponse, eip155_network, v1_network_name};

/// How far back (in blocks) a settle looks for an earlier settlement of a used nonce. Public RPC
/// endpoints cap `eth_getLogs` ranges near 10 000 blocks; a voucher lives minutes, so its settlement is
/// recent.
pub const SETTLEMENT_LOOKBACK_BLOCKS: u64 = 9_000;

/// What a facilitator settles and how strictly.
#[derive(Clone, Debug)]
pub struct FacilitatorConfig {
    /// The tokens it settles; `None`: any EIP-3009 token on its chain.
    pub tokens: Option<Vec<Address>>,
    /// Seconds before `validBefore` a voucher is refused (default 6, as the official facilitators).
    pub expiry_margin_s: u64,
}

impl Default for FacilitatorConfig {
    fn default() -> Self {
        Self { tokens: None, expiry_margin_s: DEFAULT_EXPIRY_MARGIN_S }
    }
}

type SettlementKey = (Address, Address, B256);

/// A settlement this process made.
#[derive(Clone, Debug)]
struct Settled {
    payment: ExactPayment,
    response: SettleResponse,
}

/// The facilitator: a verifier on one chain, the key that settles, and the settlements made.
#[derive(Debug)]
pub struct Facilitator {
    verifier: ExactVerifier,
    /// One slot per authorization being or having been settled; the async lock serialises settles of one
    /// nonce, the value is the settlement once made.
    settlements: Mutex<HashMap<SettlementKey, Arc<tokio::sync::Mutex<Option<Settled>>>>>,
}

impl Facilitator {
    pub fn new(chain: Chain, config: FacilitatorConfig) -> Self {
        Self { verifier: ExactVerifier::new(chain, config.tokens, config.expiry_margin_s), settlements: Mutex::default() }
    }

    pub fn chain(&self) -> &Chain {
        self.verifier.chain()
    }

    /// `eip155:<chain id>`.
    pub fn network(&self) -> String {
        eip155_network(self.chain().chain_id())
    }

    /// v2 on `eip155:<id>`; v1 on the chain's legacy name where it has one, and on `eip155:<id>` too
    /// (what a v1 server without a legacy name for this chain writes).
    pub fn supported(&self) -> SupportedResponse {
        let chain_id = self.chain().chain_id();
        let kind = |x402_version, network: String| SupportedKind { x402_version, scheme: SCHEME_EXACT.into(), network, extra: None };
        let mut kinds = vec![kind(2, self.network())];
        if let Some(name) = v1_network_name(chain_id) {
            kinds.push(kind(1, name.into()));
        }
        kinds.push(kind(1, self.network()));
        let signers = BTreeMap::from([("eip155:*".to_string(), vec![self.chain().address().to_string()])]);
        SupportedResponse { kinds, extensions: Vec::new(), signers }
    }

    /// The payer, if the payment parses far enough to name one.
    fn parse(request: &FacilitatorRequest) -> (Option<String>, Result<(ExactRequirements, ExactPayment), Refusal>) {
        let (payment, requirements) = match request {
            FacilitatorRequest::V1 { payload, requirements } => (ExactPayment::from_v1(payload), ExactRequirements::from_v1(requirements)),
            FacilitatorRequest::V2 { payload, requirements } => (ExactPayment::from_v2(payload), ExactRequirements::from_v2(requirements)),
        };
        let payer = payment.as_ref().ok().map(|p| p.payer().to_string());
        // Requirements first: a payment cannot be judged against requirements that do not parse.
        let parsed = requirements.and_then(|r| payment.map(|p| (r, p)));
        (payer, parsed)
    }

    pub async fn verify(&self, request: &FacilitatorRequest) -> VerifyResponse {
        let (payer, parsed) = Self::parse(request);
        let result = match parsed {
            Ok((requirements, payment)) => self.verifier.verify(&requirements, &payment).await.map(|()| payment.payer()),
            Err(refusal) => Err(refusal),
        };
        match result {
            Ok(payer) => VerifyResponse::valid(payer),
            Err(refusal) => {
                tracing::info!(reason = %refusal.reason, message = %refusal.message, payer = ?payer, "payment refused at verify");
                VerifyResponse::invalid(refusal.reason, refusal.message, payer)
            }
        }
    }

    pub async fn settle(&self, request: &FacilitatorRequest) -> SettleResponse {
        let network = self.network();
        let (payer, parsed) = Self::parse(request);
        let (requirements, payment) = match parsed {
            Ok(parsed) => parsed,
            Err(refusal) => return SettleResponse::failed(refusal.reason, refusal.message, request.requirements_network(), payer),
        };
        let key = (requirements.asset, payment.payer(), payment.authorization.nonce);
        let slot = self.slot(key);
        let mut settled = slot.lock().await;
        if let Some(earlier) = settled.as_ref()
            && earlier.payment == payment
        {
            tracing::info!(payer = %payment.payer(), nonce = %payment.authorization.nonce, tx = %earlier.response.transaction, "already settled: the first transaction");
            return earlier.response.clone();
        }
        match self.verifier.verify(&requirements, &payment).await {
            Ok(()) => {}
            Err(refusal) if refusal.reason == ErrorReason::NonceAlreadyUsed => {
                // Settled before this process knew (a restart, a lost receipt)? The chain says.
                return match self.find_settlement(&requirements, &payment).await {
                    Some(tx) => {
                        let response = success(tx, &network, &payment);
                        *settled = Some(Settled { payment, response: response.clone() });
                        response
                    }
                    None => SettleResponse::failed(refusal.reason, refusal.message, network, payer),
                };
            }
            Err(refusal) => {
                tracing::info!(reason = %refusal.reason, message = %refusal.message, payer = ?payer, "payment refused at settle");
                return SettleResponse::failed(refusal.reason, refusal.message, network, payer);
            }
        };
        match send_settlement(self.chain(), requirements.asset, &payment).await {
            Ok(receipt) => {
                let response = success(receipt.transaction_hash, &network, &payment);
                tracing::info!(payer = %payment.payer(), value = %payment.authorization.value, tx = %receipt.transaction_hash, "settled");
                *settled = Some(Settled { payment, response: response.clone() });
                response
            }
            Err(ChainError::Reverted { reason, .. }) => {
                SettleResponse::failed(reason_for_revert(&reason, ErrorReason::InvalidTransactionState), format!("transferWithAuthorization reverted: {reason}"), network, payer)
            }
            Err(ChainError::Failed { tx_hash, .. }) => SettleResponse {
                transaction: tx_hash.to_string(),
                ..SettleResponse::failed(ErrorReason::InvalidTransactionState, "transferWithAuthorization failed on chain (status 0)", network, payer)
            },
            Err(e) => {
                tracing::warn!(error = %e, "settlement could not be sent or confirmed");
                SettleResponse::failed(ErrorReason::UnexpectedSettleError, e.to_string(), network, payer)
            }
        }
    }

    fn slot(&self, key: SettlementKey) -> Arc<tokio::sync::Mutex<Option<Settled>>> {
        let mut slots = self.settlements.lock().expect("settlement map lock");
        // Forget slots nobody holds that settled nothing (refused attempts), and settlements whose
        // vouchers have expired: no retry of them can verify any more, and the chain's log remains the
        // record. This bounds the map by the unexpired vouchers settled, whatever a client sends.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot.try_lock().map_or(true, |s| s.as_ref().is_some_and(|s| s.payment.authorization.validBefore >= U256::from(now)))
        });
        slots.entry(key).or_default().clone()
    }

    /// The transaction that used this payment's nonce, if it transferred exactly this payment.
    async fn find_settlement(&self, requirements: &ExactRequirements, payment: &ExactPayment) -> Option<B256> {
        let provider = self.chain().provider();
        let token = TestUSD::new(requirements.asset, provider);
        let a = &payment.authorization;
        let latest = provider.get_block_number().await.ok()?;
        let logs = token
            .AuthorizationUsed_filter()
            .topic1(a.from)
            .topic2(a.nonce)
            .from_block(latest.saturating_sub(SETTLEMENT_LOOKBACK_BLOCKS))
            .query()
            .await
            .map_err(|e| tracing::warn!(error = %e, "looking up an earlier settlement"))
            .ok()?;
        for (_, log) in logs {
            let tx = log.transaction_hash?;
            let receipt = provider.get_transaction_receipt(tx).await.ok()??;
            let moved = receipt.inner.logs().iter().any(|l| {
                l.address() == requirements.asset
                    && l.log_decode::<TestUSD::Transfer>().is_ok_and(|t| t.inner.data.from == a.from && t.inner.data.to == a.to && t.inner.data.value == a.value)
            });
            if moved {
                return Some(tx);
            }
        }
        None
    }
}

fn success(tx: B256, network: &str, payment: &ExactPayment) -> SettleResponse {
    SettleResponse {
        success: true,
        error_reason: None,
        error_message: None,
        payer: Some(payment.payer().to_string()),
        transaction: tx.to_string(),
        network: network.into(),
        amount: None,
    }
}
