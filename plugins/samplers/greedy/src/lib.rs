//! Greedy sampler plugin (`computepool:sampler@0.1.0`): the index of the largest logit, the lowest index on
//! ties; NaN never wins. It ignores the sampling parameters and draws no random number, so it gives
//! exactly the tokens of the engine's `sampling::argmax`.
#![no_std]

use alloc::format;
use exports::computepool::sampler::sample::Guest;
use computepool::sampler::types::{SampleError, SampleInput};

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/sampler/0.1.0"],
    world: "computepool:sampler/sampler@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

struct Greedy;

impl Guest for Greedy {
    fn sample(input: SampleInput) -> Result<u32, SampleError> {
        if input.logits.is_empty() {
            return Err(SampleError::NoCandidates(format!("greedy: the logits are empty")));
        }
        Ok(computepool_sampling_core::argmax(&input.logits))
    }
}

export!(Greedy);
