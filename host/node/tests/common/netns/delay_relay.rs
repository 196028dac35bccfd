//! A user-space UDP relay that holds every datagram for a fixed time before passing it on: the link
//! delay of [`super::NetnsLab`] on kernels without `tc netem`.
//!
//! Each [`Route`] is one listening socket standing in for one worker: whatever arrives there from a
//! sender goes, `delay` later, to the route's target, from a socket of that sender's own (a session,
//! like a NAT mapping), and the target's answers come back the same way, `delay` later. Order is kept
//! in each direction. Sessions live as long as the relay. A peer that has heard from another through
//! a session may also answer to the session's own address rather than the route's (QUIC does, for all
//! connections between the two): that is the same relay, delay and all.
//!
//! Plain threads, not an async runtime: a thread sleeping to a deadline wakes within tens of
//! microseconds, while a runtime's millisecond timer wheel adds 1-2 ms to each 5 ms hold.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a blocked thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// One worker behind the relay: senders address `listen`, the relay passes their datagrams on to
/// `target`.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

/// A running relay: threads inside one network namespace. Dropping it stops them all and closes every
/// socket.
pub struct DelayRelay {
    shared: Arc<Shared>,
}

/// What every thread of the relay sees.
struct Shared {
    netns: String,
    delay: Duration,
    stop: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Datagrams delivered, by the address they were delivered to.
    delivered: Mutex<HashMap<IpAddr, u64>>,
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
        let shared = Arc::new(Shared {
            netns: netns.into(),
            delay,
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            delivered: Mutex::new(HashMap::new()),
        });
        let listeners = {
            let routes = routes.to_vec();
            in_namespace(netns, move || {
                routes.iter().map(|r| UdpSocket::bind(r.listen)).collect::<io::Result<Vec<_>>>()
            })?
        };
        for (listener, route) in listeners.into_iter().zip(routes) {
            let target = route.target;
            spawn(&shared, format!("relay {}", route.listen), move |shared| serve_route(shared, listener, target))?;
        }
        Ok(Self { shared })
    }

    /// How many datagrams the relay has delivered to `ip` so far, by any route or session.
    pub fn delivered_to(&self, ip: IpAddr) -> u64 {
        self.shared.delivered.lock().expect("no thread panics holding it").get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Threads only add threads while running; take them in rounds until none are left.
        loop {
            let threads = std::mem::take(&mut *self.shared.threads.lock().expect("no thread panics holding it"));
            if threads.is_empty() {
                break;
            }
            for thread in threads {
                let _ = thread.join();
            }
        }
    }
}

/// Runs `f` on a new thread inside `netns` and returns its result.
fn in_namespace<T: Send + 'static>(netns: &str, f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        super::enter_namespace(&netns)?;
        f()
    })
    .join()
    .expect("the set-up thread does not panic")
}

/// Starts a relay thread inside the relay's namespace (sockets it makes belong there).
fn spawn(shared: &Arc<Shared>, name: String, f: impl FnOnce(Arc<Shared>) + Send + 'static) -> io::Result<()> {
    let for_thread = shared.clone();
    let thread = std::thread::Builder::new().name(name.clone()).spawn(move || {
        if let Err(e) = super::enter_namespace(&for_thread.netns) {
            eprintln!("{name}: cannot enter {}: {e}", for_thread.netns);
            return;
        }
        f(for_thread)
    })?;
    shared.threads.lock().expect("no thread panics holding it").push(thread);
    Ok(())
}

/// Receives on one route's listening socket and hands each datagram to its sender's session.
fn serve_route(shared: Arc<Shared>, listener: UdpSocket, target: SocketAddr) {
    if let Err(e) = listener.set_read_timeout(Some(POLL)) {
        eprintln!("relay to {target}: {e}");
        return;
    }
    let listener = Arc::new(listener);
    let mut sessions: HashMap<SocketAddr, Sender<Held>> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        // Timeouts, and errors such as an ICMP error surfacing on the socket: keep relaying.
        let Ok((len, from)) = listener.recv_from(&mut buf) else { continue };
        let held = Held { due: Instant::now() + shared.delay, bytes: buf[..len].to_vec() };
        let to_target = match sessions.entry(from) {
            Entry::Occupied(session) => session.into_mut(),
            Entry::Vacant(slot) => match open_session(&shared, &listener, from, target) {
                Ok(to_target) => slot.insert(to_target),
                Err(e) => {
                    eprintln!("relay: no session for {from} -> {target}: {e}");
                    continue;
                }
            },
        };
        let _ = to_target.send(held);
    }
}

/// A sender's own socket towards `target`, and the threads that delay traffic both ways. Runs on a
/// relay thread, so the socket is in the relay's namespace.
fn open_session(
    shared: &Arc<Shared>,
    listener: &Arc<UdpSocket>,
    sender: SocketAddr,
    target: SocketAddr,
) -> io::Result<Sender<Held>> {
    // Unconnected, so an ICMP "port unreachable" (a worker not up yet) is not reported on it.
    let upstream = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    upstream.set_read_timeout(Some(POLL))?;
    let upstream = Arc::new(upstream);
    let (to_target, to_target_rx) = mpsc::channel();
    let socket = upstream.clone();
    spawn(shared, format!("relay {sender}->{target}"), move |s| deliver(s, to_target_rx, socket, target))?;
    let (to_sender, to_sender_rx) = mpsc::channel();
    let socket = listener.clone();
    spawn(shared, format!("relay {target}->{sender}"), move |s| deliver(s, to_sender_rx, socket, sender))?;
    spawn(shared, format!("relay from {target}"), move |s| {
        let mut buf = vec![0u8; 65536];
        while !s.stop.load(Ordering::Relaxed) {
            let Ok((len, from)) = upstream.recv_from(&mut buf) else { continue };
            if from == target {
                let _ = to_sender.send(Held { due: Instant::now() + s.delay, bytes: buf[..len].to_vec() });
            }
        }
    })?;
    Ok(to_target)
}

/// Sends each held datagram from `socket` to `to` once its time has come, in order.
fn deliver(shared: Arc<Shared>, held: Receiver<Held>, socket: Arc<UdpSocket>, to: SocketAddr) {
    while !shared.stop.load(Ordering::Relaxed) {
        let Held { due, bytes } = match held.recv_timeout(POLL) {
            Ok(h) => h,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        if socket.send_to(&bytes, to).is_ok() {
            *shared.delivered.lock().expect("no thread panics holding it").entry(to.ip()).or_default() += 1;
        }
    }
}
