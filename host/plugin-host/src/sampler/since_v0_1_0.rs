//! `computepool:sampler@0.1.0` (wit/sampler/0.1.0). Frozen: a new sampler version is a new file next to
//! this one and one arm in `super::SamplerBindings`.

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use crate::host_state::HostState;

wasmtime::component::bindgen!({
    path: ["../../wit/host/0.1.0", "../../wit/sampler/0.1.0"],
    world: "computepool:sampler/sampler@0.1.0",
    with: { "computepool:host": crate::capability_impls::since_v0_1_0::computepool::host },
    imports: { default: trappable },
});

use computepool::sampler::types as wit;

/// Interfaces of this version that hold only types; importing them needs no capability.
pub(super) const TYPE_ONLY_IMPORTS: &[&str] = &["computepool:sampler/types@0.1.0"];

/// The interface a sampler of this version exports.
pub(super) const EXPORT: &str = "computepool:sampler/sample@0.1.0";

/// Checks that `component` exports this version's interface, before any instance exists.
pub(super) fn pre(linker: &Linker<HostState>, component: &Component) -> wasmtime::Result<SamplerPre<HostState>> {
    SamplerPre::new(linker.instantiate_pre(component)?)
}

pub(super) fn instantiate(pre: &SamplerPre<HostState>, store: &mut Store<HostState>) -> wasmtime::Result<Sampler> {
    pre.instantiate(store)
}

/// The input record, kept per pooled instance and refilled for each call, so a call allocates nothing on
/// the host side once it has seen the vocabulary (the canonical ABI still copies it into the guest).
pub(super) type InputBuffer = wit::SampleInput;

pub(super) fn new_buffer() -> InputBuffer {
    wit::SampleInput {
        logits: Vec::new(),
        history: Vec::new(),
        generated: 0,
        params: wit::SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
        },
    }
}

/// One call. The outer error is a trap; the inner one is the plugin's own `sample-error`.
pub(super) fn call(
    sampler: &Sampler,
    store: &mut Store<HostState>,
    buffer: &mut InputBuffer,
    input: &super::SampleInput<'_>,
) -> wasmtime::Result<Result<u32, String>> {
    let p = &input.params;
    buffer.logits.clear();
    buffer.logits.extend_from_slice(input.logits);
    buffer.history.clear();
    buffer.history.extend_from_slice(input.history);
    buffer.generated = input.generated;
    buffer.params = wit::SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k,
        top_p: p.top_p,
        min_p: p.min_p,
        repetition_penalty: p.repetition_penalty,
        presence_penalty: p.presence_penalty,
        frequency_penalty: p.frequency_penalty,
        seed: p.seed,
    };
    let result = sampler.computepool_sampler_sample().call_sample(store, buffer)?;
    Ok(result.map_err(|e| match e {
        wit::SampleError::InvalidParams(m) => format!("invalid parameters: {m}"),
        wit::SampleError::NoCandidates(m) => format!("no candidates: {m}"),
    }))
}
