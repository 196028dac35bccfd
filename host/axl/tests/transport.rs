//! The QUIC transport on loopback: frames cross a real encrypted link in order, hostile bytes cost the
//! sender its connection (not the receiver its process), and strangers are refused.

use std::time::Duration;

use computepool_axl::frame::{ActivationsHeader, DType, Frame, FrameLimits, RequestId};
use computepool_axl::transport::{
    FRAMES_ALPN, FrameReader, FrameWriter, LinkError, PeerId, RelayAccess, RelayServer, Relays, SecretKey, Transport,
    TransportConfig, describe_close,
};

async fn endpoint(key: &SecretKey) -> Transport {
    let mut config = TransportConfig::new(key.clone());
    config.bind = vec!["127.0.0.1:0".parse().expect("address")];
    Transport::bind(config).await.expect("bind on loopback")
}

/// An endpoint on loopback whose home relay is `relay`.
async fn relayed_endpoint(key: &SecretKey, relay: &RelayServer) -> Transport {
    let mut config = TransportConfig::new(key.clone());
    config.bind = vec!["127.0.0.1:0".parse().expect("address")];
    config.relays = Relays::Custom(vec![relay.url().clone()]);
    Transport::bind(config).await.expect("bind on loopback")
}

/// As [`relayed_endpoint`], once it holds its connection to the relay (where its peers look for it).
async fn relayed_endpoint_online(key: &SecretKey, relay: &RelayServer) -> Transport {
    let endpoint = relayed_endpoint(key, relay).await;
    endpoint.wait_for_relay(Duration::from_secs(20)).await.expect("connected to the relay");
    endpoint
}

fn frame(seq: u64) -> Frame {
    let header = ActivationsHeader {
        request: RequestId::new("req-1").expect("id"),
        seq,
        dtype: DType::F32,
        rows: 1 + seq % 5,
        hidden: 64,
        start_pos: seq,
        last_chunk: true,
    };
    let len = (header.rows * 64 * 4) as usize;
    Frame::activations(header, (0..len).map(|i| (i as u64 + seq) as u8).collect())
}

/// Accepts connections from `allowed` only; returns each accepted connection's frames (or the error
/// that ended its stream) through a channel.
fn serve(receiver: Transport, allowed: PeerId) -> tokio::sync::mpsc::UnboundedReceiver<Result<Vec<Frame>, String>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let allow = move |peer: &PeerId, alpn: &[u8]| {
            if *peer == allowed && alpn == FRAMES_ALPN { Ok(()) } else { Err("unknown peer: not in this pool's topology".into()) }
        };
        while let Some(conn) = receiver.accept(&allow).await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = async {
                    let recv = conn.accept_uni().await.map_err(|e| describe_close(&e))?;
                    let mut reader = FrameReader::new(recv, FrameLimits::DEFAULT);
                    let mut frames = Vec::new();
                    loop {
                        match reader.next().await {
                            Ok(Some(f)) => frames.push(f),
                            Ok(None) => return Ok(frames),
                            Err(LinkError::Frame(e)) => {
                                conn.close(0x11u32.into(), e.to_string().as_bytes());
                                return Err(format!("bad frame: {e}"));
                            }
                            Err(e) => return Err(e.to_string()),
                        }
                    }
                }
                .await;
                let _ = tx.send(result);
            });
        }
    });
    rx
}

#[tokio::test]
async fn frames_cross_an_encrypted_link_in_order() {
    let (a_key, b_key) = (SecretKey::generate(), SecretKey::generate());
    let (a, b) = (endpoint(&a_key).await, endpoint(&b_key).await);
    let mut results = serve(b.clone(), a.id());
    let conn = a.connect(b.id(), &b.bound_addrs(), None, FRAMES_ALPN).await.expect("connect");
    assert_eq!(conn.remote_id(), b.id(), "the handshake proves the peer's key");
    let mut writer = FrameWriter::new(conn.open_uni().await.expect("stream"), FrameLimits::DEFAULT);
    let sent: Vec<Frame> = (0..200).map(frame).collect();
    for f in &sent {
        writer.send(f).await.expect("send");
    }
    writer.finish().await.expect("finish");
    let got = tokio::time::timeout(Duration::from_secs(10), results.recv()).await.expect("in time").expect("result");
    assert_eq!(got.expect("clean stream"), sent);
}

#[tokio::test]
async fn hostile_bytes_drop_the_connection_and_the_receiver_keeps_serving() {
    let (a_key, b_key) = (SecretKey::generate(), SecretKey::generate());
    let (a, b) = (endpoint(&a_key).await, endpoint(&b_key).await);
    let mut results = serve(b.clone(), a.id());

    // A valid frame, then a header that claims a 1 GiB payload.
    let conn = a.connect(b.id(), &b.bound_addrs(), None, FRAMES_ALPN).await.expect("connect");
    let mut stream = conn.open_uni().await.expect("stream");
    stream.write_all(&frame(0).to_bytes(&FrameLimits::DEFAULT).expect("encode")).await.expect("write");
    let header = br#"{"v":1,"kind":"activations","request":"r","seq":1,"dtype":"f32","shape":[268435456,1],"start_pos":1,"last_chunk":true,"payload_len":1073741824}"#;
    stream.write_all(&(header.len() as u32).to_le_bytes()).await.expect("write");
    stream.write_all(header).await.expect("write");
    let err = tokio::time::timeout(Duration::from_secs(10), results.recv()).await.expect("in time").expect("result");
    let err = err.expect_err("the oversized frame is refused");
    assert!(err.contains("bad frame"), "{err}");
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("closed in time");
    assert!(describe_close(&closed).contains("frame"), "the sender learns why: {}", describe_close(&closed));

    // A version from the future on a new connection: refused the same way.
    let conn = a.connect(b.id(), &b.bound_addrs(), None, FRAMES_ALPN).await.expect("reconnect");
    let mut stream = conn.open_uni().await.expect("stream");
    let future = br#"{"v":2,"kind":"token","request":"r","seq":0,"tokens":[1],"payload_len":0}"#;
    stream.write_all(&(future.len() as u32).to_le_bytes()).await.expect("write");
    stream.write_all(future).await.expect("write");
    let err = results.recv().await.expect("result").expect_err("version 2 is refused");
    assert!(err.contains("version"), "{err}");

    // The receiver still serves well-behaved connections.
    let conn = a.connect(b.id(), &b.bound_addrs(), None, FRAMES_ALPN).await.expect("reconnect");
    let mut writer = FrameWriter::new(conn.open_uni().await.expect("stream"), FrameLimits::DEFAULT);
    writer.send(&frame(7)).await.expect("send");
    writer.finish().await.expect("finish");
    assert_eq!(results.recv().await.expect("result").expect("clean"), vec![frame(7)]);
}

#[tokio::test]
async fn a_peer_with_an_unknown_key_cannot_join() {
    let (a_key, b_key, stranger_key) = (SecretKey::generate(), SecretKey::generate(), SecretKey::generate());
    let (b, stranger) = (endpoint(&b_key).await, endpoint(&stranger_key).await);
    let mut results = serve(b.clone(), a_key.public());
    let conn = stranger.connect(b.id(), &b.bound_addrs(), None, FRAMES_ALPN).await.expect("the handshake itself completes");
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("refused in time");
    assert!(describe_close(&closed).contains("unknown peer"), "{}", describe_close(&closed));
    // Nothing reached the receiver's frame handling.
    assert!(tokio::time::timeout(Duration::from_millis(300), results.recv()).await.is_err());
}

/// A peer given no address at all, only the relay its peer keeps open, reaches it there; a peer the
/// relay does not admit (not in its pool) gets nothing through it.
#[tokio::test]
async fn a_peer_with_no_address_is_reached_through_the_pools_relay_and_strangers_are_not_relayed() {
    let (a_key, b_key, stranger_key) = (SecretKey::generate(), SecretKey::generate(), SecretKey::generate());
    let pool: std::collections::HashSet<PeerId> = [a_key.public(), b_key.public()].into();
    let relay = RelayServer::spawn("127.0.0.1:0".parse().expect("address"), None, RelayAccess::Only(pool))
        .await
        .expect("a relay on loopback");
    assert!(relay.url().as_str().starts_with("http://127.0.0.1:"), "{}", relay.url());
    let (a, b) = (relayed_endpoint(&a_key, &relay).await, relayed_endpoint_online(&b_key, &relay).await);
    let mut results = serve(b.clone(), a.id());

    let dial = a.connect(b.id(), &[], Some(relay.url()), FRAMES_ALPN);
    let conn = tokio::time::timeout(Duration::from_secs(20), dial).await.expect("dialled in time").expect("connect through the relay");
    assert_eq!(conn.remote_id(), b.id(), "the handshake proves the peer's key through the relay too");
    let mut writer = FrameWriter::new(conn.open_uni().await.expect("stream"), FrameLimits::DEFAULT);
    let sent: Vec<Frame> = (0..50).map(frame).collect();
    for f in &sent {
        writer.send(f).await.expect("send");
    }
    writer.finish().await.expect("finish");
    let got = tokio::time::timeout(Duration::from_secs(10), results.recv()).await.expect("in time").expect("result");
    assert_eq!(got.expect("clean stream"), sent);

    // The stranger knows b's id and relay, but the relay refuses it: no handshake ever completes
    // (b would accept the handshake and only then refuse, so a completed one would mean the relay let
    // it through).
    // It is told so when it tries to make the relay its home.
    let stranger = relayed_endpoint(&stranger_key, &relay).await;
    let refused = stranger.wait_for_relay(Duration::from_secs(10)).await.expect_err("the relay refuses a stranger");
    assert!(refused.to_string().contains("not in this relay's pool"), "{refused}");
    let dial = stranger.connect(b.id(), &[], Some(relay.url()), FRAMES_ALPN);
    match tokio::time::timeout(Duration::from_secs(5), dial).await {
        Err(_) | Ok(Err(_)) => {}
        Ok(Ok(conn)) => panic!("a stranger completed a handshake with {} through the pool's relay", conn.remote_id()),
    }
    relay.shutdown().await;
}
