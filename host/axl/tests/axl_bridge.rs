//! The AXL bridge end to end against stand-in daemons on loopback: frames between nodes, the
//! drop-oldest queue and what the inbox makes of lost, reordered and garbled messages.

use std::time::Duration;

use computepool_axl::bridge::standin::{StandinConfig, StandinNetwork, StandinNode};
use computepool_axl::bridge::{
    AxlClient, AxlClientConfig, AxlInbox, AxlInboxConfig, AxlPeerId, BridgeError, InboxError, InboxItem, PeerIdError,
};
use computepool_axl::frame::{
    ActivationsHeader, ControlHeader, DType, ErrorCode, Frame, FrameError, FrameHeader, FrameLimits, RequestId,
    SamplingHeader, SequenceError, TokenHeader,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(10);

fn rid(s: &str) -> RequestId {
    RequestId::new(s).expect("test id is valid")
}

/// An f32 activations frame whose `rows` rows of `hidden` values all hold `seq`, so a frame that
/// arrives under the wrong number is visible in its payload too.
fn activations(request: &str, seq: u64, rows: u64, hidden: u64) -> Frame {
    let header = ActivationsHeader {
        request: rid(request),
        seq,
        dtype: DType::F32,
        rows,
        hidden,
        start_pos: seq,
        last_chunk: true,
    };
    let payload = (seq as f32).to_le_bytes().repeat((rows * hidden) as usize);
    Frame::activations(header, payload)
}

fn token(request: &str, seq: u64) -> Frame {
    Frame::token(TokenHeader { request: rid(request), seq, tokens: vec![1000 + seq as u32], finish: None })
}

async fn two_nodes() -> (StandinNetwork, StandinNode, StandinNode) {
    let network = StandinNetwork::new();
    let a = network.start_node().await.expect("node a starts");
    let b = network.start_node().await.expect("node b starts");
    (network, a, b)
}

async fn next(inbox: &mut AxlInbox) -> InboxItem {
    tokio::time::timeout(WAIT, inbox.recv()).await.expect("an item within the wait").expect("inbox open")
}

async fn next_frame(inbox: &mut AxlInbox) -> (AxlPeerId, Frame) {
    match next(inbox).await {
        Ok(item) => item,
        Err(error) => panic!("expected a frame, got: {error}"),
    }
}

async fn assert_quiet(inbox: &mut AxlInbox) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(150), inbox.recv()).await {
        panic!("expected nothing, got {item:?}");
    }
}

/// One raw HTTP/1.1 exchange, to check the stand-in without the bridge's own client.
async fn raw_http(node: &StandinNode, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(node.local_addr()).await.expect("connects");
    stream.write_all(request.as_bytes()).await.expect("writes");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await.expect("answers").expect("reads");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn frames_round_trip_between_two_standin_nodes() {
    let (_network, a, b) = two_nodes().await;
    let start = Frame {
        header: FrameHeader::Control(ControlHeader::Start {
            request: rid("req-1"),
            seq: 0,
            sampling: SamplingHeader { temperature: 0.7, top_k: 40, top_p: 0.9, seed: 7, ..SamplingHeader::default() },
            route: None,
            resumed: None,
        }),
        payload: Vec::new(),
    };
    let frames = vec![
        start,
        // 4 MiB of activations: over axum's default 2 MB body limit, under the daemon's 16 MiB.
        activations("req-1", 1, 1024, 1024),
        token("req-1", 2),
        Frame::error(rid("req-1"), 3, ErrorCode::Unavailable, "shard 2 is unloading"),
        Frame::end(rid("req-1"), 4),
        Frame::unload(),
    ];
    let (sender, receiver) = (a.client(), b.client());
    for frame in &frames {
        sender.send(b.peer_id(), frame).await.expect("sends");
    }
    for frame in &frames {
        let (from, received) = receiver.recv().await.expect("receives").expect("a message is waiting");
        assert_eq!(&received, frame);
        // The daemon names the sender by its address-derived key, which is not the full key.
        assert_eq!(from, a.peer_id().reported_form());
        assert_ne!(&from, a.peer_id());
        assert!(from.same_node(a.peer_id()) && !from.same_node(b.peer_id()));
    }
    assert_eq!(receiver.recv().await.expect("receives"), None);
    // Replying to the reported sender id reaches it, as with the real daemon.
    receiver.send(&a.peer_id().reported_form(), &token("req-9", 0)).await.expect("replies");
    let (from, reply) = sender.recv().await.expect("receives").expect("the reply is waiting");
    assert_eq!((from, reply), (b.peer_id().reported_form(), token("req-9", 0)));
}

#[tokio::test]
async fn an_empty_queue_answers_204() {
    let (_network, a, _b) = two_nodes().await;
    assert_eq!(a.client().recv().await.expect("polls"), None);
    let answer = raw_http(&a, "GET /recv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    assert!(!answer.to_ascii_lowercase().contains("x-from-peer-id"), "{answer}");
}

#[tokio::test]
async fn the_full_queue_drops_the_oldest_and_only_that_request_fails() {
    let (_network, a, b) = two_nodes().await;
    let sender = a.client();
    // 101 messages into the 100-slot queue: the first, req-1's frame 0, is evicted.
    sender.send(b.peer_id(), &activations("req-1", 0, 2, 4)).await.expect("sends");
    for seq in 0..100 {
        sender.send(b.peer_id(), &activations("req-2", seq, 2, 4)).await.expect("sends");
    }
    assert_eq!((b.queued(), b.overflow_drops()), (100, 1));

    let mut inbox = AxlInbox::spawn(b.client(), AxlInboxConfig::default());
    for seq in 0..100 {
        let (from, frame) = next_frame(&mut inbox).await;
        assert_eq!(from, a.peer_id().reported_form());
        assert_eq!(frame, activations("req-2", seq, 2, 4), "req-2 frame {seq} intact and in order");
    }
    sender.send(b.peer_id(), &activations("req-1", 1, 2, 4)).await.expect("sends");
    sender.send(b.peer_id(), &activations("req-2", 100, 2, 4)).await.expect("sends");
    sender.send(b.peer_id(), &activations("req-1", 2, 2, 4)).await.expect("sends");
    sender.send(b.peer_id(), &Frame::end(rid("req-1"), 3)).await.expect("sends");
    sender.send(b.peer_id(), &activations("req-2", 101, 2, 4)).await.expect("sends");

    let error = next(&mut inbox).await.expect_err("req-1 lost its frame 0");
    assert_eq!(
        error,
        InboxError::Sequence {
            from: a.peer_id().reported_form(),
            request: rid("req-1"),
            error: SequenceError::Dropped { expected: 0, got: 1 },
        }
    );
    assert_eq!(error.error_code(), ErrorCode::Sequence);
    let message = error.to_string();
    assert!(
        message.contains("request req-1") && message.contains("dropped or reordered by the AXL daemon"),
        "{message}"
    );
    assert_eq!(next_frame(&mut inbox).await.1, activations("req-2", 100, 2, 4));
    // req-1's frame 2 is discarded, not delivered as if nothing had happened; its end still is.
    assert_eq!(next_frame(&mut inbox).await.1, Frame::end(rid("req-1"), 3));
    assert_eq!(next_frame(&mut inbox).await.1, activations("req-2", 101, 2, 4));
    assert_quiet(&mut inbox).await;
    assert_eq!(inbox.tracked_requests(), 1, "req-1 freed by its end, req-2 still in flight");
}

#[tokio::test]
async fn a_reordered_pair_fails_its_request() {
    let (_network, a, b) = two_nodes().await;
    b.reorder_arrival(1); // req-1's frame 1 swaps places with the next arrival, its frame 2
    let mut inbox = AxlInbox::spawn(b.client(), AxlInboxConfig::default());
    let sender = a.client();
    for seq in 0..3 {
        sender.send(b.peer_id(), &token("req-1", seq)).await.expect("sends");
    }
    sender.send(b.peer_id(), &token("req-2", 0)).await.expect("sends");

    assert_eq!(next_frame(&mut inbox).await.1, token("req-1", 0));
    let error = next(&mut inbox).await.expect_err("frame 2 overtook frame 1");
    assert_eq!(error.request(), Some(&rid("req-1")));
    assert!(
        matches!(error, InboxError::Sequence { error: SequenceError::Dropped { expected: 1, got: 2 }, .. }),
        "{error}"
    );
    // The late frame 1 is not passed on; the other request is unaffected.
    assert_eq!(next_frame(&mut inbox).await.1, token("req-2", 0));
    assert_quiet(&mut inbox).await;
}

#[tokio::test]
async fn a_duplicated_frame_is_reported_as_reordered() {
    let (_network, a, b) = two_nodes().await;
    let mut inbox = AxlInbox::spawn(b.client(), AxlInboxConfig::default());
    let sender = a.client();
    for seq in [0, 1, 1] {
        sender.send(b.peer_id(), &token("req-1", seq)).await.expect("sends");
    }
    assert_eq!(next_frame(&mut inbox).await.1, token("req-1", 0));
    assert_eq!(next_frame(&mut inbox).await.1, token("req-1", 1));
    let error = next(&mut inbox).await.expect_err("frame 1 came twice");
    assert!(
        matches!(error, InboxError::Sequence { error: SequenceError::Reordered { expected: 2, got: 1 }, .. }),
        "{error}"
    );
}

#[tokio::test]
async fn a_dropped_message_fails_its_request() {
    let (_network, a, b) = two_nodes().await;
    b.drop_arrival(1);
    let mut inbox = AxlInbox::spawn(b.client(), AxlInboxConfig::default());
    for seq in 0..3 {
        a.client().send(b.peer_id(), &activations("req-1", seq, 1, 8)).await.expect("sends");
    }
    assert_eq!(next_frame(&mut inbox).await.1, activations("req-1", 0, 1, 8));
    let error = next(&mut inbox).await.expect_err("frame 1 vanished");
    assert!(
        matches!(error, InboxError::Sequence { error: SequenceError::Dropped { expected: 1, got: 2 }, .. }),
        "{error}"
    );
    assert_eq!(b.arrivals(), 3);
}

#[tokio::test]
async fn a_non_frame_body_is_a_typed_error_naming_its_sender() {
    let network = StandinNetwork::new();
    let (a, b, c) = (
        network.start_node().await.expect("starts"),
        network.start_node().await.expect("starts"),
        network.start_node().await.expect("starts"),
    );
    // The client alone: the error names the sender, the message is gone, the next one is fine.
    b.inject(a.peer_id(), &b"not a frame"[..]);
    a.client().send(b.peer_id(), &token("req-0", 0)).await.expect("sends");
    let receiver = b.client();
    match receiver.recv().await {
        Err(BridgeError::InvalidFrame { from, error: FrameError::HeaderTooLong { .. } }) => {
            assert_eq!(from, a.peer_id().reported_form());
        }
        other => panic!("expected InvalidFrame, got {other:?}"),
    }
    assert_eq!(receiver.recv().await.expect("receives").map(|(_, f)| f), Some(token("req-0", 0)));
    // A valid prefix and header but a short payload.
    let mut cut = activations("req-0", 1, 2, 2).to_bytes(&FrameLimits::DEFAULT).expect("encodes");
    cut.pop();
    b.inject(a.peer_id(), cut);
    assert!(matches!(
        receiver.recv().await,
        Err(BridgeError::InvalidFrame { error: FrameError::PayloadLengthMismatch { declared: 16, actual: 15 }, .. })
    ));

    // Through the inbox: every request in flight from that sender fails, others go on.
    let mut inbox = AxlInbox::spawn(b.client(), AxlInboxConfig::default());
    a.client().send(b.peer_id(), &token("req-a", 0)).await.expect("sends");
    assert_eq!(next_frame(&mut inbox).await.1, token("req-a", 0));
    b.inject(a.peer_id(), vec![0xff; 3]);
    c.client().send(b.peer_id(), &token("req-c", 0)).await.expect("sends");
    a.client().send(b.peer_id(), &token("req-a", 1)).await.expect("sends");
    a.client().send(b.peer_id(), &token("req-a2", 0)).await.expect("sends");
    match next(&mut inbox).await {
        Err(InboxError::InvalidMessage { from, error: FrameError::Truncated { .. }, failed_requests }) => {
            assert_eq!(from, a.peer_id().reported_form());
            assert_eq!(failed_requests, vec![rid("req-a")]);
        }
        other => panic!("expected InvalidMessage, got {other:?}"),
    }
    let (from, frame) = next_frame(&mut inbox).await;
    assert_eq!((from, frame), (c.peer_id().reported_form(), token("req-c", 0)));
    // req-a's frame 1 is discarded (req-a failed); a new request from the same sender flows.
    assert_eq!(next_frame(&mut inbox).await.1, token("req-a2", 0));
    assert_quiet(&mut inbox).await;
}

#[tokio::test]
async fn oversized_messages_get_typed_errors() {
    let network = StandinNetwork::new();
    let a = network.start_node().await.expect("starts");
    let frame = activations("req-1", 0, 64, 256); // 64 KiB of payload
    let frame_len = frame.to_bytes(&FrameLimits::DEFAULT).expect("encodes").len() as u64;
    let small = StandinConfig { max_message_size: frame_len, ..StandinConfig::default() };
    let b = network.start_node_with(small).await.expect("starts");

    // Over the frame limit: refused before any I/O.
    let tight_frames = AxlClientConfig {
        frame_limits: FrameLimits::DEFAULT.with_max_frame_len(1024),
        ..AxlClientConfig::with_base_url(a.base_url())
    };
    let error = AxlClient::new(tight_frames).expect("valid").send(b.peer_id(), &frame).await.unwrap_err();
    assert!(matches!(error, BridgeError::Encode(FrameError::FrameTooLarge { max: 1024, .. })), "{error}");

    // Within the frame limit but over the daemon's message size: refused before any I/O.
    let tight_messages =
        AxlClientConfig { max_message_size: frame_len - 1, ..AxlClientConfig::with_base_url(a.base_url()) };
    let error = AxlClient::new(tight_messages).expect("valid").send(b.peer_id(), &frame).await.unwrap_err();
    assert_eq!(error, BridgeError::MessageTooLarge { len: frame_len, max: frame_len - 1 });

    // Exactly the destination's limit passes; more gets the stand-in's 413 (the real daemon would
    // drop it silently at the destination).
    a.client().send(b.peer_id(), &frame).await.expect("a message of exactly max_message_size passes");
    let bigger = activations("req-1", 1, 65, 256);
    match a.client().send(b.peer_id(), &bigger).await {
        Err(BridgeError::Daemon { endpoint: "/send", status: 413, message }) => {
            assert!(message.contains("max_message_size"), "{message}");
        }
        other => panic!("expected 413 from the stand-in, got {other:?}"),
    }
    // Over the sending node's own limit: its HTTP layer refuses the body.
    match b.client().send(a.peer_id(), &activations("req-1", 1, 4096, 256)).await {
        Err(BridgeError::Daemon { endpoint: "/send", status: 413, .. }) => {}
        other => panic!("expected 413 from the stand-in, got {other:?}"),
    }
    assert_eq!((a.arrivals(), b.arrivals()), (0, 1));

    // Receiving: a message longer than the receiver's frame limit is refused without reading it.
    b.inject(a.peer_id(), vec![0; 4096]);
    let receiver = b.client();
    assert_eq!(receiver.recv().await.expect("the first message is fine").map(|(_, f)| f), Some(frame));
    let tight_receiver = AxlClientConfig {
        frame_limits: FrameLimits::DEFAULT.with_max_frame_len(1024),
        ..AxlClientConfig::with_base_url(b.base_url())
    };
    match AxlClient::new(tight_receiver).expect("valid").recv().await {
        Err(BridgeError::InvalidFrame { error: FrameError::FrameTooLarge { len: 4096, max: 1024 }, .. }) => {}
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_and_unknown_peer_ids_are_rejected() {
    let (_network, a, b) = two_nodes().await;
    assert_eq!(AxlPeerId::parse("ab12"), Err(PeerIdError::WrongLength { len: 4 }));
    let not_hex = format!("{}x", &b.peer_id().to_hex()[..63]);
    assert_eq!(AxlPeerId::parse(&not_hex), Err(PeerIdError::NotHex { position: 63, character: 'x' }));
    assert_eq!(AxlPeerId::parse(&b.peer_id().to_hex().to_uppercase()).as_ref(), Ok(b.peer_id()));

    // The stand-in refuses what the daemon refuses.
    let missing =
        raw_http(&a, "POST /send HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx").await;
    assert!(missing.starts_with("HTTP/1.1 400"), "{missing}");
    let bad = format!(
        "POST /send HTTP/1.1\r\nHost: x\r\nX-Destination-Peer-Id: {not_hex}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
    );
    let answer = raw_http(&a, &bad).await;
    assert!(answer.starts_with("HTTP/1.1 400") && answer.contains("Invalid destination peer ID"), "{answer}");

    // A well-formed id of no node: 502, like a peer the daemon cannot reach.
    let stranger = AxlPeerId::from_bytes([0x5a; 32]);
    match a.client().send(&stranger, &token("req-1", 0)).await {
        Err(BridgeError::Daemon { status: 502, message, .. }) => {
            assert!(message.contains("Failed to reach peer"), "{message}")
        }
        other => panic!("expected 502, got {other:?}"),
    }
    // So is a node that stopped.
    let gone = *b.peer_id();
    drop(b);
    assert!(matches!(a.client().send(&gone, &token("req-1", 0)).await, Err(BridgeError::Daemon { status: 502, .. })));
}

#[tokio::test]
async fn end_frees_tracking_state() {
    let (_network, a, b) = two_nodes().await;
    let mut inbox = AxlInbox::spawn(b.client(), AxlInboxConfig::default());
    let sender = a.client();
    for request in ["req-1", "req-2", "req-3"] {
        sender.send(b.peer_id(), &token(request, 0)).await.expect("sends");
        next_frame(&mut inbox).await;
    }
    assert_eq!(inbox.tracked_requests(), 3);
    sender.send(b.peer_id(), &Frame::end(rid("req-1"), 1)).await.expect("sends");
    assert_eq!(next_frame(&mut inbox).await.1, Frame::end(rid("req-1"), 1));
    assert_eq!(inbox.tracked_requests(), 2);
    // An end after a gap still ends the request, right after the gap is reported (frames 1 to 6 of
    // req-2 never came: a request stalled by a lost frame learns it when its entry ends it).
    sender.send(b.peer_id(), &Frame::end(rid("req-2"), 7)).await.expect("sends");
    match next(&mut inbox).await {
        Err(InboxError::Sequence { request, error: SequenceError::Dropped { expected: 1, got: 7 }, .. }) => {
            assert_eq!(request, rid("req-2"))
        }
        other => panic!("expected the gap before the end, got {other:?}"),
    }
    assert_eq!(next_frame(&mut inbox).await.1, Frame::end(rid("req-2"), 7));
    assert_eq!(inbox.tracked_requests(), 1);
    // A frame of an ended request arriving late is discarded and starts no new tracker.
    sender.send(b.peer_id(), &token("req-1", 1)).await.expect("sends");
    assert_quiet(&mut inbox).await;
    assert_eq!(inbox.tracked_requests(), 1);
    // A request the worker abandons is forgotten on demand.
    assert!(inbox.forget(&a.peer_id().reported_form(), &rid("req-3")));
    assert_eq!(inbox.tracked_requests(), 0);
    // unload closes whatever the sender still had open.
    sender.send(b.peer_id(), &token("req-4", 0)).await.expect("sends");
    next_frame(&mut inbox).await;
    sender.send(b.peer_id(), &Frame::unload()).await.expect("sends");
    assert_eq!(next_frame(&mut inbox).await.1, Frame::unload());
    assert_eq!(inbox.tracked_requests(), 0);
}

#[tokio::test]
async fn topology_reports_the_node_and_its_peers() {
    let (_network, a, b) = two_nodes().await;
    let topology = a.client().topology().await.expect("reads");
    assert_eq!(&topology.our_public_key, a.peer_id());
    assert_eq!(Some(topology.our_ipv6.parse().expect("an IPv6 address")), a.peer_id().yggdrasil_address());
    let peers: Vec<_> = topology.peers.iter().filter_map(|p| p.public_key).collect();
    assert_eq!(peers, vec![*b.peer_id()]);
}

#[tokio::test]
async fn an_unreachable_daemon_is_a_typed_error_and_the_inbox_keeps_trying() {
    // A port that was just free: nothing listens there.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        listener.local_addr().expect("bound").port()
    };
    let config = AxlClientConfig {
        request_timeout: Duration::from_secs(2),
        ..AxlClientConfig::with_base_url(format!("http://127.0.0.1:{port}"))
    };
    let client = AxlClient::new(config).expect("valid");
    assert!(matches!(client.recv().await, Err(BridgeError::Unreachable { endpoint: "/recv", .. })));
    assert!(matches!(client.topology().await, Err(BridgeError::Unreachable { endpoint: "/topology", .. })));
    let mut inbox = AxlInbox::spawn(client, AxlInboxConfig::default());
    let error = next(&mut inbox).await.expect_err("the daemon is down");
    assert!(matches!(error, InboxError::Daemon(BridgeError::Unreachable { .. })), "{error}");
    assert_eq!(error.error_code(), ErrorCode::Unavailable);
    // Reported once per outage, not on every retry.
    assert_quiet(&mut inbox).await;
}
