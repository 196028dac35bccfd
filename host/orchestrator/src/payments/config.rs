//! A pool's payment settings: its price, how long one request may stream, and the two rails it uses (the
//! challenge rail that takes a client's payment, the flow rail that pays the operators while a request
//! streams). Operators change them with `PUT /pools/{id}/payments`; the next request uses them, no restart.

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The longest one request may stream unless the pool says otherwise, in seconds.
pub const DEFAULT_MAX_SECONDS_PER_REQUEST: u32 = 60;
/// The most any pool may let one request stream, in seconds (a voucher pays the worst case up front).
pub const MAX_SECONDS_PER_REQUEST: u32 = 3600;

/// How a pool charges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolPayments {
    /// Atomic units of the pool's asset per second a request streams (decimal string: amounts can pass
    /// 2^53). It must be a multiple of the pool's total member units, so that every wei of the flow
    /// reaches an operator (Superfluid's GDA floors the per-unit rate).
    pub price_per_second: String,
    /// The longest one request may stream, in seconds. Its worst case, price × this, is what a request
    /// reserves from its session and what one voucher pays. Default 60, at most 3600.
    #[serde(default = "default_max_seconds")]
    pub max_seconds_per_request: u32,
    /// The rail that answers unpaid requests with a 402 and takes the payment (e.g. `x402-exact`).
    pub challenge: RailChoice,
    /// The rail that streams money to the operators while a request runs (e.g. `superfluid-gda`,
    /// `ledger`).
    pub flow: RailChoice,
}

fn default_max_seconds() -> u32 {
    DEFAULT_MAX_SECONDS_PER_REQUEST
}

/// A rail plugin by id, with the pool's settings for it (passed to the plugin as JSON; docs/PLUGINS.md
/// lists each rail's keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RailChoice {
    pub plugin: String,
    #[serde(default)]
    pub config: serde_json::Value,
    /// (Flow rails) where the flow goes: the Superfluid GDA pool's address for `superfluid-gda`, the
    /// ledger account for `ledger`. Default: the pool's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// (Flow rails) what the flow pays in: the Super Token's address for `superfluid-gda`, the unit for
    /// `ledger`. Default: the config's `token`, else its `unit`, else the plugin id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// (Flow rails) units of the flow's token per atomic unit of the price (decimal string): 10^12 when
    /// the price is in USDC (6 decimals) and the flow in USDCx (18). Default 1. A session's cost is in the
    /// price's unit; the operators receive cost × scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale: Option<String>,
}

impl RailChoice {
    /// [`scale`](Self::scale) as a number (1 when unset).
    pub fn scale(&self) -> Result<u128, ApiError> {
        match &self.scale {
            None => Ok(1),
            Some(text) => match parse_amount(text) {
                Ok(0) | Err(_) => Err(ApiError::invalid("flow.scale", format!("flow.scale {text:?} is not a positive decimal number"))),
                Ok(scale) => Ok(scale),
            },
        }
    }
}

impl PoolPayments {
    /// Checks what an operator sent; returns the price in atomic units per second.
    pub fn validate(&self) -> Result<u128, ApiError> {
        let price = parse_amount(&self.price_per_second)
            .map_err(|why| ApiError::invalid("price_per_second", format!("price_per_second: {why}")))?;
        if price == 0 {
            return Err(ApiError::invalid("price_per_second", "price_per_second must be above 0 (a free pool has no payments)"));
        }
        if self.max_seconds_per_request == 0 || self.max_seconds_per_request > MAX_SECONDS_PER_REQUEST {
            return Err(ApiError::invalid(
                "max_seconds_per_request",
                format!("max_seconds_per_request must be 1 to {MAX_SECONDS_PER_REQUEST}"),
            ));
        }
        price.checked_mul(u128::from(self.max_seconds_per_request)).ok_or_else(|| {
            ApiError::invalid("price_per_second", "price_per_second × max_seconds_per_request overflows 128 bits")
        })?;
        let scale = self.flow.scale()?;
        price
            .checked_mul(u128::from(self.max_seconds_per_request))
            .and_then(|worst| worst.checked_mul(scale))
            .ok_or_else(|| ApiError::invalid("flow.scale", "price × max seconds × flow.scale overflows 128 bits"))?;
        for (name, rail) in [("challenge", &self.challenge), ("flow", &self.flow)] {
            if !is_plugin_id(&rail.plugin) {
                return Err(ApiError::invalid(
                    format!("{name}.plugin"),
                    format!("{name}.plugin {:?} is not a plugin id (1-64 of a-z 0-9 - _ .)", rail.plugin),
                ));
            }
        }
        Ok(price)
    }
}

/// A decimal string of atomic units: digits only, no sign, no leading `+`, fits 128 bits.
pub fn parse_amount(text: &str) -> Result<u128, String> {
    if text.is_empty() || text.len() > 39 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a decimal number of atomic units"));
    }
    text.parse::<u128>().map_err(|_| format!("{text} does not fit 128 bits"))
}

fn is_plugin_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payments(price: &str, seconds: u32) -> PoolPayments {
        PoolPayments {
            price_per_second: price.into(),
            max_seconds_per_request: seconds,
            challenge: RailChoice { plugin: "x402-exact".into(), config: serde_json::Value::Null, target: None, token: None, scale: None },
            flow: RailChoice { plugin: "ledger".into(), config: serde_json::Value::Null, target: None, token: None, scale: None },
        }
    }

    #[test]
    fn prices_and_limits_are_checked() {
        assert_eq!(payments("3000", 60).validate().expect("valid"), 3000);
        for (price, seconds, param) in [
            ("0", 60, "price_per_second"),
            ("-1", 60, "price_per_second"),
            ("1e6", 60, "price_per_second"),
            ("", 60, "price_per_second"),
            ("340282366920938463463374607431768211456", 60, "price_per_second"),
            ("340282366920938463463374607431768211455", 2, "price_per_second"),
            ("1", 0, "max_seconds_per_request"),
            ("1", MAX_SECONDS_PER_REQUEST + 1, "max_seconds_per_request"),
        ] {
            let e = payments(price, seconds).validate().expect_err(price);
            assert!(e.body()["error"]["param"] == param, "{price} {seconds}: {}", e.body());
        }
        let mut bad = payments("1", 1);
        bad.flow.plugin = "../evil".into();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<PoolPayments>(
            r#"{"price_per_second":"1","challenge":{"plugin":"a"},"flow":{"plugin":"b"},"pricee":1}"#,
        )
        .expect_err("unknown field");
        assert!(e.to_string().contains("pricee"), "{e}");
    }
}
