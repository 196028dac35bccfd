//! Where a model comes from: a Hugging Face layout directory (safetensors, tokenizer files), or a GGUF
//! file read natively (quantized weights kept quantized, tokenizer and chat template from its metadata).
//! Every command that takes `--model` accepts either.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::cpu::CpuBackend;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::gguf::{GgufVocab, GgufWeights};
use crate::model::{LoadOptions, Shard};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    HfDir(PathBuf),
    Gguf(PathBuf),
}

impl ModelSource {
    /// A directory is an HF layout model; a file must be a GGUF (checked by its magic bytes).
    pub fn from_path(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Ok(ModelSource::HfDir(path.to_path_buf()));
        }
        let mut magic = [0u8; 4];
        let is_gguf = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .map(|_| &magic == b"GGUF");
        match is_gguf {
            Ok(true) => Ok(ModelSource::Gguf(path.to_path_buf())),
            Ok(false) => Err(EngineError::ModelDir {
                path: path.to_path_buf(),
                message: "neither a model directory nor a GGUF file".into(),
            }),
            Err(e) => Err(EngineError::io(path, e)),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelSource::HfDir(p) | ModelSource::Gguf(p) => p,
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::HfDir(dir) => ModelConfig::from_dir(dir),
            ModelSource::Gguf(path) => Ok(GgufWeights::open(path)?.config().clone()),
        }
    }

    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match self {
            ModelSource::HfDir(dir) => Tokenizer::from_dir(dir),
            ModelSource::Gguf(path) => {
                let file = crate::gguf::GgufFile::open(path)?;
                let params = crate::gguf::LlamaParams::from_gguf(&file)?;
                let vocab = GgufVocab::from_gguf(&file)?;
                Tokenizer::from_parts(
                    &vocab.tokenizer_json()?,
                    Some(vocab.tokenizer_config(Some(params.context_length as u64))),
                    Some(crate::gguf::import::generation_config(vocab.special_ids())),
                )
            }
        }
    }

    /// Loads a layer range on the CPU backend (GGUF: Q4_0/Q4_1/Q5_0/Q8_0/Q4_K/Q6_K weights stay quantized).
    pub fn load_shard(&self, options: &LoadOptions, backend: Arc<CpuBackend>) -> Result<Shard> {
        match self {
            ModelSource::HfDir(dir) => Shard::load(dir, options, backend),
            ModelSource::Gguf(path) => Shard::load_gguf(path, options, backend),
        }
    }
}
