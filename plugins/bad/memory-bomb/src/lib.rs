//! Allocates a mebibyte at a time, forever: the host's memory limit must stop it.
#![no_std]

use alloc::vec;
use alloc::vec::Vec;

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
    fn sample(_input: SampleInput) -> Result<u32, SampleError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            hoard.push(core::hint::black_box(vec![1u8; 1 << 20]));
        }
    }
}
