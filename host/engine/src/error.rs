//! The engine's one error type: each variant carries what a user needs to fix the problem.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model directory {path}: {message}")]
    ModelDir { path: PathBuf, message: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot map {bytes} bytes of host memory for weights: {source}")]
    HostMemory {
        bytes: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config.json in {path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "unsupported architecture {0:?}: ComputePool runs Llama-family decoders \
         (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
    )]
    UnsupportedArchitecture(String),
    #[error("unknown dtype {0:?}: expected f32 or bf16")]
    UnknownDType(String),
    #[error("safetensors file {path}: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("tensor {name}: {message}")]
    Tensor { name: String, message: String },
    #[error("missing tensor {name} (looked in {path})")]
    MissingTensor { name: String, path: PathBuf },
    #[error("GGUF file {path}: {message}")]
    Gguf { path: PathBuf, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("prompt of {prompt_tokens} tokens plus {max_new_tokens} new ones exceeds the context window of {context} tokens")]
    ContextOverflow { prompt_tokens: usize, max_new_tokens: usize, context: usize },
    #[error("empty prompt: at least one token is needed")]
    EmptyPrompt,
    #[error("invalid sampling parameters: {0}")]
    Sampling(String),
    #[error("shard {range} does not fit a model of {layers} layers")]
    InvalidRange { range: String, layers: usize },
    #[error("{0}")]
    Invalid(String),
    /// A CUDA library (driver, NVRTC, cuBLAS) or a device is missing: the CUDA backend cannot start.
    #[error("CUDA not available: {0}")]
    CudaUnavailable(String),
    /// A CUDA call failed (driver, NVRTC compile, cuBLAS).
    #[error("CUDA: {0}")]
    Cuda(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io { path: path.into(), source }
    }
}
