//! Separate hosts on one machine: a network namespace per shard and one for the client, each joined by
//! a veth pair to a router namespace, with [`LINK_DELAY`] of one-way delay between any two of them.
//! Needs root (`ip netns`); [`NetnsLab::create`] says when that is not permitted so a test can skip.
//!
//! The delay comes from `tc netem` where the kernel has it: 5 ms on each host's link, and the router
//! forwards IP. Where it does not (no `sch_netem`), a user-space relay in the router namespace holds
//! each datagram for 5 ms ([`delay_relay`]); then the router forwards nothing and each host has a route
//! only to the relay's address, so the relay is the one path between hosts. Either way
//! [`NetnsLab::probe_links`] checks the round trip of every link of the ring.
//!
//! Addresses: host `k` (shard `k`, or the client after the last shard) is `10.213.k.2/24` on its
//! `eth0`; the router's end is `10.213.k.1`, and the relay listens on `10.213.250.1`. Each lab has its
//! own namespaces, so two labs (or two test processes) never see each other's addresses.

pub mod delay_relay;

use std::ffi::c_int;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use delay_relay::{DelayRelay, Route};
use serde_json::Value;

/// One-way delay added on every link between two hosts.
pub const LINK_DELAY: Duration = Duration::from_millis(5);
/// The UDP port each worker listens on inside its own namespace.
pub const WORKER_PORT: u16 = 7000;
/// Namespace names start with this, then the test process id: leftovers of a killed run are found
/// (and removed) by the next one.
const PREFIX: &str = "cpnet-";
/// The relay's address in the router namespace; route `j` (to shard `j`) listens on port
/// `RELAY_PORT_BASE + j`.
const RELAY_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 250, 1);
const RELAY_PORT_BASE: u16 = 7100;
/// Set to `relay` to use the user-space relay even where netem works (to test the relay).
const DELAY_ENV: &str = "COMPUTEPOOL_NETNS_DELAY";

/// How the delay is made.
enum Delay {
    Netem,
    /// The relay, and why netem was not used.
    Relay(DelayRelay, String),
}

/// What joins the hosts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// [`LINK_DELAY`] on every path between two hosts (netem, or the delay relay).
    Delayed,
    /// No path between any two hosts at all: the router forwards nothing, and each host has a route
    /// only to the router's [`RELAY_IP`], where a test runs what every host may reach (an iroh relay),
    /// as with hosts behind NATs that cannot reach each other.
    Isolated,
}

/// The namespaces, links and delay of one test; all of it is removed on drop.
pub struct NetnsLab {
    shards: usize,
    router: String,
    /// Shards first, then the client.
    hosts: Vec<String>,
    /// Every namespace made so far, for the teardown (also of a half-built lab).
    made: Vec<String>,
    delay: Option<Delay>,
}

/// The round trips of one link, from a host to a worker's address as the topology gives it.
pub struct LinkProbe {
    pub from: String,
    pub to: String,
    pub round_trips: Vec<Duration>,
}

impl LinkProbe {
    pub fn min(&self) -> Duration {
        self.round_trips.iter().copied().min().expect("at least one round trip")
    }

    pub fn median(&self) -> Duration {
        let mut sorted = self.round_trips.clone();
        sorted.sort();
        sorted[sorted.len() / 2]
    }
}

impl NetnsLab {
    /// Makes the namespaces for `shards` shards and a client, links them and adds the delay.
    /// `Err` (the reason) only where namespaces cannot be made at all (not root, no `ip`, no
    /// permission); any later failure panics, since then the machine is set up wrong.
    pub fn create(shards: usize) -> Result<Self, String> {
        Self::create_with(shards, Links::Delayed)
    }

    /// As [`Self::create`], with the hosts joined as `links` says.
    pub fn create_with(shards: usize, links: Links) -> Result<Self, String> {
        static LABS: AtomicUsize = AtomicUsize::new(0);
        remove_leftovers();
        let tag = format!("{PREFIX}{}-{}", std::process::id(), LABS.fetch_add(1, Ordering::Relaxed));
        let mut lab = Self {
            shards,
            router: format!("{tag}-r"),
            hosts: (0..shards).map(|j| format!("{tag}-s{j}")).chain([format!("{tag}-c")]).collect(),
            made: Vec::new(),
            delay: None,
        };
        let router = lab.router.clone();
        try_run(&format!("ip netns add {router}"))?;
        lab.made.push(router.clone());
        must_run(&format!("ip -n {router} link set lo up"));
        must_run(&format!("ip -n {router} addr add {RELAY_IP}/32 dev lo"));
        for k in 0..lab.hosts.len() {
            let host = lab.hosts[k].clone();
            must_run(&format!("ip netns add {host}"));
            lab.made.push(host.clone());
            must_run(&format!("ip -n {router} link add h{k} type veth peer name eth0 netns {host}"));
            must_run(&format!("ip -n {router} addr add 10.213.{k}.1/24 dev h{k}"));
            must_run(&format!("ip -n {router} link set h{k} up"));
            must_run(&format!("ip -n {host} addr add 10.213.{k}.2/24 dev eth0"));
            must_run(&format!("ip -n {host} link set eth0 up"));
            must_run(&format!("ip -n {host} link set lo up"));
        }
        match links {
            Links::Delayed => lab.add_delay(),
            Links::Isolated => lab.route_to_router_only(),
        }
        Ok(lab)
    }

    /// The router forwards nothing (a new namespace may inherit forwarding from the host's, so say so)
    /// and hosts know only the way to [`RELAY_IP`]: a host's datagrams to another host's own address go
    /// nowhere.
    fn route_to_router_only(&self) {
        set_forwarding(&self.router, false);
        for (k, host) in self.hosts.iter().enumerate() {
            must_run(&format!("ip -n {host} route add {RELAY_IP}/32 via 10.213.{k}.1"));
        }
    }

    /// The router's address that every host can reach (in [`Links::Isolated`] labs, the only one).
    pub fn router_ip(&self) -> Ipv4Addr {
        RELAY_IP
    }

    pub fn router_ns(&self) -> &str {
        &self.router
    }

    /// Whether host `from` (a shard, or the client at index `shards`) reaches shard `to`'s own address:
    /// an echo server on `to`'s worker port answers a datagram within 300 ms. Call it before the
    /// workers start (it borrows their ports).
    pub fn reaches_directly(&self, from: usize, to: usize) -> bool {
        let echo = EchoServer::start(&self.hosts[to], self.listen_addr(to));
        let reached = answers(&self.hosts[from], self.listen_addr(to));
        echo.stop();
        reached
    }

    /// `tc netem` on every host's link if the kernel has it, else the relay.
    fn add_delay(&mut self) {
        let netem = |host: &str| try_run(&format!("tc -n {host} qdisc add dev eth0 root netem delay {LINK_DELAY:?}"));
        let forced_relay = std::env::var(DELAY_ENV).is_ok_and(|v| v == "relay");
        let first = if forced_relay { Err(format!("{DELAY_ENV}=relay")) } else { netem(&self.hosts[0]) };
        match first {
            Ok(()) => {
                for host in &self.hosts[1..] {
                    netem(host).unwrap_or_else(|e| panic!("netem worked on one link but not on the next: {e}"));
                }
                set_forwarding(&self.router, true);
                for (k, host) in self.hosts.iter().enumerate() {
                    must_run(&format!("ip -n {host} route add 10.213.0.0/16 via 10.213.{k}.1"));
                }
                self.delay = Some(Delay::Netem);
            }
            Err(why) => {
                // The delay relay is then the one path between hosts.
                self.route_to_router_only();
                let routes: Vec<Route> = (0..self.shards)
                    .map(|j| Route { listen: self.relay_addr(j), target: self.listen_addr(j) })
                    .collect();
                let relay = DelayRelay::start(&self.router, &routes, LINK_DELAY)
                    .unwrap_or_else(|e| panic!("cannot start the delay relay in {}: {e}", self.router));
                self.delay = Some(Delay::Relay(relay, why));
            }
        }
    }

    /// How the delay is made, for the test's output.
    pub fn delay_description(&self) -> String {
        match &self.delay {
            Some(Delay::Netem) => format!("tc netem delay {LINK_DELAY:?} on every host's link"),
            Some(Delay::Relay(_, why)) => format!(
                "a user-space UDP relay in the router namespace holding each datagram {LINK_DELAY:?} \
                 (tc netem unavailable: {why})"
            ),
            None => "none".into(),
        }
    }

    pub fn shard_ns(&self, j: usize) -> &str {
        &self.hosts[j]
    }

    pub fn client_ns(&self) -> &str {
        &self.hosts[self.shards]
    }

    /// Where shard `j`'s worker listens, inside its namespace.
    pub fn listen_addr(&self, j: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 213, j as u8, 2), WORKER_PORT))
    }

    fn relay_addr(&self, j: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(RELAY_IP, RELAY_PORT_BASE + j as u16))
    }

    /// Where every other host reaches shard `j`: the topology's address for it (in a
    /// [`Links::Isolated`] lab its own address, which no other host reaches).
    pub fn reach_addr(&self, j: usize) -> SocketAddr {
        match self.delay {
            Some(Delay::Relay(..)) => self.relay_addr(j),
            _ => self.listen_addr(j),
        }
    }

    /// Gives each shard of the topology file at `path` its [`Self::reach_addr`] (the workers still
    /// listen on [`Self::listen_addr`]).
    pub fn point_topology_at_links(&self, path: &Path) {
        let mut topology: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read the topology"))
            .expect("the topology is JSON");
        let shards = topology["shards"].as_array_mut().expect("the topology lists shards");
        assert_eq!(shards.len(), self.shards, "the topology and the lab have different shard counts");
        for (j, shard) in shards.iter_mut().enumerate() {
            shard["addrs"] = serde_json::json!([self.reach_addr(j)]);
        }
        std::fs::write(path, topology.to_string()).expect("write the topology");
    }

    /// Datagrams the relay has delivered to shard `j` so far (whichever way they came); `None` with
    /// netem (no relay).
    pub fn relayed_to(&self, j: usize) -> Option<u64> {
        match &self.delay {
            Some(Delay::Relay(relay, _)) => Some(relay.delivered_to(self.listen_addr(j).ip())),
            _ => None,
        }
    }

    /// `cmd` run inside namespace `ns` (`ip netns exec`).
    pub fn exec(&self, ns: &str, cmd: &Command) -> Command {
        let mut wrapped = Command::new("ip");
        wrapped.args(["netns", "exec", ns]).arg(cmd.get_program()).args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => wrapped.env(key, v),
                None => wrapped.env_remove(key),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }

    /// Times UDP round trips over every link of the ring (each shard's upstream neighbour to the
    /// shard, the client to the entry), to the address the topology gives, with a stand-in echo
    /// server on the worker's port; and, with the relay, checks that a host cannot reach another
    /// host's own address at all. Call it before the workers start (it borrows their ports).
    /// Panics on a link without answers, with a round trip under twice [`LINK_DELAY`], or with a
    /// path around the relay.
    pub fn probe_links(&self) -> Vec<LinkProbe> {
        let upstream = |j: usize| (j + self.shards - 1) % self.shards;
        let mut links: Vec<(usize, usize)> = (0..self.shards).map(|j| (upstream(j), j)).collect();
        links.push((self.shards, 0));
        let mut probes = Vec::new();
        for (from, to) in links {
            let echo = EchoServer::start(&self.hosts[to], self.listen_addr(to));
            let round_trips = round_trips(&self.hosts[from], self.reach_addr(to), 20);
            let probe = LinkProbe { from: self.hosts[from].clone(), to: self.hosts[to].clone(), round_trips };
            assert!(
                probe.min() >= 2 * LINK_DELAY,
                "{} -> {}: a round trip took {:?}, under 2 x {LINK_DELAY:?}: the delay is not on this path",
                probe.from,
                probe.to,
                probe.min()
            );
            if matches!(self.delay, Some(Delay::Relay(..))) {
                let direct = self.listen_addr(to);
                assert!(
                    !answers(&self.hosts[from], direct),
                    "{} reached {} at its own address {direct}: there is a path around the relay",
                    probe.from,
                    probe.to
                );
            }
            assert!(echo.stop() > 0, "the echo server saw nothing");
            probes.push(probe);
        }
        probes
    }
}

impl Drop for NetnsLab {
    fn drop(&mut self) {
        // The relay's threads are inside the router namespace: stop them first.
        self.delay = None;
        for ns in self.made.iter().rev() {
            if let Err(e) = try_run(&format!("ip netns del {ns}")) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// Removes the namespaces of earlier test processes that are gone (killed before their teardown),
/// and the workers those left running inside them.
fn remove_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(pid) = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()) else { continue };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for orphan in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", orphan]).status();
            }
        }
        let _ = try_run(&format!("ip netns del {name}"));
    }
}

unsafe extern "C" {
    /// libc's `setns(2)`: moves the calling thread (only) into the namespace `fd` refers to.
    fn setns(fd: c_int, nstype: c_int) -> c_int;
}
const CLONE_NEWNET: c_int = 0x4000_0000;

/// Moves the calling thread into network namespace `ns` (made by `ip netns add`). Sockets it makes
/// from then on belong to that namespace, wherever they are used later.
pub fn enter_namespace(ns: &str) -> io::Result<()> {
    let file = File::open(Path::new("/var/run/netns").join(ns))?;
    // SAFETY: `file` is an open namespace file for the duration of the call; setns only changes the
    // calling thread's network namespace, which no other thread depends on.
    if unsafe { setns(file.as_raw_fd(), CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns IPv4 forwarding in namespace `ns` on or off, and checks it took. (A new namespace may
/// inherit the host's setting.) `/proc/sys/net` shows the namespace of the thread that opens it.
fn set_forwarding(ns: &str, on: bool) {
    let path = "/proc/sys/net/ipv4/ip_forward";
    let now = std::thread::scope(|s| {
        s.spawn(|| {
            enter_namespace(ns)?;
            std::fs::write(path, if on { "1\n" } else { "0\n" })?;
            std::fs::read_to_string(path)
        })
        .join()
        .expect("the sysctl thread does not panic")
    })
    .unwrap_or_else(|e| panic!("setting {path} in {ns}: {e}"));
    assert_eq!(now.trim() == "1", on, "{path} in {ns} is {}", now.trim());
}

/// A UDP socket bound to `addr` inside namespace `ns`.
pub fn udp_socket_in(ns: &str, addr: SocketAddr) -> io::Result<UdpSocket> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_namespace(ns)?;
            UdpSocket::bind(addr)
        })
        .join()
        .expect("the socket thread does not panic")
    })
}

/// Answers every datagram with itself until stopped.
struct EchoServer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl EchoServer {
    fn start(ns: &str, addr: SocketAddr) -> Self {
        let socket = udp_socket_in(ns, addr).unwrap_or_else(|e| panic!("echo server on {addr} in {ns}: {e}"));
        socket.set_read_timeout(Some(Duration::from_millis(20))).expect("set a read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            let mut echoed = 0;
            while !stopped.load(Ordering::Relaxed) {
                if let Ok((len, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..len], from);
                    echoed += 1;
                }
            }
            echoed
        });
        Self { stop, thread }
    }

    /// Stops it (freeing its port); returns how many datagrams it answered.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the echo thread does not panic")
    }
}

/// `count` UDP round trips from namespace `ns` to an echo server at `to`. Panics if one gets no
/// answer within a second.
fn round_trips(ns: &str, to: SocketAddr, count: u32) -> Vec<Duration> {
    let socket = udp_socket_in(ns, (Ipv4Addr::UNSPECIFIED, 0).into()).expect("a UDP socket in the namespace");
    socket.set_read_timeout(Some(Duration::from_secs(1))).expect("set a read timeout");
    let mut buf = [0u8; 64];
    (0..count)
        .map(|seq| {
            let ping = seq.to_le_bytes();
            let sent = Instant::now();
            socket.send_to(&ping, to).unwrap_or_else(|e| panic!("{ns} cannot send to {to}: {e}"));
            loop {
                match socket.recv_from(&mut buf) {
                    Ok((4, _)) if buf[..4] == ping => return sent.elapsed(),
                    Ok(_) => continue,
                    Err(e) => panic!("{ns} got no echo from {to} within 1 s: {e}"),
                }
            }
        })
        .collect()
}

/// Whether an echo server at `to` answers a datagram from namespace `ns` within 300 ms.
fn answers(ns: &str, to: SocketAddr) -> bool {
    let socket = udp_socket_in(ns, (Ipv4Addr::UNSPECIFIED, 0).into()).expect("a UDP socket in the namespace");
    socket.set_read_timeout(Some(Duration::from_millis(300))).expect("set a read timeout");
    if socket.send_to(b"direct?", to).is_err() {
        return false; // no route at all
    }
    let mut buf = [0u8; 64];
    socket.recv_from(&mut buf).is_ok()
}

/// Runs `cmd` to completion, killing it after `timeout`; `None` if it had to be killed.
pub fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Option<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
    // Read both pipes while waiting, so a chatty child never blocks on a full pipe.
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || read_all(&mut stdout));
    let err_reader = std::thread::spawn(move || read_all(&mut stderr));
    let finished = super::wait_for(timeout, || child.try_wait().expect("poll the child").is_some());
    if !finished {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait for the child");
    let stdout = out_reader.join().expect("the reader does not panic");
    let stderr = err_reader.join().expect("the reader does not panic");
    finished.then_some(Output { status, stdout, stderr })
}

fn read_all(pipe: &mut impl io::Read) -> Vec<u8> {
    let mut bytes = Vec::new();
    let _ = pipe.read_to_end(&mut bytes);
    bytes
}

/// Runs a command line (words split at spaces; no quoting).
fn try_run(line: &str) -> Result<(), String> {
    let mut words = line.split_whitespace();
    let program = words.next().expect("a command line names a program");
    let out = Command::new(program).args(words).output().map_err(|e| format!("cannot run `{program}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{line}` failed: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn must_run(line: &str) {
    if let Err(e) = try_run(line) {
        panic!("setting up the network namespaces: {e}");
    }
}
