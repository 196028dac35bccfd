//! The sampling algorithm of ComputePool, shared bit for bit by the engine's native sampler
//! (`computepool_engine::sampling`) and the sampler plugins (plugins/samplers/*, compiled to wasm32).
//! It owns the arithmetic that decides a token: penalties, temperature, top-k, min-p, top-p, the draw,
//! and the one `exp` both sides use. It must never touch randomness sources, I/O or allocation beyond
//! the caller's [`Scratch`]: the caller hands it one uniform number per draw.
//!
//! Why one crate: a plugin that "does what native sampling does" cannot reuse the host's libm (glibc's
//! `exp` and libm's differ in the last bit for ~10% of arguments), so both sides compile this code. IEEE
//! f64 addition, multiplication and division are correctly rounded on every target, and Rust never fuses
//! them into FMAs, so the same source gives the same bits natively and in WebAssembly.
//!
//! The algorithm, exactly (a plugin or a port in another language must follow it to agree bit for bit):
//!
//! 1. **Penalties** (any of `repetition_penalty != 1`, `presence_penalty != 0`, `frequency_penalty != 0`),
//!    in f32, once per distinct token `t` of the history with `c` occurrences (ids past the vocabulary are
//!    ignored): `l = l > 0 ? l / rep : l * rep` (when `rep != 1`), then `l -= c · frequency + presence`.
//! 2. `temperature == 0` → greedy: the index of the largest logit, the lowest on ties; NaN never wins.
//!    So is any row whose largest logit is not finite (+∞, or every entry -∞/NaN).
//! 3. **Candidates**: every token, or with `0 < top_k < vocab` the `top_k` first by (logit descending,
//!    index ascending), NaN counting as -∞. Candidates are kept in ascending token order.
//! 4. **Weights**: `w = exp((l - max) · (1 / temperature))` in f64 (`max` the largest logit, so the top
//!    token's weight is exactly 1), with [`exp`] below; a weight under `min_p` is set to 0 (min-p relative
//!    to the most likely token). A candidate of weight 0 can never be drawn.
//! 5. **Sums** are taken in blocks of [`BLOCK`] candidates: each block in 8 interleaved lanes
//!    (`lane[i % 8] += w[i]`), the lanes combined as `((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))`; the total is
//!    the blocks' sums added in order. (Lanes let the compiler vectorise the sum; any fixed order would do.)
//! 6. **Top-p** (`top_p < 1`): order the positive-weight candidates by weight descending, lower token
//!    first on ties; keep the shortest prefix whose running sum (added in that order) reaches
//!    `top_p × total`, or all of them if none does. The kept tokens, in that order, are the new candidates
//!    and their block sums the new total.
//! 7. **Draw**: `target = u × total` with the caller's `u` in [0, 1). Walk the blocks adding their sums;
//!    in the first block whose sum takes the running sum past `target`, walk its candidates adding weights
//!    and return the first that takes it past `target` (if rounding lets none, the block's last candidate of
//!    positive weight). If no block does, the last candidate of positive weight overall.
//!
//! Cost: one pass for the maximum, one `exp` per candidate (branch-free, vectorisable), block sums, and
//! for top-p a partial selection of the head of the distribution (candidates above a weight threshold,
//! lowered 1024× at a time until the nucleus is inside) instead of a sort of the vocabulary.
#![no_std]

extern crate alloc;

use alloc::vec::Vec;
use core::cmp::Ordering;

/// Candidates per block of the sums and the draw (step 5).
pub const BLOCK: usize = 64;

/// Sampling parameters of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// 0 is greedy. Default 0.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all. Default 0.
    pub top_k: u32,
    /// Nucleus threshold in (0, 1]; 1 is off. Default 1.
    pub top_p: f32,
    /// Minimum probability relative to the most likely token, in [0, 1]; 0 is off. Default 0.
    pub min_p: f32,
    /// Multiplicative penalty on tokens of the history, > 0; 1 is off. Default 1.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token in the history; 0 is off. Default 0.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per occurrence in the history; 0 is off. Default 0.
    pub frequency_penalty: f32,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// A parameter outside its range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamError {
    pub param: &'static str,
    pub value: f32,
    pub expected: &'static str,
}

impl core::fmt::Display for ParamError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} must be {}, got {}", self.param, self.expected, self.value)
    }
}

impl Params {
    pub fn validate(&self) -> Result<(), ParamError> {
        let err = |param, value, expected| Err(ParamError { param, value, expected });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return err("temperature", self.temperature, "a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return err("top_p", self.top_p, "in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return err("min_p", self.min_p, "in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return err("repetition_penalty", self.repetition_penalty, "a finite number > 0");
        }
        if !self.presence_penalty.is_finite() {
            return err("presence_penalty", self.presence_penalty, "finite");
        }
        if !self.frequency_penalty.is_finite() {
            return err("frequency_penalty", self.frequency_penalty, "finite");
        }
        Ok(())
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// Buffers reused across calls, so a step allocates nothing once they have grown to the vocabulary.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    /// Candidate token ids (ascending) when top-k cut the vocabulary; empty when every token is one.
    tokens: Vec<u32>,
    weights: Vec<f64>,
    blocks: Vec<f64>,
    /// Top-p: indices into `weights`, then the nucleus's tokens.
    nucleus: Vec<u32>,
    nucleus_weights: Vec<f64>,
    history: Vec<u32>,
    /// The logits after the penalties (only when a penalty applies).
    penalized: Vec<f32>,
}

impl Scratch {
    /// Empty buffers (a `const` so a single-threaded guest can keep one in a static).
    pub const fn new() -> Self {
        Self {
            tokens: Vec::new(),
            weights: Vec::new(),
            blocks: Vec::new(),
            nucleus: Vec::new(),
            nucleus_weights: Vec::new(),
            history: Vec::new(),
            penalized: Vec::new(),
        }
    }
}

/// The distribution a draw is made from (steps 3–6): candidates and their weights, in draw order.
#[derive(Debug, Clone, Copy)]
pub struct Distribution<'a> {
    /// Candidate token ids; `None`: the candidates are every token, `0..weights.len()`.
    pub tokens: Option<&'a [u32]>,
    pub weights: &'a [f64],
    pub blocks: &'a [f64],
    pub total: f64,
}

impl Distribution<'_> {
    fn token(&self, j: usize) -> u32 {
        match self.tokens {
            Some(t) => t[j],
            None => j as u32,
        }
    }

    /// Step 7: the candidate that `u` in [0, 1) selects.
    pub fn draw(&self, u: f64) -> u32 {
        let target = u * self.total;
        let mut cumulative = 0.0;
        for (b, &sum) in self.blocks.iter().enumerate() {
            let next = cumulative + sum;
            if next > target {
                let start = b * BLOCK;
                let end = (start + BLOCK).min(self.weights.len());
                let mut running = cumulative;
                let mut last = None;
                for j in start..end {
                    let w = self.weights[j];
                    if w > 0.0 {
                        running += w;
                        last = Some(j);
                        if running > target {
                            return self.token(j);
                        }
                    }
                }
                // A block with a positive sum has a positive weight.
                return self.token(last.unwrap_or(start));
            }
            cumulative = next;
        }
        let last = self.weights.iter().rposition(|&w| w > 0.0).unwrap_or(0);
        self.token(last)
    }
}

/// What [`prepare`] decided: a token without drawing, or a distribution to draw from.
#[derive(Debug, Clone, Copy)]
pub enum Prepared<'a> {
    Greedy(u32),
    Draw(Distribution<'a>),
}

/// Steps 1–6. The penalties apply to a copy of `logits` in `scratch` (only when one is set).
pub fn prepare<'s>(logits: &[f32], history: &[u32], params: &Params, scratch: &'s mut Scratch) -> Prepared<'s> {
    let mut penalized = core::mem::take(&mut scratch.penalized);
    let prepared = if params.has_penalties() && !history.is_empty() {
        penalized.clear();
        penalized.extend_from_slice(logits);
        apply_penalties(&mut penalized, history, params, &mut scratch.history);
        weigh(&penalized, params, scratch)
    } else {
        weigh(logits, params, scratch)
    };
    scratch.penalized = penalized;
    match prepared {
        Some(token) => Prepared::Greedy(token),
        None => distribution(params, scratch),
    }
}

/// Steps 2–5 into `scratch`; a token when no draw is needed.
fn weigh(logits: &[f32], params: &Params, scratch: &mut Scratch) -> Option<u32> {
    if params.temperature == 0.0 || logits.is_empty() {
        return Some(argmax(logits));
    }
    let max = max_key(logits);
    if !max.is_finite() {
        return Some(argmax(logits));
    }
    let vocab = logits.len();
    let top_k = params.top_k as usize;
    scratch.tokens.clear();
    if top_k > 0 && top_k < vocab {
        scratch.tokens.extend(0..vocab as u32);
        let by_logit = |a: &u32, b: &u32| key(logits[*b as usize]).total_cmp(&key(logits[*a as usize])).then(a.cmp(b));
        scratch.tokens.select_nth_unstable_by(top_k - 1, by_logit);
        scratch.tokens.truncate(top_k);
        scratch.tokens.sort_unstable();
    }

    let max = max as f64;
    let inverse_temperature = 1.0 / params.temperature as f64;
    let min_p = params.min_p as f64;
    let weight = |l: f32| {
        let w = exp((key(l) as f64 - max) * inverse_temperature);
        if w >= min_p { w } else { 0.0 }
    };
    scratch.weights.clear();
    if scratch.tokens.is_empty() {
        scratch.weights.extend(logits.iter().map(|&l| weight(l)));
    } else {
        scratch.weights.extend(scratch.tokens.iter().map(|&t| weight(logits[t as usize])));
    }
    None
}

/// Step 6 (and the total of step 5) over the weights [`weigh`] left in `scratch`.
fn distribution<'s>(params: &Params, scratch: &'s mut Scratch) -> Prepared<'s> {
    let total = block_sums(&scratch.weights, &mut scratch.blocks);
    if params.top_p < 1.0 {
        let goal = params.top_p as f64 * total;
        let weights = &scratch.weights;
        let by_weight = |a: &u32, b: &u32| {
            weights[*b as usize].total_cmp(&weights[*a as usize]).then(a.cmp(b))
        };
        let mut threshold = 1.0 / 1024.0;
        loop {
            scratch.nucleus.clear();
            scratch.nucleus.extend(
                weights.iter().enumerate().filter(|&(_, &w)| w > 0.0 && w >= threshold).map(|(j, _)| j as u32),
            );
            scratch.nucleus.sort_unstable_by(by_weight);
            let mut running = 0.0;
            let mut reached = None;
            for (n, &j) in scratch.nucleus.iter().enumerate() {
                running += weights[j as usize];
                if running >= goal {
                    reached = Some(n + 1);
                    break;
                }
            }
            if let Some(len) = reached {
                scratch.nucleus.truncate(len);
                break;
            }
            if threshold == 0.0 {
                break;
            }
            // Everything under the threshold sorts after everything over it, so a prefix found among the
            // candidates over it is the prefix of the whole order.
            threshold = if threshold < 1e-300 { 0.0 } else { threshold / 1024.0 };
        }
        scratch.nucleus_weights.clear();
        scratch.nucleus_weights.extend(scratch.nucleus.iter().map(|&j| weights[j as usize]));
        let tokens = &scratch.tokens;
        for j in scratch.nucleus.iter_mut() {
            if !tokens.is_empty() {
                *j = tokens[*j as usize];
            }
        }
        let total = block_sums(&scratch.nucleus_weights, &mut scratch.blocks);
        return Prepared::Draw(Distribution {
            tokens: Some(&scratch.nucleus),
            weights: &scratch.nucleus_weights,
            blocks: &scratch.blocks,
            total,
        });
    }
    Prepared::Draw(Distribution {
        tokens: if scratch.tokens.is_empty() { None } else { Some(&scratch.tokens) },
        weights: &scratch.weights,
        blocks: &scratch.blocks,
        total,
    })
}

/// Steps 1–7: the next token. `uniform` is called at most once, only when a draw is needed, and must
/// return a number in [0, 1) from the request's stream.
pub fn sample(
    logits: &[f32],
    history: &[u32],
    params: &Params,
    scratch: &mut Scratch,
    uniform: impl FnOnce() -> f64,
) -> u32 {
    match prepare(logits, history, params, scratch) {
        Prepared::Greedy(token) => token,
        Prepared::Draw(distribution) => distribution.draw(uniform()),
    }
}

/// Step 1, in place. `counts` is a scratch buffer.
pub fn apply_penalties(logits: &mut [f32], history: &[u32], params: &Params, counts: &mut Vec<u32>) {
    if !params.has_penalties() || history.is_empty() {
        return;
    }
    counts.clear();
    counts.extend_from_slice(history);
    counts.sort_unstable();
    let mut i = 0;
    while i < counts.len() {
        let token = counts[i];
        let mut run = 1;
        while i + run < counts.len() && counts[i + run] == token {
            run += 1;
        }
        i += run;
        let Some(l) = logits.get_mut(token as usize) else { continue };
        let mut v = *l;
        if params.repetition_penalty != 1.0 {
            v = if v > 0.0 { v / params.repetition_penalty } else { v * params.repetition_penalty };
        }
        v -= run as f32 * params.frequency_penalty + params.presence_penalty;
        *l = v;
    }
}

/// Index of the largest value, the lowest index on ties; NaN never wins (an all-NaN row gives 0).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        // `>` keeps the first maximum and never takes NaN.
        if v > best_value {
            best_value = v;
            best = i;
        }
    }
    best as u32
}

/// NaN counts as -∞ everywhere but `argmax` (which never picks it either).
#[inline(always)]
fn key(l: f32) -> f32 {
    if l.is_nan() { f32::NEG_INFINITY } else { l }
}

fn max_key(logits: &[f32]) -> f32 {
    logits.iter().fold(f32::NEG_INFINITY, |m, &l| {
        let k = key(l);
        if k > m { k } else { m }
    })
}

/// Step 5: fills `blocks` with each block's lane sum and returns their sum in order.
fn block_sums(weights: &[f64], blocks: &mut Vec<f64>) -> f64 {
    blocks.clear();
    blocks.extend(weights.chunks(BLOCK).map(|block| {
        let mut lanes = [0.0f64; 8];
        let mut exact = block.chunks_exact(8);
        for eight in &mut exact {
            for (lane, &w) in lanes.iter_mut().zip(eight) {
                *lane += w;
            }
        }
        for (lane, &w) in lanes.iter_mut().zip(exact.remainder()) {
            *lane += w;
        }
        ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]))
    }));
    blocks.iter().fold(0.0, |total, &s| total + s)
}

const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
const INV_LN2: f64 = 1.442_695_040_888_963_387_00;
/// 1.5 · 2⁵²: adding it rounds to an integer (to nearest, ties to even) held in the low mantissa bits.
const ROUND_SHIFT: f64 = 6_755_399_441_055_744.0;

/// Taylor coefficients 1/n! for n = 13 down to 2; each a correctly rounded constant division.
const EXP_COEFFICIENTS: [f64; 12] = [
    1.0 / 6_227_020_800.0,
    1.0 / 479_001_600.0,
    1.0 / 39_916_800.0,
    1.0 / 3_628_800.0,
    1.0 / 362_880.0,
    1.0 / 40_320.0,
    1.0 / 5_040.0,
    1.0 / 720.0,
    1.0 / 120.0,
    1.0 / 24.0,
    1.0 / 6.0,
    1.0 / 2.0,
];

/// eˣ, the one both native and plugin sampling use. Branch-free (so it vectorises): `x = k·ln2 + r`
/// with `|r| ≤ ln2/2` (Cody–Waite, two-part ln2), a degree-13 Taylor polynomial for eʳ (truncation error
/// under 5e-18), and 2ᵏ put into the exponent bits. Within a few ulp of the true value on [-708, 709]
/// (tests measure the largest difference from the platform's `exp`); `exp(0) == 1` exactly; below -708 it
/// is 0 (true values there are subnormal, under 3e-308); above 709 it is +∞; NaN gives NaN.
#[inline(always)]
pub fn exp(x: f64) -> f64 {
    let clamped = if x < -708.0 { -708.0 } else if x > 709.0 { 709.0 } else { x };
    let shifted = clamped * INV_LN2 + ROUND_SHIFT;
    let k = shifted - ROUND_SHIFT;
    let r = (clamped - k * LN2_HI) - k * LN2_LO;
    let mut p = EXP_COEFFICIENTS[0];
    for &c in &EXP_COEFFICIENTS[1..] {
        p = p * r + c;
    }
    let p = (p * r + 1.0) * r + 1.0;
    // `shifted`'s bits minus ROUND_SHIFT's are k exactly (|k| ≤ 1023 < 2⁵¹).
    let k_int = (shifted.to_bits() as i64).wrapping_sub(ROUND_SHIFT.to_bits() as i64);
    let scale = f64::from_bits(((k_int + 1023) as u64) << 52);
    let y = p * scale;
    if x < -708.0 {
        0.0
    } else if x > 709.0 {
        f64::INFINITY
    } else {
        y
    }
}

/// Orders two tokens by logit descending, lower index first; NaN counts as -∞. (The order of top-k.)
pub fn by_logit(logits: &[f32], a: u32, b: u32) -> Ordering {
    key(logits[b as usize]).total_cmp(&key(logits[a as usize])).then(a.cmp(&b))
}

#[cfg(test)]
mod tests;
