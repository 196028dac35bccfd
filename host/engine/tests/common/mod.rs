//! Seeded random tiny checkpoints of each supported family, written to a temporary directory in Hugging
//! Face layout (config.json, model.safetensors, tokenizer.json, generation_config.json), and the helpers
//! the integration tests share.
//!
//! The checkpoints are small enough to run in milliseconds yet keep every feature that distinguishes the
//! families: grouped-query attention, Llama 3.1 RoPE scaling (with `original_max_position_embeddings`
//! small enough that all three of its frequency bands occur at head_dim 16), q/k/v biases, tied and
//! untied embeddings, an explicit `head_dim` that differs from `hidden / heads`, and a sliding window
//! shorter than the sequences the tests run.
//!
//! Weights are drawn from N(0, σ²) with σ = gain / √fan_in rather than a flat 0.02: at hidden size 64 a
//! 0.02 scale leaves attention almost uniform and logits within ±0.2, which would hide RoPE, masking and
//! softmax mistakes behind a 1e-4 tolerance. With these gains attention scores spread over a few units,
//! logits reach about ±12 (so 1e-4 is ~1e-5 relative), and norm weights stay near 1.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use computepool_engine::DType;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, Shard, StepInput, StepOutput};
use computepool_engine::shard::LayerRange;
use serde_json::json;

/// The model families the engine supports, each as one tiny checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 3.1 style: GQA (4 query heads, 2 KV heads), `llama3` RoPE scaling, untied lm_head.
    Llama3,
    /// Qwen2: q/k/v biases, tied embeddings, GQA, rope_theta 1e6.
    Qwen2,
    /// Mistral: one KV head (MQA), explicit head_dim 32 ≠ hidden/heads, sliding window 8, untied.
    Mistral,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Llama3, Family::Qwen2, Family::Mistral];

    pub fn name(self) -> &'static str {
        match self {
            Family::Llama3 => "llama3",
            Family::Qwen2 => "qwen2",
            Family::Mistral => "mistral",
        }
    }
}

pub const VOCAB: usize = 256;
pub const HIDDEN: usize = 64;
pub const LAYERS: usize = 3;
pub const FFN: usize = 128;
pub const MAX_POSITIONS: usize = 256;
/// Mistral's window: a position attends to itself and the 7 before it (HF: `p - j < window`).
pub const MISTRAL_WINDOW: usize = 8;
/// The id generation_config.json names as end of sequence.
pub const EOS: u32 = 2;

/// One tensor as the generator made it: HF name, shape, f32 values.
#[derive(Debug, Clone)]
pub struct TensorData {
    pub name: String,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A tiny checkpoint on disk. The directory is deleted when this is dropped.
pub struct Checkpoint {
    pub family: Family,
    pub config: serde_json::Value,
    pub tensors: Vec<TensorData>,
    dir: tempfile::TempDir,
}

impl Checkpoint {
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn safetensors_path(&self) -> PathBuf {
        self.dir.path().join("model.safetensors")
    }

    /// Loads the checkpoint (or a layer range of it) with the engine on a default backend.
    pub fn load(&self, dtype: DType, range: Option<(usize, usize)>, threads: usize) -> Shard {
        self.load_with(dtype, range, Arc::new(CpuBackend::new(threads)))
    }

    /// Loads the checkpoint (or a layer range of it) with the engine on `backend`.
    pub fn load_with(&self, dtype: DType, range: Option<(usize, usize)>, backend: Arc<CpuBackend>) -> Shard {
        let range = range.map(|(a, b)| LayerRange::new(a, b, LAYERS).expect("test ranges are valid"));
        Shard::load(
            self.dir(),
            &LoadOptions {
                dtype,
                range,
                progress: false,
                split_head: false,
            },
            backend,
        )
        .unwrap_or_else(|e| panic!("{}: engine failed to load the tiny checkpoint: {e}", self.family.name()))
    }

    /// bf16 weights on a backend whose every product is exact (`with_bf16_dot_products(false)`): bf16
    /// storage is then the only difference from f32, for any batch size.
    pub fn load_bf16_exact(&self) -> Shard {
        self.load_with(
            DType::Bf16,
            None,
            Arc::new(CpuBackend::new(2).with_bf16_dot_products(false)),
        )
    }

    /// The whole model in f32 on a two-thread backend.
    pub fn load_f32(&self) -> Shard {
        self.load(DType::F32, None, 2)
    }
}

/// SplitMix64 with Box–Muller normals: reproducible on every platform, no dependency.
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` token ids in `[3, VOCAB)`: never the unknown, BOS or EOS ids.
    pub fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| 3 + (self.next_u64() % (VOCAB as u64 - 3)) as u32)
            .collect()
    }
}

struct Dims {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn dims(family: Family) -> Dims {
    match family {
        Family::Llama3 | Family::Qwen2 => Dims {
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
        },
        Family::Mistral => Dims {
            heads: 4,
            kv_heads: 1,
            head_dim: 32,
        },
    }
}

fn config_json(family: Family) -> serde_json::Value {
    let d = dims(family);
    let common = json!({
        "hidden_size": HIDDEN,
        "intermediate_size": FFN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": d.heads,
        "num_key_value_heads": d.kv_heads,
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POSITIONS,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": EOS,
        "torch_dtype": "float32",
    });
    let specific = match family {
        Family::Llama3 => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            // original_max_position_embeddings 64 puts the 8 frequencies of head_dim 16 in all three of
            // Llama 3.1's bands: wavelength < 16 (kept), 16..64 (smoothed), > 64 (divided by 8).
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64
            },
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
        }),
        Family::Qwen2 => json!({
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": true,
            "use_sliding_window": false,
            "sliding_window": MAX_POSITIONS,
            "max_window_layers": LAYERS,
        }),
        Family::Mistral => json!({
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "head_dim": d.head_dim,
            "sliding_window": MISTRAL_WINDOW,
            "tie_word_embeddings": false,
        }),
    };
    let mut merged = common;
    let obj = merged.as_object_mut().expect("object literal");
    for (k, v) in specific.as_object().expect("object literal") {
        obj.insert(k.clone(), v.clone());
    }
    merged
}

fn family_seed(family: Family) -> u64 {
    match family {
        Family::Llama3 => 0x11A3A,
        Family::Qwen2 => 0x0E2,
        Family::Mistral => 0x3157,
    }
}

fn generate_tensors(family: Family) -> Vec<TensorData> {
    let d = dims(family);
    let mut rng = TestRng::new(family_seed(family));
    let mut out = Vec::new();
    let mut matrix = |rng: &mut TestRng, name: String, rows: usize, cols: usize, gain: f64| {
        let sigma = gain / (cols as f64).sqrt();
        let values = (0..rows * cols).map(|_| (rng.normal() * sigma) as f32).collect();
        out.push(TensorData {
            name,
            shape: vec![rows, cols],
            values,
        });
    };
    let (q, kv) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    // Embedding rows of norm ~1: the first RMSNorm rescales them anyway.
    matrix(&mut rng, "model.embed_tokens.weight".into(), VOCAB, HIDDEN, 1.0);
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        matrix(&mut rng, format!("{p}.self_attn.q_proj.weight"), q, HIDDEN, 1.6);
        matrix(&mut rng, format!("{p}.self_attn.k_proj.weight"), kv, HIDDEN, 1.6);
        matrix(&mut rng, format!("{p}.self_attn.v_proj.weight"), kv, HIDDEN, 1.0);
        matrix(&mut rng, format!("{p}.self_attn.o_proj.weight"), HIDDEN, q, 0.5);
        matrix(&mut rng, format!("{p}.mlp.gate_proj.weight"), FFN, HIDDEN, 1.0);
        matrix(&mut rng, format!("{p}.mlp.up_proj.weight"), FFN, HIDDEN, 1.0);
        matrix(&mut rng, format!("{p}.mlp.down_proj.weight"), HIDDEN, FFN, 0.5);
    }
    if family != Family::Qwen2 {
        // Untied; gain 4 spreads the logits over a few units.
        matrix(&mut rng, "lm_head.weight".into(), VOCAB, HIDDEN, 4.0);
    }
    let mut vector = |rng: &mut TestRng, name: String, len: usize, mean: f64, sigma: f64| {
        let values = (0..len).map(|_| (mean + rng.normal() * sigma) as f32).collect();
        out.push(TensorData {
            name,
            shape: vec![len],
            values,
        });
    };
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        vector(&mut rng, format!("{p}.input_layernorm.weight"), HIDDEN, 1.0, 0.1);
        vector(
            &mut rng,
            format!("{p}.post_attention_layernorm.weight"),
            HIDDEN,
            1.0,
            0.1,
        );
        if family == Family::Qwen2 {
            vector(&mut rng, format!("{p}.self_attn.q_proj.bias"), q, 0.0, 0.3);
            vector(&mut rng, format!("{p}.self_attn.k_proj.bias"), kv, 0.0, 0.3);
            vector(&mut rng, format!("{p}.self_attn.v_proj.bias"), kv, 0.0, 0.3);
        }
    }
    // Tied Qwen2 reuses the unit-norm embedding as lm_head: a larger final norm gain spreads its logits.
    let final_gain = if family == Family::Qwen2 { 4.0 } else { 1.0 };
    vector(
        &mut rng,
        "model.norm.weight".into(),
        HIDDEN,
        final_gain,
        0.1 * final_gain,
    );
    out
}

/// A word-level tokenizer over the 256 ids: `<unk>`, `<s>`, `</s>`, then `w3` … `w255`.
fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for id in 0..VOCAB {
        let word = match id {
            0 => "<unk>".to_string(),
            1 => "<s>".to_string(),
            2 => "</s>".to_string(),
            _ => format!("w{id}"),
        };
        vocab.insert(word, json!(id));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
}

/// The tensors as the safetensors crate serializes them (f32, little-endian).
pub fn safetensors_bytes(tensors: &[TensorData]) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.shape.clone(),
                t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).expect("consistent view"),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).expect("serialize tiny checkpoint")
}

/// Writes the seeded tiny checkpoint of `family` to a fresh temporary directory.
pub fn checkpoint(family: Family) -> Checkpoint {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = config_json(family);
    let tensors = generate_tensors(family);
    let write = |name: &str, bytes: &[u8]| std::fs::write(dir.path().join(name), bytes).expect("write checkpoint file");
    write(
        "config.json",
        serde_json::to_string_pretty(&config).expect("json").as_bytes(),
    );
    write("model.safetensors", &safetensors_bytes(&tensors));
    write(
        "tokenizer.json",
        serde_json::to_string(&tokenizer_json()).expect("json").as_bytes(),
    );
    write(
        "generation_config.json",
        json!({"bos_token_id": 1, "eos_token_id": EOS}).to_string().as_bytes(),
    );
    Checkpoint {
        family,
        config,
        tensors,
        dir,
    }
}

/// Largest absolute difference of two equal-length vectors (NaN anywhere counts as infinite).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            if d.is_nan() { f32::INFINITY } else { d }
        })
        .fold(0.0, f32::max)
}

/// Largest absolute value (for reporting logit scale).
pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

pub fn logits(out: StepOutput) -> Vec<f32> {
    match out {
        StepOutput::Logits(l) => l,
        StepOutput::Hidden(_) => panic!("expected logits from an exit shard, got hidden states"),
        StepOutput::Normed(_) => panic!("expected logits from an exit shard, got a split head's normed state"),
    }
}

pub fn hidden(out: StepOutput) -> Vec<f32> {
    match out {
        StepOutput::Hidden(h) => h,
        StepOutput::Logits(_) => panic!("expected hidden states from a non-exit shard, got logits"),
        StepOutput::Normed(_) => panic!("expected hidden states from a non-exit shard, got a normed state"),
    }
}

/// Last-position logits of `tokens` run from an empty cache.
pub fn recompute(shard: &Shard, tokens: &[u32]) -> Vec<f32> {
    let mut cache = shard.new_cache();
    logits(
        shard
            .forward(StepInput::Tokens(tokens), &mut cache)
            .expect("full recompute"),
    )
}

/// Bitwise equality of two f32 vectors (distinguishes -0.0 and NaN payloads, as a hash of tokens would).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The real SmolLM2 model that `computepool model fetch` writes: `COMPUTEPOOL_MODEL_DIR`, else
/// `models/smollm2-135m-instruct` at the workspace root (the convention of tests/real_model.rs). `None`
/// (the caller skips with a message) when it is not there, unless `COMPUTEPOOL_REQUIRE_MODEL=1`, where a
/// missing model is a failure.
pub fn smollm2_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("COMPUTEPOOL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m-instruct"));
    if ["config.json", "tokenizer.json", "model.safetensors"]
        .iter()
        .all(|f| dir.join(f).exists())
    {
        return Some(dir);
    }
    if std::env::var("COMPUTEPOOL_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!(
            "COMPUTEPOOL_REQUIRE_MODEL=1 but {} has no model: run `make model`",
            dir.display()
        );
    }
    None
}

/// The SmolLM2 Q4_1 GGUF that `computepool model fetch` caches: `COMPUTEPOOL_GGUF`, else
/// `$COMPUTEPOOL_CACHE/gguf/SmolLM2-135M-Instruct.Q4_1.gguf` (default cache `~/.cache/computepool`).
/// `None` (the caller skips) when it is missing, unless `COMPUTEPOOL_REQUIRE_MODEL=1`.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("COMPUTEPOOL_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("COMPUTEPOOL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/computepool"));
        cache.join("gguf/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("COMPUTEPOOL_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!("COMPUTEPOOL_REQUIRE_MODEL=1 but {} is missing: run `make model`", path.display());
    }
    None
}

/// The SmolLM2 Q4_K_M GGUF that scripts/quantize-gguf.sh makes with llama.cpp's own llama-quantize from
/// the F32 GGUF: `COMPUTEPOOL_Q4_K_M_GGUF`, else `$COMPUTEPOOL_CACHE/gguf/SmolLM2-135M-Instruct.Q4_K_M.gguf`.
///
/// Why a file made by llama-quantize and not one quantized in the test: the files users run come from
/// ggml's quantizer (its scale/min search), and what matters is reading those; a quantizer of our own
/// would check our reading of our own writing. The llama.cpp build is not part of `make test`, so callers
/// skip (with this message) when the file is missing, unless `COMPUTEPOOL_REQUIRE_Q4_K_M=1`.
pub fn smollm2_q4_k_m_gguf() -> Option<PathBuf> {
    let path = std::env::var_os("COMPUTEPOOL_Q4_K_M_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        let cache = std::env::var_os("COMPUTEPOOL_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/computepool"));
        cache.join("gguf/SmolLM2-135M-Instruct.Q4_K_M.gguf")
    });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("COMPUTEPOOL_REQUIRE_Q4_K_M").is_ok_and(|v| v == "1") {
        panic!("COMPUTEPOOL_REQUIRE_Q4_K_M=1 but {} is missing: run scripts/quantize-gguf.sh", path.display());
    }
    eprintln!("skipping: no {} (make it with scripts/quantize-gguf.sh)", path.display());
    None
}

/// Relative L2 error of `got` against `want`: ‖got − want‖ / ‖want‖, in f64.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "compared vectors differ in length");
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += ((g - w) as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}
