//! Qwen2-family GGUFs (issue 7): the tiny seeded Qwen2 checkpoint of tests/common (q/k/v biases, GQA,
//! rope_theta 1e6, tied embeddings) written as a GGUF the way llama.cpp's converter writes Qwen2 files —
//! `qwen2.*` metadata, `blk.{i}.attn_{q,k,v}.bias`, Q/K rows in HF order (llama.cpp runs Qwen2 with
//! NeoX-style RoPE, so its converter does not interleave them), GGUF dims fastest-first — and loaded
//! natively, against the same weights as an HF-layout directory through the safetensors path.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{Family, HIDDEN, LAYERS, MAX_POSITIONS, TensorData, VOCAB};
use computepool_engine::DType;
use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::gguf::GgmlType;
use computepool_engine::gguf::writer::GgufWriter;
use computepool_engine::gguf::writer::tests_support::byte_level_alphabet;
use computepool_engine::model::{LoadOptions, Shard, StepInput};
use half::f16;

/// The HF → GGUF tensor name map of llama.cpp's Qwen2 converter.
fn gguf_name(hf: &str) -> String {
    if hf == "model.embed_tokens.weight" {
        return "token_embd.weight".into();
    }
    if hf == "model.norm.weight" {
        return "output_norm.weight".into();
    }
    if hf == "lm_head.weight" {
        return "output.weight".into();
    }
    let rest = hf.strip_prefix("model.layers.").expect("a layer tensor");
    let (layer, rest) = rest.split_once('.').expect("layer index then name");
    let (module, kind) = rest.rsplit_once('.').expect("name then weight/bias");
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        other => panic!("unmapped module {other}"),
    };
    format!("blk.{layer}.{short}.{kind}")
}

/// ggml's reference Q8_0 quantizer (`quantize_row_q8_0_ref`): `d = amax / 127`, values rounded.
fn q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for xs in values.chunks_exact(32) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(xs.iter().map(|v| ((v * id).round() as i8) as u8));
    }
    out
}

/// Writes `tensors` (HF names and shapes) as a Qwen2 GGUF; matrices are Q8_0 when `quantize` is set.
fn write_qwen2_gguf(path: &Path, tensors: &[TensorData], quantize: bool) {
    let d_heads = 4;
    let kv_heads = 2;
    let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into(), "<|im_end|>".into()];
    tokens.extend(byte_level_alphabet().into_iter().take(VOCAB - 3).map(|c| c.to_string()));
    let types: Vec<i32> = (0..VOCAB).map(|i| if i < 3 { 3 } else { 1 }).collect();
    let mut w = GgufWriter::new();
    w.add_string("general.architecture", "qwen2")
        .add_string("general.name", "tiny-qwen2")
        .add_u32("qwen2.block_count", LAYERS as u32)
        .add_u32("qwen2.context_length", MAX_POSITIONS as u32)
        .add_u32("qwen2.embedding_length", HIDDEN as u32)
        .add_u32("qwen2.feed_forward_length", common::FFN as u32)
        .add_u32("qwen2.attention.head_count", d_heads)
        .add_u32("qwen2.attention.head_count_kv", kv_heads)
        .add_f32("qwen2.rope.freq_base", 1_000_000.0)
        .add_f32("qwen2.attention.layer_norm_rms_epsilon", 1e-6)
        .add_string("tokenizer.ggml.model", "gpt2")
        .add_string("tokenizer.ggml.pre", "qwen2")
        .add_string_array("tokenizer.ggml.tokens", &tokens)
        .add_i32_array("tokenizer.ggml.token_type", &types)
        .add_string_array::<&str>("tokenizer.ggml.merges", &[])
        .add_u32("tokenizer.ggml.bos_token_id", 1)
        .add_u32("tokenizer.ggml.eos_token_id", common::EOS)
        .add_bool("tokenizer.ggml.add_bos_token", false);
    for t in tensors {
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        let name = gguf_name(&t.name);
        if quantize && t.shape.len() == 2 {
            w.add_tensor(&name, &dims, GgmlType::Q8_0, q8_0(&t.values));
        } else {
            w.add_f32_tensor(&name, &dims, &t.values);
        }
    }
    std::fs::write(path, w.to_bytes()).unwrap();
}

/// The checkpoint's weights, untied: an `lm_head.weight` of its own, written to `dir` as an HF directory.
fn untied_hf_dir(dir: &Path, ckpt: &common::Checkpoint) -> Vec<TensorData> {
    let mut tensors = ckpt.tensors.clone();
    let embed = tensors.iter().find(|t| t.name == "model.embed_tokens.weight").unwrap();
    // A head that differs from the embedding, so a mix-up of the two shows in the logits.
    let head: Vec<f32> = embed.values.iter().enumerate().map(|(i, v)| v * 1.5 + ((i % 7) as f32 - 3.0) * 0.01).collect();
    tensors.push(TensorData { name: "lm_head.weight".into(), shape: vec![VOCAB, HIDDEN], values: head });
    let mut config = ckpt.config.clone();
    config["tie_word_embeddings"] = serde_json::json!(false);
    std::fs::write(dir.join("config.json"), serde_json::to_string(&config).unwrap()).unwrap();
    for f in ["tokenizer.json", "generation_config.json"] {
        std::fs::copy(ckpt.dir().join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("model.safetensors"), common::safetensors_bytes(&tensors)).unwrap();
    tensors
}

/// Logits of the prompt, then of 6 more steps fed the reference's greedy tokens.
fn run(shard: &Shard, prompt: &[u32], follow: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = shard.new_cache();
    let mut out = vec![common::logits(shard.forward(StepInput::Tokens(prompt), &mut cache).unwrap())];
    for &t in follow {
        out.push(common::logits(shard.forward(StepInput::Tokens(&[t]), &mut cache).unwrap()));
    }
    out
}

fn greedy_follow(shard: &Shard, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache = shard.new_cache();
    let mut logits = common::logits(shard.forward(StepInput::Tokens(prompt), &mut cache).unwrap());
    let mut out = Vec::new();
    for _ in 0..steps {
        let t = computepool_engine::sampling::argmax(&logits);
        out.push(t);
        logits = common::logits(shard.forward(StepInput::Tokens(&[t]), &mut cache).unwrap());
    }
    out
}

#[test]
fn qwen2_gguf_equals_its_hf_directory() {
    let ckpt = common::checkpoint(Family::Qwen2);
    let untied_dir = tempfile::tempdir().unwrap();
    let untied = untied_hf_dir(untied_dir.path(), &ckpt);
    let backend = Arc::new(CpuBackend::new(2));
    let f32_opts = LoadOptions { dtype: DType::F32, ..Default::default() };
    let prompt = common::TestRng::new(7).tokens(11);
    for (label, hf_dir, tensors) in [("tied", ckpt.dir(), &ckpt.tensors), ("untied", untied_dir.path(), &untied)] {
        let gguf_dir = tempfile::tempdir().unwrap();
        let gguf = gguf_dir.path().join("tiny-qwen2.gguf");
        write_qwen2_gguf(&gguf, tensors, false);
        let hf = Shard::load(hf_dir, &f32_opts, backend.clone()).unwrap();
        let native = Shard::load_gguf(&gguf, &f32_opts, backend.clone()).unwrap();
        assert_eq!(native.config(), hf.config(), "{label}: the GGUF's derived config is the HF one");
        assert_eq!(native.config().tie_word_embeddings, label == "tied");
        let follow = greedy_follow(&hf, &prompt, 6);
        let (want, got) = (run(&hf, &prompt, &follow), run(&native, &prompt, &follow));
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            let diff = common::max_abs_diff(g, w);
            assert!(diff <= 1e-5, "{label} step {step}: logits differ by {diff:e}");
            assert!(common::max_abs(w) > 1.0, "{label}: logits too flat to tell anything apart");
        }

        // Q8_0 matrices: the weights rounded to 8 bits per 32 values, computed against 8-bit activations.
        // This tiny model's gains are set so that logits reach about ±12 (tests/common), which also
        // amplifies rounding: measured relative L2 error on the logits 2.8–6.6% over both variants and 7
        // steps; bound 10%, and the 6 greedy tokens agree.
        let q8_path = gguf_dir.path().join("tiny-qwen2.q8_0.gguf");
        write_qwen2_gguf(&q8_path, tensors, true);
        let quant = Shard::load_gguf(&q8_path, &LoadOptions::default(), backend.clone()).unwrap();
        assert!(quant.weight_bytes() * 3 < native.weight_bytes(), "{label}: Q8_0 matrices stay quantized");
        let got = run(&quant, &prompt, &follow);
        for (step, (g, w)) in got.iter().zip(&want).enumerate() {
            let e = common::rel_err(g, w);
            eprintln!("{label} q8_0 step {step}: logits relative error {e:.2e}");
            assert!(e < 1e-1, "{label} q8_0 step {step}: logits relative error {e:.2e}");
        }
        assert_eq!(greedy_follow(&quant, &prompt, 6), follow, "{label}: Q8_0 greedy tokens");
    }
}
