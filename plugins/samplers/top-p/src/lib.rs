//! Temperature + top-k + top-p sampler plugin (`computepool:sampler@0.1.0`). It is the engine's native
//! seeded sampling (`computepool_engine::sampling`) step for step, so a request gives the same tokens
//! with this plugin as without it:
//!
//! 1. `temperature == 0` → greedy (the first maximum, NaN never wins); no random number is drawn.
//! 2. Candidates are all tokens ordered by logit descending, lower index first on ties (NaN sorts last).
//!    Top-k keeps the first `k` (0: all). Probabilities are the softmax of `logit / temperature` over the
//!    kept candidates in f64; top-p keeps the shortest prefix whose cumulative probability reaches `p`.
//! 3. One `u = next-f64()` from the request's random stream (`computepool:host/random`, xoshiro256**
//!    seeded by the request), and the first candidate whose cumulative probability exceeds `u · total`.
//!
//! The only difference from native code is `exp`: libm's (FreeBSD's algorithm) here, glibc's on a native
//! x86_64 Linux host. Both are within one ulp, but they differ in the last bit for about one argument in
//! ten on [-60, 0] (measured: 1,955,822 of 20,000,000). A token can differ only if `u · total` falls within
//! about 1e-16 of a cumulative boundary, so sampled tokens agree in practice (host/plugin-host/tests/
//! samplers.rs), but bit-exactness needs one shared, correctly rounded `exp` on both sides.
#![no_std]

use alloc::format;
use alloc::vec::Vec;
use computepool::host::random;
use exports::computepool::sampler::sample::Guest;
use computepool::sampler::types::{SampleError, SampleInput, SamplingParams};

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/sampler/0.1.0"],
    world: "computepool:sampler/sampler@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

struct TopP;

fn validate(params: &SamplingParams) -> Result<(), SampleError> {
    if !params.temperature.is_finite() || params.temperature < 0.0 {
        return Err(SampleError::InvalidParams(format!("temperature must be ≥ 0, got {}", params.temperature)));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(SampleError::InvalidParams(format!("top_p must be in (0, 1], got {}", params.top_p)));
    }
    Ok(())
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_value {
            best_value = v;
            best = i;
        }
    }
    best as u32
}

impl Guest for TopP {
    fn sample(input: SampleInput) -> Result<u32, SampleError> {
        let params = input.params;
        validate(&params)?;
        let logits = &input.logits;
        if logits.is_empty() {
            return Err(SampleError::NoCandidates(format!("top-p: the logits are empty")));
        }
        if params.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let key = |i: u32| {
            let v = logits[i as usize];
            if v.is_nan() { f32::NEG_INFINITY } else { v }
        };
        let by_logit = |a: &u32, b: &u32| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        let k = if params.top_k == 0 { order.len() } else { (params.top_k as usize).min(order.len()) };
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by_logit);
            order.truncate(k);
        }
        order.sort_unstable_by(by_logit);
        let t = params.temperature as f64;
        let max = key(order[0]) as f64;
        let mut probs: Vec<f64> = order.iter().map(|&i| libm::exp((key(i) as f64 - max) / t)).collect();
        let sum: f64 = probs.iter().sum();
        for p in &mut probs {
            *p /= sum;
        }
        if params.top_p < 1.0 {
            let mut cumulative = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                cumulative += p;
                if cumulative >= params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let u = random::next_f64() * total;
        let mut cumulative = 0.0;
        for (i, p) in probs.iter().enumerate() {
            cumulative += p;
            if cumulative > u {
                return Ok(order[i]);
            }
        }
        Ok(order[probs.len() - 1])
    }
}

export!(TopP);
