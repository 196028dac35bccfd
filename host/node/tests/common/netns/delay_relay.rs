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
//! One thread runs the whole relay: it waits in `ppoll(2)` on all its sockets at once, until the next
//! datagram is due or one arrives, so a datagram costs at most two wakes of that one thread (its
//! arrival and its departure), fewer when several come together. It stands in for netem, which
//! delays in the kernel, so it should take as little as it can of the cores the workers compute on:
//! its first form (a thread per route and three per session, each datagram waking two of them three
//! times, every thread also waking each 50 ms) woke about twice as often and waited three times as
//! long for a core (docs/NOTES.md, session 19). Its timer slack is 1 ns, so a hold ends on time
//! rather than up to 50 µs late.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_long, c_short, c_ulong};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Each socket's receive and send buffer: a QUIC sender's burst (a split head's logits are ~80
/// datagrams at once) must not overflow the kernel's default ~208 KiB of the relay's socket, which
/// counts each datagram at about twice its size, while the thread sleeps; netem's queue holds 1000
/// packets.
const SOCKET_BUFFER_BYTES: c_int = 4 << 20;

/// The longest the relay's thread waits before it looks at the stop flag again.
const POLL: Duration = Duration::from_millis(50);

/// One worker behind the relay: senders address `listen`, the relay passes their datagrams on to
/// `target`.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub listen: SocketAddr,
    pub target: SocketAddr,
}

/// A running relay: one thread inside one network namespace. Dropping it stops the thread and closes
/// every socket.
pub struct DelayRelay {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// What the relay's thread shares with its owner.
struct Shared {
    stop: AtomicBool,
    /// Datagrams delivered, by the address they were delivered to.
    delivered: Mutex<HashMap<IpAddr, u64>>,
}

impl DelayRelay {
    /// Binds every route's listening socket inside network namespace `netns` and starts relaying.
    /// Errors: the namespace cannot be entered or a socket cannot be bound.
    pub fn start(netns: &str, routes: &[Route], delay: Duration) -> io::Result<Self> {
        let shared = Arc::new(Shared { stop: AtomicBool::new(false), delivered: Mutex::new(HashMap::new()) });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (netns, routes, for_thread) = (netns.to_string(), routes.to_vec(), shared.clone());
        let thread = std::thread::Builder::new().name("delay relay".into()).spawn(move || {
            let relay = super::enter_namespace(&netns).and_then(|()| Relay::bind(&routes, delay));
            match relay {
                Ok(mut relay) => {
                    let _ = ready_tx.send(Ok(()));
                    relay.run(&for_thread);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
        let bound = ready_rx.recv().unwrap_or_else(|_| Err(io::Error::other("the relay thread died starting")));
        let relay = Self { shared, thread: Some(thread) };
        bound.map(|()| relay)
    }

    /// How many datagrams the relay has delivered to `ip` so far, by any route or session.
    pub fn delivered_to(&self, ip: IpAddr) -> u64 {
        self.shared.delivered.lock().expect("no thread panics holding it").get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What one of the relay's sockets is for.
enum Role {
    /// A route's listening socket: what a sender sends here goes to `target`, from the sender's session.
    Listener { target: SocketAddr },
    /// A session's own socket towards `target`: what `target` sends here goes back to `sender`, from
    /// the route's listening socket (index `listener`).
    Session { listener: usize, sender: SocketAddr, target: SocketAddr },
}

/// A datagram waiting for its time: it leaves from socket `via` to `to`.
struct Held {
    due: Instant,
    via: usize,
    to: SocketAddr,
    bytes: Vec<u8>,
}

/// The relay's state, owned by its one thread.
struct Relay {
    delay: Duration,
    sockets: Vec<(UdpSocket, Role)>,
    /// The session socket of each (listener, sender).
    sessions: HashMap<(usize, SocketAddr), usize>,
    /// Every held datagram, in arrival order. The delay is the same for all, so this is also the order
    /// they are due in.
    held: VecDeque<Held>,
}

impl Relay {
    fn bind(routes: &[Route], delay: Duration) -> io::Result<Self> {
        let mut relay = Relay { delay, sockets: Vec::new(), sessions: HashMap::new(), held: VecDeque::new() };
        for route in routes {
            relay.add_socket(UdpSocket::bind(route.listen)?, Role::Listener { target: route.target })?;
        }
        sys::tighten_timer_slack();
        Ok(relay)
    }

    fn add_socket(&mut self, socket: UdpSocket, role: Role) -> io::Result<usize> {
        socket.set_nonblocking(true)?;
        sys::widen_buffers(&socket, SOCKET_BUFFER_BYTES);
        self.sockets.push((socket, role));
        Ok(self.sockets.len() - 1)
    }

    fn run(&mut self, shared: &Shared) {
        let mut buf = vec![0u8; 65536];
        let mut polled = Vec::new();
        while !shared.stop.load(Ordering::Relaxed) {
            self.send_due(shared);
            let wait = self.held.front().map_or(POLL, |h| h.due.saturating_duration_since(Instant::now()).min(POLL));
            polled.clear();
            polled.extend(self.sockets.iter().map(|(s, _)| s.as_raw_fd()));
            let readable = match sys::wait_readable(&polled, wait) {
                Ok(readable) => readable,
                Err(e) => {
                    eprintln!("delay relay: ppoll: {e}");
                    return;
                }
            };
            for index in readable {
                self.receive_all(index, &mut buf);
            }
        }
    }

    /// Sends every datagram whose time has come.
    fn send_due(&mut self, shared: &Shared) {
        let now = Instant::now();
        while self.held.front().is_some_and(|h| h.due <= now) {
            let Held { via, to, bytes, .. } = self.held.pop_front().expect("a front was just seen");
            // A datagram the kernel refuses now is lost, as on a network.
            if self.sockets[via].0.send_to(&bytes, to).is_ok() {
                *shared.delivered.lock().expect("no thread panics holding it").entry(to.ip()).or_default() += 1;
            }
        }
    }

    /// Takes every datagram waiting on socket `index` and holds each.
    fn receive_all(&mut self, index: usize, buf: &mut [u8]) {
        loop {
            // Would-block ends the round; other errors (an ICMP error surfacing on the socket) too:
            // the next wait says whether more is waiting.
            let Ok((len, from)) = self.sockets[index].0.recv_from(buf) else { return };
            let due = Instant::now() + self.delay;
            let (via, to) = match self.sockets[index].1 {
                Role::Listener { target } => match self.session(index, from, target) {
                    Ok(session) => (session, target),
                    Err(e) => {
                        eprintln!("delay relay: no session for {from} -> {target}: {e}");
                        continue;
                    }
                },
                Role::Session { listener, sender, target } => {
                    if from != target {
                        continue;
                    }
                    (listener, sender)
                }
            };
            self.held.push_back(Held { due, via, to, bytes: buf[..len].to_vec() });
        }
    }

    /// The session socket of `sender` on listener `listener` (made on its first datagram). Not connected to
    /// its target, so an ICMP "port unreachable" (a worker not up yet) is not reported on it.
    fn session(&mut self, listener: usize, sender: SocketAddr, target: SocketAddr) -> io::Result<usize> {
        if let Entry::Occupied(session) = self.sessions.entry((listener, sender)) {
            return Ok(*session.get());
        }
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        let index = self.add_socket(socket, Role::Session { listener, sender, target })?;
        self.sessions.insert((listener, sender), index);
        Ok(index)
    }
}

/// The two system calls std does not wrap.
mod sys {
    use super::*;

    #[repr(C)]
    struct PollFd {
        fd: c_int,
        events: c_short,
        revents: c_short,
    }

    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: c_long,
    }

    const POLLIN: c_short = 0x1;
    const PR_SET_TIMERSLACK: c_int = 29;
    const SOL_SOCKET: c_int = 1;
    const SO_SNDBUF: c_int = 7;
    const SO_RCVBUF: c_int = 8;
    const SO_SNDBUFFORCE: c_int = 32;
    const SO_RCVBUFFORCE: c_int = 33;

    unsafe extern "C" {
        fn ppoll(fds: *mut PollFd, nfds: c_ulong, timeout: *const Timespec, sigmask: *const u8) -> c_int;
        fn prctl(option: c_int, ...) -> c_int;
        fn setsockopt(fd: c_int, level: c_int, name: c_int, value: *const c_int, len: u32) -> c_int;
    }

    /// Asks for `bytes` of receive and send buffer on `socket`: past `net.core.[rw]mem_max` as root
    /// (the `FORCE` options), else up to it.
    pub(super) fn widen_buffers(socket: &UdpSocket, bytes: c_int) {
        for (forced, plain) in [(SO_RCVBUFFORCE, SO_RCVBUF), (SO_SNDBUFFORCE, SO_SNDBUF)] {
            let len = std::mem::size_of::<c_int>() as u32;
            // SAFETY: `bytes` is a live c_int and `len` its size; setsockopt only reads it.
            if unsafe { setsockopt(socket.as_raw_fd(), SOL_SOCKET, forced, &bytes, len) } != 0 {
                // SAFETY: as above.
                unsafe { setsockopt(socket.as_raw_fd(), SOL_SOCKET, plain, &bytes, len) };
            }
        }
    }

    /// Waits until one of `fds` is readable or `timeout` passes (nanosecond resolution, unlike
    /// `poll`'s milliseconds); the indices of the readable ones (none on a timeout or a signal).
    pub(super) fn wait_readable(fds: &[c_int], timeout: Duration) -> io::Result<Vec<usize>> {
        let mut polled: Vec<PollFd> = fds.iter().map(|&fd| PollFd { fd, events: POLLIN, revents: 0 }).collect();
        let timeout = Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: timeout.subsec_nanos() as c_long };
        // SAFETY: `polled` is a live array of `polled.len()` pollfd structs, `timeout` a live timespec,
        // and a null signal mask leaves the thread's mask alone; ppoll writes only `revents`.
        let ready = unsafe { ppoll(polled.as_mut_ptr(), polled.len() as c_ulong, &timeout, std::ptr::null()) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(Vec::new()) } else { Err(e) };
        }
        // Readable, or an error or hang-up pending: a receive picks either up.
        Ok(polled.iter().enumerate().filter(|(_, p)| p.revents != 0).map(|(i, _)| i).collect())
    }

    /// Makes the calling thread's timers fire on time: the default slack (50 µs) would add up to that
    /// to every hold.
    pub(super) fn tighten_timer_slack() {
        // SAFETY: PR_SET_TIMERSLACK takes one unsigned long and changes only the calling thread.
        unsafe { prctl(PR_SET_TIMERSLACK, 1 as c_ulong) };
    }
}
