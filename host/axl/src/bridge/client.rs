//! [`AxlClient`]: one frame per AXL message over the daemon's local HTTP API.

use std::time::Duration;

use crate::frame::{Frame, FrameError, FrameLimits};

use super::api::{
    AxlTopology, DEFAULT_BASE_URL, DEFAULT_MAX_MESSAGE_SIZE, DESTINATION_PEER_HEADER, FROM_PEER_HEADER, RECV_PATH,
    SEND_PATH, TOPOLOGY_PATH,
};
use super::error::BridgeError;
use super::http::{Body, HttpClient, HttpError, HttpRequest, HttpResponse};
use super::peer_id::{AxlPeerId, PeerIdError};

/// Largest `/topology` answer read. The daemon's topology is a few KiB; this only bounds memory
/// against a wrong URL.
const MAX_TOPOLOGY_BYTES: usize = 4 * 1024 * 1024;

/// Most bytes of an error answer read, and characters of it kept in [`BridgeError::Daemon`].
const MAX_ERROR_BODY_BYTES: usize = 4096;
const ERROR_BODY_CHARS: usize = 200;

/// How an [`AxlClient`] reaches its daemon and what it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxlClientConfig {
    /// The daemon's API, `http://host:port`. Default [`DEFAULT_BASE_URL`] (`http://127.0.0.1:9002`,
    /// the daemon's default `bridge_addr` and `api_port`). Plain HTTP only: the API is meant for
    /// loopback.
    pub base_url: String,
    /// The daemon's `max_message_size`, in bytes. Default [`DEFAULT_MAX_MESSAGE_SIZE`] (16 MiB). Set
    /// it to the value in the operators' `node-config.json` if they changed it: a larger message is
    /// dropped silently by the receiving daemon, so [`AxlClient::send`] refuses it first.
    pub max_message_size: u64,
    /// Limits for encoding sent frames and decoding received ones. Default [`FrameLimits::DEFAULT`]
    /// (16 MiB frames, the same as the default message size). Both ends must agree (docs/PROTOCOL.md
    /// §4); `max_frame_len` above `max_message_size` makes large frames fail with
    /// [`BridgeError::MessageTooLarge`] instead of being chunked.
    pub frame_limits: FrameLimits,
    /// Longest wait for one HTTP call, body included. Default 30 s: enough to post 16 MiB to a busy
    /// daemon on loopback. Exceeding it gives [`BridgeError::Unreachable`].
    pub request_timeout: Duration,
}

impl Default for AxlClientConfig {
    fn default() -> Self {
        AxlClientConfig {
            base_url: DEFAULT_BASE_URL.to_string(),
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            frame_limits: FrameLimits::DEFAULT,
            request_timeout: Duration::from_secs(30),
        }
    }
}

impl AxlClientConfig {
    /// The defaults with another base URL (e.g. a stand-in's).
    pub fn with_base_url(base_url: impl Into<String>) -> Self {
        AxlClientConfig { base_url: base_url.into(), ..AxlClientConfig::default() }
    }
}

/// Async client of one AXL daemon: sends frames to peers, takes received frames off its queue, reads
/// its topology. Cheap to clone (clones share one connection pool); every call stands alone.
///
/// ```no_run
/// # async fn demo(frame: computepool_axl::Frame) -> Result<(), computepool_axl::bridge::BridgeError> {
/// use computepool_axl::bridge::{AxlClient, AxlClientConfig};
///
/// let client = AxlClient::new(AxlClientConfig::default())?;
/// let me = client.topology().await?.our_public_key;
/// client.send(&me, &frame).await?; // to ourselves, through the daemon
/// if let Some((from, frame)) = client.recv().await? {
///     println!("{} sent {:?}", from.short(), frame.header.kind());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AxlClient {
    http: HttpClient,
    max_message_size: u64,
    limits: FrameLimits,
}

impl AxlClient {
    /// A client for the daemon at `config.base_url`. Connects lazily: a daemon that is down shows
    /// up as [`BridgeError::Unreachable`] on the first call, not here.
    ///
    /// Errors: [`BridgeError::InvalidBaseUrl`] when the URL does not parse, is not `http`, or has a
    /// path, query, fragment or user name.
    pub fn new(config: AxlClientConfig) -> Result<Self, BridgeError> {
        let http = HttpClient::new(&config.base_url, config.request_timeout)
            .map_err(|reason| BridgeError::InvalidBaseUrl { url: config.base_url.clone(), reason })?;
        Ok(AxlClient { http, max_message_size: config.max_message_size, limits: config.frame_limits })
    }

    /// The frame limits in use.
    pub fn frame_limits(&self) -> &FrameLimits {
        &self.limits
    }

    /// The daemon's message size limit assumed.
    pub fn max_message_size(&self) -> u64 {
        self.max_message_size
    }

    /// Sends one frame to `peer` as one message. Fire-and-forget like the daemon's `/send`: `Ok`
    /// means the daemon wrote it towards the peer, not that the peer read it; a lost message shows up
    /// at the receiver as a sequence gap.
    ///
    /// Errors: [`BridgeError::Encode`] when the frame breaks the frame limits,
    /// [`BridgeError::MessageTooLarge`] when it is over the message size (both checked before any
    /// I/O), [`BridgeError::Unreachable`] when the daemon is not there or does not answer in time,
    /// [`BridgeError::Daemon`] when it refuses (e.g. `502`: the peer cannot be reached),
    /// [`BridgeError::BadResponse`] when its answer is not HTTP.
    pub async fn send(&self, peer: &AxlPeerId, frame: &Frame) -> Result<(), BridgeError> {
        let encoded = frame.encode(&self.limits).map_err(BridgeError::Encode)?;
        let len = encoded.wire_len() as u64;
        if len > self.max_message_size {
            return Err(BridgeError::MessageTooLarge { len, max: self.max_message_size });
        }
        let destination = peer.to_hex();
        let headers = [(DESTINATION_PEER_HEADER, destination.as_str()), ("Content-Type", "application/octet-stream")];
        let body = [encoded.prefix_and_header(), encoded.payload()];
        let request = HttpRequest { method: "POST", path: SEND_PATH, headers: &headers, body: &body };
        let response = self.call(SEND_PATH, &request, MAX_ERROR_BODY_BYTES).await?;
        if response.status != 200 {
            return Err(daemon_error(SEND_PATH, &response));
        }
        Ok(())
    }

    /// Takes the oldest message off the daemon's receive queue and decodes it as one frame.
    /// `Ok(None)` when the queue is empty (`204`): poll again later, or use an
    /// [`AxlInbox`](super::AxlInbox), which does.
    ///
    /// The sender is the id the daemon reports, [`AxlPeerId::reported_form`] of its key. No order is
    /// checked here: that is the inbox's job.
    ///
    /// Errors: [`BridgeError::InvalidFrame`] (naming the sender) when the message is not exactly one
    /// valid frame, or is longer than the frame limit (then only that much is read); the message is
    /// gone from the queue either way. [`BridgeError::MissingSender`] / [`BridgeError::InvalidSender`]
    /// when the daemon's sender header is absent or malformed; [`BridgeError::Unreachable`],
    /// [`BridgeError::Daemon`] and [`BridgeError::BadResponse`] as for [`send`](Self::send). Never
    /// panics, whatever the answer.
    pub async fn recv(&self) -> Result<Option<(AxlPeerId, Frame)>, BridgeError> {
        let request = HttpRequest { method: "GET", path: RECV_PATH, headers: &[], body: &[] };
        let max = usize::try_from(self.limits.max_frame_len).unwrap_or(usize::MAX);
        let response = self.call(RECV_PATH, &request, max).await?;
        match response.status {
            204 => return Ok(None),
            200 => {}
            _ => return Err(daemon_error(RECV_PATH, &response)),
        }
        let from = sender_from_header(response.header(FROM_PEER_HEADER))?;
        match &response.body {
            Body::Whole(body) => decode_message(from, body, &self.limits).map(Some),
            Body::Over(len) => {
                let error = FrameError::FrameTooLarge { len: *len, max: self.limits.max_frame_len };
                Err(BridgeError::InvalidFrame { from, error })
            }
        }
    }

    /// This node's key and address and its directly connected peers.
    ///
    /// Errors: [`BridgeError::InvalidTopology`] when the answer is not the expected JSON (or over
    /// 4 MiB); [`BridgeError::Unreachable`], [`BridgeError::Daemon`] and [`BridgeError::BadResponse`]
    /// as for [`send`](Self::send).
    pub async fn topology(&self) -> Result<AxlTopology, BridgeError> {
        let request = HttpRequest { method: "GET", path: TOPOLOGY_PATH, headers: &[], body: &[] };
        let response = self.call(TOPOLOGY_PATH, &request, MAX_TOPOLOGY_BYTES).await?;
        if response.status != 200 {
            return Err(daemon_error(TOPOLOGY_PATH, &response));
        }
        match &response.body {
            Body::Whole(body) => {
                serde_json::from_slice(body).map_err(|e| BridgeError::InvalidTopology { reason: e.to_string() })
            }
            Body::Over(len) => {
                Err(BridgeError::InvalidTopology { reason: format!("answer of {len} bytes is too long") })
            }
        }
    }

    async fn call(
        &self,
        endpoint: &'static str,
        request: &HttpRequest<'_>,
        max_body: usize,
    ) -> Result<HttpResponse, BridgeError> {
        self.http.send(request, max_body).await.map_err(|error| match error {
            HttpError::Malformed(reason) => BridgeError::BadResponse { endpoint, reason },
            HttpError::Io(_) | HttpError::Timeout(_) => {
                BridgeError::Unreachable { endpoint, reason: error.to_string() }
            }
        })
    }
}

/// Decodes one received message as one frame, naming the sender on failure.
pub(crate) fn decode_message(
    from: AxlPeerId,
    body: &[u8],
    limits: &FrameLimits,
) -> Result<(AxlPeerId, Frame), BridgeError> {
    match Frame::decode(body, limits) {
        Ok(frame) => Ok((from, frame)),
        Err(error) => Err(BridgeError::InvalidFrame { from, error }),
    }
}

/// Reads the sender header of a `/recv` answer.
pub(crate) fn sender_from_header(value: Option<&[u8]>) -> Result<AxlPeerId, BridgeError> {
    let value = value.ok_or(BridgeError::MissingSender)?;
    // Bytes that are not UTF-8 cannot be 64 hex digits; report the length only.
    let text = std::str::from_utf8(value)
        .map_err(|_| BridgeError::InvalidSender(PeerIdError::WrongLength { len: value.len() }))?;
    AxlPeerId::parse(text).map_err(BridgeError::InvalidSender)
}

fn daemon_error(endpoint: &'static str, response: &HttpResponse) -> BridgeError {
    let body = match &response.body {
        Body::Whole(body) => String::from_utf8_lossy(body),
        Body::Over(_) => "".into(),
    };
    let text = body.trim();
    let mut message: String = text.chars().take(ERROR_BODY_CHARS).collect();
    if text.chars().nth(ERROR_BODY_CHARS).is_some() {
        message.push('…');
    }
    BridgeError::Daemon { endpoint, status: response.status, message }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::RequestId;
    use proptest::prelude::*;

    fn peer() -> AxlPeerId {
        AxlPeerId::from_bytes([7; 32])
    }

    #[test]
    fn config_defaults_match_the_daemon() {
        let config = AxlClientConfig::default();
        assert_eq!(config.base_url, "http://127.0.0.1:9002");
        assert_eq!(config.max_message_size, 16_777_216);
        assert_eq!(config.frame_limits, FrameLimits::DEFAULT);
        let client = AxlClient::new(config).expect("valid");
        assert_eq!(client.max_message_size(), 16_777_216);
    }

    #[test]
    fn bad_base_urls_are_refused() {
        for url in [
            "",
            "127.0.0.1:9002",
            "https://127.0.0.1:9002",
            "http://127.0.0.1:9002/api",
            "http://h:1/?q",
            "http://u@h:1",
        ] {
            let error = AxlClient::new(AxlClientConfig::with_base_url(url)).unwrap_err();
            assert!(matches!(error, BridgeError::InvalidBaseUrl { .. }), "{url}: {error:?}");
        }
        assert!(AxlClient::new(AxlClientConfig::with_base_url("http://127.0.0.1:9002/")).is_ok());
    }

    #[test]
    fn sender_header_is_checked() {
        assert_eq!(sender_from_header(None), Err(BridgeError::MissingSender));
        assert_eq!(
            sender_from_header(Some(b"abc")),
            Err(BridgeError::InvalidSender(PeerIdError::WrongLength { len: 3 }))
        );
        assert_eq!(
            sender_from_header(Some(&[0xff; 64])),
            Err(BridgeError::InvalidSender(PeerIdError::WrongLength { len: 64 }))
        );
        assert_eq!(sender_from_header(Some(peer().to_hex().as_bytes())), Ok(peer()));
    }

    #[test]
    fn a_non_frame_names_its_sender() {
        let limits = FrameLimits::default();
        let error = decode_message(peer(), b"hello", &limits).unwrap_err();
        // "hell" read as a little-endian length announces a header of 1.8 GB.
        assert!(
            matches!(&error, BridgeError::InvalidFrame { from, error: FrameError::HeaderTooLong { .. } } if *from == peer()),
            "{error:?}"
        );
        assert!(error.to_string().contains("07070707…"), "{error}");
        let frame = Frame::end(RequestId::new("r").expect("valid"), 0);
        let bytes = frame.to_bytes(&limits).expect("encodes");
        assert_eq!(decode_message(peer(), &bytes, &limits), Ok((peer(), frame)));
    }

    proptest! {
        #[test]
        fn decoding_any_message_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_message(peer(), &body, &FrameLimits::default());
        }
    }
}
