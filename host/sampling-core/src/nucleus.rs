//! Top-p without sorting (steps 6 and 7 of the spec): whether a candidate is in the nucleus is one
//! masked pass over the weights, and a draw is made by rejection — draw from the candidates still
//! possible, keep the token if it is in the nucleus, otherwise drop it and everything ranked after it
//! and draw again. On a flat row the nucleus holds tens of thousands of tokens; nothing here collects or
//! sorts them, and the first draw is kept with probability about `top_p`.

use alloc::vec::Vec;

use crate::BLOCK;
use crate::kernels::lane_sum_before;

/// A candidate (by stored index) that bounds the ones still possible: those ranked before it, i.e.
/// heavier, or as heavy and earlier.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pivot {
    pub weight: f32,
    pub index: u32,
}

impl Pivot {
    /// Whether stored entry `index` of weight `w` is ranked before the pivot.
    #[inline(always)]
    pub fn ranks_before(&self, w: f32, index: u32) -> bool {
        w > self.weight || (w == self.weight && index < self.index)
    }
}

/// Step 5's block sums over `weights` (whole stored blocks) with every entry not ranked before `pivot`
/// counted as 0, into `sums`; returns their total. `peaks` (each block's largest weight) lets a block
/// with nothing as heavy as the pivot count 0 without reading it.
pub(crate) fn sums_before(weights: &[f32], peaks: &[f32], pivot: Pivot, sums: &mut Vec<f32>) -> f64 {
    sums.clear();
    let (blocks, _) = weights.as_chunks::<BLOCK>();
    let mut total = 0.0;
    for (s, (block, &peak)) in blocks.iter().zip(peaks).enumerate() {
        let sum = if peak < pivot.weight { 0.0 } else { lane_sum_before(block, (s * BLOCK) as u32, pivot) };
        sums.push(sum);
        total += f64::from(sum);
    }
    total
}

/// The next uniform number of a top-p draw after a rejection: SplitMix64's output for the bits of the
/// previous one, as `(z >> 11) · 2⁻⁵³`. The request's stream gives one number per token; the rounds of
/// one draw derive theirs from it (SplitMix64 mixes every input bit into every output bit).
pub(crate) fn next_uniform(u: f64) -> f64 {
    let mut z = u.to_bits().wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}
