//! The header codec: x402 headers (`PAYMENT-REQUIRED`, `PAYMENT-SIGNATURE`, `PAYMENT-RESPONSE` and v1's
//! `X-PAYMENT`, `X-PAYMENT-RESPONSE`) carry base64 of camelCase JSON. The official clients encode with the
//! standard alphabet and padding; decoding also takes unpadded and URL-safe base64, which some hand-rolled
//! clients send, since neither is ambiguous.

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ErrorReason;

/// The longest header value decoded. A voucher is well under 2 KiB; HTTP servers cap a whole header block
/// near 8-16 KiB anyway, and this bounds the work a hostile value can cause.
pub const MAX_HEADER_LEN: usize = 16 * 1024;

const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a header value could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("the header is {len} bytes long, over the {MAX_HEADER_LEN}-byte limit")]
    TooLong { len: usize },
    #[error("the header is not valid base64: {0}")]
    Base64(base64::DecodeError),
    #[error("the header's base64 does not hold UTF-8 JSON: {0}")]
    NotUtf8(std::str::Utf8Error),
    #[error("the header's JSON does not parse as {what}: {source}")]
    Json { what: &'static str, source: serde_json::Error },
}

impl HeaderError {
    /// Every malformed header is the spec's `invalid_payload`.
    pub fn reason(&self) -> ErrorReason {
        ErrorReason::InvalidPayload
    }
}

impl From<HeaderError> for ErrorReason {
    fn from(e: HeaderError) -> Self {
        e.reason()
    }
}

/// Base64 (standard alphabet, padded) of `value`'s JSON, as the official clients and servers write it.
pub fn encode_header<T: Serialize>(value: &T) -> String {
    let json = serde_json::to_vec(value).expect("x402 types serialise to JSON infallibly (string keys, no floats)");
    base64::engine::general_purpose::STANDARD.encode(json)
}

/// Reads a header value, with the error's detail.
pub fn parse_header<T: DeserializeOwned>(value: &str) -> Result<T, HeaderError> {
    let value = value.trim();
    if value.len() > MAX_HEADER_LEN {
        return Err(HeaderError::TooLong { len: value.len() });
    }
    let bytes = match STANDARD_LENIENT.decode(value) {
        Ok(bytes) => bytes,
        Err(standard) => URL_SAFE_LENIENT.decode(value).map_err(|_| HeaderError::Base64(standard))?,
    };
    let text = std::str::from_utf8(&bytes).map_err(HeaderError::NotUtf8)?;
    serde_json::from_str(text).map_err(|source| HeaderError::Json { what: std::any::type_name::<T>().rsplit("::").next().unwrap_or("x402 JSON"), source })
}

/// Reads a header value; every failure is `invalid_payload` (use [`parse_header`] for the detail).
pub fn decode_header<T: DeserializeOwned>(value: &str) -> Result<T, ErrorReason> {
    parse_header(value).map_err(ErrorReason::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x402::PaymentRequired;

    #[test]
    fn round_trip_and_python_compatible_encoding() {
        // What the Python SDK's safe_base64_encode(json) gives for this JSON.
        let json = r#"{"success":true,"transaction":"0xab","network":"eip155:16602"}"#;
        let encoded = base64::engine::general_purpose::STANDARD.encode(json);
        let decoded: serde_json::Value = decode_header(&encoded).unwrap();
        assert_eq!(decoded["network"], "eip155:16602");
        assert_eq!(encode_header(&decoded), base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&decoded).unwrap()));
        // Unpadded and URL-safe forms are read too.
        let unpadded = encoded.trim_end_matches('=');
        assert_eq!(decode_header::<serde_json::Value>(unpadded).unwrap(), decoded);
        let url_safe = base64::engine::general_purpose::URL_SAFE.encode(r#"{"a":"??>>"}"#);
        assert!(url_safe.contains('_') || url_safe.contains('-'), "{url_safe}");
        assert_eq!(decode_header::<serde_json::Value>(&url_safe).unwrap()["a"], "??>>");
    }

    #[test]
    fn malformed_headers_get_typed_errors() {
        assert!(matches!(parse_header::<serde_json::Value>("not base64 at all!"), Err(HeaderError::Base64(_))));
        let not_json = base64::engine::general_purpose::STANDARD.encode("{\"x402Version\": 2,");
        assert!(matches!(parse_header::<serde_json::Value>(&not_json), Err(HeaderError::Json { .. })));
        let not_utf8 = base64::engine::general_purpose::STANDARD.encode([0xff, 0xfe, 0x00]);
        assert!(matches!(parse_header::<serde_json::Value>(&not_utf8), Err(HeaderError::NotUtf8(_))));
        // Valid JSON, wrong shape.
        let wrong_shape = base64::engine::general_purpose::STANDARD.encode(r#"{"x402Version":2}"#);
        let err = parse_header::<PaymentRequired>(&wrong_shape).unwrap_err();
        assert!(matches!(err, HeaderError::Json { what: "PaymentRequired", .. }), "{err}");
        let long = "A".repeat(MAX_HEADER_LEN + 4);
        assert!(matches!(parse_header::<serde_json::Value>(&long), Err(HeaderError::TooLong { .. })));
        assert_eq!(decode_header::<serde_json::Value>("%%%").unwrap_err(), ErrorReason::InvalidPayload);
    }
}
