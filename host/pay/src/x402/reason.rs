//! The x402 error reasons: the strings a facilitator puts in `invalidReason` / `errorReason` and a resource
//! server in its 402's `error`. The names are the spec's (x402 v2 §9) plus the ones the official SDKs use
//! for the exact-EVM scheme where the spec has none (a used nonce, the token's EIP-712 domain, a failed
//! simulation), so an SDK client that switches on them understands ours.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a payment was refused. Serialised as the spec's snake_case string; a string this enum does not
/// know (from another facilitator) is kept as `Other` rather than failing the whole response.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorReason {
    /// The payer's token balance does not cover the amount.
    InsufficientFunds,
    /// `validAfter` is still in the future.
    InvalidValidAfter,
    /// `validBefore` has passed, or passes before the transfer could be mined.
    InvalidValidBefore,
    /// The authorization's value is not exactly the required amount.
    ValueMismatch,
    /// The EIP-712 signature does not recover to `authorization.from` under the token's domain.
    InvalidSignature,
    /// The authorization pays someone other than `payTo`.
    RecipientMismatch,
    /// The authorization's nonce was already used (or cancelled) on chain: a replay.
    NonceAlreadyUsed,
    /// The requirements' `extra.name` is not the token's EIP-712 domain name.
    TokenNameMismatch,
    /// The requirements' `extra.version` is not the token's EIP-712 domain version.
    TokenVersionMismatch,
    /// The requirements carry no `extra.name` / `extra.version`, so no domain to verify against.
    MissingEip712Domain,
    /// The payload's network is not the requirements' network.
    NetworkMismatch,
    /// The network is not one this facilitator serves (or not a network at all).
    InvalidNetwork,
    /// The payment payload is malformed (base64, JSON, a field that does not parse).
    InvalidPayload,
    /// The payment requirements are malformed or name something this facilitator will not settle.
    InvalidPaymentRequirements,
    /// The scheme field is not a scheme at all.
    InvalidScheme,
    /// The scheme is well-formed but not one this facilitator supports.
    UnsupportedScheme,
    /// `x402Version` is neither 1 nor 2.
    InvalidX402Version,
    /// The settlement transaction failed or was rejected.
    InvalidTransactionState,
    /// Simulating `transferWithAuthorization` failed for a reason none of the checks above named.
    TransactionSimulationFailed,
    UnexpectedVerifyError,
    UnexpectedSettleError,
    /// A reason string this enum does not know, kept verbatim.
    Other(String),
}

impl ErrorReason {
    /// Every reason this enum names (not `Other`), for tests and documentation.
    pub const KNOWN: [ErrorReason; 21] = [
        Self::InsufficientFunds,
        Self::InvalidValidAfter,
        Self::InvalidValidBefore,
        Self::ValueMismatch,
        Self::InvalidSignature,
        Self::RecipientMismatch,
        Self::NonceAlreadyUsed,
        Self::TokenNameMismatch,
        Self::TokenVersionMismatch,
        Self::MissingEip712Domain,
        Self::NetworkMismatch,
        Self::InvalidNetwork,
        Self::InvalidPayload,
        Self::InvalidPaymentRequirements,
        Self::InvalidScheme,
        Self::UnsupportedScheme,
        Self::InvalidX402Version,
        Self::InvalidTransactionState,
        Self::TransactionSimulationFailed,
        Self::UnexpectedVerifyError,
        Self::UnexpectedSettleError,
    ];

    /// The wire string.
    pub fn as_str(&self) -> &str {
        match self {
            Self::InsufficientFunds => "insufficient_funds",
            Self::InvalidValidAfter => "invalid_exact_evm_payload_authorization_valid_after",
            Self::InvalidValidBefore => "invalid_exact_evm_payload_authorization_valid_before",
            Self::ValueMismatch => "invalid_exact_evm_payload_authorization_value_mismatch",
            Self::InvalidSignature => "invalid_exact_evm_payload_signature",
            Self::RecipientMismatch => "invalid_exact_evm_payload_recipient_mismatch",
            Self::NonceAlreadyUsed => "invalid_exact_evm_nonce_already_used",
            Self::TokenNameMismatch => "invalid_exact_evm_token_name_mismatch",
            Self::TokenVersionMismatch => "invalid_exact_evm_token_version_mismatch",
            Self::MissingEip712Domain => "missing_eip712_domain",
            Self::NetworkMismatch => "network_mismatch",
            Self::InvalidNetwork => "invalid_network",
            Self::InvalidPayload => "invalid_payload",
            Self::InvalidPaymentRequirements => "invalid_payment_requirements",
            Self::InvalidScheme => "invalid_scheme",
            Self::UnsupportedScheme => "unsupported_scheme",
            Self::InvalidX402Version => "invalid_x402_version",
            Self::InvalidTransactionState => "invalid_transaction_state",
            Self::TransactionSimulationFailed => "invalid_exact_evm_transaction_simulation_failed",
            Self::UnexpectedVerifyError => "unexpected_verify_error",
            Self::UnexpectedSettleError => "unexpected_settle_error",
            Self::Other(s) => s,
        }
    }
}

impl FromStr for ErrorReason {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::KNOWN.iter().find(|r| r.as_str() == s).cloned().unwrap_or_else(|| Self::Other(s.to_string())))
    }
}

impl fmt::Display for ErrorReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ErrorReason {}

impl Serialize for ErrorReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorReason {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Ok(s.parse().unwrap_or_else(|never| match never {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_strings() {
        for reason in ErrorReason::KNOWN {
            let json = serde_json::to_string(&reason).unwrap();
            assert_eq!(json, format!("\"{}\"", reason.as_str()));
            assert_eq!(serde_json::from_str::<ErrorReason>(&json).unwrap(), reason);
        }
        let mut strings: Vec<&str> = ErrorReason::KNOWN.iter().map(ErrorReason::as_str).collect();
        strings.sort();
        strings.dedup();
        assert_eq!(strings.len(), ErrorReason::KNOWN.len(), "two reasons share a string");
    }

    #[test]
    fn the_spec_strings_are_the_spec_strings() {
        // x402 v2 §9, verbatim.
        assert_eq!(ErrorReason::InsufficientFunds.as_str(), "insufficient_funds");
        assert_eq!(ErrorReason::InvalidValidAfter.as_str(), "invalid_exact_evm_payload_authorization_valid_after");
        assert_eq!(ErrorReason::InvalidValidBefore.as_str(), "invalid_exact_evm_payload_authorization_valid_before");
        assert_eq!(ErrorReason::ValueMismatch.as_str(), "invalid_exact_evm_payload_authorization_value_mismatch");
        assert_eq!(ErrorReason::InvalidSignature.as_str(), "invalid_exact_evm_payload_signature");
        assert_eq!(ErrorReason::RecipientMismatch.as_str(), "invalid_exact_evm_payload_recipient_mismatch");
        assert_eq!(ErrorReason::InvalidX402Version.as_str(), "invalid_x402_version");
    }

    #[test]
    fn unknown_reasons_are_kept() {
        let r: ErrorReason = serde_json::from_str("\"permit2_allowance_required\"").unwrap();
        assert_eq!(r, ErrorReason::Other("permit2_allowance_required".into()));
        assert_eq!(serde_json::to_string(&r).unwrap(), "\"permit2_allowance_required\"");
    }
}
