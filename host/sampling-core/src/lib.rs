//! The sampling algorithm of ComputePool, shared bit for bit by the engine's native sampler
//! (`computepool_engine::sampling`) and the sampler plugins (plugins/samplers/*, compiled to wasm32).
//! It owns the arithmetic that decides a token: penalties, temperature, top-k, min-p, top-p, the draw,
//! and the one exponential both sides use. It must never touch randomness sources, I/O or allocation
//! beyond the caller's [`Scratch`]: the caller hands it one uniform number per draw.
//!
//! Why one crate: a plugin that "does what native sampling does" cannot reuse the host's libm (glibc's
//! `exp` and libm's differ in the last bit for ~10% of arguments), so both sides compile this code. IEEE
//! f32/f64 addition, subtraction, multiplication, division and comparison are correctly rounded on every
//! target, and Rust never fuses them into FMAs nor reorders them, so the same source gives the same bits
//! natively and in WebAssembly, vectorised or not.
//!
//! The algorithm, exactly (a plugin or a port in another language must follow it to agree bit for bit):
//!
//! 1. **Penalties** (any of `repetition_penalty != 1`, `presence_penalty != 0`, `frequency_penalty != 0`),
//!    in f32, once per distinct token `t` of the history with `c` occurrences (ids past the vocabulary are
//!    ignored): `l = l > 0 ? l / rep : l * rep` (when `rep != 1`), then `l -= c · frequency + presence`.
//! 2. `temperature == 0` → greedy: the index of the largest logit, the lowest on ties; NaN never wins; 0
//!    when no logit is above -∞. So is any row whose largest logit is not finite (+∞, or every entry
//!    -∞/NaN), and any temperature so small that step 4's `s` overflows f32 (under about 4.2e-39).
//! 3. **Candidates**: every token, or with `0 < top_k < vocab` the `top_k` first by (logit descending,
//!    index ascending), NaN counting as -∞. Candidates are kept in ascending token order.
//! 4. **Weights**, in f32: `max` is the largest non-NaN candidate logit and `s = f32(log₂e / f64(T))`
//!    (`log₂e` = 1.4426950408889634, the division in f64, then rounded to f32). For a candidate logit `l`:
//!    `y = (l - max) · s`. If `y ≥ -40` (false for NaN): `k = (y + 12582912) - 12582912` (rounds `y` to an
//!    integer, ties to even), `f = y - k` (exact, |f| ≤ ½), `p = ((((C5·f + C4)·f + C3)·f + C2)·f + C1)·f + 1`
//!    with the f32 constants C1…C5 of `kernels.rs` (given as bits), and `w = p · 2ᵏ` (k added to p's
//!    exponent; exact). Otherwise `w = 0`. Then `w = 0` if `w < min_p` (min-p relative to the most likely
//!    token). The top candidate's weight is exactly 1; a candidate of weight 0 is never drawn.
//!    - Accuracy: p is within 2e-7 (relative) of 2ᶠ; with the rounding of `y`, a weight is within
//!      `2e-7 + 1.3e-7·|y|` of the exact `e^((l - max)/T)` (at most 5.4e-6 at the floor; tests measure it).
//!      A token's probability (its weight over the total) moves by at most about twice that: a token at
//!      10% stays within 10 ± 0.0001%.
//!    - The floor, 2⁻⁴⁰ of the top token's weight: such a token would be drawn less than once in 10¹²
//!      draws, and all of them together hold at most `vocab · 2⁻⁴⁰` of the top token's mass (1.2e-7 at
//!      128,256 tokens), under f32's own rounding of the sums. It lets whole blocks of the long tail be
//!      skipped without computing their weights (see below); it changes no sum by more than that.
//! 5. **Sums** are taken in blocks of [`BLOCK`] candidates: each block in 16 f32 lanes starting at 0
//!    (`lane[i % 16] += w[i]`), the lanes folded in halves (`lane[i] += lane[i + h]` for `i < h`, h = 8, 4,
//!    2, 1), the block's sum `lane[0]`. The total is the blocks' sums, each widened to f64, added in
//!    order. (Lanes let the compiler vectorise the sum; any fixed order would do.)
//! 6. **Top-p** (`top_p < 1`): rank the candidates by weight descending, the earlier candidate first on
//!    ties; "before j" is the set ranked before candidate j. `M(j)` is step 5's total with every candidate
//!    not before j counted as 0 (same blocks, same lanes). j is in the nucleus iff
//!    `M(j) < f64(top_p) × total`. (M does not decrease down the ranking, so the nucleus is the shortest
//!    head of the ranking whose sum reaches `top_p × total`; the top candidate is always in it.)
//! 7. **Draw** with `u` in [0, 1) from the caller: `target = u × total`. Walk the blocks adding their sums
//!    (f64); in the first block whose sum takes the running sum past `target`, walk its candidates adding
//!    weights (f64) and take the first that takes it past `target` (if rounding lets none, the block's
//!    last candidate of positive weight). If no block does, the last candidate of positive weight overall.
//!    Without top-p that candidate is the token. With top-p, if it is in the nucleus it is the token;
//!    otherwise it and every candidate ranked after it are set to 0 (the weights of "before j", its
//!    `M(j)` as the total, their block sums), `u` becomes SplitMix64's next output for `u`'s bits
//!    (`z = bits + 0x9E3779B97F4A7C15; z = (z ^ z>>30)·0xBF58476D1CE4E5B9; z = (z ^ z>>27)·0x94D049BB133111EB;
//!    z ^= z>>31; u = (z >> 11) · 2⁻⁵³`), and the draw repeats on what is left. This is rejection sampling:
//!    the token is distributed as the nucleus's weights, and each rejection removes at least one
//!    candidate (never the top one), so it ends; the first round is kept with probability ≈ `top_p`.
//!
//! Cost: one pass for the maximum (which also keeps the maximum of each group of 4 blocks), then the
//! weights of the groups whose maximum is over the floor — the others hold only zeros, since
//! `(l - max) · s` is monotone in `l`, and are skipped, which changes no bit of the result — and for top-p one masked pass per round of
//! the draw (the nucleus is never collected or sorted: on a flat row it holds tens of thousands of
//! tokens). Greedy is one vectorised pass (the maximum of each 256-entry chunk, keeping the first chunk
//! with the largest), then a scan of that one chunk. The loops are written in explicit lanes
//! (`kernels.rs`): portable Rust that LLVM vectorises natively, explicit simd128 vectors in the guests.
#![no_std]

extern crate alloc;

// The vocabulary loops: compiled for several vector widths and picked at run time on native x86-64
// (`std` feature), as compiled for the target everywhere else (the guests).
#[cfg_attr(all(feature = "std", target_arch = "x86_64"), path = "dispatch/x86_64.rs")]
#[cfg_attr(not(all(feature = "std", target_arch = "x86_64")), path = "dispatch/portable.rs")]
mod dispatch;
mod exp;
mod kernels;
mod nucleus;

use alloc::vec::Vec;
use core::cmp::Ordering;

pub use dispatch::argmax;
pub use exp::exp;
pub use kernels::{FLOOR_LOG2, weight, weight_scale};

use dispatch::{block_maxima, weigh_blocks};
use kernels::BlockWeights;
use nucleus::{Pivot, next_uniform, sums_before};

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

    /// Whether step 1 changes anything: a repetition penalty other than 1 or a presence or frequency
    /// penalty other than 0.
    pub fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// Buffers reused across calls, so a step allocates nothing once they have grown to the vocabulary.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    /// Candidate token ids (ascending) when top-k cut the vocabulary; empty when every token is one.
    tokens: Vec<u32>,
    /// The top-k candidates' logits.
    gathered: Vec<f32>,
    /// Each group's largest logit (groups of 4 blocks).
    maxima: Vec<f32>,
    blocks: BlockWeights,
    /// Top-p: the block sums of the candidates a rejected draw leaves.
    restricted: Vec<f32>,
    history: Vec<u32>,
    /// The logits after the penalties (only when a penalty applies).
    penalized: Vec<f32>,
}

impl Scratch {
    /// Empty buffers (a `const` so a single-threaded guest can keep one in a static).
    pub const fn new() -> Self {
        Self {
            tokens: Vec::new(),
            gathered: Vec::new(),
            maxima: Vec::new(),
            blocks: BlockWeights::new(),
            restricted: Vec::new(),
            history: Vec::new(),
            penalized: Vec::new(),
        }
    }
}

/// The distribution a draw is made from (steps 3–6): weights in blocks of [`BLOCK`], in candidate order.
/// Blocks that hold only zero weights are left out: they change no sum and no draw.
#[derive(Debug)]
pub struct Distribution<'a> {
    weights: &'a [f32],
    sums: &'a [f32],
    /// Each stored block's largest weight.
    peaks: &'a [f32],
    /// Stored block `s` is candidate block `live[s]`; candidate `c` is token `c`, or `tokens[c]` under top-k.
    live: &'a [u32],
    tokens: Option<&'a [u32]>,
    pub total: f64,
    /// Top-p: `f64(top_p) × total`, the bound of the nucleus (step 6).
    goal: Option<f64>,
    restricted: &'a mut Vec<f32>,
}

impl Distribution<'_> {
    fn token(&self, i: usize) -> u32 {
        let candidate = self.live[i / BLOCK] as usize * BLOCK + i % BLOCK;
        self.tokens.map_or(candidate as u32, |t| t[candidate])
    }

    /// The candidates of positive weight, `(token, weight)`, in candidate order (before top-p).
    pub fn entries(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.weights.iter().enumerate().filter(|(_, w)| **w > 0.0).map(|(i, &w)| (self.token(i), w))
    }

    /// Step 7: the token that `u` in [0, 1) selects.
    pub fn draw(&mut self, u: f64) -> u32 {
        let mut chosen = walk(self.weights, self.sums, self.total, u, None);
        let Some(goal) = self.goal else { return self.token(chosen) };
        let mut u = u;
        loop {
            let pivot = Pivot { weight: self.weights[chosen], index: chosen as u32 };
            let before = sums_before(self.weights, self.peaks, pivot, self.restricted);
            if before < goal {
                return self.token(chosen);
            }
            u = next_uniform(u);
            chosen = walk(self.weights, self.restricted, before, u, Some(pivot));
        }
    }
}

/// Step 7's walk over stored `weights` whose block sums are `sums` (total `total`), counting only the
/// entries ranked before `pivot` when there is one. Returns a stored index.
fn walk(weights: &[f32], sums: &[f32], total: f64, u: f64, pivot: Option<Pivot>) -> usize {
    let weight = |j: usize| {
        let w = weights[j];
        if pivot.is_none_or(|p| p.ranks_before(w, j as u32)) { w } else { 0.0 }
    };
    let target = u * total;
    let mut cumulative = 0.0;
    for (b, &sum) in sums.iter().enumerate() {
        let next = cumulative + f64::from(sum);
        if next > target {
            let start = b * BLOCK;
            let end = (start + BLOCK).min(weights.len());
            let mut running = cumulative;
            let mut last = None;
            for j in start..end {
                let w = weight(j);
                if w > 0.0 {
                    running += f64::from(w);
                    last = Some(j);
                    if running > target {
                        return j;
                    }
                }
            }
            // A block with a positive sum has a positive weight.
            return last.unwrap_or(start);
        }
        cumulative = next;
    }
    // The top candidate weighs 1 and is ranked before every pivot, so a positive weight exists.
    (0..weights.len()).rev().find(|&j| weight(j) > 0.0).unwrap_or(0)
}

/// What [`prepare`] decided: a token without drawing, or a distribution to draw from.
#[derive(Debug)]
pub enum Prepared<'a> {
    Greedy(u32),
    Draw(Distribution<'a>),
}

/// Steps 1–6 (and top-p's bound). The penalties apply to a copy of `logits` in `scratch` (only when one is set).
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
    let vocab = logits.len();
    let top_k = params.top_k as usize;
    scratch.tokens.clear();
    let candidates: &[f32] = if top_k > 0 && top_k < vocab {
        scratch.tokens.extend(0..vocab as u32);
        scratch.tokens.select_nth_unstable_by(top_k - 1, |&a, &b| by_logit(logits, a, b));
        scratch.tokens.truncate(top_k);
        scratch.tokens.sort_unstable();
        scratch.gathered.clear();
        scratch.gathered.extend(scratch.tokens.iter().map(|&t| logits[t as usize]));
        &scratch.gathered
    } else {
        logits
    };
    // The candidates hold the row's largest logit (top-k keeps it), so this is the row's maximum.
    let max = block_maxima(candidates, &mut scratch.maxima);
    let scale = weight_scale(params.temperature);
    if !max.is_finite() || !scale.is_finite() {
        return Some(argmax(logits));
    }
    weigh_blocks(candidates, &scratch.maxima, max, scale, params.min_p, &mut scratch.blocks);
    None
}

/// The total of step 5 and step 6's bound over the weights [`weigh`] left in `scratch`.
fn distribution<'s>(params: &Params, scratch: &'s mut Scratch) -> Prepared<'s> {
    let blocks = &scratch.blocks;
    let total = blocks.sums.iter().fold(0.0, |total, &s| total + f64::from(s));
    Prepared::Draw(Distribution {
        weights: blocks.stored(),
        sums: &blocks.sums,
        peaks: &blocks.peaks,
        live: &blocks.live,
        tokens: if scratch.tokens.is_empty() { None } else { Some(&scratch.tokens) },
        total,
        goal: (params.top_p < 1.0).then(|| f64::from(params.top_p) * total),
        restricted: &mut scratch.restricted,
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
        Prepared::Draw(mut distribution) => distribution.draw(uniform()),
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

/// NaN counts as -∞ in the order of top-k.
#[inline(always)]
fn key(l: f32) -> f32 {
    if l.is_nan() { f32::NEG_INFINITY } else { l }
}

/// Orders two tokens by logit descending, lower index first; NaN counts as -∞. (The order of top-k.)
pub fn by_logit(logits: &[f32], a: u32, b: u32) -> Ordering {
    key(logits[b as usize]).total_cmp(&key(logits[a as usize])).then(a.cmp(&b))
}

#[cfg(test)]
mod tests;
