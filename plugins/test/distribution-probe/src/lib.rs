//! Test plugin: runs `computepool_sampling_core::prepare` in WebAssembly and stores what it computed, so
//! the host's tests can check the probabilities bit for bit against native sampling (not just tokens).
//!
//! kv key `distribution`: the total, then each positive-weight candidate's token and weight (both widened to
//! f64), in draw order, all f64 little-endian bits. A greedy decision stores just the token.
#![no_std]

use alloc::string::ToString;
use alloc::vec::Vec;
use computepool::sampler::types::{SampleError, SampleInput};
use computepool_sampling_core::{Params, Prepared, Scratch, prepare};
use exports::computepool::sampler::sample::Guest;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/sampler/0.1.0"],
    world: "computepool:sampler/sampler@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

struct Probe;

impl Guest for Probe {
    fn sample(input: SampleInput) -> Result<u32, SampleError> {
        let p = input.params;
        let params = Params {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
        };
        let mut scratch = Scratch::new();
        let mut bytes = Vec::new();
        let token = match prepare(&input.logits, &input.history, &params, &mut scratch) {
            Prepared::Greedy(token) => {
                bytes.extend_from_slice(&(token as f64).to_le_bytes());
                token
            }
            Prepared::Draw(d) => {
                bytes.extend_from_slice(&d.total.to_le_bytes());
                let mut first = None;
                for (token, w) in d.entries() {
                    first.get_or_insert(token);
                    bytes.extend_from_slice(&(token as f64).to_le_bytes());
                    bytes.extend_from_slice(&f64::from(w).to_le_bytes());
                }
                first.unwrap_or(0)
            }
        };
        computepool::host::kv_store::set("distribution", &bytes)
            .map_err(|_| SampleError::NoCandidates("the kv-store refused the distribution".to_string()))?;
        Ok(token)
    }
}

export!(Probe);
