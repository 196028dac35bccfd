//! A model's footprint from its config alone (`ModelConfig::layer_weight_bytes`, `vocab_matrix_bytes`,
//! `kv_bytes_per_position`), which plans use before anything is loaded, is exactly what loaded shards
//! hold: on every tiny family (GQA, MQA with an explicit head_dim, biases, tied and untied embeddings),
//! in f32 and bf16, for an entry, an exit and a whole model.

mod common;

use common::*;
use computepool_engine::DType;
use computepool_engine::backend::cpu::KEY_BLOCK;
use computepool_engine::model::StepInput;

#[test]
fn config_footprints_equal_what_loaded_shards_hold() {
    for family in Family::ALL {
        let ckpt = checkpoint(family);
        for dtype in [DType::F32, DType::Bf16] {
            let whole = ckpt.load(dtype, None, 1);
            let cfg = whole.config().clone();
            let (layers, per_layer, vocab) = (cfg.num_layers, cfg.layer_weight_bytes(dtype), cfg.vocab_matrix_bytes(dtype));
            let what = format!("{family:?} {}", dtype.name());
            assert!(layers >= 2, "{what}: the test splits the model in two");
            let split = layers / 2;
            let entry = ckpt.load(dtype, Some((0, split)), 1);
            let exit = ckpt.load(dtype, Some((split, layers)), 1);
            assert_eq!(entry.weight_bytes(), split * per_layer + vocab, "{what}: the entry holds its layers and the embedding");
            assert_eq!(exit.weight_bytes(), (layers - split) * per_layer + vocab, "{what}: the exit holds its layers and lm_head");
            // One shard of the whole model holds a tied embedding once, an untied one beside its lm_head.
            let heads = if cfg.tie_word_embeddings { 1 } else { 2 };
            assert_eq!(whole.weight_bytes(), layers * per_layer + heads * vocab, "{what}: the whole model");

            // A cache with one position holds one block of positions in every layer.
            let mut cache = entry.new_cache();
            entry.forward(StepInput::Tokens(&[1]), &mut cache).expect("one step");
            assert_eq!(cache.size_in_bytes(), split * KEY_BLOCK * cfg.kv_bytes_per_position(), "{what}: KV cache bytes");
        }
    }
}
