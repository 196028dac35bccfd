//! A GGUF file as a shard's weight source, without an import: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K tensors stay in their
//! blocks (the CPU backend multiplies them as they are), every other type is dequantized to the shard's
//! dtype. Names, shapes and the Q/K row order are mapped to HF's exactly as the importer maps them, so a
//! natively loaded shard is the imported model with its weights kept quantized.

use std::collections::HashMap;
use std::path::Path;

use half::bf16;

use super::dequant::dequantize;
use super::import::{LlamaParams, PlannedTensor, RowOrder, hf_config, plan, unpermute_row_bytes};
use super::reader::GgufFile;
use super::tokenizer::GgufVocab;
use crate::config::{HfConfig, ModelConfig};
use crate::error::{EngineError, Result};
use crate::tensor::{DType, QuantKind, Weight, WeightData};
use crate::weights::WeightSource;

/// An open GGUF file with its tensors mapped to HF names.
pub struct GgufWeights {
    file: GgufFile,
    tensors: HashMap<String, PlannedTensor>,
    config: ModelConfig,
}

impl std::fmt::Debug for GgufWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufWeights").field("path", &self.file.path()).finish_non_exhaustive()
    }
}

impl GgufWeights {
    /// Opens and validates a llama- or qwen2-architecture GGUF: its hyper-parameters, every tensor's dims
    /// and type.
    pub fn open(path: &Path) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let params = LlamaParams::from_gguf(&file)?;
        let vocab = GgufVocab::from_gguf(&file)?;
        let tied = file.tensor("output.weight").is_none();
        let json = hf_config(&params, tied, DType::Bf16, vocab.special_ids());
        let hf: HfConfig = serde_json::from_value(json).map_err(|e| file.error(format!("derived config: {e}")))?;
        let config = ModelConfig::from_hf(&hf)?;
        let tensors = plan(&file, &params)?.into_iter().map(|t| (t.hf_name.clone(), t)).collect();
        Ok(Self { file, tensors, config })
    }

    /// The model's runtime configuration, as the importer would write it.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    fn planned(&self, name: &str) -> Result<&PlannedTensor> {
        self.tensors.get(name).ok_or_else(|| EngineError::MissingTensor {
            name: name.to_string(),
            path: self.file.path().to_path_buf(),
        })
    }

    fn values(&self, t: &PlannedTensor) -> Result<Vec<f32>> {
        let info = self.file.tensor(&t.gguf_name).expect("planned tensors exist in the file");
        let raw = self.file.tensor_data(info)?;
        let values = dequantize(info.ggml_type, raw, info.n_elements)?;
        Ok(match t.rows {
            RowOrder::AsIs => values,
            RowOrder::UnpermuteHeads(n) => unpermute_row_bytes(&values, *t.hf_shape.last().unwrap_or(&1), n),
        })
    }
}

impl WeightSource for GgufWeights {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn matrix(&self, name: &str, expect: [usize; 2], dtype: DType) -> Result<Weight> {
        let t = self.planned(name)?;
        if t.hf_shape != expect {
            return Err(EngineError::Tensor {
                name: name.into(),
                message: format!("shape {:?}, but the config implies {expect:?}", t.hf_shape),
            });
        }
        let info = self.file.tensor(&t.gguf_name).expect("planned tensors exist in the file");
        let [rows, cols] = expect;
        if let Some(kind) = QuantKind::from_ggml(info.ggml_type)
            && cols % kind.block_values() == 0
        {
            let raw = self.file.tensor_data(info)?;
            let row_bytes = kind.row_bytes(cols);
            if raw.len() != rows * row_bytes {
                return Err(EngineError::Tensor { name: name.into(), message: "block data does not match its shape".into() });
            }
            let blocks = match t.rows {
                RowOrder::AsIs => raw.to_vec(),
                RowOrder::UnpermuteHeads(n) => unpermute_row_bytes(raw, row_bytes, n),
            };
            return Ok(Weight { rows, cols, data: WeightData::Quant { kind, blocks: blocks.into() } });
        }
        let values = self.values(t)?;
        let data = match dtype {
            DType::F32 => WeightData::F32(values.into()),
            DType::Bf16 => WeightData::Bf16(values.into_iter().map(bf16::from_f32).collect()),
        };
        Ok(Weight { rows, cols, data })
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.planned(name)?;
        if t.hf_shape != [len] {
            return Err(EngineError::Tensor {
                name: name.into(),
                message: format!("shape {:?}, but the config implies [{len}]", t.hf_shape),
            });
        }
        self.values(t)
    }
}
