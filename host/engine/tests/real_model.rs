//! The engine on the real default model (SmolLM2-135M-Instruct, imported by `computepool model fetch`).
//!
//! The model directory comes from `COMPUTEPOOL_MODEL_DIR`, else `models/smollm2-135m-instruct` at the
//! workspace root. Without it the tests skip with a message — unless `COMPUTEPOOL_REQUIRE_MODEL=1` (as
//! `make test` sets), where a missing model is a failure.

use std::path::PathBuf;
use std::sync::Arc;

use computepool_engine::backend::cpu::CpuBackend;
use computepool_engine::generate::{generate, generate_batch, FinishReason, GenerateRequest};
use computepool_engine::model::{LoadOptions, Shard};
use computepool_engine::sampling::SamplingParams;
use computepool_engine::tokenizer::{ChatMessage, Tokenizer};
use computepool_engine::{DType, EngineError};

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("COMPUTEPOOL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m-instruct"));
    if dir.join("model.safetensors").exists() {
        return Some(dir);
    }
    if std::env::var("COMPUTEPOOL_REQUIRE_MODEL").is_ok_and(|v| v == "1") {
        panic!("COMPUTEPOOL_REQUIRE_MODEL=1 but {} has no model: run `make model`", dir.display());
    }
    eprintln!("skipping: no model at {} (run `make model`)", dir.display());
    None
}

fn load(dir: &std::path::Path, dtype: DType) -> (Shard, Tokenizer) {
    let backend = Arc::new(CpuBackend::new(2));
    let shard = Shard::load(dir, &LoadOptions { dtype, range: None, progress: false, split_head: false }, backend).expect("model loads");
    (shard, Tokenizer::from_dir(dir).expect("tokenizer loads"))
}

#[test]
fn capital_of_france_is_paris_in_both_dtypes() {
    let Some(dir) = model_dir() else { return };
    for dtype in [DType::F32, DType::Bf16] {
        let (shard, tok) = load(&dir, dtype);
        let prompt = tok.encode("The capital of France is", true).unwrap();
        let g = generate(&shard, &tok, &GenerateRequest::new(prompt, 8), |_| {}).unwrap();
        assert!(g.text.starts_with(" Paris"), "{dtype}: greedy continuation was {:?}", g.text);
    }
}

#[test]
fn chat_prompt_gets_a_coherent_answer() {
    let Some(dir) = model_dir() else { return };
    let (shard, tok) = load(&dir, DType::Bf16);
    let text = tok
        .apply_chat_template(&[ChatMessage::new("user", "What is the capital of France?")], true)
        .unwrap();
    assert!(text.starts_with("<|im_start|>"), "ChatML expected, got {text:?}");
    assert!(text.ends_with("<|im_start|>assistant\n"), "generation prompt missing: {text:?}");
    let prompt = tok.encode(&text, false).unwrap();
    let mut streamed = String::new();
    let g = generate(&shard, &tok, &GenerateRequest::new(prompt, 48), |piece| streamed.push_str(piece)).unwrap();
    assert_eq!(streamed, g.text, "streamed text must equal the final text");
    assert!(g.text.contains("Paris"), "answer: {:?}", g.text);
    assert_eq!(g.finish_reason, FinishReason::Stop, "the answer should end with <|im_end|>: {:?}", g.text);
    assert!(tok.eos_ids().contains(g.tokens.last().unwrap()));
}

#[test]
fn stop_strings_and_max_tokens_end_generation() {
    let Some(dir) = model_dir() else { return };
    let (shard, tok) = load(&dir, DType::Bf16);
    let prompt = tok.encode("The capital of France is", true).unwrap();
    let mut req = GenerateRequest::new(prompt.clone(), 3);
    let g = generate(&shard, &tok, &req, |_| {}).unwrap();
    assert_eq!((g.tokens.len(), g.finish_reason), (3, FinishReason::Length));
    req.max_new_tokens = 32;
    req.stop_strings = vec![" Paris".into()];
    let g = generate(&shard, &tok, &req, |_| {}).unwrap();
    assert_eq!((g.text.as_str(), g.finish_reason), ("", FinishReason::StopString));
}

#[test]
fn batch_of_eight_prompts_matches_each_alone() {
    let Some(dir) = model_dir() else { return };
    let (shard, tok) = load(&dir, DType::Bf16);
    let prompts = [
        "The capital of France is",
        "Once upon a time",
        "def fibonacci(n):",
        "The three primary colors are",
        "In 1969, astronauts",
        "Water boils at",
        "My favourite food is",
        "The quick brown fox",
    ];
    let reqs: Vec<GenerateRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = GenerateRequest::new(tok.encode(p, true).unwrap(), 24);
            // Half greedy, half seeded sampling.
            if i % 2 == 1 {
                r.params = SamplingParams { temperature: 0.8, top_k: 40, top_p: 0.95, seed: i as u64, ..Default::default() };
            }
            r
        })
        .collect();
    let together = generate_batch(&shard, &tok, &reqs, |_, _| {}).unwrap();
    for (req, batched) in reqs.iter().zip(&together) {
        let alone = generate(&shard, &tok, req, |_| {}).unwrap();
        assert_eq!(alone.tokens, batched.tokens, "prompt {:?}", tok.decode(&req.prompt, true));
    }
}

#[test]
fn prompt_longer_than_the_context_is_refused() {
    let Some(dir) = model_dir() else { return };
    let (shard, tok) = load(&dir, DType::Bf16);
    let context = shard.config().max_position_embeddings;
    let req = GenerateRequest::new(vec![1; context + 1], 1);
    let err = generate(&shard, &tok, &req, |_| {}).unwrap_err();
    assert!(matches!(err, EngineError::ContextOverflow { .. }), "{err}");
    assert!(err.to_string().contains("context window"), "{err}");
}
