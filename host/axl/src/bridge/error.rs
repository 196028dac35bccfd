//! What can go wrong on the bridge: [`BridgeError`] for one call to the daemon, [`InboxError`] for
//! what the receive loop reports.

use crate::frame::{ErrorCode, FrameError, RequestId, SequenceError};

use super::peer_id::{AxlPeerId, PeerIdError};

/// A call to the AXL daemon that failed. Nothing here panics or leaves the client unusable: every
/// call stands alone.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BridgeError {
    /// The configured base URL is not an `http://host:port` URL.
    #[error("invalid AXL daemon URL {url:?}: {reason}")]
    InvalidBaseUrl {
        /// The URL as configured.
        url: String,
        /// Why it was refused.
        reason: String,
    },

    /// The daemon could not be reached or did not answer in time (it is not running, or its
    /// `api_port`/`bridge_addr` differ from the configured URL).
    #[error("AXL daemon unreachable on {endpoint}: {reason}")]
    Unreachable {
        /// The endpoint called, e.g. `/send`.
        endpoint: &'static str,
        /// The HTTP client's error.
        reason: String,
    },

    /// The daemon answered with a status the API does not use for success. On `/send`: `400` a
    /// malformed peer id, `502` the peer cannot be reached, `500` the write failed, `413` (the
    /// stand-in only) a message over its size limit.
    #[error("AXL daemon answered {status} on {endpoint}: {message}")]
    Daemon {
        /// The endpoint called.
        endpoint: &'static str,
        /// The HTTP status code.
        status: u16,
        /// The start of the answer's body, for the log.
        message: String,
    },

    /// The daemon's answer is not HTTP/1.x as the bridge reads it (a wrong port, or a broken proxy
    /// in between).
    #[error("AXL daemon's answer on {endpoint} is not valid HTTP: {reason}")]
    BadResponse {
        /// The endpoint called.
        endpoint: &'static str,
        /// What was wrong with it.
        reason: String,
    },

    /// The frame cannot be encoded under the client's [`FrameLimits`](crate::frame::FrameLimits),
    /// e.g. activations too large for one frame (send them as chunks).
    #[error("frame cannot be sent over AXL: {0}")]
    Encode(#[source] FrameError),

    /// The encoded frame is larger than the daemon's `max_message_size`: the receiving daemon would
    /// drop it silently. Lower `max_frame_len` in the frame limits to at most the message size.
    #[error(
        "encoded frame of {len} bytes exceeds the AXL message limit of {max} bytes (the receiving \
         daemon would drop it silently); make FrameLimits::max_frame_len at most the daemon's \
         max_message_size"
    )]
    MessageTooLarge {
        /// Bytes of the encoded frame.
        len: u64,
        /// The configured `max_message_size`.
        max: u64,
    },

    /// `/recv` answered a message without a sender header.
    #[error("AXL daemon delivered a message without an {header} header", header = super::api::FROM_PEER_HEADER)]
    MissingSender,

    /// `/recv` answered a message whose sender header is not a peer id.
    #[error("AXL daemon delivered a message with an invalid {header} header: {0}", header = super::api::FROM_PEER_HEADER)]
    InvalidSender(#[source] PeerIdError),

    /// A message from `from` is not one valid frame (including one larger than the frame limit).
    /// Per docs/PROTOCOL.md §7 the message is discarded and every request in flight with that peer
    /// fails.
    #[error("message from AXL peer {} is not a valid frame: {error}", .from.short())]
    InvalidFrame {
        /// The sender as `/recv` reported it.
        from: AxlPeerId,
        /// Why decoding failed.
        error: FrameError,
    },

    /// `/topology` answered something that is not the expected JSON.
    #[error("AXL daemon's /topology answer is not understood: {reason}")]
    InvalidTopology {
        /// The JSON parser's message.
        reason: String,
    },
}

/// What an [`AxlInbox`](super::AxlInbox) reports besides frames. Each says which requests cannot go
/// on; other requests, and the inbox, continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InboxError {
    /// Frames of one request from one peer arrived with a gap or out of order: the daemon's queue
    /// dropped its oldest message when full, or two messages overtook each other. The request fails
    /// on this link (send an `error` frame with code `sequence`); later frames of it are discarded
    /// until its `end` arrives.
    #[error("{}", describe_sequence_error(.from, .request, .error))]
    Sequence {
        /// The sender as `/recv` reported it.
        from: AxlPeerId,
        /// The failed request.
        request: RequestId,
        /// The gap or step back.
        error: SequenceError,
    },

    /// A new request arrived while [`AxlInboxConfig::max_tracked_requests`] requests were already
    /// tracked; it fails (code `unavailable`) and its frames are discarded.
    ///
    /// [`AxlInboxConfig::max_tracked_requests`]: super::AxlInboxConfig::max_tracked_requests
    #[error(
        "request {request} from AXL peer {} refused: {limit} requests are already tracked",
        .from.short()
    )]
    TooManyRequests {
        /// The sender as `/recv` reported it.
        from: AxlPeerId,
        /// The refused request.
        request: RequestId,
        /// The configured limit.
        limit: usize,
    },

    /// A message from `from` was not a valid frame. It was discarded and, per docs/PROTOCOL.md §7,
    /// every request in flight with that peer failed (they may have lost a frame to it).
    #[error(
        "message from AXL peer {} is not a valid frame ({error}); {} request(s) in flight from it fail",
        .from.short(), .failed_requests.len()
    )]
    InvalidMessage {
        /// The sender as `/recv` reported it.
        from: AxlPeerId,
        /// Why decoding failed.
        error: FrameError,
        /// The requests that failed because of it, in id order.
        failed_requests: Vec<RequestId>,
    },

    /// Polling the daemon failed. Reported once when a run of failures starts (not on each retry);
    /// the inbox keeps polling.
    #[error("polling the AXL daemon failed: {0}")]
    Daemon(#[source] BridgeError),
}

impl InboxError {
    /// The one request this error fails, if it is about one.
    pub fn request(&self) -> Option<&RequestId> {
        match self {
            InboxError::Sequence { request, .. } | InboxError::TooManyRequests { request, .. } => Some(request),
            InboxError::InvalidMessage { .. } | InboxError::Daemon(_) => None,
        }
    }

    /// The peer whose messages caused it, if any.
    pub fn peer(&self) -> Option<&AxlPeerId> {
        match self {
            InboxError::Sequence { from, .. }
            | InboxError::TooManyRequests { from, .. }
            | InboxError::InvalidMessage { from, .. } => Some(from),
            InboxError::Daemon(_) => None,
        }
    }

    /// The code for the `error` frame that reports the failed request(s) towards the entry: lost or
    /// garbled frames are `sequence` (a retry may succeed), a full tracking table or an unreachable
    /// daemon `unavailable`.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            InboxError::Sequence { .. } | InboxError::InvalidMessage { .. } => ErrorCode::Sequence,
            InboxError::TooManyRequests { .. } | InboxError::Daemon(_) => ErrorCode::Unavailable,
        }
    }
}

fn describe_sequence_error(from: &AxlPeerId, request: &RequestId, error: &SequenceError) -> String {
    let peer = from.short();
    match *error {
        SequenceError::Dropped { expected, got } => format!(
            "request {request} from AXL peer {peer}: frame {got} arrived while {expected} was expected; \
             {} frame(s) were dropped or reordered by the AXL daemon (its receive queue drops the oldest \
             message when full), so the request fails instead of computing on missing data",
            got - expected
        ),
        SequenceError::Reordered { expected, got } => format!(
            "request {request} from AXL peer {peer}: frame {got} arrived while {expected} was expected; \
             the AXL daemon reordered or duplicated it, so the request fails instead of computing on \
             out-of-order data"
        ),
        SequenceError::Exhausted => {
            format!("request {request} from AXL peer {peer}: its sequence numbers are exhausted")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> AxlPeerId {
        AxlPeerId::from_bytes([0xab; 32])
    }

    fn rid(s: &str) -> RequestId {
        RequestId::new(s).expect("test id is valid")
    }

    #[test]
    fn sequence_errors_name_the_frame_request_and_peer() {
        let dropped = InboxError::Sequence {
            from: peer(),
            request: rid("req-1"),
            error: SequenceError::Dropped { expected: 2, got: 3 },
        };
        let text = dropped.to_string();
        assert!(
            text.starts_with("request req-1 from AXL peer abababab…: frame 3 arrived while 2 was expected"),
            "{text}"
        );
        assert!(text.contains("dropped or reordered by the AXL daemon"), "{text}");
        let reordered = InboxError::Sequence {
            from: peer(),
            request: rid("req-1"),
            error: SequenceError::Reordered { expected: 2, got: 1 },
        };
        assert!(reordered.to_string().contains("reordered or duplicated"), "{reordered}");
        assert_eq!(dropped.request(), Some(&rid("req-1")));
        assert_eq!(dropped.peer(), Some(&peer()));
        assert_eq!(dropped.error_code(), ErrorCode::Sequence);
    }

    #[test]
    fn peer_wide_and_daemon_errors() {
        let invalid = InboxError::InvalidMessage {
            from: peer(),
            error: FrameError::Truncated { needed: 4, available: 2 },
            failed_requests: vec![rid("a"), rid("b")],
        };
        assert_eq!(invalid.request(), None);
        assert!(invalid.to_string().contains("2 request(s) in flight"), "{invalid}");
        let daemon = InboxError::Daemon(BridgeError::Unreachable { endpoint: "/recv", reason: "refused".into() });
        assert_eq!(daemon.peer(), None);
        assert_eq!(daemon.error_code(), ErrorCode::Unavailable);
        let too_large = BridgeError::MessageTooLarge { len: 20, max: 10 };
        assert!(too_large.to_string().contains("max_frame_len"), "{too_large}");
        assert!(BridgeError::MissingSender.to_string().contains("X-From-Peer-Id"));
    }
}
