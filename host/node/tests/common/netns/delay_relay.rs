//! A user-space UDP relay that holds every datagram for a fixed time before passing it on: the link
//! delay of [`super::NetnsLab`] on kernels without `tc netem`.
//!
//! Each [`Route`] is one listening socket standing in for one worker: whatever arrives there from a
//! sender goes, `delay` later, to the route's target, from a socket of that sender's own (a session,
//! like a NAT mapping), and the target's answers come back the same way, `delay` later. Order is kept
//! in each direction. Sessions live as long as the relay.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// One worker behind the relay: senders address `listen`, the relay passes their datagrams on to
/// `target`.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

/// A running relay: a thread inside one network namespace with its own single-threaded runtime.
/// Dropping it stops the thread and closes every socket.
pub struct DelayRelay {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    delivered: Vec<Arc<AtomicU64>>,
}

/// A datagram waiting for its time.
struct Held {
    due: Instant,
    bytes: Vec<u8>,
}

impl DelayRelay {
    /// Binds every route's listening socket inside network namespace `netns` and starts relaying.
    /// Errors: the namespace cannot be entered or a socket cannot be bound.
    pub fn start(netns: &str, routes: &[Route], delay: Duration) -> io::Result<Self> {
        let delivered: Vec<Arc<AtomicU64>> = routes.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let netns = netns.to_string();
        let routes = routes.to_vec();
        let counters = delivered.clone();
        let thread = std::thread::Builder::new().name(format!("delay-relay-{netns}")).spawn(move || {
            // Sockets belong to the namespace of the thread that creates them, and every socket of
            // the relay (sessions too, made later) is made on this thread.
            let listeners = super::enter_namespace(&netns).and_then(|()| {
                routes.iter().map(|r| std::net::UdpSocket::bind(r.listen)).collect::<io::Result<Vec<_>>>()
            });
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            let (listeners, runtime) = match (listeners, runtime) {
                (Ok(l), Ok(rt)) => (l, rt),
                (Err(e), _) | (_, Err(e)) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            runtime.block_on(async move {
                for ((listener, route), counter) in listeners.into_iter().zip(&routes).zip(counters) {
                    let listener = match tokio_socket(listener) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = bound_tx.send(Err(e));
                            return;
                        }
                    };
                    tokio::spawn(serve_route(listener, route.target, delay, counter));
                }
                let _ = bound_tx.send(Ok(()));
                let _ = stop_rx.await;
            });
        })?;
        let relay = Self { stop: Some(stop_tx), thread: Some(thread), delivered };
        match bound_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok(relay),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "the relay thread did not start within 10 s")),
        }
    }

    /// How many datagrams the relay has delivered to route `i`'s target so far.
    pub fn delivered(&self, i: usize) -> u64 {
        self.delivered[i].load(Ordering::Relaxed)
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn tokio_socket(socket: std::net::UdpSocket) -> io::Result<Arc<UdpSocket>> {
    socket.set_nonblocking(true)?;
    Ok(Arc::new(UdpSocket::from_std(socket)?))
}

/// Receives on one route's listening socket and hands each datagram to its sender's session.
async fn serve_route(listener: Arc<UdpSocket>, target: SocketAddr, delay: Duration, delivered: Arc<AtomicU64>) {
    let mut sessions: HashMap<SocketAddr, mpsc::UnboundedSender<Held>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    loop {
        // Errors here are transient (an ICMP error surfacing on the socket): keep relaying.
        let Ok((len, from)) = listener.recv_from(&mut buf).await else { continue };
        let held = Held { due: Instant::now() + delay, bytes: buf[..len].to_vec() };
        let to_target = match sessions.entry(from) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => match open_session(&listener, from, target, delay, &delivered) {
                Ok(tx) => e.insert(tx),
                Err(err) => {
                    eprintln!("delay relay: no session for {from} -> {target}: {err}");
                    continue;
                }
            },
        };
        let _ = to_target.send(held);
    }
}

/// A sender's own socket towards `target`, and the tasks that delay traffic both ways.
fn open_session(
    listener: &Arc<UdpSocket>,
    sender: SocketAddr,
    target: SocketAddr,
    delay: Duration,
    delivered: &Arc<AtomicU64>,
) -> io::Result<mpsc::UnboundedSender<Held>> {
    // Unconnected, so an ICMP "port unreachable" (a worker not up yet) is not reported on it.
    let upstream = tokio_socket(std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?)?;
    let (to_target, to_target_rx) = mpsc::unbounded_channel();
    tokio::spawn(deliver(to_target_rx, upstream.clone(), target, Some(delivered.clone())));
    let (to_sender, to_sender_rx) = mpsc::unbounded_channel();
    tokio::spawn(deliver(to_sender_rx, listener.clone(), sender, None));
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok((len, from)) = upstream.recv_from(&mut buf).await else { continue };
            if from != target {
                continue;
            }
            let held = Held { due: Instant::now() + delay, bytes: buf[..len].to_vec() };
            if to_sender.send(held).is_err() {
                return;
            }
        }
    });
    Ok(to_target)
}

/// Sends each held datagram from `socket` to `to` once its time has come, in order.
async fn deliver(
    mut held: mpsc::UnboundedReceiver<Held>,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    delivered: Option<Arc<AtomicU64>>,
) {
    while let Some(Held { due, bytes }) = held.recv().await {
        tokio::time::sleep_until(due).await;
        if socket.send_to(&bytes, to).await.is_ok()
            && let Some(counter) = &delivered
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
