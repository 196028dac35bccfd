//! Keeps a worker's CPUs from idling while it has live requests (`worker --keep-cpus-awake`).
//!
//! A pipeline worker idles between the steps of a stream: it waits for the frame that crosses the
//! other shards (and, between hosts, the network). On a VM an idle vCPU halts: the hypervisor takes
//! the physical core back, and the wake that follows costs more than on bare metal, as does the step
//! after it. On this project's 2-vCPU VMs (docs/NOTES.md, session 21), with the CPUs kept awake by
//! such spinners (this flag, or the same spinners started by hand for the probes):
//! - a thread woken on the other, idle vCPU ran 32 µs after the write that woke it, against 78 µs
//!   when that vCPU halted (median of 1000, scripts/bench/wake_latency.c);
//! - a shard's step after a 5 ms sleep ran 0.7% over the same step without the sleep, against 2.7%
//!   (`split_speed --nap-us`, 6 rounds);
//! - across network namespaces with 5 ms links (1-thread workers sleeping between steps), the shards'
//!   forward passes added up to 0.4–1.9 ms less per token in 10 of 10 paired runs (2 and 3 shards, 6
//!   of them with this flag, 2 of those in docs/BENCHMARKS.md), but what the hops took grew in 6 of
//!   them (cause not found), and the per-token time was lower in 7;
//! - on loopback, where each shard waits only for the other's step, it gained nothing: 2 shards ran at
//!   0.96× (0.94–1.16) of the same pipeline without it over 8 alternating rounds.
//!
//! The kernel's own cure is `idle=poll` on the guest's command line, which an operator of a rented VM
//! often cannot set, and which burns every core all the time. This does the same for the CPUs this
//! process may use, and only while the worker has requests: one thread per CPU, pinned there, in the
//! `SCHED_IDLE` class, spinning. A `SCHED_IDLE` thread runs only when its CPU has nothing else to run,
//! and a normal thread that wakes there preempts it at once, so the spinners take no time from the
//! shard's compute, its network thread or anything else on the host. What they cost: the CPUs never
//! rest while a request is live (power; on a VM, the host's CPU time, which a provider may bill or
//! throttle). With no live request they are parked and cost nothing.
//!
//! No spinner runs at any other priority: a thread that cannot enter `SCHED_IDLE` makes the whole
//! start fail, since a normal-priority spinner would take the cores from the shards.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use super::cpus::CpuSet;

/// The spinners of one worker: started by [`KeepAwake::start`], parked until [`KeepAwake::set_active`]
/// says a request is live, stopped when dropped.
pub struct KeepAwake {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    active: AtomicBool,
    stop: AtomicBool,
}

impl KeepAwake {
    /// One parked spinner on each CPU of `cpus` (each pinned there, in `SCHED_IDLE`). Fails, with
    /// nothing left running, if a thread cannot be placed or cannot enter `SCHED_IDLE`.
    pub fn start(cpus: &CpuSet) -> io::Result<KeepAwake> {
        let shared = Arc::new(Shared { active: AtomicBool::new(false), stop: AtomicBool::new(false) });
        let mut awake = KeepAwake { shared: shared.clone(), threads: Vec::new() };
        for cpu in cpus.iter() {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let shared = shared.clone();
            let thread = std::thread::Builder::new().name(format!("awake-{cpu}")).spawn(move || {
                let placed = CpuSet::single(cpu).pin_current_thread().and_then(|()| sys::enter_idle_class());
                let ok = placed.is_ok();
                let _ = ready_tx.send(placed);
                if ok {
                    spin_while_active(&shared);
                }
            })?;
            awake.threads.push(thread);
            // A thread that failed to place itself has already returned; dropping `awake` joins it and
            // stops the others.
            ready_rx
                .recv()
                .map_err(|_| io::Error::other("a spinner thread ended before it was placed"))?
                .map_err(|e| io::Error::new(e.kind(), format!("keeping CPU {cpu} awake: {e}")))?;
        }
        Ok(awake)
    }

    /// Spin (a request is live) or park (none is). Cheap when nothing changes: the engine loop calls it
    /// after every batch.
    pub fn set_active(&self, active: bool) {
        if self.shared.active.swap(active, Ordering::AcqRel) != active && active {
            for thread in &self.threads {
                thread.thread().unpark();
            }
        }
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for thread in self.threads.drain(..) {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

fn spin_while_active(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        if !shared.active.load(Ordering::Acquire) {
            // An unpark between the load above and this park leaves a token: park returns at once.
            std::thread::park();
            continue;
        }
        for _ in 0..1024 {
            std::hint::spin_loop();
        }
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use std::io;

    /// Moves the calling thread to `SCHED_IDLE` (any thread may lower itself; no privilege needed).
    pub fn enter_idle_class() -> io::Result<()> {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: pid 0 is the calling thread; `param` is a live sched_param, which SCHED_IDLE requires
        // to hold priority 0.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;

    pub fn enter_idle_class() -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "SCHED_IDLE threads are supported on Linux only"))
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// (state letter, scheduling policy) of each of this process's threads called `name`, from
    /// /proc/self/task/*/stat (fields 3 and 41; the name, field 2, may hold spaces, so fields are
    /// counted after its closing parenthesis).
    fn threads_named(name: &str) -> Vec<(char, u32)> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").expect("this process's threads") {
            let Ok(stat) = std::fs::read_to_string(task.expect("a thread").path().join("stat")) else { continue };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            if &stat[open + 1..close] != name {
                continue;
            }
            let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            let state = rest[0].chars().next().expect("a state letter");
            let policy = rest[38].parse().expect("the policy is a number");
            found.push((state, policy));
        }
        found
    }

    /// Waits up to 5 s for every thread called `name` to be in `state` (R: running or runnable, S:
    /// sleeping); the last reading.
    fn wait_for_state(name: &str, state: char) -> Vec<(char, u32)> {
        let started = Instant::now();
        loop {
            let now = threads_named(name);
            if (!now.is_empty() && now.iter().all(|(s, _)| *s == state)) || started.elapsed() > Duration::from_secs(5) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn spinners_sit_parked_in_the_idle_class_until_active_and_are_gone_once_dropped() {
        let cpu = CpuSet::allowed().expect("this process's CPUs").iter().next().expect("at least one CPU");
        let name = format!("awake-{cpu}");
        let awake = KeepAwake::start(&CpuSet::single(cpu)).expect("SCHED_IDLE needs no privilege");
        let parked = wait_for_state(&name, 'S');
        assert_eq!(parked, [('S', libc::SCHED_IDLE as u32)], "one parked SCHED_IDLE spinner");
        awake.set_active(true);
        assert_eq!(wait_for_state(&name, 'R'), [('R', libc::SCHED_IDLE as u32)], "spinning once a request is live");
        awake.set_active(true); // no change: nothing happens
        awake.set_active(false);
        assert_eq!(wait_for_state(&name, 'S'), [('S', libc::SCHED_IDLE as u32)], "parked again");
        drop(awake);
        assert!(threads_named(&name).is_empty(), "dropping joins the spinners");
    }

    #[test]
    fn a_cpu_the_process_may_not_use_fails_the_start_and_leaves_no_spinner() {
        let err = KeepAwake::start(&"1023".parse().expect("a CPU set")).err().expect("no test machine has 1024 CPUs");
        assert!(err.to_string().contains("keeping CPU 1023 awake"), "{err}");
        assert!(threads_named("awake-1023").is_empty());
    }
}
