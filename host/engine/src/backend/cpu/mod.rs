//! The CPU backend: matrix products over f32, bf16 and ggml-quantized weights and causal attention over
//! a KV cache.
//!
//! Numerics: every sum is accumulated in f32. For a given weight row and input row, `matmul` adds the
//! products in an order that does not depend on how many rows are in the batch, so a request's tokens
//! never depend on which other requests share its step (invariant 2 of ARCHITECTURE.md). The one
//! documented exception is the bf16 prefill path (see [`CpuBackend::matmul`]).
//!
//! Layout, one file per responsibility:
//! - `pool.rs`: the persistent thread pool every parallel region runs on (µs-scale dispatch).
//! - `simd.rs`: instruction-set detection and the vector trait (AVX-512, AVX2+FMA, portable).
//! - `dot.rs`: the register-tiled dot-product kernel shared by decode and prefill.
//! - `matvec.rs`: exact products for any batch: one pass over the weights for the whole batch, memory
//!   bound for decode, at ~90% of the FMA peak for prefill.
//! - `gemm.rs`: the bf16 prefill path with AVX-512 BF16 dot products (activations rounded to bf16).
//! - `quant.rs`, `kquant.rs`: products with ggml-quantized weights in ggml's row layout (inputs
//!   quantized to 8 bits, as llama.cpp does), and the prefill path that dequantizes them.
//! - `interleave.rs`, `quant_interleaved.rs`: Q4_0/Q4_1/Q8_0 weights interleaved 16 rows at a time
//!   ([`CpuBackend::prepare_weight`]) and their products (AVX-512 VNNI, AVX2, portable).
//! - `attention.rs`: chunked causal attention with a fixed merge order.
//! - `ops.rs`: RMSNorm and SwiGLU.
//! - `scratch.rs`: per-thread aligned scratch buffers.
//! - `reference.rs` (tests only): the naive implementations everything is checked against.

mod attention;
mod dot;
mod gemm;
pub(crate) mod interleave;
mod matvec;
mod ops;
mod pool;
mod kquant;
pub mod quant;
mod quant_interleaved;
#[cfg(test)]
mod reference;
mod scratch;
mod simd;
#[cfg(test)]
mod tests;

pub use ops::{rms_norm, silu_mul};

use crate::tensor::{Weight, WeightData};
use pool::ThreadPool;
use simd::Isa;

/// Shapes of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; `n_heads` must be a multiple (grouped-query attention).
    pub n_kv_heads: usize,
    /// Values per head, for queries, keys and values alike.
    pub head_dim: usize,
    /// Mistral-style sliding window: position `p` attends to `j` only when `p - j < window`.
    pub sliding_window: Option<usize>,
}

/// Positions per key block of a [`KvView`]: keys are stored a block at a time, transposed.
pub const KEY_BLOCK: usize = 64;

/// One layer's cached keys and values.
///
/// Values are laid out `[n_kv_heads][capacity][head_dim]`, a position's values contiguous, as the
/// weighted sum reads them. Keys are laid out in blocks of [`KEY_BLOCK`] positions, each block
/// transposed: `[n_kv_heads][capacity / KEY_BLOCK][head_dim][KEY_BLOCK]` ([`key_offset`]). Scoring one
/// query against a block is then a run of vector multiply-adds over contiguous key lanes; with keys
/// stored a position at a time each block had to be transposed first, on every decode step, which cost
/// more than the scoring itself and left a long cache's decode at about a quarter of the memory's
/// bandwidth (docs/BENCHMARKS.md, "Deep into a conversation").
#[derive(Debug, Clone, Copy)]
pub struct KvView<'a> {
    /// Keys in transposed blocks; see [`key_offset`].
    pub k: &'a [f32],
    /// Values, `[n_kv_heads][capacity][head_dim]`.
    pub v: &'a [f32],
    /// Positions per head the buffers have room for, a multiple of [`KEY_BLOCK`] (the stride between
    /// heads is `capacity * head_dim` in both buffers).
    pub capacity: usize,
    /// Valid positions, including the tokens whose queries are being computed.
    pub len: usize,
}

/// Where dimension `d` of the key at position `pos` of KV head `kv_head` lives in a [`KvView`]'s key
/// buffer (`capacity` a multiple of [`KEY_BLOCK`]).
#[inline(always)]
pub fn key_offset(capacity: usize, head_dim: usize, kv_head: usize, pos: usize, d: usize) -> usize {
    let block_start = pos - pos % KEY_BLOCK;
    (kv_head * capacity + block_start) * head_dim + d * KEY_BLOCK + pos % KEY_BLOCK
}

/// The CPU backend. Cheap to share: one per process, used by every shard in it.
///
/// It owns a pool of `threads - 1` worker threads (the calling thread is the last one); they spin for up
/// to a millisecond after each parallel region and then park, so an idle backend costs nothing. Calls
/// may come from several threads at once: one of them gets the pool, the others run single-threaded,
/// with identical results.
#[derive(Debug)]
pub struct CpuBackend {
    pool: ThreadPool,
    isa: Isa,
    /// Whether bf16 products above [`Self::BF16_EXACT_MAX_ROWS`] rows may use bf16 dot products.
    bf16_dot: bool,
}

impl CpuBackend {
    /// With bf16 weights, batches of more than this many input rows (prefill) are computed with
    /// activations rounded to bf16 on CPUs with AVX-512 BF16 (about twice as fast, results differ from
    /// the exact path by about bf16 precision). Up to this size every batch gives bit-identical results
    /// per row, so a batched step of at most this many rows never depends on its batch-mates; a larger
    /// step (say a prefill chunk batched with decodes) changes every row's numerics, including the
    /// decodes'. [`Self::with_bf16_dot_products`]`(false)` makes every size exact.
    pub const BF16_EXACT_MAX_ROWS: usize = 32;

    /// A backend using `threads` threads (at least one). Starts `threads - 1` worker threads and detects
    /// the instruction set (AVX-512 with BF16, AVX-512, AVX2+FMA, or portable code).
    pub fn new(threads: usize) -> Self {
        Self {
            pool: ThreadPool::new(threads.max(1)),
            isa: Isa::get(),
            bf16_dot: true,
        }
    }

    /// Allows (the default) or forbids the bf16 dot-product path for bf16 batches above
    /// [`Self::BF16_EXACT_MAX_ROWS`] rows. Forbidding it makes every bf16 product exact (activations stay
    /// f32) and bit-identical per row for any batch size, at about half the prefill speed on CPUs with
    /// AVX-512 BF16; it changes nothing on other CPUs.
    pub fn with_bf16_dot_products(mut self, enabled: bool) -> Self {
        self.bf16_dot = enabled;
        self
    }

    /// A backend pinned to one instruction set (tests compare them all).
    #[cfg(test)]
    pub(crate) fn with_isa(threads: usize, isa: Isa) -> Self {
        Self {
            pool: ThreadPool::new(threads.max(1)),
            isa,
            bf16_dot: true,
        }
    }

    /// Lets the backend's idle threads sleep now instead of spinning (~1 ms) in wait for the next
    /// parallel region. Call it when the next step is not imminent, e.g. a pipeline shard that has
    /// sent its activations and waits for its neighbours: on shared cores the spinning would slow them.
    pub fn release_idle_threads(&self) {
        self.pool.park_idle_workers();
    }

    /// Threads a parallel region runs on (fewer than asked only if the OS refused to start some).
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// `y[t, r] = Σ_c x[t, c] · w[r, c]` for `t < n`; `x` is `[n, w.cols]`, `y` is `[n, w.rows]`.
    ///
    /// Numerics: products are summed in f32, lane-wise over columns `c ≡ i (mod 16)` (8 on AVX2 and
    /// portable builds) in increasing `c`, then the lanes in a fixed tree; bf16 weights are widened
    /// exactly. That order is the same for every `n` and every thread split, so a row's result never
    /// depends on the rest of the batch. Exception: bf16 weights with `n >` [`Self::BF16_EXACT_MAX_ROWS`]
    /// on AVX-512 BF16 CPUs round the activations to bf16 first (still deterministic, still independent
    /// of the values of the other rows, but not bit-identical to smaller batches) unless disabled with
    /// [`Self::with_bf16_dot_products`].
    ///
    /// Cost: one pass over the weights plus `n · rows · cols` FMAs, whichever bounds: memory bound for
    /// decode-sized batches (~the machine's streaming bandwidth), at ~90% of the FMA peak from about 16
    /// rows on (the bf16 dot-product path does twice the work per instruction).
    ///
    /// # Panics
    /// If the slice lengths do not match the shapes.
    pub fn matmul(&self, x: &[f32], n: usize, w: &Weight, y: &mut [f32]) {
        assert_eq!(x.len(), n * w.cols, "matmul input shape");
        assert_eq!(y.len(), n * w.rows, "matmul output shape");
        match &w.data {
            WeightData::F32(d) => matvec::matvec(&self.pool, self.isa, x, n, d, w.rows, w.cols, y),
            WeightData::Bf16(d) => {
                let bits: &[u16] = bytemuck::cast_slice(d);
                if n > Self::BF16_EXACT_MAX_ROWS && self.bf16_dot && gemm::has_bf16_dot(self.isa) {
                    gemm::gemm_bf16_dot(&self.pool, self.isa, x, n, bits, w.rows, w.cols, y);
                } else {
                    matvec::matvec(&self.pool, self.isa, x, n, bits, w.rows, w.cols, y);
                }
            }
            WeightData::Quant { kind, blocks } => quant::matmul(&self.pool, self.isa, *kind, x, n, blocks, w.rows, w.cols, y),
            WeightData::QuantInterleaved { kind, blocks } => {
                quant::matmul_interleaved(&self.pool, self.isa, *kind, x, n, blocks, w.rows, w.cols, y)
            }
        }
    }

    /// `w` in the layout this backend multiplies fastest: Q4_0, Q4_1 and Q8_0 blocks interleaved 16
    /// rows at a time ([`WeightData::QuantInterleaved`]: the same bytes reordered, so the same size up
    /// to the last group's padding, and the same values); everything else as it is. Model loaders call
    /// it on every matrix they multiply. Cost: one pass over the weight's bytes.
    ///
    /// Numerics: interleaved products sum each row's blocks in order, the same on every instruction
    /// set; a weight left in ggml's row layout sums them in 8 lanes on AVX2 (see `quant.rs`). Either way
    /// a row's result depends neither on the batch nor on the thread split.
    pub fn prepare_weight(&self, w: Weight) -> Weight {
        match w.data {
            WeightData::Quant { kind, blocks } if interleave::interleavable(kind) => {
                let blocks = interleave::interleave(kind, w.rows, w.cols, &blocks);
                Weight { rows: w.rows, cols: w.cols, data: WeightData::QuantInterleaved { kind, blocks: blocks.into() } }
            }
            data => Weight { data, ..w },
        }
    }

    /// Causal attention for `n` query tokens at absolute positions `first_pos..first_pos + n`.
    ///
    /// `q` is `[n, n_heads, head_dim]` (already rotated), `kv` holds keys/values for positions
    /// `0..first_pos + n`, and `out` receives `[n, n_heads, head_dim]`. Query head `h` reads KV head
    /// `h / (n_heads / n_kv_heads)`; position `p` attends to `j <= p` (and `p - j < window` with a sliding
    /// window; a window of 0 is treated as 1).
    ///
    /// Numerics: f32 softmax computed over fixed 64-position chunks and merged in order (see
    /// `attention.rs`), so a query's output depends only on its position and the cache, not on `n` or
    /// the thread count. Cost: `2 · n_heads · head_dim` FMAs per (query, visible key), parallel over
    /// (query block, KV head) for prefill and over (KV head, key chunk) for decode.
    ///
    /// # Panics
    /// If the shapes are inconsistent, `kv.capacity` is not a multiple of [`KEY_BLOCK`] or
    /// `kv.len < first_pos + n`.
    pub fn attention(
        &self,
        q: &[f32],
        n: usize,
        first_pos: usize,
        kv: KvView<'_>,
        shape: AttentionShape,
        out: &mut [f32],
    ) {
        attention::attention(&self.pool, self.isa, q, n, first_pos, kv, shape, out);
    }
}
