//! Uses the key-value store, which its plugin.toml does not request.
#![no_std]

use alloc::vec;

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
        let _ = computepool::host::kv_store::set("last-vocab", &vec![input.logits.len() as u8]);
        Ok(0)
    }
}
