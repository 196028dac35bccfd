//! Native sampling: greedy, temperature, top-k, top-p, seeded. This is the reference the sampler plugins
//! are checked against, so the algorithm is specified exactly:
//!
//! 1. `temperature == 0` → greedy: the index of the largest logit (the lowest index on ties). No random
//!    number is drawn.
//! 2. Otherwise the candidates are all tokens, ordered by logit descending (lower index first on ties).
//!    Top-k keeps the first `k` (`k == 0`: no limit). Probabilities are the softmax of
//!    `logit / temperature` over the kept candidates, computed in f64. Top-p keeps the shortest prefix
//!    whose cumulative probability reaches `p` (at least one token), then renormalises.
//! 3. One number `u = (next_u64() >> 11) · 2⁻⁵³` in `[0, 1)` is drawn from the request's [`Rng`], and the
//!    first candidate whose cumulative probability exceeds `u · total` is chosen.
//!
//! [`Rng`] is xoshiro256** seeded through SplitMix64, so any language can reproduce a stream.

use crate::error::{EngineError, Result};

/// Sampling parameters of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy. Default 0.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 keeps all. Default 0.
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1]; 1 keeps all. Default 1.
    pub top_p: f32,
    /// Seed of the request's random stream. Default 0.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::Sampling(format!("temperature must be ≥ 0, got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::Sampling(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        Ok(())
    }
}

/// xoshiro256** (Blackman & Vigna), seeded by SplitMix64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { s: [next(), next(), next(), next()] }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// A uniform number in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The sampler of one request: its parameters and its random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self { params, rng: Rng::new(params.seed) })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from the logits of the last position.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        // NaN logits sort last, so a broken row cannot be chosen over a finite one.
        let key = |i: u32| {
            let v = logits[i as usize];
            if v.is_nan() { f32::NEG_INFINITY } else { v }
        };
        let k = if self.params.top_k == 0 { order.len() } else { self.params.top_k.min(order.len()) };
        let by_logit = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let t = self.params.temperature as f64;
        let max = key(order[0]) as f64;
        let mut probs: Vec<f64> = order.iter().map(|&i| ((key(i) as f64 - max) / t).exp()).collect();
        let sum: f64 = probs.iter().sum();
        for p in &mut probs {
            *p /= sum;
        }
        if self.params.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cum += p;
                if cum >= self.params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let u = self.rng.next_f64() * total;
        let mut cum = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cum += p;
            if cum > u {
                return order[i];
            }
        }
        order[probs.len() - 1]
    }
}

/// Index of the largest value, the lowest index on ties; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_matches_the_reference_stream() {
        // SplitMix64's first output for seed 0 is the published 0xE220A8397B1DCDAF.
        let mut rng = Rng::new(0);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        let mut again = Rng::new(0);
        assert_eq!(first, (0..3).map(|_| again.next_u64()).collect::<Vec<_>>());
        assert_ne!(first[0], first[1]);
        assert_eq!(Rng::new(0).s[0], 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[1.0, 3.0, 3.0, f32::NAN]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_repeat() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let mut s = Sampler::new(SamplingParams { temperature: 0.8, top_k: 1, top_p: 1.0, seed: 3 }).unwrap();
        assert_eq!(s.sample(&logits), argmax(&logits));
        let p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.9, seed: 42 };
        let (mut a, mut b) = (Sampler::new(p).unwrap(), Sampler::new(p).unwrap());
        let xs: Vec<u32> = (0..50).map(|_| a.sample(&logits)).collect();
        let ys: Vec<u32> = (0..50).map(|_| b.sample(&logits)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().any(|&x| x != xs[0]), "temperature 1 should vary");
    }

    #[test]
    fn top_p_excludes_the_tail() {
        // One token has ~88% of the mass; top_p 0.5 must always choose it.
        let logits = [5.0, 3.0, 0.0, 0.0];
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 7 }).unwrap();
        assert!((0..200).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { temperature: f32::NAN, ..Default::default() }).is_err());
    }
}
