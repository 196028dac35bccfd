//! ComputePool's data plane: how activations and tokens travel between shards.
//!
//! It owns the wire format (frames), shard plans and the transport. It never interprets an activation's
//! values and never touches payment state.
//!
//! - [`frame`]: the versioned frame codec (docs/PROTOCOL.md is its spec), chunking of long prompts,
//!   sequence checks.
//! - [`plan`]: which worker runs which contiguous layer range, sized by memory and speed.
//! - [`bridge`]: frames over the Gensyn AXL daemon's HTTP API, with per-request order checks and a
//!   stand-in daemon for tests.
//! - [`transport`]: encrypted QUIC links between peers named by ed25519 keys (iroh), the topology
//!   that says who talks to whom, and frames over a stream with backpressure.
//!
//! This crate does not depend on the engine: the orchestrator uses plans and must never be able to
//! name an activation tensor, so payloads here are bytes with a dtype and a shape.

pub mod bridge;
pub mod frame;
pub mod plan;
pub mod transport;

pub use frame::{ChunkError, Frame, FrameDecoder, FrameError, FrameHeader, FrameLimits, SequenceError};
pub use plan::{ModelFootprint, PlanError, ShardAssignment, ShardPlan, WorkerCapacity};

/// Any error of this crate, for callers that handle them in one place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Bad bytes on a connection.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Dropped or reordered frames of one request.
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    /// Activation chunks of one request that do not line up.
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    /// A shard plan that cannot be made.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// How far an error reaches, i.e. what the receiver of a bad frame tears down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorScope {
    /// The connection: its byte stream cannot be trusted any more. Drop it and fail every request
    /// that was using it; the process keeps serving.
    Connection,
    /// One request: send an `error` frame for it, free its KV cache, keep the connection.
    Request,
    /// Neither: a configuration problem found before anything was sent.
    Setup,
}

impl Error {
    /// What to tear down because of this error.
    pub fn scope(&self) -> ErrorScope {
        match self {
            Error::Frame(_) => ErrorScope::Connection,
            Error::Sequence(_) => ErrorScope::Request,
            // A chunk that cannot be split (sending side) wraps a FrameError only when the limits are
            // unusable, which is a setup problem; everything else is about one request's chunks.
            Error::Chunk(ChunkError::Frame(_) | ChunkError::RowTooLarge { .. }) => ErrorScope::Setup,
            Error::Chunk(_) => ErrorScope::Request,
            Error::Plan(_) => ErrorScope::Setup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_what_to_tear_down() {
        assert_eq!(Error::from(FrameError::Poisoned).scope(), ErrorScope::Connection);
        let dropped = SequenceError::Dropped { expected: 1, got: 3 };
        assert_eq!(Error::from(dropped).scope(), ErrorScope::Request);
        let moved = ChunkError::PositionMismatch { expected: 4, got: 5 };
        assert_eq!(Error::from(moved).scope(), ErrorScope::Request);
        let row = ChunkError::RowTooLarge { row_bytes: 10, max_frame_len: 5 };
        assert_eq!(Error::from(row).scope(), ErrorScope::Setup);
        assert_eq!(Error::from(PlanError::NoWorkers).scope(), ErrorScope::Setup);
    }
}
