//! The engine against an independent implementation: candle-transformers' Llama, Qwen2 and Mistral, run in
//! the test on the same seeded tiny checkpoints (read by candle from the same model.safetensors), CPU, f32.
//!
//! - Prefill: last-position logits of prompts of several lengths agree within 1e-4 (max abs, f32).
//! - Decode: 20 single-token steps, then a second-turn chunk on the cached conversation and more steps,
//!   through both implementations' KV caches, agree within 1e-4 at every step.
//! - bf16: the engine holding weights in bf16 agrees within 1e-4 with candle run in f32 on the same
//!   weights rounded to bf16 (so bf16 storage is the only difference from f32, and it is exact): always on
//!   a backend without bf16 dot products, and on the default backend for prompts of up to
//!   `CpuBackend::BF16_EXACT_MAX_ROWS` tokens (longer bf16 prefills may round activations to bf16 as
//!   well, by design, on AVX-512 BF16 CPUs). On the original f32 weights the default bf16 engine stays
//!   within 6 % of the logit scale of candle, for every prompt.
//!
//! Mistral's sliding window and candle: the engine follows Hugging Face (position `p` attends `j` iff
//! `0 ≤ p − j < window`); candle 0.11's Mistral masks `j + window < p`, i.e. attends `window + 1`
//! positions, and only inside a multi-token chunk: a single-token step, and the cached prefix of a chunk,
//! attend to every cached position. So the candle peer is built with `sliding_window = window − 1`, which
//! makes its prefill mask exactly HF's, and past the window the engine's cached decode is checked against
//! candle's full recompute of the whole sequence (where that mask applies) instead of candle's cache.

mod common;

use std::collections::HashMap;

use candle_core::{DType as CDType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama, mistral, qwen2};
use common::*;
use computepool_engine::DType;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{Shard, StepInput};

/// f32 engine against f32 candle, max abs over the vocabulary.
const F32_TOL: f32 = 1e-4;
/// Engine bf16 against candle f32 on the original (unrounded) weights, as a fraction of the largest |logit|.
/// Rounding every matrix to bf16 (8 bits of mantissa, relative error ≤ 2⁻⁹) through 3 layers with sharp
/// attention moves logits of magnitude ~12 by up to ~0.34 on these checkpoints (≈ 3 % of the scale);
/// 6 % leaves headroom for other CPUs' bf16 prefill path while still catching a wrong weight or layout,
/// which moves logits by their whole scale.
const BF16_VS_F32_REL_TOL: f32 = 0.06;
/// The real SmolLM2 (30 layers, f32, logits up to ~31) against candle: the two sum in different orders
/// and 30 layers accumulate it; ~7e-5 is observed, this leaves headroom for other CPUs' kernels.
const SMOLLM2_TOL: f32 = 5e-4;

/// candle's implementation of one family, with its KV cache.
enum Peer {
    Llama {
        model: llama::Llama,
        cache: llama::Cache,
        cfg: llama::Config,
    },
    Qwen2(qwen2::ModelForCausalLM),
    Mistral(mistral::Model),
}

impl Peer {
    fn new(ck: &Checkpoint, vb: VarBuilder<'_>) -> Self {
        let dev = Device::Cpu;
        match ck.family {
            Family::Llama3 => {
                let cfg: llama::LlamaConfig = serde_json::from_value(ck.config.clone()).expect("candle llama config");
                let cfg = cfg.into_config(false);
                let model = llama::Llama::load(vb, &cfg).expect("candle llama load");
                let cache = llama::Cache::new(true, CDType::F32, &cfg, &dev).expect("candle llama cache");
                Peer::Llama { model, cache, cfg }
            }
            Family::Qwen2 => {
                let cfg: qwen2::Config = serde_json::from_value(ck.config.clone()).expect("candle qwen2 config");
                Peer::Qwen2(qwen2::ModelForCausalLM::new(&cfg, vb).expect("candle qwen2 load"))
            }
            Family::Mistral => {
                let mut cfg: mistral::Config =
                    serde_json::from_value(ck.config.clone()).expect("candle mistral config");
                // See the module doc: candle's `window` is HF's `window - 1`.
                cfg.sliding_window = Some(MISTRAL_WINDOW - 1);
                Peer::Mistral(mistral::Model::new(&cfg, vb).expect("candle mistral load"))
            }
        }
    }

    /// Loads candle from the checkpoint's model.safetensors, as f32.
    fn from_file(ck: &Checkpoint) -> Self {
        let bytes = std::fs::read(ck.safetensors_path()).expect("read model.safetensors");
        let vb = VarBuilder::from_buffered_safetensors(bytes, CDType::F32, &Device::Cpu).expect("candle VarBuilder");
        Self::new(ck, vb)
    }

    /// candle in f32 on the checkpoint's matrices rounded to bf16 (vectors — norms, biases — kept in f32,
    /// as the engine keeps them).
    fn bf16_rounded(ck: &Checkpoint) -> Self {
        let map: HashMap<String, Tensor> = ck
            .tensors
            .iter()
            .map(|t| {
                let values: Vec<f32> = if t.shape.len() == 2 {
                    t.values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
                } else {
                    t.values.clone()
                };
                (
                    t.name.clone(),
                    Tensor::from_vec(values, t.shape.as_slice(), &Device::Cpu).expect("tensor"),
                )
            })
            .collect();
        Self::new(ck, VarBuilder::from_tensors(map, CDType::F32, &Device::Cpu))
    }

    /// Last-position logits of `tokens`, which follow `offset` positions already in candle's cache.
    fn forward(&mut self, tokens: &[u32], offset: usize) -> Vec<f32> {
        let input = Tensor::new(tokens, &Device::Cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("input tensor");
        let out = match self {
            Peer::Llama { model, cache, .. } => model.forward(&input, offset, cache),
            Peer::Qwen2(m) => m.forward(&input, offset),
            Peer::Mistral(m) => m.forward(&input, offset),
        };
        out.and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("candle forward")
    }

    fn clear_cache(&mut self) {
        match self {
            Peer::Llama { cache, cfg, .. } => {
                *cache = llama::Cache::new(true, CDType::F32, cfg, &Device::Cpu).expect("cache")
            }
            Peer::Qwen2(m) => m.clear_kv_cache(),
            Peer::Mistral(m) => m.clear_kv_cache(),
        }
    }

    /// Logits of the whole `seq` from an empty cache.
    fn recompute(&mut self, seq: &[u32]) -> Vec<f32> {
        self.clear_cache();
        let l = self.forward(seq, 0);
        self.clear_cache();
        l
    }
}

fn engine_step(shard: &Shard, tokens: &[u32], cache: &mut computepool_engine::kv_cache::KvCache) -> Vec<f32> {
    logits(shard.forward(StepInput::Tokens(tokens), cache).expect("engine forward"))
}

fn prompt_lengths(family: Family) -> &'static [usize] {
    match family {
        // 30 and 41 cross Mistral's window of 8 several times inside one prefill.
        Family::Mistral => &[1, 5, 8, 9, 13, 30, 41],
        _ => &[1, 5, 13, 30],
    }
}

fn prefill_matches(family: Family) {
    let ck = checkpoint(family);
    let shard = ck.load_f32();
    let mut peer = Peer::from_file(&ck);
    let mut rng = TestRng::new(0x9E3);
    let mut worst = 0f32;
    for &n in prompt_lengths(family) {
        let prompt = rng.tokens(n);
        let ours = recompute(&shard, &prompt);
        let theirs = peer.recompute(&prompt);
        assert_eq!(ours.len(), theirs.len());
        let d = max_abs_diff(&ours, &theirs);
        assert!(
            d <= F32_TOL,
            "{}: prompt of {n} tokens: logits differ from candle by {d:e} (logit scale {})",
            family.name(),
            max_abs(&theirs)
        );
        worst = worst.max(d);
    }
    eprintln!("{} f32 prefill vs candle: worst max abs diff {worst:e}", family.name());
}

#[test]
fn llama3_prefill_matches_candle() {
    prefill_matches(Family::Llama3);
}

#[test]
fn qwen2_prefill_matches_candle() {
    prefill_matches(Family::Qwen2);
}

#[test]
fn mistral_prefill_matches_candle() {
    prefill_matches(Family::Mistral);
}

/// 20 decode steps, a second-turn chunk and 3 more steps through both caches (Mistral: see module doc).
fn decode_matches(family: Family) {
    let ck = checkpoint(family);
    let shard = ck.load_f32();
    let mut peer = Peer::from_file(&ck);
    let mut rng = TestRng::new(0xDEC0DE);
    let mut chunks = vec![rng.tokens(9)];
    chunks.extend((0..20).map(|_| rng.tokens(1)));
    chunks.push(rng.tokens(5));
    chunks.extend((0..3).map(|_| rng.tokens(1)));

    let mut cache = shard.new_cache();
    let mut seq: Vec<u32> = Vec::new();
    let mut worst = 0f32;
    for (i, chunk) in chunks.iter().enumerate() {
        let offset = seq.len();
        seq.extend(chunk);
        let ours = engine_step(&shard, chunk, &mut cache);
        let theirs = match family {
            Family::Mistral => peer.recompute(&seq),
            _ => peer.forward(chunk, offset),
        };
        let d = max_abs_diff(&ours, &theirs);
        assert!(
            d <= F32_TOL,
            "{}: step {i} (length {}): cached logits differ from candle by {d:e}",
            family.name(),
            seq.len()
        );
        worst = worst.max(d);
    }
    eprintln!(
        "{} f32 decode (20 steps + second turn) vs candle: worst max abs diff {worst:e}",
        family.name()
    );
}

#[test]
fn llama3_cached_decode_matches_candle() {
    decode_matches(Family::Llama3);
}

#[test]
fn qwen2_cached_decode_matches_candle() {
    decode_matches(Family::Qwen2);
}

#[test]
fn mistral_cached_decode_matches_candle_recompute() {
    decode_matches(Family::Mistral);
}

#[test]
fn mistral_within_window_matches_candle_cache() {
    // While the sequence fits the window, candle's cached path is exact too: compare cache against cache.
    let ck = checkpoint(Family::Mistral);
    let shard = ck.load_f32();
    let mut peer = Peer::from_file(&ck);
    let mut rng = TestRng::new(0x3);
    let chunks = [
        rng.tokens(3),
        rng.tokens(1),
        rng.tokens(1),
        rng.tokens(2),
        rng.tokens(1),
    ];
    let mut cache = shard.new_cache();
    let mut offset = 0;
    for (i, chunk) in chunks.iter().enumerate() {
        let ours = engine_step(&shard, chunk, &mut cache);
        let theirs = peer.forward(chunk, offset);
        offset += chunk.len();
        assert!(offset <= MISTRAL_WINDOW);
        let d = max_abs_diff(&ours, &theirs);
        assert!(
            d <= F32_TOL,
            "mistral: step {i}: cached logits differ from candle's cache by {d:e}"
        );
    }
}

#[test]
fn bf16_matches_candle_on_bf16_rounded_weights() {
    for family in Family::ALL {
        let ck = checkpoint(family);
        let shard = ck.load(DType::Bf16, None, 2);
        let exact_shard = ck.load_bf16_exact();
        let mut exact = Peer::bf16_rounded(&ck);
        let mut original = Peer::from_file(&ck);
        let mut rng = TestRng::new(0xB);
        let (mut worst_exact, mut worst_loose, mut scale) = (0f32, 0f32, 0f32);
        for &n in prompt_lengths(family) {
            let prompt = rng.tokens(n);
            let ours = recompute(&shard, &prompt);
            let reference = original.recompute(&prompt);
            scale = scale.max(max_abs(&reference));
            let loose = max_abs_diff(&ours, &reference);
            let bound = BF16_VS_F32_REL_TOL * max_abs(&reference);
            assert!(
                loose <= bound,
                "{} bf16: prompt of {n}: differs from candle f32 by {loose:e} (bound {bound:e})",
                family.name()
            );
            worst_loose = worst_loose.max(loose);
            let rounded = exact.recompute(&prompt);
            let d = max_abs_diff(&recompute(&exact_shard, &prompt), &rounded);
            assert!(
                d <= F32_TOL,
                "{} bf16 (exact backend): prompt of {n}: differs from candle on bf16-rounded weights by {d:e}",
                family.name()
            );
            worst_exact = worst_exact.max(d);
            if n <= CpuBackend::BF16_EXACT_MAX_ROWS {
                // The default backend is exact too up to this many rows (above, AVX-512 BF16 CPUs may
                // round activations to bf16, by design).
                let d = max_abs_diff(&ours, &rounded);
                assert!(
                    d <= F32_TOL,
                    "{} bf16: prompt of {n}: differs from candle on bf16-rounded weights by {d:e}",
                    family.name()
                );
                worst_exact = worst_exact.max(d);
            }
        }
        eprintln!(
            "{} bf16 vs candle: {worst_exact:e} on bf16-rounded weights, {worst_loose:e} on f32 weights (logits up to {scale:.2})",
            family.name()
        );
    }
}

#[test]
fn checkpoints_are_well_conditioned() {
    // Guards the comparisons above: logits must spread over units (not hundredths) and Llama 3.1 scaling must
    // change some but not all frequencies at this size, or 1e-4 would prove little.
    for family in Family::ALL {
        let ck = checkpoint(family);
        let shard = ck.load_f32();
        let l = recompute(&shard, &TestRng::new(1).tokens(12));
        let (min, max) = l
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        assert!(
            max - min > 2.0 && max - min < 100.0,
            "{}: logit spread {} is outside [2, 100]",
            family.name(),
            max - min
        );
    }
    let ck = checkpoint(Family::Llama3);
    let cfg = computepool_engine::config::ModelConfig::from_dir(ck.dir()).expect("config");
    let mut plain = cfg.clone();
    plain.llama3_rope = None;
    let (scaled, unscaled) = (cfg.rope_inv_freq(), plain.rope_inv_freq());
    let kept = scaled.iter().zip(&unscaled).filter(|(a, b)| a == b).count();
    let divided = scaled
        .iter()
        .zip(&unscaled)
        .filter(|(a, b)| ((*a * 8.0) / *b - 1.0).abs() < 1e-6)
        .count();
    assert!(
        kept > 0 && divided > 0 && kept + divided < scaled.len(),
        "llama3 scaling bands: {kept} kept, {divided} divided of {}",
        scaled.len()
    );
}

#[test]
fn smollm2_matches_candle() {
    // The real default model, when `computepool model fetch` has put it in models/: 30 layers, GQA 9/3,
    // tied embeddings, vocabulary 49152.
    let Some(dir) = smollm2_dir() else {
        eprintln!("skipped: no SmolLM2 model (set COMPUTEPOOL_MODEL_DIR or run `make model`)");
        return;
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let options = computepool_engine::model::LoadOptions {
        dtype: DType::F32,
        range: None,
        progress: false,
        split_head: false,
    };
    let shard =
        Shard::load(&dir, &options, std::sync::Arc::new(CpuBackend::new(threads))).expect("engine loads SmolLM2");
    let text = std::fs::read_to_string(dir.join("config.json")).expect("config.json");
    let cfg: llama::LlamaConfig = serde_json::from_str(&text).expect("candle reads the config");
    let cfg = cfg.into_config(false);
    // SAFETY: the model file is not modified while the test runs.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], CDType::F32, &Device::Cpu) }
            .expect("candle maps the weights");
    let model = llama::Llama::load(vb, &cfg).expect("candle loads SmolLM2");
    let cache = llama::Cache::new(true, CDType::F32, &cfg, &Device::Cpu).expect("candle cache");
    let mut peer = Peer::Llama { model, cache, cfg };

    let tokenizer = computepool_engine::tokenizer::Tokenizer::from_dir(&dir).expect("tokenizer");
    let prompt = tokenizer
        .encode("The capital of France is Paris, and the capital of Italy is", true)
        .expect("encode");
    let mut chunks = vec![prompt];
    let mut rng = TestRng::new(0x5);
    chunks.extend((0..4).map(|_| vec![3 + (rng.next_u64() % 49000) as u32]));
    let mut engine_cache = shard.new_cache();
    let (mut offset, mut worst, mut scale) = (0, 0f32, 0f32);
    for (i, chunk) in chunks.iter().enumerate() {
        let ours = engine_step(&shard, chunk, &mut engine_cache);
        let theirs = peer.forward(chunk, offset);
        offset += chunk.len();
        let d = max_abs_diff(&ours, &theirs);
        scale = scale.max(max_abs(&theirs));
        assert!(
            d <= SMOLLM2_TOL,
            "smollm2: step {i}: logits differ from candle by {d:e} (scale {})",
            max_abs(&theirs)
        );
        worst = worst.max(d);
    }
    eprintln!(
        "smollm2 f32 vs candle: worst max abs diff {worst:e} over prefill + 4 cached steps (logits up to {scale:.1})"
    );
}

/// A loaded shard's matrices all live in packed regions (weight_mem: huge pages for decode), whatever
/// its dtype, its layer range, and whether its lm_head is tied (Qwen2) or its own (Llama 3).
#[test]
fn loaded_shards_hold_their_weights_in_packed_regions() {
    for family in [Family::Llama3, Family::Qwen2] {
        let ckpt = checkpoint(family);
        for dtype in [DType::F32, DType::Bf16] {
            for range in [None, Some((0, 1)), Some((1, LAYERS))] {
                let shard = ckpt.load(dtype, range, 1);
                assert!(shard.weights_packed(), "{} {dtype:?} {range:?}: a matrix was left on the heap", family.name());
            }
        }
    }
}
