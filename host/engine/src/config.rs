//! Hugging Face `config.json` for the Llama family (Llama 2/3/3.1, Mistral, Qwen2/2.5), kept apart from
//! the runtime model: [`HfConfig`] is what the file says, [`ModelConfig`] is what the engine runs.

use std::path::Path;

use serde::Deserialize;

use crate::error::{EngineError, Result};
use crate::tensor::DType;

/// `config.json` as Hugging Face writes it. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for q/k/v/o biases; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub bos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

/// A token id field that HF writes either as one id or a list of ids.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `rope_scaling` from config.json. Only `llama3` (Llama 3.1+) changes the frequencies; `default` or
/// absent means plain RoPE.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_position_embeddings() -> usize {
    2048
}

/// Which member of the family a checkpoint is: decides tensor names and biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

/// The validated runtime configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub llama3_rope: Option<Llama3Rope>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_ids: Vec<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Llama 3.1's frequency-dependent RoPE rescaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

impl ModelConfig {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let hf: HfConfig = serde_json::from_str(&text)
            .map_err(|e| EngineError::Config { path: path.clone(), message: e.to_string() })?;
        Self::from_hf(&hf).map_err(|e| match e {
            EngineError::Invalid(message) => EngineError::Config { path, message },
            other => other,
        })
    }

    pub fn from_hf(hf: &HfConfig) -> Result<Self> {
        let arch_name = hf
            .architectures
            .first()
            .cloned()
            .or_else(|| hf.model_type.clone())
            .unwrap_or_default();
        let architecture = match arch_name.as_str() {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            other => return Err(EngineError::UnsupportedArchitecture(other.to_string())),
        };
        if let Some(act) = &hf.hidden_act
            && act != "silu"
        {
            return Err(EngineError::Invalid(format!("hidden_act {act:?} is not supported (only silu)")));
        }
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(hf.num_attention_heads);
        let invalid = |m: String| Err(EngineError::Invalid(m));
        if hf.hidden_size == 0 || hf.num_hidden_layers == 0 || hf.num_attention_heads == 0 || hf.vocab_size == 0 {
            return invalid("hidden_size, num_hidden_layers, num_attention_heads and vocab_size must be positive".into());
        }
        if num_kv_heads == 0 || hf.num_attention_heads % num_kv_heads != 0 {
            return invalid(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({num_kv_heads})",
                hf.num_attention_heads
            ));
        }
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return invalid(format!("head_dim {head_dim} must be positive and even for RoPE"));
        }
        let llama3_rope = match &hf.rope_scaling {
            None => None,
            Some(s) if s.rope_type == "default" => None,
            Some(s) if s.rope_type == "llama3" => Some(Llama3Rope {
                factor: s.factor.unwrap_or(8.0),
                low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
            }),
            Some(s) => return invalid(format!("rope_scaling type {:?} is not supported (default or llama3)", s.rope_type)),
        };
        let sliding_window = match architecture {
            Architecture::Mistral => hf.sliding_window,
            Architecture::Qwen2 if hf.use_sliding_window == Some(true) => hf.sliding_window,
            _ => None,
        };
        let qwen = architecture == Architecture::Qwen2;
        Ok(ModelConfig {
            architecture,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads,
            head_dim,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps as f32,
            rope_theta: hf.rope_theta,
            llama3_rope,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            qkv_bias: qwen || hf.attention_bias,
            o_bias: !qwen && hf.attention_bias,
            mlp_bias: hf.mlp_bias,
            sliding_window,
            bos_token_ids: hf.bos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
            eos_token_ids: hf.eos_token_id.as_ref().map(TokenIds::to_vec).unwrap_or_default(),
        })
    }

    /// Rotary inverse frequencies (f64 then rounded once to f32), with Llama 3.1 scaling applied.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let freq = 1.0 / self.rope_theta.powf(2.0 * i as f64 / self.head_dim as f64);
                let freq = match &self.llama3_rope {
                    None => freq,
                    Some(s) => {
                        let old = s.original_max_position_embeddings as f64;
                        let low_wavelen = old / s.low_freq_factor;
                        let high_wavelen = old / s.high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / s.factor
                        } else {
                            let smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                            (1.0 - smooth) * freq / s.factor + smooth * freq
                        }
                    }
                };
                freq as f32
            })
            .collect()
    }

    /// Bytes of one decoder layer's matrices held in `dtype` (q, k, v, o, gate, up, down): what a loaded
    /// shard counts per layer in its weight bytes. Norms and biases, a few KiB a layer, are left out
    /// there and here. For planning memory before anything is loaded (`computepool plan`).
    pub fn layer_weight_bytes(&self, dtype: DType) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        (h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size) * dtype.size_in_bytes()
    }

    /// Bytes of one `vocab × hidden` matrix in `dtype`: the token embedding an entry shard holds, and
    /// the lm_head an exit shard holds (with tied embeddings the same matrix, which each of them then
    /// holds; a shard that is both holds it once).
    pub fn vocab_matrix_bytes(&self, dtype: DType) -> usize {
        self.vocab_size * self.hidden_size * dtype.size_in_bytes()
    }

    /// Bytes of KV cache one position of one request takes in one layer: its keys and values, kept in
    /// f32 whatever the weights' dtype.
    pub fn kv_bytes_per_position(&self) -> usize {
        2 * self.num_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf(&serde_json::from_str(json).expect("test json"))
    }

    #[test]
    fn unsupported_architecture_is_named() {
        let err = parse(r#"{"architectures":["GPT2LMHeadModel"],"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"vocab_size":10}"#)
        .unwrap_err();
        assert!(err.to_string().contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn qwen2_has_qkv_bias_and_gqa() {
        let c = parse(r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"vocab_size":10,
            "tie_word_embeddings":true,"sliding_window":4096,"use_sliding_window":false}"#)
        .unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!((c.head_dim, c.num_kv_heads, c.sliding_window), (16, 2, None));
    }

    #[test]
    fn llama3_rope_scaling_changes_low_frequencies_only() {
        let c = parse(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":128,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"vocab_size":10,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
            "original_max_position_embeddings":8192}}"#)
        .unwrap();
        let mut plain = c.clone();
        plain.llama3_rope = None;
        let (a, b) = (c.rope_inv_freq(), plain.rope_inv_freq());
        assert_eq!(a[0], b[0]);
        assert!((a[63] - b[63] / 8.0).abs() < 1e-12);
    }

    #[test]
    fn heads_must_divide() {
        let err = parse(r#"{"architectures":["LlamaForCausalLM"],"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4,"num_key_value_heads":3,"vocab_size":10}"#)
        .unwrap_err();
        assert!(err.to_string().contains("multiple"), "{err}");
    }
}
