//! Which CPUs a worker's compute runs on (`worker --compute-cpus`).
//!
//! A single stream computes on one shard of its pipeline at a time, and each shard's step starts when
//! the previous shard's frame wakes it. Where several shards share a host, that wake can land on a core
//! that has been idle since the shard's last step, and on a VM the step itself then runs slower, not
//! only later: on this project's 2-vCPU VMs a step handed to the other, halted vCPU took 8–12% longer
//! than the same step handed over on the same vCPU, with no network involved (`split_speed --hand-off`
//! and `--processes`, run pinned and unpinned; docs/NOTES.md, session 20). Giving every shard's compute
//! the same core removes that cost, and it also means two shards can never compute at once, which
//! concurrent requests need: it is a placement for latency of one stream at a time, not for throughput.
//!
//! Only the compute is placed: the worker's network thread stays wherever the OS puts it, so frames
//! are read and sent on another core while a step runs.

use std::fmt;
use std::io;
use std::str::FromStr;

/// The most CPUs a set may name: CPU numbers run from 0 to this less one (glibc's `CPU_SETSIZE`).
pub const MAX_CPUS: usize = 1024;

/// A non-empty set of CPU numbers, written as Linux writes them: `0`, `0,2`, `0-3`, `1,4-5`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuSet {
    /// Sorted, without repeats, each below [`MAX_CPUS`].
    cpus: Vec<usize>,
}

impl CpuSet {
    /// The CPUs this process may run on now (its affinity mask, which `taskset` or a container may
    /// narrow).
    pub fn allowed() -> io::Result<CpuSet> {
        sys::process_cpus()
    }

    /// Fails with a message naming the CPUs this process may use when the set holds any other.
    pub fn check_allowed(&self) -> Result<(), String> {
        let allowed = CpuSet::allowed().map_err(|e| format!("cannot read this process's CPU affinity: {e}"))?;
        let outside: Vec<usize> = self.cpus.iter().copied().filter(|c| !allowed.cpus.contains(c)).collect();
        if outside.is_empty() {
            return Ok(());
        }
        let outside = CpuSet { cpus: outside };
        Err(format!("CPUs {outside} are not among those this worker may run on ({allowed})"))
    }

    /// The set of one CPU, which must be below [`MAX_CPUS`] (take it from another set).
    pub fn single(cpu: usize) -> CpuSet {
        assert!(cpu < MAX_CPUS, "CPU {cpu} is past the last CPU a set can name");
        CpuSet { cpus: vec![cpu] }
    }

    /// The CPUs, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.cpus.iter().copied()
    }

    /// Confines the calling thread to these CPUs. Threads it starts afterwards inherit the set.
    pub fn pin_current_thread(&self) -> io::Result<()> {
        sys::pin_current_thread(&self.cpus)
    }
}

impl FromStr for CpuSet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let number = |part: &str| -> Result<usize, String> {
            let n: usize = part.trim().parse().map_err(|_| format!("`{}` in `{s}` is not a CPU number", part.trim()))?;
            if n >= MAX_CPUS {
                return Err(format!("CPU {n} in `{s}` is past the last CPU a set can name ({})", MAX_CPUS - 1));
            }
            Ok(n)
        };
        let mut cpus = Vec::new();
        for part in s.split(',') {
            match part.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (number(first)?, number(last)?);
                    if first > last {
                        return Err(format!("the range `{}` in `{s}` runs backwards", part.trim()));
                    }
                    cpus.extend(first..=last);
                }
                None => cpus.push(number(part)?),
            }
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(CpuSet { cpus })
    }
}

impl fmt::Display for CpuSet {
    /// Runs of consecutive CPUs as ranges: `0-3,6`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut i = 0;
        while i < self.cpus.len() {
            let mut j = i;
            while j + 1 < self.cpus.len() && self.cpus[j + 1] == self.cpus[j] + 1 {
                j += 1;
            }
            if i > 0 {
                f.write_str(",")?;
            }
            match j - i {
                0 => write!(f, "{}", self.cpus[i])?,
                _ => write!(f, "{}-{}", self.cpus[i], self.cpus[j])?,
            }
            i = j + 1;
        }
        Ok(())
    }
}

/// Confines the calling thread to a set of CPUs until dropped, then gives it back the set it had.
/// Threads started meanwhile keep the narrow set (how a CPU backend's helper threads, started while a
/// shard loads, end up next to its compute thread).
pub struct PinnedScope {
    previous: CpuSet,
}

impl PinnedScope {
    pub fn enter(cpus: &CpuSet) -> io::Result<PinnedScope> {
        let previous = sys::thread_cpus()?;
        cpus.pin_current_thread()?;
        Ok(PinnedScope { previous })
    }
}

impl Drop for PinnedScope {
    fn drop(&mut self) {
        if let Err(e) = self.previous.pin_current_thread() {
            tracing::warn!("could not give this thread back its CPUs {}: {e}", self.previous);
        }
    }
}

#[cfg(target_os = "linux")]
mod sys {
    use super::{CpuSet, MAX_CPUS};
    use std::io;

    fn mask_of(pid: libc::pid_t) -> io::Result<CpuSet> {
        // SAFETY: an all-zero cpu_set_t is a valid (empty) set; sched_getaffinity writes at most
        // `size_of::<cpu_set_t>()` bytes into it, and CPU_ISSET reads within it for numbers below
        // CPU_SETSIZE (= MAX_CPUS).
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(CpuSet { cpus: (0..MAX_CPUS).filter(|&c| libc::CPU_ISSET(c, &set)).collect() })
        }
    }

    /// The process's mask (its main thread's, which is the one `taskset` and containers set).
    pub fn process_cpus() -> io::Result<CpuSet> {
        // SAFETY: getpid has no preconditions.
        mask_of(unsafe { libc::getpid() })
    }

    pub fn thread_cpus() -> io::Result<CpuSet> {
        mask_of(0)
    }

    pub fn pin_current_thread(cpus: &[usize]) -> io::Result<()> {
        // SAFETY: as in `mask_of`; every number is below MAX_CPUS (CpuSet's invariant), and pid 0 is
        // the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use super::CpuSet;
    use std::io;

    fn unsupported() -> io::Error {
        io::Error::new(io::ErrorKind::Unsupported, "placing threads on CPUs is supported on Linux only")
    }

    pub fn process_cpus() -> io::Result<CpuSet> {
        Err(unsupported())
    }

    pub fn thread_cpus() -> io::Result<CpuSet> {
        Err(unsupported())
    }

    pub fn pin_current_thread(_: &[usize]) -> io::Result<()> {
        Err(unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &str) -> CpuSet {
        s.parse().unwrap_or_else(|e| panic!("`{s}` parses: {e}"))
    }

    #[test]
    fn lists_and_ranges_parse_to_sorted_unique_cpus_and_print_back_as_ranges() {
        assert_eq!(set("0").cpus, [0]);
        assert_eq!(set("3,1,2").cpus, [1, 2, 3]);
        assert_eq!(set("0-3,6").cpus, [0, 1, 2, 3, 6]);
        assert_eq!(set("4-5, 1 ,5").cpus, [1, 4, 5]);
        assert_eq!(set("3,1,2").to_string(), "1-3");
        assert_eq!(set("0,2,4-6,9").to_string(), "0,2,4-6,9");
        assert_eq!(set("1023").cpus, [1023]);
    }

    #[test]
    fn malformed_sets_are_refused_with_the_part_at_fault() {
        for (text, part) in [
            ("", "``"),
            ("0,", "``"),
            ("a", "`a`"),
            ("-1", "``"),
            ("3-1", "`3-1`"),
            ("0-2-4", "`2-4`"),
            ("1024", "1024"),
            ("0-99999", "99999"),
        ] {
            let err = text.parse::<CpuSet>().expect_err(text);
            assert!(err.contains(part), "`{text}`: {err}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pinned_scope_confines_the_thread_and_its_new_threads_then_restores_the_thread() {
        let before = sys::thread_cpus().expect("this thread's CPUs");
        let first = CpuSet { cpus: vec![before.cpus[0]] };
        let child_cpus = {
            let _scope = PinnedScope::enter(&first).expect("pinning to a CPU this thread may use");
            assert_eq!(sys::thread_cpus().expect("mask"), first);
            std::thread::spawn(|| sys::thread_cpus().expect("mask")).join().expect("the thread returns")
        };
        assert_eq!(child_cpus, first, "a thread started inside the scope inherits its CPUs");
        assert_eq!(sys::thread_cpus().expect("mask"), before, "the scope gives the thread its CPUs back");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn cpus_outside_the_process_mask_are_named_in_the_error() {
        let allowed = CpuSet::allowed().expect("this process's CPUs");
        assert_eq!(allowed.check_allowed(), Ok(()));
        let err = set("1023").check_allowed().expect_err("no test machine has 1024 CPUs");
        assert!(err.contains("1023") && err.contains(&allowed.to_string()), "{err}");
    }
}
