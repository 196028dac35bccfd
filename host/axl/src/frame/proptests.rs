//! Properties of the codec over generated inputs: valid frames round-trip whole and in any pieces;
//! arbitrary and damaged bytes never panic and come back as a frame or a typed error; the whole-buffer
//! and incremental decoders agree.

use proptest::prelude::*;

use super::*;

/// Small limits so that generated frames can exceed them too.
const LIMITS: FrameLimits = FrameLimits { max_header_len: 1024, max_frame_len: 4096 };

fn request_id() -> impl Strategy<Value = RequestId> {
    "[A-Za-z0-9._:-]{1,40}".prop_map(|s| RequestId::new(s).expect("the regex only makes valid ids"))
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::Bf16)]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::InvalidRequest),
        Just(ErrorCode::Sequence),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Internal)
    ]
}

/// Any valid frame that fits [`LIMITS`].
fn valid_frame() -> impl Strategy<Value = Frame> {
    let activations = (request_id(), any::<u64>(), dtype(), 1u64..8, 1u64..32, 0u64..1_000_000, any::<bool>())
        .prop_flat_map(|(request, seq, dtype, rows, hidden, start_pos, last_chunk)| {
            let len = (rows * hidden * dtype.size_in_bytes()) as usize;
            proptest::collection::vec(any::<u8>(), len).prop_map(move |payload| {
                Frame::activations(
                    ActivationsHeader { request: request.clone(), seq, dtype, rows, hidden, start_pos, last_chunk },
                    payload,
                )
            })
        });
    let finish = prop_oneof![Just(None), Just(Some(FinishReason::Stop)), Just(Some(FinishReason::Length))];
    let token = (request_id(), any::<u64>(), proptest::collection::vec(any::<u32>(), 0..8), finish).prop_map(
        |(request, seq, tokens, finish)| {
            let finish = if tokens.is_empty() { Some(finish.unwrap_or(FinishReason::Stop)) } else { finish };
            Frame::token(TokenHeader { request, seq, tokens, finish })
        },
    );
    let end = (request_id(), any::<u64>()).prop_map(|(r, s)| Frame::end(r, s));
    let error = (request_id(), any::<u64>(), error_code(), "\\PC{0,60}")
        .prop_map(|(r, s, code, message)| Frame::error(r, s, code, message));
    let extensions = (
        proptest::option::of(0u32..=100),
        proptest::option::of(1u32..=300),
        proptest::option::of(-20i32..=20),
        proptest::option::of("[a-z0-9._-]{1,64}"),
    );
    let start = (request_id(), 0u32..=20, any::<u32>(), 1u32..=100, any::<u64>(), extensions).prop_map(
        |(r, t, top_k, p, seed, (min_p, repetition, penalty, sampler))| {
            Frame::start(r, SamplingHeader {
                temperature: t as f32 / 10.0,
                top_k,
                top_p: p as f32 / 100.0,
                seed,
                min_p: min_p.map(|m| m as f32 / 100.0),
                repetition_penalty: repetition.map(|r| r as f32 / 100.0),
                presence_penalty: penalty.map(|p| p as f32 / 10.0),
                frequency_penalty: penalty.map(|p| -p as f32 / 10.0),
                sampler,
            })
        },
    );
    let part = prop_oneof![
        Just(HeadPart::Normed),
        (0u64..1_000_000).prop_map(|vocab_start| HeadPart::Logits { vocab_start }),
        (0u64..1_000_000).prop_map(|vocab_start| HeadPart::Max { vocab_start }),
    ];
    let head = (request_id(), any::<u64>(), part, any::<u64>(), 1u64..64).prop_flat_map(|(request, seq, part, pos, width)| {
        let width = if matches!(part, HeadPart::Max { .. }) { 1 } else { width };
        proptest::collection::vec(any::<u8>(), (width * 4) as usize).prop_map(move |payload| Frame {
            header: FrameHeader::Head(HeadHeader { request: request.clone(), seq, part, pos, width }),
            payload,
        })
    });
    prop_oneof![
        4 => activations,
        2 => token,
        1 => start,
        1 => end,
        1 => error,
        1 => Just(Frame::unload()),
        2 => head
    ]
}

/// How a valid frame's bytes get damaged.
#[derive(Debug, Clone)]
enum Damage {
    Flip { at: usize, mask: u8 },
    Set { at: usize, byte: u8 },
    Truncate { keep: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Remove { at: usize, len: usize },
    Append { bytes: Vec<u8> },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), 1u8..).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Damage::Set { at, byte }),
        any::<usize>().prop_map(|keep| Damage::Truncate { keep }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
        (any::<usize>(), 1usize..8).prop_map(|(at, len)| Damage::Remove { at, len }),
        proptest::collection::vec(any::<u8>(), 1..8).prop_map(|bytes| Damage::Append { bytes }),
    ]
}

impl Damage {
    fn apply(&self, bytes: &mut Vec<u8>) {
        let n = bytes.len();
        if n == 0 && !matches!(self, Damage::Insert { .. } | Damage::Append { .. }) {
            return;
        }
        match self {
            Damage::Flip { at, mask } => bytes[at % n] ^= mask,
            Damage::Set { at, byte } => bytes[at % n] = *byte,
            Damage::Truncate { keep } => bytes.truncate(keep % n),
            Damage::Insert { at, bytes: extra } => {
                let at = at % (bytes.len() + 1);
                bytes.splice(at..at, extra.iter().copied());
            }
            Damage::Remove { at, len } => {
                let at = at % n;
                let end = (at + len).min(bytes.len());
                bytes.drain(at..end);
            }
            Damage::Append { bytes: extra } => bytes.extend_from_slice(extra),
        }
    }
}

/// Feeds `bytes` to a fresh decoder in pieces of the given sizes (cycled), then ends the stream.
fn stream_decode(bytes: &[u8], pieces: &[usize]) -> (Vec<Frame>, Result<(), FrameError>) {
    let mut decoder = FrameDecoder::new(LIMITS);
    let mut frames = Vec::new();
    let mut rest = bytes;
    let mut sizes = pieces.iter().cycle();
    while !rest.is_empty() {
        let size = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
        let (piece, tail) = rest.split_at(size);
        rest = tail;
        let mut input = piece;
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => {
                    // Poisoned from now on, whatever comes next.
                    assert_eq!(decoder.decode(&mut &[0u8; 8][..]), Err(FrameError::Poisoned));
                    assert!(decoder.buffered_len() == 0, "a poisoned decoder frees its buffer");
                    return (frames, Err(e));
                }
            }
            assert!(decoder.buffered_len() as u64 <= LIMITS.max_frame_len);
        }
        assert!(input.is_empty());
    }
    (frames, decoder.finish())
}

fn is_typed_decode_error(e: &FrameError) -> bool {
    !matches!(e, FrameError::Poisoned)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn valid_frames_round_trip(frame in valid_frame()) {
        let bytes = frame.to_bytes(&LIMITS).expect("generated frames fit the limits");
        prop_assert!(bytes.len() as u64 <= LIMITS.max_frame_len);
        prop_assert_eq!(Frame::decode(&bytes, &LIMITS), Ok(frame.clone()));
        // The encoding is canonical: decode then encode gives the same bytes.
        prop_assert_eq!(frame.to_bytes(&LIMITS).unwrap(), bytes);
    }

    #[test]
    fn streams_of_valid_frames_decode_in_any_pieces(
        frames in proptest::collection::vec(valid_frame(), 1..6),
        pieces in proptest::collection::vec(1usize..200, 1..8),
    ) {
        let mut bytes = Vec::new();
        for f in &frames {
            bytes.extend(f.to_bytes(&LIMITS).unwrap());
        }
        let (decoded, end) = stream_decode(&bytes, &pieces);
        prop_assert_eq!(end, Ok(()));
        prop_assert_eq!(decoded, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..2048),
        pieces in proptest::collection::vec(1usize..64, 1..4),
    ) {
        if let Err(e) = Frame::decode(&bytes, &LIMITS) {
            prop_assert!(is_typed_decode_error(&e));
        }
        let (_frames, end) = stream_decode(&bytes, &pieces);
        if let Err(e) = end {
            prop_assert!(is_typed_decode_error(&e));
        }
    }

    #[test]
    fn arbitrary_headers_never_panic(
        header in "\\PC{0,200}",
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        // JSON-ish garbage gets past the length prefix and exercises the parser and the checks.
        let mut bytes = (header.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&payload);
        if let Err(e) = Frame::decode(&bytes, &LIMITS) {
            prop_assert!(is_typed_decode_error(&e));
        }
    }

    #[test]
    fn damaged_frames_decode_to_a_valid_frame_or_a_typed_error(
        frame in valid_frame(),
        damages in proptest::collection::vec(damage(), 1..4),
        pieces in proptest::collection::vec(1usize..100, 1..4),
    ) {
        let original = frame.to_bytes(&LIMITS).unwrap();
        let mut bytes = original.clone();
        for d in &damages {
            d.apply(&mut bytes);
        }
        match Frame::decode(&bytes, &LIMITS) {
            Ok(decoded) => {
                if bytes == original {
                    prop_assert_eq!(&decoded, &frame);
                }
                // Whatever was accepted is a frame this crate could have sent: valid and re-encodable.
                let again = decoded.to_bytes(&LIMITS).expect("an accepted frame re-encodes");
                prop_assert_eq!(Frame::decode(&again, &LIMITS), Ok(decoded.clone()));
                // If the header bytes are untouched, only the payload can differ.
                let header_end = 4 + u32::from_le_bytes(original[..4].try_into().unwrap()) as usize;
                if bytes.len() == original.len() && bytes[..header_end] == original[..header_end] {
                    prop_assert_eq!(&decoded.header, &frame.header);
                }
                // The stream decoder sees the same single frame.
                let (frames, end) = stream_decode(&bytes, &pieces);
                prop_assert_eq!(end, Ok(()));
                prop_assert_eq!(frames, vec![decoded]);
            }
            Err(e) => {
                prop_assert!(is_typed_decode_error(&e));
                let (frames, end) = stream_decode(&bytes, &pieces);
                match e {
                    // The buffer held too few bytes (or one frame plus extra): the stream decoder
                    // waits for more, or decodes the frame and then waits on the extra bytes.
                    FrameError::Truncated { .. } | FrameError::PayloadLengthMismatch { .. } => {
                        prop_assert!(frames.len() <= 1);
                        // (An empty buffer is a truncated frame, but an empty stream ended cleanly.)
                        prop_assert!(end.is_err() || bytes.is_empty(), "{:?} then {:?}", frames, end);
                    }
                    // Anything wrong in the prefix or header is found the same way by both.
                    other => {
                        prop_assert!(frames.is_empty());
                        prop_assert_eq!(end, Err(other));
                    }
                }
            }
        }
    }

    #[test]
    fn truncated_frames_are_always_rejected(frame in valid_frame(), keep_fraction in 0.0f64..1.0) {
        let bytes = frame.to_bytes(&LIMITS).unwrap();
        let keep = ((bytes.len() as f64) * keep_fraction) as usize;
        prop_assume!(keep < bytes.len());
        let cut = &bytes[..keep];
        let whole = Frame::decode(cut, &LIMITS).unwrap_err();
        prop_assert!(
            matches!(whole, FrameError::Truncated { .. } | FrameError::PayloadLengthMismatch { .. }),
            "{:?}",
            whole
        );
        let (frames, end) = stream_decode(cut, &[7]);
        prop_assert!(frames.is_empty());
        if keep == 0 {
            prop_assert_eq!(end, Ok(()), "a stream that ends before any byte ends cleanly");
        } else {
            prop_assert!(matches!(end, Err(FrameError::Truncated { .. })), "{:?}", end);
        }
    }

    #[test]
    fn split_chunks_fit_and_reassemble(
        request in request_id(),
        dtype in dtype(),
        hidden in 1u64..64,
        rows in 1u64..200,
        start_pos in 0u64..10_000,
        first_seq in 0u64..1000,
    ) {
        let data: Vec<u8> = (0..rows * hidden * dtype.size_in_bytes()).map(|i| i as u8).collect();
        let acts = ActivationsRef { request: &request, dtype, hidden, start_pos, data: &data };
        match split_activations(acts, first_seq, &LIMITS) {
            Ok(chunks) => {
                let mut frames = Vec::new();
                for chunk in chunks {
                    let encoded = chunk.encode(&LIMITS).expect("every chunk fits the limits");
                    prop_assert!(encoded.wire_len() as u64 <= LIMITS.max_frame_len);
                    frames.push(Frame::decode(&encoded.to_vec(), &LIMITS).expect("decodes"));
                }
                let whole = reassemble(&frames).expect("reassembles");
                prop_assert_eq!(whole.data, data);
                prop_assert_eq!(whole.rows, rows);
                prop_assert_eq!(whole.start_pos, start_pos);
            }
            Err(ChunkError::RowTooLarge { row_bytes, .. }) => {
                prop_assert!(row_bytes + 4 > LIMITS.max_frame_len - 300);
            }
            Err(other) => prop_assert!(false, "unexpected {other:?}"),
        }
    }
}
