//! A layer range of a model on the GPU: weights in bf16 or kept in ggml's quantized blocks (a GGUF's
//! Q4_0, Q4_1, Q5_0, Q8_0, Q4_K and Q6_K matrices), KV caches and activations on the device.
//!
//! A step runs the same math as the CPU shard ([`crate::model::Shard`]) in the same order: embedding
//! (entry), per layer RMSNorm → fused qkv product (+ bias) → RoPE on q and k → cache append → attention
//! → o product added into the residual → RMSNorm → fused gate/up product → SiLU·up → down product added
//! into the residual; then (exit) the final norm and lm_head on each request's last row.
//!
//! Products of up to [`EXACT_MAX_ROWS`] rows (decode, short prompts) run in `matvec_bf16` with f32
//! activations, [`MATVEC_MAX_ROWS`] rows per launch, so every row is the same f32 dot product whatever
//! the batch; larger ones (prefill) round activations to bf16 and run in cuBLAS with f32 accumulation.
//! The CPU backend draws the same line at the same row count ([`CpuBackend::BF16_EXACT_MAX_ROWS`]), so
//! both backends are exact, or both round, for a given step. Quantized matrices take `matvec_<kind>`
//! (the blocks dequantized in registers, f32 activations) up to the same row count, and above it are
//! widened to bf16 into one scratch matrix per product for cuBLAS; the embedding table is always held in
//! bf16 (the embedding kernel reads bf16 rows). A decode step (every request one new row, at
//! most `EXACT_MAX_ROWS` requests) is captured once per batch size into a CUDA graph and replayed:
//! everything a step changes (token ids, hidden rows, cache pointers and positions) lives in fixed device
//! buffers that are filled before the replay.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys as blas;
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::{CudaDevice, driver_err};
use crate::backend::cpu::CpuBackend;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::llama::validate_step;
use crate::model::{LoadOptions, Shard, StepInput, StepOutput};
use crate::shard::LayerRange;
use crate::tensor::{DType, QuantKind, Weight, WeightData};

/// The most rows one launch of the mat-vec kernel multiplies (its largest template instance).
pub const MATVEC_MAX_ROWS: usize = 8;
/// The most rows a product takes through the mat-vec kernel with f32 activations (in launches of
/// [`MATVEC_MAX_ROWS`]); also the largest decode batch a graph holds. Equal to the CPU backend's
/// [`CpuBackend::BF16_EXACT_MAX_ROWS`].
pub const EXACT_MAX_ROWS: usize = CpuBackend::BF16_EXACT_MAX_ROWS;
/// The most requests one step may carry (the exit's logits buffers are sized for it).
pub const MAX_REQUESTS_PER_STEP: usize = 64;

const WARPS_PER_MATVEC_BLOCK: usize = 8;

/// One request's part of a step on a CUDA shard.
#[derive(Debug)]
pub struct CudaStepItem<'a> {
    pub input: StepInput<'a>,
    pub cache: &'a mut CudaKvCache,
}

/// One request's keys and values on one CUDA shard, in device memory: a single allocation laid out
/// `[layer][k | v][kv_head][capacity][head_dim]` in f32 (as the CPU cache, so both compute the same
/// attention). Grows by doubling; freed when dropped.
pub struct CudaKvCache {
    buf: Option<CudaSlice<f32>>,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
    max_len: usize,
}

impl std::fmt::Debug for CudaKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache").field("len", &self.len).field("capacity", &self.capacity).finish_non_exhaustive()
    }
}

impl CudaKvCache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// Device bytes held (capacity, not length).
    pub fn size_in_bytes(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.capacity * self.head_dim * 4
    }

    /// Forgets every position from `len` on.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Forgets everything, keeping the allocation.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    fn base(&self, dev: &CudaDevice) -> u64 {
        self.buf.as_ref().map(|b| ptr(b, dev)).unwrap_or(0)
    }

    fn reserve(&mut self, dev: &CudaDevice, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = needed.max(self.capacity * 2).max(256).min(self.max_len.max(needed));
        let (hd, heads) = (self.head_dim, self.n_kv_heads);
        let mut grown = dev
            .stream
            .alloc_zeros::<f32>(self.n_layers * 2 * heads * new_cap * hd)
            .map_err(driver_err("allocating a KV cache"))?;
        if let Some(old) = &self.buf
            && self.len > 0
        {
            for plane in 0..self.n_layers * 2 * heads {
                let src = plane * self.capacity * hd;
                let dst = plane * new_cap * hd;
                dev.stream
                    .memcpy_dtod(&old.slice(src..src + self.len * hd), &mut grown.slice_mut(dst..dst + self.len * hd))
                    .map_err(driver_err("growing a KV cache"))?;
            }
        }
        self.buf = Some(grown);
        self.capacity = new_cap;
        Ok(())
    }
}

/// A matrix on the device, `[rows, cols]` row-major.
struct DevMatrix {
    data: DevWeights,
    rows: usize,
    cols: usize,
}

enum DevWeights {
    Bf16(CudaSlice<u16>),
    /// Rows of ggml blocks of `kind`, as [`WeightData::Quant`] holds them on the host.
    Quant { kind: QuantKind, blocks: CudaSlice<u8> },
}

impl DevMatrix {
    /// The bf16 data, for kernels that read only bf16 (the embedding, the fused SwiGLU mat-vec).
    fn bf16(&self) -> Option<&CudaSlice<u16>> {
        match &self.data {
            DevWeights::Bf16(d) => Some(d),
            DevWeights::Quant { .. } => None,
        }
    }
}

struct DevBlock {
    input_norm: CudaSlice<f32>,
    qkv: DevMatrix,
    qkv_bias: Option<CudaSlice<f32>>,
    o: DevMatrix,
    o_bias: Option<CudaSlice<f32>>,
    post_norm: CudaSlice<f32>,
    gate_up: DevMatrix,
    gate_up_bias: Option<CudaSlice<f32>>,
    down: DevMatrix,
    down_bias: Option<CudaSlice<f32>>,
}

/// Activation buffers for steps of up to `rows` rows and `heads` requests.
struct Scratch {
    rows: usize,
    heads: usize,
    x: CudaSlice<f32>,
    normed: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    gate_up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    /// Activations rounded to bf16 for cuBLAS, `[rows, max(hidden, q_dim, ffn)]`.
    xb: CudaSlice<u16>,
    tokens: CudaSlice<u32>,
    /// Row descriptors (`RowDesc` in kernels/prelude.cuh): cache pointer, then capacity | position << 32.
    descs: CudaSlice<u64>,
    last: CudaSlice<f32>,
    last_normed: CudaSlice<f32>,
    logits: CudaSlice<f32>,
    ids: CudaSlice<u32>,
}

/// A captured decode step. The graph's kernels read only the fixed buffers of the small scratch.
struct Graph(CudaGraph);
// SAFETY: the graph is launched only while holding the shard's state lock, on the shard's stream; CUDA
// graph handles may be used from any thread of the process.
unsafe impl Send for Graph {}

struct State {
    small: Scratch,
    big: Option<Scratch>,
    /// Decode graphs by batch size; `None` records that capture failed (the step then runs eagerly).
    graphs: HashMap<usize, Option<Graph>>,
}

/// What a step hands back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Outputs,
    Greedy,
}

/// A loaded layer range of one model on a GPU.
pub struct CudaShard {
    dev: Arc<CudaDevice>,
    cfg: ModelConfig,
    range: LayerRange,
    embed: Option<Arc<DevMatrix>>,
    blocks: Vec<DevBlock>,
    norm: Option<CudaSlice<f32>>,
    lm_head: Option<Arc<DevMatrix>>,
    inv_freq: CudaSlice<f32>,
    /// bf16 scratch for prefill products of quantized matrices (`None` when no matrix is quantized).
    widened: Option<CudaSlice<u16>>,
    weight_bytes: usize,
    bytes_read_per_token: usize,
    state: Mutex<State>,
    use_graphs: bool,
}

impl std::fmt::Debug for CudaShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaShard").field("range", &self.range).field("device", &self.dev.name()).finish_non_exhaustive()
    }
}

/// Whether a decode step can be captured: every product on the mat-vec path (rows of whole 16-byte
/// chunks), since cuBLAS calls are not captured.
fn graphs_possible(cfg: &ModelConfig) -> bool {
    [cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.intermediate_size].iter().all(|k| k % 8 == 0)
}

fn ptr<T>(s: &CudaSlice<T>, dev: &CudaDevice) -> u64 {
    let (p, _sync) = s.device_ptr(&dev.stream);
    p
}

fn grid1(n: usize, block: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(block) as u32, 1, 1), block_dim: (block as u32, 1, 1), shared_mem_bytes: 0 }
}

fn per_row(rows: usize, block: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block as u32, 1, 1), shared_mem_bytes: 0 }
}

impl CudaShard {
    /// Loads a layer range from an HF-layout directory straight onto `dev` (weights pass through host
    /// memory once, in bf16).
    pub fn load(dir: &Path, options: &LoadOptions, dev: Arc<CudaDevice>) -> Result<Self> {
        if options.dtype != DType::Bf16 {
            return Err(EngineError::Invalid(format!(
                "the CUDA backend holds weights in bf16, not {}; load with --dtype bf16",
                options.dtype
            )));
        }
        let host = Shard::load(dir, options, Arc::new(CpuBackend::new(1)))?;
        Self::from_shard(&host, dev)
    }

    /// Uploads a loaded CPU shard's weights (bf16) to `dev`.
    pub fn from_shard(host: &Shard, dev: Arc<CudaDevice>) -> Result<Self> {
        let cfg = host.config().clone();
        // Quantized matrices stay quantized (`widen` false) except the embedding table.
        let upload = |w: &Weight, widen: bool| -> Result<DevMatrix> {
            let data = match &w.data {
                WeightData::Bf16(d) => dev.stream.clone_htod(bytemuck::cast_slice::<_, u16>(&d[..])).map(DevWeights::Bf16),
                // The CPU loader interleaves Q4_0/Q4_1/Q8_0 rows for its own kernels; the device kernels
                // read ggml's row layout.
                WeightData::Quant { .. } | WeightData::QuantInterleaved { .. } if !widen => {
                    let (kind, blocks) = w.quant_rows().expect("a quantized weight");
                    dev.stream.clone_htod(&blocks[..]).map(|blocks| DevWeights::Quant { kind, blocks })
                }
                WeightData::Quant { .. } | WeightData::QuantInterleaved { .. } => {
                    let widened: Vec<u16> = w.to_f32().into_iter().map(|v| half::bf16::from_f32(v).to_bits()).collect();
                    dev.stream.clone_htod(&widened).map(DevWeights::Bf16)
                }
                WeightData::F32(_) => {
                    return Err(EngineError::Invalid(
                        "the CUDA backend holds weights in bf16; load the shard with dtype bf16".into(),
                    ));
                }
            }
            .map_err(driver_err("uploading weights"))?;
            Ok(DevMatrix { data, rows: w.rows, cols: w.cols })
        };
        let upload_matrix = |w: &Weight| upload(w, false);
        let upload_vec = |v: &[f32]| dev.stream.clone_htod(v).map_err(driver_err("uploading weights"));
        let upload_opt = |v: &Option<Vec<f32>>| v.as_deref().map(upload_vec).transpose();

        let embed = host.embed.as_deref().map(|w| upload(w, true)).transpose()?.map(Arc::new);
        let mut blocks = Vec::with_capacity(host.blocks.len());
        for b in &host.blocks {
            blocks.push(DevBlock {
                input_norm: upload_vec(&b.input_norm)?,
                qkv: upload_matrix(&b.qkv)?,
                qkv_bias: upload_opt(&b.qkv_bias)?,
                o: upload_matrix(&b.o)?,
                o_bias: upload_opt(&b.o_bias)?,
                post_norm: upload_vec(&b.post_norm)?,
                gate_up: upload_matrix(&b.gate_up)?,
                gate_up_bias: upload_opt(&b.gate_up_bias)?,
                down: upload_matrix(&b.down)?,
                down_bias: upload_opt(&b.down_bias)?,
            });
        }
        let norm = host.norm.as_deref().map(upload_vec).transpose()?;
        let lm_head = match (&host.lm_head, &host.embed, &embed) {
            (Some(l), Some(e), Some(de)) if Arc::ptr_eq(l, e) => Some(Arc::clone(de)),
            (Some(l), _, _) => Some(Arc::new(upload_matrix(l)?)),
            (None, _, _) => None,
        };
        let inv_freq = upload_vec(&host.inv_freq)?;
        // Prefill products of quantized matrices widen them here first: room for the largest.
        let widest = blocks
            .iter()
            .flat_map(|b| [&b.qkv, &b.o, &b.gate_up, &b.down])
            .chain(lm_head.as_deref())
            .filter(|m| m.bf16().is_none())
            .map(|m| m.rows * m.cols)
            .max();
        let widened = widest
            .map(|n| dev.stream.alloc_zeros::<u16>(n).map_err(driver_err("allocating the dequantization scratch")))
            .transpose()?;
        let small = Scratch::new(&dev, &cfg, EXACT_MAX_ROWS, EXACT_MAX_ROWS, host.range().is_exit())?;
        let use_graphs = graphs_possible(&cfg) && std::env::var_os("COMPUTEPOOL_CUDA_NO_GRAPHS").is_none();
        Ok(Self {
            range: host.range(),
            weight_bytes: host.weight_bytes(),
            bytes_read_per_token: host.bytes_read_per_token(),
            state: Mutex::new(State { small, big: None, graphs: HashMap::new() }),
            dev,
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
            widened,
            use_graphs,
        })
    }

    /// Turns decode graphs on or off (on by default where every product can use the mat-vec kernel;
    /// `COMPUTEPOOL_CUDA_NO_GRAPHS` in the environment turns them off at load). Off, every step launches
    /// its kernels one by one — the baseline that shows what graphs save.
    pub fn with_graphs(mut self, on: bool) -> Self {
        self.use_graphs = on && graphs_possible(&self.cfg);
        self.state.get_mut().unwrap_or_else(|p| p.into_inner()).graphs.clear();
        self
    }

    pub fn graphs_enabled(&self) -> bool {
        self.use_graphs
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn range(&self) -> LayerRange {
        self.range
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Bytes of weights this shard holds on the device (a shared tied embedding counted once).
    pub fn weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    /// Bytes of weights one decode step reads.
    pub fn bytes_read_per_token(&self) -> usize {
        self.bytes_read_per_token
    }

    /// A fresh, empty KV cache for one request (device memory is taken on the first step).
    pub fn new_cache(&self) -> CudaKvCache {
        CudaKvCache {
            buf: None,
            n_layers: self.blocks.len(),
            n_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            len: 0,
            capacity: 0,
            max_len: self.cfg.max_position_embeddings,
        }
    }

    /// One request, one step.
    pub fn forward(&self, input: StepInput<'_>, cache: &mut CudaKvCache) -> Result<StepOutput> {
        let mut items = [CudaStepItem { input, cache }];
        let mut out = self.forward_batch(&mut items)?;
        Ok(out.pop().expect("one item in, one output out"))
    }

    /// Several requests' new positions as one step, as [`Shard::forward_batch`]: hidden rows out of a
    /// middle or entry shard, each request's last-position logits out of the exit. On error no cache
    /// advances.
    pub fn forward_batch(&self, items: &mut [CudaStepItem<'_>]) -> Result<Vec<StepOutput>> {
        match self.step(items, Want::Outputs)? {
            StepResult::Outputs(o) => Ok(o),
            StepResult::Ids(_) => unreachable!("outputs were asked for"),
        }
    }

    /// An exit shard's step that picks each request's next token by argmax on the device and copies back
    /// only the ids (greedy decoding without moving the logits).
    pub fn forward_greedy(&self, items: &mut [CudaStepItem<'_>]) -> Result<Vec<u32>> {
        if !self.range.is_exit() {
            return Err(EngineError::Invalid(format!("shard {} is not the exit: it has no logits to pick from", self.range)));
        }
        match self.step(items, Want::Greedy)? {
            StepResult::Ids(ids) => Ok(ids),
            StepResult::Outputs(_) => unreachable!("ids were asked for"),
        }
    }

    /// The `k` best logits of each row of `logits` (`[rows, vocab]`, host), best first, computed on the
    /// device: the same selection as sorting by (value descending, index ascending).
    pub fn top_k(&self, logits: &[f32], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let vocab = self.cfg.vocab_size;
        if logits.is_empty() || logits.len() % vocab != 0 || k == 0 || k > vocab {
            return Err(EngineError::Invalid(format!("top_k: {} logits, vocab {vocab}, k {k}", logits.len())));
        }
        let rows = logits.len() / vocab;
        let dev = &self.dev;
        let s = &dev.stream;
        let d_logits = s.clone_htod(logits).map_err(driver_err("top_k upload"))?;
        let values = s.alloc_zeros::<f32>(rows * k).map_err(driver_err("top_k alloc"))?;
        let ids = s.alloc_zeros::<u32>(rows * k).map_err(driver_err("top_k alloc"))?;
        let (l, v, i) = (ptr(&d_logits, dev), ptr(&values, dev), ptr(&ids, dev));
        let (vocab_i, k_i) = (vocab as i32, k as i32);
        let mut b = s.launch_builder(&dev.k.topk);
        b.arg(&l).arg(&vocab_i).arg(&k_i).arg(&v).arg(&i);
        // SAFETY: argument types match topk_f32's signature; buffers hold rows × vocab and rows × k.
        unsafe { b.launch(per_row(rows, 1024)) }.map_err(driver_err("topk_f32"))?;
        let hv = s.clone_dtoh(&values).map_err(driver_err("top_k download"))?;
        let hi = s.clone_dtoh(&ids).map_err(driver_err("top_k download"))?;
        Ok((0..rows).map(|r| (0..k).map(|j| (hi[r * k + j], hv[r * k + j])).collect()).collect())
    }

    fn step(&self, items: &mut [CudaStepItem<'_>], want: Want) -> Result<StepResult> {
        let cfg = &self.cfg;
        let h = cfg.hidden_size;
        validate_step(cfg, self.range, self.blocks.len(), items.iter().map(|it| (it.input, it.cache.len(), it.cache.n_layers())))?;
        if items.is_empty() {
            return Ok(StepResult::Outputs(Vec::new()));
        }
        if items.len() > MAX_REQUESTS_PER_STEP {
            return Err(EngineError::Invalid(format!(
                "{} requests in one step; a CUDA shard takes at most {MAX_REQUESTS_PER_STEP}",
                items.len()
            )));
        }
        let dev = &*self.dev;
        let rows_of: Vec<usize> = items.iter().map(|it| it.input.rows(h)).collect();
        let total: usize = rows_of.iter().sum();
        for (item, &n) in items.iter_mut().zip(&rows_of) {
            item.cache.reserve(dev, n)?;
        }

        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let decode_shaped = rows_of.iter().all(|&n| n == 1) && total <= EXACT_MAX_ROWS;
        if total > state.small.rows && state.big.as_ref().is_none_or(|b| b.rows < total) {
            // Free the old one first: a big prefill scratch can be hundreds of MB.
            state.big = None;
            let heads = MAX_REQUESTS_PER_STEP.min(total);
            state.big = Some(Scratch::new(dev, cfg, total.next_power_of_two(), heads, self.range.is_exit())?);
        }

        // Inputs and row descriptors into the scratch's fixed buffers.
        let mut descs = Vec::with_capacity(total * 2);
        for item in items.iter() {
            let base = item.cache.base(dev);
            let cap = item.cache.capacity as u64;
            for i in 0..item.input.rows(h) {
                descs.push(base);
                descs.push(cap | (((item.cache.len() + i) as u64) << 32));
            }
        }
        {
            let State { small, big, .. } = &mut *state;
            let s = if total <= small.rows { small } else { big.as_mut().expect("allocated above") };
            dev.stream.memcpy_htod(&descs, &mut s.descs.slice_mut(0..descs.len())).map_err(driver_err("uploading rows"))?;
            let mut offset = 0;
            for (item, &n) in items.iter().zip(&rows_of) {
                match item.input {
                    StepInput::Tokens(t) => dev
                        .stream
                        .memcpy_htod(t, &mut s.tokens.slice_mut(offset..offset + n))
                        .map_err(driver_err("uploading tokens"))?,
                    StepInput::Hidden(x) => dev
                        .stream
                        .memcpy_htod(x, &mut s.x.slice_mut(offset * h..(offset + n) * h))
                        .map_err(driver_err("uploading hidden states"))?,
                }
                offset += n;
            }
        }

        let s_is_small = total <= state.small.rows;
        if decode_shaped && self.use_graphs {
            let st = &mut *state;
            let entry = st.graphs.entry(total);
            let graph = match entry {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => v.insert(self.capture(&st.small, total)),
            };
            match graph {
                Some(g) => g.0.launch().map_err(driver_err("replaying the decode graph"))?,
                None => self.record(&st.small, total, None)?,
            }
        } else {
            let s = if s_is_small { &state.small } else { state.big.as_ref().expect("allocated above") };
            // Exit rows to take to the head: each request's last row (decode-shaped steps take x as is).
            let gather = if self.range.is_exit() && !decode_shaped { Some(rows_of.as_slice()) } else { None };
            self.record(s, total, gather)?;
        }

        let s = if s_is_small { &state.small } else { state.big.as_ref().expect("allocated above") };
        debug_assert!(items.len() <= s.heads, "a step's requests fit its scratch's head rows");
        let result = if !self.range.is_exit() {
            let mut host = vec![0f32; total * h];
            dev.stream.memcpy_dtoh(&s.x.slice(0..total * h), &mut host).map_err(driver_err("downloading hidden states"))?;
            dev.synchronize()?;
            let mut out = Vec::with_capacity(items.len());
            let mut offset = 0;
            for &n in &rows_of {
                out.push(StepOutput::Hidden(host[offset * h..(offset + n) * h].to_vec()));
                offset += n;
            }
            StepResult::Outputs(out)
        } else if want == Want::Greedy {
            let mut ids = vec![0u32; items.len()];
            dev.stream.memcpy_dtoh(&s.ids.slice(0..items.len()), &mut ids).map_err(driver_err("downloading ids"))?;
            dev.synchronize()?;
            StepResult::Ids(ids)
        } else {
            let v = cfg.vocab_size;
            let mut host = vec![0f32; items.len() * v];
            dev.stream.memcpy_dtoh(&s.logits.slice(0..items.len() * v), &mut host).map_err(driver_err("downloading logits"))?;
            dev.synchronize()?;
            StepResult::Outputs(host.chunks_exact(v).map(|l| StepOutput::Logits(l.to_vec())).collect())
        };
        drop(state);
        for (item, &n) in items.iter_mut().zip(&rows_of) {
            item.cache.len += n;
        }
        Ok(result)
    }

    /// Captures a decode step of `rows` one-row requests into a graph; `None` if capture fails (logged).
    fn capture(&self, s: &Scratch, rows: usize) -> Option<Graph> {
        let stream = &self.dev.stream;
        let begin = stream.begin_capture(cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);
        if let Err(e) = begin {
            tracing::warn!("CUDA graph capture unavailable, decode runs eagerly: {e:?}");
            return None;
        }
        let recorded = self.record(s, rows, None);
        let ended = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        match (recorded, ended) {
            (Ok(()), Ok(Some(g))) => Some(Graph(g)),
            (r, e) => {
                tracing::warn!("CUDA graph capture of a {rows}-row decode step failed, it runs eagerly: {r:?} {:?}", e.err());
                None
            }
        }
    }

    /// Queues one step's kernels for `rows` rows whose inputs and descriptors are already in `s`.
    /// `gather` (exit, not decode-shaped): the rows per request, whose last rows go to the head.
    fn record(&self, s: &Scratch, rows: usize, gather: Option<&[usize]>) -> Result<()> {
        let cfg = &self.cfg;
        let dev = &*self.dev;
        let st = &dev.stream;
        let k = &dev.k;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let q_dim = nh * hd;
        let qkv_dim = q_dim + 2 * nkv * hd;
        let ffn = cfg.intermediate_size;
        let (x, normed, qkv, attn, gate_up, act) =
            (ptr(&s.x, dev), ptr(&s.normed, dev), ptr(&s.qkv, dev), ptr(&s.attn, dev), ptr(&s.gate_up, dev), ptr(&s.act, dev));
        let descs = ptr(&s.descs, dev);
        let h_i = h as i32;

        if let Some(embed) = &self.embed {
            let table = ptr(embed.bf16().expect("the embedding table is uploaded in bf16"), dev);
            let tokens = ptr(&s.tokens, dev);
            let mut b = st.launch_builder(&k.embedding);
            b.arg(&table).arg(&tokens).arg(&x).arg(&h_i);
            // SAFETY: embedding_bf16(table, tokens, out, hidden); ids were validated < vocab.
            unsafe { b.launch(per_row(rows, 256)) }.map_err(driver_err("embedding_bf16"))?;
        }

        let (nh_i, nkv_i, hd_i, qkv_i) = (nh as i32, nkv as i32, hd as i32, qkv_dim as i32);
        let window = cfg.sliding_window.map(|w| w.max(1) as i32).unwrap_or(0);
        let scale = 1.0 / (hd as f32).sqrt();
        let inv_freq = ptr(&self.inv_freq, dev);
        for (li, b) in self.blocks.iter().enumerate() {
            let layer = li as i32;
            self.matmul(s, x, rows, &b.qkv, qkv, false, Some(Norm { weight: &b.input_norm, scratch: normed }))?;
            if let Some(bias) = &b.qkv_bias {
                self.add_bias(qkv, bias, rows, qkv_dim)?;
            }
            let mut l = st.launch_builder(&k.rope_kv_append);
            l.arg(&qkv).arg(&descs).arg(&inv_freq).arg(&layer).arg(&nh_i).arg(&nkv_i).arg(&hd_i).arg(&qkv_i);
            // SAFETY: rope_kv_append_f32 over the q and k heads; every row's position is below its
            // cache's capacity (reserved before the step).
            unsafe { l.launch(per_row(rows, 256)) }.map_err(driver_err("rope_kv_append_f32"))?;
            let mut l = st.launch_builder(&k.attention);
            l.arg(&qkv).arg(&descs).arg(&attn).arg(&layer).arg(&nh_i).arg(&nkv_i).arg(&hd_i).arg(&qkv_i).arg(&window).arg(&scale);
            let cfg_att = LaunchConfig { grid_dim: (rows as u32, nh as u32, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: attention_f32 with head_dim <= 256 (checked at load).
            unsafe { l.launch(cfg_att) }.map_err(driver_err("attention_f32"))?;
            self.matmul(s, attn, rows, &b.o, x, true, None)?;
            if let Some(bias) = &b.o_bias {
                self.add_bias(x, bias, rows, h)?;
            }

            if b.gate_up_bias.is_none() && rows <= EXACT_MAX_ROWS && h % 8 == 0 && b.gate_up.bf16().is_some() {
                self.swiglu(x, rows, &b.gate_up, act, &b.post_norm)?;
            } else {
                self.rms_norm(x, &b.post_norm, normed, rows)?;
                self.matmul(s, normed, rows, &b.gate_up, gate_up, false, None)?;
                if let Some(bias) = &b.gate_up_bias {
                    self.add_bias(gate_up, bias, rows, 2 * ffn)?;
                }
                let (rows_i, ffn_i) = (rows as i32, ffn as i32);
                let mut l = st.launch_builder(&k.silu_mul);
                l.arg(&gate_up).arg(&act).arg(&rows_i).arg(&ffn_i);
                // SAFETY: silu_mul_f32(gate_up [rows, 2 ffn], out [rows, ffn], rows, ffn).
                unsafe { l.launch(grid1(rows * ffn, 256)) }.map_err(driver_err("silu_mul_f32"))?;
            }
            self.matmul(s, act, rows, &b.down, x, true, None)?;
            if let Some(bias) = &b.down_bias {
                self.add_bias(x, bias, rows, h)?;
            }
        }

        if !self.range.is_exit() {
            return Ok(());
        }
        let norm = self.norm.as_ref().expect("exit shards hold the final norm");
        let lm_head = self.lm_head.as_ref().expect("exit shards hold lm_head");
        let (head_in, head_rows) = match gather {
            None => (x, rows),
            Some(rows_of) => {
                let last = ptr(&s.last, dev);
                let row_bytes = h * std::mem::size_of::<f32>();
                let mut offset = 0;
                for (i, &n) in rows_of.iter().enumerate() {
                    let src = x + ((offset + n - 1) * row_bytes) as u64;
                    // SAFETY: both ranges lie inside their buffers (x holds `rows` rows, last `heads` rows).
                    unsafe { cudarc::driver::result::memcpy_dtod_async(last + (i * row_bytes) as u64, src, row_bytes, st.cu_stream()) }
                        .map_err(driver_err("gathering last rows"))?;
                    offset += n;
                }
                (last, rows_of.len())
            }
        };
        let last_normed = ptr(&s.last_normed, dev);
        let logits = ptr(&s.logits, dev);
        self.matmul(s, head_in, head_rows, lm_head, logits, false, Some(Norm { weight: norm, scratch: last_normed }))?;
        let (ids, vocab) = (ptr(&s.ids, dev), cfg.vocab_size as i32);
        let mut l = st.launch_builder(&k.argmax);
        l.arg(&logits).arg(&vocab).arg(&ids);
        // SAFETY: argmax_f32(logits [rows, vocab], vocab, ids [rows]).
        unsafe { l.launch(per_row(head_rows, 1024)) }.map_err(driver_err("argmax_f32"))?;
        Ok(())
    }

    fn rms_norm(&self, x: u64, weight: &CudaSlice<f32>, out: u64, rows: usize) -> Result<()> {
        let dev = &*self.dev;
        let block = 256.min(self.cfg.hidden_size.next_multiple_of(32)).max(32);
        let (w, h, eps) = (ptr(weight, dev), self.cfg.hidden_size as i32, self.cfg.rms_norm_eps);
        let mut l = dev.stream.launch_builder(&dev.k.rms_norm);
        l.arg(&x).arg(&w).arg(&out).arg(&h).arg(&eps);
        // SAFETY: rms_norm_f32(x [rows, h], weight [h], out [rows, h], h, eps).
        unsafe { l.launch(per_row(rows, block)) }.map_err(driver_err("rms_norm_f32"))?;
        Ok(())
    }

    fn add_bias(&self, y: u64, bias: &CudaSlice<f32>, rows: usize, cols: usize) -> Result<()> {
        let dev = &*self.dev;
        let (b, rows_i, cols_i) = (ptr(bias, dev), rows as i32, cols as i32);
        let mut l = dev.stream.launch_builder(&dev.k.add_bias);
        l.arg(&y).arg(&b).arg(&rows_i).arg(&cols_i);
        // SAFETY: add_bias_f32(y [rows, cols], bias [cols], rows, cols).
        unsafe { l.launch(grid1(rows * cols, 256)) }.map_err(driver_err("add_bias_f32"))?;
        Ok(())
    }

    /// act[rows, ffn] = silu(x · gateᵀ) · (x · upᵀ) with `gate_up` the stacked [2 ffn, hidden] matrix, in
    /// launches of [`MATVEC_MAX_ROWS`] rows (rows <= [`EXACT_MAX_ROWS`], hidden % 8 == 0).
    /// The RMSNorm before it is fused in (`norm` weights, the model's eps).
    fn swiglu(&self, x: u64, rows: usize, gate_up: &DevMatrix, act: u64, norm: &CudaSlice<f32>) -> Result<()> {
        let dev = &*self.dev;
        let ffn = gate_up.rows / 2;
        let w = gate_up.bf16().expect("the caller checked the gate/up matrix is bf16");
        let (wp, ffn_i, kk) = (ptr(w, dev), ffn as i32, gate_up.cols as i32);
        let (np, eps) = (ptr(norm, dev), self.cfg.rms_norm_eps);
        for first in (0..rows).step_by(MATVEC_MAX_ROWS) {
            let b = (rows - first).min(MATVEC_MAX_ROWS) as i32;
            let xs = x + (first * gate_up.cols * 4) as u64;
            let ys = act + (first * ffn * 4) as u64;
            let mut l = dev.stream.launch_builder(&dev.k.matvec_swiglu);
            l.arg(&wp).arg(&xs).arg(&ys).arg(&ffn_i).arg(&kk).arg(&b).arg(&np).arg(&eps);
            // SAFETY: matvec_swiglu_bf16(w [2 ffn, k], x [b, k], act [b, ffn], ffn, k, b <= 8, norm [k],
            // eps), k % 8 == 0.
            unsafe { l.launch(grid1(ffn * 32, WARPS_PER_MATVEC_BLOCK * 32)) }.map_err(driver_err("matvec_swiglu_bf16"))?;
        }
        Ok(())
    }

    /// y[rows, w.rows] (+)= x'[rows, w.cols] · wᵀ, where x' is x, or RMSNorm(x) · norm with `norm` (fused
    /// into the mat-vec kernel; a separate pass into `norm.scratch` before a cuBLAS product).
    #[allow(clippy::too_many_arguments)]
    fn matmul(&self, s: &Scratch, x: u64, rows: usize, w: &DevMatrix, y: u64, accumulate: bool, norm: Option<Norm<'_>>) -> Result<()> {
        let dev = &*self.dev;
        if let DevWeights::Quant { kind, blocks } = &w.data {
            let wq = ptr(blocks, dev);
            if rows <= EXACT_MAX_ROWS {
                let (n, kk, acc) = (w.rows as i32, w.cols as i32, accumulate as i32);
                let (np, eps) = (norm.map_or(0, |n| ptr(n.weight, dev)), self.cfg.rms_norm_eps);
                let f = &dev.k.matvec_quant[super::quant_index(*kind)];
                for first in (0..rows).step_by(MATVEC_MAX_ROWS) {
                    let b = (rows - first).min(MATVEC_MAX_ROWS) as i32;
                    let xs = x + (first * w.cols * 4) as u64;
                    let ys = y + (first * w.rows * 4) as u64;
                    let mut l = dev.stream.launch_builder(f);
                    l.arg(&wq).arg(&xs).arg(&ys).arg(&n).arg(&kk).arg(&b).arg(&acc).arg(&np).arg(&eps);
                    // SAFETY: matvec_<kind>(w [n rows of k / block_values blocks], x [b, k], y [b, n], n, k,
                    // b <= 8, accumulate, norm [k] or null, eps); k is a whole number of blocks (checked when
                    // the host loaded the weights); rows first..first + b of x and y lie inside their buffers.
                    unsafe { l.launch(grid1(w.rows * 32, WARPS_PER_MATVEC_BLOCK * 32)) }
                        .map_err(driver_err("matvec on quantized weights"))?;
                }
                return Ok(());
            }
            let wide = self.widened.as_ref().expect("the scratch is sized for every quantized matrix");
            let wb = ptr(wide, dev);
            let (rows_i, k_i) = (w.rows as i32, w.cols as i32);
            let mut l = dev.stream.launch_builder(&dev.k.dequantize_quant[super::quant_index(*kind)]);
            l.arg(&wq).arg(&wb).arg(&rows_i).arg(&k_i);
            // SAFETY: dequantize_<kind>_bf16(w, out [rows, k], rows, k): one thread per 32 values; the
            // scratch holds the largest quantized matrix.
            unsafe { l.launch(grid1(w.rows * w.cols / 32, 256)) }.map_err(driver_err("widening quantized weights"))?;
            return self.gemm(s, x, rows, wb, w.rows, w.cols, y, accumulate, norm);
        }
        let wp = ptr(w.bf16().expect("not quantized"), dev);
        if rows <= EXACT_MAX_ROWS && w.cols % 8 == 0 {
            let (n, kk, acc) = (w.rows as i32, w.cols as i32, accumulate as i32);
            let (np, eps) = (norm.map_or(0, |n| ptr(n.weight, dev)), self.cfg.rms_norm_eps);
            for first in (0..rows).step_by(MATVEC_MAX_ROWS) {
                let b = (rows - first).min(MATVEC_MAX_ROWS) as i32;
                let xs = x + (first * w.cols * 4) as u64;
                let ys = y + (first * w.rows * 4) as u64;
                let mut l = dev.stream.launch_builder(&dev.k.matvec);
                l.arg(&wp).arg(&xs).arg(&ys).arg(&n).arg(&kk).arg(&b).arg(&acc).arg(&np).arg(&eps);
                // SAFETY: matvec_bf16(w [n, k], x [b, k], y [b, n], n, k, b <= 8, accumulate, norm [k] or
                // null, eps), k % 8 == 0; rows first..first + b of x and y lie inside their buffers.
                unsafe { l.launch(grid1(w.rows * 32, WARPS_PER_MATVEC_BLOCK * 32)) }.map_err(driver_err("matvec_bf16"))?;
            }
            return Ok(());
        }
        self.gemm(s, x, rows, wp, w.rows, w.cols, y, accumulate, norm)
    }

    /// y[rows, n] (+)= x'[rows, k] · wᵀ in cuBLAS for a bf16 `[n, k]` matrix at device address `wp`.
    #[allow(clippy::too_many_arguments)]
    fn gemm(&self, s: &Scratch, x: u64, rows: usize, wp: u64, n: usize, k: usize, y: u64, accumulate: bool, norm: Option<Norm<'_>>) -> Result<()> {
        let dev = &*self.dev;
        let w = Shape { rows: n, cols: k };
        let x = match norm {
            Some(n) => {
                self.rms_norm(x, n.weight, n.scratch, rows)?;
                n.scratch
            }
            None => x,
        };
        let xb = ptr(&s.xb, dev);
        let count = (rows * w.cols) as i32;
        let mut l = dev.stream.launch_builder(&dev.k.to_bf16);
        l.arg(&x).arg(&xb).arg(&count);
        // SAFETY: f32_to_bf16(x, y, n); xb holds rows × max(k).
        unsafe { l.launch(grid1(rows * w.cols, 256)) }.map_err(driver_err("f32_to_bf16"))?;
        let (alpha, beta) = (1.0f32, if accumulate { 1.0f32 } else { 0.0 });
        // Column-major view: yᵀ [n, rows] = (w as [k, n])ᵀ · xᵀ [k, rows].
        // SAFETY: pointers are device buffers of the stated shapes; alpha and beta live across the call.
        let status = unsafe {
            cudarc::cublas::result::gemm_ex(
                *dev.blas.handle(),
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                w.rows as i32,
                rows as i32,
                w.cols as i32,
                (&alpha) as *const f32 as *const _,
                wp as *const _,
                blas::cudaDataType::CUDA_R_16BF,
                w.cols as i32,
                xb as *const _,
                blas::cudaDataType::CUDA_R_16BF,
                w.cols as i32,
                (&beta) as *const f32 as *const _,
                y as *mut _,
                blas::cudaDataType::CUDA_R_32F,
                w.rows as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        status.map_err(|e| EngineError::Cuda(format!("cuBLAS GemmEx [{rows}x{}]·[{}x{}]ᵀ: {e:?}", w.cols, w.rows, w.cols)))
    }
}

/// A weight matrix's shape, for the cuBLAS call.
struct Shape {
    rows: usize,
    cols: usize,
}

/// An RMSNorm to apply to a product's input: its weights, and where the normed rows go when the product
/// cannot take the norm fused (cuBLAS).
#[derive(Clone, Copy)]
struct Norm<'a> {
    weight: &'a CudaSlice<f32>,
    scratch: u64,
}

enum StepResult {
    Outputs(Vec<StepOutput>),
    Ids(Vec<u32>),
}

impl Scratch {
    fn new(dev: &CudaDevice, cfg: &ModelConfig, rows: usize, heads: usize, exit: bool) -> Result<Self> {
        let s = &dev.stream;
        let f = |n: usize| s.alloc_zeros::<f32>(n.max(1)).map_err(driver_err("allocating activations"));
        let h = cfg.hidden_size;
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        let ffn = cfg.intermediate_size;
        if cfg.head_dim > 256 {
            return Err(EngineError::Invalid(format!("head_dim {} > 256 is not supported by the CUDA attention kernel", cfg.head_dim)));
        }
        let vocab = if exit { cfg.vocab_size } else { 0 };
        Ok(Self {
            rows,
            heads,
            x: f(rows * h)?,
            normed: f(rows * h)?,
            qkv: f(rows * (q_dim + 2 * kv_dim))?,
            attn: f(rows * q_dim)?,
            gate_up: f(rows * 2 * ffn)?,
            act: f(rows * ffn)?,
            xb: s.alloc_zeros::<u16>(rows * h.max(q_dim).max(ffn)).map_err(driver_err("allocating activations"))?,
            tokens: s.alloc_zeros::<u32>(rows).map_err(driver_err("allocating activations"))?,
            descs: s.alloc_zeros::<u64>(rows * 2).map_err(driver_err("allocating activations"))?,
            last: f(heads * h)?,
            last_normed: f(heads * h)?,
            logits: f(heads * vocab)?,
            ids: s.alloc_zeros::<u32>(heads).map_err(driver_err("allocating activations"))?,
        })
    }
}
