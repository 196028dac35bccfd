//! Long prompts as several activation frames: splitting `[rows, hidden]` under the frame limit on the
//! sending side, and checking that chunks line up on the receiving side.
//!
//! A chunk is an ordinary activations frame. Chunks of one step carry consecutive `seq` and
//! contiguous positions (`start_pos` of one = `start_pos + rows` of the previous); only the last has
//! `last_chunk: true`. A shard can run each chunk through its layers as it arrives (its KV cache
//! grows chunk by chunk), so nothing needs the whole prompt in one buffer; [`reassemble`] exists for
//! the receivers and tests that do.

use super::codec::{EncodedFrame, Frame, FrameLimits, LENGTH_PREFIX_LEN, encode};
use super::error::FrameError;
use super::header::{ActivationsHeader, DType, FrameHeader, FrameKind, RequestId, WireHeaderOut};
use super::sequence::{SequenceError, SequenceTracker};

/// Why activations could not be split into chunks, or why received chunks do not line up. On the
/// receiving side this fails the one request (send an `error` frame, free its cache); the
/// connection stays up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChunkError {
    /// There are no rows to send (or no frames to reassemble).
    #[error("no activations: at least one row is needed")]
    Empty,
    /// The hidden size is 0.
    #[error("hidden size must be at least 1")]
    ZeroHidden,
    /// The byte length is not a multiple of the row size.
    #[error("{len} bytes of activations are not a whole number of {row_bytes}-byte rows")]
    Ragged { len: u64, row_bytes: u64 },
    /// Not even one row fits in a frame under the limits.
    #[error(
        "one row of {row_bytes} bytes does not fit in a frame of at most {max_frame_len} bytes \
         (raise max_frame_len)"
    )]
    RowTooLarge { row_bytes: u64, max_frame_len: u64 },
    /// Positions or sequence numbers would pass `u64::MAX`.
    #[error("{what} would overflow 64 bits")]
    Overflow { what: &'static str },
    /// A chunk's `start_pos` is not where the receiver's KV cache for the request ends.
    #[error("activations for position {got} arrived, but the request's KV cache ends at position {expected}")]
    PositionMismatch { expected: u64, got: u64 },
    /// A chunk's dtype differs from the request's earlier chunks.
    #[error("dtype changed from {expected} to {got} within one request")]
    DTypeChanged { expected: DType, got: DType },
    /// A chunk's hidden size differs from the request's earlier chunks.
    #[error("hidden size changed from {expected} to {got} within one request")]
    HiddenChanged { expected: u64, got: u64 },
    /// A frame of another request turned up among the chunks being reassembled.
    #[error("a chunk of request {got} turned up among the chunks of request {expected}")]
    RequestMismatch { expected: RequestId, got: RequestId },
    /// A non-activations frame turned up among the chunks being reassembled.
    #[error("a {kind} frame turned up among activation chunks")]
    NotActivations { kind: FrameKind },
    /// The chunks' sequence numbers are not consecutive.
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    /// The chunks being reassembled end without one marked `last_chunk`.
    #[error("the chunks end before the one marked last_chunk")]
    Incomplete,
    /// A chunk follows the one marked `last_chunk` in a reassembly.
    #[error("a chunk follows the one marked last_chunk")]
    AfterLast,
    /// The limits cannot hold even the header.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Activations to send: `data.len() / (hidden × dtype size)` rows of one request, for positions
/// `start_pos ..`. `data` holds the values little-endian, row-major, as the engine holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationsRef<'a> {
    /// The request they belong to.
    pub request: &'a RequestId,
    /// Element type of `data`.
    pub dtype: DType,
    /// Hidden size (row width in values).
    pub hidden: u64,
    /// Absolute position of the first row.
    pub start_pos: u64,
    /// Raw bytes, `rows × hidden × dtype size` of them.
    pub data: &'a [u8],
}

/// The most rows of width `hidden` in `dtype` that one activations frame of `request` can carry under
/// `limits`, whatever its `seq` and `start_pos` (the bound assumes the longest possible header).
pub fn max_rows_per_frame(
    request: &RequestId,
    dtype: DType,
    hidden: u64,
    limits: &FrameLimits,
) -> Result<u64, ChunkError> {
    if hidden == 0 {
        return Err(ChunkError::ZeroHidden);
    }
    let row_bytes = hidden.checked_mul(dtype.size_in_bytes()).ok_or(ChunkError::Overflow { what: "row size" })?;
    let widest = FrameHeader::Activations(ActivationsHeader {
        request: request.clone(),
        seq: u64::MAX,
        dtype,
        rows: u64::MAX,
        hidden,
        start_pos: u64::MAX,
        last_chunk: false,
    });
    let header_len = serde_json::to_vec(&WireHeaderOut::new(&widest, u64::MAX))
        .map_err(|e| FrameError::InvalidJson { reason: e.to_string() })?
        .len() as u64;
    if header_len > u64::from(limits.max_header_len) {
        return Err(FrameError::HeaderTooLong { len: header_len, max: limits.max_header_len.into() }.into());
    }
    let budget = limits.max_frame_len.saturating_sub(LENGTH_PREFIX_LEN as u64 + header_len);
    match budget / row_bytes {
        0 => Err(ChunkError::RowTooLarge { row_bytes, max_frame_len: limits.max_frame_len }),
        rows => Ok(rows),
    }
}

/// Splits activations into frames that each fit `limits`, numbered from `first_seq`, the last one
/// marked `last_chunk`. The chunks borrow `data`; nothing is copied until they are written.
///
/// ```
/// use computepool_axl::frame::{split_activations, ActivationsRef, DType, FrameLimits, RequestId};
///
/// let request = RequestId::new("req-1").unwrap();
/// let data = vec![0u8; 100 * 64 * 2]; // 100 rows of 64 bf16 values
/// let limits = FrameLimits::default().with_max_frame_len(4096);
/// let acts = ActivationsRef { request: &request, dtype: DType::Bf16, hidden: 64, start_pos: 0, data: &data };
/// let chunks: Vec<_> = split_activations(acts, 0, &limits).unwrap().collect();
/// assert!(chunks.len() > 1);
/// assert!(chunks.iter().all(|c| c.encode(&limits).unwrap().wire_len() <= 4096));
/// assert!(chunks.last().unwrap().header.last_chunk);
/// ```
pub fn split_activations<'a>(
    acts: ActivationsRef<'a>,
    first_seq: u64,
    limits: &FrameLimits,
) -> Result<ActivationChunks<'a>, ChunkError> {
    let rows_per_chunk = max_rows_per_frame(acts.request, acts.dtype, acts.hidden, limits)?;
    let row_bytes = acts.hidden * acts.dtype.size_in_bytes(); // max_rows_per_frame checked it
    let len = acts.data.len() as u64;
    if len == 0 {
        return Err(ChunkError::Empty);
    }
    if !len.is_multiple_of(row_bytes) {
        return Err(ChunkError::Ragged { len, row_bytes });
    }
    let rows = len / row_bytes;
    acts.start_pos.checked_add(rows).ok_or(ChunkError::Overflow { what: "start_pos + rows" })?;
    let chunks = rows.div_ceil(rows_per_chunk);
    first_seq.checked_add(chunks - 1).ok_or(ChunkError::Overflow { what: "sequence number" })?;
    let to_usize = |n: u64| usize::try_from(n).map_err(|_| ChunkError::Overflow { what: "chunk size" });
    Ok(ActivationChunks {
        request: acts.request.clone(),
        dtype: acts.dtype,
        hidden: acts.hidden,
        row_bytes: to_usize(row_bytes)?,
        rows_per_chunk: to_usize(rows_per_chunk)?,
        remaining: acts.data,
        next_seq: first_seq,
        next_pos: acts.start_pos,
    })
}

/// One chunk of [`split_activations`]: a header and the slice of the caller's data it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivationChunk<'a> {
    /// The chunk's header.
    pub header: ActivationsHeader,
    /// Its rows, borrowed.
    pub payload: &'a [u8],
}

impl<'a> ActivationChunk<'a> {
    /// Encodes the chunk, borrowing its payload.
    pub fn encode(&self, limits: &FrameLimits) -> Result<EncodedFrame<'a>, FrameError> {
        encode(&FrameHeader::Activations(self.header.clone()), self.payload, limits)
    }

    /// An owned frame (copies the payload).
    pub fn to_frame(&self) -> Frame {
        Frame::activations(self.header.clone(), self.payload.to_vec())
    }
}

/// Iterator over the chunks of [`split_activations`], in order.
#[derive(Debug, Clone)]
pub struct ActivationChunks<'a> {
    request: RequestId,
    dtype: DType,
    hidden: u64,
    row_bytes: usize,
    rows_per_chunk: usize,
    remaining: &'a [u8],
    next_seq: u64,
    next_pos: u64,
}

impl<'a> ActivationChunks<'a> {
    /// The sequence number of the first frame after these chunks (the next one to send on the link).
    pub fn next_seq_after(&self) -> u64 {
        self.next_seq.saturating_add(self.len() as u64)
    }
}

impl<'a> Iterator for ActivationChunks<'a> {
    type Item = ActivationChunk<'a>;

    fn next(&mut self) -> Option<ActivationChunk<'a>> {
        if self.remaining.is_empty() {
            return None;
        }
        let take = self.rows_per_chunk.saturating_mul(self.row_bytes).min(self.remaining.len());
        let (payload, rest) = self.remaining.split_at(take);
        self.remaining = rest;
        let rows = (take / self.row_bytes) as u64;
        let header = ActivationsHeader {
            request: self.request.clone(),
            seq: self.next_seq,
            dtype: self.dtype,
            rows,
            hidden: self.hidden,
            start_pos: self.next_pos,
            last_chunk: rest.is_empty(),
        };
        // split_activations checked that neither passes u64::MAX over the whole split.
        self.next_seq = self.next_seq.saturating_add(1);
        self.next_pos = self.next_pos.saturating_add(rows);
        Some(ActivationChunk { header, payload })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let chunk_bytes = self.rows_per_chunk.saturating_mul(self.row_bytes).max(1);
        let n = self.remaining.len().div_ceil(chunk_bytes);
        (n, Some(n))
    }
}

impl ExactSizeIterator for ActivationChunks<'_> {}

/// Receiver side: where one request's next activations must start, checked against every chunk.
///
/// Create it with the request's KV cache length (0 for a new request) and feed it each
/// activations header of the request in arrival order; an error fails the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActivationCursor {
    next_pos: u64,
    format: Option<(DType, u64)>,
    step_rows: u64,
}

/// What [`ActivationCursor::accept`] learned from one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkProgress {
    /// Rows received in the current step so far, this chunk included.
    pub step_rows: u64,
    /// This chunk closed the step (`last_chunk`): the exit shard samples now.
    pub step_complete: bool,
}

impl ActivationCursor {
    /// A cursor for a request whose KV cache holds `next_pos` positions.
    pub const fn new(next_pos: u64) -> Self {
        ActivationCursor { next_pos, format: None, step_rows: 0 }
    }

    /// The position the next chunk must start at.
    pub fn next_pos(&self) -> u64 {
        self.next_pos
    }

    /// Checks a chunk's position, dtype and hidden size, and advances past its rows. On error
    /// nothing moves.
    pub fn accept(&mut self, header: &ActivationsHeader) -> Result<ChunkProgress, ChunkError> {
        if header.start_pos != self.next_pos {
            return Err(ChunkError::PositionMismatch { expected: self.next_pos, got: header.start_pos });
        }
        if let Some((dtype, hidden)) = self.format {
            if header.dtype != dtype {
                return Err(ChunkError::DTypeChanged { expected: dtype, got: header.dtype });
            }
            if header.hidden != hidden {
                return Err(ChunkError::HiddenChanged { expected: hidden, got: header.hidden });
            }
        }
        let next_pos = header.end_pos().ok_or(ChunkError::Overflow { what: "start_pos + rows" })?;
        let step_rows = self.step_rows.saturating_add(header.rows);
        self.next_pos = next_pos;
        self.format = Some((header.dtype, header.hidden));
        self.step_rows = if header.last_chunk { 0 } else { step_rows };
        Ok(ChunkProgress { step_rows, step_complete: header.last_chunk })
    }
}

/// Activations put back together from chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReassembledActivations {
    /// The request.
    pub request: RequestId,
    /// Element type.
    pub dtype: DType,
    /// Total rows.
    pub rows: u64,
    /// Hidden size.
    pub hidden: u64,
    /// Position of the first row.
    pub start_pos: u64,
    /// `rows × hidden` values, row-major.
    pub data: Vec<u8>,
}

/// Reassembles the chunks of one step: all activations of one request, consecutive `seq`,
/// contiguous positions, one dtype and hidden size, `last_chunk` on the final frame and only there.
pub fn reassemble<'f>(frames: impl IntoIterator<Item = &'f Frame>) -> Result<ReassembledActivations, ChunkError> {
    let mut frames = frames.into_iter();
    let first = frames.next().ok_or(ChunkError::Empty)?;
    let first_header = activations_of(first)?;
    let mut sequence = SequenceTracker::starting_at(first_header.seq);
    let mut cursor = ActivationCursor::new(first_header.start_pos);
    let mut out = ReassembledActivations {
        request: first_header.request.clone(),
        dtype: first_header.dtype,
        rows: 0,
        hidden: first_header.hidden,
        start_pos: first_header.start_pos,
        data: Vec::new(),
    };
    let mut complete = false;
    for frame in std::iter::once(first).chain(frames) {
        let header = activations_of(frame)?;
        if complete {
            return Err(ChunkError::AfterLast);
        }
        if header.request != out.request {
            return Err(ChunkError::RequestMismatch { expected: out.request.clone(), got: header.request.clone() });
        }
        sequence.check(header.seq)?;
        let progress = cursor.accept(header)?;
        out.rows = progress.step_rows;
        out.data.extend_from_slice(&frame.payload);
        complete = progress.step_complete;
    }
    if !complete {
        return Err(ChunkError::Incomplete);
    }
    Ok(out)
}

fn activations_of(frame: &Frame) -> Result<&ActivationsHeader, ChunkError> {
    match &frame.header {
        FrameHeader::Activations(h) => Ok(h),
        other => Err(ChunkError::NotActivations { kind: other.kind() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::DEFAULT_MAX_FRAME_LEN;

    fn rid(s: &str) -> RequestId {
        RequestId::new(s).expect("test id is valid")
    }

    fn values(rows: usize, hidden: usize, dtype: DType) -> Vec<u8> {
        (0..rows * hidden * dtype.size_in_bytes() as usize).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[test]
    fn a_long_prompt_splits_under_the_cap_and_reassembles() {
        let request = rid("prompt-1");
        let (rows, hidden) = (1000, 576);
        let data = values(rows, hidden, DType::Bf16);
        let limits = FrameLimits::default().with_max_frame_len(64 * 1024);
        let acts =
            ActivationsRef { request: &request, dtype: DType::Bf16, hidden: hidden as u64, start_pos: 17, data: &data };
        let chunks = split_activations(acts, 5, &limits).expect("splits");
        assert_eq!(chunks.next_seq_after(), 5 + chunks.len() as u64);
        let chunks: Vec<_> = chunks.collect();
        assert!(chunks.len() >= 18, "{} chunks", chunks.len());

        let mut frames = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let encoded = chunk.encode(&limits).expect("every chunk fits");
            assert!(encoded.wire_len() as u64 <= limits.max_frame_len);
            assert_eq!(chunk.header.seq, 5 + i as u64);
            assert_eq!(chunk.header.last_chunk, i == chunks.len() - 1);
            frames.push(Frame::decode(&encoded.to_vec(), &limits).expect("decodes"));
        }
        let whole = reassemble(&frames).expect("reassembles");
        assert_eq!(whole.rows, rows as u64);
        assert_eq!(whole.start_pos, 17);
        assert_eq!(whole.data, data);
    }

    #[test]
    fn the_chunk_size_uses_the_space_it_has() {
        let request = rid("r");
        let limits = FrameLimits::default();
        let per_frame = max_rows_per_frame(&request, DType::F32, 8192, &limits).expect("fits");
        let row = 8192 * 4;
        assert!(per_frame * row <= DEFAULT_MAX_FRAME_LEN);
        // Only the header's few hundred bytes are left over.
        assert!(DEFAULT_MAX_FRAME_LEN - per_frame * row < row + 512);
        // A frame of exactly that many rows, with the widest numbers, fits.
        let data = vec![0u8; (per_frame * row) as usize];
        let header = ActivationsHeader {
            request,
            seq: u64::MAX,
            dtype: DType::F32,
            rows: per_frame,
            hidden: 8192,
            start_pos: u64::MAX - per_frame,
            last_chunk: false,
        };
        assert!(encode(&FrameHeader::Activations(header), &data, &limits).is_ok());
    }

    #[test]
    fn a_short_prompt_is_one_chunk() {
        let request = rid("r");
        let data = values(3, 4, DType::F32);
        let acts = ActivationsRef { request: &request, dtype: DType::F32, hidden: 4, start_pos: 0, data: &data };
        let chunks: Vec<_> = split_activations(acts, 0, &FrameLimits::default()).expect("splits").collect();
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].header.rows, 3);
        assert!(chunks[0].header.last_chunk);
    }

    #[test]
    fn bad_inputs_to_split_are_typed_errors() {
        let request = rid("r");
        let limits = FrameLimits::default();
        let split = |hidden, data: &[u8], start_pos, seq| {
            split_activations(
                ActivationsRef { request: &request, dtype: DType::F32, hidden, start_pos, data },
                seq,
                &limits,
            )
            .map(|c| c.count())
        };
        assert_eq!(split(4, &[], 0, 0), Err(ChunkError::Empty));
        assert_eq!(split(0, &[0; 4], 0, 0), Err(ChunkError::ZeroHidden));
        assert_eq!(split(4, &[0; 20], 0, 0), Err(ChunkError::Ragged { len: 20, row_bytes: 16 }));
        assert_eq!(split(4, &[0; 16], u64::MAX, 0), Err(ChunkError::Overflow { what: "start_pos + rows" }));
        assert_eq!(split(4, &[0; 16], 0, u64::MAX), Ok(1), "one chunk may use the last number");
        let small = FrameLimits::default().with_max_frame_len(300);
        assert!(matches!(
            split_activations(
                ActivationsRef { request: &request, dtype: DType::F32, hidden: 1024, start_pos: 0, data: &[0; 4096] },
                0,
                &small
            ),
            Err(ChunkError::RowTooLarge { row_bytes: 4096, max_frame_len: 300 })
        ));
    }

    #[test]
    fn the_cursor_checks_positions_against_the_cache() {
        let header = |start_pos, rows, last_chunk| ActivationsHeader {
            request: rid("r"),
            seq: 0,
            dtype: DType::Bf16,
            rows,
            hidden: 8,
            start_pos,
            last_chunk,
        };
        let mut cursor = ActivationCursor::new(0);
        assert_eq!(cursor.accept(&header(0, 5, false)), Ok(ChunkProgress { step_rows: 5, step_complete: false }));
        assert_eq!(cursor.accept(&header(5, 3, true)), Ok(ChunkProgress { step_rows: 8, step_complete: true }));
        // Decode steps: one row each.
        assert_eq!(cursor.accept(&header(8, 1, true)), Ok(ChunkProgress { step_rows: 1, step_complete: true }));
        // A lost chunk shows as a gap in positions, a repeated one as a step back.
        assert_eq!(cursor.accept(&header(10, 1, true)), Err(ChunkError::PositionMismatch { expected: 9, got: 10 }));
        assert_eq!(cursor.accept(&header(8, 1, true)), Err(ChunkError::PositionMismatch { expected: 9, got: 8 }));
        assert_eq!(cursor.next_pos(), 9, "errors do not move the cursor");
        let mut other = header(9, 1, true);
        other.hidden = 16;
        assert_eq!(cursor.accept(&other), Err(ChunkError::HiddenChanged { expected: 8, got: 16 }));
        let mut other = header(9, 1, true);
        other.dtype = DType::F32;
        assert_eq!(cursor.accept(&other), Err(ChunkError::DTypeChanged { expected: DType::Bf16, got: DType::F32 }));
    }

    #[test]
    fn reassembly_rejects_chunks_that_do_not_line_up() {
        let request = rid("r");
        let data = values(100, 2, DType::F32);
        let limits = FrameLimits::default().with_max_frame_len(300);
        let acts = ActivationsRef { request: &request, dtype: DType::F32, hidden: 2, start_pos: 0, data: &data };
        let frames: Vec<Frame> = split_activations(acts, 0, &limits).expect("splits").map(|c| c.to_frame()).collect();
        assert!(frames.len() >= 3);
        assert_eq!(reassemble(&frames).map(|r| r.data), Ok(data.clone()));

        assert_eq!(reassemble(&frames[..0]), Err(ChunkError::Empty));
        assert_eq!(reassemble(&frames[..frames.len() - 1]), Err(ChunkError::Incomplete));
        let dropped: Vec<&Frame> = frames.iter().enumerate().filter(|(i, _)| *i != 1).map(|(_, f)| f).collect();
        assert_eq!(reassemble(dropped), Err(ChunkError::Sequence(SequenceError::Dropped { expected: 1, got: 2 })));
        let mut swapped = frames.clone();
        swapped.swap(1, 2);
        assert!(matches!(reassemble(&swapped), Err(ChunkError::Sequence(SequenceError::Dropped { .. }))));
        let mut extra = frames.clone();
        extra.push(frames[0].clone());
        assert_eq!(reassemble(&extra), Err(ChunkError::AfterLast));
        let mut mixed = frames.clone();
        mixed.insert(1, Frame::end(request.clone(), 1));
        assert_eq!(reassemble(&mixed), Err(ChunkError::NotActivations { kind: FrameKind::Control }));
        let mut foreign = frames.clone();
        if let FrameHeader::Activations(h) = &mut foreign[1].header {
            h.request = rid("someone-else");
        }
        assert!(matches!(reassemble(&foreign), Err(ChunkError::RequestMismatch { .. })));
        let mut shifted = frames.clone();
        if let FrameHeader::Activations(h) = &mut shifted[1].header {
            h.start_pos += 1;
        }
        assert!(matches!(reassemble(&shifted), Err(ChunkError::PositionMismatch { .. })));
    }
}
