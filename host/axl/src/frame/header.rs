//! The frame header: its typed form, its JSON form on the wire, and the checks between the two.
//!
//! The typed form ([`FrameHeader`]) can only describe a well-formed frame of the current protocol
//! version; the JSON form (`WireHeaderIn` / `WireHeaderOut`) is private and exists to be strict about
//! what a peer sends: unknown fields, duplicate fields, `null`s and fields of another kind are all
//! rejected, never ignored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use super::error::{FrameError, echo};

/// The protocol version this crate speaks, the header's `v`. See docs/PROTOCOL.md for the versioning
/// policy: any change to the wire format, added fields included, is a new version.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request id, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// Most token ids one token frame may carry.
pub const MAX_TOKENS_PER_FRAME: usize = 4096;

/// Longest `message` of an error control frame, in bytes (UTF-8).
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;

/// The element type of an activations payload. Values travel little-endian exactly as the sender
/// holds them (bf16 is not widened), so a sharded run sees the bytes an unsharded one would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE-754 binary32, 4 bytes per value.
    F32,
    /// bfloat16, 2 bytes per value.
    Bf16,
}

impl DType {
    /// Bytes per value.
    pub const fn size_in_bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    /// The name on the wire: `f32` or `bf16`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = FrameError;

    /// Accepts exactly the wire names (`f32`, `bf16`); the wire is case-sensitive.
    fn from_str(s: &str) -> Result<Self, FrameError> {
        match s {
            "f32" => Ok(DType::F32),
            "bf16" => Ok(DType::Bf16),
            other => Err(FrameError::UnknownDType { dtype: echo(other) }),
        }
    }
}

/// Identifies one generation request across every shard of a pipeline; each shard keys its KV cache
/// by it.
///
/// A string of 1 to [`MAX_REQUEST_ID_LEN`] bytes drawn from `A-Z a-z 0-9 . _ : -`: long enough for a
/// UUID or an OpenAI-style `chatcmpl-…` id, safe to log and to use as a map key, and never confusable
/// with another id through Unicode tricks. A string rather than a number so that several entry points
/// can mint ids without coordinating.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(String);

impl RequestId {
    /// Checks and wraps an id.
    pub fn new(id: impl Into<String>) -> Result<Self, FrameError> {
        let id = id.into();
        let reason = if id.is_empty() {
            Some("empty".to_string())
        } else if id.len() > MAX_REQUEST_ID_LEN {
            Some(format!("{} bytes, the limit is {MAX_REQUEST_ID_LEN}", id.len()))
        } else {
            id.chars()
                .find(|c| !is_request_id_char(*c))
                .map(|c| format!("character {c:?} is not one of A-Z a-z 0-9 . _ : -"))
        };
        match reason {
            Some(reason) => Err(FrameError::InvalidField { field: "request", reason }),
            None => Ok(RequestId(id)),
        }
    }

    /// The id as sent on the wire.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_request_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RequestId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for RequestId {
    type Err = FrameError;

    fn from_str(s: &str) -> Result<Self, FrameError> {
        RequestId::new(s)
    }
}

impl TryFrom<String> for RequestId {
    type Error = FrameError;

    fn try_from(s: String) -> Result<Self, FrameError> {
        RequestId::new(s)
    }
}

/// The kinds of frame, the header's `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Hidden states flowing down the pipeline.
    Activations,
    /// Sampled token ids flowing from the exit shard back to the entry.
    Token,
    /// Request and shard lifecycle: `end`, `unload`, `error`.
    Control,
    /// A split output head's parts flowing from the exit shard back to the entry: the normed state of a
    /// step's last position, then the logits of the exit's vocabulary rows.
    Head,
}

impl FrameKind {
    /// The name on the wire.
    pub const fn name(self) -> &'static str {
        match self {
            FrameKind::Activations => "activations",
            FrameKind::Token => "token",
            FrameKind::Control => "control",
            FrameKind::Head => "head",
        }
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The header of an activations frame: `rows` hidden-state vectors of width `hidden`, row-major, for
/// the consecutive positions `start_pos .. start_pos + rows` of one request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActivationsHeader {
    /// The request these rows belong to.
    pub request: RequestId,
    /// Sequence number on this link for this request (see [`SequenceTracker`](super::SequenceTracker)).
    pub seq: u64,
    /// Element type of the payload.
    pub dtype: DType,
    /// Number of positions (tokens) in this frame, at least 1.
    pub rows: u64,
    /// Hidden size of the model, at least 1.
    pub hidden: u64,
    /// Absolute position of the first row in the request's sequence. The receiver checks it against
    /// its KV cache length for the request, so a lost or repeated chunk is caught, not computed on.
    pub start_pos: u64,
    /// True on the last (or only) chunk of a step: after it the exit shard samples a token. A long
    /// prompt split in chunks has it only on its final chunk.
    pub last_chunk: bool,
}

impl ActivationsHeader {
    /// Bytes in one row (`hidden × dtype size`), `None` on overflow.
    pub fn row_bytes(&self) -> Option<u64> {
        self.hidden.checked_mul(self.dtype.size_in_bytes())
    }

    /// The payload length the shape implies, `rows × hidden × dtype size`, overflow-checked.
    pub fn payload_len(&self) -> Result<u64, FrameError> {
        self.row_bytes().and_then(|r| r.checked_mul(self.rows)).ok_or(FrameError::ShapeOverflow {
            rows: self.rows,
            hidden: self.hidden,
            dtype: self.dtype,
        })
    }

    /// The position just past this frame's rows, `start_pos + rows`, `None` on overflow.
    pub fn end_pos(&self) -> Option<u64> {
        self.start_pos.checked_add(self.rows)
    }
}

/// What a head frame carries (docs/PROTOCOL.md §3, `head`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeadPart {
    /// The state of the step's last position after the final norm, `width` = the hidden size: the entry
    /// computes the logits of its vocabulary rows from it.
    Normed,
    /// The logits of vocabulary rows `vocab_start .. vocab_start + width`, computed by the exit from
    /// the same state; with the entry's rows they make the whole vocabulary, and the entry samples.
    Logits {
        /// The first vocabulary row.
        vocab_start: u64,
    },
    /// For a request whose token is the largest logit (greedy, no penalty): only the largest of the
    /// exit's logits (`width` 1), at vocabulary row `vocab_start`, the lowest such row (NaN never
    /// counts; -∞ when none of the exit's logits is above it).
    Max {
        /// The row holding the value.
        vocab_start: u64,
    },
}

impl HeadPart {
    /// The name on the wire, the header's `part`.
    pub const fn name(self) -> &'static str {
        match self {
            HeadPart::Normed => "normed",
            HeadPart::Logits { .. } => "logits",
            HeadPart::Max { .. } => "max",
        }
    }
}

/// The header of a head frame: `width` f32 values (little-endian) for position `pos` of a request, the
/// last position of a step the exit has just run. Sent only by an exit whose output head is split with
/// the entry, to that entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HeadHeader {
    /// The request the values belong to.
    pub request: RequestId,
    /// Sequence number on this link for this request (numbered with the request's token frames).
    pub seq: u64,
    /// Normed state or logits.
    pub part: HeadPart,
    /// The position the values are for (the entry checks it against its own cache).
    pub pos: u64,
    /// Values in the payload, at least 1.
    pub width: u64,
}

impl HeadHeader {
    /// The payload length the header implies, `width × 4`, overflow-checked.
    pub fn payload_len(&self) -> Result<u64, FrameError> {
        self.width.checked_mul(4).ok_or(FrameError::ShapeOverflow { rows: 1, hidden: self.width, dtype: DType::F32 })
    }
}

/// Why generation stopped, carried on the last token frame of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An end-of-sequence or stop token was sampled.
    Stop,
    /// The token budget (`max_tokens`) or the context window ran out.
    Length,
}

impl FinishReason {
    /// The name on the wire (OpenAI's `finish_reason` values).
    pub const fn name(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl FromStr for FinishReason {
    type Err = FrameError;

    fn from_str(s: &str) -> Result<Self, FrameError> {
        match s {
            "stop" => Ok(FinishReason::Stop),
            "length" => Ok(FinishReason::Length),
            other => Err(FrameError::InvalidField {
                field: "finish",
                reason: format!("{:?} is neither \"stop\" nor \"length\"", echo(other)),
            }),
        }
    }
}

/// The header of a token frame: token ids sampled by the exit shard, in order, sent to the entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenHeader {
    /// The request these tokens belong to.
    pub request: RequestId,
    /// Sequence number on this link for this request.
    pub seq: u64,
    /// Sampled token ids, at most [`MAX_TOKENS_PER_FRAME`]; empty only when `finish` is set.
    pub tokens: Vec<u32>,
    /// Set on the request's last token frame.
    pub finish: Option<FinishReason>,
}

/// What an `error` control frame reports, so the entry can answer the client with the right status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request itself is at fault (e.g. it outgrew the context window); retrying will not help.
    InvalidRequest,
    /// Frames of the request were dropped or reordered on the way; the request was failed rather
    /// than computed on wrong inputs. A retry may succeed.
    Sequence,
    /// The shard cannot serve now (unloading, out of memory, a downstream peer gone). Retry later.
    Unavailable,
    /// Anything else that went wrong inside the shard.
    Internal,
}

impl ErrorCode {
    /// The name on the wire.
    pub const fn name(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Sequence => "sequence",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ErrorCode {
    type Err = FrameError;

    fn from_str(s: &str) -> Result<Self, FrameError> {
        match s {
            "invalid_request" => Ok(ErrorCode::InvalidRequest),
            "sequence" => Ok(ErrorCode::Sequence),
            "unavailable" => Ok(ErrorCode::Unavailable),
            "internal" => Ok(ErrorCode::Internal),
            other => Err(FrameError::InvalidField {
                field: "code",
                reason: format!("{:?} is not one of invalid_request, sequence, unavailable, internal", echo(other)),
            }),
        }
    }
}

/// How the exit shard samples a request's tokens, carried by its `start` frame.
///
/// The fields mean what they mean in the engine's native sampler (`temperature` 0 is greedy, `top_k` 0
/// keeps every token, `top_p` 1 keeps the whole distribution, `seed` starts the request's random
/// stream), so a sharded run samples exactly the tokens an unsharded one does. `sampler` names a sampler
/// plugin loaded on the exit shard; absent, the exit samples natively. The optional fields were added
/// after the first four: a header without them means what it always meant (each is "off" when absent).
/// The values are checked for range here; whether a sampler can honour them is the exit shard's business.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingHeader {
    /// Softmax temperature, finite and ≥ 0; 0 is greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: u32,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f32,
    /// Seed of the request's random stream.
    pub seed: u64,
    /// Minimum probability relative to the most likely token, in [0, 1]. Absent: 0 (off).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub min_p: Option<f32>,
    /// Multiplicative penalty on sampled tokens, finite and > 0. Absent: 1 (off).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub repetition_penalty: Option<f32>,
    /// Subtracted once from the logit of each sampled token, finite. Absent: 0 (off).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub presence_penalty: Option<f32>,
    /// Subtracted per occurrence from the logit of each sampled token, finite. Absent: 0 (off).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub frequency_penalty: Option<f32>,
    /// Id of the sampler plugin the exit runs (1-64 of `a-z 0-9 - _ .`). Absent: native sampling.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub sampler: Option<String>,
}

impl Default for SamplingHeader {
    /// Greedy, native, seed 0.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_p: None,
            repetition_penalty: None,
            presence_penalty: None,
            frequency_penalty: None,
            sampler: None,
        }
    }
}

/// Longest sampler id, in bytes (the plugin manifests' limit).
pub const MAX_SAMPLER_ID_LEN: usize = 64;

/// Whether `id` can name a sampler plugin: 1-64 of lowercase letters, digits, `-`, `_`, `.`.
pub fn is_valid_sampler_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SAMPLER_ID_LEN
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

impl SamplingHeader {
    fn validate(&self) -> Result<(), FrameError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(invalid("sampling", format!("temperature {} is not a finite number >= 0", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(invalid("sampling", format!("top_p {} is not in (0, 1]", self.top_p)));
        }
        if let Some(min_p) = self.min_p
            && !(0.0..=1.0).contains(&min_p)
        {
            return Err(invalid("sampling", format!("min_p {min_p} is not in [0, 1]")));
        }
        if let Some(r) = self.repetition_penalty
            && !(r.is_finite() && r > 0.0)
        {
            return Err(invalid("sampling", format!("repetition_penalty {r} is not a finite number > 0")));
        }
        for (name, value) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if let Some(v) = value
                && !v.is_finite()
            {
                return Err(invalid("sampling", format!("{name} {v} is not finite")));
            }
        }
        if let Some(id) = &self.sampler
            && !is_valid_sampler_id(id)
        {
            return Err(invalid(
                "sampling",
                format!("sampler {:?} is not 1-{MAX_SAMPLER_ID_LEN} of a-z, 0-9, '-', '_', '.'", echo(id)),
            ));
        }
        Ok(())
    }
}

// Hash by bit pattern so headers can be keys; NaN never gets past `validate`.
impl Eq for SamplingHeader {}
impl std::hash::Hash for SamplingHeader {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.temperature.to_bits().hash(state);
        self.top_k.hash(state);
        self.top_p.to_bits().hash(state);
        self.seed.hash(state);
        for v in [self.min_p, self.repetition_penalty, self.presence_penalty, self.frequency_penalty] {
            v.map(f32::to_bits).hash(state);
        }
        self.sampler.hash(state);
    }
}

/// Most shards a route may name after the receiver of a `start` frame.
pub const MAX_ROUTE_LEN: usize = 256;

/// Where a request goes after the receiver of its `start` frame (docs/PROTOCOL.md §3): the peer ids of
/// the shards after the receiver, in layer order, and the entry shard that gets the request's tokens.
/// Peer ids are the workers' ed25519 public keys, 64 lowercase hex digits. Whether they belong to the
/// pool and their layer ranges chain is the receiving worker's business (it knows the topology): a
/// route that does not fails the request, never the link.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteHeader {
    /// The shards after the receiver, in order; empty when the receiver is the exit.
    pub next: Vec<String>,
    /// The entry shard: the exit sends the request's token frames to it.
    pub entry: String,
}

/// Whether `id` has the form of a peer id: 64 lowercase hex digits.
pub fn is_peer_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl RouteHeader {
    fn validate(&self) -> Result<(), FrameError> {
        if self.next.len() > MAX_ROUTE_LEN {
            return Err(invalid("route", format!("{} shards, the limit is {MAX_ROUTE_LEN}", self.next.len())));
        }
        for id in self.next.iter().chain(std::iter::once(&self.entry)) {
            if !is_peer_id(id) {
                return Err(invalid("route", format!("{:?} is not a peer id (64 lowercase hex digits)", echo(id))));
            }
        }
        Ok(())
    }
}

/// A control frame: the lifecycle of a request or of a shard. Control frames carry no payload.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ControlHeader {
    /// A new request: sent by the entry before the request's first activations and forwarded down the
    /// pipeline, so the exit shard knows how to sample it.
    Start {
        /// The new request.
        request: RequestId,
        /// Sequence number on this link for this request (always 0: it is the request's first frame).
        seq: u64,
        /// How to sample.
        sampling: SamplingHeader,
        /// The shards after the receiver and the entry. Absent: the receiver's default route, the
        /// first worker its topology lists for each following layer range and its first entry
        /// (what a one-ring topology always meant).
        route: Option<RouteHeader>,
        /// Tokens the request generated on another route before it moved here (a failover): the
        /// entry replays them, and the exit samples nothing until the replay is done, then skips this
        /// many draws of the request's random stream. Absent: 0.
        resumed: Option<u64>,
    },
    /// The request is over (finished, cancelled or failed): free its KV cache and forward the `end`
    /// down the pipeline so every shard frees it.
    End {
        /// The request to free.
        request: RequestId,
        /// Sequence number on this link for this request.
        seq: u64,
    },
    /// The request failed on a shard; `message` says why, for the client. Receivers free the
    /// request's state. Must not contain secrets: it may be shown to the client and logged.
    Error {
        /// The failed request.
        request: RequestId,
        /// Sequence number on this link for this request.
        seq: u64,
        /// The class of failure.
        code: ErrorCode,
        /// Human-readable reason, at most [`MAX_ERROR_MESSAGE_LEN`] bytes.
        message: String,
    },
    /// The shard is unloading its model: every request it holds is over. Not tied to a request, so it
    /// has no `request` and no `seq`.
    Unload,
}

/// A typed, validated frame header of the current protocol version. The payload length is not part
/// of it: it is the length of the payload the header travels with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FrameHeader {
    /// Hidden states.
    Activations(ActivationsHeader),
    /// Sampled tokens.
    Token(TokenHeader),
    /// Lifecycle.
    Control(ControlHeader),
    /// A split head's part.
    Head(HeadHeader),
}

impl FrameHeader {
    /// The header's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            FrameHeader::Activations(_) => FrameKind::Activations,
            FrameHeader::Token(_) => FrameKind::Token,
            FrameHeader::Control(_) => FrameKind::Control,
            FrameHeader::Head(_) => FrameKind::Head,
        }
    }

    /// The request the frame belongs to; `None` only for `unload`.
    pub fn request(&self) -> Option<&RequestId> {
        match self {
            FrameHeader::Activations(h) => Some(&h.request),
            FrameHeader::Token(h) => Some(&h.request),
            FrameHeader::Head(h) => Some(&h.request),
            FrameHeader::Control(ControlHeader::Start { request, .. })
            | FrameHeader::Control(ControlHeader::End { request, .. })
            | FrameHeader::Control(ControlHeader::Error { request, .. }) => Some(request),
            FrameHeader::Control(ControlHeader::Unload) => None,
        }
    }

    /// The frame's sequence number; `None` only for `unload`.
    pub fn seq(&self) -> Option<u64> {
        match self {
            FrameHeader::Activations(h) => Some(h.seq),
            FrameHeader::Token(h) => Some(h.seq),
            FrameHeader::Head(h) => Some(h.seq),
            FrameHeader::Control(ControlHeader::Start { seq, .. })
            | FrameHeader::Control(ControlHeader::End { seq, .. })
            | FrameHeader::Control(ControlHeader::Error { seq, .. }) => Some(*seq),
            FrameHeader::Control(ControlHeader::Unload) => None,
        }
    }

    /// The payload length this header implies: the shape's byte count for activations and head frames,
    /// 0 otherwise.
    pub fn expected_payload_len(&self) -> Result<u64, FrameError> {
        match self {
            FrameHeader::Activations(h) => h.payload_len(),
            FrameHeader::Head(h) => h.payload_len(),
            FrameHeader::Token(_) | FrameHeader::Control(_) => Ok(0),
        }
    }

    /// Checks every value rule of the protocol against a payload of `payload_len` bytes. Decoding runs
    /// it on what arrives and encoding on what is sent, so this crate never emits a frame it would
    /// itself reject.
    pub fn validate(&self, payload_len: u64) -> Result<(), FrameError> {
        match self {
            FrameHeader::Activations(h) => {
                if h.rows == 0 {
                    return Err(invalid("shape", "rows must be at least 1"));
                }
                if h.hidden == 0 {
                    return Err(invalid("shape", "hidden must be at least 1"));
                }
                if h.end_pos().is_none() {
                    return Err(invalid("start_pos", "start_pos + rows overflows 64 bits"));
                }
                let expected = h.payload_len()?;
                if expected != payload_len {
                    return Err(FrameError::ShapeMismatch {
                        rows: h.rows,
                        hidden: h.hidden,
                        dtype: h.dtype,
                        expected,
                        payload_len,
                    });
                }
            }
            FrameHeader::Head(h) => {
                if h.width == 0 {
                    return Err(invalid("width", "must be at least 1"));
                }
                if let HeadPart::Logits { vocab_start } | HeadPart::Max { vocab_start } = h.part
                    && vocab_start.checked_add(h.width).is_none()
                {
                    return Err(invalid("vocab_start", "vocab_start + width overflows 64 bits"));
                }
                if matches!(h.part, HeadPart::Max { .. }) && h.width != 1 {
                    return Err(invalid("width", format!("a max part carries 1 value, not {}", h.width)));
                }
                let expected = h.payload_len()?;
                if expected != payload_len {
                    return Err(FrameError::ShapeMismatch { rows: 1, hidden: h.width, dtype: DType::F32, expected, payload_len });
                }
            }
            FrameHeader::Token(h) => {
                if h.tokens.len() > MAX_TOKENS_PER_FRAME {
                    return Err(invalid(
                        "tokens",
                        format!("{} ids, the limit is {MAX_TOKENS_PER_FRAME}", h.tokens.len()),
                    ));
                }
                if h.tokens.is_empty() && h.finish.is_none() {
                    return Err(invalid("tokens", "empty, and no finish reason is given"));
                }
                no_payload(FrameKind::Token, payload_len)?;
            }
            FrameHeader::Control(c) => {
                if let ControlHeader::Start { sampling, route, .. } = c {
                    sampling.validate()?;
                    if let Some(route) = route {
                        route.validate()?;
                    }
                }
                if let ControlHeader::Error { message, .. } = c
                    && message.len() > MAX_ERROR_MESSAGE_LEN
                {
                    return Err(invalid(
                        "message",
                        format!("{} bytes, the limit is {MAX_ERROR_MESSAGE_LEN}", message.len()),
                    ));
                }
                no_payload(FrameKind::Control, payload_len)?;
            }
        }
        Ok(())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> FrameError {
    FrameError::InvalidField { field, reason: reason.into() }
}

fn no_payload(kind: FrameKind, payload_len: u64) -> Result<(), FrameError> {
    if payload_len == 0 { Ok(()) } else { Err(FrameError::UnexpectedPayload { kind, payload_len }) }
}

/// The header as it is written: field order here is the order on the wire.
#[derive(Serialize)]
pub(crate) struct WireHeaderOut<'a> {
    v: u32,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dtype: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    shape: Option<[u64; 2]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_pos: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_chunk: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tokens: Option<&'a [u32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sampling: Option<&'a SamplingHeader>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<&'a RouteHeader>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resumed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    part: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pos: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    width: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vocab_start: Option<u64>,
    payload_len: u64,
}

impl<'a> WireHeaderOut<'a> {
    pub(crate) fn new(header: &'a FrameHeader, payload_len: u64) -> Self {
        let mut w = WireHeaderOut {
            v: PROTOCOL_VERSION,
            kind: header.kind().name(),
            op: None,
            request: header.request().map(RequestId::as_str),
            seq: header.seq(),
            dtype: None,
            shape: None,
            start_pos: None,
            last_chunk: None,
            tokens: None,
            finish: None,
            code: None,
            message: None,
            sampling: None,
            route: None,
            resumed: None,
            part: None,
            pos: None,
            width: None,
            vocab_start: None,
            payload_len,
        };
        match header {
            FrameHeader::Activations(h) => {
                w.dtype = Some(h.dtype.name());
                w.shape = Some([h.rows, h.hidden]);
                w.start_pos = Some(h.start_pos);
                w.last_chunk = Some(h.last_chunk);
            }
            FrameHeader::Head(h) => {
                w.part = Some(h.part.name());
                w.pos = Some(h.pos);
                w.width = Some(h.width);
                if let HeadPart::Logits { vocab_start } | HeadPart::Max { vocab_start } = h.part {
                    w.vocab_start = Some(vocab_start);
                }
            }
            FrameHeader::Token(h) => {
                w.tokens = Some(&h.tokens);
                w.finish = h.finish.map(FinishReason::name);
            }
            FrameHeader::Control(ControlHeader::Start { sampling, route, resumed, .. }) => {
                w.op = Some("start");
                w.sampling = Some(sampling);
                w.route = route.as_ref();
                w.resumed = *resumed;
            }
            FrameHeader::Control(ControlHeader::End { .. }) => w.op = Some("end"),
            FrameHeader::Control(ControlHeader::Unload) => w.op = Some("unload"),
            FrameHeader::Control(ControlHeader::Error { code, message, .. }) => {
                w.op = Some("error");
                w.code = Some(code.name());
                w.message = Some(message);
            }
        }
        w
    }
}

/// First pass over a received header: only the version, every other field skipped (but still
/// syntax-checked). A newer peer's header may carry fields this version does not know, so the
/// version must be judged before the strict pass would reject those fields as unknown.
#[derive(Deserialize)]
struct VersionProbe {
    #[serde(default, deserialize_with = "present")]
    v: Option<u64>,
}

/// The header as it is read. Every optional field goes through [`present`], so `"seq": null` is a
/// type error rather than a silently absent field.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WireHeaderIn {
    #[allow(dead_code, reason = "checked by VersionProbe first; here so it is not an unknown field")]
    v: u64,
    kind: String,
    #[serde(default, deserialize_with = "present")]
    op: Option<String>,
    #[serde(default, deserialize_with = "present")]
    request: Option<String>,
    #[serde(default, deserialize_with = "present")]
    seq: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    dtype: Option<String>,
    #[serde(default, deserialize_with = "present")]
    shape: Option<Vec<u64>>,
    #[serde(default, deserialize_with = "present")]
    start_pos: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    last_chunk: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    tokens: Option<Vec<u32>>,
    #[serde(default, deserialize_with = "present")]
    finish: Option<String>,
    #[serde(default, deserialize_with = "present")]
    code: Option<String>,
    #[serde(default, deserialize_with = "present")]
    message: Option<String>,
    #[serde(default, deserialize_with = "present")]
    sampling: Option<SamplingHeader>,
    #[serde(default, deserialize_with = "present")]
    route: Option<RouteHeader>,
    #[serde(default, deserialize_with = "present")]
    resumed: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    part: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pos: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    width: Option<u64>,
    #[serde(default, deserialize_with = "present")]
    vocab_start: Option<u64>,
    pub(crate) payload_len: u64,
}

/// A field that is there must hold a value of its type; `null` is not a way of leaving it out.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn json_error(e: serde_json::Error) -> FrameError {
    FrameError::InvalidJson { reason: e.to_string() }
}

/// Parses header bytes: version first, then the strict schema. Value rules are left to
/// [`WireHeaderIn::into_header`] so the caller can check the frame size in between.
pub(crate) fn parse_wire(bytes: &[u8]) -> Result<WireHeaderIn, FrameError> {
    let probe: VersionProbe = serde_json::from_slice(bytes).map_err(json_error)?;
    match probe.v {
        None => return Err(FrameError::MissingField { kind: "a", field: "v" }),
        Some(v) if v != u64::from(PROTOCOL_VERSION) => {
            return Err(FrameError::UnsupportedVersion { got: v, supported: PROTOCOL_VERSION });
        }
        Some(_) => {}
    }
    serde_json::from_slice(bytes).map_err(json_error)
}

impl WireHeaderIn {
    /// Which optional fields are present, by wire name.
    fn optional_fields(&self) -> [(&'static str, bool); 18] {
        [
            ("op", self.op.is_some()),
            ("request", self.request.is_some()),
            ("seq", self.seq.is_some()),
            ("dtype", self.dtype.is_some()),
            ("shape", self.shape.is_some()),
            ("start_pos", self.start_pos.is_some()),
            ("last_chunk", self.last_chunk.is_some()),
            ("tokens", self.tokens.is_some()),
            ("finish", self.finish.is_some()),
            ("code", self.code.is_some()),
            ("message", self.message.is_some()),
            ("sampling", self.sampling.is_some()),
            ("route", self.route.is_some()),
            ("resumed", self.resumed.is_some()),
            ("part", self.part.is_some()),
            ("pos", self.pos.is_some()),
            ("width", self.width.is_some()),
            ("vocab_start", self.vocab_start.is_some()),
        ]
    }

    fn allow_only(&self, kind: &'static str, allowed: &[&str]) -> Result<(), FrameError> {
        match self.optional_fields().into_iter().find(|(name, there)| *there && !allowed.contains(name)) {
            Some((field, _)) => Err(FrameError::UnexpectedField { kind, field }),
            None => Ok(()),
        }
    }

    /// Turns the parsed JSON into a typed header and checks it against the declared payload length.
    pub(crate) fn into_header(self) -> Result<FrameHeader, FrameError> {
        let payload_len = self.payload_len;
        let header = match self.kind.as_str() {
            "activations" => {
                const KIND: &str = "activations";
                self.allow_only(KIND, &["request", "seq", "dtype", "shape", "start_pos", "last_chunk"])?;
                let shape = need(KIND, "shape", self.shape)?;
                let [rows, hidden] = <[u64; 2]>::try_from(shape).map_err(|shape| {
                    invalid("shape", format!("expected [rows, hidden], got {} dimensions", shape.len()))
                })?;
                FrameHeader::Activations(ActivationsHeader {
                    request: RequestId::new(need(KIND, "request", self.request)?)?,
                    seq: need(KIND, "seq", self.seq)?,
                    dtype: need(KIND, "dtype", self.dtype)?.parse()?,
                    rows,
                    hidden,
                    start_pos: need(KIND, "start_pos", self.start_pos)?,
                    last_chunk: need(KIND, "last_chunk", self.last_chunk)?,
                })
            }
            "token" => {
                const KIND: &str = "token";
                self.allow_only(KIND, &["request", "seq", "tokens", "finish"])?;
                FrameHeader::Token(TokenHeader {
                    request: RequestId::new(need(KIND, "request", self.request)?)?,
                    seq: need(KIND, "seq", self.seq)?,
                    tokens: need(KIND, "tokens", self.tokens)?,
                    finish: self.finish.as_deref().map(str::parse).transpose()?,
                })
            }
            "head" => {
                const KIND: &str = "head";
                let part = need(KIND, "part", self.part.clone())?;
                let part = match part.as_str() {
                    "normed" => {
                        self.allow_only(KIND, &["request", "seq", "part", "pos", "width"])?;
                        HeadPart::Normed
                    }
                    "logits" => {
                        self.allow_only(KIND, &["request", "seq", "part", "pos", "width", "vocab_start"])?;
                        HeadPart::Logits { vocab_start: need(KIND, "vocab_start", self.vocab_start)? }
                    }
                    "max" => {
                        self.allow_only(KIND, &["request", "seq", "part", "pos", "width", "vocab_start"])?;
                        HeadPart::Max { vocab_start: need(KIND, "vocab_start", self.vocab_start)? }
                    }
                    other => {
                        return Err(invalid("part", format!("{:?} is not one of \"normed\", \"logits\", \"max\"", echo(other))));
                    }
                };
                FrameHeader::Head(HeadHeader {
                    request: RequestId::new(need(KIND, "request", self.request)?)?,
                    seq: need(KIND, "seq", self.seq)?,
                    part,
                    pos: need(KIND, "pos", self.pos)?,
                    width: need(KIND, "width", self.width)?,
                })
            }
            "control" => {
                let op = need("control", "op", self.op.clone())?;
                match op.as_str() {
                    "start" => {
                        const KIND: &str = "control start";
                        self.allow_only(KIND, &["op", "request", "seq", "sampling", "route", "resumed"])?;
                        FrameHeader::Control(ControlHeader::Start {
                            request: RequestId::new(need(KIND, "request", self.request)?)?,
                            seq: need(KIND, "seq", self.seq)?,
                            sampling: need(KIND, "sampling", self.sampling)?,
                            route: self.route,
                            resumed: self.resumed,
                        })
                    }
                    "end" => {
                        const KIND: &str = "control end";
                        self.allow_only(KIND, &["op", "request", "seq"])?;
                        FrameHeader::Control(ControlHeader::End {
                            request: RequestId::new(need(KIND, "request", self.request)?)?,
                            seq: need(KIND, "seq", self.seq)?,
                        })
                    }
                    "error" => {
                        const KIND: &str = "control error";
                        self.allow_only(KIND, &["op", "request", "seq", "code", "message"])?;
                        FrameHeader::Control(ControlHeader::Error {
                            request: RequestId::new(need(KIND, "request", self.request)?)?,
                            seq: need(KIND, "seq", self.seq)?,
                            code: need(KIND, "code", self.code)?.parse()?,
                            message: need(KIND, "message", self.message)?,
                        })
                    }
                    "unload" => {
                        self.allow_only("control unload", &["op"])?;
                        FrameHeader::Control(ControlHeader::Unload)
                    }
                    other => return Err(FrameError::UnknownControlOp { op: echo(other) }),
                }
            }
            other => return Err(FrameError::UnknownKind { kind: echo(other) }),
        };
        header.validate(payload_len)?;
        Ok(header)
    }
}

fn need<T>(kind: &'static str, field: &'static str, value: Option<T>) -> Result<T, FrameError> {
    value.ok_or(FrameError::MissingField { kind, field })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rid(s: &str) -> RequestId {
        RequestId::new(s).expect("test id is valid")
    }

    fn parse(json: &str) -> Result<FrameHeader, FrameError> {
        parse_wire(json.as_bytes())?.into_header()
    }

    #[test]
    fn a_start_frame_may_carry_a_route_and_a_resume_count() {
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        let json = format!(
            r#"{{"v":1,"kind":"control","op":"start","request":"r","seq":0,"sampling":{{"temperature":0,"top_k":0,"top_p":1,"seed":0}},"route":{{"next":["{a}"],"entry":"{b}"}},"resumed":3,"payload_len":0}}"#
        );
        let Ok(FrameHeader::Control(ControlHeader::Start { route: Some(route), resumed: Some(3), .. })) = parse(&json) else {
            panic!("{:?}", parse(&json))
        };
        assert_eq!((route.next, route.entry), (vec![a.clone()], b.clone()));
        // Without them: the default route, nothing resumed (the header an older entry sends).
        let plain = r#"{"v":1,"kind":"control","op":"start","request":"r","seq":0,"sampling":{"temperature":0,"top_k":0,"top_p":1,"seed":0},"payload_len":0}"#;
        assert!(matches!(parse(plain), Ok(FrameHeader::Control(ControlHeader::Start { route: None, resumed: None, .. }))));
        let upper = a.to_uppercase();
        for (bad, field) in [
            (format!(r#""route":{{"next":["{a}"],"entry":"xyz"}}"#), "route"),
            (format!(r#""route":{{"next":["{upper}"],"entry":"{b}"}}"#), "route"),
            (format!(r#""route":{{"next":[],"entry":"{b}","extra":1}}"#), "json"),
            (format!(r#""route":{{"next":["{a}"]}}"#), "json"),
            (r#""route":null"#.to_string(), "json"),
            (r#""resumed":-1"#.to_string(), "json"),
        ] {
            let json = format!(
                r#"{{"v":1,"kind":"control","op":"start","request":"r","seq":0,"sampling":{{"temperature":0,"top_k":0,"top_p":1,"seed":0}},{bad},"payload_len":0}}"#
            );
            let e = parse(&json).expect_err(&bad);
            match field {
                "route" => assert!(matches!(e, FrameError::InvalidField { field: "route", .. }), "{bad}: {e:?}"),
                _ => assert!(matches!(e, FrameError::InvalidJson { .. }), "{bad}: {e:?}"),
            }
        }
        let long = format!(
            r#"{{"v":1,"kind":"control","op":"start","request":"r","seq":0,"sampling":{{"temperature":0,"top_k":0,"top_p":1,"seed":0}},"route":{{"next":[{}],"entry":"{b}"}},"payload_len":0}}"#,
            vec![format!("\"{a}\""); MAX_ROUTE_LEN + 1].join(",")
        );
        assert!(matches!(parse(&long), Err(FrameError::InvalidField { field: "route", .. })));
        // Only start frames carry them.
        let end = format!(r#"{{"v":1,"kind":"control","op":"end","request":"r","seq":1,"route":{{"next":[],"entry":"{b}"}},"payload_len":0}}"#);
        assert!(matches!(parse(&end), Err(FrameError::UnexpectedField { field: "route", .. })));
    }

    #[test]
    fn request_ids_are_checked() {
        assert!(RequestId::new("chatcmpl-7f3a.b_c:d").is_ok());
        assert!(RequestId::new("550e8400-e29b-41d4-a716-446655440000").is_ok());
        assert!(RequestId::new("x".repeat(MAX_REQUEST_ID_LEN)).is_ok());
        for bad in [String::new(), "x".repeat(MAX_REQUEST_ID_LEN + 1), "a b".into(), "é".into(), "a/b".into()] {
            assert!(
                matches!(RequestId::new(bad.clone()), Err(FrameError::InvalidField { field: "request", .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn parses_a_valid_activations_header() {
        let h = parse(
            r#"{"v":1,"kind":"activations","request":"r1","seq":3,"dtype":"bf16","shape":[2,4],
               "start_pos":10,"last_chunk":true,"payload_len":16}"#,
        )
        .expect("valid");
        assert_eq!(
            h,
            FrameHeader::Activations(ActivationsHeader {
                request: rid("r1"),
                seq: 3,
                dtype: DType::Bf16,
                rows: 2,
                hidden: 4,
                start_pos: 10,
                last_chunk: true,
            })
        );
    }

    #[test]
    fn version_is_judged_before_the_schema() {
        // A v2 header with a field v1 does not know is a version error, not an unknown field.
        let e = parse(r#"{"v":2,"kind":"activations","brand_new":1,"payload_len":0}"#).unwrap_err();
        assert_eq!(e, FrameError::UnsupportedVersion { got: 2, supported: 1 });
        let e = parse(r#"{"kind":"token","payload_len":0}"#).unwrap_err();
        assert_eq!(e, FrameError::MissingField { kind: "a", field: "v" });
        assert!(matches!(parse(r#"{"v":"1","kind":"token"}"#), Err(FrameError::InvalidJson { .. })));
        assert!(matches!(parse(r#"{"v":-1,"kind":"token"}"#), Err(FrameError::InvalidJson { .. })));
    }

    #[test]
    fn schema_is_strict() {
        let cases = [
            // unknown field
            r#"{"v":1,"kind":"control","op":"unload","payload_len":0,"extra":true}"#,
            // duplicate field
            r#"{"v":1,"kind":"control","op":"unload","op":"end","payload_len":0}"#,
            // null instead of leaving the field out
            r#"{"v":1,"kind":"control","op":"unload","request":null,"payload_len":0}"#,
            // wrong type
            r#"{"v":1,"kind":"control","op":"unload","payload_len":"0"}"#,
            // missing payload_len
            r#"{"v":1,"kind":"control","op":"unload"}"#,
            // not an object
            r#"[1,2,3]"#,
            // trailing garbage
            r#"{"v":1,"kind":"control","op":"unload","payload_len":0} x"#,
            // token id out of u32
            r#"{"v":1,"kind":"token","request":"r","seq":0,"tokens":[4294967296],"payload_len":0}"#,
        ];
        for json in cases {
            assert!(matches!(parse(json), Err(FrameError::InvalidJson { .. })), "{json} -> {:?}", parse(json));
        }
    }

    #[test]
    fn unknown_names_are_typed_errors() {
        assert_eq!(
            parse(r#"{"v":1,"kind":"gradients","payload_len":0}"#).unwrap_err(),
            FrameError::UnknownKind { kind: "gradients".into() }
        );
        assert_eq!(
            parse(r#"{"v":1,"kind":"control","op":"reboot","payload_len":0}"#).unwrap_err(),
            FrameError::UnknownControlOp { op: "reboot".into() }
        );
        assert_eq!(
            parse(
                r#"{"v":1,"kind":"activations","request":"r","seq":0,"dtype":"f16","shape":[1,1],
                   "start_pos":0,"last_chunk":true,"payload_len":2}"#
            )
            .unwrap_err(),
            FrameError::UnknownDType { dtype: "f16".into() }
        );
    }

    #[test]
    fn fields_belong_to_their_kind() {
        assert_eq!(
            parse(r#"{"v":1,"kind":"token","request":"r","seq":0,"tokens":[1],"shape":[1,1],"payload_len":0}"#)
                .unwrap_err(),
            FrameError::UnexpectedField { kind: "token", field: "shape" }
        );
        assert_eq!(
            parse(r#"{"v":1,"kind":"control","op":"unload","request":"r","payload_len":0}"#).unwrap_err(),
            FrameError::UnexpectedField { kind: "control unload", field: "request" }
        );
        assert_eq!(
            parse(r#"{"v":1,"kind":"control","op":"end","request":"r","payload_len":0}"#).unwrap_err(),
            FrameError::MissingField { kind: "control end", field: "seq" }
        );
        assert_eq!(
            parse(
                r#"{"v":1,"kind":"activations","request":"r","seq":0,"dtype":"f32","shape":[1,1],
                   "start_pos":0,"payload_len":4}"#
            )
            .unwrap_err(),
            FrameError::MissingField { kind: "activations", field: "last_chunk" }
        );
    }

    #[test]
    fn shape_must_match_the_payload() {
        let base = |shape: &str, len: u64| {
            format!(
                r#"{{"v":1,"kind":"activations","request":"r","seq":0,"dtype":"f32","shape":{shape},
                    "start_pos":0,"last_chunk":true,"payload_len":{len}}}"#
            )
        };
        assert!(parse(&base("[2,3]", 24)).is_ok());
        assert_eq!(
            parse(&base("[2,3]", 20)).unwrap_err(),
            FrameError::ShapeMismatch { rows: 2, hidden: 3, dtype: DType::F32, expected: 24, payload_len: 20 }
        );
        let huge = u64::MAX / 2;
        assert_eq!(
            parse(&base(&format!("[{huge},{huge}]"), 8)).unwrap_err(),
            FrameError::ShapeOverflow { rows: huge, hidden: huge, dtype: DType::F32 }
        );
        assert!(matches!(parse(&base("[0,3]", 0)), Err(FrameError::InvalidField { field: "shape", .. })));
        assert!(matches!(parse(&base("[3,0]", 0)), Err(FrameError::InvalidField { field: "shape", .. })));
        assert!(matches!(parse(&base("[1,2,3]", 24)), Err(FrameError::InvalidField { field: "shape", .. })));
        assert!(matches!(parse(&base("[6]", 24)), Err(FrameError::InvalidField { field: "shape", .. })));
    }

    #[test]
    fn positions_may_not_overflow() {
        let json = format!(
            r#"{{"v":1,"kind":"activations","request":"r","seq":0,"dtype":"f32","shape":[2,1],
                "start_pos":{},"last_chunk":true,"payload_len":8}}"#,
            u64::MAX
        );
        assert!(matches!(parse(&json), Err(FrameError::InvalidField { field: "start_pos", .. })));
    }

    #[test]
    fn token_and_control_frames_carry_no_payload() {
        assert_eq!(
            parse(r#"{"v":1,"kind":"token","request":"r","seq":0,"tokens":[1],"payload_len":4}"#).unwrap_err(),
            FrameError::UnexpectedPayload { kind: FrameKind::Token, payload_len: 4 }
        );
        assert_eq!(
            parse(r#"{"v":1,"kind":"control","op":"unload","payload_len":1}"#).unwrap_err(),
            FrameError::UnexpectedPayload { kind: FrameKind::Control, payload_len: 1 }
        );
    }

    #[test]
    fn token_frames_are_bounded_and_meaningful() {
        assert!(matches!(
            parse(r#"{"v":1,"kind":"token","request":"r","seq":0,"tokens":[],"payload_len":0}"#),
            Err(FrameError::InvalidField { field: "tokens", .. })
        ));
        let h = parse(r#"{"v":1,"kind":"token","request":"r","seq":0,"tokens":[],"finish":"stop","payload_len":0}"#)
            .expect("a bare finish is valid");
        assert_eq!(
            h,
            FrameHeader::Token(TokenHeader {
                request: rid("r"),
                seq: 0,
                tokens: vec![],
                finish: Some(FinishReason::Stop)
            })
        );
        assert!(matches!(
            parse(r#"{"v":1,"kind":"token","request":"r","seq":0,"tokens":[1],"finish":"eos","payload_len":0}"#),
            Err(FrameError::InvalidField { field: "finish", .. })
        ));
        let too_many = serde_json::to_string(&vec![7u32; MAX_TOKENS_PER_FRAME + 1]).expect("serialises");
        let json = format!(r#"{{"v":1,"kind":"token","request":"r","seq":0,"tokens":{too_many},"payload_len":0}}"#);
        assert!(matches!(parse(&json), Err(FrameError::InvalidField { field: "tokens", .. })));
    }

    #[test]
    fn error_frames_are_bounded() {
        let ok = parse(
            r#"{"v":1,"kind":"control","op":"error","request":"r","seq":4,"code":"sequence",
               "message":"frame 3 was dropped","payload_len":0}"#,
        )
        .expect("valid");
        assert_eq!(
            ok,
            FrameHeader::Control(ControlHeader::Error {
                request: rid("r"),
                seq: 4,
                code: ErrorCode::Sequence,
                message: "frame 3 was dropped".into()
            })
        );
        let long = "m".repeat(MAX_ERROR_MESSAGE_LEN + 1);
        let json = format!(
            r#"{{"v":1,"kind":"control","op":"error","request":"r","seq":0,"code":"internal","message":"{long}","payload_len":0}}"#
        );
        assert!(matches!(parse(&json), Err(FrameError::InvalidField { field: "message", .. })));
        assert!(matches!(
            parse(
                r#"{"v":1,"kind":"control","op":"error","request":"r","seq":0,"code":"oops","message":"","payload_len":0}"#
            ),
            Err(FrameError::InvalidField { field: "code", .. })
        ));
    }

    #[test]
    fn deeply_nested_json_is_rejected_without_overflowing_the_stack() {
        for open in ["[", "{\"a\":"] {
            let json =
                format!(r#"{{"v":1,"kind":"control","op":"unload","payload_len":0,"x":{}}}"#, open.repeat(30_000));
            assert!(matches!(parse(&json), Err(FrameError::InvalidJson { .. })));
        }
        let json = format!("{}1{}", "[".repeat(30_000), "]".repeat(30_000));
        assert!(matches!(parse(&json), Err(FrameError::InvalidJson { .. })));
    }

    #[test]
    fn start_frames_carry_checked_sampling() {
        let ok = parse(
            r#"{"v":1,"kind":"control","op":"start","request":"r","seq":0,"sampling":{"temperature":0.1,"top_k":0,"top_p":1.0,"seed":7},"payload_len":0}"#,
        );
        let Ok(FrameHeader::Control(ControlHeader::Start { sampling, .. })) = ok else { panic!("{ok:?}") };
        assert_eq!(sampling.temperature, 0.1f32);
        // A header of the first version (exactly the four fields) means native sampling, penalties off.
        assert_eq!(sampling, SamplingHeader { temperature: 0.1, seed: 7, ..SamplingHeader::default() });
        let full = r#"{"v":1,"kind":"control","op":"start","request":"r","seq":0,"sampling":{"temperature":0.7,"top_k":40,"top_p":0.9,"seed":1,"min_p":0.05,"repetition_penalty":1.1,"presence_penalty":0.5,"frequency_penalty":-0.5,"sampler":"top-p"},"payload_len":0}"#;
        let Ok(FrameHeader::Control(ControlHeader::Start { sampling, .. })) = parse(full) else { panic!() };
        assert_eq!(sampling.sampler.as_deref(), Some("top-p"));
        assert_eq!((sampling.min_p, sampling.frequency_penalty), (Some(0.05), Some(-0.5)));
        for bad in [
            r#"{"temperature":-1,"top_k":0,"top_p":1.0,"seed":7}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":0,"seed":7}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.5,"seed":7}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.0}"#,
            r#"{"temperature":0.5,"top_k":-1,"top_p":1.0,"seed":7}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.0,"seed":7,"min_p":1.5}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.0,"seed":7,"min_p":null}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.0,"seed":7,"repetition_penalty":0}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.0,"seed":7,"sampler":""}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.0,"seed":7,"sampler":"Top P"}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.0,"seed":7,"sampler":null}"#,
            r#"{"temperature":0.5,"top_k":0,"top_p":1.0,"seed":7,"mirostat":2}"#,
        ] {
            let json = format!(r#"{{"v":1,"kind":"control","op":"start","request":"r","seq":0,"sampling":{bad},"payload_len":0}}"#);
            assert!(parse(&json).is_err(), "{bad} was accepted");
        }
        assert_eq!(
            parse(r#"{"v":1,"kind":"control","op":"start","request":"r","seq":0,"payload_len":0}"#).unwrap_err(),
            FrameError::MissingField { kind: "control start", field: "sampling" }
        );
        assert!(matches!(
            parse(r#"{"v":1,"kind":"control","op":"end","request":"r","seq":0,"sampling":{"temperature":0,"top_k":0,"top_p":1,"seed":0},"payload_len":0}"#),
            Err(FrameError::UnexpectedField { field: "sampling", .. })
        ));
    }

    #[test]
    fn wire_out_round_trips_through_wire_in() {
        let headers = [
            FrameHeader::Token(TokenHeader {
                request: rid("a"),
                seq: 9,
                tokens: vec![1, 2, 3],
                finish: Some(FinishReason::Length),
            }),
            FrameHeader::Control(ControlHeader::End { request: rid("a"), seq: 10 }),
            FrameHeader::Control(ControlHeader::Unload),
            FrameHeader::Control(ControlHeader::Start {
                request: rid("a"),
                seq: 0,
                sampling: SamplingHeader { temperature: 0.7, top_k: 40, top_p: 0.95, seed: u64::MAX, sampler: Some("top-p".into()), min_p: Some(0.05), ..SamplingHeader::default() },
                route: None,
                resumed: None,
            }),
            FrameHeader::Control(ControlHeader::Start {
                request: rid("b"),
                seq: 0,
                sampling: SamplingHeader::default(),
                route: Some(RouteHeader { next: vec!["ab".repeat(32), "0".repeat(64)], entry: "f1".repeat(32) }),
                resumed: Some(17),
            }),
        ];
        for h in headers {
            let json = serde_json::to_vec(&WireHeaderOut::new(&h, 0)).expect("serialises");
            assert_eq!(parse_wire(&json).and_then(WireHeaderIn::into_header), Ok(h));
        }
    }
}
