//! Micro-benchmarks of the CPU backend's kernels.
//!
//! ```text
//! cargo run --release -p computepool-engine --example kernel_bench \
//!     [-- [SECTION...] [--threads 1,2] [--batch 4,8] [--cpu-time]]
//! ```
//! Sections: `quant` (decode products with Q4_0/Q4_1/Q8_0 weights at SmolLM2's shapes, ggml's row
//! layout beside the interleaved one `CpuBackend::prepare_weight` makes, batch 1 and `--batch`),
//! `matvec` (GB/s of decode products, weights cycled through a working set larger than the
//! last-level cache, as a real model does), `batch` (the same products for batches: time, GB/s and
//! GFLOP/s), `hot` (batched products whose weights stay in L2: arithmetic throughput, e.g. what a tile
//! shape or widening bf16 costs), `gemm` (GFLOP/s at n = 512), `attention`, `model` (SmolLM2-135M-shaped
//! decode, batched decode and pp512, matrix products + attention only; single-stream and batched decode
//! run interleaved and the batched/single ratio is taken per round). Default: all. `--threads` sets the
//! thread counts (default 1,2), `--batch` the batch sizes of `batch` and `hot` (default
//! 4,6,7,8,9,12,16,17,32, `hot` also 1) and of `model` (default 8).
//!
//! Numbers are medians of repetitions with the range in brackets (`median [min–max]`): the machine is
//! shared and noisy, so compare two builds side by side, alternating runs. `--cpu-time` times on the
//! calling thread's CPU time (Linux), which with `--threads 1` leaves out the time other processes hold
//! the core.

use computepool_engine::backend::cpu::{AttentionShape, CpuBackend, KvView, rms_norm, silu_mul};
use computepool_engine::tensor::{QuantKind, Weight, WeightData};
use half::bf16;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Bytes of weights cycled through, so that nothing stays in the last-level cache between passes.
const WORKING_SET: usize = 320 << 20;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect()
}

fn weight(rows: usize, cols: usize, bf: bool, seed: u64) -> Weight {
    let v = random(rows * cols, seed);
    let data = if bf {
        WeightData::Bf16(v.iter().map(|x| bf16::from_f32(*x)).collect())
    } else {
        WeightData::F32(v.into())
    };
    Weight { rows, cols, data }
}

fn dtype(bf: bool) -> &'static str {
    if bf { "bf16" } else { "f32" }
}

/// Median, fastest and slowest of a set of timings.
#[derive(Clone, Copy)]
struct Stats {
    median: Duration,
    min: Duration,
    max: Duration,
}

impl Stats {
    fn of(mut times: Vec<Duration>) -> Stats {
        times.sort();
        Stats {
            median: times[times.len() / 2],
            min: times[0],
            max: times[times.len() - 1],
        }
    }

    /// `median [min–max]` of `f(time)`, e.g. a rate (the fastest time gives the largest rate).
    fn show(&self, f: impl Fn(Duration) -> f64, precision: usize) -> String {
        let (a, b) = (f(self.min), f(self.max));
        format!(
            "{:.p$} [{:.p$}–{:.p$}]",
            f(self.median),
            a.min(b),
            a.max(b),
            p = precision
        )
    }
}

/// Whether times are the calling thread's CPU time instead of wall-clock time (`--cpu-time`).
static CPU_TIME: AtomicBool = AtomicBool::new(false);

/// A point in time on the clock chosen by `--cpu-time`.
#[derive(Clone, Copy)]
enum Clock {
    Wall(Instant),
    /// Nanoseconds this thread has run on a CPU.
    Cpu(u64),
}

impl Clock {
    fn now() -> Clock {
        if CPU_TIME.load(Ordering::Relaxed) {
            Clock::Cpu(thread_cpu_nanos())
        } else {
            Clock::Wall(Instant::now())
        }
    }

    fn elapsed(self) -> Duration {
        match self {
            Clock::Wall(start) => start.elapsed(),
            Clock::Cpu(start) => Duration::from_nanos(thread_cpu_nanos() - start),
        }
    }
}

/// Time the calling thread has run on a CPU (`CLOCK_THREAD_CPUTIME_ID`, nanosecond resolution). With
/// one thread this leaves out the time other processes on a shared machine hold the core; it still
/// counts their effect on caches and memory bandwidth.
#[cfg(target_os = "linux")]
fn thread_cpu_nanos() -> u64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    unsafe extern "C" {
        fn clock_gettime(clock: i32, out: *mut Timespec) -> i32;
    }
    let mut t = Timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec (64-bit Linux layout) and the clock id is a constant
    // every Linux kernel since 2.6.12 supports.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_nanos() -> u64 {
    eprintln!("--cpu-time is only implemented on Linux");
    std::process::exit(2);
}

/// Time per iteration of `f` over `reps` repetitions of `iters` calls, after one warm-up call.
fn timed(reps: usize, iters: usize, mut f: impl FnMut(usize)) -> Stats {
    f(0);
    let mut k = 0;
    let times = (0..reps)
        .map(|_| {
            let start = Clock::now();
            for _ in 0..iters {
                f(k);
                k += 1;
            }
            start.elapsed() / iters as u32
        })
        .collect();
    Stats::of(times)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn matvec(threads: &[usize], batch: &[usize]) {
    println!("\n## decode mat-vec (weights cycled through {} MiB)", WORKING_SET >> 20);
    println!(
        "{:>14} {:>5} {:>3} {:>3} {:>26} {:>22} {:>22}",
        "shape", "dtype", "thr", "n", "time µs", "GB/s", "GFLOP/s"
    );
    for &(rows, cols) in &[(576usize, 1536usize), (1536, 576), (3072, 576), (49152, 576)] {
        for bf in [true, false] {
            let bytes = rows * cols * if bf { 2 } else { 4 };
            let copies = WORKING_SET.div_ceil(bytes).max(2);
            let ws: Vec<Weight> = (0..copies).map(|i| weight(rows, cols, bf, i as u64 + 1)).collect();
            for &t in threads {
                let backend = CpuBackend::new(t);
                for &n in batch {
                    let x = random(n * cols, 99);
                    let mut y = vec![0f32; n * rows];
                    let iters = (copies * 2).max(8);
                    let stats = timed(9, iters, |k| backend.matmul(&x, n, &ws[k % copies], &mut y));
                    let flops = 2.0 * (n * rows * cols) as f64;
                    println!(
                        "{:>14} {:>5} {:>3} {:>3} {:>26} {:>22} {:>22}",
                        format!("{rows}x{cols}"),
                        dtype(bf),
                        t,
                        n,
                        stats.show(micros, 1),
                        stats.show(|d| bytes as f64 / d.as_secs_f64() / 1e9, 1),
                        stats.show(|d| flops / d.as_secs_f64() / 1e9, 1),
                    );
                }
            }
        }
    }
}

/// Random blocks of `kind` for a `[rows, cols]` matrix: random value bytes, small positive f16 scales
/// (and minimums), in ggml's row layout.
fn quant_weight(kind: QuantKind, rows: usize, cols: usize, seed: u64) -> Weight {
    let v = random(rows * kind.row_bytes(cols), seed);
    let mut blocks: Vec<u8> = v.iter().map(|x| ((x + 0.1) * 1275.0) as u8).collect();
    for block in blocks.chunks_exact_mut(kind.block_bytes()) {
        block[0..2].copy_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
        if kind == QuantKind::Q4_1 {
            block[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        }
    }
    Weight { rows, cols, data: WeightData::Quant { kind, blocks: blocks.into() } }
}

/// Decode products with quantized weights, ggml's row layout against the interleaved one, side by side
/// (same run, alternating per repetition set), weights cycled through a working set larger than L3.
fn quant(threads: &[usize], batch: &[usize]) {
    println!("\n## quantized decode products (weights cycled through {} MiB)", WORKING_SET >> 20);
    println!(
        "{:>14} {:>5} {:>11} {:>3} {:>3} {:>26} {:>22}",
        "shape", "kind", "layout", "thr", "n", "time µs", "GB/s"
    );
    let shapes = [
        (QuantKind::Q4_1, 960usize, 576usize),
        (QuantKind::Q4_1, 576, 576),
        (QuantKind::Q4_1, 3072, 576),
        (QuantKind::Q4_1, 576, 1536),
        (QuantKind::Q8_0, 49152, 576),
        (QuantKind::Q4_0, 3072, 576),
    ];
    for (kind, rows, cols) in shapes {
        let bytes = rows * kind.row_bytes(cols);
        let copies = WORKING_SET.div_ceil(bytes).max(2);
        for &t in threads {
            let backend = CpuBackend::new(t);
            let row_layout: Vec<Weight> = (0..copies).map(|i| quant_weight(kind, rows, cols, i as u64 + 1)).collect();
            let interleaved: Vec<Weight> = row_layout.iter().map(|w| backend.prepare_weight(w.clone())).collect();
            for &n in batch {
                let x = random(n * cols, 99);
                let mut y = vec![0f32; n * rows];
                let iters = (copies * 2).max(8);
                for (layout, ws) in [("rows", &row_layout), ("interleaved", &interleaved)] {
                    let stats = timed(9, iters, |k| backend.matmul(&x, n, &ws[k % copies], &mut y));
                    println!(
                        "{:>14} {:>5} {:>11} {:>3} {:>3} {:>26} {:>22}",
                        format!("{rows}x{cols}"),
                        ws[0].storage_name(),
                        layout,
                        t,
                        n,
                        stats.show(micros, 1),
                        stats.show(|d| bytes as f64 / d.as_secs_f64() / 1e9, 1),
                    );
                }
            }
        }
    }
}

/// Products whose weights stay in L2 (a 192×576 slice is 216 KiB in bf16, 432 KiB in f32): the kernels'
/// arithmetic throughput with memory out of the way, e.g. what widening bf16 weights costs.
fn hot(threads: &[usize], batch: &[usize]) {
    let (rows, cols) = (192usize, 576usize);
    println!("\n## decode mat-vec, weights in L2 ({rows}x{cols})");
    println!(
        "{:>5} {:>3} {:>3} {:>26} {:>22}",
        "dtype", "thr", "n", "time µs", "GFLOP/s"
    );
    for bf in [true, false] {
        let w = weight(rows, cols, bf, 1);
        for &t in threads {
            let backend = CpuBackend::new(t);
            for &n in batch {
                let x = random(n * cols, 99);
                let mut y = vec![0f32; n * rows];
                let stats = timed(9, 200, |_| backend.matmul(&x, n, &w, &mut y));
                let flops = 2.0 * (n * rows * cols) as f64;
                println!(
                    "{:>5} {:>3} {:>3} {:>26} {:>22}",
                    dtype(bf),
                    t,
                    n,
                    stats.show(micros, 2),
                    stats.show(|d| flops / d.as_secs_f64() / 1e9, 1),
                );
            }
        }
    }
}

fn gemm(threads: &[usize]) {
    let n = 512;
    println!("\n## prefill GEMM, n = {n}");
    println!(
        "{:>14} {:>5} {:>3} {:>24} {:>22}",
        "shape", "dtype", "thr", "time ms", "GFLOP/s"
    );
    for &(rows, cols) in &[(576usize, 576usize), (960, 576), (3072, 576), (576, 1536)] {
        let x = random(n * cols, 5);
        let mut y = vec![0f32; n * rows];
        let flops = 2.0 * (n * rows * cols) as f64;
        for bf in [true, false] {
            let w = weight(rows, cols, bf, 3);
            for &t in threads {
                let backend = CpuBackend::new(t);
                let stats = timed(7, 5, |_| backend.matmul(&x, n, &w, &mut y));
                println!(
                    "{:>14} {:>5} {:>3} {:>24} {:>22}",
                    format!("{rows}x{cols}"),
                    dtype(bf),
                    t,
                    stats.show(|d| d.as_secs_f64() * 1e3, 2),
                    stats.show(|d| flops / d.as_secs_f64() / 1e9, 1),
                );
            }
        }
        // The `gemm` crate on the same f32 product, for comparison (its own threading via rayon is not
        // enabled here, so single-threaded).
        let w = random(rows * cols, 3);
        let stats = timed(7, 5, |_| {
            // SAFETY: all pointers and strides describe the live buffers above: y [n, rows] row-major,
            // x [n, cols] row-major, w^T as [cols, rows] with column stride cols.
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    cols,
                    y.as_mut_ptr(),
                    1,
                    rows as isize,
                    false,
                    x.as_ptr(),
                    1,
                    cols as isize,
                    w.as_ptr(),
                    cols as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                )
            }
        });
        println!(
            "{:>14} {:>5} {:>3} {:>24} {:>22}   (gemm crate, 1 thread)",
            format!("{rows}x{cols}"),
            "f32",
            1,
            stats.show(|d| d.as_secs_f64() * 1e3, 2),
            stats.show(|d| flops / d.as_secs_f64() / 1e9, 1),
        );
    }
}

fn attention(threads: &[usize]) {
    println!("\n## attention (9 heads, 3 KV heads, head_dim 64)");
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        sliding_window: None,
    };
    let width = 9 * 64;
    let cap = 4096;
    let k = random(3 * cap * 64, 1);
    let v = random(3 * cap * 64, 2);
    for &t in threads {
        let backend = CpuBackend::new(t);
        // Prefill 512 from position 0.
        let n = 512;
        let q = random(n * width, 3);
        let mut out = vec![0f32; n * width];
        let kv = KvView {
            k: &k,
            v: &v,
            capacity: cap,
            len: n,
        };
        let stats = timed(5, 3, |_| backend.attention(&q, n, 0, kv, shape, &mut out));
        let pairs = (n * (n + 1) / 2) as f64;
        let flops = pairs * 9.0 * 64.0 * 4.0;
        println!(
            "prefill n=512   thr {t}: {} ms, {} GFLOP/s",
            stats.show(|d| d.as_secs_f64() * 1e3, 2),
            stats.show(|d| flops / d.as_secs_f64() / 1e9, 1),
        );
        for len in [128usize, 1024, 4096] {
            let q = random(width, 4);
            let mut out = vec![0f32; width];
            let kv = KvView {
                k: &k,
                v: &v,
                capacity: cap,
                len,
            };
            let stats = timed(5, 50, |_| backend.attention(&q, 1, len - 1, kv, shape, &mut out));
            let bytes = (2 * 3 * len * 64 * 4) as f64;
            println!(
                "decode len={len:<5} thr {t}: {} µs, {} GB/s of KV",
                stats.show(micros, 1),
                stats.show(|d| bytes / d.as_secs_f64() / 1e9, 1),
            );
        }
        // A decode step deep into a conversation: every layer's cache in turn, 30 of them (SmolLM2's
        // layers) at 2048 positions, ~94 MB together: more than the last-level cache, as in a model.
        let (layers, len) = (30usize, 2048usize);
        let caches: Vec<(Vec<f32>, Vec<f32>)> =
            (0..layers as u64).map(|i| (random(3 * len * 64, 10 + 2 * i), random(3 * len * 64, 11 + 2 * i))).collect();
        let q = random(width, 4);
        let mut out = vec![0f32; width];
        let stats = timed(5, 5, |_| {
            for (k, v) in &caches {
                let kv = KvView { k, v, capacity: len, len };
                backend.attention(&q, 1, len - 1, kv, shape, &mut out);
            }
        });
        let bytes = (layers * 2 * 3 * len * 64 * 4) as f64;
        println!(
            "decode len={len} × {layers} layers (beyond the LLC) thr {t}: {} µs per layer, {} GB/s of KV",
            stats.show(|d| micros(d) / layers as f64, 1),
            stats.show(|d| bytes / d.as_secs_f64() / 1e9, 1),
        );
    }
}

/// SmolLM2-135M: 30 layers, hidden 576, 9/3 heads of 64, MLP 1536, vocab 49152 (tied lm_head), with
/// the fused q|k|v and gate|up projections `model/llama.rs` uses.
fn model(threads: &[usize], batch: &[usize]) {
    println!("\n## SmolLM2-135M-shaped forward passes (products, attention, norms, SwiGLU; no RoPE/sampling)");
    let (layers, hidden, inter, kv_dim, vocab) = (30usize, 576usize, 1536usize, 192usize, 49152usize);
    let qkv_dim = hidden + 2 * kv_dim;
    let shape = AttentionShape {
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        sliding_window: None,
    };
    let cap = 1024;
    let k = random(3 * cap * 64, 1);
    let v = random(3 * cap * 64, 2);
    let norm_w = vec![1f32; hidden];
    for bf in [true, false] {
        let mats: Vec<[Weight; 3]> = (0..layers)
            .map(|l| {
                let s = l as u64 * 10;
                [
                    weight(qkv_dim, hidden, bf, s + 1),
                    weight(hidden, hidden, bf, s + 2),
                    weight(2 * inter, hidden, bf, s + 3),
                ]
            })
            .collect();
        let downs: Vec<Weight> = (0..layers)
            .map(|l| weight(hidden, inter, bf, l as u64 * 10 + 4))
            .collect();
        let head = weight(vocab, hidden, bf, 999);
        for &t in threads {
            let backend = CpuBackend::new(t);
            let forward = |n: usize, pos: usize, logits_rows: usize| {
                let mut x = random(n * hidden, 7);
                let mut normed = vec![0f32; n * hidden];
                let mut qkv = vec![0f32; n * qkv_dim];
                let mut att = vec![0f32; n * hidden];
                let mut o = vec![0f32; n * hidden];
                let mut gu = vec![0f32; n * 2 * inter];
                let mut act = vec![0f32; n * inter];
                let kv = KvView {
                    k: &k,
                    v: &v,
                    capacity: cap,
                    len: pos + n,
                };
                let start = Clock::now();
                for (m, down) in mats.iter().zip(&downs) {
                    rms_norm(&x, &norm_w, 1e-5, &mut normed);
                    backend.matmul(&normed, n, &m[0], &mut qkv);
                    let q: Vec<f32> = qkv
                        .chunks_exact(qkv_dim)
                        .flat_map(|r| r[..hidden].iter().copied())
                        .collect();
                    backend.attention(&q, n, pos, kv, shape, &mut att);
                    backend.matmul(&att, n, &m[1], &mut o);
                    x.iter_mut().zip(&o).for_each(|(a, b)| *a = (*a + b) * 0.5);
                    rms_norm(&x, &norm_w, 1e-5, &mut normed);
                    backend.matmul(&normed, n, &m[2], &mut gu);
                    for (r, a) in gu.chunks_exact(2 * inter).zip(act.chunks_exact_mut(inter)) {
                        a.copy_from_slice(&r[..inter]);
                        silu_mul(a, &r[inter..]);
                    }
                    backend.matmul(&act, n, down, &mut o);
                    x.iter_mut().zip(&o).for_each(|(a, b)| *a = (*a + b) * 0.5);
                }
                let mut logits = vec![0f32; logits_rows * vocab];
                rms_norm(
                    &x[..logits_rows * hidden],
                    &norm_w,
                    1e-5,
                    &mut normed[..logits_rows * hidden],
                );
                backend.matmul(&normed[..logits_rows * hidden], logits_rows, &head, &mut logits);
                start.elapsed()
            };
            // Single-stream and batched decode interleaved, so that load from other processes hits both
            // alike; the ratio is taken per round.
            let rounds = 15;
            let mut single = Vec::with_capacity(rounds);
            let mut batched: Vec<Vec<Duration>> = vec![Vec::with_capacity(rounds); batch.len()];
            forward(1, 200, 1);
            for _ in 0..rounds {
                single.push(forward(1, 200, 1));
                for (times, &n) in batched.iter_mut().zip(batch) {
                    times.push(forward(n, 200, n));
                }
            }
            let decode = Stats::of(single.clone());
            println!(
                "{:>5} thr {t}: decode n=1: {} tok/s",
                dtype(bf),
                decode.show(|d| 1.0 / d.as_secs_f64(), 1)
            );
            for (times, &n) in batched.iter().zip(batch) {
                let mut ratios: Vec<f64> = single
                    .iter()
                    .zip(times)
                    .map(|(one, many)| n as f64 * one.as_secs_f64() / many.as_secs_f64())
                    .collect();
                ratios.sort_by(f64::total_cmp);
                println!(
                    "{:>5} thr {t}: decode n={n}: {} tok/s aggregate, {:.2}x n=1 [{:.2}–{:.2}] (per-round ratio)",
                    dtype(bf),
                    Stats::of(times.clone()).show(|d| n as f64 / d.as_secs_f64(), 1),
                    ratios[ratios.len() / 2],
                    ratios[0],
                    ratios[ratios.len() - 1],
                );
            }
            let prefill = Stats::of((0..3).map(|_| forward(512, 0, 1)).collect());
            println!(
                "{:>5} thr {t}: pp512: {} tok/s",
                dtype(bf),
                prefill.show(|d| 512.0 / d.as_secs_f64(), 1)
            );
        }
    }
}

/// Values of `--name a,b,c` in `args` (removed from it), or `default`.
fn list_option(args: &mut Vec<String>, name: &str, default: &[usize]) -> Vec<usize> {
    let Some(i) = args.iter().position(|a| a == name) else {
        return default.to_vec();
    };
    let Some(value) = args.get(i + 1).cloned() else {
        eprintln!("{name} needs a comma-separated list of numbers");
        std::process::exit(2);
    };
    args.drain(i..i + 2);
    value
        .split(',')
        .map(|v| {
            v.trim().parse().unwrap_or_else(|_| {
                eprintln!("{name}: '{v}' is not a number");
                std::process::exit(2);
            })
        })
        .collect()
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "kernel_bench [SECTION...] [--threads 1,2] [--batch 4,8] [--cpu-time]\n\
             sections: quant matvec batch hot gemm attention model (default: all)\n\
             --threads: thread counts (default 1,2)\n\
             --batch: batch sizes for `batch` and `hot` (default 4,6,7,8,9,12,16,17,32, `hot` also 1)\n\
             \x20        and for `model` (default 8)\n\
             --cpu-time: time on the calling thread's CPU time, not wall-clock (use with --threads 1)"
        );
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--cpu-time") {
        args.remove(i);
        CPU_TIME.store(true, Ordering::Relaxed);
    }
    let threads = list_option(&mut args, "--threads", &[1, 2]);
    let batch = args
        .iter()
        .any(|a| a == "--batch")
        .then(|| list_option(&mut args, "--batch", &[]));
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if want("quant") {
        let mut sizes = vec![1];
        sizes.extend(batch.clone().unwrap_or_else(|| vec![8]));
        quant(&threads, &sizes);
    }
    if want("matvec") {
        matvec(&threads, &[1]);
    }
    if want("batch") {
        let sizes = batch.clone().unwrap_or_else(|| vec![4, 6, 7, 8, 9, 12, 16, 17, 32]);
        matvec(&threads, &sizes);
    }
    if want("hot") {
        hot(
            &threads,
            &batch.clone().unwrap_or_else(|| vec![1, 4, 6, 7, 8, 9, 12, 16, 17, 32]),
        );
    }
    if want("gemm") {
        gemm(&threads);
    }
    if want("attention") {
        attention(&threads);
    }
    if want("model") {
        model(&threads, &batch.unwrap_or_else(|| vec![8]));
    }
}
