//! The exact matrix product for every batch size: memory bound for decode, compute bound for prefill.
//!
//! The weight rows are split between threads in contiguous chunks (a few per thread, claimed
//! dynamically, so a thread the OS delays does not hold the step up). A chunk is read as `h` long
//! sequential streams, one per `h`-th of its rows, `h` being the tile height
//! ([`super::dot::block_streams`]): each tile takes one row from each stream and meets every input row
//! while it sits in L1, so a batch of `n` sequences costs one pass over the weights, not `n`. Tiles are
//! 4 rows high (four streams), except for batches of 7–8 rows on AVX-512, which run 3×8 tiles (three
//! streams) so that each weight vector is loaded, and for bf16 widened, once per step instead of in a
//! 6-wide and a 2-wide pass ([`super::dot::tile_shape`]). Long streams keep the hardware prefetchers
//! busy (a 4-row zigzag over adjacent rows ran at half the bandwidth); software prefetch runs 1 KiB
//! ahead in each stream (2 and 3 KiB measured no better). Large batches are cut into token blocks of
//! ~256 KiB of activations (at least 8 rows), which stay in L2 while the task's weight rows stream past
//! them.
//!
//! Measured on a 2-vCPU Zen 4 VM that is shared with other jobs (numbers are medians of alternated
//! runs and move by ±10% between runs): with 2 threads, 35–37 GB/s at n = 1 on a quiet machine, the
//! same as a plain streaming read of memory; ~200 GFLOP/s (about 90% of the FMA peak) from n ≈ 16 up to
//! prefill sizes, bf16 weights included (widened in registers), which is why there is no separate
//! packed GEMM for the exact path. At n = 8 with bf16 weights: ~175 GFLOP/s with 2 threads, 93–97 with
//! one (thread CPU time; 83–88 with the former 6 + 2 tiling), ~103 with one and the weights in L2, which
//! is about the FMA peak of a core. SmolLM2-135M decode, bf16, 2 threads: batch 8 gives 4.1× the
//! tokens/s of one stream (467 against 115 tok/s; 3.7× with the 6 + 2 tiling).
//! Numerics are those of [`super::dot`]: identical for any `n` and any split.

use super::dot::{TileArgs, WeightElem, block_streams_for};
use super::pool::ThreadPool;
use super::simd::Isa;

/// Bytes ahead of the current column that weight rows are prefetched from.
const PREFETCH_BYTES: usize = 1024;
/// Bytes of input rows a task keeps hot (in L2) while its weight rows stream past them; larger batches
/// are processed in blocks of this size.
const TOKEN_BLOCK_BYTES: usize = 256 * 1024;

/// `y[t, r] = Σ_c x[t, c] · w[r, c]` for `n` input rows, weights `[rows, cols]` of element `W`.
///
/// Cost: one pass over the weights (`rows · cols · size_of::<W>()` bytes) per token block plus
/// `n · rows · cols` FMAs, split over the pool's threads by rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matvec<W: WeightElem>(
    pool: &ThreadPool,
    isa: Isa,
    x: &[f32],
    n: usize,
    w: &[W],
    rows: usize,
    cols: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), n * cols, "matvec input shape");
    assert_eq!(w.len(), rows * cols, "matvec weight shape");
    assert_eq!(y.len(), n * rows, "matvec output shape");
    if n == 0 || rows == 0 {
        return;
    }
    let args = TileArgs {
        w: w.as_ptr(),
        w_stride: cols,
        x: x.as_ptr(),
        x_stride: cols,
        cols,
        y: y.as_mut_ptr(),
        y_stride: rows,
        y_row_step: 1,
        prefetch: PREFETCH_BYTES,
    };
    let threads = pool.threads();
    // A few chunks per thread so that a thread slowed by the OS does not hold the others up, but big
    // enough (>= 64 KiB of weights) that the hardware prefetchers get long runs.
    let row_bytes = cols * size_of::<W>();
    let min_rows = (65536 / row_bytes.max(1)).max(4);
    // A multiple of both tile heights (4, and 3 for 7–8 input rows on AVX-512), so that no rows are left
    // over for 1-row tiles.
    let per_task = rows.div_ceil(threads * 4).max(min_rows).next_multiple_of(12);
    let tasks = rows.div_ceil(per_task);
    // At least 8 rows, so that a decode batch of 8 is one block (one 3×8 tile pass on AVX-512, one read
    // of the weights from memory) even when its activations exceed the block size.
    let block = (TOKEN_BLOCK_BYTES / (cols * 4).max(1))
        .clamp(6, 1024)
        .next_multiple_of(6)
        .max(8);
    pool.run(tasks, &|i| {
        let start = i * per_task;
        let end = (start + per_task).min(rows);
        for t0 in (0..n).step_by(block) {
            // SAFETY: the shapes were checked above, rows `start..end` and tokens `t0..` are in bounds,
            // each task writes only the outputs of its own rows, and `isa` comes from `Isa::detect`.
            unsafe { block_streams_for(isa, args, start..end, t0..(t0 + block).min(n)) };
        }
    });
}
