//! The x402 `exact` rail (EVM, EIP-3009): `quote` builds the x402 v2 `PaymentRequirements` a 402 response
//! lists in `accepts`; `verify` and `settle` hand the client's payment to the pool's facilitator
//! (`POST /verify`, `POST /settle` with `{x402Version, paymentPayload, paymentRequirements}`) through the
//! host's `http` capability, to the facilitator host the operator granted. It holds no key and moves no
//! money itself. It does not stream: `stream-start` / `stream-stop` answer `unsupported`.
//!
//! Configuration (JSON, camelCase like x402):
//! `{"facilitator": "http://127.0.0.1:4021", "network": "eip155:16602", "asset": "0x…", "payTo": "0x…",
//!   "name": "USD Coin", "version": "2", "maxTimeoutSeconds": 60}` — `name`/`version` are the token's
//! EIP-712 domain (clients sign against it), `payTo` the default recipient (a quote's `pay-to` overrides
//! it), `maxTimeoutSeconds` defaults to 60.
//!
//! `settle` is idempotent per request id: the first successful settlement is kept in the kv-store
//! (`settled:<request-id>`) and returned to a retry without calling the facilitator again.
#![no_std]

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use computepool::host::{clock, http, kv_store};
use computepool::payment_rail::types::{
    FlowChange, FlowReceipt, PaymentRequirements, QuoteRequest, RailError, RailInfo, Settlement, VerifiedPayment,
};
use computepool_rail_kit::{base64_decode, parse_address, parse_amount};
use exports::computepool::payment_rail::rail::Guest;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/payment-rail/0.1.0"],
    world: "computepool:payment-rail/payment-rail@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    facilitator: String,
    network: String,
    asset: String,
    #[serde(default)]
    pay_to: String,
    name: String,
    version: String,
    #[serde(default = "default_timeout")]
    max_timeout_seconds: u64,
}

fn default_timeout() -> u64 {
    60
}

fn invalid(m: impl Into<String>) -> RailError {
    RailError::InvalidPayment(m.into())
}

fn config(text: &str) -> Result<Config, RailError> {
    let c: Config = serde_json::from_str(text).map_err(|e| invalid(format!("x402-exact config: {e}")))?;
    let chain = c.network.strip_prefix("eip155:").ok_or_else(|| invalid(format!("network `{}` is not eip155:<chain id>", c.network)))?;
    chain.parse::<u64>().map_err(|_| invalid(format!("network `{}` is not eip155:<chain id>", c.network)))?;
    parse_address("asset", &c.asset).map_err(invalid)?;
    if !c.pay_to.is_empty() {
        parse_address("payTo", &c.pay_to).map_err(invalid)?;
    }
    if !(c.facilitator.starts_with("https://") || c.facilitator.starts_with("http://")) {
        return Err(invalid(format!("facilitator `{}` is not an http(s) URL", c.facilitator)));
    }
    if c.name.is_empty() || c.version.is_empty() || c.max_timeout_seconds == 0 {
        return Err(invalid("name, version (the token's EIP-712 domain) and maxTimeoutSeconds must be set"));
    }
    Ok(c)
}

/// POSTs `body` as JSON to the facilitator's `path`; returns (status, parsed body).
fn post(config: &Config, path: &str, body: &Value) -> Result<(u16, Value), RailError> {
    let url = format!("{}{path}", config.facilitator.trim_end_matches('/'));
    let request = http::Request {
        method: "POST".into(),
        url: url.clone(),
        headers: alloc::vec![
            http::Header { name: "content-type".into(), value: "application/json".into() },
            http::Header { name: "accept".into(), value: "application/json".into() },
        ],
        body: serde_json::to_vec(body).map_err(|e| invalid(e.to_string()))?,
    };
    let response = http::send(&request).map_err(|e| {
        RailError::Unavailable(match e {
            http::HttpError::HostNotGranted(h) => format!("the operator has not granted this rail http to {h} (add it to [grants.http])"),
            http::HttpError::InvalidRequest(m) => format!("request to {url} refused by the host: {m}"),
            http::HttpError::TooLarge(n) => format!("the facilitator's answer passed {n} bytes"),
            http::HttpError::Timeout => format!("the facilitator at {url} did not answer in time"),
            http::HttpError::Transport(m) => format!("the facilitator at {url}: {m}"),
        })
    })?;
    if response.status >= 500 {
        return Err(RailError::Unavailable(format!("the facilitator answered {} to {path}", response.status)));
    }
    let value: Value = serde_json::from_slice(&response.body).map_err(|_| {
        RailError::Unavailable(format!("the facilitator answered {} to {path} with a body that is not JSON", response.status))
    })?;
    Ok((response.status, value))
}

fn reason(value: &Value, field: &str) -> String {
    let reason = value.get(field).and_then(Value::as_str).unwrap_or("unexpected_error");
    match value.get("invalidMessage").or_else(|| value.get("errorMessage")).and_then(Value::as_str) {
        Some(m) => format!("{reason}: {m}"),
        None => reason.to_string(),
    }
}

#[derive(Serialize, Deserialize)]
struct SettlementData {
    #[serde(rename = "x402Version")]
    x402_version: u64,
    #[serde(rename = "paymentPayload")]
    payment_payload: Value,
    #[serde(rename = "paymentRequirements")]
    payment_requirements: Value,
}

#[derive(Serialize, Deserialize)]
struct StoredSettlement {
    reference: String,
    amount: String,
    payer: String,
    network: String,
}

struct Exact;

impl Guest for Exact {
    fn info(config_text: String) -> Result<RailInfo, RailError> {
        let c = config(&config_text)?;
        Ok(RailInfo { name: "x402-exact".into(), scheme: "exact".into(), network: c.network, asset: c.asset, payments: true, streams: false })
    }

    fn quote(config_text: String, request: QuoteRequest) -> Result<PaymentRequirements, RailError> {
        let c = config(&config_text)?;
        let price = parse_amount("price-per-second", &request.price_per_second).map_err(invalid)?;
        let amount = price
            .checked_mul(u128::from(request.max_seconds))
            .ok_or_else(|| invalid("price-per-second × max-seconds passes 128 bits"))?;
        if amount == 0 {
            return Err(invalid("the quote is 0: an exact payment must move something (serve the request free instead)"));
        }
        let pay_to = if request.pay_to.is_empty() { c.pay_to.clone() } else { request.pay_to.clone() };
        if pay_to.is_empty() {
            return Err(invalid("no recipient: neither the quote's pay-to nor the config's payTo is set"));
        }
        parse_address("pay-to", &pay_to).map_err(invalid)?;
        let body = json!({
            "scheme": "exact",
            "network": c.network,
            "amount": amount.to_string(),
            "asset": c.asset,
            "payTo": pay_to,
            "maxTimeoutSeconds": c.max_timeout_seconds,
            "extra": { "name": c.name, "version": c.version },
        });
        let now_s = clock::wall_now_ms() / 1000;
        Ok(PaymentRequirements { body: body.to_string(), max_amount: amount.to_string(), valid_until: now_s + c.max_timeout_seconds })
    }

    fn verify(config_text: String, requirements: PaymentRequirements, payment_header: String) -> Result<VerifiedPayment, RailError> {
        let c = config(&config_text)?;
        let bytes = base64_decode(&payment_header).map_err(|e| invalid(format!("invalid_payload: the payment header is not base64: {e}")))?;
        let payload: Value =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("invalid_payload: the payment header is not JSON: {e}")))?;
        if !payload.is_object() {
            return Err(invalid("invalid_payload: the payment header is not a JSON object"));
        }
        let version = payload.get("x402Version").and_then(Value::as_u64).unwrap_or(2);
        let reqs: Value = serde_json::from_str(&requirements.body).map_err(|e| invalid(format!("the requirements are not JSON: {e}")))?;
        let data = SettlementData { x402_version: version, payment_payload: payload, payment_requirements: reqs };
        let (_, answer) = post(&c, "/verify", &serde_json::to_value(&data).map_err(|e| invalid(e.to_string()))?)?;
        if answer.get("isValid").and_then(Value::as_bool) != Some(true) {
            return Err(RailError::Rejected(reason(&answer, "invalidReason")));
        }
        let authorization = data.payment_payload.get("payload").and_then(|p| p.get("authorization"));
        let payer = answer
            .get("payer")
            .and_then(Value::as_str)
            .or_else(|| authorization.and_then(|a| a.get("from")).and_then(Value::as_str))
            .unwrap_or_default()
            .to_string();
        let amount = match authorization.and_then(|a| a.get("value")).and_then(Value::as_str) {
            Some(v) => v.to_string(),
            None => requirements.max_amount.clone(),
        };
        parse_amount("the authorization's value", &amount).map_err(invalid)?;
        let request_id = nonce_of(&data.payment_payload).unwrap_or_default();
        Ok(VerifiedPayment {
            request_id,
            payer,
            amount,
            settlement_data: serde_json::to_string(&data).map_err(|e| invalid(e.to_string()))?,
        })
    }

    fn settle(config_text: String, payment: VerifiedPayment) -> Result<Settlement, RailError> {
        let c = config(&config_text)?;
        if payment.request_id.is_empty() {
            return Err(invalid("the payment has no request id (its idempotency key)"));
        }
        let key = format!("settled:{}", payment.request_id);
        if let Some(bytes) = kv_store::get(&key).map_err(kv_error)? {
            let s: StoredSettlement = serde_json::from_slice(&bytes).map_err(|e| RailError::Unavailable(e.to_string()))?;
            return Ok(Settlement { reference: s.reference, amount: s.amount, payer: s.payer, network: s.network });
        }
        let data: SettlementData =
            serde_json::from_str(&payment.settlement_data).map_err(|e| invalid(format!("settlement data: {e}")))?;
        let (_, answer) = post(&c, "/settle", &serde_json::to_value(&data).map_err(|e| invalid(e.to_string()))?)?;
        if answer.get("success").and_then(Value::as_bool) != Some(true) {
            return Err(RailError::Rejected(reason(&answer, "errorReason")));
        }
        let text = |f: &str| answer.get(f).and_then(Value::as_str).map(ToString::to_string);
        let stored = StoredSettlement {
            reference: text("transaction").unwrap_or_default(),
            amount: payment.amount.clone(),
            payer: text("payer").unwrap_or(payment.payer.clone()),
            network: text("network").unwrap_or(c.network),
        };
        let bytes: Vec<u8> = serde_json::to_vec(&stored).map_err(|e| invalid(e.to_string()))?;
        kv_store::set(&key, &bytes).map_err(kv_error)?;
        Ok(Settlement { reference: stored.reference, amount: stored.amount, payer: stored.payer, network: stored.network })
    }

    fn stream_start(_: String, _: FlowChange) -> Result<FlowReceipt, RailError> {
        Err(RailError::Unsupported(STREAMS.into()))
    }

    fn stream_stop(_: String, _: FlowChange) -> Result<FlowReceipt, RailError> {
        Err(RailError::Unsupported(STREAMS.into()))
    }
}

const STREAMS: &str = "x402-exact takes one payment per voucher and does not stream; stream to members with \
                       superfluid-gda or ledger";

/// The EIP-3009 nonce of an exact EVM payload: unique per voucher, so the settlement's idempotency key
/// when the host does not name the request (the host's `request-id` replaces it in `settle`).
fn nonce_of(payload: &Value) -> Option<String> {
    payload.get("payload")?.get("authorization")?.get("nonce")?.as_str().map(ToString::to_string)
}

fn kv_error(e: kv_store::KvError) -> RailError {
    RailError::Unavailable(match e {
        kv_store::KvError::InvalidKey(n) => format!("the request id makes a kv key longer than {n} bytes"),
        kv_store::KvError::QuotaExceeded(n) => format!("the rail's kv-store is full ({n} bytes)"),
        kv_store::KvError::Unavailable(m) => m,
    })
}

export!(Exact);
