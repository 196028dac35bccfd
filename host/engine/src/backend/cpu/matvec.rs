//! Decode-sized matrix products: a few input rows against a large weight matrix, memory bound.
//!
//! The weight rows are split between threads in contiguous chunks; inside a chunk each 4-row tile is
//! streamed from memory once and meets every input row while it sits in L1 (see [`super::dot::block`]),
//! so a batch of `n` sequences costs one pass over the weights, not `n`. Software prefetch runs a fixed
//! distance ahead of the four row streams. Numerics are those of [`super::dot`]: identical for any `n`
//! and any split.

use super::dot::{TileArgs, WeightElem, block_streams_for};
use super::pool::ThreadPool;
use super::simd::Isa;

/// Bytes ahead of the current column that weight rows are prefetched from.
const PREFETCH_BYTES: usize = 1024;

/// `y[t, r] = Σ_c x[t, c] · w[r, c]` for `n` input rows, weights `[rows, cols]` of element `W`.
///
/// Cost: one pass over the weights (`rows · cols · size_of::<W>()` bytes) plus `n · rows · cols` FMAs,
/// split over the pool's threads by rows.
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
        prefetch: std::env::var("PF").ok().and_then(|v| v.parse().ok()).unwrap_or(PREFETCH_BYTES),
    };
    let threads = pool.threads();
    // A few chunks per thread so that a thread slowed by the OS does not hold the others up, but big
    // enough (>= 64 KiB of weights) that the hardware prefetchers get long runs.
    let row_bytes = cols * size_of::<W>();
    let min_rows = (65536 / row_bytes.max(1)).max(4);
    let per_task = rows.div_ceil(threads * 4).max(min_rows).next_multiple_of(4);
    let tasks = rows.div_ceil(per_task);
    pool.run(tasks, &|i| {
        let start = i * per_task;
        let end = (start + per_task).min(rows);
        // SAFETY: the shapes were checked above, rows `start..end` and tokens `0..n` are in bounds, each
        // task writes only the outputs of its own rows, and `isa` comes from `Isa::detect`.
        unsafe { block_streams_for(isa, args, start..end, 0..n) };
    });
}
