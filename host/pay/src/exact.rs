//! The `exact` scheme on EVM with EIP-3009: is this voucher worth exactly what the requirements ask, to
//! whom they ask, on their chain and token, signed by its payer, still valid, unused and funded?
//!
//! Two halves. The pure half ([`ExactRequirements`], [`ExactPayment`], [`check_terms`],
//! [`check_signature`]) parses the wire strings and checks everything a voucher says about itself against
//! the requirements and a clock; it needs no chain and is unit-tested here. The chain half
//! ([`ExactVerifier`]) reads what only the chain knows: its time, the token's EIP-712 domain, whether the
//! nonce is used, the payer's balance, and finally simulates `transferWithAuthorization` from the
//! facilitator's address, which catches anything the token would refuse that the checks above did not name.
//!
//! "Exact" means equal: the official facilitators refuse a voucher worth more as well as one worth less
//! (`invalid_exact_evm_payload_authorization_value_mismatch`), and so does this one.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use computepool_chain::alloy::rpc::types::TransactionReceipt;
use computepool_chain::{Chain, ChainError};
use computepool_chain::alloy::primitives::{Address, B256, Bytes, Signature, U256};
use computepool_chain::alloy::providers::Provider;
use computepool_chain::alloy::sol_types::{Eip712Domain, SolStruct};
use computepool_chain::bindings::TestUSD;
use computepool_chain::client::decode_revert;
use computepool_chain::eip3009::{TransferWithAuthorization, token_domain};
use serde_json::{Map, Value};

use crate::x402::{
    ErrorReason, ExactEvmPayload, PaymentPayload, PaymentPayloadV1, PaymentRequirements, PaymentRequirementsV1,
    SCHEME_EXACT, evm_chain_id,
};

/// How long before `validBefore` a voucher stops being accepted: the settlement transaction must be mined
/// before it, and the official facilitators keep the same 6 s.
pub const DEFAULT_EXPIRY_MARGIN_S: u64 = 6;

/// A refused payment: the x402 reason and a sentence for the human reading the logs or the response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    pub reason: ErrorReason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: ErrorReason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

/// Exact-EVM requirements, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExactRequirements {
    pub chain_id: u64,
    pub asset: Address,
    pub pay_to: Address,
    /// Atomic units; amounts above u128 are refused as invalid.
    pub amount: u128,
    /// The token's EIP-712 domain as the requirements state it (`extra.name`, `extra.version`).
    pub domain_name: String,
    pub domain_version: String,
}

impl ExactRequirements {
    pub fn from_v2(r: &PaymentRequirements) -> Result<Self, Refusal> {
        Self::parse(&r.scheme, &r.network, &r.amount, &r.asset, &r.pay_to, &r.extra)
    }

    pub fn from_v1(r: &PaymentRequirementsV1) -> Result<Self, Refusal> {
        Self::parse(&r.scheme, &r.network, &r.max_amount_required, &r.asset, &r.pay_to, &r.extra_object())
    }

    fn parse(scheme: &str, network: &str, amount: &str, asset: &str, pay_to: &str, extra: &Map<String, Value>) -> Result<Self, Refusal> {
        check_scheme(scheme, "paymentRequirements")?;
        let chain_id = evm_chain_id(network)
            .ok_or_else(|| Refusal::new(ErrorReason::InvalidNetwork, format!("paymentRequirements.network {network:?} is not an EVM network (eip155:<chain id>)")))?;
        let amount = parse_decimal_u128(amount).ok_or_else(|| {
            Refusal::new(ErrorReason::InvalidPaymentRequirements, format!("amount {amount:?} is not a decimal number of atomic units below 2^128"))
        })?;
        let asset = parse_address(asset).ok_or_else(|| Refusal::new(ErrorReason::InvalidPaymentRequirements, format!("asset {asset:?} is not an address")))?;
        let pay_to = parse_address(pay_to).ok_or_else(|| Refusal::new(ErrorReason::InvalidPaymentRequirements, format!("payTo {pay_to:?} is not an address")))?;
        let (Some(name), Some(version)) = (extra.get("name").and_then(Value::as_str), extra.get("version").and_then(Value::as_str)) else {
            return Err(Refusal::new(ErrorReason::MissingEip712Domain, "paymentRequirements.extra must hold the token's EIP-712 name and version"));
        };
        Ok(Self { chain_id, asset, pay_to, amount, domain_name: name.into(), domain_version: version.into() })
    }

    /// The EIP-712 domain the voucher must be signed under, as the requirements state it.
    pub fn domain(&self) -> Eip712Domain {
        token_domain(&self.domain_name, &self.domain_version, self.chain_id, self.asset)
    }
}

/// An exact-EVM payment, parsed.
#[derive(Clone, Debug)]
pub struct ExactPayment {
    /// The scheme and network the client says it paid with (v2 `accepted`, v1 top level).
    pub scheme: String,
    pub network: String,
    /// The token the client says it paid in (v2 only; v1 payloads do not name it).
    pub asset: Option<Address>,
    pub authorization: TransferWithAuthorization,
    pub signature: Bytes,
}

impl PartialEq for ExactPayment {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.authorization, &other.authorization);
        self.scheme == other.scheme
            && self.network == other.network
            && self.asset == other.asset
            && self.signature == other.signature
            && (a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce) == (b.from, b.to, b.value, b.validAfter, b.validBefore, b.nonce)
    }
}

impl Eq for ExactPayment {}

impl ExactPayment {
    pub fn from_v2(p: &PaymentPayload) -> Result<Self, Refusal> {
        let asset = parse_address(&p.accepted.asset)
            .ok_or_else(|| Refusal::new(ErrorReason::InvalidPayload, format!("accepted.asset {:?} is not an address", p.accepted.asset)))?;
        Self::parse(&p.accepted.scheme, &p.accepted.network, Some(asset), &p.payload)
    }

    pub fn from_v1(p: &PaymentPayloadV1) -> Result<Self, Refusal> {
        Self::parse(&p.scheme, &p.network, None, &p.payload)
    }

    fn parse(scheme: &str, network: &str, asset: Option<Address>, payload: &Value) -> Result<Self, Refusal> {
        let invalid = |what: String| Refusal::new(ErrorReason::InvalidPayload, what);
        let exact = ExactEvmPayload::from_value(payload).map_err(|e| invalid(format!("payload is not an exact-EVM (EIP-3009) payload: {e}")))?;
        let a = &exact.authorization;
        let address = |field: &str, text: &str| parse_address(text).ok_or_else(|| invalid(format!("authorization.{field} {text:?} is not an address")));
        let number = |field: &str, text: &str| parse_u256(text).ok_or_else(|| invalid(format!("authorization.{field} {text:?} is not a uint256")));
        let nonce = parse_b256(&a.nonce).ok_or_else(|| invalid(format!("authorization.nonce {:?} is not 32 bytes of 0x-hex", a.nonce)))?;
        let authorization = TransferWithAuthorization {
            from: address("from", &a.from)?,
            to: address("to", &a.to)?,
            value: number("value", &a.value)?,
            validAfter: number("validAfter", &a.valid_after)?,
            validBefore: number("validBefore", &a.valid_before)?,
            nonce,
        };
        let signature = if exact.signature.is_empty() {
            Bytes::new()
        } else {
            parse_hex_bytes(&exact.signature).ok_or_else(|| invalid("signature is not 0x-hex".into()))?
        };
        Ok(Self { scheme: scheme.into(), network: network.into(), asset, authorization, signature })
    }

    pub fn payer(&self) -> Address {
        self.authorization.from
    }

    /// The digest the payer signed, under `domain`.
    pub fn signing_hash(&self, domain: &Eip712Domain) -> B256 {
        self.authorization.eip712_signing_hash(domain)
    }
}

fn check_scheme(scheme: &str, whose: &str) -> Result<(), Refusal> {
    if scheme == SCHEME_EXACT {
        return Ok(());
    }
    let well_formed = !scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let reason = if well_formed { ErrorReason::UnsupportedScheme } else { ErrorReason::InvalidScheme };
    Err(Refusal::new(reason, format!("{whose}.scheme {scheme:?}: only \"exact\" is supported")))
}

/// Everything the voucher says about itself, against the requirements and `now` (unix seconds, the
/// chain's clock): scheme, network, token, recipient, amount and validity window. `expiry_margin_s`: how
/// long before `validBefore` the voucher is already refused (time for the settlement to be mined).
pub fn check_terms(req: &ExactRequirements, pay: &ExactPayment, now: u64, expiry_margin_s: u64) -> Result<(), Refusal> {
    check_scheme(&pay.scheme, "payment")?;
    let a = &pay.authorization;
    match evm_chain_id(&pay.network) {
        Some(id) if id == req.chain_id => {}
        _ => {
            return Err(Refusal::new(
                ErrorReason::NetworkMismatch,
                format!("the payment is for network {:?}, the requirements for eip155:{}", pay.network, req.chain_id),
            ));
        }
    }
    if let Some(asset) = pay.asset
        && asset != req.asset
    {
        return Err(Refusal::new(ErrorReason::InvalidPayload, format!("the payment is in token {asset}, the requirements ask for {}", req.asset)));
    }
    if a.to != req.pay_to {
        return Err(Refusal::new(ErrorReason::RecipientMismatch, format!("the authorization pays {}, the requirements' payTo is {}", a.to, req.pay_to)));
    }
    if a.value != U256::from(req.amount) {
        return Err(Refusal::new(ErrorReason::ValueMismatch, format!("the authorization is for {}, the requirements ask exactly {}", a.value, req.amount)));
    }
    let deadline = U256::from(now) + U256::from(expiry_margin_s);
    if a.validBefore < deadline {
        return Err(Refusal::new(
            ErrorReason::InvalidValidBefore,
            format!("validBefore {} is not after now ({now}) plus the {expiry_margin_s} s needed to settle", a.validBefore),
        ));
    }
    if a.validAfter > U256::from(now) {
        return Err(Refusal::new(ErrorReason::InvalidValidAfter, format!("validAfter {} is after now ({now})", a.validAfter)));
    }
    Ok(())
}

/// What the signature alone says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureCheck {
    /// It recovers to the payer under the domain.
    Valid,
    /// A 65-byte signature that recovers to someone else (or to no one).
    WrongSigner { recovered: Option<Address> },
    /// Not a 65-byte ECDSA signature: only a contract wallet (ERC-1271) could have made it, which only the
    /// chain can check.
    NotEcdsa,
}

/// Recovers the signer of `pay`'s authorization under `domain`.
pub fn check_signature(pay: &ExactPayment, domain: &Eip712Domain) -> SignatureCheck {
    if pay.signature.len() != 65 {
        return SignatureCheck::NotEcdsa;
    }
    let Ok(signature) = Signature::try_from(pay.signature.as_ref()) else {
        return SignatureCheck::WrongSigner { recovered: None };
    };
    match signature.recover_address_from_prehash(&pay.signing_hash(domain)) {
        Ok(signer) if signer == pay.payer() => SignatureCheck::Valid,
        Ok(signer) => SignatureCheck::WrongSigner { recovered: Some(signer) },
        Err(_) => SignatureCheck::WrongSigner { recovered: None },
    }
}

/// Names a token's revert of `transferWithAuthorization` (ComputePool's TestUSD custom errors, and
/// USDC's `FiatTokenV2: …` strings) as the x402 reason; `otherwise` when it is none of them.
pub fn reason_for_revert(revert: &str, otherwise: ErrorReason) -> ErrorReason {
    let text = revert.to_ascii_lowercase();
    if text.contains("authorizationexpired") || text.contains("authorization is expired") {
        ErrorReason::InvalidValidBefore
    } else if text.contains("authorizationnotyetvalid") || text.contains("authorization is not yet valid") {
        ErrorReason::InvalidValidAfter
    } else if text.contains("authorizationalreadyused") || text.contains("authorization is used") {
        ErrorReason::NonceAlreadyUsed
    } else if text.contains("insufficientbalance") || text.contains("exceeds balance") {
        ErrorReason::InsufficientFunds
    } else if text.contains("invalidsignature") || text.contains("invalid signature") {
        ErrorReason::InvalidSignature
    } else {
        otherwise
    }
}

/// A token's EIP-712 domain as the token itself reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenDomain {
    pub name: String,
    /// `None` when the token has no `version()` (then only the signature and simulation judge).
    pub version: Option<String>,
}

/// The chain half: verifies exact-EVM payments against one chain.
#[derive(Debug)]
pub struct ExactVerifier {
    chain: Chain,
    /// Tokens this verifier accepts; `None`: any token implementing EIP-3009.
    tokens: Option<Vec<Address>>,
    expiry_margin_s: u64,
    /// Token domains read so far. name() and version() are fixed at a token's deployment (an upgrade of
    /// a proxied token that changed them would need a restart).
    domains: Mutex<HashMap<Address, TokenDomain>>,
}

impl ExactVerifier {
    pub fn new(chain: Chain, tokens: Option<Vec<Address>>, expiry_margin_s: u64) -> Self {
        Self { chain, tokens, expiry_margin_s, domains: Mutex::default() }
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// The chain's notion of now for a transaction sent now: the later of the latest block's timestamp
    /// and this machine's clock. A devnet that mines only on demand has a stale latest block, yet the
    /// settlement's block will carry the current time; a chain whose clock was moved ahead is ahead.
    pub async fn now(&self) -> Result<u64, Refusal> {
        let unexpected = |e: String| Refusal::new(ErrorReason::UnexpectedVerifyError, format!("reading the chain's latest block: {e}"));
        let number = self.chain.provider().get_block_number().await.map_err(|e| unexpected(e.to_string()))?;
        let block_time = self.chain.timestamp_of(number).await.map_err(|e| unexpected(e.to_string()))?;
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(block_time.max(wall))
    }

    /// The token's own EIP-712 name and version, read once.
    pub async fn token_domain(&self, token: Address) -> Result<TokenDomain, Refusal> {
        if let Some(domain) = self.domains.lock().expect("domain cache lock").get(&token) {
            return Ok(domain.clone());
        }
        let contract = TestUSD::new(token, self.chain.provider());
        let name = contract.name().call().await.map_err(|e| {
            Refusal::new(ErrorReason::InvalidPaymentRequirements, format!("asset {token} does not answer name() (is it a token on this chain?): {e}"))
        })?;
        let version = contract.version().call().await.ok();
        let domain = TokenDomain { name, version };
        self.domains.lock().expect("domain cache lock").insert(token, domain.clone());
        Ok(domain)
    }

    /// Every check, pure then on chain: `Ok` when the payment would settle now.
    pub async fn verify(&self, requirements: &ExactRequirements, payment: &ExactPayment) -> Result<(), Refusal> {
        if requirements.chain_id != self.chain.chain_id() {
            return Err(Refusal::new(
                ErrorReason::InvalidNetwork,
                format!("this facilitator settles on eip155:{}, not eip155:{}", self.chain.chain_id(), requirements.chain_id),
            ));
        }
        if let Some(tokens) = &self.tokens
            && !tokens.contains(&requirements.asset)
        {
            return Err(Refusal::new(ErrorReason::InvalidPaymentRequirements, format!("this facilitator does not settle token {}", requirements.asset)));
        }
        let now = self.now().await?;
        check_terms(requirements, payment, now, self.expiry_margin_s)?;

        let token = self.token_domain(requirements.asset).await?;
        if token.name != requirements.domain_name {
            return Err(Refusal::new(
                ErrorReason::TokenNameMismatch,
                format!("extra.name is {:?}, the token's EIP-712 name is {:?}", requirements.domain_name, token.name),
            ));
        }
        if let Some(version) = &token.version
            && *version != requirements.domain_version
        {
            return Err(Refusal::new(
                ErrorReason::TokenVersionMismatch,
                format!("extra.version is {:?}, the token's EIP-712 version is {version:?}", requirements.domain_version),
            ));
        }

        let payer = payment.payer();
        match check_signature(payment, &requirements.domain()) {
            SignatureCheck::Valid => {}
            SignatureCheck::WrongSigner { recovered } => {
                let by = recovered.map(|a| format!("recovers to {a}")).unwrap_or_else(|| "recovers to no address".into());
                return Err(Refusal::new(ErrorReason::InvalidSignature, format!("the signature {by}, not the payer {payer}, under the token's domain")));
            }
            SignatureCheck::NotEcdsa => {
                let code = self.chain.provider().get_code_at(payer).await.map_err(|e| {
                    Refusal::new(ErrorReason::UnexpectedVerifyError, format!("reading the payer's code: {e}"))
                })?;
                if code.is_empty() {
                    return Err(Refusal::new(
                        ErrorReason::InvalidSignature,
                        format!("a {}-byte signature from {payer}, which is not a contract wallet", payment.signature.len()),
                    ));
                }
                // A contract wallet: its isValidSignature is judged by the simulation below.
            }
        }

        let contract = TestUSD::new(requirements.asset, self.chain.provider());
        let a = &payment.authorization;
        let used = contract.authorizationState(a.from, a.nonce).call().await.map_err(|e| {
            Refusal::new(ErrorReason::InvalidPaymentRequirements, format!("asset {} does not answer authorizationState (no EIP-3009?): {e}", requirements.asset))
        })?;
        if used {
            return Err(Refusal::new(ErrorReason::NonceAlreadyUsed, format!("nonce {} of {payer} was already used or cancelled", a.nonce)));
        }
        let balance = contract
            .balanceOf(a.from)
            .call()
            .await
            .map_err(|e| Refusal::new(ErrorReason::UnexpectedVerifyError, format!("reading the payer's balance: {e}")))?;
        if balance < a.value {
            return Err(Refusal::new(ErrorReason::InsufficientFunds, format!("{payer} holds {balance}, the payment is {}", a.value)));
        }

        if let Err(e) = simulate_settlement(&contract, payment, self.chain.address()).await {
            let revert = e.as_revert_data().map(|data| decode_revert(&data)).unwrap_or_else(|| e.to_string());
            return Err(Refusal::new(
                reason_for_revert(&revert, ErrorReason::TransactionSimulationFailed),
                format!("transferWithAuthorization would revert: {revert}"),
            ));
        }
        Ok(())
    }
}

/// Splits a 65-byte signature into (v, r, s), v as 27 or 28.
fn split_signature(signature: &[u8]) -> Option<(u8, B256, B256)> {
    if signature.len() != 65 {
        return None;
    }
    let v = match signature[64] {
        v @ (27 | 28) => v,
        v @ (0 | 1) => v + 27,
        _ => return None,
    };
    Some((v, B256::from_slice(&signature[..32]), B256::from_slice(&signature[32..64])))
}

/// Simulates `transferWithAuthorization` (an `eth_call` from `from`). The (v, r, s) form for a 65-byte
/// signature, which every USDC version has; the `bytes` form (USDC 2.2, ERC-1271 wallets) otherwise.
pub async fn simulate_settlement<P: Provider>(
    contract: &TestUSD::TestUSDInstance<P>,
    payment: &ExactPayment,
    from: Address,
) -> Result<(), computepool_chain::alloy::contract::Error> {
    let a = &payment.authorization;
    match split_signature(&payment.signature) {
        Some((v, r, s)) => contract
            .transferWithAuthorization_1(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, v, r, s)
            .from(from)
            .call()
            .await
            .map(|_| ()),
        None => contract
            .transferWithAuthorization_0(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, payment.signature.clone())
            .from(from)
            .call()
            .await
            .map(|_| ()),
    }
}

/// Sends `transferWithAuthorization` for a payment from `chain`'s key (which pays the gas) and waits for
/// its receipt. Same overload choice as [`simulate_settlement`].
pub async fn send_settlement(chain: &Chain, token: Address, payment: &ExactPayment) -> Result<TransactionReceipt, ChainError> {
    let contract = TestUSD::new(token, chain.provider());
    let a = &payment.authorization;
    let what = format!("transferWithAuthorization of {} from {} (nonce {})", a.value, a.from, a.nonce);
    match split_signature(&payment.signature) {
        Some((v, r, s)) => {
            chain.send(&what, contract.transferWithAuthorization_1(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, v, r, s)).await
        }
        None => {
            chain
                .send(&what, contract.transferWithAuthorization_0(a.from, a.to, a.value, a.validAfter, a.validBefore, a.nonce, payment.signature.clone()))
                .await
        }
    }
}

fn parse_address(text: &str) -> Option<Address> {
    let text = text.trim();
    if !text.starts_with("0x") && !text.starts_with("0X") {
        return None;
    }
    Address::from_str(text).ok()
}

fn parse_b256(text: &str) -> Option<B256> {
    let hex_text = text.trim().strip_prefix("0x")?;
    if hex_text.len() != 64 {
        return None;
    }
    B256::from_str(hex_text).ok()
}

fn parse_hex_bytes(text: &str) -> Option<Bytes> {
    let hex_text = text.trim().strip_prefix("0x").unwrap_or(text.trim());
    hex::decode(hex_text).ok().map(Bytes::from)
}

/// A uint256 as the clients write it: decimal, or 0x-hex.
fn parse_u256(text: &str) -> Option<U256> {
    let text = text.trim();
    if let Some(hex_text) = text.strip_prefix("0x") {
        return (!hex_text.is_empty() && hex_text.len() <= 64).then(|| U256::from_str_radix(hex_text, 16).ok()).flatten();
    }
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| U256::from_str_radix(text, 10).ok()).flatten()
}

fn parse_decimal_u128(text: &str) -> Option<u128> {
    (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x402::{encode_header, decode_header};
    use computepool_chain::alloy::signers::local::PrivateKeySigner;
    use computepool_chain::eip3009::sign_transfer;

    const CHAIN: u64 = 16602;
    const NOW: u64 = 1_800_000_000;

    fn requirements() -> PaymentRequirements {
        PaymentRequirements::exact_evm(CHAIN, Address::repeat_byte(0xaa), Address::repeat_byte(0xbb), 1_000_000, 60, "USD Coin", "2")
    }

    /// A v2 payment as the SDK client builds it: `accepted` echoes the requirements, numbers as decimal
    /// strings, validAfter 0, validBefore now + maxTimeoutSeconds.
    fn payment(signer: &PrivateKeySigner, req: &PaymentRequirements, domain: &Eip712Domain, value: u128, valid_after: u64, valid_before: u64) -> PaymentPayload {
        let to = parse_address(&req.pay_to).unwrap();
        let auth = sign_transfer(signer, domain, to, U256::from(value), valid_after, valid_before, B256::repeat_byte(7)).unwrap();
        let payload = ExactEvmPayload::from_signed(&auth);
        PaymentPayload { x402_version: 2, resource: None, accepted: req.clone(), payload: payload.to_value(), extensions: None }
    }

    fn domain() -> Eip712Domain {
        token_domain("USD Coin", "2", CHAIN, Address::repeat_byte(0xaa))
    }

    fn check(req: &PaymentRequirements, pay: &PaymentPayload) -> Result<SignatureCheck, Refusal> {
        // Through the header codec, as a server receives it.
        let pay: PaymentPayload = decode_header(&encode_header(pay)).unwrap();
        let r = ExactRequirements::from_v2(req)?;
        let p = ExactPayment::from_v2(&pay)?;
        check_terms(&r, &p, NOW, DEFAULT_EXPIRY_MARGIN_S)?;
        Ok(check_signature(&p, &r.domain()))
    }

    #[test]
    fn a_good_voucher_passes() {
        let signer = PrivateKeySigner::random();
        let req = requirements();
        let pay = payment(&signer, &req, &domain(), 1_000_000, 0, NOW + 60);
        assert_eq!(check(&req, &pay).unwrap(), SignatureCheck::Valid);
    }

    #[test]
    fn each_term_is_checked_with_its_reason() {
        let signer = PrivateKeySigner::random();
        let req = requirements();
        let reason = |pay: &PaymentPayload, req: &PaymentRequirements| check(req, pay).unwrap_err().reason;
        // Too little, and too much: exact is exact.
        assert_eq!(reason(&payment(&signer, &req, &domain(), 999_999, 0, NOW + 60), &req), ErrorReason::ValueMismatch);
        assert_eq!(reason(&payment(&signer, &req, &domain(), 1_000_001, 0, NOW + 60), &req), ErrorReason::ValueMismatch);
        // Expired, about to expire, not yet valid.
        assert_eq!(reason(&payment(&signer, &req, &domain(), 1_000_000, 0, NOW - 1), &req), ErrorReason::InvalidValidBefore);
        assert_eq!(reason(&payment(&signer, &req, &domain(), 1_000_000, 0, NOW + 5), &req), ErrorReason::InvalidValidBefore);
        assert_eq!(reason(&payment(&signer, &req, &domain(), 1_000_000, NOW + 30, NOW + 90), &req), ErrorReason::InvalidValidAfter);
        // validAfter == now is valid (the settlement's block comes later).
        assert!(check(&req, &payment(&signer, &req, &domain(), 1_000_000, NOW, NOW + 90)).is_ok());
        // Another recipient.
        let mut other_to = req.clone();
        other_to.pay_to = Address::repeat_byte(0xcc).to_string();
        assert_eq!(reason(&payment(&signer, &other_to, &domain(), 1_000_000, 0, NOW + 60), &req), ErrorReason::RecipientMismatch);
        // Another chain in `accepted`.
        let mut other_chain = req.clone();
        other_chain.network = "eip155:1".into();
        assert_eq!(reason(&payment(&signer, &other_chain, &domain(), 1_000_000, 0, NOW + 60), &req), ErrorReason::NetworkMismatch);
        // Another token in `accepted`.
        let mut other_token = req.clone();
        other_token.asset = Address::repeat_byte(0xdd).to_string();
        assert_eq!(reason(&payment(&signer, &other_token, &domain(), 1_000_000, 0, NOW + 60), &req), ErrorReason::InvalidPayload);
        // Another scheme.
        let mut upto = req.clone();
        upto.scheme = "upto".into();
        assert_eq!(reason(&payment(&signer, &upto, &domain(), 1_000_000, 0, NOW + 60), &req), ErrorReason::UnsupportedScheme);
        assert_eq!(reason(&payment(&signer, &req, &domain(), 1_000_000, 0, NOW + 60), &upto), ErrorReason::UnsupportedScheme);
        let mut garbage = req.clone();
        garbage.scheme = "".into();
        assert_eq!(reason(&payment(&signer, &garbage, &domain(), 1_000_000, 0, NOW + 60), &req), ErrorReason::InvalidScheme);
    }

    #[test]
    fn signatures_recover_only_under_the_right_domain_and_key() {
        let signer = PrivateKeySigner::random();
        let req = requirements();
        // Signed by another key, claiming to be from `signer`.
        let other = PrivateKeySigner::random();
        let mut forged = payment(&other, &req, &domain(), 1_000_000, 0, NOW + 60);
        forged.payload["authorization"]["from"] = signer.address().to_string().into();
        // (Changing `from` changes the digest, so the recovered address is neither key.)
        match check(&req, &forged).unwrap() {
            SignatureCheck::WrongSigner { recovered } => assert_ne!(recovered, Some(signer.address())),
            other => panic!("a forged voucher passed as {other:?}"),
        }
        // Signed under another token name, version, chain or contract.
        for wrong in [
            token_domain("USDC", "2", CHAIN, Address::repeat_byte(0xaa)),
            token_domain("USD Coin", "1", CHAIN, Address::repeat_byte(0xaa)),
            token_domain("USD Coin", "2", 1, Address::repeat_byte(0xaa)),
            token_domain("USD Coin", "2", CHAIN, Address::repeat_byte(0xab)),
        ] {
            let pay = payment(&signer, &req, &wrong, 1_000_000, 0, NOW + 60);
            assert!(matches!(check(&req, &pay).unwrap(), SignatureCheck::WrongSigner { .. }), "{wrong:?}");
        }
        // A tampered amount after signing.
        let mut tampered = payment(&signer, &req, &domain(), 1_000_000, 0, NOW + 60);
        tampered.payload["authorization"]["validBefore"] = (NOW + 61).to_string().into();
        assert!(matches!(check(&req, &tampered).unwrap(), SignatureCheck::WrongSigner { .. }));
        // Not 65 bytes: only a contract wallet could mean it.
        let mut long = payment(&signer, &req, &domain(), 1_000_000, 0, NOW + 60);
        long.payload["signature"] = format!("0x{}", "11".repeat(100)).into();
        assert_eq!(check(&req, &long).unwrap(), SignatureCheck::NotEcdsa);
    }

    #[test]
    fn malformed_fields_are_invalid_payloads_or_requirements() {
        let signer = PrivateKeySigner::random();
        let req = requirements();
        let good = payment(&signer, &req, &domain(), 1_000_000, 0, NOW + 60);
        for (field, value) in [
            ("from", "0x1234"),
            ("to", "not an address"),
            ("value", "-5"),
            ("value", "1e6"),
            ("validBefore", "0x"),
            ("nonce", "0x1234"),
            ("value", "115792089237316195423570985008687907853269984665640564039457584007913129639936"),
        ] {
            let mut bad = good.clone();
            bad.payload["authorization"][field] = value.into();
            assert_eq!(ExactPayment::from_v2(&bad).unwrap_err().reason, ErrorReason::InvalidPayload, "{field}={value}");
        }
        let mut no_auth = good.clone();
        no_auth.payload = serde_json::json!({"signature": "0x00"});
        assert_eq!(ExactPayment::from_v2(&no_auth).unwrap_err().reason, ErrorReason::InvalidPayload);
        // Hex numbers are read too (decimal is what the SDKs send).
        let mut hex_value = good.clone();
        hex_value.payload["authorization"]["value"] = "0xf4240".into();
        assert_eq!(ExactPayment::from_v2(&hex_value).unwrap().authorization.value, U256::from(1_000_000u64));

        let refused = |f: fn(&mut PaymentRequirements)| {
            let mut r = req.clone();
            f(&mut r);
            ExactRequirements::from_v2(&r).unwrap_err().reason
        };
        assert_eq!(refused(|r| r.amount = "340282366920938463463374607431768211456".into()), ErrorReason::InvalidPaymentRequirements);
        assert_eq!(refused(|r| r.amount = "1.5".into()), ErrorReason::InvalidPaymentRequirements);
        assert_eq!(refused(|r| r.pay_to = "merchant".into()), ErrorReason::InvalidPaymentRequirements);
        assert_eq!(refused(|r| r.network = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp".into()), ErrorReason::InvalidNetwork);
        assert_eq!(refused(|r| { r.extra.remove("version"); }), ErrorReason::MissingEip712Domain);
    }

    #[test]
    fn v1_payments_parse_like_v2() {
        let signer = PrivateKeySigner::random();
        let req = requirements();
        let v2 = payment(&signer, &req, &domain(), 1_000_000, 0, NOW + 60);
        let v1_req = req.to_v1(&crate::x402::ResourceInfo { url: "http://x/".into(), description: None, mime_type: None });
        let v1 = PaymentPayloadV1 { x402_version: 1, scheme: "exact".into(), network: v1_req.network.clone(), payload: v2.payload.clone() };
        let r = ExactRequirements::from_v1(&v1_req).unwrap();
        assert_eq!(r, ExactRequirements::from_v2(&req).unwrap());
        let p = ExactPayment::from_v1(&v1).unwrap();
        check_terms(&r, &p, NOW, DEFAULT_EXPIRY_MARGIN_S).unwrap();
        assert_eq!(check_signature(&p, &r.domain()), SignatureCheck::Valid);
    }

    #[test]
    fn reverts_are_named() {
        assert_eq!(reason_for_revert("AuthorizationExpired(AuthorizationExpired { validBefore: 1, nowTimestamp: 2 })", ErrorReason::TransactionSimulationFailed), ErrorReason::InvalidValidBefore);
        assert_eq!(reason_for_revert("FiatTokenV2: authorization is used or canceled", ErrorReason::TransactionSimulationFailed), ErrorReason::NonceAlreadyUsed);
        assert_eq!(reason_for_revert("ERC20InsufficientBalance(..)", ErrorReason::TransactionSimulationFailed), ErrorReason::InsufficientFunds);
        assert_eq!(reason_for_revert("FiatTokenV2: invalid signature", ErrorReason::TransactionSimulationFailed), ErrorReason::InvalidSignature);
        assert_eq!(reason_for_revert("0x1234", ErrorReason::InvalidTransactionState), ErrorReason::InvalidTransactionState);
        assert_eq!(split_signature(&[0u8; 64]), None);
        let mut sig = [0u8; 65];
        sig[64] = 1;
        assert_eq!(split_signature(&sig).unwrap().0, 28);
    }
}

/// A payment made by the official Python SDK (PyPI x402 2.25.0) for a 402 it also encoded, captured
/// once (host/pay/tests/fixtures): what a real client sends must parse and verify here.
#[cfg(test)]
mod real_client {
    use super::*;
    use crate::x402::{PaymentRequired, decode_header};

    #[derive(serde::Deserialize)]
    struct Fixture {
        payer: String,
        payment_required_header: String,
        payment_signature_header: String,
    }

    #[test]
    fn a_python_sdk_voucher_verifies() {
        let fixture: Fixture = serde_json::from_str(include_str!("../tests/fixtures/python-x402-2.25.0.json")).unwrap();
        let required: PaymentRequired = decode_header(&fixture.payment_required_header).unwrap();
        let payment: PaymentPayload = decode_header(&fixture.payment_signature_header).unwrap();
        assert_eq!(payment.x402_version, 2);
        assert_eq!(payment.accepted, required.accepts[0], "the client echoes the offer it took");
        let r = ExactRequirements::from_v2(&required.accepts[0]).unwrap();
        let p = ExactPayment::from_v2(&payment).unwrap();
        assert_eq!(p.payer(), fixture.payer.parse::<Address>().unwrap());
        // The client signs validAfter 0 and validBefore = its clock + maxTimeoutSeconds.
        assert_eq!(p.authorization.validAfter, U256::ZERO);
        let valid_before: u64 = p.authorization.validBefore.to();
        let signed_at = valid_before - 300;
        check_terms(&r, &p, signed_at + 1, DEFAULT_EXPIRY_MARGIN_S).unwrap();
        assert_eq!(check_signature(&p, &r.domain()), SignatureCheck::Valid);
        // Past its window it is refused; with another price, too.
        assert_eq!(check_terms(&r, &p, valid_before, DEFAULT_EXPIRY_MARGIN_S).unwrap_err().reason, ErrorReason::InvalidValidBefore);
        let mut dearer = required.accepts[0].clone();
        dearer.amount = "1500001".into();
        assert_eq!(check_terms(&ExactRequirements::from_v2(&dearer).unwrap(), &p, signed_at + 1, DEFAULT_EXPIRY_MARGIN_S).unwrap_err().reason, ErrorReason::ValueMismatch);
        // Our own encoding of its payload reads back identically.
        assert_eq!(decode_header::<PaymentPayload>(&crate::x402::encode_header(&payment)).unwrap(), payment);
    }
}
