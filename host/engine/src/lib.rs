//! ComputePool's engine: the math of a Llama-family decoder, one layer range at a time.
//!
//! It owns HF configs, safetensors weights (memory-mapped, held in bf16 or f32), the tokenizer and chat
//! template, the GGUF importer, the per-request KV cache, native sampling and the compute backends.
//! It never touches sockets, keys or payment state: the data plane and the orchestrator live in other
//! crates and see this one only through [`model::Shard`]'s inputs and outputs.

pub mod backend;
pub mod config;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod sampling;
pub mod shard;
pub mod tensor;
pub mod tokenizer;
pub mod weight_mem;
pub mod weights;

pub use error::{EngineError, Result};
pub use tensor::DType;
