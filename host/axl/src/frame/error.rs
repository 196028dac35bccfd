//! Why a frame was rejected. Every variant here means the byte stream can no longer be trusted: the
//! caller drops the connection (not the process) and fails the requests that were riding on it.

use super::header::{DType, FrameKind};

/// A frame that could not be decoded or encoded. Decoding errors are fatal to the stream they came
/// from: framing cannot be resynchronised after a bad length or header, so a [`FrameDecoder`]
/// that returned one answers [`FrameError::Poisoned`] from then on.
///
/// Strings echoed from the wire (an unknown kind, dtype or op) are cut to a few dozen characters so a
/// hostile peer cannot flood the logs through them.
///
/// [`FrameDecoder`]: super::FrameDecoder
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The input ended inside a frame: `needed` bytes make the frame (as far as is known so far),
    /// only `available` arrived.
    #[error("truncated frame: {available} of {needed} bytes arrived")]
    Truncated { needed: u64, available: u64 },

    /// The 4-byte length prefix announces a header longer than the configured maximum.
    #[error("frame header of {len} bytes exceeds the limit of {max} bytes")]
    HeaderTooLong { len: u64, max: u64 },

    /// Prefix + header + payload would exceed the configured maximum frame size.
    #[error(
        "frame of {len} bytes exceeds the limit of {max} bytes (long prompts must be sent as \
         several activation chunks)"
    )]
    FrameTooLarge { len: u64, max: u64 },

    /// The header is not UTF-8 JSON matching the schema: a syntax error, a wrong type, a `null`, a
    /// duplicate or unknown field. `reason` is serde_json's message.
    #[error("frame header is not valid protocol JSON: {reason}")]
    InvalidJson { reason: String },

    /// The header's `v` is not a protocol version this peer speaks.
    #[error("unsupported protocol version {got}: this peer speaks version {supported}")]
    UnsupportedVersion { got: u64, supported: u32 },

    /// `kind` is none of `activations`, `token`, `control`.
    #[error("unknown frame kind {kind:?}: expected activations, token or control")]
    UnknownKind { kind: String },

    /// A control frame's `op` is none of `end`, `unload`, `error`.
    #[error("unknown control op {op:?}: expected end, unload or error")]
    UnknownControlOp { op: String },

    /// `dtype` is neither `f32` nor `bf16`.
    #[error("unknown dtype {dtype:?}: expected f32 or bf16")]
    UnknownDType { dtype: String },

    /// A field this kind of frame requires is absent.
    #[error("{kind} frame is missing the field `{field}`")]
    MissingField { kind: &'static str, field: &'static str },

    /// A field that belongs to another kind of frame is present.
    #[error("the field `{field}` is not allowed on {kind} frames")]
    UnexpectedField { kind: &'static str, field: &'static str },

    /// A field is present and well-typed but its value is out of range.
    #[error("invalid `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },

    /// The header's `payload_len` disagrees with the number of bytes that follow it in a whole-buffer
    /// decode (fewer or more).
    #[error("header declares a payload of {declared} bytes but {actual} bytes follow it")]
    PayloadLengthMismatch { declared: u64, actual: u64 },

    /// `rows × hidden × dtype size` is not the declared `payload_len`.
    #[error(
        "activations of shape [{rows}, {hidden}] in {dtype} take {expected} bytes, but the header \
         declares a payload of {payload_len} bytes"
    )]
    ShapeMismatch { rows: u64, hidden: u64, dtype: DType, expected: u64, payload_len: u64 },

    /// `rows × hidden × dtype size` does not fit in 64 bits, so it cannot match any payload.
    #[error("activations of shape [{rows}, {hidden}] in {dtype} overflow a 64-bit byte count")]
    ShapeOverflow { rows: u64, hidden: u64, dtype: DType },

    /// A token or control frame declares payload bytes; only activations carry a payload.
    #[error("{kind} frames carry no payload, but the header declares {payload_len} bytes")]
    UnexpectedPayload { kind: FrameKind, payload_len: u64 },

    /// The decoder already returned a fatal error on this stream; drop the connection.
    #[error("the frame stream failed earlier and cannot be resynchronised: drop the connection")]
    Poisoned,
}

/// Strings from the wire that go into an error message are cut to this many characters.
const ECHO_MAX_CHARS: usize = 48;

/// Cuts a string taken from the wire to a loggable length, marking the cut.
pub(crate) fn echo(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(ECHO_MAX_CHARS).collect();
    if chars.next().is_some() { format!("{head}…") } else { head }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_cuts_long_strings_and_keeps_short_ones() {
        assert_eq!(echo("activationz"), "activationz");
        let long = "x".repeat(10_000);
        let cut = echo(&long);
        assert_eq!(cut.chars().count(), ECHO_MAX_CHARS + 1);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn messages_name_what_to_fix() {
        let e = FrameError::FrameTooLarge { len: 20, max: 10 };
        assert!(e.to_string().contains("activation chunks"), "{e}");
        let e = FrameError::UnsupportedVersion { got: 2, supported: 1 };
        assert_eq!(e.to_string(), "unsupported protocol version 2: this peer speaks version 1");
    }
}
