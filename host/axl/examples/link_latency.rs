//! Where a pipeline hop's time goes: round trips of a decode step's frames over the real transport,
//! beside plain UDP, on loopback.
//!
//! Two peers, each on its own single-threaded runtime and OS thread (as two worker processes would be),
//! wired as a two-shard ring: A dials B and streams activation frames to it (one bf16 row of a
//! 576-wide model, as SmolLM2's entry sends per decode step); B dials A and streams one token frame back
//! per activation frame. Three figures per run:
//! - `udp`: the same byte counts over two plain UDP sockets (the kernel's loopback floor);
//! - `quic`: the ring above, frames handled on the runtime threads;
//! - `quic+compute-thread`: as a worker does it, each received frame crosses a channel to a separate
//!   compute thread, which hands its reply back to the runtime through another channel.
//!
//! With GAP_US, both peers sit idle that long before each round trip, as between a pipeline's decode
//! steps (where a woken thread costs more than a hot one: on a VM an idle vCPU halts).
//!
//!     cargo run --release -p computepool-axl --example link_latency [-- ROUND_TRIPS [GAP_US]]

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use computepool_axl::frame::{ActivationsHeader, DType, Frame, FrameLimits, RequestId, TokenHeader};
use computepool_axl::transport::{FRAMES_ALPN, FrameReader, FrameWriter, SecretKey, Transport, TransportConfig};
use tokio::sync::mpsc;

const HIDDEN: u64 = 576;

fn activation(seq: u64) -> Frame {
    let header = ActivationsHeader {
        request: RequestId::new("probe").expect("a valid id"),
        seq,
        dtype: DType::Bf16,
        rows: 1,
        hidden: HIDDEN,
        start_pos: seq,
        last_chunk: true,
    };
    Frame::activations(header, vec![0x3f; (HIDDEN * 2) as usize])
}

fn token(seq: u64) -> Frame {
    Frame::token(TokenHeader {
        request: RequestId::new("probe").expect("a valid id"),
        seq,
        tokens: vec![(seq % 49_152) as u32],
        finish: None,
    })
}

fn summary(name: &str, mut rtts: Vec<Duration>) {
    rtts.sort();
    let q = |p: f64| rtts[((rtts.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e6;
    println!(
        "{name:>20}: round trip median {:7.1} µs  p10 {:7.1}  p90 {:7.1}  p99 {:7.1}  ({} round trips)",
        q(0.5),
        q(0.1),
        q(0.9),
        q(0.99),
        rtts.len()
    );
}

fn udp(round_trips: usize, gap: Duration) -> Vec<Duration> {
    let a = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let b = UdpSocket::bind("127.0.0.1:0").expect("bind");
    a.connect(b.local_addr().expect("addr")).expect("connect");
    b.connect(a.local_addr().expect("addr")).expect("connect");
    let request_len = activation(0).encode(&FrameLimits::DEFAULT).expect("encodes").prefix_and_header().len()
        + (HIDDEN * 2) as usize;
    let reply_len = token(0).encode(&FrameLimits::DEFAULT).expect("encodes").prefix_and_header().len();
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        for _ in 0..round_trips + 100 {
            b.recv(&mut buf).expect("recv");
            b.send(&vec![0u8; reply_len]).expect("send");
        }
    });
    let mut buf = vec![0u8; 65536];
    let payload = vec![0u8; request_len];
    let mut out = Vec::with_capacity(round_trips);
    for i in 0..round_trips + 100 {
        std::thread::sleep(gap);
        let t = Instant::now();
        a.send(&payload).expect("send");
        a.recv(&mut buf).expect("recv");
        if i >= 100 {
            out.push(t.elapsed());
        }
    }
    echo.join().expect("echo thread");
    out
}

/// Runs `f` on a fresh single-threaded runtime on its own OS thread.
fn on_own_runtime<F, T>(f: F) -> std::thread::JoinHandle<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f)
    })
}

async fn bind() -> Transport {
    let mut config = TransportConfig::new(SecretKey::generate());
    config.bind = vec!["127.0.0.1:0".parse().expect("address")];
    Transport::bind(config).await.expect("bind on loopback")
}

fn quic(round_trips: usize, gap: Duration, via_compute_thread: bool) -> Vec<Duration> {
    type Address = (computepool_axl::transport::PeerId, Vec<std::net::SocketAddr>);
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<Address>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Address>();
    // B: accepts A's stream, answers every activation frame with a token frame on its own stream to A.
    let b = on_own_runtime(async move {
        let b = bind().await;
        addr_tx.send((b.id(), b.bound_addrs())).expect("send address");
        let (a_id, a_addrs) = back_rx.recv().expect("A's address");
        let conn_in = b.accept(|_, alpn| if alpn == FRAMES_ALPN { Ok(()) } else { Err("alpn".into()) }).await.expect("A dials");
        let conn_out = b.connect(a_id, &a_addrs, None, FRAMES_ALPN).await.expect("dial A");
        let mut writer = FrameWriter::new(conn_out.open_uni().await.expect("open"), FrameLimits::DEFAULT);
        let mut reader = FrameReader::new(conn_in.accept_uni().await.expect("accept"), FrameLimits::DEFAULT);
        let (job_tx, reply_rx, compute) = compute_thread(via_compute_thread);
        let mut reply_rx = reply_rx;
        while let Some(frame) = reader.next().await.expect("frame") {
            let seq = frame.header.seq().unwrap_or(0);
            let reply = match &job_tx {
                Some(tx) => {
                    tx.send(seq).await.expect("to compute");
                    reply_rx.as_mut().expect("paired").recv().await.expect("from compute")
                }
                None => token(seq),
            };
            writer.send(&reply).await.expect("reply");
        }
        drop(job_tx);
        if let Some(c) = compute {
            c.join().expect("compute thread");
        }
        // Keep the connections open until A has read the last reply.
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.close().await;
    });
    let a = on_own_runtime(async move {
        let a = bind().await;
        let (b_id, b_addrs) = addr_rx.recv().expect("B's address");
        back_tx.send((a.id(), a.bound_addrs())).expect("send address");
        let conn_out = a.connect(b_id, &b_addrs, None, FRAMES_ALPN).await.expect("dial B");
        let mut writer = FrameWriter::new(conn_out.open_uni().await.expect("open"), FrameLimits::DEFAULT);
        // The stream is only announced to B with its first bytes: send the first frame before accepting.
        let mut out = Vec::with_capacity(round_trips);
        writer.send(&activation(0)).await.expect("send");
        let conn_in = a.accept(|_, alpn| if alpn == FRAMES_ALPN { Ok(()) } else { Err("alpn".into()) }).await.expect("B dials");
        let mut reader = FrameReader::new(conn_in.accept_uni().await.expect("accept"), FrameLimits::DEFAULT);
        reader.next().await.expect("frame").expect("a reply");
        for i in 1..round_trips + 100 {
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            let t = Instant::now();
            writer.send(&activation(i as u64)).await.expect("send");
            reader.next().await.expect("frame").expect("a reply");
            if i >= 100 {
                out.push(t.elapsed());
            }
        }
        writer.finish().await.expect("finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.close().await;
        out
    });
    b.join().expect("B");
    a.join().expect("A")
}

type ComputeParts = (Option<mpsc::Sender<u64>>, Option<mpsc::Receiver<Frame>>, Option<std::thread::JoinHandle<()>>);

/// A worker's compute thread, minus the compute: receives a job with `blocking_recv`, answers with
/// `blocking_send`, exactly the handoffs of host/node's engine loop.
fn compute_thread(enabled: bool) -> ComputeParts {
    if !enabled {
        return (None, None, None);
    }
    let (job_tx, mut job_rx) = mpsc::channel::<u64>(64);
    let (reply_tx, reply_rx) = mpsc::channel::<Frame>(64);
    let handle = std::thread::spawn(move || {
        while let Some(seq) = job_rx.blocking_recv() {
            if reply_tx.blocking_send(token(seq)).is_err() {
                break;
            }
        }
    });
    (Some(job_tx), Some(reply_rx), Some(handle))
}

fn main() {
    let mut args = std::env::args().skip(1);
    let round_trips = args.next().map(|s| s.parse().expect("ROUND_TRIPS is a number")).unwrap_or(2000);
    let gap = Duration::from_micros(args.next().map(|s| s.parse().expect("GAP_US is a number")).unwrap_or(0));
    println!(
        "loopback, one bf16 activation row of {HIDDEN} out, one token frame back, per round trip; \
         {} µs idle before each",
        gap.as_micros()
    );
    summary("udp", udp(round_trips, gap));
    summary("quic", quic(round_trips, gap, false));
    summary("quic+compute-thread", quic(round_trips, gap, true));
}
