//! The row loops in portable Rust: fixed-size arrays of [`LANES`] values that LLVM vectorises natively
//! (SSE, AVX2, AVX-512 through `dispatch`). The reference for `simd128.rs`, which must match it bit for bit.

use super::{LANES, larger, weight_with};
use crate::BLOCK;
use crate::nucleus::Pivot;

/// Folds lanes in halves (lane i with lane i + h, h = 8, 4, 2, 1) with `op`. Written out level by level
/// over fixed-size arrays, so that LLVM keeps the first levels in vectors instead of spilling the lanes.
#[inline(always)]
fn fold_halves(lanes: [f32; LANES], op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut eight = [0.0f32; 8];
    for i in 0..8 {
        eight[i] = op(lanes[i], lanes[i + 8]);
    }
    let mut four = [0.0f32; 4];
    for i in 0..4 {
        four[i] = op(eight[i], eight[i + 4]);
    }
    op(op(four[0], four[2]), op(four[1], four[3]))
}

/// The largest non-NaN value; -∞ when there is none. (Which of +0 and -0 it returns when both tie for
/// the largest is unspecified; nothing downstream can tell them apart.)
#[inline(always)]
pub(crate) fn max_value(values: &[f32]) -> f32 {
    let (rows, rest) = values.as_chunks::<LANES>();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for row in rows {
        for i in 0..LANES {
            lanes[i] = larger(lanes[i], row[i]);
        }
    }
    rest.iter().fold(fold_halves(lanes, larger), |m, &v| larger(m, v))
}

/// Steps 4 and 5 for one block: its weights into `out`, and its sum (16 lanes from 0,
/// `lane[i % 16] += w[i]`, folded in halves) and its largest weight (0 when none is positive).
#[inline(always)]
pub(crate) fn weigh_block<const MIN_P: bool>(
    logits: &[f32; BLOCK],
    out: &mut [f32; BLOCK],
    max: f32,
    scale: f32,
    min_p: f32,
) -> (f32, f32) {
    // Constant trip counts over fixed-size arrays, so that the lanes of the sum and the peak stay in
    // registers (a loop over `as_chunks` iterators kept them on the stack: a store and a reload per row).
    let mut sums = [0.0f32; LANES];
    let mut peaks = [0.0f32; LANES];
    for r in 0..BLOCK / LANES {
        for i in 0..LANES {
            let w = weight_with::<MIN_P>(logits[r * LANES + i], max, scale, min_p);
            out[r * LANES + i] = w;
            sums[i] += w;
            peaks[i] = larger(peaks[i], w);
        }
    }
    (fold_halves(sums, |a, b| a + b), fold_halves(peaks, larger))
}

/// Step 5's sum of one block (16 lanes from 0, `lane[i % 16] += w[i]`, folded in halves) with every entry
/// not ranked before `pivot` counted as 0 (`start`: the block's first stored index).
#[inline(always)]
pub(crate) fn lane_sum_before(weights: &[f32; BLOCK], start: u32, pivot: Pivot) -> f32 {
    let mut lanes = [0.0f32; LANES];
    for (r, row) in weights.as_chunks::<LANES>().0.iter().enumerate() {
        for i in 0..LANES {
            let w = row[i];
            let index = start + (r * LANES + i) as u32;
            // Branch-free (`&`, `|` on bools), so that the pass vectorises.
            let before = (w > pivot.weight) | ((w == pivot.weight) & (index < pivot.index));
            lanes[i] += if before { w } else { 0.0 };
        }
    }
    fold_halves(lanes, |a, b| a + b)
}
