//! Native sampling: greedy, temperature, top-k, top-p, min-p, repetition/presence/frequency penalties,
//! seeded. The algorithm is `computepool_sampling_core`'s, which specifies it exactly and which the
//! sampler plugins compile too, so native sampling and the greedy/top-p plugins give the same bits.
//!
//! The history a sampler sees is the tokens it has sampled for the request (not the prompt): on a
//! pipeline the exit shard never sees the prompt's token ids, and an unsharded run must sample what a
//! sharded one does. Presence and frequency penalties are defined over sampled tokens by OpenAI too.
//!
//! [`Rng`] is xoshiro256** seeded through SplitMix64, so any language can reproduce a stream; a draw is
//! `(next_u64() >> 11) · 2⁻⁵³`.

use computepool_sampling_core as core_sampling;

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
    /// Minimum probability relative to the most likely token, in [0, 1]. Default 0 (off).
    pub min_p: f32,
    /// Multiplicative penalty on sampled tokens, > 0. Default 1 (off).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of each sampled token. Default 0 (off).
    pub presence_penalty: f32,
    /// Subtracted per occurrence from the logit of each sampled token. Default 0 (off).
    pub frequency_penalty: f32,
    /// Seed of the request's random stream. Default 0.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// The shared algorithm's parameters (a `top_k` past u32 keeps every token, as 0 does).
    pub fn core(&self) -> core_sampling::Params {
        core_sampling::Params {
            temperature: self.temperature,
            top_k: u32::try_from(self.top_k).unwrap_or(0),
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
        }
    }

    /// Whether the token is simply the largest raw logit (the lowest index on ties; [`argmax`]): greedy
    /// and no penalty, so nothing but the one largest logit matters.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && !self.core().has_penalties()
    }

    pub fn validate(&self) -> Result<()> {
        self.core().validate().map_err(|e| EngineError::Sampling(e.to_string()))
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

/// The sampler of one request: its parameters, its random stream and the tokens it has sampled.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    core: core_sampling::Params,
    rng: Rng,
    history: Vec<u32>,
    scratch: core_sampling::Scratch,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self { params, core: params.core(), rng: Rng::new(params.seed), history: Vec::new(), scratch: Default::default() })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The tokens sampled so far.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// Picks the next token from the logits of the last position, and remembers it.
    ///
    /// With a temperature above 0, every token takes exactly one draw from the stream, also when the
    /// algorithm needs none (a row whose largest logit is not finite): the stream's position is then
    /// the number of tokens sampled, so a pipeline whose exit changes mid-request continues it with
    /// [`Sampler::skip`] and samples what an undisturbed run does.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let rng = &mut self.rng;
        let mut drew = false;
        let token = core_sampling::sample(logits, &self.history, &self.core, &mut self.scratch, || {
            drew = true;
            rng.next_f64()
        });
        if !drew && self.params.temperature > 0.0 {
            self.rng.next_f64();
        }
        self.history.push(token);
        token
    }

    /// Moves the stream past the draws of `tokens` tokens sampled elsewhere (one each above
    /// temperature 0, none when greedy). The history (penalties) is not rebuilt: it holds only what
    /// this sampler sampled.
    pub fn skip(&mut self, tokens: u64) {
        if self.params.temperature > 0.0 {
            for _ in 0..tokens {
                self.rng.next_f64();
            }
        }
    }
}

/// Index of the largest value, the lowest index on ties; NaN never wins.
pub fn argmax(values: &[f32]) -> u32 {
    core_sampling::argmax(values)
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
        let mut s = Sampler::new(SamplingParams { temperature: 0.8, top_k: 1, seed: 3, ..Default::default() }).unwrap();
        assert_eq!(s.sample(&logits), argmax(&logits));
        let p = SamplingParams { temperature: 1.0, top_p: 0.9, seed: 42, ..Default::default() };
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
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.5, seed: 7, ..Default::default() }).unwrap();
        assert!((0..200).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn a_sampler_that_skips_the_draws_of_n_tokens_continues_the_stream() {
        let params = SamplingParams { temperature: 0.9, seed: 7, ..SamplingParams::default() };
        let logits: Vec<Vec<f32>> = (0..12).map(|i| (0..50).map(|j| ((i * 7 + j * 13) % 17) as f32 * 0.3).collect()).collect();
        let mut whole = Sampler::new(params).expect("valid");
        let all: Vec<u32> = logits.iter().map(|l| whole.sample(l)).collect();
        let mut resumed = Sampler::new(params).expect("valid");
        resumed.skip(5);
        let rest: Vec<u32> = logits[5..].iter().map(|l| resumed.sample(l)).collect();
        assert_eq!(rest, all[5..]);
        // A row that needs no draw (its largest logit is infinite) still takes one.
        let mut a = Sampler::new(params).expect("valid");
        let mut b = Sampler::new(params).expect("valid");
        let mut inf = logits[0].clone();
        inf[3] = f32::INFINITY;
        assert_eq!(a.sample(&inf), 3);
        b.skip(1);
        assert_eq!(a.sample(&logits[1]), b.sample(&logits[1]));
    }

    #[test]
    fn penalties_apply_to_the_sampled_history() {
        // Greedy with a presence penalty: after sampling token 1 it falls below token 2.
        let p = SamplingParams { presence_penalty: 1.5, ..Default::default() };
        let mut s = Sampler::new(p).unwrap();
        let logits = [0.0, 3.0, 2.0];
        assert_eq!(s.sample(&logits), 1);
        assert_eq!(s.sample(&logits), 2);
        assert_eq!(s.history(), &[1, 2]);
    }

    #[test]
    fn bad_parameters_are_rejected() {
        assert!(Sampler::new(SamplingParams { temperature: -1.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { top_p: 0.0, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { temperature: f32::NAN, ..Default::default() }).is_err());
        assert!(Sampler::new(SamplingParams { min_p: 2.0, ..Default::default() }).is_err());
    }
}
