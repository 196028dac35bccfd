//! The x402 wire format, v2 and v1, field for field as the official SDKs (PyPI `x402`, npm `@x402/*`)
//! write and read it: camelCase JSON, amounts and EVM numbers as decimal strings, absent optionals left
//! out. These are plain data; what a payment must satisfy is [`crate::exact`]'s, who settles it
//! [`crate::facilitator`]'s.
//!
//! The types keep the client's strings as sent (an address's case, a number's spelling): the EIP-712
//! digest is computed from parsed values, but an echoed `accepted` or a stored payload stays byte-faithful.
//! Unknown fields are ignored rather than refused, as the SDKs do, so a newer client's extensions do not
//! break an older server.
//!
//! Why not the x402-rs crates: their error reasons are their own names (`invalid_payment_early`, …), not
//! the spec's that the official clients switch on; their EVM side is built on alloy 1.x, which would put a
//! second alloy beside the workspace's 2.5; and they need Rust 1.93 and pull rust_decimal, regex, url and
//! serde_with for what is here a few hundred lines.

mod header;
mod reason;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use header::{HeaderError, MAX_HEADER_LEN, decode_header, encode_header, parse_header};
pub use reason::ErrorReason;

/// The header a v2 server sends its 402 in.
pub const PAYMENT_REQUIRED_HEADER: &str = "PAYMENT-REQUIRED";
/// The header a v2 client pays with.
pub const PAYMENT_SIGNATURE_HEADER: &str = "PAYMENT-SIGNATURE";
/// The header a v2 server answers a paid request with (a [`SettleResponse`]).
pub const PAYMENT_RESPONSE_HEADER: &str = "PAYMENT-RESPONSE";
/// v1's payment header.
pub const X_PAYMENT_HEADER: &str = "X-PAYMENT";
/// v1's response header.
pub const X_PAYMENT_RESPONSE_HEADER: &str = "X-PAYMENT-RESPONSE";

/// The only scheme this crate verifies and settles.
pub const SCHEME_EXACT: &str = "exact";

/// The CAIP-2 network of an EVM chain: `eip155:<chain id>`.
pub fn eip155_network(chain_id: u64) -> String {
    format!("eip155:{chain_id}")
}

/// v1 names networks by legacy names; the official SDK's table (python `V1_NETWORK_CHAIN_IDS`).
pub const V1_NETWORK_NAMES: [(&str, u64); 20] = [
    ("base", 8453),
    ("base-sepolia", 84532),
    ("ethereum", 1),
    ("polygon", 137),
    ("polygon-amoy", 80002),
    ("avalanche", 43114),
    ("avalanche-fuji", 43113),
    ("abstract", 2741),
    ("abstract-testnet", 11124),
    ("iotex", 4689),
    ("sei", 1329),
    ("sei-testnet", 713715),
    ("peaq", 3338),
    ("story", 1513),
    ("educhain", 656476),
    ("skale-base-sepolia", 1444673419),
    ("megaeth", 4326),
    ("monad", 143),
    ("stable", 988),
    ("stable-testnet", 2201),
];

/// The EVM chain id a network string names: `eip155:<id>` (v2, and accepted in v1 too), or one of v1's
/// legacy names. `None` for anything else (another namespace, a malformed id, an unknown name).
pub fn evm_chain_id(network: &str) -> Option<u64> {
    if let Some(reference) = network.strip_prefix("eip155:") {
        // CAIP-2 references are decimal here; refuse signs, spaces and leading zeros' ambiguity alike.
        if reference.is_empty() || !reference.bytes().all(|b| b.is_ascii_digit()) || (reference.len() > 1 && reference.starts_with('0')) {
            return None;
        }
        return reference.parse().ok();
    }
    V1_NETWORK_NAMES.iter().find(|(name, _)| *name == network).map(|&(_, id)| id)
}

/// The v1 legacy name of a chain, if it has one.
pub fn v1_network_name(chain_id: u64) -> Option<&'static str> {
    V1_NETWORK_NAMES.iter().find(|&&(_, id)| id == chain_id).map(|&(name, _)| name)
}

/// What is being paid for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

/// One way to pay (v2): an entry of a 402's `accepts`, and the `accepted` a payment echoes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    pub scheme: String,
    /// CAIP-2, `eip155:<chain id>` for EVM.
    pub network: String,
    /// Atomic units of `asset`, decimal.
    pub amount: String,
    /// The token contract.
    pub asset: String,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    /// Scheme-specific; for exact EVM, the token's EIP-712 domain: `name`, `version`.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

impl PaymentRequirements {
    /// Exact-EVM requirements: `amount` atomic units of `asset` on `chain_id` to `pay_to`, with the token's
    /// EIP-712 domain (name, version) in `extra`, as a client needs it to sign.
    pub fn exact_evm(
        chain_id: u64,
        asset: impl ToString,
        pay_to: impl ToString,
        amount: u128,
        max_timeout_seconds: u64,
        domain_name: &str,
        domain_version: &str,
    ) -> Self {
        let mut extra = Map::new();
        extra.insert("name".into(), Value::String(domain_name.into()));
        extra.insert("version".into(), Value::String(domain_version.into()));
        Self {
            scheme: SCHEME_EXACT.into(),
            network: eip155_network(chain_id),
            amount: amount.to_string(),
            asset: asset.to_string(),
            pay_to: pay_to.to_string(),
            max_timeout_seconds,
            extra,
        }
    }

    /// `extra.name` and `extra.version`, when both are strings.
    pub fn eip712_domain(&self) -> Option<(&str, &str)> {
        domain_of(&self.extra)
    }

    /// The same offer in v1's shape (v1 carries the resource inside each requirement).
    pub fn to_v1(&self, resource: &ResourceInfo) -> PaymentRequirementsV1 {
        let network = match evm_chain_id(&self.network).and_then(v1_network_name) {
            Some(name) => name.to_string(),
            None => self.network.clone(),
        };
        PaymentRequirementsV1 {
            scheme: self.scheme.clone(),
            network,
            max_amount_required: self.amount.clone(),
            resource: resource.url.clone(),
            description: Some(resource.description.clone().unwrap_or_default()),
            mime_type: Some(resource.mime_type.clone().unwrap_or_default()),
            pay_to: self.pay_to.clone(),
            max_timeout_seconds: self.max_timeout_seconds,
            asset: self.asset.clone(),
            output_schema: None,
            extra: (!self.extra.is_empty()).then(|| Value::Object(self.extra.clone())),
        }
    }
}

fn domain_of(extra: &Map<String, Value>) -> Option<(&str, &str)> {
    Some((extra.get("name")?.as_str()?, extra.get("version")?.as_str()?))
}

/// A v2 402: the body of the `PAYMENT-REQUIRED` header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    pub x402_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    pub accepts: Vec<PaymentRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// A v2 payment: the body of the `PAYMENT-SIGNATURE` header.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    pub x402_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<ResourceInfo>,
    /// The requirements the client chose to pay.
    pub accepted: PaymentRequirements,
    /// Scheme-specific; for exact EVM with EIP-3009, an [`ExactEvmPayload`].
    pub payload: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Map<String, Value>>,
}

/// Exact EVM's payload (EIP-3009): the authorization and its signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExactEvmPayload {
    /// 0x-hex, 65 bytes for an EOA (r, s, v); longer for contract wallets.
    #[serde(default)]
    pub signature: String,
    pub authorization: ExactEvmAuthorization,
}

/// EIP-3009's `TransferWithAuthorization` fields, as strings: addresses 0x-hex, numbers decimal, the nonce
/// 32 bytes of 0x-hex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExactEvmAuthorization {
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    pub nonce: String,
}

impl ExactEvmPayload {
    /// A signed EIP-3009 authorization in the payload's wire form, as the official clients write it:
    /// addresses and the nonce 0x-hex, numbers decimal, the signature 0x-hex.
    pub fn from_signed(auth: &computepool_chain::eip3009::SignedAuthorization) -> Self {
        let m = &auth.message;
        Self {
            signature: format!("0x{}", hex::encode(&auth.signature)),
            authorization: ExactEvmAuthorization {
                from: m.from.to_string(),
                to: m.to.to_string(),
                value: m.value.to_string(),
                valid_after: m.validAfter.to_string(),
                valid_before: m.validBefore.to_string(),
                nonce: m.nonce.to_string(),
            },
        }
    }

    /// Reads a payment's scheme payload as exact EVM; `invalid_payload` when it is not one.
    pub fn from_value(payload: &Value) -> Result<Self, serde_json::Error> {
        Self::deserialize(payload)
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("strings serialise")
    }
}

/// v1's requirements: the resource and its description ride in every entry, and the amount is
/// `maxAmountRequired` (which exact still means exactly).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirementsV1 {
    pub scheme: String,
    /// A legacy name (`base-sepolia`) or, for chains without one, `eip155:<id>`.
    pub network: String,
    pub max_amount_required: String,
    pub resource: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    pub asset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// An object, or (some v1 servers) that object JSON-encoded in a string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

impl PaymentRequirementsV1 {
    /// `extra` as an object, decoding the JSON-string form.
    pub fn extra_object(&self) -> Map<String, Value> {
        match &self.extra {
            Some(Value::Object(map)) => map.clone(),
            Some(Value::String(text)) => match serde_json::from_str(text) {
                Ok(Value::Object(map)) => map,
                _ => Map::new(),
            },
            _ => Map::new(),
        }
    }

    /// The same offer in v2's shape.
    pub fn to_v2(&self) -> PaymentRequirements {
        let network = match evm_chain_id(&self.network) {
            Some(id) => eip155_network(id),
            None => self.network.clone(),
        };
        PaymentRequirements {
            scheme: self.scheme.clone(),
            network,
            amount: self.max_amount_required.clone(),
            asset: self.asset.clone(),
            pay_to: self.pay_to.clone(),
            max_timeout_seconds: self.max_timeout_seconds,
            extra: self.extra_object(),
        }
    }
}

/// A v1 402 body.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequiredV1 {
    pub x402_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub accepts: Vec<PaymentRequirementsV1>,
}

/// A v1 payment: the body of the `X-PAYMENT` header. Scheme and network ride at the top.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayloadV1 {
    pub x402_version: u32,
    pub scheme: String,
    pub network: String,
    pub payload: Value,
}

/// A facilitator's answer to `/verify`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyResponse {
    pub is_valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<ErrorReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
}

impl VerifyResponse {
    pub fn valid(payer: impl ToString) -> Self {
        Self { is_valid: true, invalid_reason: None, invalid_message: None, payer: Some(payer.to_string()) }
    }

    pub fn invalid(reason: ErrorReason, message: impl Into<String>, payer: Option<String>) -> Self {
        Self { is_valid: false, invalid_reason: Some(reason), invalid_message: Some(message.into()), payer }
    }
}

/// A facilitator's answer to `/settle`, and the body of `PAYMENT-RESPONSE` / `X-PAYMENT-RESPONSE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettleResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<ErrorReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
    /// The transaction hash; empty when settlement failed before one existed.
    pub transaction: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<String>,
}

impl SettleResponse {
    pub fn failed(reason: ErrorReason, message: impl Into<String>, network: impl Into<String>, payer: Option<String>) -> Self {
        Self {
            success: false,
            error_reason: Some(reason),
            error_message: Some(message.into()),
            payer,
            transaction: String::new(),
            network: network.into(),
            amount: None,
        }
    }
}

/// One (version, scheme, network) a facilitator handles.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportedKind {
    pub x402_version: u32,
    pub scheme: String,
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Value>,
}

/// `/supported`'s answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupportedResponse {
    pub kinds: Vec<SupportedKind>,
    #[serde(default)]
    pub extensions: Vec<String>,
    /// CAIP family pattern (`eip155:*`) to the addresses that submit settlements.
    #[serde(default)]
    pub signers: BTreeMap<String, Vec<String>>,
}

/// The body of `POST /verify` and `POST /settle`: `{x402Version, paymentPayload, paymentRequirements}`,
/// with payload and requirements in the shape of that version.
#[derive(Clone, Debug, PartialEq)]
pub enum FacilitatorRequest {
    V1 { payload: PaymentPayloadV1, requirements: PaymentRequirementsV1 },
    V2 { payload: PaymentPayload, requirements: PaymentRequirements },
}

/// Why a facilitator request body was refused before any check of the payment itself.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the request body is not JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("the request body has no numeric x402Version")]
    MissingVersion,
    #[error("x402Version {0} is not supported (1 and 2 are)")]
    UnsupportedVersion(u64),
    #[error("the request is x402Version {request}, its paymentPayload x402Version {payload}")]
    VersionMismatch { request: u64, payload: u64 },
    #[error("paymentPayload is missing or malformed: {0}")]
    Payload(serde_json::Error),
    #[error("paymentRequirements is missing or malformed: {0}")]
    Requirements(serde_json::Error),
}

impl RequestError {
    pub fn reason(&self) -> ErrorReason {
        match self {
            Self::NotJson(_) | Self::Payload(_) => ErrorReason::InvalidPayload,
            Self::MissingVersion | Self::UnsupportedVersion(_) | Self::VersionMismatch { .. } => ErrorReason::InvalidX402Version,
            Self::Requirements(_) => ErrorReason::InvalidPaymentRequirements,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestWire<'a, P, R> {
    x402_version: u32,
    payment_payload: &'a P,
    payment_requirements: &'a R,
}

impl FacilitatorRequest {
    pub fn x402_version(&self) -> u32 {
        match self {
            Self::V1 { .. } => 1,
            Self::V2 { .. } => 2,
        }
    }

    /// The network the requirements name (v1 may name it by a legacy name).
    pub fn requirements_network(&self) -> &str {
        match self {
            Self::V1 { requirements, .. } => &requirements.network,
            Self::V2 { requirements, .. } => &requirements.network,
        }
    }

    /// Parses a request body. The top-level `x402Version` picks the shape; a payload whose own version
    /// disagrees is refused (a v1 payload cannot satisfy v2 requirements).
    pub fn from_json(body: &[u8]) -> Result<Self, RequestError> {
        let value: Value = serde_json::from_slice(body).map_err(RequestError::NotJson)?;
        let version = value.get("x402Version").and_then(Value::as_u64).ok_or(RequestError::MissingVersion)?;
        let payload = value.get("paymentPayload").cloned().unwrap_or(Value::Null);
        let requirements = value.get("paymentRequirements").cloned().unwrap_or(Value::Null);
        let request = match version {
            1 => Self::V1 {
                payload: serde_json::from_value(payload).map_err(RequestError::Payload)?,
                requirements: serde_json::from_value(requirements).map_err(RequestError::Requirements)?,
            },
            2 => Self::V2 {
                payload: serde_json::from_value(payload).map_err(RequestError::Payload)?,
                requirements: serde_json::from_value(requirements).map_err(RequestError::Requirements)?,
            },
            other => return Err(RequestError::UnsupportedVersion(other)),
        };
        let payload_version = match &request {
            Self::V1 { payload, .. } => payload.x402_version,
            Self::V2 { payload, .. } => payload.x402_version,
        };
        if u64::from(payload_version) != version {
            return Err(RequestError::VersionMismatch { request: version, payload: payload_version.into() });
        }
        Ok(request)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let result = match self {
            Self::V1 { payload, requirements } => serde_json::to_vec(&RequestWire { x402_version: 1, payment_payload: payload, payment_requirements: requirements }),
            Self::V2 { payload, requirements } => serde_json::to_vec(&RequestWire { x402_version: 2, payment_payload: payload, payment_requirements: requirements }),
        };
        result.expect("x402 types serialise to JSON infallibly")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's own examples (x402 v2 §5), verbatim.
    const SPEC_PAYMENT_REQUIRED: &str = r#"{
      "x402Version": 2,
      "error": "PAYMENT-SIGNATURE header is required",
      "resource": {"url": "https://api.example.com/premium-data", "description": "Access to premium market data", "mimeType": "application/json"},
      "accepts": [{"scheme": "exact", "network": "eip155:84532", "amount": "10000",
        "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
        "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}}],
      "extensions": {}
    }"#;

    const SPEC_VERIFY_REQUEST: &str = r#"{
      "x402Version": 2,
      "paymentPayload": {
        "x402Version": 2,
        "resource": {"url": "https://api.example.com/premium-data", "description": "Access to premium market data", "mimeType": "application/json"},
        "accepted": {"scheme": "exact", "network": "eip155:84532", "amount": "10000",
          "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
          "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}},
        "payload": {
          "signature": "0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c",
          "authorization": {"from": "0x857b06519E91e3A54538791bDbb0E22373e36b66", "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
            "value": "10000", "validAfter": "1740672089", "validBefore": "1740672154",
            "nonce": "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"}
        }
      },
      "paymentRequirements": {"scheme": "exact", "network": "eip155:84532", "amount": "10000",
        "asset": "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "payTo": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
        "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}}
    }"#;

    /// A v1 402 body as the legacy SDKs write it (extra JSON-encoded in a string, as some v1 servers do).
    const V1_PAYMENT_REQUIRED: &str = r#"{"x402Version":1,"error":"X-PAYMENT header is required","accepts":[{
      "scheme":"exact","network":"base-sepolia","maxAmountRequired":"10000","resource":"https://api.example.com/x",
      "description":"d","mimeType":"application/json","payTo":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
      "maxTimeoutSeconds":60,"asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","outputSchema":null,
      "extra":"{\"name\":\"USDC\",\"version\":\"2\"}"}]}"#;

    #[test]
    fn spec_payment_required_round_trips() {
        let parsed: PaymentRequired = serde_json::from_str(SPEC_PAYMENT_REQUIRED).unwrap();
        assert_eq!(parsed.x402_version, 2);
        let accept = &parsed.accepts[0];
        assert_eq!(accept.eip712_domain(), Some(("USDC", "2")));
        assert_eq!(evm_chain_id(&accept.network), Some(84532));
        assert_eq!(accept.pay_to, "0x209693Bc6afc0C5328bA36FaF03C514EF312287C");
        let again: Value = serde_json::to_value(&parsed).unwrap();
        assert_eq!(again, serde_json::from_str::<Value>(SPEC_PAYMENT_REQUIRED).unwrap());
        // Through the header codec too.
        assert_eq!(decode_header::<PaymentRequired>(&encode_header(&parsed)).unwrap(), parsed);
    }

    #[test]
    fn built_requirements_match_the_spec_shape() {
        let built = PaymentRequirements::exact_evm(84532, "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "0x209693Bc6afc0C5328bA36FaF03C514EF312287C", 10_000, 60, "USDC", "2");
        let spec: PaymentRequired = serde_json::from_str(SPEC_PAYMENT_REQUIRED).unwrap();
        assert_eq!(built, spec.accepts[0]);
        let json = serde_json::to_value(&built).unwrap();
        for key in ["scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds", "extra"] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
    }

    #[test]
    fn spec_verify_request_parses_and_round_trips() {
        let request = FacilitatorRequest::from_json(SPEC_VERIFY_REQUEST.as_bytes()).unwrap();
        let FacilitatorRequest::V2 { payload, requirements } = &request else { panic!("v2 expected") };
        assert_eq!(payload.accepted, *requirements);
        let exact = ExactEvmPayload::from_value(&payload.payload).unwrap();
        assert_eq!(exact.authorization.valid_before, "1740672154");
        assert_eq!(exact.authorization.nonce.len(), 66);
        let back: Value = serde_json::from_slice(&request.to_json()).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(SPEC_VERIFY_REQUEST).unwrap());
    }

    #[test]
    fn v1_bodies_parse_and_convert() {
        let parsed: PaymentRequiredV1 = serde_json::from_str(V1_PAYMENT_REQUIRED).unwrap();
        let v2 = parsed.accepts[0].to_v2();
        assert_eq!(v2.network, "eip155:84532");
        assert_eq!(v2.amount, "10000");
        assert_eq!(v2.eip712_domain(), Some(("USDC", "2")));
        let resource = ResourceInfo { url: "https://api.example.com/x".into(), description: Some("d".into()), mime_type: Some("application/json".into()) };
        let v1 = v2.to_v1(&resource);
        assert_eq!(v1.network, "base-sepolia");
        assert_eq!(v1.max_amount_required, "10000");
        assert_eq!(v1.extra_object(), parsed.accepts[0].extra_object());
        // A chain without a legacy name keeps its CAIP-2 id in v1.
        let local = PaymentRequirements::exact_evm(16602, "0x01", "0x02", 5, 60, "USD Coin", "2").to_v1(&resource);
        assert_eq!(local.network, "eip155:16602");
    }

    #[test]
    fn facilitator_requests_are_refused_with_reasons() {
        let reason = |body: &str| FacilitatorRequest::from_json(body.as_bytes()).unwrap_err().reason();
        assert_eq!(reason("{not json"), ErrorReason::InvalidPayload);
        assert_eq!(reason(r#"{"paymentPayload":{}}"#), ErrorReason::InvalidX402Version);
        assert_eq!(reason(r#"{"x402Version":3,"paymentPayload":{},"paymentRequirements":{}}"#), ErrorReason::InvalidX402Version);
        let mut v: Value = serde_json::from_str(SPEC_VERIFY_REQUEST).unwrap();
        v["paymentRequirements"].as_object_mut().unwrap().remove("payTo");
        assert_eq!(reason(&v.to_string()), ErrorReason::InvalidPaymentRequirements);
        let mut v: Value = serde_json::from_str(SPEC_VERIFY_REQUEST).unwrap();
        v["paymentPayload"].as_object_mut().unwrap().remove("accepted");
        assert_eq!(reason(&v.to_string()), ErrorReason::InvalidPayload);
        let mut v: Value = serde_json::from_str(SPEC_VERIFY_REQUEST).unwrap();
        v["paymentPayload"]["x402Version"] = 1.into();
        assert_eq!(reason(&v.to_string()), ErrorReason::InvalidX402Version);
    }

    #[test]
    fn responses_match_the_spec_examples() {
        let invalid = VerifyResponse::invalid(ErrorReason::InsufficientFunds, "balance 0", Some("0x857b06519E91e3A54538791bDbb0E22373e36b66".into()));
        let json = serde_json::to_value(&invalid).unwrap();
        assert_eq!(json["isValid"], false);
        assert_eq!(json["invalidReason"], "insufficient_funds");
        let ok: VerifyResponse = serde_json::from_str(r#"{"isValid":true,"payer":"0x857b06519E91e3A54538791bDbb0E22373e36b66"}"#).unwrap();
        assert!(ok.is_valid && ok.invalid_reason.is_none());
        let settled: SettleResponse = serde_json::from_str(
            r#"{"success":true,"payer":"0x857b","transaction":"0x1234","network":"eip155:84532"}"#,
        )
        .unwrap();
        assert!(settled.success);
        let json = serde_json::to_value(&settled).unwrap();
        assert!(json.get("errorReason").is_none(), "absent optionals stay absent: {json}");
        let failed = SettleResponse::failed(ErrorReason::InsufficientFunds, "x", "eip155:84532", None);
        assert_eq!(serde_json::to_value(&failed).unwrap()["transaction"], "");
        let supported: SupportedResponse = serde_json::from_str(
            r#"{"kinds":[{"x402Version":2,"scheme":"exact","network":"eip155:84532"}],"extensions":[],"signers":{"eip155:*":["0x1234567890abcdef1234567890abcdef12345678"]}}"#,
        )
        .unwrap();
        assert_eq!(supported.kinds[0].network, "eip155:84532");
        assert_eq!(supported.signers["eip155:*"].len(), 1);
    }

    #[test]
    fn networks() {
        assert_eq!(evm_chain_id("eip155:16602"), Some(16602));
        assert_eq!(evm_chain_id("base-sepolia"), Some(84532));
        for bad in ["eip155:", "eip155:-1", "eip155:0x10", "eip155:010", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", "eip155:99999999999999999999999", "mainnet"] {
            assert_eq!(evm_chain_id(bad), None, "{bad}");
        }
        assert_eq!(v1_network_name(8453), Some("base"));
        assert_eq!(v1_network_name(16602), None);
    }
}
