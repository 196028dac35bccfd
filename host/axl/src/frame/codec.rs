//! Bytes to frames and back: the length prefix, the size limits, a whole-buffer decoder for
//! message-oriented transports and an incremental one for byte streams.

use std::io::{self, IoSlice, Write};

use super::error::FrameError;
use super::header::{
    ActivationsHeader, ControlHeader, ErrorCode, FrameHeader, HeadHeader, HeadPart, MAX_ERROR_MESSAGE_LEN, RequestId, RouteHeader,
    SamplingHeader, TokenHeader,
    WireHeaderOut, parse_wire,
};

/// Bytes in the length prefix: a little-endian `u32`, the length of the JSON header that follows.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// Default [`FrameLimits::max_header_len`]: 64 KiB.
pub const DEFAULT_MAX_HEADER_LEN: u32 = 64 * 1024;

/// Default [`FrameLimits::max_frame_len`]: 16 MiB, the Gensyn AXL daemon's default
/// `max_message_size` (16 777 216 bytes), so one frame is one AXL message.
pub const DEFAULT_MAX_FRAME_LEN: u64 = 16 * 1024 * 1024;

/// Size limits a peer enforces on every frame it reads or writes. Both ends of a link should use
/// the same values; a receiver with smaller limits drops the connection on a frame the sender
/// considered fine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Longest JSON header, in bytes. Default [`DEFAULT_MAX_HEADER_LEN`] (64 KiB). Checked on the
    /// length prefix, before any header byte is buffered; it bounds the JSON parser's work too.
    pub max_header_len: u32,
    /// Longest frame on the wire, prefix + header + payload, in bytes. Default
    /// [`DEFAULT_MAX_FRAME_LEN`] (16 MiB). Checked as soon as the header is parsed, before the
    /// payload is buffered, so it is also the most a [`FrameDecoder`] ever holds. Activations larger
    /// than this are sent as several chunks ([`split_activations`](super::split_activations)).
    pub max_frame_len: u64,
}

impl FrameLimits {
    /// The defaults: 64 KiB headers, 16 MiB frames.
    pub const DEFAULT: FrameLimits =
        FrameLimits { max_header_len: DEFAULT_MAX_HEADER_LEN, max_frame_len: DEFAULT_MAX_FRAME_LEN };

    /// These limits with another maximum frame size.
    pub const fn with_max_frame_len(self, max_frame_len: u64) -> Self {
        FrameLimits { max_frame_len, ..self }
    }

    /// These limits with another maximum header size.
    pub const fn with_max_header_len(self, max_header_len: u32) -> Self {
        FrameLimits { max_header_len, ..self }
    }

    fn check_header_len(&self, header_len: u32) -> Result<(), FrameError> {
        if header_len > self.max_header_len {
            return Err(FrameError::HeaderTooLong { len: header_len.into(), max: self.max_header_len.into() });
        }
        self.check_frame_len(header_len, 0).map(|_| ())
    }

    /// The whole frame's length, if it is within the limit.
    fn check_frame_len(&self, header_len: u32, payload_len: u64) -> Result<u64, FrameError> {
        let len = (LENGTH_PREFIX_LEN as u64)
            .checked_add(header_len.into())
            .and_then(|n| n.checked_add(payload_len))
            .unwrap_or(u64::MAX);
        if len > self.max_frame_len {
            return Err(FrameError::FrameTooLarge { len, max: self.max_frame_len });
        }
        Ok(len)
    }
}

impl Default for FrameLimits {
    fn default() -> Self {
        FrameLimits::DEFAULT
    }
}

/// One decoded (or to-be-encoded) frame: a header and the payload it describes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The typed header.
    pub header: FrameHeader,
    /// Raw payload bytes: the activations for an activations frame, empty otherwise.
    pub payload: Vec<u8>,
}

impl Frame {
    /// An activations frame.
    pub fn activations(header: ActivationsHeader, payload: Vec<u8>) -> Self {
        Frame { header: FrameHeader::Activations(header), payload }
    }

    /// A head frame of a split output head: `values` (the normed state or the exit's logits) for
    /// position `pos` of `request`, f32 little-endian on the wire.
    pub fn head(request: RequestId, part: HeadPart, pos: u64, values: &[f32]) -> Self {
        let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let header = HeadHeader { request, seq: 0, part, pos, width: values.len() as u64 };
        Frame { header: FrameHeader::Head(header), payload }
    }

    /// A token frame.
    pub fn token(header: TokenHeader) -> Self {
        Frame { header: FrameHeader::Token(header), payload: Vec::new() }
    }

    /// A `start` control frame: a new request and how the exit samples it, on the receiver's default
    /// route.
    pub fn start(request: RequestId, sampling: SamplingHeader) -> Self {
        Self::start_routed(request, sampling, None, None)
    }

    /// A `start` control frame with the request's route after the receiver and, for a request that
    /// moved here from a broken route, how many tokens it generated there.
    pub fn start_routed(request: RequestId, sampling: SamplingHeader, route: Option<RouteHeader>, resumed: Option<u64>) -> Self {
        let header = FrameHeader::Control(ControlHeader::Start { request, seq: 0, sampling, route, resumed });
        Frame { header, payload: Vec::new() }
    }

    /// An `end` control frame: free `request` everywhere.
    pub fn end(request: RequestId, seq: u64) -> Self {
        Frame { header: FrameHeader::Control(ControlHeader::End { request, seq }), payload: Vec::new() }
    }

    /// An `error` control frame. A `message` longer than [`MAX_ERROR_MESSAGE_LEN`] bytes is cut (at
    /// a character boundary) so that reporting a failure cannot itself fail.
    pub fn error(request: RequestId, seq: u64, code: ErrorCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MAX_ERROR_MESSAGE_LEN {
            let mut cut = MAX_ERROR_MESSAGE_LEN;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Frame {
            header: FrameHeader::Control(ControlHeader::Error { request, seq, code, message }),
            payload: Vec::new(),
        }
    }

    /// An `unload` control frame.
    pub fn unload() -> Self {
        Frame { header: FrameHeader::Control(ControlHeader::Unload), payload: Vec::new() }
    }

    /// Encodes this frame, borrowing its payload. See [`encode`].
    pub fn encode(&self, limits: &FrameLimits) -> Result<EncodedFrame<'_>, FrameError> {
        encode(&self.header, &self.payload, limits)
    }

    /// Encodes this frame into one contiguous buffer (copies the payload; for message-oriented
    /// transports that need one body, such as the AXL daemon's `POST /send`).
    pub fn to_bytes(&self, limits: &FrameLimits) -> Result<Vec<u8>, FrameError> {
        Ok(self.encode(limits)?.to_vec())
    }

    /// Decodes a buffer that holds exactly one frame, as a message-oriented transport delivers it.
    ///
    /// Errors: [`FrameError::Truncated`] when the buffer ends inside the prefix or header,
    /// [`FrameError::PayloadLengthMismatch`] when the bytes after the header are not exactly
    /// `payload_len`, and every header error. Never panics; allocates at most the payload (which the
    /// limits bound) plus the parsed header (which `max_header_len` bounds).
    pub fn decode(bytes: &[u8], limits: &FrameLimits) -> Result<Frame, FrameError> {
        let available = bytes.len() as u64;
        let Some((prefix, rest)) = bytes.split_first_chunk::<LENGTH_PREFIX_LEN>() else {
            return Err(FrameError::Truncated { needed: LENGTH_PREFIX_LEN as u64, available });
        };
        let header_len = u32::from_le_bytes(*prefix);
        limits.check_header_len(header_len)?;
        let Some((header_bytes, payload)) = rest.split_at_checked(header_len as usize) else {
            return Err(FrameError::Truncated { needed: LENGTH_PREFIX_LEN as u64 + u64::from(header_len), available });
        };
        let (header, payload_len) = parse_header(header_bytes, header_len, limits)?;
        if payload.len() as u64 != payload_len {
            return Err(FrameError::PayloadLengthMismatch { declared: payload_len, actual: payload.len() as u64 });
        }
        Ok(Frame { header, payload: payload.to_vec() })
    }
}

/// Parses and checks a header of `header_len` bytes; returns it with its payload length, which is
/// within the frame limit and fits in memory.
fn parse_header(bytes: &[u8], header_len: u32, limits: &FrameLimits) -> Result<(FrameHeader, u64), FrameError> {
    let wire = parse_wire(bytes)?;
    let payload_len = wire.payload_len;
    // Size before value rules: an oversized frame is refused as such, whatever else is wrong with it.
    let frame_len = limits.check_frame_len(header_len, payload_len)?;
    if usize::try_from(frame_len).is_err() {
        return Err(FrameError::FrameTooLarge { len: frame_len, max: usize::MAX as u64 });
    }
    Ok((wire.into_header()?, payload_len))
}

/// An encoded frame: the prefix and header in an owned buffer, the payload borrowed. Write both
/// (vectored, or one after the other) and the payload is never copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedFrame<'a> {
    prefix_and_header: Vec<u8>,
    payload: &'a [u8],
}

impl<'a> EncodedFrame<'a> {
    /// The 4-byte length prefix followed by the JSON header.
    pub fn prefix_and_header(&self) -> &[u8] {
        &self.prefix_and_header
    }

    /// The payload, as borrowed from the caller.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// Total bytes on the wire.
    pub fn wire_len(&self) -> usize {
        self.prefix_and_header.len() + self.payload.len()
    }

    /// Both parts, for `write_vectored`.
    pub fn io_slices(&self) -> [IoSlice<'_>; 2] {
        [IoSlice::new(&self.prefix_and_header), IoSlice::new(self.payload)]
    }

    /// Writes the frame to a blocking writer.
    pub fn write_to<W: Write + ?Sized>(&self, writer: &mut W) -> io::Result<()> {
        writer.write_all(&self.prefix_and_header)?;
        writer.write_all(self.payload)
    }

    /// The frame as one contiguous buffer (copies the payload).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len());
        out.extend_from_slice(&self.prefix_and_header);
        out.extend_from_slice(self.payload);
        out
    }
}

/// A payload read as f32 little-endian values, the wire's order for f32 activations and head frames
/// (docs/PROTOCOL.md §2, §3). A trailing partial value is ignored: the decoder has already checked
/// that the payload holds a whole number of them.
pub fn f32_values(payload: &[u8]) -> impl Iterator<Item = f32> + '_ {
    payload.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Encodes a header for `payload`, checking the header's values against the payload and the frame
/// against `limits`, so that what this crate sends always passes its own decoder.
pub fn encode<'a>(
    header: &FrameHeader,
    payload: &'a [u8],
    limits: &FrameLimits,
) -> Result<EncodedFrame<'a>, FrameError> {
    let payload_len = payload.len() as u64;
    header.validate(payload_len)?;
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[0; LENGTH_PREFIX_LEN]);
    serde_json::to_writer(&mut buf, &WireHeaderOut::new(header, payload_len))
        .map_err(|e| FrameError::InvalidJson { reason: e.to_string() })?;
    let header_len = buf.len() - LENGTH_PREFIX_LEN;
    let header_len = u32::try_from(header_len).unwrap_or(u32::MAX);
    limits.check_header_len(header_len)?;
    limits.check_frame_len(header_len, payload_len)?;
    buf[..LENGTH_PREFIX_LEN].copy_from_slice(&header_len.to_le_bytes());
    Ok(EncodedFrame { prefix_and_header: buf, payload })
}

/// Where a [`FrameDecoder`] is inside the current frame.
#[derive(Debug)]
enum DecodeState {
    /// Collecting the 4-byte prefix into `buf`.
    Prefix,
    /// Collecting `header_len` header bytes into `buf`.
    Header { header_len: u32 },
    /// Collecting `payload_len` payload bytes into `buf`; the header is already checked.
    Payload { header_len: u32, header: FrameHeader, payload_len: usize },
    /// A fatal error happened; nothing more is decoded.
    Poisoned,
}

/// Incremental decoder for a byte stream (a QUIC or TCP stream): feed it bytes as they arrive, it
/// yields frames as they complete.
///
/// ```
/// use computepool_axl::frame::{Frame, FrameDecoder, FrameLimits};
///
/// let limits = FrameLimits::default();
/// let bytes = Frame::unload().to_bytes(&limits).unwrap();
/// let mut decoder = FrameDecoder::new(limits);
/// let mut frames = Vec::new();
/// for piece in bytes.chunks(3) {
///     let mut input = piece;
///     while let Some(frame) = decoder.decode(&mut input).unwrap() {
///         frames.push(frame);
///     }
/// }
/// assert_eq!(frames, vec![Frame::unload()]);
/// decoder.finish().unwrap();
/// ```
///
/// Memory: the decoder buffers only the frame in progress, never more than `max_frame_len` bytes,
/// whatever the peer sends or claims; bytes of the next frame are left in the caller's input.
/// After any error it is poisoned: every later call returns [`FrameError::Poisoned`], and the
/// caller drops the connection (the byte stream cannot be resynchronised).
#[derive(Debug)]
pub struct FrameDecoder {
    limits: FrameLimits,
    buf: Vec<u8>,
    state: DecodeState,
}

impl FrameDecoder {
    /// A decoder at the start of a stream.
    pub fn new(limits: FrameLimits) -> Self {
        FrameDecoder { limits, buf: Vec::new(), state: DecodeState::Prefix }
    }

    /// The limits it enforces.
    pub fn limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// Whether it sits between frames (nothing buffered), i.e. the stream may end here cleanly.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, DecodeState::Prefix) && self.buf.is_empty()
    }

    /// Whether an earlier error poisoned it.
    pub fn is_poisoned(&self) -> bool {
        matches!(self.state, DecodeState::Poisoned)
    }

    /// Bytes of the frame in progress held so far (excluding the prefix and header once they are
    /// parsed).
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Consumes bytes from the front of `input` and returns the next complete frame, if any.
    ///
    /// On `Ok(Some(frame))`, `input` is advanced past that frame and may still hold bytes of the next:
    /// call again until it returns `Ok(None)`, which means all of `input` was consumed and the frame in
    /// progress needs more bytes. On `Err`, the stream is poisoned.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, FrameError> {
        match self.step(input) {
            Ok(frame) => Ok(frame),
            Err(e) => {
                self.state = DecodeState::Poisoned;
                self.buf = Vec::new();
                Err(e)
            }
        }
    }

    /// Call when the stream ends: `Ok` if it ended between frames, [`FrameError::Truncated`] if it
    /// ended inside one, [`FrameError::Poisoned`] if an error came earlier.
    pub fn finish(&self) -> Result<(), FrameError> {
        let prefix = LENGTH_PREFIX_LEN as u64;
        let buffered = self.buf.len() as u64;
        let (needed, available) = match &self.state {
            DecodeState::Poisoned => return Err(FrameError::Poisoned),
            DecodeState::Prefix if self.buf.is_empty() => return Ok(()),
            DecodeState::Prefix => (prefix, buffered),
            DecodeState::Header { header_len } => (prefix + u64::from(*header_len), prefix + buffered),
            DecodeState::Payload { header_len, payload_len, .. } => {
                let head = prefix + u64::from(*header_len);
                (head + *payload_len as u64, head + buffered)
            }
        };
        Err(FrameError::Truncated { needed, available })
    }

    fn step(&mut self, input: &mut &[u8]) -> Result<Option<Frame>, FrameError> {
        loop {
            match &mut self.state {
                DecodeState::Poisoned => return Err(FrameError::Poisoned),
                DecodeState::Prefix => {
                    if !fill(&mut self.buf, input, LENGTH_PREFIX_LEN) {
                        return Ok(None);
                    }
                    let prefix: [u8; LENGTH_PREFIX_LEN] =
                        self.buf[..].try_into().expect("fill stops at exactly LENGTH_PREFIX_LEN bytes");
                    let header_len = u32::from_le_bytes(prefix);
                    self.limits.check_header_len(header_len)?;
                    self.buf.clear();
                    self.state = DecodeState::Header { header_len };
                }
                DecodeState::Header { header_len } => {
                    let header_len = *header_len;
                    if !fill(&mut self.buf, input, header_len as usize) {
                        return Ok(None);
                    }
                    let (header, payload_len) = parse_header(&self.buf, header_len, &self.limits)?;
                    let payload_len =
                        usize::try_from(payload_len).expect("parse_header checked that the frame fits in usize");
                    self.buf.clear();
                    if input.len() >= payload_len {
                        // Common case on a fast link: the whole payload is already here, so copy it
                        // once into an exactly-sized buffer.
                        let (payload, rest) = input.split_at(payload_len);
                        *input = rest;
                        self.state = DecodeState::Prefix;
                        return Ok(Some(Frame { header, payload: payload.to_vec() }));
                    }
                    // Bounded by max_frame_len, which parse_header enforced.
                    self.buf = Vec::with_capacity(payload_len);
                    self.state = DecodeState::Payload { header_len, header, payload_len };
                }
                DecodeState::Payload { payload_len, .. } => {
                    if !fill(&mut self.buf, input, *payload_len) {
                        return Ok(None);
                    }
                    let DecodeState::Payload { header, .. } = std::mem::replace(&mut self.state, DecodeState::Prefix)
                    else {
                        unreachable!("matched Payload above")
                    };
                    return Ok(Some(Frame { header, payload: std::mem::take(&mut self.buf) }));
                }
            }
        }
    }
}

/// Moves bytes from `input` into `buf` until it holds `target` bytes; true once it does.
fn fill(buf: &mut Vec<u8>, input: &mut &[u8], target: usize) -> bool {
    let want = target.saturating_sub(buf.len()).min(input.len());
    let (taken, rest) = input.split_at(want);
    buf.extend_from_slice(taken);
    *input = rest;
    buf.len() == target
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{DType, FinishReason, FrameKind};

    fn rid(s: &str) -> RequestId {
        RequestId::new(s).expect("test id is valid")
    }

    fn activations(rows: u64, hidden: u64) -> Frame {
        let header = ActivationsHeader {
            request: rid("req-1"),
            seq: 0,
            dtype: DType::Bf16,
            rows,
            hidden,
            start_pos: 0,
            last_chunk: true,
        };
        let len = (rows * hidden * 2) as usize;
        Frame::activations(header, (0..len).map(|i| i as u8).collect())
    }

    /// A frame written by hand: prefix + the given header text + payload.
    fn raw(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn decode_stream(bytes: &[u8], piece: usize, limits: FrameLimits) -> Result<Vec<Frame>, FrameError> {
        let mut decoder = FrameDecoder::new(limits);
        let mut frames = Vec::new();
        for chunk in bytes.chunks(piece.max(1)) {
            let mut input = chunk;
            while let Some(frame) = decoder.decode(&mut input)? {
                frames.push(frame);
            }
            assert!(input.is_empty(), "Ok(None) means the input was consumed");
        }
        decoder.finish()?;
        Ok(frames)
    }

    #[test]
    fn the_byte_layout_is_the_documented_one() {
        let frame = Frame::end(rid("r7"), 3);
        let bytes = frame.to_bytes(&FrameLimits::default()).expect("encodes");
        let json = br#"{"v":1,"kind":"control","op":"end","request":"r7","seq":3,"payload_len":0}"#;
        assert_eq!(&bytes[..4], &(json.len() as u32).to_le_bytes());
        assert_eq!(&bytes[4..], json);

        let frame = activations(1, 2);
        let bytes = frame.to_bytes(&FrameLimits::default()).expect("encodes");
        let json = br#"{"v":1,"kind":"activations","request":"req-1","seq":0,"dtype":"bf16","shape":[1,2],"start_pos":0,"last_chunk":true,"payload_len":4}"#;
        assert_eq!(&bytes[4..4 + json.len()], json);
        assert_eq!(&bytes[4 + json.len()..], &[0, 1, 2, 3]);
    }

    #[test]
    fn encoding_borrows_the_payload() {
        let frame = activations(3, 8);
        let encoded = frame.encode(&FrameLimits::default()).expect("encodes");
        assert!(std::ptr::eq(encoded.payload(), frame.payload.as_slice()));
        let mut written = Vec::new();
        encoded.write_to(&mut written).expect("writes to a Vec");
        assert_eq!(written, encoded.to_vec());
        assert_eq!(encoded.io_slices().iter().map(|s| s.len()).sum::<usize>(), encoded.wire_len());
    }

    #[test]
    fn whole_buffer_and_stream_round_trip() {
        let limits = FrameLimits::default();
        let frames = vec![
            activations(4, 16),
            Frame::token(TokenHeader { request: rid("req-1"), seq: 0, tokens: vec![42], finish: None }),
            Frame::token(TokenHeader {
                request: rid("req-1"),
                seq: 1,
                tokens: vec![],
                finish: Some(FinishReason::Stop),
            }),
            Frame::error(rid("req-2"), 0, ErrorCode::Unavailable, "shard 2 is unloading"),
            Frame::end(rid("req-1"), 1),
            Frame::unload(),
        ];
        let mut stream = Vec::new();
        for f in &frames {
            let bytes = f.to_bytes(&limits).expect("encodes");
            assert_eq!(Frame::decode(&bytes, &limits).as_ref(), Ok(f));
            stream.extend_from_slice(&bytes);
        }
        for piece in [1, 2, 3, 7, 64, stream.len()] {
            assert_eq!(decode_stream(&stream, piece, limits), Ok(frames.clone()), "pieces of {piece}");
        }
    }

    #[test]
    fn truncated() {
        let limits = FrameLimits::default();
        let bytes = activations(2, 4).to_bytes(&limits).expect("encodes");
        let header_end = 4 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(Frame::decode(&bytes[..3], &limits), Err(FrameError::Truncated { needed: 4, available: 3 }));
        assert_eq!(
            Frame::decode(&bytes[..10], &limits),
            Err(FrameError::Truncated { needed: header_end as u64, available: 10 })
        );
        for cut in [1, 3, 4, 10, header_end, bytes.len() - 1] {
            let e = decode_stream(&bytes[..cut], 5, limits).unwrap_err();
            assert!(matches!(e, FrameError::Truncated { .. }), "cut at {cut}: {e:?}");
            if let FrameError::Truncated { available, needed } = e {
                assert_eq!(available, cut as u64);
                assert!(needed > available);
            }
        }
        assert_eq!(
            decode_stream(&bytes[..bytes.len() - 1], 1000, limits),
            Err(FrameError::Truncated { needed: bytes.len() as u64, available: bytes.len() as u64 - 1 })
        );
    }

    #[test]
    fn payload_length_mismatch() {
        let limits = FrameLimits::default();
        let mut bytes = activations(2, 4).to_bytes(&limits).expect("encodes");
        bytes.push(0);
        assert_eq!(Frame::decode(&bytes, &limits), Err(FrameError::PayloadLengthMismatch { declared: 16, actual: 17 }));
        bytes.truncate(bytes.len() - 2);
        assert_eq!(Frame::decode(&bytes, &limits), Err(FrameError::PayloadLengthMismatch { declared: 16, actual: 15 }));
    }

    #[test]
    fn header_too_long_is_refused_from_the_prefix_alone() {
        let limits = FrameLimits::default();
        let bytes = (DEFAULT_MAX_HEADER_LEN + 1).to_le_bytes();
        let expected =
            FrameError::HeaderTooLong { len: (DEFAULT_MAX_HEADER_LEN + 1).into(), max: DEFAULT_MAX_HEADER_LEN.into() };
        assert_eq!(Frame::decode(&bytes, &limits), Err(expected.clone()));
        let mut decoder = FrameDecoder::new(limits);
        assert_eq!(decoder.decode(&mut &bytes[..]), Err(expected));
        assert_eq!(decoder.buffered_len(), 0);
        assert_eq!(decoder.decode(&mut &[0u8; 4][..]), Err(FrameError::Poisoned));
        assert_eq!(decoder.finish(), Err(FrameError::Poisoned));
        assert!(decoder.is_poisoned());
    }

    #[test]
    fn frame_too_large_is_refused_before_the_payload_arrives() {
        let limits = FrameLimits::default().with_max_frame_len(1024);
        let big = activations(64, 16); // 2 KiB of bf16
        assert!(matches!(big.encode(&limits), Err(FrameError::FrameTooLarge { max: 1024, .. })));

        let bytes = big.to_bytes(&FrameLimits::default()).expect("fits the default");
        let header_end = 4 + u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
        let expected = FrameError::FrameTooLarge { len: bytes.len() as u64, max: 1024 };
        assert_eq!(Frame::decode(&bytes, &limits), Err(expected.clone()));
        // Only the prefix and header are fed: the decoder refuses without waiting for the payload.
        let mut decoder = FrameDecoder::new(limits);
        assert_eq!(decoder.decode(&mut &bytes[..header_end]), Err(expected));

        // A header claiming an absurd payload cannot make the decoder allocate it.
        let claim = raw(r#"{"v":1,"kind":"control","op":"unload","payload_len":18446744073709551615}"#, &[]);
        assert_eq!(
            Frame::decode(&claim, &FrameLimits::default()),
            Err(FrameError::FrameTooLarge { len: u64::MAX, max: DEFAULT_MAX_FRAME_LEN })
        );
    }

    #[test]
    fn a_header_longer_than_the_frame_limit_is_refused_from_the_prefix() {
        let limits = FrameLimits::default().with_max_frame_len(100);
        let bytes = 200u32.to_le_bytes();
        assert_eq!(Frame::decode(&bytes, &limits), Err(FrameError::FrameTooLarge { len: 204, max: 100 }));
    }

    #[test]
    fn invalid_json_and_empty_header() {
        let limits = FrameLimits::default();
        for header in ["", "{", "not json", "{\"v\":1,", "\u{0}\u{0}"] {
            let e = Frame::decode(&raw(header, &[]), &limits).unwrap_err();
            assert!(matches!(e, FrameError::InvalidJson { .. }), "{header:?}: {e:?}");
        }
        let mut bytes = raw("{\"v\":1}", &[]);
        bytes[6] = 0xff; // not UTF-8
        assert!(matches!(Frame::decode(&bytes, &limits), Err(FrameError::InvalidJson { .. })));
    }

    #[test]
    fn wrong_version_unknown_kind_and_shape_mismatch_through_the_codec() {
        let limits = FrameLimits::default();
        let v2 = raw(r#"{"v":2,"kind":"control","op":"unload","payload_len":0}"#, &[]);
        assert_eq!(Frame::decode(&v2, &limits), Err(FrameError::UnsupportedVersion { got: 2, supported: 1 }));
        let kind = raw(r#"{"v":1,"kind":"weights","payload_len":0}"#, &[]);
        assert_eq!(Frame::decode(&kind, &limits), Err(FrameError::UnknownKind { kind: "weights".into() }));
        let shape = raw(
            r#"{"v":1,"kind":"activations","request":"r","seq":0,"dtype":"f32","shape":[2,2],"start_pos":0,"last_chunk":true,"payload_len":8}"#,
            &[0; 8],
        );
        assert_eq!(
            Frame::decode(&shape, &limits),
            Err(FrameError::ShapeMismatch { rows: 2, hidden: 2, dtype: DType::F32, expected: 16, payload_len: 8 })
        );
        let payload = raw(r#"{"v":1,"kind":"control","op":"unload","payload_len":2}"#, &[1, 2]);
        assert_eq!(
            Frame::decode(&payload, &limits),
            Err(FrameError::UnexpectedPayload { kind: FrameKind::Control, payload_len: 2 })
        );
    }

    #[test]
    fn head_frames_round_trip_and_their_wire_form_is_strict() {
        let limits = FrameLimits::default();
        let values = [1.5f32, -0.25, f32::MIN_POSITIVE];
        for (part, values) in [
            (HeadPart::Normed, &values[..]),
            (HeadPart::Logits { vocab_start: 24_576 }, &values[..]),
            (HeadPart::Max { vocab_start: 30_001 }, &values[..1]),
        ] {
            let frame = Frame::head(rid("r-1"), part, 41, values);
            let bytes = frame.to_bytes(&limits).expect("encodes");
            assert_eq!(Frame::decode(&bytes, &limits).expect("decodes"), frame);
        }
        let logits = Frame::head(rid("r"), HeadPart::Logits { vocab_start: 7 }, 3, &[2.0]).to_bytes(&limits).unwrap();
        let header_len = u32::from_le_bytes(logits[..4].try_into().unwrap()) as usize;
        assert_eq!(
            std::str::from_utf8(&logits[4..4 + header_len]).unwrap(),
            r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"logits","pos":3,"width":1,"vocab_start":7,"payload_len":4}"#
        );
        let four = [0u8; 4];
        let refused = [
            // logits without their rows' start, a normed state with one, an unknown part
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"logits","pos":0,"width":1,"payload_len":4}"#, "vocab_start"),
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"normed","pos":0,"width":1,"vocab_start":0,"payload_len":4}"#, "vocab_start"),
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"probs","pos":0,"width":1,"payload_len":4}"#, "probs"),
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"pos":0,"width":1,"payload_len":4}"#, "part"),
            // no values, too few bytes for the width, a field of another kind
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"normed","pos":0,"width":0,"payload_len":4}"#, "width"),
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"normed","pos":0,"width":2,"payload_len":4}"#, "payload"),
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"normed","pos":0,"width":1,"dtype":"f32","payload_len":4}"#, "dtype"),
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"logits","pos":0,"width":1,"vocab_start":18446744073709551615,"payload_len":4}"#, "overflow"),
            // a max part is one value, at a given row
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"max","pos":0,"width":2,"vocab_start":3,"payload_len":4}"#, "1 value"),
            (r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"max","pos":0,"width":1,"payload_len":4}"#, "vocab_start"),
        ];
        for (header, what) in refused {
            let e = Frame::decode(&raw(header, &four), &limits).expect_err(header);
            assert!(e.to_string().contains(what), "{header}: {e}");
        }
        // Sent by a token frame's rules: a head frame with a token field is refused too.
        let tokens = raw(r#"{"v":1,"kind":"head","request":"r","seq":0,"part":"normed","pos":0,"width":1,"tokens":[1],"payload_len":4}"#, &four);
        assert!(matches!(Frame::decode(&tokens, &limits), Err(FrameError::UnexpectedField { field: "tokens", .. })));
    }

    #[test]
    fn encoding_refuses_what_decoding_would_refuse() {
        let limits = FrameLimits::default();
        let frame = activations(2, 4);
        assert!(matches!(encode(&frame.header, &frame.payload[1..], &limits), Err(FrameError::ShapeMismatch { .. })));
        assert!(matches!(encode(&Frame::unload().header, &[1], &limits), Err(FrameError::UnexpectedPayload { .. })));
        let tiny_header = FrameLimits::default().with_max_header_len(16);
        assert!(matches!(Frame::unload().encode(&tiny_header), Err(FrameError::HeaderTooLong { .. })));
    }

    #[test]
    fn error_frames_cut_long_messages_at_a_char_boundary() {
        let frame = Frame::error(rid("r"), 0, ErrorCode::Internal, "é".repeat(MAX_ERROR_MESSAGE_LEN));
        let FrameHeader::Control(ControlHeader::Error { message, .. }) = &frame.header else { unreachable!() };
        assert!(message.len() <= MAX_ERROR_MESSAGE_LEN && message.len() >= MAX_ERROR_MESSAGE_LEN - 1);
        assert!(frame.to_bytes(&FrameLimits::default()).is_ok());
    }

    #[test]
    fn the_decoder_never_buffers_more_than_one_frame() {
        let limits = FrameLimits::default();
        let one = activations(8, 32).to_bytes(&limits).expect("encodes");
        let many: Vec<u8> = one.iter().copied().cycle().take(one.len() * 5).collect();
        let mut decoder = FrameDecoder::new(limits);
        let mut input = &many[..];
        let mut count = 0;
        while let Some(_frame) = decoder.decode(&mut input).expect("valid stream") {
            count += 1;
            assert!(decoder.buffered_len() <= one.len());
        }
        assert_eq!(count, 5);
        assert!(decoder.is_idle());
    }
}
