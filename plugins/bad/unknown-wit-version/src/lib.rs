//! Implements `computepool:sampler@0.9.0`, a version no host supports.
#![no_std]

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "wit"],
    world: "computepool:sampler/sampler@0.9.0",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

use computepool::sampler::types::{SampleError, SampleInput};
use exports::computepool::sampler::sample::Guest;

struct Bad;
export!(Bad);

impl Guest for Bad {
    fn sample(_input: SampleInput) -> Result<u32, SampleError> {
        Ok(0)
    }
}
