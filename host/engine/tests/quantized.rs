//! Quantized weights computed natively (issue 7, first increment): SmolLM2's Q4_1 GGUF loaded as it is,
//! against the same file imported (dequantized exactly) to f32.
//!
//! Tolerance: the native path multiplies the same weights (bit-identical after dequantization; each
//! product against its dequantized weights is checked to 1e-4 in backend/cpu/quant.rs) by activations
//! rounded to 8 bits per block of 32 — llama.cpp's scheme — a relative error of up to ~0.4% per value
//! that compounds over 30 layers; the imported f32 run keeps activations exact. Measured: 0.9–6.5%
//! relative (L2) on the logits over 3 prompts × 8 steps. Bound: 10%, and the greedy tokens of each prompt
//! agree for at least 4 steps (5–8 measured). The tighter check — text equal to llama.cpp's on the same
//! file, whose activations are rounded the same way — is the next increment.

mod common;

use std::path::Path;
use std::sync::Arc;

use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, ModelSource, Shard, StepInput};
use computepool_engine::sampling::argmax;
use computepool_engine::shard::LayerRange;
use computepool_engine::tokenizer::Tokenizer;
use computepool_engine::DType;

#[test]
fn smollm2_q4_1_native_tracks_its_dequantized_f32_weights() {
    let (Some(gguf), Some(dir)) = (common::smollm2_gguf(), common::smollm2_dir()) else {
        eprintln!("skipping: no SmolLM2 GGUF or imported model");
        return;
    };
    native_tracks_dequantized_f32(&gguf, &dir, 1e-1);
}

/// SmolLM2 requantized to Q4_K_M by llama-quantize: its 576-column matrices are not whole 256-value
/// super-blocks, so llama-quantize falls back to Q5_0 (for Q4_K) and Q8_0 (for Q6_K) there, and the
/// 1536-column down projections are Q4_K or Q6_K — every natively kept kind but Q4_1 in one file. The
/// reference is the same file imported (dequantized exactly) to f32.
///
/// Tolerance: much looser than Q4_1's because the K-quant products round their inputs to 8 bits per 256
/// values with one scale (ggml's Q8_K, as llama.cpp does), not per 32, and the down projection's input
/// (the SwiGLU product) has outliers that set that scale, rounding the rest of its 256 values coarsely.
/// Measured: 1.1–27.8% relative L2 on the logits (first prompt, step 6, the worst; most steps 1–7%);
/// bound 40%, and at least 4 greedy tokens agree on each prompt (7–8 measured). That the rest is the
/// scheme's rounding and not ours: our greedy choices on this file equal llama.cpp's, which rounds the
/// same way, in 73 of 76 steps, the rest near ties (the next test); each product equals its dequantized
/// weights against those activations to 1e-4 (backend/cpu/quant.rs).
#[test]
fn smollm2_q4_k_m_native_tracks_its_dequantized_f32_weights() {
    let Some(gguf) = common::smollm2_q4_k_m_gguf() else { return };
    let kinds = tensor_kinds(&gguf);
    eprintln!("tensor kinds: {kinds:?}");
    for kind in ["q4_K", "q6_K", "q5_0"] {
        assert!(kinds.iter().any(|(k, _)| k == kind), "the file has no {kind} tensor: {kinds:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    computepool_engine::gguf::import_gguf(&gguf, dir.path(), DType::F32, false).unwrap();
    native_tracks_dequantized_f32(&gguf, dir.path(), 4e-1);
}

/// How many tensors of each ggml type the file holds.
fn tensor_kinds(gguf: &Path) -> Vec<(String, usize)> {
    let file = computepool_engine::gguf::GgufFile::open(gguf).unwrap();
    let mut counts = std::collections::BTreeMap::new();
    for t in file.tensors() {
        *counts.entry(t.ggml_type.to_string()).or_insert(0) += 1;
    }
    counts.into_iter().collect()
}

/// The GGUF loaded natively against `reference_dir` (the same file dequantized to f32): logits within
/// `bound` relative L2 for 8 greedy steps of 3 prompts, at least 4 greedy tokens agreeing on each, and
/// the native run's 16-token greedy text printed.
fn native_tracks_dequantized_f32(gguf: &Path, reference_dir: &Path, bound: f64) {
    let backend = Arc::new(CpuBackend::new(2));
    let native = Shard::load_gguf(gguf, &LoadOptions::default(), backend.clone()).unwrap();
    let f32_opts = LoadOptions { dtype: DType::F32, ..Default::default() };
    let reference = Shard::load(reference_dir, &f32_opts, backend).unwrap();
    assert_eq!(native.config(), reference.config(), "the native config is the importer's");
    // 4.5–8.5 bits per weight in memory instead of 32 (the embedding may be another kind).
    eprintln!(
        "native weights {:.1} MB, f32 {:.1} MB",
        native.weight_bytes() as f64 / 1e6,
        reference.weight_bytes() as f64 / 1e6
    );
    assert!(native.weight_bytes() * 3 < reference.weight_bytes());

    let tok = Tokenizer::from_dir(reference_dir).unwrap();
    for text in ["The capital of France is", "def fibonacci(n):", "Water boils at"] {
        let prompt = tok.encode(text, false).unwrap();
        let (mut cn, mut cr) = (native.new_cache(), reference.new_cache());
        let mut want = common::logits(reference.forward(StepInput::Tokens(&prompt), &mut cr).unwrap());
        let mut got = common::logits(native.forward(StepInput::Tokens(&prompt), &mut cn).unwrap());
        let mut agreed = 0;
        for step in 0..8 {
            let e = common::rel_err(&got, &want);
            eprintln!("{text:?} step {step}: logits relative error {e:.2e}");
            assert!(e < bound, "{text:?} step {step}: logits relative error {e:.2e}");
            let (a, b) = (argmax(&got), argmax(&want));
            if a != b {
                break;
            }
            agreed += 1;
            want = common::logits(reference.forward(StepInput::Tokens(&[b]), &mut cr).unwrap());
            got = common::logits(native.forward(StepInput::Tokens(&[a]), &mut cn).unwrap());
        }
        eprintln!("{text:?}: {agreed} greedy tokens agree");
        assert!(agreed >= 4, "{text:?}: only {agreed} greedy tokens agree");
        let mut cache = native.new_cache();
        let mut ids = Vec::new();
        let mut next = argmax(&common::logits(native.forward(StepInput::Tokens(&prompt), &mut cache).unwrap()));
        for _ in 0..16 {
            ids.push(next);
            next = argmax(&common::logits(native.forward(StepInput::Tokens(&[next]), &mut cache).unwrap()));
        }
        eprintln!("{text:?} → {:?}", tok.decode(&ids, false).unwrap());
    }
}

#[test]
fn sharded_quantized_runs_equal_the_unsharded_run_bit_for_bit() {
    let Some(gguf) = common::smollm2_gguf() else {
        eprintln!("skipping: no SmolLM2 GGUF");
        return;
    };
    let backend = Arc::new(CpuBackend::new(2));
    let load = |range: Option<LayerRange>| Shard::load_gguf(&gguf, &LoadOptions { range, ..Default::default() }, backend.clone()).unwrap();
    let whole = load(None);
    let layers = whole.config().num_layers;
    let a = load(Some(LayerRange::new(0, 11, layers).unwrap()));
    let b = load(Some(LayerRange::new(11, layers, layers).unwrap()));
    let prompt = [1u32, 504, 2988, 314, 4649, 314];
    let (mut cw, mut ca, mut cb) = (whole.new_cache(), a.new_cache(), b.new_cache());
    let mut input = prompt.to_vec();
    for step in 0..6 {
        let want = common::logits(whole.forward(StepInput::Tokens(&input), &mut cw).unwrap());
        let hidden = common::hidden(a.forward(StepInput::Tokens(&input), &mut ca).unwrap());
        let got = common::logits(b.forward(StepInput::Hidden(&hidden), &mut cb).unwrap());
        assert_eq!(common::bits(&got), common::bits(&want), "step {step}");
        input = vec![argmax(&want)];
    }
}

/// The must-show check against llama.cpp itself: its greedy completions of 5 prompts on the same GGUF,
/// recorded by scripts/bench/llama-greedy.sh (llama.cpp's llama-simple, 16 tokens) in tests/data with the
/// file's sha256 and llama.cpp's commit. The native Q4_1 path rounds activations as llama.cpp does.
///
/// Each completion is replayed token by token (teacher forcing, so one disagreement cannot cascade):
/// llama.cpp's token must be our greedy choice, except at a near tie — our best logit within 0.1 of the
/// logit we give llama.cpp's token (logits here reach ~20) — where the two implementations' remaining
/// differences decide (llama.cpp keeps the KV cache in f16, we keep it in f32), at most 2 in 80 steps.
/// Measured with the interleaved kernels (per-block order, the same on every instruction set): 79 of 80
/// steps are our argmax; the one near tie ("Once upon a time", step 4) is " Nova" over " New" by 0.050
/// logits. (The row layout's AVX2 kernels, 8 lanes per row, met a different one: "The three primary
/// colors are", step 11, by 0.019.)
#[test]
fn smollm2_q4_1_greedy_text_equals_llama_cpp_on_the_same_file() {
    let Some(gguf) = common::smollm2_gguf() else {
        eprintln!("skipping: no SmolLM2 GGUF");
        return;
    };
    let fixture: serde_json::Value = serde_json::from_str(include_str!("data/llama_cpp_greedy_smollm2_q4_1.json")).unwrap();
    replay_llama_cpp_greedy(&gguf, &fixture, 2);
}

/// The same check on llama-quantize's Q4_K_M of SmolLM2 (Q4_K, Q6_K, Q5_0 and Q8_0 matrices), against
/// llama.cpp's completions on that file (recorded by scripts/quantize-gguf.sh --record, with its sha256;
/// one completion ends early at an end-of-generation token). Measured with the AVX2 kernels: 73 of 76
/// steps are our argmax; the 3 near ties are decided by 0.065, 0.013 and 0.001 logits. Bound: 4.
#[test]
fn smollm2_q4_k_m_greedy_text_equals_llama_cpp_on_the_same_file() {
    let Some(gguf) = common::smollm2_q4_k_m_gguf() else { return };
    let fixture: serde_json::Value = serde_json::from_str(include_str!("data/llama_cpp_greedy_smollm2_q4_k_m.json")).unwrap();
    replay_llama_cpp_greedy(&gguf, &fixture, 4);
}

/// Replays llama.cpp's greedy completions (teacher forcing): llama.cpp's token must be our argmax except
/// at near ties (within 0.1 logits), at most `max_near_ties` of them.
fn replay_llama_cpp_greedy(gguf: &Path, fixture: &serde_json::Value, max_near_ties: usize) {
    let sha = fixture["gguf_sha256"].as_str().unwrap();
    let bytes = std::fs::read(gguf).unwrap();
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    };
    assert_eq!(digest, sha, "the recorded completions belong to another file");
    let source = ModelSource::Gguf(gguf.to_path_buf());
    let tok = source.tokenizer().unwrap();
    let shard = source.load_shard(&LoadOptions::default(), Arc::new(CpuBackend::new(2))).unwrap();
    let n = fixture["tokens"].as_u64().unwrap() as usize;
    let (mut agreed, mut near_ties, mut steps) = (0, 0, 0);
    for case in fixture["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let completion = case["completion"].as_str().unwrap();
        let prompt_ids = tok.encode(prompt, false).unwrap();
        let all = tok.encode(&format!("{prompt}{completion}"), false).unwrap();
        assert_eq!(&all[..prompt_ids.len()], &prompt_ids[..], "{prompt:?}: the completion re-tokenizes across the prompt");
        let reference = &all[prompt_ids.len()..];
        // Fewer tokens than asked for: llama-simple stopped at an end-of-generation token (printed as nothing).
        assert!(reference.len() <= n, "{prompt:?}: llama.cpp's completion re-tokenizes to {} tokens", reference.len());
        let mut cache = shard.new_cache();
        let mut logits = common::logits(shard.forward(StepInput::Tokens(&prompt_ids), &mut cache).unwrap());
        for (step, &want) in reference.iter().enumerate() {
            let ours = argmax(&logits);
            steps += 1;
            if ours == want {
                agreed += 1;
            } else {
                let gap = logits[ours as usize] - logits[want as usize];
                eprintln!("{prompt:?} step {step}: llama.cpp {want} ({:?}), ours {ours} ({:?}), gap {gap:.4}", tok.decode(&[want], false).unwrap(), tok.decode(&[ours], false).unwrap());
                assert!(gap < 0.1, "{prompt:?} step {step}: llama.cpp chose {want}, we choose {ours} by {gap:.4} logits");
                near_ties += 1;
            }
            logits = common::logits(shard.forward(StepInput::Tokens(&[want]), &mut cache).unwrap());
        }
        if reference.len() < n {
            // Our choice must end generation too: an end-of-sequence id (or a near tie with the best one).
            let eos = &shard.config().eos_token_ids;
            let ours = argmax(&logits);
            steps += 1;
            if eos.contains(&ours) {
                agreed += 1;
            } else {
                let best_eos = eos.iter().map(|&e| logits[e as usize]).fold(f32::NEG_INFINITY, f32::max);
                let gap = logits[ours as usize] - best_eos;
                eprintln!("{prompt:?} step {}: llama.cpp ends generation, ours {ours} ({:?}), gap {gap:.4}", reference.len(), tok.decode(&[ours], false).unwrap());
                assert!(gap < 0.1, "{prompt:?}: llama.cpp ends generation after {} tokens, we choose {ours} by {gap:.4} logits", reference.len());
                near_ties += 1;
            }
        }
    }
    eprintln!("{agreed} of {steps} steps choose llama.cpp's token, {near_ties} near ties");
    assert!(near_ties <= max_near_ties, "{near_ties} near ties in {steps} steps");
}
