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

/// The input record, lowered straight from the caller's slices: the canonical ABI copies the logits and
/// the history into the guest's memory once (a memcpy for lists of f32 and u32), with no host-side
/// buffer in between and nothing allocated on the host per call. Field names and order are the WIT
/// record's; the type check in [`call`] refuses a mismatch.
#[derive(wasmtime::component::ComponentType, wasmtime::component::Lower)]
#[component(record)]
struct SampleInputRef<'a> {
    logits: &'a [f32],
    history: &'a [u32],
    generated: u32,
    params: wit::SamplingParams,
}

/// One call. The outer error is a trap; the inner one is the plugin's own `sample-error`.
pub(super) fn call(
    sampler: &Sampler,
    store: &mut Store<HostState>,
    input: &super::SampleInput<'_>,
) -> wasmtime::Result<Result<u32, String>> {
    let p = &input.params;
    let record = SampleInputRef {
        logits: input.logits,
        history: input.history,
        generated: input.generated,
        params: wit::SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            repetition_penalty: p.repetition_penalty,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            seed: p.seed,
        },
    };
    // The generated binding lowers an owned `SampleInput` (its `Vec`s would need the logits copied into
    // them first); the same export typed with the borrowing record skips that copy. The type check is a
    // walk of a two-level record, negligible beside the copy it saves.
    let func = *sampler.computepool_sampler_sample().func_sample().func();
    let sample = func.typed::<(SampleInputRef<'_>,), (Result<u32, wit::SampleError>,)>(&*store)?;
    let (result,) = sample.call(&mut *store, (record,))?;
    Ok(result.map_err(|e| match e {
        wit::SampleError::InvalidParams(m) => format!("invalid parameters: {m}"),
        wit::SampleError::NoCandidates(m) => format!("no candidates: {m}"),
    }))
}
