//! The loops that touch every vocabulary entry: the maximum, the argmax, the weights and the block sums.
//!
//! Every operation in them is a lane-wise IEEE f32 operation (`+ - * <`, selects, integer adds on the
//! bits) over rows of [`LANES`] values, and the order of every sum is written out, not left to the
//! vectoriser (LLVM never reorders float additions without fast-math, which Rust never enables). So the
//! result is the same bits at any vector width: portable Rust that LLVM vectorises natively
//! (`kernels/lanes.rs`, SSE/AVX2/AVX-512 through `dispatch`), explicit simd128 in the guests
//! (`kernels/simd128.rs`).

use crate::BLOCK;

// The loops over rows of 16 lanes, the ones that touch every entry. Portable Rust that LLVM vectorises
// natively; explicit simd128 in the guests, where LLVM left the weight pass and the block reductions scalar
// (and a guest pays fuel for every instruction). Same operations lane for lane, so the same bits.
#[cfg_attr(all(target_arch = "wasm32", target_feature = "simd128"), path = "kernels/simd128.rs")]
#[cfg_attr(not(all(target_arch = "wasm32", target_feature = "simd128")), path = "kernels/lanes.rs")]
mod rows;

pub(crate) use rows::{lane_sum_before, max_value};

/// Lanes of the explicit-lane loops: 4 simd128 vectors, 2 AVX2 vectors, 1 AVX-512 vector.
pub(crate) const LANES: usize = 16;

/// log₂ of the weight floor (step 4 of the spec): a candidate whose weight would be under 2⁻⁴⁰ gets 0.
pub const FLOOR_LOG2: f32 = -40.0;

/// 1.5 · 2²³: adding it to an f32 in [-2²², 2²²] rounds it to an integer (to nearest, ties to even), which
/// then sits in the low mantissa bits.
pub(crate) const ROUND_SHIFT: f32 = 12_582_912.0;

/// 2ᶠ ≈ 1 + f·(C1 + f·(C2 + f·(C3 + f·(C4 + f·C5)))) on [-½, ½]: a degree-5 fit of the relative error
/// (under 2e-7 with the f32 Horner evaluation below, rounding included; the crate's tests measure it over
/// a million points). Given as bits so a port gets exactly these values.
pub(crate) const C1: f32 = f32::from_bits(0x3f31_7215); // 0.693147003…
pub(crate) const C2: f32 = f32::from_bits(0x3e75_fcde); // 0.240222424…
pub(crate) const C3: f32 = f32::from_bits(0x3d63_5ba9); // 0.055507335…
pub(crate) const C4: f32 = f32::from_bits(0x3c1e_7544); // 0.009671513…
pub(crate) const C5: f32 = f32::from_bits(0x3aad_dd07); // 0.001326472…

#[inline(always)]
pub(crate) fn larger(m: f32, v: f32) -> f32 {
    // `>` never takes NaN and keeps the earlier value on ties.
    if v > m { v } else { m }
}

/// Entries per chunk of [`argmax`]'s pass: small enough that finding the index inside the winning
/// chunk afterwards costs nothing, large enough that comparing chunk maxima costs nothing either.
const ARGMAX_CHUNK: usize = 256;

/// Index of the largest value, the lowest index on ties; NaN never wins; 0 when no value is above -∞
/// (an empty row, or every entry -∞ or NaN). One vectorised pass keeps the first chunk holding the
/// largest value (a later chunk replaces it only with a strictly larger one), then a scan of that chunk
/// finds the first index holding it.
#[inline(always)]
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = f32::NEG_INFINITY;
    let mut best_chunk = 0;
    for (c, chunk) in values.chunks(ARGMAX_CHUNK).enumerate() {
        let m = max_value(chunk);
        if m > best {
            best = m;
            best_chunk = c;
        }
    }
    if best == f32::NEG_INFINITY {
        return 0;
    }
    let start = best_chunk * ARGMAX_CHUNK;
    let chunk = &values[start..values.len().min(start + ARGMAX_CHUNK)];
    // `best` is in the chunk (it is the chunk's maximum), so the scan always finds it.
    (start + chunk.iter().position(|&v| v == best).unwrap_or(0)) as u32
}

/// f32(log₂e / temperature): multiplying `logit - max` by it gives the weight's base-2 logarithm.
pub fn weight_scale(temperature: f32) -> f32 {
    (core::f64::consts::LOG2_E / f64::from(temperature)) as f32
}

/// Step 4 for one candidate: the weight of logit `l` given the largest candidate logit `max` and
/// `scale` = [`weight_scale`]\(temperature\). 1 exactly for `l == max`; 0 under the floor, for NaN and
/// -∞, and under `min_p`.
pub fn weight(l: f32, max: f32, scale: f32, min_p: f32) -> f32 {
    weight_with::<true>(l, max, scale, min_p)
}

/// [`weight`]; `MIN_P` false skips the min-p comparison, which is only valid when `min_p == 0`, where it
/// cannot change anything (every weight over the floor is positive).
#[inline(always)]
pub(crate) fn weight_with<const MIN_P: bool>(l: f32, max: f32, scale: f32, min_p: f32) -> f32 {
    let y = (l - max) * scale;
    let shifted = y + ROUND_SHIFT;
    let k = shifted - ROUND_SHIFT;
    let f = y - k;
    let p = ((((C5 * f + C4) * f + C3) * f + C2) * f + C1) * f + 1.0;
    // `shifted`'s bits are ROUND_SHIFT's plus k, and ROUND_SHIFT's bits shifted left by 23 wrap to 0, so
    // this adds k to p's exponent: p · 2ᵏ, exact (p is in [0.7, 1.5) and k ≥ -40 under the floor's test).
    let w = f32::from_bits(p.to_bits().wrapping_add(shifted.to_bits() << 23));
    // Under the floor (and for NaN and -∞, whose comparisons are false) the bits above are garbage and
    // are discarded here.
    let kept = y >= FLOOR_LOG2 && (!MIN_P || w >= min_p);
    if kept { w } else { 0.0 }
}

/// Entries per group of the maximum pass: a group whose maximum is under the floor is skipped whole.
/// (A runtime-length loop over groups of 256 is what LLVM vectorises best for simd128, as in `argmax`.)
pub(crate) const GROUP: usize = 4 * BLOCK;

/// Each group's largest non-NaN value into `maxima` (-∞ for a group with none); returns the largest.
#[inline(always)]
pub(crate) fn block_maxima(values: &[f32], maxima: &mut alloc::vec::Vec<f32>) -> f32 {
    maxima.clear();
    maxima.extend(values.chunks(GROUP).map(max_value));
    maxima.iter().fold(f32::NEG_INFINITY, |m, &v| larger(m, v))
}

/// The weights of the blocks that can hold a positive weight, their sums, and which blocks they are.
#[derive(Debug, Default, Clone)]
pub(crate) struct BlockWeights {
    /// Candidate block index of each stored block, ascending.
    pub live: alloc::vec::Vec<u32>,
    /// [`BLOCK`] weights per stored block (a last partial block padded with zeros), then stale entries:
    /// the buffer only grows, so that no call clears or copies it (see [`Self::stored`]).
    weights: alloc::vec::Vec<f32>,
    /// Each stored block's sum.
    pub sums: alloc::vec::Vec<f32>,
    /// Each stored block's largest weight, 0 if none is positive (top-p's rounds skip blocks lighter than
    /// their pivot).
    pub peaks: alloc::vec::Vec<f32>,
}

impl BlockWeights {
    pub const fn new() -> Self {
        use alloc::vec::Vec;
        Self { live: Vec::new(), weights: Vec::new(), sums: Vec::new(), peaks: Vec::new() }
    }

    /// The stored blocks' weights.
    pub fn stored(&self) -> &[f32] {
        &self.weights[..self.live.len() * BLOCK]
    }
}

/// Steps 4 and 5 over `logits` (the candidates' logits) with `maxima` from [`block_maxima`]. The blocks
/// of a group whose largest logit is under the floor hold only zero weights (`(l - max) · scale` is
/// monotone in `l`), so they are left out: they add exactly 0 to every sum and can never be drawn.
#[inline(always)]
pub(crate) fn weigh_blocks(logits: &[f32], maxima: &[f32], max: f32, scale: f32, min_p: f32, out: &mut BlockWeights) {
    if min_p > 0.0 {
        weigh_blocks_with::<true>(logits, maxima, max, scale, min_p, out)
    } else {
        weigh_blocks_with::<false>(logits, maxima, max, scale, min_p, out)
    }
}

#[inline(always)]
fn weigh_blocks_with<const MIN_P: bool>(
    logits: &[f32],
    maxima: &[f32],
    max: f32,
    scale: f32,
    min_p: f32,
    out: &mut BlockWeights,
) {
    out.live.clear();
    out.sums.clear();
    out.peaks.clear();
    // Room for every block up front (once per vocabulary size): each block's weights are then written
    // in place, with no per-block clearing or copying (a memset or memcpy is a host call in wasmtime).
    let room = logits.len().div_ceil(BLOCK) * BLOCK;
    if out.weights.len() < room {
        out.weights.resize(room, 0.0);
    }
    let (blocks, rest) = logits.as_chunks::<BLOCK>();
    let mut padded = [f32::NEG_INFINITY; BLOCK];
    padded[..rest.len()].copy_from_slice(rest);
    let (slots, _) = out.weights.as_chunks_mut::<BLOCK>();
    let mut stored = 0;
    for b in 0..logits.len().div_ceil(BLOCK) {
        let group_max = maxima[b / (GROUP / BLOCK)];
        if !((group_max - max) * scale >= FLOOR_LOG2) {
            continue;
        }
        let block = blocks.get(b).unwrap_or(&padded);
        let slot = &mut slots[stored];
        let (sum, peak) = rows::weigh_block::<MIN_P>(block, slot, max, scale, min_p);
        out.live.push(b as u32);
        out.sums.push(sum);
        out.peaks.push(peak);
        stored += 1;
    }
}
