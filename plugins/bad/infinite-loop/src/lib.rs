//! Never returns: the host's fuel limit must stop it.
#![no_std]

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/sampler/0.1.0"],
    world: "computepool:sampler/sampler@0.1.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

use computepool::sampler::types::{SampleError, SampleInput};
use exports::computepool::sampler::sample::Guest;

struct Bad;
export!(Bad);

impl Guest for Bad {
    fn sample(input: SampleInput) -> Result<u32, SampleError> {
        let mut i = 0u32;
        loop {
            i = core::hint::black_box(i.wrapping_add(input.logits.len() as u32));
        }
    }
}
