//! Bad input gets a clear, typed error and no panic: missing or truncated weights, an unsupported
//! architecture, a wrong tensor shape, an unknown dtype, a corrupt GGUF.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::model::{LoadOptions, Shard};
use computepool_engine::{DType, EngineError};
use safetensors::tensor::TensorView;

const CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"hidden_size":8,"intermediate_size":16,
  "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"vocab_size":12,
  "max_position_embeddings":32,"tie_word_embeddings":true}"#;

/// A valid one-layer checkpoint (all weights 0.01), `bad_shape` names a tensor written with a wrong shape.
fn write_checkpoint(dir: &Path, config: &str, bad_shape: Option<&str>) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("model.embed_tokens.weight", vec![12, 8]),
        ("model.layers.0.input_layernorm.weight", vec![8]),
        ("model.layers.0.self_attn.q_proj.weight", vec![8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.v_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.o_proj.weight", vec![8, 8]),
        ("model.layers.0.post_attention_layernorm.weight", vec![8]),
        ("model.layers.0.mlp.gate_proj.weight", vec![16, 8]),
        ("model.layers.0.mlp.up_proj.weight", vec![16, 8]),
        ("model.layers.0.mlp.down_proj.weight", vec![8, 16]),
        ("model.norm.weight", vec![8]),
    ];
    let shapes: Vec<(&str, Vec<usize>)> = shapes
        .into_iter()
        .map(|(n, s)| if Some(n) == bad_shape { (n, vec![s[0] + 1, *s.get(1).unwrap_or(&1)]) } else { (n, s) })
        .collect();
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = shapes
        .iter()
        .map(|(n, s)| (n.to_string(), 0.01f32.to_le_bytes().repeat(s.iter().product()), s.clone()))
        .collect();
    let views: HashMap<String, TensorView<'_>> = bytes
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn load(dir: &Path) -> Result<Shard, EngineError> {
    Shard::load(dir, &LoadOptions { dtype: DType::F32, range: None, progress: false, split_head: false }, Arc::new(CpuBackend::new(1)))
}

#[test]
fn a_valid_checkpoint_loads() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), CONFIG, None);
    let shard = load(dir.path()).unwrap();
    let mut cache = shard.new_cache();
    shard.forward(computepool_engine::model::StepInput::Tokens(&[1, 2, 3]), &mut cache).unwrap();
}

#[test]
fn missing_weights_are_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), CONFIG).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, EngineError::ModelDir { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn truncated_safetensors_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), CONFIG, None);
    let path = dir.path().join("model.safetensors");
    let full = std::fs::read(&path).unwrap();
    for cut in [0, 4, 8, 50, full.len() / 2, full.len() - 1] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, EngineError::Safetensors { .. }), "cut at {cut}: {err}");
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &CONFIG.replace("LlamaForCausalLM", "GPTNeoXForCausalLM"), None);
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, EngineError::UnsupportedArchitecture(ref a) if a == "GPTNeoXForCausalLM"), "{err}");
}

#[test]
fn malformed_config_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), "{\"hidden_size\": \"big\"}", None);
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, EngineError::Config { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn wrong_tensor_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), CONFIG, Some("model.layers.0.mlp.up_proj.weight"));
    let err = load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("model.layers.0.mlp.up_proj.weight"), "{err}");
}

#[test]
fn unknown_dtype_is_refused() {
    let err = "fp8".parse::<DType>().unwrap_err();
    assert!(matches!(err, EngineError::UnknownDType(_)), "{err}");
    assert!(err.to_string().contains("f32 or bf16"), "{err}");
}

#[test]
fn out_of_vocabulary_tokens_and_context_overflow_are_refused_without_touching_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), CONFIG, None);
    let shard = load(dir.path()).unwrap();
    let mut cache = shard.new_cache();
    let err = shard.forward(computepool_engine::model::StepInput::Tokens(&[1, 99]), &mut cache).unwrap_err();
    assert!(err.to_string().contains("99"), "{err}");
    assert_eq!(cache.len(), 0);
    let err = shard.forward(computepool_engine::model::StepInput::Tokens(&[1; 33]), &mut cache).unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
    assert_eq!(cache.len(), 0);
}

#[test]
fn corrupt_gguf_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    for bytes in [&b""[..], b"GGUF", b"GGUF\x03\x00\x00\x00\xff\xff\xff\xff\xff\xff\xff\xff", b"not a gguf file at all"] {
        std::fs::write(&path, bytes).unwrap();
        let err = computepool_engine::gguf::GgufFile::open(&path).unwrap_err();
        assert!(matches!(err, EngineError::Gguf { .. }), "{err}");
    }
}
