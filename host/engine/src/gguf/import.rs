//! GGUF (llama and qwen2 architectures) → Hugging Face layout directory.
//!
//! Writes `model.safetensors` (dequantized weights under HF names, f32 or bf16), `config.json`,
//! `generation_config.json`, `tokenizer.json` and `tokenizer_config.json`. Three things differ
//! between the two formats and are undone here:
//!
//! - names: `blk.{i}.attn_q.weight` ↔ `model.layers.{i}.self_attn.q_proj.weight` and so on;
//! - shapes: GGUF lists dims fastest-first, so `[ne0, ne1]` is HF's `[ne1, ne0]` (same bytes);
//! - Q and K rows (llama only): llama.cpp's converter interleaves each head's two rotary halves
//!   (`w.reshape(n_head, 2, head_dim / 2, cols).swapaxes(1, 2)`, with `n_head = n_kv_head` for K)
//!   so that its RoPE can rotate adjacent pairs; HF rotates halves, so we put the rows back. Qwen2
//!   files keep HF's order (llama.cpp runs them with NeoX-style RoPE, which rotates halves as HF does).
//!
//! Qwen2 files differ from llama ones only in their metadata prefix (`qwen2.*`), in having q/k/v
//! biases (`blk.{i}.attn_{q,k,v}.bias`), and in the Q/K row order above.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use half::bf16;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use super::dequant::dequantize;
use super::reader::{GgufFile, TensorInfo};
use super::tokenizer::GgufVocab;
use crate::error::{EngineError, Result};
use crate::tensor::DType;

/// The files an import writes (the caller may add its own marker after them).
pub const IMPORTED_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// The `general.architecture` values this crate reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufArchitecture {
    Llama,
    /// Qwen2 / Qwen2.5: llama with q/k/v biases and HF's Q/K row order.
    Qwen2,
}

impl GgufArchitecture {
    /// The metadata key prefix (`llama.block_count`, `qwen2.block_count`).
    pub fn prefix(self) -> &'static str {
        match self {
            GgufArchitecture::Llama => "llama",
            GgufArchitecture::Qwen2 => "qwen2",
        }
    }
}

/// A llama-family model's hyper-parameters, from the `llama.*` or `qwen2.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    pub architecture: GgufArchitecture,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// Linear RoPE scaling factor, if the file asks for one.
    pub rope_linear_factor: Option<f64>,
    pub vocab_size: usize,
}

impl LlamaParams {
    /// Reads and checks the hyper-parameters of a `general.architecture = "llama"` or `"qwen2"` file.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let architecture = match file.require_str("general.architecture")? {
            "llama" => GgufArchitecture::Llama,
            "qwen2" => GgufArchitecture::Qwen2,
            arch => {
                return Err(EngineError::UnsupportedArchitecture(format!(
                    "GGUF general.architecture {arch:?} (supported: llama, qwen2)"
                )));
            }
        };
        let prefix = architecture.prefix();
        // Every hyper-parameter key is the architecture's: `llama.block_count`, `qwen2.block_count`.
        let key = |suffix: &str| format!("{prefix}.{suffix}");
        if file.opt_u64(&key("expert_count"))?.unwrap_or(0) > 0 {
            return Err(file.error(format!("mixture-of-experts files ({prefix}.expert_count > 0) are not supported")));
        }
        let usize_of = |suffix: &str| -> Result<usize> {
            let key = key(suffix);
            let key = key.as_str();
            let v = file.require_u64(key)?;
            usize::try_from(v)
                .ok()
                .filter(|&v| v > 0 && v <= 1 << 24)
                .ok_or_else(|| file.error(format!("{key} is {v}, expected a positive size of at most 2^24")))
        };
        let n_layers = usize_of("block_count")?;
        let hidden_size = usize_of("embedding_length")?;
        let intermediate_size = usize_of("feed_forward_length")?;
        let n_heads = usize_of("attention.head_count")?;
        let n_kv_heads = if file.get(&key("attention.head_count_kv")).is_some() {
            usize_of("attention.head_count_kv")?
        } else {
            n_heads
        };
        let head_dim = if file.get(&key("attention.key_length")).is_some() {
            usize_of("attention.key_length")?
        } else {
            if hidden_size % n_heads != 0 {
                return Err(file.error(format!(
                    "embedding length {hidden_size} is not a multiple of {n_heads} heads"
                )));
            }
            hidden_size / n_heads
        };
        if head_dim % 2 != 0 {
            return Err(file.error(format!("head dimension {head_dim} is odd; RoPE needs pairs")));
        }
        if n_heads % n_kv_heads != 0 {
            return Err(file.error(format!(
                "{n_heads} attention heads are not a multiple of {n_kv_heads} KV heads"
            )));
        }
        if let Some(v) = file.opt_u64(&key("attention.value_length"))?
            && v as usize != head_dim
        {
            return Err(file.error(format!("value head size {v} differs from key head size {head_dim}")));
        }
        if let Some(rot) = file.opt_u64(&key("rope.dimension_count"))?
            && rot as usize != head_dim
        {
            return Err(file.error(format!(
                "partial rotary embeddings (rope.dimension_count {rot}, head dim {head_dim}) are not supported"
            )));
        }
        let rope_linear_factor = match file.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let f = file.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                (f != 1.0).then_some(f)
            }
            Some(other) => return Err(file.error(format!("RoPE scaling {other:?} is not supported (only linear)"))),
        };
        let float = |key: &str, default: Option<f64>| -> Result<f64> {
            match file.opt_f64(key)? {
                Some(v) if v.is_finite() && v > 0.0 => Ok(v),
                Some(v) => Err(file.error(format!("{key} is {v}, expected a positive number"))),
                None => default.ok_or_else(|| file.error(format!("metadata key {key} is missing"))),
            }
        };
        let context_length = usize_of("context_length")?;
        let vocab_size = match file.opt_u64(&key("vocab_size"))? {
            Some(_) => usize_of("vocab_size")?,
            None => file
                .opt_str_array("tokenizer.ggml.tokens")?
                .map(<[String]>::len)
                .or_else(|| {
                    file.tensor("token_embd.weight")
                        .and_then(|t| t.dims.get(1))
                        .map(|&d| d as usize)
                })
                .ok_or_else(|| {
                    file.error(format!("cannot tell the vocabulary size (no {prefix}.vocab_size, tokens or token_embd)"))
                })?,
        };
        Ok(LlamaParams {
            architecture,
            n_layers,
            hidden_size,
            intermediate_size,
            n_heads,
            n_kv_heads,
            head_dim,
            context_length,
            rope_theta: float(&key("rope.freq_base"), Some(10_000.0))?,
            rms_norm_eps: float(&key("attention.layer_norm_rms_epsilon"), None)?,
            rope_linear_factor,
            vocab_size,
        })
    }
}

/// How a tensor's rows are reordered on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowOrder {
    AsIs,
    /// Undo llama.cpp's rotary interleave over this many heads.
    UnpermuteHeads(usize),
}

/// One output tensor: where it comes from and how it is reshaped.
#[derive(Debug, Clone)]
pub(crate) struct PlannedTensor {
    pub(crate) hf_name: String,
    pub(crate) gguf_name: String,
    pub(crate) hf_shape: Vec<usize>,
    pub(crate) rows: RowOrder,
}

/// The GGUF name, expected ggml dims, HF name and row order of every tensor a llama or qwen2 model has.
fn expected_tensors(p: &LlamaParams, with_output: bool) -> Vec<(String, Vec<u64>, String, RowOrder)> {
    let h = p.hidden_size as u64;
    let f = p.intermediate_size as u64;
    let q = (p.n_heads * p.head_dim) as u64;
    let kv = (p.n_kv_heads * p.head_dim) as u64;
    let v = p.vocab_size as u64;
    let mut out = vec![(
        "token_embd.weight".to_string(),
        vec![h, v],
        "model.embed_tokens.weight".to_string(),
        RowOrder::AsIs,
    )];
    let qwen2 = p.architecture == GgufArchitecture::Qwen2;
    let (q_rows, k_rows) = if qwen2 {
        (RowOrder::AsIs, RowOrder::AsIs)
    } else {
        (RowOrder::UnpermuteHeads(p.n_heads), RowOrder::UnpermuteHeads(p.n_kv_heads))
    };
    for i in 0..p.n_layers {
        let layer = |gguf: &str, dims: Vec<u64>, hf: &str, rows: RowOrder| {
            (
                format!("blk.{i}.{gguf}.weight"),
                dims,
                format!("model.layers.{i}.{hf}.weight"),
                rows,
            )
        };
        out.push(layer("attn_norm", vec![h], "input_layernorm", RowOrder::AsIs));
        out.push(layer("attn_q", vec![h, q], "self_attn.q_proj", q_rows));
        out.push(layer("attn_k", vec![h, kv], "self_attn.k_proj", k_rows));
        out.push(layer("attn_v", vec![h, kv], "self_attn.v_proj", RowOrder::AsIs));
        if qwen2 {
            for (gguf, dims, hf) in [("attn_q", q, "self_attn.q_proj"), ("attn_k", kv, "self_attn.k_proj"), ("attn_v", kv, "self_attn.v_proj")] {
                out.push((format!("blk.{i}.{gguf}.bias"), vec![dims], format!("model.layers.{i}.{hf}.bias"), RowOrder::AsIs));
            }
        }
        out.push(layer("attn_output", vec![q, h], "self_attn.o_proj", RowOrder::AsIs));
        out.push(layer("ffn_norm", vec![h], "post_attention_layernorm", RowOrder::AsIs));
        out.push(layer("ffn_gate", vec![h, f], "mlp.gate_proj", RowOrder::AsIs));
        out.push(layer("ffn_up", vec![h, f], "mlp.up_proj", RowOrder::AsIs));
        out.push(layer("ffn_down", vec![f, h], "mlp.down_proj", RowOrder::AsIs));
    }
    out.push((
        "output_norm.weight".to_string(),
        vec![h],
        "model.norm.weight".to_string(),
        RowOrder::AsIs,
    ));
    if with_output {
        out.push((
            "output.weight".to_string(),
            vec![h, v],
            "lm_head.weight".to_string(),
            RowOrder::AsIs,
        ));
    }
    out
}

/// Matches the file's tensors against what a llama model needs: every one present with the right
/// dims and a type we can decode, nothing unexplained left over.
pub(crate) fn plan(file: &GgufFile, p: &LlamaParams) -> Result<Vec<PlannedTensor>> {
    let with_output = file.tensor("output.weight").is_some();
    let expected = expected_tensors(p, with_output);
    let mut planned = Vec::with_capacity(expected.len());
    for (gguf_name, dims, hf_name, rows) in &expected {
        let t = file.tensor(gguf_name).ok_or_else(|| EngineError::MissingTensor {
            name: gguf_name.clone(),
            path: file.path().to_path_buf(),
        })?;
        if &t.dims != dims {
            return Err(file.error(format!(
                "tensor {gguf_name} has dims {:?}, expected {dims:?} for this config",
                t.dims
            )));
        }
        if !t.ggml_type.is_dequantizable() {
            return Err(file.error(format!(
                "tensor {gguf_name} is {}, which this importer cannot dequantize (supported: f32, f16, bf16, \
                 q4_0, q4_1, q5_0, q5_1, q8_0, q2_K..q6_K, q8_K)",
                t.ggml_type
            )));
        }
        planned.push(PlannedTensor {
            hf_name: hf_name.clone(),
            gguf_name: gguf_name.clone(),
            hf_shape: t.hf_shape(),
            rows: *rows,
        });
    }
    let known: std::collections::HashSet<&str> = expected.iter().map(|(n, ..)| n.as_str()).collect();
    let extra: Vec<&str> = file
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|n| !known.contains(n))
        .collect();
    if !extra.is_empty() {
        let hint = if extra.contains(&"rope_freqs.weight") {
            " (rope_freqs.weight is Llama 3.1-style RoPE scaling, which this importer does not support)"
        } else {
            ""
        };
        return Err(file.error(format!(
            "unexpected tensors for a {} model: {}{hint}",
            p.architecture.prefix(),
            extra.join(", ")
        )));
    }
    Ok(planned)
}

/// Puts the rows of a `[n_heads · head_dim, cols]` matrix back in HF order: GGUF row
/// `h·hd + 2i + j` is HF row `h·hd + j·hd/2 + i` (i < hd/2, j ∈ {0, 1}).
pub fn unpermute_rows(values: &[f32], cols: usize, n_heads: usize) -> Vec<f32> {
    unpermute_row_bytes(values, cols, n_heads)
}

/// [`unpermute_rows`] for rows of any element, `row_len` elements each (quantized rows move as whole
/// runs of blocks).
pub(crate) fn unpermute_row_bytes<T: Copy + Default>(values: &[T], row_len: usize, n_heads: usize) -> Vec<T> {
    let rows = values.len() / row_len.max(1);
    let head_dim = rows / n_heads.max(1);
    let half = head_dim / 2;
    let mut out = vec![T::default(); values.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * row_len;
                let dst = (h * head_dim + j * half + i) * row_len;
                out[dst..dst + row_len].copy_from_slice(&values[src..src + row_len]);
            }
        }
    }
    out
}

/// A tensor that is dequantized only when the safetensors writer asks for its bytes, so an import
/// holds one tensor in memory at a time.
struct LazyTensor<'a> {
    file: &'a GgufFile,
    info: &'a TensorInfo,
    plan: &'a PlannedTensor,
    dtype: DType,
    progress: &'a ProgressBar,
}

impl LazyTensor<'_> {
    fn values(&self) -> Vec<f32> {
        // plan() checked that the type decodes and the dims match; the reader checked the bytes are
        // in the file and match the type and dims. Nothing here depends on unchecked input.
        let raw = self
            .file
            .tensor_data(self.info)
            .expect("tensor bounds were validated when the file was parsed");
        let values = dequantize(self.info.ggml_type, raw, self.info.n_elements)
            .expect("tensor type and size were validated by the import plan");
        match self.plan.rows {
            RowOrder::AsIs => values,
            RowOrder::UnpermuteHeads(n_heads) => unpermute_rows(&values, self.plan.hf_shape[1], n_heads),
        }
    }
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.dtype {
            DType::F32 => safetensors::Dtype::F32,
            DType::Bf16 => safetensors::Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.plan.hf_shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let values = self.values();
        let bytes: Vec<u8> = match self.dtype {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::Bf16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        };
        self.progress.inc(1);
        self.progress.set_message(self.plan.hf_name.clone());
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.info.n_elements as usize * self.dtype.size_in_bytes()
    }
}

/// What an import wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportSummary {
    pub out_dir: PathBuf,
    pub dtype: DType,
    pub params: LlamaParams,
    pub tensors: usize,
    pub parameters: u64,
    /// How many source tensors had each ggml type (`"q4_1" → 210`).
    pub source_types: BTreeMap<String, usize>,
    pub tied_embeddings: bool,
    /// Size of model.safetensors in bytes.
    pub model_bytes: u64,
}

/// Imports the GGUF at `gguf` into the HF layout directory `out_dir` (created if missing; files in it
/// are replaced atomically, one by one). `progress` shows an indicatif bar on stderr.
pub fn import_gguf(gguf: &Path, out_dir: &Path, dtype: DType, progress: bool) -> Result<ImportSummary> {
    let file = GgufFile::open(gguf)?;
    import_gguf_file(&file, out_dir, dtype, progress)
}

/// [`import_gguf`] for an already opened file.
pub fn import_gguf_file(file: &GgufFile, out_dir: &Path, dtype: DType, progress: bool) -> Result<ImportSummary> {
    let params = LlamaParams::from_gguf(file)?;
    let vocab = GgufVocab::from_gguf(file)?;
    if vocab.tokens.len() != params.vocab_size {
        return Err(file.error(format!(
            "the tokenizer has {} tokens but the model's vocabulary is {}",
            vocab.tokens.len(),
            params.vocab_size
        )));
    }
    let planned = plan(file, &params)?;
    let tied = file.tensor("output.weight").is_none();
    fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;

    let bar = if progress {
        let bar = ProgressBar::new(planned.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{spinner} importing [{bar:30}] {pos}/{len} tensors {wide_msg}")
                .expect("the progress template is a valid constant")
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    let mut source_types = BTreeMap::new();
    let mut parameters = 0u64;
    let mut lazy = Vec::with_capacity(planned.len());
    for p in &planned {
        let info = file.tensor(&p.gguf_name).ok_or_else(|| EngineError::MissingTensor {
            name: p.gguf_name.clone(),
            path: file.path().to_path_buf(),
        })?;
        *source_types.entry(info.ggml_type.name().to_string()).or_insert(0) += 1;
        parameters += info.n_elements;
        lazy.push((
            p.hf_name.clone(),
            LazyTensor {
                file,
                info,
                plan: p,
                dtype,
                progress: &bar,
            },
        ));
    }
    let ids = vocab.special_ids();
    let config_path = out_dir.join("config.json");
    write_json(&config_path, &hf_config(&params, tied, dtype, ids))?;

    let model_path = out_dir.join("model.safetensors");
    let st_meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
    safetensors::serialize_to_file(lazy, Some(st_meta), &model_path).map_err(|e| EngineError::Safetensors {
        path: model_path.clone(),
        message: e.to_string(),
    })?;
    bar.finish_and_clear();
    // The safetensors writer goes through a private (0600) temporary file; give the model the
    // permissions an ordinary file gets here (those config.json was just created with).
    let permissions = fs::metadata(&config_path)
        .map_err(|e| EngineError::io(&config_path, e))?
        .permissions();
    fs::set_permissions(&model_path, permissions).map_err(|e| EngineError::io(&model_path, e))?;
    let model_bytes = fs::metadata(&model_path)
        .map_err(|e| EngineError::io(&model_path, e))?
        .len();

    write_json(&out_dir.join("generation_config.json"), &generation_config(ids))?;
    write_text(&out_dir.join("tokenizer.json"), &vocab.tokenizer_json()?)?;
    write_json(
        &out_dir.join("tokenizer_config.json"),
        &vocab.tokenizer_config(Some(params.context_length as u64)),
    )?;
    tracing::info!(
        out_dir = %out_dir.display(),
        tensors = planned.len(),
        parameters,
        dtype = %dtype,
        "imported GGUF"
    );
    Ok(ImportSummary {
        out_dir: out_dir.to_path_buf(),
        dtype,
        params,
        tensors: planned.len(),
        parameters,
        source_types,
        tied_embeddings: tied,
        model_bytes,
    })
}

/// An f32 read from the file as its shortest decimal (1e-5, not 9.999999747378752e-6), so the
/// config reads like the original HF one; f64 values are kept as they are.
fn float_json(v: f64) -> Value {
    let as_f32 = v as f32;
    let shortest = if f64::from(as_f32) == v {
        format!("{as_f32}").parse::<f64>().unwrap_or(v)
    } else {
        v
    };
    serde_json::Number::from_f64(shortest).map_or(Value::Null, Value::Number)
}

/// HF `config.json` for `LlamaForCausalLM` or `Qwen2ForCausalLM`.
pub fn hf_config(p: &LlamaParams, tied: bool, dtype: DType, ids: super::tokenizer::SpecialIds) -> Value {
    let rope_scaling = match p.rope_linear_factor {
        Some(f) => json!({"rope_type": "linear", "factor": float_json(f)}),
        None => Value::Null,
    };
    let (class, model_type) = match p.architecture {
        GgufArchitecture::Llama => ("LlamaForCausalLM", "llama"),
        GgufArchitecture::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
    };
    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.n_layers,
        "num_attention_heads": p.n_heads,
        "num_key_value_heads": p.n_kv_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": p.context_length,
        "rms_norm_eps": float_json(p.rms_norm_eps),
        "rope_theta": float_json(p.rope_theta),
        "rope_scaling": rope_scaling,
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": tied,
        "attention_bias": false,
        "mlp_bias": false,
        "bos_token_id": ids.bos,
        "eos_token_id": ids.eos,
        "pad_token_id": ids.pad,
        "torch_dtype": match dtype { DType::F32 => "float32", DType::Bf16 => "bfloat16" },
        "use_cache": true,
    });
    if p.architecture == GgufArchitecture::Qwen2
        && let Some(obj) = config.as_object_mut()
    {
        // Qwen2's sliding window is off in its released configs; GGUF has no key for it.
        obj.insert("use_sliding_window".into(), json!(false));
    }
    config
}

/// HF `generation_config.json`: the special token ids (sampling defaults are the server's business).
pub fn generation_config(ids: super::tokenizer::SpecialIds) -> Value {
    let mut v = json!({"_from_model_config": true});
    if let Some(obj) = v.as_object_mut() {
        for (key, id) in [
            ("bos_token_id", ids.bos),
            ("eos_token_id", ids.eos),
            ("pad_token_id", ids.pad),
        ] {
            if let Some(id) = id {
                obj.insert(key.into(), json!(id));
            }
        }
    }
    v
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| EngineError::Invalid(e.to_string()))?;
    write_text(path, &(text + "\n"))
}

/// Writes `text` to a sibling temporary file, then renames it over `path`.
fn write_text(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    fs::write(&tmp, text).map_err(|e| EngineError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        EngineError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::writer::GgufWriter;
    use crate::gguf::writer::tests_support::*;
    use safetensors::SafeTensors;

    fn f32s(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn gguf_values(file: &GgufFile, name: &str) -> Vec<f32> {
        let t = file.tensor(name).unwrap();
        dequantize(t.ggml_type, file.tensor_data(t).unwrap(), t.n_elements).unwrap()
    }

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // Build HF rows 0..rows (each row filled with its index), permute as convert_hf_to_gguf does,
        // and check that unpermute_rows gives the HF order back.
        let (n_heads, head_dim, cols) = (3, 8, 2);
        let rows = n_heads * head_dim;
        let hf: Vec<f32> = (0..rows).flat_map(|r| std::iter::repeat_n(r as f32, cols)).collect();
        // permute: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2) → gguf[h, i, j] = hf[h, j, i]
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_heads {
            for i in 0..head_dim / 2 {
                for j in 0..2 {
                    let g = h * head_dim + i * 2 + j;
                    let s = h * head_dim + j * (head_dim / 2) + i;
                    gguf[g * cols..(g + 1) * cols].copy_from_slice(&hf[s * cols..(s + 1) * cols]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rows(&gguf, cols, n_heads), hf);
    }

    #[test]
    fn imports_the_tiny_model() {
        let dir = tempfile::tempdir().unwrap();
        let file = GgufFile::from_bytes("tiny.gguf", tiny_llama_gguf()).unwrap();
        let summary = import_gguf_file(&file, dir.path(), DType::F32, false).unwrap();
        assert_eq!(summary.tensors, 2 + TINY_LAYERS * 9);
        assert!(summary.tied_embeddings);
        for f in IMPORTED_FILES {
            assert!(dir.path().join(f).is_file(), "{f}");
        }

        let config: Value = serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(config["num_hidden_layers"], TINY_LAYERS);
        assert_eq!(config["num_key_value_heads"], TINY_KV_HEADS);
        assert_eq!(config["head_dim"], TINY_HEAD_DIM);
        assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-5));
        assert_eq!(config["rope_theta"].as_f64(), Some(100000.0));
        assert_eq!(config["tie_word_embeddings"], true);
        assert_eq!(config["eos_token_id"], 2);
        assert_eq!(config["torch_dtype"], "float32");

        let bytes = fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), summary.tensors);
        assert!(st.names().iter().all(|n| !n.starts_with("lm_head")));
        let emb = st.tensor("model.embed_tokens.weight").unwrap();
        assert_eq!(emb.shape(), [summary.params.vocab_size, TINY_HIDDEN]);
        assert_eq!(f32s(emb.data()), gguf_values(&file, "token_embd.weight"));

        let down = st.tensor("model.layers.1.mlp.down_proj.weight").unwrap();
        assert_eq!(down.shape(), [TINY_HIDDEN, TINY_FFN]);
        assert_eq!(f32s(down.data()), gguf_values(&file, "blk.1.ffn_down.weight"));

        // Q and K: each HF row is the GGUF row the converter moved it to.
        for (name, gguf, heads) in [("q_proj", "attn_q", TINY_HEADS), ("k_proj", "attn_k", TINY_KV_HEADS)] {
            let t = st.tensor(&format!("model.layers.0.self_attn.{name}.weight")).unwrap();
            assert_eq!(t.shape(), [heads * TINY_HEAD_DIM, TINY_HIDDEN]);
            let hf = f32s(t.data());
            let g = gguf_values(&file, &format!("blk.0.{gguf}.weight"));
            let half = TINY_HEAD_DIM / 2;
            for h in 0..heads {
                for i in 0..half {
                    for j in 0..2 {
                        let hf_row = h * TINY_HEAD_DIM + j * half + i;
                        let gguf_row = h * TINY_HEAD_DIM + 2 * i + j;
                        assert_eq!(
                            hf[hf_row * TINY_HIDDEN..(hf_row + 1) * TINY_HIDDEN],
                            g[gguf_row * TINY_HIDDEN..(gguf_row + 1) * TINY_HIDDEN]
                        );
                    }
                }
            }
        }
        let tok: tokenizers::Tokenizer = fs::read_to_string(dir.path().join("tokenizer.json"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(tok.get_vocab_size(true), summary.params.vocab_size);
    }

    #[test]
    fn bf16_import_rounds_each_value() {
        let dir = tempfile::tempdir().unwrap();
        let file = GgufFile::from_bytes("tiny.gguf", tiny_llama_gguf()).unwrap();
        let summary = import_gguf_file(&file, dir.path(), DType::Bf16, false).unwrap();
        let bytes = fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("model.norm.weight").unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::BF16);
        let got: Vec<f32> = t
            .data()
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let want: Vec<f32> = gguf_values(&file, "output_norm.weight")
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(got, want);
        let config: Value = serde_json::from_str(&fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "bfloat16");
        assert!(
            summary.model_bytes < 2 * 4 * summary.parameters / 3,
            "bf16 file should be about half the f32 one"
        );
    }

    #[test]
    fn missing_and_unexpected_tensors_are_errors() {
        // Rebuild the tiny file without one tensor / with an extra one.
        let full = GgufFile::from_bytes("tiny.gguf", tiny_llama_gguf()).unwrap();
        let rebuild = |skip: &str, extra: Option<&str>| {
            let mut w = GgufWriter::new();
            let (tokens, types, merges) = tiny_vocab();
            for (k, v) in full.metadata() {
                match v {
                    crate::gguf::reader::MetadataValue::U32(x) => {
                        w.add_u32(k, *x);
                    }
                    crate::gguf::reader::MetadataValue::F32(x) => {
                        w.add_f32(k, *x);
                    }
                    crate::gguf::reader::MetadataValue::Bool(x) => {
                        w.add_bool(k, *x);
                    }
                    crate::gguf::reader::MetadataValue::String(x) => {
                        w.add_string(k, x);
                    }
                    _ => {}
                }
            }
            w.add_string_array("tokenizer.ggml.tokens", &tokens)
                .add_i32_array("tokenizer.ggml.token_type", &types)
                .add_string_array("tokenizer.ggml.merges", &merges);
            for t in full.tensors().iter().filter(|t| t.name != skip) {
                w.add_f32_tensor(&t.name, &t.dims, &gguf_values(&full, &t.name));
            }
            if let Some(name) = extra {
                w.add_f32_tensor(name, &[4], &[1.0; 4]);
            }
            GgufFile::from_bytes("edited.gguf", w.to_bytes()).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let e = import_gguf_file(&rebuild("blk.1.attn_k.weight", None), dir.path(), DType::F32, false).unwrap_err();
        assert!(
            matches!(e, EngineError::MissingTensor { ref name, .. } if name == "blk.1.attn_k.weight"),
            "{e}"
        );
        let e = import_gguf_file(&rebuild("", Some("rope_freqs.weight")), dir.path(), DType::F32, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rope_freqs.weight") && e.contains("Llama 3.1"), "{e}");
    }

    #[test]
    fn other_architectures_are_refused() {
        let mut w = GgufWriter::new();
        w.add_string("general.architecture", "gemma2");
        let f = GgufFile::from_bytes("q.gguf", w.to_bytes()).unwrap();
        let e = LlamaParams::from_gguf(&f).unwrap_err();
        assert!(matches!(e, EngineError::UnsupportedArchitecture(_)), "{e}");
    }

    /// Cross-check against the real SmolLM2 import, when `computepool model fetch smollm2-135m-instruct`
    /// has been run (models/ at the repository root).
    #[test]
    fn real_smollm2_import_matches_reference() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-135m-instruct");
        if !dir.join("model.safetensors").is_file() {
            eprintln!(
                "skipping: {} has no imported model (run `computepool model fetch smollm2-135m-instruct`)",
                dir.display()
            );
            return;
        }
        let config: Value = serde_json::from_str(&fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        for (key, want) in [
            ("num_hidden_layers", json!(30)),
            ("hidden_size", json!(576)),
            ("intermediate_size", json!(1536)),
            ("num_attention_heads", json!(9)),
            ("num_key_value_heads", json!(3)),
            ("head_dim", json!(64)),
            ("vocab_size", json!(49152)),
            ("max_position_embeddings", json!(8192)),
            ("tie_word_embeddings", json!(true)),
            ("bos_token_id", json!(1)),
            ("eos_token_id", json!(2)),
        ] {
            assert_eq!(config[key], want, "config.json {key}");
        }
        assert_eq!(config["rope_theta"].as_f64(), Some(100000.0));
        assert_eq!(config["rms_norm_eps"].as_f64(), Some(1e-5));

        // Values recorded with the `gguf` Python package's reader and dequantizer plus the inverse
        // permutation written in numpy (testdata/make_smollm2_fixture.py), independent of this code.
        let fixture: Value = serde_json::from_str(include_str!("testdata/smollm2_weights.json")).unwrap();
        let file = fs::File::open(dir.join("model.safetensors")).unwrap();
        // SAFETY: read-only map of a file this test does not modify.
        let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
        let st = SafeTensors::deserialize(&map).unwrap();
        let fixture_tensors = fixture["tensors"].as_object().unwrap();
        for (name, entry) in fixture_tensors {
            let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            let shape: Vec<usize> = serde_json::from_value(entry["shape"].clone()).unwrap();
            assert_eq!(t.shape(), shape, "{name} shape");
            let values: Vec<f32> = match t.dtype() {
                safetensors::Dtype::F32 => f32s(t.data()),
                safetensors::Dtype::BF16 => t
                    .data()
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            let cols = *shape.last().unwrap();
            for sample in entry["samples"].as_array().unwrap() {
                let row = sample["row"].as_u64().unwrap() as usize;
                let want: Vec<f32> = serde_json::from_value(sample["values"].clone()).unwrap();
                let got = &values[row * cols..row * cols + want.len()];
                for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    let w = if t.dtype() == safetensors::Dtype::BF16 {
                        bf16::from_f32(w).to_f32()
                    } else {
                        w
                    };
                    assert_eq!(g.to_bits(), w.to_bits(), "{name} row {row} col {k}: {g} != {w}");
                }
            }
        }
    }
}
