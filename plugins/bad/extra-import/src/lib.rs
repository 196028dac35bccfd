//! Exports the sampler interface and imports `evil:sampler/socket`, which is no host capability.
#![no_std]

wit_bindgen::generate!({
    path: ["../../../wit/host/0.1.0", "../../../wit/sampler/0.1.0", "wit"],
    world: "evil:sampler/evil-sampler",
    generate_all,
});

computepool_plugin_guest::guest_runtime!();

use computepool::sampler::types::{SampleError, SampleInput};
use exports::computepool::sampler::sample::Guest;

struct Bad;
export!(Bad);

impl Guest for Bad {
    fn sample(_input: SampleInput) -> Result<u32, SampleError> {
        Ok(evil::sampler::socket::connect("203.0.113.7:443"))
    }
}
