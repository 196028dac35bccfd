//! The Llama-family decoder, one layer range at a time.
//!
//! Tensor names map 1:1 to Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, …). At load, q/k/v
//! are stacked into one `[q + 2·kv, hidden]` matrix and gate/up into one `[2·ffn, hidden]` matrix, so a
//! decode step runs four matrix products per layer; each output row is the same dot product it would be
//! unstacked.

use std::path::Path;
use std::sync::Arc;

use crate::backend::cpu::{self, AttentionShape, CpuBackend, KvView};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::kv_cache::KvCache;
use crate::shard::LayerRange;
use crate::tensor::{DType, Weight, WeightData};
use crate::weight_mem;
use crate::weights::{WeightFiles, WeightSource};

/// How to load a shard.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The dtype weights are held in. Default bf16: half the memory and bandwidth of f32.
    pub dtype: DType,
    /// The layers to load; `None` is the whole model.
    pub range: Option<LayerRange>,
    /// Show a progress bar while loading.
    pub progress: bool,
    /// Split the output head between the entry and the exit (see [`head_split`]): an entry that is not
    /// the exit also holds lm_head's rows `[0, split)`, an exit that is not the entry holds only rows
    /// `[split, vocab)`, and the exit's step ends in [`StepOutput::Normed`]; each side then computes its
    /// rows' logits with [`Shard::head_logits`], at the same time. A whole model ignores it.
    pub split_head: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { dtype: DType::Bf16, range: None, progress: false, split_head: false }
    }
}

/// Where a split output head is cut: lm_head's rows `[0, split)` are the entry's, `[split, vocab)` the
/// exit's. Half the vocabulary, rounded down to whole groups of 16 rows (the CPU kernels' interleaved
/// layout is cut only there); `None` for a vocabulary too small to split.
pub fn head_split(vocab: usize) -> Option<usize> {
    let split = vocab / 2 / 16 * 16;
    (split > 0).then_some(split)
}

/// The rows of lm_head a shard of `range` holds: `None` for none (a shard that is not the exit, and not
/// an entry with `split_head`), else all of them or its side of [`head_split`].
fn lm_head_rows(cfg: &ModelConfig, range: LayerRange, split_head: bool) -> Result<Option<std::ops::Range<usize>>> {
    let vocab = cfg.vocab_size;
    let split = || {
        head_split(vocab).ok_or_else(|| EngineError::Invalid(format!("a vocabulary of {vocab} tokens is too small to split the head")))
    };
    Ok(match (range.is_entry(), range.is_exit()) {
        (true, true) => Some(0..vocab),
        (_, true) if !split_head => Some(0..vocab),
        (_, true) => Some(split()?..vocab),
        (true, false) if split_head => Some(0..split()?),
        _ => None,
    })
}

/// What a step consumes: token ids on the entry shard, hidden states `[n, hidden]` elsewhere.
#[derive(Debug, Clone, Copy)]
pub enum StepInput<'a> {
    Tokens(&'a [u32]),
    Hidden(&'a [f32]),
}

impl StepInput<'_> {
    pub(crate) fn rows(&self, hidden: usize) -> usize {
        match self {
            StepInput::Tokens(t) => t.len(),
            StepInput::Hidden(h) => h.len() / hidden.max(1),
        }
    }
}

/// What a step produces: hidden states `[n, hidden]` for the next shard, or (exit shard) the logits of
/// the last position, `[vocab]`, or (exit shard of a split head, [`LoadOptions::split_head`]) the last
/// position's state with the final norm applied, `[hidden]`, for [`Shard::head_logits`] on both sides.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutput {
    Hidden(Vec<f32>),
    Logits(Vec<f32>),
    Normed(Vec<f32>),
}

/// One request's part of a batched step: its new input and its KV cache on this shard.
#[derive(Debug)]
pub struct StepItem<'a> {
    pub input: StepInput<'a>,
    pub cache: &'a mut KvCache,
}

pub(crate) struct Block {
    pub(crate) input_norm: Vec<f32>,
    pub(crate) qkv: Weight,
    pub(crate) qkv_bias: Option<Vec<f32>>,
    pub(crate) o: Weight,
    pub(crate) o_bias: Option<Vec<f32>>,
    pub(crate) post_norm: Vec<f32>,
    pub(crate) gate_up: Weight,
    pub(crate) down: Weight,
    pub(crate) gate_up_bias: Option<Vec<f32>>,
    pub(crate) down_bias: Option<Vec<f32>>,
}

impl Block {
    /// Bytes of the block's matrices (norms and biases are negligible and left out).
    fn weight_bytes(&self) -> usize {
        self.qkv.size_in_bytes() + self.o.size_in_bytes() + self.gate_up.size_in_bytes() + self.down.size_in_bytes()
    }
}

/// How many bytes of blocks a loading shard packs into one region ([`weight_mem`]): enough that a
/// region's tail in small pages is a few percent of it, while the group's heap copies, alive until it
/// is packed, stay a few percent of a large model. A block larger than this is a group of its own.
const PACK_GROUP_BYTES: usize = 32 << 20;

/// Blocks loaded but not yet packed, packed a group at a time as they come.
struct BlockPacker {
    blocks: Vec<Block>,
    packed: usize,
}

impl BlockPacker {
    fn new(capacity: usize) -> Self {
        Self { blocks: Vec::with_capacity(capacity), packed: 0 }
    }

    fn push(&mut self, block: Block) -> Result<()> {
        self.blocks.push(block);
        if self.blocks[self.packed..].iter().map(Block::weight_bytes).sum::<usize>() >= PACK_GROUP_BYTES {
            self.pack()?;
        }
        Ok(())
    }

    fn pack(&mut self) -> Result<()> {
        let mut group: Vec<&mut Weight> =
            self.blocks[self.packed..].iter_mut().flat_map(|b| [&mut b.qkv, &mut b.o, &mut b.gate_up, &mut b.down]).collect();
        weight_mem::pack(&mut group)?;
        self.packed = self.blocks.len();
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<Block>> {
        self.pack()?;
        Ok(self.blocks)
    }
}

/// One matrix moved into a region of its own ([`weight_mem`]).
fn packed(mut w: Weight) -> Result<Weight> {
    weight_mem::pack(&mut [&mut w])?;
    Ok(w)
}

/// A loaded layer range of one model: the unit a worker runs.
pub struct Shard {
    cfg: ModelConfig,
    range: LayerRange,
    dtype: DType,
    pub(crate) embed: Option<Arc<Weight>>,
    pub(crate) blocks: Vec<Block>,
    pub(crate) norm: Option<Vec<f32>>,
    pub(crate) lm_head: Option<Arc<Weight>>,
    /// The vocabulary rows `lm_head` holds (all of them unless the head is split).
    pub(crate) head_rows: Option<std::ops::Range<usize>>,
    pub(crate) inv_freq: Vec<f32>,
    backend: Arc<CpuBackend>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("range", &self.range).field("dtype", &self.dtype).finish_non_exhaustive()
    }
}

fn stack(name: &str, parts: Vec<Weight>) -> Result<Weight> {
    let cols = parts[0].cols;
    let rows = parts.iter().map(|p| p.rows).sum();
    if parts.iter().any(|p| p.cols != cols) {
        return Err(EngineError::Tensor { name: name.into(), message: "stacked parts disagree on columns".into() });
    }
    // Parts quantized alike: their rows of blocks simply follow each other.
    if let WeightData::Quant { kind, .. } = parts[0].data
        && parts.iter().all(|p| matches!(p.data, WeightData::Quant { kind: k, .. } if k == kind))
    {
        let blocks = parts
            .into_iter()
            .flat_map(|p| match p.data {
                WeightData::Quant { blocks, .. } => blocks.into_vec(),
                _ => unreachable!("every part was checked to be quantized"),
            })
            .collect();
        return Ok(Weight { rows, cols, data: WeightData::Quant { kind, blocks } });
    }
    // Otherwise the first part's float type (bf16 for quantized parts of differing kinds).
    let data = match parts[0].data {
        WeightData::F32(_) => WeightData::F32(
            parts.into_iter().flat_map(|p| match p.data {
                WeightData::F32(d) => d.into_vec(),
                _ => p.to_f32(),
            }).collect(),
        ),
        WeightData::Bf16(_) | WeightData::Quant { .. } | WeightData::QuantInterleaved { .. } => WeightData::Bf16(
            parts.into_iter().flat_map(|p| match p.data {
                WeightData::Bf16(d) => d.into_vec(),
                _ => p.to_f32().into_iter().map(half::bf16::from_f32).collect(),
            }).collect(),
        ),
    };
    Ok(Weight { rows, cols, data })
}

impl Shard {
    /// Loads the shard's tensors (and only those) from an HF-layout directory.
    pub fn load(dir: &Path, options: &LoadOptions, backend: Arc<CpuBackend>) -> Result<Self> {
        let cfg = ModelConfig::from_dir(dir)?;
        let files = WeightFiles::open(dir)?;
        Self::from_weights(cfg, &files, options, backend)
    }

    /// Loads a layer range straight from a GGUF file: Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K matrices stay quantized in
    /// memory (computed as such by the CPU backend), other tensors come in `options.dtype`.
    pub fn load_gguf(path: &Path, options: &LoadOptions, backend: Arc<CpuBackend>) -> Result<Self> {
        let weights = crate::gguf::GgufWeights::open(path)?;
        let cfg = weights.config().clone();
        Self::from_weights(cfg, &weights, options, backend)
    }

    pub fn from_weights(cfg: ModelConfig, files: &dyn WeightSource, options: &LoadOptions, backend: Arc<CpuBackend>) -> Result<Self> {
        let range = options.range.unwrap_or(LayerRange::full(cfg.num_layers));
        if range.num_layers != cfg.num_layers {
            return Err(EngineError::InvalidRange { range: range.to_string(), layers: cfg.num_layers });
        }
        let dtype = options.dtype;
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let q_rows = cfg.num_heads * cfg.head_dim;
        let kv_rows = cfg.num_kv_heads * cfg.head_dim;
        let bar = progress_bar(options.progress, range.len() as u64 + 2);

        // Every matrix this shard multiplies goes through `prepare_weight` (the CPU kernels' layout); the
        // embedding only when it doubles as the lm_head (its rows are looked up either way).
        let untied_lm_head = files.contains("lm_head.weight") && !cfg.tie_word_embeddings;
        let embed = if range.is_entry() {
            let e = files.matrix("model.embed_tokens.weight", [cfg.vocab_size, h], dtype)?;
            Some(Arc::new(packed(if range.is_exit() && !untied_lm_head { backend.prepare_weight(e) } else { e })?))
        } else {
            None
        };
        bar.inc(1);
        let mut blocks = BlockPacker::new(range.len());
        for i in range.layers() {
            let p = format!("model.layers.{i}");
            let m = |n: &str, shape: [usize; 2]| files.matrix(&format!("{p}.{n}"), shape, dtype);
            let prepared = |w: Result<Weight>| w.map(|w| backend.prepare_weight(w));
            let v = |n: &str, len: usize| files.vector(&format!("{p}.{n}"), len);
            let qkv = prepared(stack(
                &format!("{p}.self_attn.qkv"),
                vec![m("self_attn.q_proj.weight", [q_rows, h])?, m("self_attn.k_proj.weight", [kv_rows, h])?, m("self_attn.v_proj.weight", [kv_rows, h])?],
            ))?;
            let qkv_bias = if cfg.qkv_bias {
                let mut b = v("self_attn.q_proj.bias", q_rows)?;
                b.extend(v("self_attn.k_proj.bias", kv_rows)?);
                b.extend(v("self_attn.v_proj.bias", kv_rows)?);
                Some(b)
            } else {
                None
            };
            let gate_up =
                prepared(stack(&format!("{p}.mlp.gate_up"), vec![m("mlp.gate_proj.weight", [ffn, h])?, m("mlp.up_proj.weight", [ffn, h])?]))?;
            let gate_up_bias = if cfg.mlp_bias {
                let mut b = v("mlp.gate_proj.bias", ffn)?;
                b.extend(v("mlp.up_proj.bias", ffn)?);
                Some(b)
            } else {
                None
            };
            blocks.push(Block {
                input_norm: v("input_layernorm.weight", h)?,
                qkv,
                qkv_bias,
                o: prepared(m("self_attn.o_proj.weight", [h, q_rows]))?,
                o_bias: if cfg.o_bias { Some(v("self_attn.o_proj.bias", h)?) } else { None },
                post_norm: v("post_attention_layernorm.weight", h)?,
                gate_up,
                down: prepared(m("mlp.down_proj.weight", [h, ffn]))?,
                gate_up_bias,
                down_bias: if cfg.mlp_bias { Some(v("mlp.down_proj.bias", h)?) } else { None },
            })?;
            bar.inc(1);
        }
        let blocks = blocks.finish()?;
        let norm = if range.is_exit() { Some(files.vector("model.norm.weight", h)?) } else { None };
        let head_rows = lm_head_rows(&cfg, range, options.split_head)?;
        let lm_head = match (&head_rows, &embed) {
            (None, _) => None,
            // Tied, and this shard is the whole model: one copy serves both.
            (Some(_), Some(e)) if range.is_exit() && !untied_lm_head => Some(Arc::clone(e)),
            (Some(rows), _) => {
                let name = if untied_lm_head { "lm_head.weight" } else { "model.embed_tokens.weight" };
                // Tied on an entry of a split head: its part is cut from the embedding it holds already.
                let whole = match &embed {
                    Some(e) if !untied_lm_head => std::borrow::Cow::Borrowed(&**e),
                    _ => std::borrow::Cow::Owned(files.matrix(name, [cfg.vocab_size, h], dtype)?),
                };
                let part = if rows.len() == cfg.vocab_size {
                    whole.into_owned()
                } else {
                    whole.slice_rows(rows.clone()).map_err(|message| EngineError::Tensor { name: name.into(), message })?
                };
                Some(Arc::new(packed(backend.prepare_weight(part))?))
            }
        };
        bar.inc(1);
        bar.finish_and_clear();
        let inv_freq = cfg.rope_inv_freq();
        Ok(Self { cfg, range, dtype, embed, blocks, norm, lm_head, head_rows, inv_freq, backend })
    }

    /// A seeded random checkpoint of `cfg`'s shape, in bf16, for timing at sizes that cannot be
    /// downloaded here (Llama-3-8B's shape, say): matrices uniform in ±0.02·√3 (standard deviation 0.02,
    /// as HF initialises), norm weights 1, biases 0; untied lm_head unless `cfg` ties it. The same `seed`
    /// gives the same weights on any machine; generation uses every core.
    pub fn random(cfg: ModelConfig, range: Option<LayerRange>, seed: u64, backend: Arc<CpuBackend>) -> Result<Self> {
        let range = range.unwrap_or(LayerRange::full(cfg.num_layers));
        if range.num_layers != cfg.num_layers {
            return Err(EngineError::InvalidRange { range: range.to_string(), layers: cfg.num_layers });
        }
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let q_rows = cfg.num_heads * cfg.head_dim;
        let kv_rows = cfg.num_kv_heads * cfg.head_dim;
        let mut tensor = 0u64;
        let mut next = |rows: usize, cols: usize| {
            tensor += 1;
            random_matrix(rows, cols, seed, tensor)
        };
        let embed = if range.is_entry() { Some(Arc::new(packed(next(cfg.vocab_size, h))?)) } else { None };
        let mut blocks = BlockPacker::new(range.len());
        for _ in range.layers() {
            let zeros = |n: usize| vec![0f32; n];
            blocks.push(Block {
                input_norm: vec![1.0; h],
                qkv: next(q_rows + 2 * kv_rows, h),
                qkv_bias: cfg.qkv_bias.then(|| zeros(q_rows + 2 * kv_rows)),
                o: next(h, q_rows),
                o_bias: cfg.o_bias.then(|| zeros(h)),
                post_norm: vec![1.0; h],
                gate_up: next(2 * ffn, h),
                down: next(h, ffn),
                gate_up_bias: cfg.mlp_bias.then(|| zeros(2 * ffn)),
                down_bias: cfg.mlp_bias.then(|| zeros(h)),
            })?;
        }
        let blocks = blocks.finish()?;
        let (norm, lm_head) = if range.is_exit() {
            let lm_head = match (&embed, cfg.tie_word_embeddings) {
                (Some(e), true) => Arc::clone(e),
                _ => Arc::new(packed(next(cfg.vocab_size, h))?),
            };
            (Some(vec![1.0; h]), Some(lm_head))
        } else {
            (None, None)
        };
        let inv_freq = cfg.rope_inv_freq();
        let head_rows = range.is_exit().then_some(0..cfg.vocab_size);
        Ok(Self { cfg, range, dtype: DType::Bf16, embed, blocks, norm, lm_head, head_rows, inv_freq, backend })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn backend(&self) -> &Arc<CpuBackend> {
        &self.backend
    }

    /// Bytes of weights this shard holds (a shared tied embedding counted once).
    pub fn weight_bytes(&self) -> usize {
        let mut total: usize = self.blocks.iter().map(Block::weight_bytes).sum();
        if let Some(e) = &self.embed {
            total += e.size_in_bytes();
        }
        if let Some(l) = &self.lm_head
            && !self.embed.as_ref().is_some_and(|e| Arc::ptr_eq(e, l))
        {
            total += l.size_in_bytes();
        }
        total
    }

    /// Whether every matrix of this shard lives in a packed region ([`weight_mem`]), as a loaded
    /// shard's do.
    pub fn weights_packed(&self) -> bool {
        let packed = |w: &Weight| w.data.is_packed();
        self.blocks.iter().all(|b| [&b.qkv, &b.o, &b.gate_up, &b.down].into_iter().all(packed))
            && self.embed.as_deref().is_none_or(packed)
            && self.lm_head.as_deref().is_none_or(packed)
    }

    /// Bytes of weights one decode step reads (the lm_head read in full even when it is the embedding).
    pub fn bytes_read_per_token(&self) -> usize {
        let mut total: usize = self.blocks.iter().map(Block::weight_bytes).sum();
        if let Some(l) = &self.lm_head {
            total += l.size_in_bytes();
        }
        total
    }

    /// A fresh KV cache for one request on this shard.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len(), self.cfg.num_kv_heads, self.cfg.head_dim, self.cfg.max_position_embeddings)
    }

    /// One request, one step. See [`Shard::forward_batch`].
    pub fn forward(&self, input: StepInput<'_>, cache: &mut KvCache) -> Result<StepOutput> {
        let mut items = [StepItem { input, cache }];
        let mut out = self.forward_batch(&mut items)?;
        Ok(out.pop().expect("one item in, one output out"))
    }

    /// Runs several requests' new positions through the shard as one batch: every weight is read once for
    /// all of them; each request attends only to its own cache. On error no cache is changed.
    pub fn forward_batch(&self, items: &mut [StepItem<'_>]) -> Result<Vec<StepOutput>> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        // Validate everything before touching any cache.
        validate_step(cfg, self.range, self.blocks.len(), items.iter().map(|it| (it.input, it.cache.len(), it.cache.n_layers())))?;

        // Gather inputs into one [rows, hidden] matrix.
        let rows_of: Vec<usize> = items.iter().map(|it| it.input.rows(h)).collect();
        let total: usize = rows_of.iter().sum();
        let mut x = vec![0f32; total * h];
        let mut offset = 0;
        for (item, &n) in items.iter().zip(&rows_of) {
            let dst = &mut x[offset * h..(offset + n) * h];
            match item.input {
                StepInput::Tokens(tokens) => {
                    let embed = self.embed.as_ref().expect("entry shards hold the embedding");
                    for (row, &t) in dst.chunks_exact_mut(h).zip(tokens) {
                        embed.row_f32(t as usize, row);
                    }
                }
                StepInput::Hidden(hidden) => dst.copy_from_slice(hidden),
            }
            offset += n;
        }
        // Rotary angles per row, computed once and shared by all layers (f32, as HF computes them).
        let positions: Vec<usize> = items
            .iter()
            .zip(&rows_of)
            .flat_map(|(it, &n)| it.cache.len()..it.cache.len() + n)
            .collect();
        let rope = RopeTable::new(&self.inv_freq, &positions);
        for (item, &n) in items.iter_mut().zip(&rows_of) {
            item.cache.reserve(n);
        }

        let mut scratch = StepScratch::new(cfg, total);
        for (li, block) in self.blocks.iter().enumerate() {
            self.block_forward(li, block, &mut x, items, &rows_of, &rope, &mut scratch);
        }
        for (item, &n) in items.iter_mut().zip(&rows_of) {
            item.cache.advance(n);
        }

        if !self.range.is_exit() {
            let mut out = Vec::with_capacity(items.len());
            let mut offset = 0;
            for &n in &rows_of {
                out.push(StepOutput::Hidden(x[offset * h..(offset + n) * h].to_vec()));
                offset += n;
            }
            return Ok(out);
        }
        // Exit: final norm and lm_head on each request's last position only.
        let norm = self.norm.as_ref().expect("exit shards hold the final norm");
        let lm_head = self.lm_head.as_ref().expect("exit shards hold lm_head");
        let mut last = Vec::with_capacity(items.len() * h);
        let mut offset = 0;
        for &n in &rows_of {
            last.extend_from_slice(&x[(offset + n - 1) * h..(offset + n) * h]);
            offset += n;
        }
        let mut normed = vec![0f32; last.len()];
        cpu::rms_norm(&last, norm, cfg.rms_norm_eps, &mut normed);
        if self.head_rows.as_ref().is_some_and(|rows| rows.len() < cfg.vocab_size) {
            // A split head: both sides compute their rows' logits from these.
            return Ok(normed.chunks_exact(h).map(|row| StepOutput::Normed(row.to_vec())).collect());
        }
        let mut logits = vec![0f32; items.len() * cfg.vocab_size];
        self.backend.matmul(&normed, items.len(), lm_head, &mut logits);
        Ok(logits.chunks_exact(cfg.vocab_size).map(|l| StepOutput::Logits(l.to_vec())).collect())
    }

    /// The vocabulary rows of lm_head this shard holds: all of them on an exit, its side's part of a split
    /// head ([`LoadOptions::split_head`]); `None` on a shard without lm_head.
    pub fn head_rows(&self) -> Option<std::ops::Range<usize>> {
        self.head_rows.clone()
    }

    /// The logits of this shard's lm_head rows ([`Shard::head_rows`]) for states `[n, hidden]` that have
    /// had the final norm (an exit's [`StepOutput::Normed`]): `[n, rows]`, each value bit for bit what
    /// the whole lm_head gives for that row.
    pub fn head_logits(&self, normed: &[f32]) -> Result<Vec<f32>> {
        let h = self.cfg.hidden_size;
        let (Some(lm_head), Some(rows)) = (&self.lm_head, &self.head_rows) else {
            return Err(EngineError::Invalid(format!("shard {} holds no rows of lm_head", self.range)));
        };
        if normed.is_empty() || normed.len() % h != 0 {
            return Err(EngineError::Invalid(format!("{} values are not whole states of hidden size {h}", normed.len())));
        }
        let n = normed.len() / h;
        let mut logits = vec![0f32; n * rows.len()];
        self.backend.matmul(normed, n, lm_head, &mut logits);
        Ok(logits)
    }

    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        li: usize,
        b: &Block,
        x: &mut [f32],
        items: &mut [StepItem<'_>],
        rows_of: &[usize],
        rope: &RopeTable,
        scratch: &mut StepScratch,
    ) {
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let total = x.len() / h;
        let q_dim = cfg.num_heads * hd;
        let kv_dim = cfg.num_kv_heads * hd;
        let qkv_dim = q_dim + 2 * kv_dim;
        let be = &self.backend;

        // Attention.
        let StepScratch { normed, qkv, q, k, v, attn, o, gate_up, act } = scratch;
        cpu::rms_norm(x, &b.input_norm, cfg.rms_norm_eps, normed);
        be.matmul(normed, total, &b.qkv, qkv);
        if let Some(bias) = &b.qkv_bias {
            add_bias(qkv, bias);
        }
        for r in 0..total {
            let row = &qkv[r * qkv_dim..(r + 1) * qkv_dim];
            q[r * q_dim..(r + 1) * q_dim].copy_from_slice(&row[..q_dim]);
            k[r * kv_dim..(r + 1) * kv_dim].copy_from_slice(&row[q_dim..q_dim + kv_dim]);
            v[r * kv_dim..(r + 1) * kv_dim].copy_from_slice(&row[q_dim + kv_dim..]);
        }
        rope.apply(q, cfg.num_heads, hd);
        rope.apply(k, cfg.num_kv_heads, hd);

        let shape = AttentionShape {
            n_heads: cfg.num_heads,
            n_kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            sliding_window: cfg.sliding_window,
        };
        let mut offset = 0;
        for (item, &n) in items.iter_mut().zip(rows_of) {
            let first_pos = item.cache.len();
            item.cache.write(li, &k[offset * kv_dim..(offset + n) * kv_dim], &v[offset * kv_dim..(offset + n) * kv_dim], n);
            let layer = item.cache.layer(li);
            let view = KvView { k: &layer.k, v: &layer.v, capacity: item.cache.capacity(), len: first_pos + n };
            be.attention(&q[offset * q_dim..(offset + n) * q_dim], n, first_pos, view, shape, &mut attn[offset * q_dim..(offset + n) * q_dim]);
            offset += n;
        }
        be.matmul(attn, total, &b.o, o);
        if let Some(bias) = &b.o_bias {
            add_bias(o, bias);
        }
        for (xi, oi) in x.iter_mut().zip(o.iter()) {
            *xi += oi;
        }

        // MLP.
        cpu::rms_norm(x, &b.post_norm, cfg.rms_norm_eps, normed);
        let ffn = cfg.intermediate_size;
        be.matmul(normed, total, &b.gate_up, gate_up);
        if let Some(bias) = &b.gate_up_bias {
            add_bias(gate_up, bias);
        }
        for r in 0..total {
            let row = &gate_up[r * 2 * ffn..(r + 1) * 2 * ffn];
            let a = &mut act[r * ffn..(r + 1) * ffn];
            a.copy_from_slice(&row[..ffn]);
            cpu::silu_mul(a, &row[ffn..]);
        }
        be.matmul(act, total, &b.down, o);
        if let Some(bias) = &b.down_bias {
            add_bias(o, bias);
        }
        for (xi, oi) in x.iter_mut().zip(o.iter()) {
            *xi += oi;
        }
    }
}

/// Checks a step before any cache is touched: the right kind of input for this shard, token ids inside
/// the vocabulary, whole rows of hidden states, at least one row, a cache of this shard, and room in the
/// context window. `items` yields each request's input, cache length and cache layer count. Shared by
/// every backend, so CPU and CUDA shards refuse exactly the same steps.
pub(crate) fn validate_step<'a>(
    cfg: &ModelConfig,
    range: LayerRange,
    n_layers: usize,
    items: impl Iterator<Item = (StepInput<'a>, usize, usize)>,
) -> Result<()> {
    let h = cfg.hidden_size;
    for (input, cache_len, cache_layers) in items {
        let n = input.rows(h);
        match input {
            StepInput::Tokens(tokens) => {
                if !range.is_entry() {
                    return Err(EngineError::Invalid(format!("shard {range} is not the entry: it takes hidden states, not tokens")));
                }
                if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= cfg.vocab_size) {
                    return Err(EngineError::Invalid(format!("token id {bad} is outside the vocabulary of {}", cfg.vocab_size)));
                }
            }
            StepInput::Hidden(hidden) => {
                if range.is_entry() {
                    return Err(EngineError::Invalid(format!("shard {range} is the entry: it takes tokens, not hidden states")));
                }
                if hidden.len() % h != 0 {
                    return Err(EngineError::Invalid(format!("hidden states of {} values are not rows of {h}", hidden.len())));
                }
            }
        }
        if n == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        if cache_layers != n_layers {
            return Err(EngineError::Invalid("KV cache belongs to a different shard".into()));
        }
        if cache_len + n > cfg.max_position_embeddings {
            return Err(EngineError::ContextOverflow {
                prompt_tokens: cache_len + n,
                max_new_tokens: 0,
                context: cfg.max_position_embeddings,
            });
        }
    }
    Ok(())
}

/// Activation buffers of one step, allocated once and reused by every layer.
struct StepScratch {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

impl StepScratch {
    fn new(cfg: &ModelConfig, rows: usize) -> Self {
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        let buf = |width: usize| vec![0f32; rows * width];
        Self {
            normed: buf(cfg.hidden_size),
            qkv: buf(q_dim + 2 * kv_dim),
            q: buf(q_dim),
            k: buf(kv_dim),
            v: buf(kv_dim),
            attn: buf(q_dim),
            o: buf(cfg.hidden_size),
            gate_up: buf(2 * cfg.intermediate_size),
            act: buf(cfg.intermediate_size),
        }
    }
}

/// A `[rows, cols]` bf16 matrix of uniform values in ±0.02·√3 from a counter-based generator
/// (splitmix64 of seed, tensor and index), so chunks fill in parallel and the result does not depend on
/// the thread count.
fn random_matrix(rows: usize, cols: usize, seed: u64, tensor: u64) -> Weight {
    fn splitmix64(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let bound = 0.02f32 * 3f32.sqrt();
    let key = splitmix64(seed ^ tensor.rotate_left(40));
    let mut data = vec![half::bf16::ZERO; rows * cols];
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let chunk = data.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|scope| {
        for (c, part) in data.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                let first = (c * chunk) as u64;
                for (i, v) in part.iter_mut().enumerate() {
                    let bits = splitmix64(key ^ (first + i as u64));
                    // 24 random bits to [0, 1), then to [-bound, bound).
                    let u = (bits >> 40) as f32 * (1.0 / (1u64 << 24) as f32);
                    *v = half::bf16::from_f32((2.0 * u - 1.0) * bound);
                }
            });
        }
    });
    Weight { rows, cols, data: WeightData::Bf16(data.into()) }
}

fn add_bias(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (r, b) in row.iter_mut().zip(bias) {
            *r += b;
        }
    }
}

/// cos/sin of every (row, frequency) pair of one step. HF's rotate-half convention: element `i` pairs with
/// `i + head_dim/2`. Angles are `position · inv_freq` in f32, as HF computes them.
struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    fn new(inv_freq: &[f32], positions: &[usize]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates `x`, laid out `[rows, heads, head_dim]`, in place.
    fn apply(&self, x: &mut [f32], heads: usize, head_dim: usize) {
        let half = self.half;
        debug_assert_eq!(head_dim, 2 * half);
        for (r, row) in x.chunks_exact_mut(heads * head_dim).enumerate() {
            let cos = &self.cos[r * half..(r + 1) * half];
            let sin = &self.sin[r * half..(r + 1) * half];
            for head in row.chunks_exact_mut(head_dim) {
                let (a, b) = head.split_at_mut(half);
                for i in 0..half {
                    let (x1, x2) = (a[i], b[i]);
                    a[i] = x1 * cos[i] - x2 * sin[i];
                    b[i] = x2 * cos[i] + x1 * sin[i];
                }
            }
        }
    }
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers {elapsed}")
            .expect("static progress template is valid"),
    );
    bar
}
