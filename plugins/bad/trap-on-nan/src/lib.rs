//! Returns how many calls this instance served before this one (modulo the vocabulary), and traps when
//! logits[0] is NaN. A host that reused a trapped instance would see the count go on instead of restart.
#![no_std]

use core::sync::atomic::{AtomicU32, Ordering};

static CALLS: AtomicU32 = AtomicU32::new(0);

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
        let served = CALLS.fetch_add(1, Ordering::Relaxed);
        if input.logits.first().is_some_and(|v| v.is_nan()) {
            core::arch::wasm32::unreachable();
        }
        Ok(served % input.logits.len() as u32)
    }
}
