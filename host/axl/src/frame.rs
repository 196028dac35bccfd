//! The wire format between shards: versioned, strict, length-prefixed frames.
//!
//! ```text
//! ┌──────────────────────┬──────────────────────────┬────────────────────────────┐
//! │ header_len: u32 (LE) │ header: header_len bytes │ payload: payload_len bytes │
//! │ 4 bytes              │ UTF-8 JSON object        │ raw tensor bytes           │
//! └──────────────────────┴──────────────────────────┴────────────────────────────┘
//! ```
//!
//! docs/PROTOCOL.md is the specification; this module is its reference implementation.
//!
//! - [`FrameHeader`]: the typed header and the JSON schema it is read from and written to.
//! - [`encode`] / [`Frame::decode`] / [`FrameDecoder`]: bytes ⇄ frames under [`FrameLimits`].
//! - [`split_activations`] / [`ActivationCursor`] / [`reassemble`]: long prompts as several chunks.
//! - [`SequenceTracker`] / [`SequenceCounter`]: dropped or reordered frames on a lossy link.
//!
//! Error policy: a [`FrameError`] means the byte stream cannot be trusted; drop the connection. A
//! [`SequenceError`] or [`ChunkError`] on received frames means one request cannot go on; fail it
//! with an `error` frame and keep the connection.

mod chunk;
mod codec;
mod error;
mod header;
mod sequence;

#[cfg(test)]
mod proptests;

pub use chunk::{
    ActivationChunk, ActivationChunks, ActivationCursor, ActivationsRef, ChunkError, ChunkProgress,
    ReassembledActivations, max_rows_per_frame, reassemble, split_activations,
};
pub use codec::{
    DEFAULT_MAX_FRAME_LEN, DEFAULT_MAX_HEADER_LEN, EncodedFrame, Frame, FrameDecoder, FrameLimits, LENGTH_PREFIX_LEN,
    encode, f32_values,
};
pub use error::FrameError;
pub use header::{
    ActivationsHeader, ControlHeader, DType, ErrorCode, FinishReason, FrameHeader, FrameKind, HeadHeader, HeadPart, MAX_ERROR_MESSAGE_LEN,
    MAX_REQUEST_ID_LEN, MAX_ROUTE_LEN, MAX_TOKENS_PER_FRAME, PROTOCOL_VERSION, RequestId, RouteHeader, SamplingHeader,
    TokenHeader, is_peer_id,
};
pub use sequence::{SequenceCounter, SequenceError, SequenceTracker};
