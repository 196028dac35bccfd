//! Frames over a byte stream: one QUIC stream per link carries frames back to back, in order.
//!
//! Backpressure is the stream's: [`FrameWriter::send`] returns when the frame is in QUIC's send buffer,
//! and waits while the peer's flow-control window is full, so a slow shard slows its upstream down
//! instead of frames being dropped. Both halves are generic over tokio's byte-stream traits, so the
//! same code runs over QUIC, TCP or an in-memory pipe in tests.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::{Frame, FrameDecoder, FrameError, FrameLimits};

/// Why a link stopped carrying frames.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The peer sent bytes that are not a valid frame. The stream cannot be resynchronised: drop the
    /// connection (not the process).
    #[error("bad frame from the peer: {0}")]
    Frame(#[from] FrameError),
    /// The stream failed underneath (connection lost, reset, timed out).
    #[error("link lost: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads frames from a byte stream, enforcing [`FrameLimits`] before buffering anything.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    /// Start of the bytes in `buf` not yet given to the decoder.
    pos: usize,
}

/// Bytes read from the stream at a time.
const READ_CHUNK: usize = 64 * 1024;

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with the given limits.
    pub fn new(inner: R, limits: FrameLimits) -> Self {
        Self { inner, decoder: FrameDecoder::new(limits), buf: Vec::with_capacity(READ_CHUNK), pos: 0 }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames. A stream that ends
    /// inside a frame is [`FrameError::Truncated`]. After an error the reader is poisoned.
    pub async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
        loop {
            if self.pos < self.buf.len() {
                let mut input = &self.buf[self.pos..];
                let before = input.len();
                let frame = self.decoder.decode(&mut input)?;
                self.pos += before - input.len();
                if let Some(frame) = frame {
                    return Ok(Some(frame));
                }
            }
            self.buf.clear();
            self.pos = 0;
            self.buf.resize(READ_CHUNK, 0);
            let n = self.inner.read(&mut self.buf).await?;
            self.buf.truncate(n);
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
        }
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Writes frames to a byte stream; refuses (before writing a byte) a frame its limits would reject.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    limits: FrameLimits,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    /// A writer with the given limits.
    pub fn new(inner: W, limits: FrameLimits) -> Self {
        Self { inner, limits }
    }

    /// Writes one frame. Waits while the peer's flow-control window is full (backpressure).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), LinkError> {
        let encoded = frame.encode(&self.limits)?;
        self.inner.write_all(encoded.prefix_and_header()).await?;
        if !encoded.payload().is_empty() {
            self.inner.write_all(encoded.payload()).await?;
        }
        Ok(())
    }

    /// Flushes and closes the writing side: the reader then sees a clean end of stream.
    pub async fn finish(&mut self) -> Result<(), LinkError> {
        self.inner.shutdown().await?;
        Ok(())
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ActivationsHeader, DType, RequestId};

    fn activations(seq: u64, rows: u64) -> Frame {
        let header = ActivationsHeader {
            request: RequestId::new("r").expect("valid id"),
            seq,
            dtype: DType::F32,
            rows,
            hidden: 3,
            start_pos: seq,
            last_chunk: true,
        };
        Frame::activations(header, (0..rows * 12).map(|b| b as u8).collect())
    }

    #[tokio::test]
    async fn frames_cross_a_pipe_in_order_and_the_end_is_clean() {
        let (a, b) = tokio::io::duplex(64);
        let mut writer = FrameWriter::new(a, FrameLimits::DEFAULT);
        let mut reader = FrameReader::new(b, FrameLimits::DEFAULT);
        let sent: Vec<Frame> = (0..50).map(|i| activations(i, 1 + i % 7)).collect();
        let expected = sent.clone();
        let writing = tokio::spawn(async move {
            for f in &sent {
                writer.send(f).await.expect("sent");
            }
            writer.finish().await.expect("finished");
        });
        for f in expected {
            assert_eq!(reader.next().await.expect("read"), Some(f));
        }
        assert_eq!(reader.next().await.expect("clean end"), None);
        writing.await.expect("writer task");
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_an_error() {
        let bytes = activations(0, 2).to_bytes(&FrameLimits::DEFAULT).expect("encodes");
        let mut reader = FrameReader::new(&bytes[..bytes.len() - 1], FrameLimits::DEFAULT);
        assert!(matches!(reader.next().await, Err(LinkError::Frame(FrameError::Truncated { .. }))));
    }

    #[tokio::test]
    async fn garbage_and_oversized_frames_are_refused_before_buffering() {
        let mut reader = FrameReader::new(&b"\x05\x00\x00\x00hello"[..], FrameLimits::DEFAULT);
        assert!(matches!(reader.next().await, Err(LinkError::Frame(_))));
        let big = [0xffu8, 0xff, 0xff, 0x7f];
        let mut reader = FrameReader::new(&big[..], FrameLimits::DEFAULT);
        assert!(matches!(reader.next().await, Err(LinkError::Frame(FrameError::HeaderTooLong { .. }))));
        let small = FrameLimits::DEFAULT.with_max_frame_len(100);
        let (a, _b) = tokio::io::duplex(64);
        let mut writer = FrameWriter::new(a, small);
        assert!(matches!(writer.send(&activations(0, 10)).await, Err(LinkError::Frame(_))));
    }
}
