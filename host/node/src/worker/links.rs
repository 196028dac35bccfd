//! A worker's two links: the downstream one it dials (and keeps dialling), and the upstream one it
//! accepts. Frames are numbered per request on each link here, on the way out, and checked on the way in.

use std::collections::HashMap;
use std::time::Duration;

use computepool_axl::frame::{ControlHeader, ErrorCode, Frame, FrameHeader, FrameLimits, RequestId, SequenceCounter};
use computepool_axl::transport::{FRAMES_ALPN, FrameWriter, ShardPeer, Transport, describe_close};
use tokio::sync::{mpsc, watch};

/// What the compute thread and the request handlers hand to the downstream link.
#[derive(Debug)]
pub enum Outbound {
    /// A frame for the next peer; its `seq` is assigned on the way out.
    Frame(Frame),
    /// The request is over on this link: drop its sequence counter.
    Forget(RequestId),
}

/// The state of one link, watched by whoever must react to it going down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Not connected yet, or reconnecting; the string says why, for error messages.
    Down(String),
    /// Connected.
    Up,
}

/// Sets a frame's sequence number.
pub fn set_seq(header: &mut FrameHeader, seq: u64) {
    match header {
        FrameHeader::Activations(h) => h.seq = seq,
        FrameHeader::Token(h) => h.seq = seq,
        FrameHeader::Control(ControlHeader::Start { seq: s, .. })
        | FrameHeader::Control(ControlHeader::End { seq: s, .. })
        | FrameHeader::Control(ControlHeader::Error { seq: s, .. }) => *s = seq,
        FrameHeader::Control(ControlHeader::Unload) => {}
    }
}

/// Per-request sequence counters of one outgoing link.
#[derive(Debug, Default)]
struct Numbering {
    counters: HashMap<RequestId, SequenceCounter>,
}

impl Numbering {
    /// Numbers `frame` for its request; `false` if the request used up its numbers (never in practice).
    fn stamp(&mut self, frame: &mut Frame) -> bool {
        let Some(request) = frame.header.request().cloned() else { return true };
        if matches!(frame.header, FrameHeader::Control(ControlHeader::Start { .. })) {
            self.counters.insert(request.clone(), SequenceCounter::new());
        }
        let last = matches!(frame.header, FrameHeader::Control(ControlHeader::End { .. } | ControlHeader::Error { .. }));
        let seq = self.counters.entry(request.clone()).or_default().next_seq();
        if last {
            self.counters.remove(&request);
        }
        match seq {
            Ok(seq) => {
                set_seq(&mut frame.header, seq);
                true
            }
            Err(_) => false,
        }
    }
}

/// Where failures of requests go instead of the downstream link (the entry handles its own requests'
/// failures; every other worker reports them downstream, towards the entry).
pub type FailureSink = mpsc::UnboundedSender<(RequestId, ErrorCode, String)>;

/// Keeps the downstream connection up and writes every outbound frame to it, in order. While the link
/// is down, frames are discarded (their requests are failed by whoever watches `state`) and the peer is
/// redialled with backoff. Returns when `outbound` closes.
pub async fn run_downstream(
    transport: Transport,
    peer: ShardPeer,
    mut outbound: mpsc::Receiver<Outbound>,
    state: watch::Sender<LinkState>,
    limits: FrameLimits,
    failures: Option<FailureSink>,
) {
    let short = peer.peer.fmt_short().to_string();
    let mut backoff = Duration::from_millis(50);
    loop {
        // Dial, discarding what arrives meanwhile (it belongs to requests that are being failed).
        let dial = transport.connect(peer.peer, &peer.addrs, FRAMES_ALPN);
        tokio::pin!(dial);
        let conn = loop {
            tokio::select! {
                result = tokio::time::timeout(Duration::from_secs(3), &mut dial) => match result {
                    Ok(Ok(conn)) => break Some(conn),
                    Ok(Err(e)) => {
                        tracing::debug!("dialling downstream {short}: {e}");
                        state.send_replace(LinkState::Down(format!("shard {} (peer {short}) is unreachable: {e}", peer.layers)));
                        break None;
                    }
                    Err(_) => {
                        state.send_replace(LinkState::Down(format!("shard {} (peer {short}) is unreachable: dial timed out", peer.layers)));
                        break None;
                    }
                },
                msg = outbound.recv() => match msg {
                    None => return,
                    Some(msg) => fail_discarded(msg, &failures, &peer, &short),
                },
            }
        };
        let Some(conn) = conn else {
            // Wait out the backoff, still draining.
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    msg = outbound.recv() => match msg {
                        None => return,
                        Some(msg) => fail_discarded(msg, &failures, &peer, &short),
                    },
                }
            }
            backoff = (backoff * 2).min(Duration::from_millis(500));
            continue;
        };
        // The peer may still refuse the link (it is not ready itself): it is up only once the peer
        // confirms it with one byte on a stream of its own (docs/PROTOCOL.md §11).
        if let Err(why) = await_link_ack(&conn).await {
            state.send_replace(LinkState::Down(format!("shard {} (peer {short}) {why}", peer.layers)));
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
            continue;
        }
        backoff = Duration::from_millis(50);
        let stream = match conn.open_uni().await {
            Ok(s) => s,
            Err(e) => {
                state.send_replace(LinkState::Down(format!("shard {} (peer {short}): {e}", peer.layers)));
                continue;
            }
        };
        tracing::info!(peer = %short, layers = %peer.layers, "downstream link up");
        state.send_replace(LinkState::Up);
        let mut writer = FrameWriter::new(stream, limits);
        let mut numbering = Numbering::default();
        let reason = loop {
            tokio::select! {
                msg = outbound.recv() => match msg {
                    None => {
                        let _ = writer.finish().await;
                        return;
                    }
                    Some(Outbound::Forget(request)) => {
                        numbering.counters.remove(&request);
                    }
                    Some(Outbound::Frame(mut frame)) => {
                        if let (FrameHeader::Control(ControlHeader::Error { request, code, message, .. }), Some(sink)) =
                            (&frame.header, &failures)
                        {
                            let _ = sink.send((request.clone(), *code, message.clone()));
                            continue;
                        }
                        if !numbering.stamp(&mut frame) {
                            continue;
                        }
                        if let Err(e) = writer.send(&frame).await {
                            break e.to_string();
                        }
                    }
                },
                e = conn.closed() => break describe_close(&e),
            }
        };
        tracing::warn!(peer = %short, "downstream link lost: {reason}");
        state.send_replace(LinkState::Down(format!("shard {} (peer {short}) was lost: {reason}", peer.layers)));
    }
}

/// The byte an accepting worker sends to confirm a frames link.
pub const LINK_ACK: u8 = 0x01;

/// Waits for the peer's confirmation of a new link: one [`LINK_ACK`] byte on a unidirectional stream it
/// opens, or the reason it closed the connection instead.
async fn await_link_ack(conn: &iroh::endpoint::Connection) -> Result<(), String> {
    let ack = async {
        let mut stream = conn.accept_uni().await.map_err(|e| describe_close(&e))?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.map_err(|e| match conn.close_reason() {
            Some(close) => describe_close(&close),
            None => e.to_string(),
        })?;
        if byte[0] == LINK_ACK { Ok(()) } else { Err(format!("sent {:#04x} instead of the link confirmation", byte[0])) }
    };
    match tokio::time::timeout(Duration::from_secs(3), ack).await {
        Ok(result) => result.map_err(|why| format!("refused the link: {why}")),
        Err(_) => Err("did not confirm the link within 3 s".into()),
    }
}

/// A frame that cannot be sent because the link is down: a failure meant for the entry still reaches
/// it when this worker is the entry.
fn fail_discarded(msg: Outbound, failures: &Option<FailureSink>, peer: &ShardPeer, short: &str) {
    if let (Outbound::Frame(frame), Some(sink)) = (msg, failures)
        && let Some(request) = frame.header.request()
    {
        let _ = sink.send((
            request.clone(),
            ErrorCode::Unavailable,
            format!("shard {} (peer {short}) is unreachable", peer.layers),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use computepool_axl::frame::{SamplingHeader, TokenHeader};

    fn rid(s: &str) -> RequestId {
        RequestId::new(s).expect("valid id")
    }

    #[test]
    fn frames_are_numbered_per_request_and_counters_end_with_the_request() {
        let mut n = Numbering::default();
        let sampling = SamplingHeader::default();
        let mut seqs = Vec::new();
        for mut f in [
            Frame::start(rid("a"), sampling.clone()),
            Frame::start(rid("b"), sampling),
            Frame::token(TokenHeader { request: rid("a"), seq: 99, tokens: vec![1], finish: None }),
            Frame::end(rid("a"), 99),
            Frame::token(TokenHeader { request: rid("b"), seq: 99, tokens: vec![1], finish: None }),
        ] {
            assert!(n.stamp(&mut f));
            seqs.push(f.header.seq());
        }
        assert_eq!(seqs, [Some(0), Some(0), Some(1), Some(2), Some(1)]);
        assert!(!n.counters.contains_key(&rid("a")), "end drops the counter");
    }
}
