//! The default sampler as a plugin (`computepool:sampler@0.1.0`): temperature, top-k, top-p, min-p and
//! repetition/presence/frequency penalties, drawing from the request's seeded stream. It runs
//! `computepool_sampling_core`, the code the engine's native sampler runs, so a request gives the same
//! tokens, bit for bit the same probabilities, with this plugin as without it.
//!
//! Buffers live in a static between calls (the instance is single-threaded and pooled by the host), so
//! a call allocates nothing once they have grown to the vocabulary.
#![no_std]

use alloc::string::ToString;
use computepool::host::random;
use computepool::sampler::types::{SampleError, SampleInput};
use computepool_sampling_core::{Params, Scratch, sample};
use exports::computepool::sampler::sample::Guest;

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/sampler/0.1.0"],
    world: "computepool:sampler/sampler@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

struct TopP;

static SCRATCH: computepool_plugin_guest::InstanceCell<Scratch> = computepool_plugin_guest::InstanceCell::new(Scratch::new());

impl Guest for TopP {
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
        params.validate().map_err(|e| SampleError::InvalidParams(e.to_string()))?;
        if input.logits.is_empty() {
            return Err(SampleError::NoCandidates("top-p: the logits are empty".to_string()));
        }
        let generated = input.history.len() - (input.generated as usize).min(input.history.len());
        let history = &input.history[generated..];
        SCRATCH.with(|scratch| Ok(sample(&input.logits, history, &params, scratch, random::next_f64)))
    }
}

export!(TopP);
