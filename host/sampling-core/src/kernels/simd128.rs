//! The row loops for the WebAssembly guests, in explicit simd128 vectors. LLVM's vectoriser left the
//! weight pass (weights, sums and peaks of a block in one loop) and the block reductions of `lanes.rs`
//! scalar for wasm32, and a guest pays fuel for every instruction it runs: written out here, a 128,256-entry
//! top-p call burns a fraction of the fuel (the plugin bench's fuel/call column).
//!
//! The arithmetic is `lanes.rs`'s, lane for lane: a row of 16 lanes is 4 vectors (lanes 4v…4v+3 in vector
//! v), every operation is the same lane-wise IEEE operation (`+ - * > >= ==`, bit selects, integer adds and
//! shifts on the bits) in the same order, and the folds take the same pairs. So the bits are the native
//! ones; the host's tests compare the plugins with native sampling bit for bit.

use core::arch::wasm32::{
    f32x4_add, f32x4_eq, f32x4_extract_lane, f32x4_ge, f32x4_gt, f32x4_mul, f32x4_pmax, f32x4_splat, f32x4_sub, i32x4_add,
    i32x4_shl, u32x4, u32x4_lt, u32x4_splat, v128, v128_and, v128_load, v128_or, v128_store,
};

use super::{C1, C2, C3, C4, C5, FLOOR_LOG2, LANES, ROUND_SHIFT, larger};
use crate::BLOCK;
use crate::nucleus::Pivot;

/// Vectors per row of [`LANES`].
const VECTORS: usize = LANES / 4;

/// `larger` lane-wise: `v` where `v > m` (never for NaN), else `m`. That is simd128's pseudo-maximum,
/// `pmax(m, v) = m < v ? v : m`, one instruction (a compare and a select otherwise).
#[inline(always)]
fn larger4(m: v128, v: v128) -> v128 {
    f32x4_pmax(m, v)
}

/// Vector `v` of `row` (its lanes 4v…4v+3).
#[inline(always)]
fn load(row: &[f32; LANES], v: usize) -> v128 {
    assert!(v < VECTORS);
    // SAFETY: lanes 4v…4v+3 are inside the row (checked above; the check folds away for constant `v`), and
    // wasm loads have no alignment requirement.
    unsafe { v128_load(row.as_ptr().add(4 * v).cast()) }
}

/// The row of entries `r·16 … r·16 + 15` of a block.
#[inline(always)]
fn row(block: &[f32; BLOCK], r: usize) -> &[f32; LANES] {
    &block.as_chunks::<LANES>().0[r]
}

/// `lanes.rs`'s `fold_halves` over 16 lanes held as 4 vectors: lane i with lane i + 8 (vector 0 with 2, 1 with
/// 3), then i with i + 4 (vector 0 with 1), then (lane 0 with 2) with (lane 1 with 3).
#[inline(always)]
fn fold(v: [v128; VECTORS], op: impl Fn(v128, v128) -> v128, scalar: impl Fn(f32, f32) -> f32) -> f32 {
    let four = op(op(v[0], v[2]), op(v[1], v[3]));
    let lane = |i| match i {
        0 => f32x4_extract_lane::<0>(four),
        1 => f32x4_extract_lane::<1>(four),
        2 => f32x4_extract_lane::<2>(four),
        _ => f32x4_extract_lane::<3>(four),
    };
    scalar(scalar(lane(0), lane(2)), scalar(lane(1), lane(3)))
}

/// The largest non-NaN value; -∞ when there is none.
#[inline(always)]
pub(crate) fn max_value(values: &[f32]) -> f32 {
    let mut lanes = [f32x4_splat(f32::NEG_INFINITY); VECTORS];
    // Four rows per step of the loop, then single rows: the same rows in the same order, but a quarter
    // of the loop's iterations (a row's four maxima alone are a short body beside what each iteration
    // costs a guest: its branch and fuel check).
    let (quads, tail) = values.as_chunks::<BLOCK>();
    for quad in quads {
        for r in 0..BLOCK / LANES {
            for v in 0..VECTORS {
                lanes[v] = larger4(lanes[v], load(row(quad, r), v));
            }
        }
    }
    let (rows, rest) = tail.as_chunks::<LANES>();
    for row in rows {
        for v in 0..VECTORS {
            lanes[v] = larger4(lanes[v], load(row, v));
        }
    }
    rest.iter().fold(fold(lanes, larger4, larger), |m, &v| larger(m, v))
}

/// `kernels::weight_with` for 4 logits.
#[inline(always)]
fn weight4<const MIN_P: bool>(l: v128, max: v128, scale: v128, min_p: v128) -> v128 {
    let y = f32x4_mul(f32x4_sub(l, max), scale);
    let shifted = f32x4_add(y, f32x4_splat(ROUND_SHIFT));
    let k = f32x4_sub(shifted, f32x4_splat(ROUND_SHIFT));
    let f = f32x4_sub(y, k);
    let mut p = f32x4_add(f32x4_mul(f32x4_splat(C5), f), f32x4_splat(C4));
    p = f32x4_add(f32x4_mul(p, f), f32x4_splat(C3));
    p = f32x4_add(f32x4_mul(p, f), f32x4_splat(C2));
    p = f32x4_add(f32x4_mul(p, f), f32x4_splat(C1));
    p = f32x4_add(f32x4_mul(p, f), f32x4_splat(1.0));
    let w = i32x4_add(p, i32x4_shl(shifted, 23));
    let mut kept = f32x4_ge(y, f32x4_splat(FLOOR_LOG2));
    if MIN_P {
        kept = v128_and(kept, f32x4_ge(w, min_p));
    }
    // A lane not kept becomes +0.0 (all bits clear).
    v128_and(w, kept)
}

/// Steps 4 and 5 for one block: its weights into `out`, and its sum and its largest weight, as `lanes.rs`.
#[inline(always)]
pub(crate) fn weigh_block<const MIN_P: bool>(
    logits: &[f32; BLOCK],
    out: &mut [f32; BLOCK],
    max: f32,
    scale: f32,
    min_p: f32,
) -> (f32, f32) {
    let (max, scale, min_p) = (f32x4_splat(max), f32x4_splat(scale), f32x4_splat(min_p));
    let mut sums = [f32x4_splat(0.0); VECTORS];
    let mut peaks = [f32x4_splat(0.0); VECTORS];
    let mut weigh_row = |r: usize| {
        for v in 0..VECTORS {
            let w = weight4::<MIN_P>(load(row(logits, r), v), max, scale, min_p);
            // SAFETY: entries r·16 + 4v … + 3 are inside the block (r < 4, v < 4).
            unsafe { v128_store(out.as_mut_ptr().add(r * LANES + 4 * v).cast(), w) };
            sums[v] = f32x4_add(sums[v], w);
            peaks[v] = larger4(peaks[v], w);
        }
    };
    // The four rows written out rather than looped over: LLVM keeps a loop of them (it does not unroll a
    // body this long), and each iteration costs a guest a branch and a fuel check.
    const _: () = assert!(BLOCK / LANES == 4);
    weigh_row(0);
    weigh_row(1);
    weigh_row(2);
    weigh_row(3);
    (fold(sums, |a, b| f32x4_add(a, b), |a, b| a + b), fold(peaks, larger4, larger))
}

/// Step 5's sum of one block with every entry not ranked before `pivot` counted as 0, as `lanes.rs`.
#[inline(always)]
pub(crate) fn lane_sum_before(weights: &[f32; BLOCK], start: u32, pivot: Pivot) -> f32 {
    let pivot_weight = f32x4_splat(pivot.weight);
    let pivot_index = u32x4_splat(pivot.index);
    let mut lanes = [f32x4_splat(0.0); VECTORS];
    for r in 0..BLOCK / LANES {
        for v in 0..VECTORS {
            let w = load(row(weights, r), v);
            let first = start + (r * LANES + 4 * v) as u32;
            let index = u32x4(first, first + 1, first + 2, first + 3);
            let before = v128_or(
                f32x4_gt(w, pivot_weight),
                v128_and(f32x4_eq(w, pivot_weight), u32x4_lt(index, pivot_index)),
            );
            lanes[v] = f32x4_add(lanes[v], v128_and(w, before));
        }
    }
    fold(lanes, |a, b| f32x4_add(a, b), |a, b| a + b)
}
