//! Mirostat 2.0 (Basu et al., 2021) as a sampler plugin: what a plugin can do that a parameter cannot. It
//! keeps state across a request's steps — the running surprise bound `mu` — in the host's scoped
//! key-value store, and adapts each step's truncation so the tokens' surprise tracks a target.
//!
//! Per step, with `x_i = (l_i - max) / T` (log-weights, `computepool_sampling_core::exp` for the weights)
//! and `Z = Σ exp(x_i)`: a token's surprise is `s_i = (ln Z - x_i) / ln 2` bits. Keep the tokens with
//! `s_i ≤ mu` (the most likely always), draw one in proportion to its weight from the request's stream,
//! then `mu ← mu - η (s_token - τ)`, with τ = 5 bits and η = 0.1 (llama.cpp's defaults) and `mu = 2τ` at a
//! request's first step. Temperature 0 is greedy, as the contract requires.
//!
//! The state's key is a hash of the request's seed and its history (the generated tokens); each step reads
//! the key of the history it is given, deletes it and writes the next one, so one request holds one entry.
//! Two requests with the same seed and the same generated prefix share a state — harmless (they are in the
//! same place of the same stream). Should the store refuse a write (quota), the next step starts from 2τ.
#![no_std]

use alloc::format;
use alloc::string::{String, ToString};
use computepool::host::{kv_store, random};
use computepool::sampler::types::{SampleError, SampleInput};
use computepool_sampling_core::{argmax, exp};
use exports::computepool::sampler::sample::Guest;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/sampler/0.1.0"],
    world: "computepool:sampler/sampler@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

/// Target surprise, bits.
const TAU: f64 = 5.0;
/// Learning rate of `mu`.
const ETA: f64 = 0.1;
const LN_2: f64 = core::f64::consts::LN_2;

struct Mirostat;

/// FNV-1a over the seed and the tokens: the state's key.
fn state_key(seed: u64, history: &[u32]) -> String {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01B3);
        }
    };
    feed(&seed.to_le_bytes());
    for t in history {
        feed(&t.to_le_bytes());
    }
    format!("mu:{h:016x}:{}", history.len())
}

/// Natural log of `x ≥ 1` (here a sum of weights): exponent bits, then 2·atanh((m-1)/(m+1)) for the
/// mantissa (|z| ≤ 1/3, 12 terms: error under 1e-13 — plenty for a surprise bound).
fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    let z = (m - 1.0) / (m + 1.0);
    let z2 = z * z;
    let mut term = z;
    let mut sum = 0.0;
    for k in 0..12 {
        sum += term / (2 * k + 1) as f64;
        term *= z2;
    }
    exponent as f64 * LN_2 + 2.0 * sum
}

impl Guest for Mirostat {
    fn sample(input: SampleInput) -> Result<u32, SampleError> {
        let p = input.params;
        if !(p.temperature.is_finite() && p.temperature >= 0.0) {
            return Err(SampleError::InvalidParams(format!("temperature must be ≥ 0, got {}", p.temperature)));
        }
        let logits = &input.logits;
        if logits.is_empty() {
            return Err(SampleError::NoCandidates("mirostat: the logits are empty".to_string()));
        }
        let best = argmax(logits);
        let max = logits[best as usize];
        if p.temperature == 0.0 || !max.is_finite() {
            return Ok(best);
        }
        let generated = input.history.len() - (input.generated as usize).min(input.history.len());
        let history = &input.history[generated..];
        let key = state_key(p.seed, history);
        let mu = match kv_store::get(&key) {
            Ok(Some(bytes)) if bytes.len() == 8 => f64::from_le_bytes(bytes.try_into().unwrap_or([0; 8])),
            _ => 2.0 * TAU,
        };

        let max = max as f64;
        let inverse_t = 1.0 / p.temperature as f64;
        let log_weight = |l: f32| if l.is_nan() { f64::NEG_INFINITY } else { (l as f64 - max) * inverse_t };
        let total: f64 = logits.iter().map(|&l| exp(log_weight(l))).sum();
        let ln_total = ln(total);
        // s_i ≤ mu  ⟺  x_i ≥ ln Z - mu·ln 2. Capped at 0 so the most likely token (x = 0) always passes,
        // even when mu has fallen below its surprise.
        let threshold = (ln_total - mu * LN_2).min(0.0);
        let kept: f64 = logits.iter().map(|&l| log_weight(l)).filter(|&x| x >= threshold).map(exp).sum();
        let target = random::next_f64() * kept;
        let mut running = 0.0;
        let mut chosen = best;
        for (i, &l) in logits.iter().enumerate() {
            let x = log_weight(l);
            if x >= threshold {
                running += exp(x);
                if running > target {
                    chosen = i as u32;
                    break;
                }
            }
        }
        let surprise = (ln_total - log_weight(logits[chosen as usize])) / LN_2;
        let next_mu = mu - ETA * (surprise - TAU);

        // Move the state along: one entry per running request.
        let _ = kv_store::delete(&key);
        let mut next_history = alloc::vec::Vec::with_capacity(history.len() + 1);
        next_history.extend_from_slice(history);
        next_history.push(chosen);
        let _ = kv_store::set(&state_key(p.seed, &next_history), &next_mu.to_le_bytes());
        Ok(chosen)
    }
}

export!(Mirostat);
