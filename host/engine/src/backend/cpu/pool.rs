//! A small persistent thread pool built for very frequent, very short parallel regions.
//!
//! A decode step of a small model runs a couple of hundred parallel regions (one per matrix product,
//! attention and so on), each lasting tens of microseconds, so what matters is the cost of one dispatch,
//! not throughput. The pool keeps `threads - 1` workers alive; the calling thread is the last member of
//! every region. Between regions a worker spins on one shared word for a short while
//! ([`SPIN_BEFORE_PARK`]) and only then parks, so a region that follows another one within that window
//! starts in well under a microsecond; a parked worker is woken with `Thread::unpark` (a futex wake).
//!
//! Work is handed out by task index through a single packed atomic word `epoch | next index | task
//! count`. A worker claims a task with a compare-and-swap that also checks the epoch, so a worker that
//! wakes late can never claim a task of a later region; the caller waits only for tasks that were
//! actually claimed, so a worker descheduled by the OS before claiming anything does not hold the caller
//! up (the caller simply runs the remaining tasks itself).
//!
//! Which thread runs which task is not deterministic; callers make their results independent of that
//! (every task writes its own outputs, and every output is computed in a fixed order).

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks. Long enough to bridge the serial gaps of a decode step
/// (norms, RoPE, sampling: tens to hundreds of microseconds), short enough that an idle process goes quiet
/// almost at once.
pub(crate) const SPIN_BEFORE_PARK: Duration = Duration::from_micros(1000);

/// How long the caller spins waiting for workers to finish claimed tasks before it starts yielding its
/// CPU to them (only matters when the machine is oversubscribed).
const CALLER_SPIN: Duration = Duration::from_micros(50);

/// Bits of the packed cursor word given to the task count and to the next task index.
const TASK_BITS: u32 = 18;
const TASK_MASK: u64 = (1 << TASK_BITS) - 1;
/// The most tasks one [`ThreadPool::run`] call may have.
pub(crate) const MAX_TASKS: usize = TASK_MASK as usize;
/// Bits left for the epoch (the region counter). It wraps after 2^28 regions; a wrong claim would need a
/// worker to stall between two instructions for exactly that many regions.
const EPOCH_SHIFT: u32 = 2 * TASK_BITS;
const EPOCH_MASK: u64 = (1 << (64 - EPOCH_SHIFT)) - 1;

/// The task closure of the region in flight, with its lifetime erased (see `ThreadPool::run`).
type TaskFn = dyn Fn(usize) + Sync + 'static;

fn pack(epoch: u64, next: u64, n: u64) -> u64 {
    ((epoch & EPOCH_MASK) << EPOCH_SHIFT) | (next << TASK_BITS) | n
}

fn epoch_of(word: u64) -> u64 {
    word >> EPOCH_SHIFT
}

fn next_of(word: u64) -> u64 {
    (word >> TASK_BITS) & TASK_MASK
}

fn count_of(word: u64) -> u64 {
    word & TASK_MASK
}

/// State shared by the caller and the workers. Each hot atomic sits on its own cache line.
struct Shared {
    /// `epoch | next index | task count` of the current region.
    cursor: CachePadded<AtomicU64>,
    /// Tasks finished in the current region.
    done: CachePadded<AtomicUsize>,
    /// Points at a `&TaskFn` on the caller's stack; valid while the current region has unclaimed or
    /// unfinished tasks.
    job: CachePadded<AtomicPtr<&'static TaskFn>>,
    shutdown: AtomicBool,
    /// Set by [`ThreadPool::park_idle_workers`]: idle workers park at once instead of spinning out
    /// their window. Cleared by the next region.
    park_now: AtomicBool,
    /// The first panic raised by a task of the current region, re-raised on the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Per worker: `true` while it is parked (or about to park).
    sleeping: Vec<CachePadded<AtomicBool>>,
}

#[repr(align(128))]
struct CachePadded<T>(T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl Shared {
    /// Claims and runs tasks of region `epoch` until none is left. Returns without touching anything if
    /// the region is already over.
    fn work(&self, epoch: u64) {
        loop {
            let word = self.cursor.load(Ordering::SeqCst);
            if epoch_of(word) != epoch & EPOCH_MASK || next_of(word) >= count_of(word) {
                return;
            }
            if self
                .cursor
                .compare_exchange_weak(word, word + (1 << TASK_BITS), Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let index = next_of(word) as usize;
            // SAFETY: the claim above succeeded for a task of region `epoch`, so that region has an
            // unfinished task (this one) and its caller is still inside `run`, waiting for `done` to reach
            // the task count; the pointer it stored before publishing the region (SeqCst, so this load
            // sees it and not a later one) stays valid until then.
            let task: &TaskFn = unsafe { *self.job.load(Ordering::SeqCst) };
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| task(index))) {
                let mut slot = self.panic.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                slot.get_or_insert(payload);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

/// A fixed set of worker threads plus the calling thread. See the module docs for the protocol.
pub(crate) struct ThreadPool {
    shared: Arc<Shared>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
    /// Taken by the caller of `run` for the duration of a region. A second concurrent (or nested) caller
    /// does not wait: it runs its tasks inline, which gives the same results.
    busy: AtomicBool,
    /// The last epoch published; only touched while `busy` is held.
    epoch: AtomicU64,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("threads", &(self.handles.len() + 1))
            .finish()
    }
}

impl ThreadPool {
    /// A pool whose regions run on `threads` threads: `threads - 1` new workers plus the caller.
    ///
    /// If the OS refuses to start a worker the pool simply has fewer (a warning is logged); it never
    /// fails.
    pub(crate) fn new(threads: usize) -> Self {
        let workers = threads.max(1) - 1;
        let shared = Arc::new(Shared {
            cursor: CachePadded(AtomicU64::new(pack(0, 0, 0))),
            done: CachePadded(AtomicUsize::new(0)),
            job: CachePadded(AtomicPtr::new(std::ptr::null_mut())),
            shutdown: AtomicBool::new(false),
            park_now: AtomicBool::new(false),
            panic: Mutex::new(None),
            sleeping: (0..workers).map(|_| CachePadded(AtomicBool::new(false))).collect(),
        });
        let mut handles = Vec::with_capacity(workers);
        for index in 0..workers {
            let shared = Arc::clone(&shared);
            let spawned = thread::Builder::new()
                .name(format!("cpu-backend-{index}"))
                .spawn(move || worker_loop(&shared, index));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(err) => {
                    tracing::warn!(%err, "could not start a CPU backend worker; running with fewer threads");
                    break;
                }
            }
        }
        let threads = handles.iter().map(|h| h.thread().clone()).collect();
        Self {
            shared,
            threads,
            handles,
            busy: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
        }
    }

    /// Threads a region runs on (workers plus the caller).
    pub(crate) fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// Tells idle workers to park now rather than spin for [`SPIN_BEFORE_PARK`]: for a caller that
    /// knows no region follows soon (a pipeline shard waiting for its neighbour), so another process
    /// on the same cores gets them at once. The next region wakes them as usual (a futex wake each).
    pub(crate) fn park_idle_workers(&self) {
        self.shared.park_now.store(true, Ordering::SeqCst);
    }

    /// Runs `task(i)` for every `i < n_tasks`, spread over the pool, and returns when all have finished.
    ///
    /// Tasks are claimed dynamically in index order; give early indices the larger tasks if sizes vary.
    /// A panic in any task is re-raised here after every claimed task has finished. Cost: with workers
    /// spinning, well under a microsecond to publish plus one atomic claim per task; a parked worker
    /// takes a futex wake (a few to tens of microseconds) to join, while the caller starts at once.
    pub(crate) fn run(&self, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
        assert!(
            n_tasks <= MAX_TASKS,
            "a parallel region has at most {MAX_TASKS} tasks, got {n_tasks}"
        );
        if n_tasks == 0 {
            return;
        }
        if n_tasks == 1
            || self.handles.is_empty()
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            (0..n_tasks).for_each(task);
            return;
        }
        let _release = ReleaseOnDrop(&self.busy);
        let shared = &*self.shared;
        // SAFETY: the reference is only used by workers that claimed a task of this region, and this
        // function does not return (nor unwind: task panics are caught) before every claimed task has
        // finished, so the erased lifetime never outlives `task`.
        let slot: &'static TaskFn = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static TaskFn>(task) };
        let epoch = self.epoch.load(Ordering::Relaxed).wrapping_add(1);
        self.epoch.store(epoch, Ordering::Relaxed);
        shared.park_now.store(false, Ordering::SeqCst);
        shared.done.store(0, Ordering::SeqCst);
        shared
            .job
            .store(&slot as *const &TaskFn as *mut &'static TaskFn, Ordering::SeqCst);
        shared.cursor.store(pack(epoch, 0, n_tasks as u64), Ordering::SeqCst);
        for (sleeping, thread) in shared.sleeping.iter().zip(&self.threads) {
            if sleeping.load(Ordering::SeqCst) {
                thread.unpark();
            }
        }
        shared.work(epoch);
        let mut spins = 0u32;
        let mut since: Option<Instant> = None;
        while shared.done.load(Ordering::Acquire) != n_tasks {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            // A worker holding a task may have been descheduled: after a short spin, give it the CPU.
            let since = *since.get_or_insert_with(Instant::now);
            if since.elapsed() > CALLER_SPIN {
                thread::yield_now();
            }
        }
        // Nothing may dereference `slot` any more: every task has been claimed and finished.
        shared.job.store(std::ptr::null_mut(), Ordering::SeqCst);
        let payload = shared
            .panic
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(payload) = payload {
            resume_unwind(payload);
        }
    }
}

struct ReleaseOnDrop<'a>(&'a AtomicBool);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for thread in &self.threads {
            thread.unpark();
        }
        for handle in self.handles.drain(..) {
            // A worker never panics (task panics are caught), so a join error is impossible; ignore it
            // rather than panic in drop.
            let _ = handle.join();
        }
    }
}

fn worker_loop(shared: &Shared, index: usize) {
    let mut seen = epoch_of(shared.cursor.load(Ordering::SeqCst));
    loop {
        // Wait for a new region: spin first, then park.
        let started = Instant::now();
        let mut spins = 0u32;
        let epoch = loop {
            let epoch = epoch_of(shared.cursor.load(Ordering::SeqCst));
            if epoch != seen {
                break epoch;
            }
            if shared.shutdown.load(Ordering::Relaxed) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64)
                || (started.elapsed() < SPIN_BEFORE_PARK && !shared.park_now.load(Ordering::Relaxed))
            {
                std::hint::spin_loop();
                continue;
            }
            let sleeping = &shared.sleeping[index];
            sleeping.store(true, Ordering::SeqCst);
            // Re-check after announcing: either the caller sees `sleeping` and unparks us, or we see
            // its new epoch here (both sides use SeqCst).
            if epoch_of(shared.cursor.load(Ordering::SeqCst)) == seen && !shared.shutdown.load(Ordering::SeqCst) {
                thread::park();
            }
            sleeping.store(false, Ordering::SeqCst);
        };
        seen = epoch;
        shared.work(epoch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_task_runs_exactly_once() {
        for threads in 1..=4 {
            let pool = ThreadPool::new(threads);
            for n in [0usize, 1, 2, 3, 7, 64, 1000] {
                let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                    "threads {threads}, n {n}"
                );
            }
        }
    }

    #[test]
    fn released_workers_park_and_come_back_for_the_next_region() {
        let pool = ThreadPool::new(3);
        // How much sooner they park is a matter of timing (measured in the pipeline benchmarks); what
        // is checked here is that a release never loses a region or a worker.
        for round in 0..50 {
            pool.park_idle_workers();
            if round % 10 == 0 {
                let parked = (0..1000).any(|_| {
                    thread::sleep(Duration::from_micros(100));
                    pool.shared.sleeping.iter().all(|s| s.load(Ordering::SeqCst))
                });
                assert!(parked, "released workers should park");
            }
            let hits = AtomicUsize::new(0);
            pool.run(64, &|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 64);
        }
    }

    #[test]
    fn many_back_to_back_regions_and_parking() {
        let pool = ThreadPool::new(3);
        let total = AtomicUsize::new(0);
        for round in 0..20_000 {
            pool.run(1 + round % 5, &|i| {
                total.fetch_add(i + 1, Ordering::Relaxed);
            });
            if round % 5000 == 4999 {
                // Let the workers park, then make sure they wake up for the next region.
                thread::sleep(SPIN_BEFORE_PARK * 3);
            }
        }
        let expected: usize = (0..20_000).map(|r| (1..=1 + r % 5).sum::<usize>()).sum();
        assert_eq!(total.load(Ordering::Relaxed), expected);
    }

    #[test]
    fn nested_and_concurrent_runs_complete() {
        let pool = ThreadPool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 12);
        let pool = &pool;
        thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        pool.run(8, &|_| {
                            count.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(count.load(Ordering::Relaxed), 12 + 3 * 200 * 8);
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(16, &|i| {
                if i == 11 {
                    panic!("task eleven");
                }
            })
        }));
        assert!(result.is_err());
        let count = AtomicUsize::new(0);
        pool.run(16, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }

    /// Dispatch latency of an empty region; run with `--ignored --nocapture`.
    #[test]
    #[ignore = "benchmark"]
    fn dispatch_latency() {
        for threads in [1, 2] {
            let pool = ThreadPool::new(threads);
            let sink = AtomicUsize::new(0);
            let task = |i: usize| {
                sink.fetch_add(i, Ordering::Relaxed);
            };
            for _ in 0..10_000 {
                pool.run(threads, &task);
            }
            let rounds = 200_000;
            let start = Instant::now();
            for _ in 0..rounds {
                pool.run(threads, &task);
            }
            let per = start.elapsed() / rounds;
            println!("threads {threads}: {per:?} per region of {threads} tiny tasks (workers spinning)");
            // After the workers have parked: the region waits for a futex wake only if the caller does
            // not finish every task itself first.
            let mut worst = Duration::ZERO;
            let mut total = Duration::ZERO;
            for _ in 0..20 {
                thread::sleep(SPIN_BEFORE_PARK * 3);
                let start = Instant::now();
                pool.run(64, &|i| {
                    sink.fetch_add(i, Ordering::Relaxed);
                    std::hint::black_box((0..200).sum::<usize>());
                });
                let took = start.elapsed();
                worst = worst.max(took);
                total += took;
            }
            println!(
                "threads {threads}: {:?} mean, {worst:?} worst for a 64-task region after parking",
                total / 20
            );
        }
    }
}
