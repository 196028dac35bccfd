//! Micro-benchmarks of the CPU backend's kernels.
//!
//! ```text
//! cargo run --release -p computepool-engine --example kernel_bench [-- SECTION...]
//! ```
//! Sections: `matvec` (GB/s of decode products, weights cycled through a working set larger than the
//! last-level cache, as a real model does), `batch` (batched decode), `gemm` (GFLOP/s at n = 512),
//! `attention`, `model` (SmolLM2-135M-shaped decode and pp512, matrix products + attention only).
//! Default: all. Each number is the best of a few repetitions (the machine is shared and noisy).

use computepool_engine::backend::cpu::{AttentionShape, CpuBackend, KvView, rms_norm, silu_mul};
use computepool_engine::tensor::{Weight, WeightData};
use half::bf16;
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
        WeightData::F32(v)
    };
    Weight { rows, cols, data }
}

fn dtype(bf: bool) -> &'static str {
    if bf { "bf16" } else { "f32" }
}

/// Best time per iteration of `f` over `reps` repetitions of `iters` calls.
fn best(reps: usize, iters: usize, mut f: impl FnMut(usize)) -> Duration {
    f(0);
    let mut best = Duration::MAX;
    let mut k = 0;
    for _ in 0..reps {
        let start = Instant::now();
        for _ in 0..iters {
            f(k);
            k += 1;
        }
        best = best.min(start.elapsed() / iters as u32);
    }
    best
}

fn matvec(threads: &[usize], batch: &[usize]) {
    println!("\n## decode mat-vec (weights cycled through {} MiB)", WORKING_SET >> 20);
    println!(
        "{:>14} {:>5} {:>3} {:>3} {:>10} {:>9}",
        "shape", "dtype", "thr", "n", "time", "GB/s"
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
                    let per = best(5, iters, |k| backend.matmul(&x, n, &ws[k % copies], &mut y));
                    println!(
                        "{:>14} {:>5} {:>3} {:>3} {:>8.1}µs {:>9.1}",
                        format!("{rows}x{cols}"),
                        dtype(bf),
                        t,
                        n,
                        per.as_secs_f64() * 1e6,
                        bytes as f64 / per.as_secs_f64() / 1e9
                    );
                }
            }
        }
    }
}

fn gemm(threads: &[usize]) {
    let n = 512;
    println!("\n## prefill GEMM, n = {n}");
    println!(
        "{:>14} {:>5} {:>3} {:>10} {:>9}",
        "shape", "dtype", "thr", "time", "GFLOP/s"
    );
    for &(rows, cols) in &[(576usize, 576usize), (960, 576), (3072, 576), (576, 1536)] {
        let x = random(n * cols, 5);
        let mut y = vec![0f32; n * rows];
        let flops = 2.0 * (n * rows * cols) as f64;
        for bf in [true, false] {
            let w = weight(rows, cols, bf, 3);
            for &t in threads {
                let backend = CpuBackend::new(t);
                let per = best(5, 5, |_| backend.matmul(&x, n, &w, &mut y));
                println!(
                    "{:>14} {:>5} {:>3} {:>8.2}ms {:>9.1}",
                    format!("{rows}x{cols}"),
                    dtype(bf),
                    t,
                    per.as_secs_f64() * 1e3,
                    flops / per.as_secs_f64() / 1e9
                );
            }
        }
        // The `gemm` crate on the same f32 product, for comparison (its own threading via rayon is not
        // enabled here, so single-threaded).
        let w = random(rows * cols, 3);
        let per = best(5, 5, |_| {
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
            "{:>14} {:>5} {:>3} {:>8.2}ms {:>9.1}   (gemm crate, 1 thread)",
            format!("{rows}x{cols}"),
            "f32",
            1,
            per.as_secs_f64() * 1e3,
            flops / per.as_secs_f64() / 1e9
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
        let per = best(5, 3, |_| backend.attention(&q, n, 0, kv, shape, &mut out));
        let pairs = (n * (n + 1) / 2) as f64;
        let flops = pairs * 9.0 * 64.0 * 4.0;
        println!(
            "prefill n=512   thr {t}: {:>8.2}ms {:>7.1} GFLOP/s",
            per.as_secs_f64() * 1e3,
            flops / per.as_secs_f64() / 1e9
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
            let per = best(5, 50, |_| backend.attention(&q, 1, len - 1, kv, shape, &mut out));
            let bytes = (2 * 3 * len * 64 * 4) as f64;
            println!(
                "decode len={len:<5} thr {t}: {:>8.1}µs {:>7.1} GB/s of KV",
                per.as_secs_f64() * 1e6,
                bytes / per.as_secs_f64() / 1e9
            );
        }
    }
}

/// SmolLM2-135M: 30 layers, hidden 576, 9/3 heads of 64, MLP 1536, vocab 49152 (tied lm_head), with
/// the fused q|k|v and gate|up projections `model/llama.rs` uses.
fn model(threads: &[usize]) {
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
                let start = Instant::now();
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
            let mut best_decode = Duration::MAX;
            for _ in 0..30 {
                best_decode = best_decode.min(forward(1, 200, 1));
            }
            let mut best_prefill = Duration::MAX;
            for _ in 0..3 {
                best_prefill = best_prefill.min(forward(512, 0, 1));
            }
            let mut best_batch = Duration::MAX;
            for _ in 0..10 {
                best_batch = best_batch.min(forward(8, 200, 8));
            }
            println!(
                "{:>5} thr {t}: decode {:>6.1} tok/s ({:.2} ms), batch-8 decode {:>6.1} tok/s, pp512 {:>6.1} tok/s ({:.0} ms)",
                dtype(bf),
                1.0 / best_decode.as_secs_f64(),
                best_decode.as_secs_f64() * 1e3,
                8.0 / best_batch.as_secs_f64(),
                512.0 / best_prefill.as_secs_f64(),
                best_prefill.as_secs_f64() * 1e3
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    let threads = [1usize, 2];
    if want("matvec") {
        matvec(&threads, &[1]);
    }
    if want("batch") {
        matvec(&[2], &[4, 8, 16, 17, 32]);
    }
    if want("gemm") {
        gemm(&threads);
    }
    if want("attention") {
        attention(&threads);
    }
    if want("model") {
        model(&threads);
    }
}
