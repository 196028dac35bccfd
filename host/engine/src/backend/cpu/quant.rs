//! Products with weights kept quantized in memory (ggml's Q4_0, Q4_1, Q5_0 and Q8_0 blocks of 32
//! values here; the K-quants' 256-value super-blocks in [`super::kquant`]), as llama.cpp computes them:
//! each input row is quantized to 8 bits per 32-value block (a scale and 32 signed bytes, plus the
//! block's scaled sum for the offset terms), and each block's dot product is an exact integer sum,
//! scaled once:
//!
//! - Q8_0: `d_w · d_x · Σ q_w q_x`
//! - Q4_0: `d_w · d_x · (Σ n_w q_x − 8 Σ q_x)` (nibbles `n_w` stored with an offset of 8)
//! - Q4_1: `d_w · d_x · Σ n_w q_x + m_w · s_x` (`s_x = d_x Σ q_x`)
//! - Q5_0: `d_w · d_x · (Σ n_w q_x − 16 Σ q_x)` (5-bit values: a nibble plus a bit from `qh`)
//!
//! Decode reads 0.56–1.06 bytes per weight instead of bf16's 2, which is the whole point: decode is
//! memory-bound. Numerics: the 8-bit activations add a relative error of about 2⁻⁸ per block (the same
//! as llama.cpp's); the integer sums are exact; blocks are accumulated in f32 in a fixed order (in block
//! order on the portable path, in 8 lanes then one horizontal sum on AVX2, as ggml does), so a row's
//! result does not depend on the batch or on the thread split.

use half::f16;

use super::dot::{TileArgs, block_streams_for};
use super::interleave;
use super::kquant::{self, Q8KRow};
use super::pool::ThreadPool;
use super::quant_interleaved;
use super::simd::Isa;
use super::CpuBackend;
use crate::tensor::QuantKind;

/// Values per block of the 32-value kinds (Q4_0, Q4_1, Q5_0, Q8_0).
pub const BLOCK: usize = 32;

/// One input row quantized to 8 bits per block.
#[derive(Debug, Clone, Default)]
pub(crate) struct Q8Row {
    pub q: Vec<i8>,
    /// Per block: the scale `d_x`.
    pub d: Vec<f32>,
    /// Per block: `Σ q_x` (exact).
    pub sum: Vec<i32>,
    /// Per block: `d_x · Σ q_x` rounded to f32 (Q4_1's minimum term; ggml's `s` of a Q8_1 block).
    pub scaled_sum: Vec<f32>,
}

/// Quantizes `x` (a multiple of 32 values) as ggml's `quantize_row_q8_0/1`: `d = max|x| / 127`,
/// `q = round(x · (1 / d))`, rounding half away from zero (ggml's reference `roundf`).
///
/// Vectorised on AVX2 with the same result bit for bit (for inputs without NaN): every decode product
/// quantizes its inputs on the calling thread before the parallel part, and `roundf` is a library call
/// per value in a portable build.
pub(crate) fn quantize_row(x: &[f32]) -> Q8Row {
    debug_assert_eq!(x.len() % BLOCK, 0);
    let blocks = x.len() / BLOCK;
    let mut row = Q8Row { q: vec![0; x.len()], d: vec![0.0; blocks], sum: vec![0; blocks], scaled_sum: vec![0.0; blocks] };
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    for (b, (xs, q)) in x.chunks_exact(BLOCK).zip(row.q.chunks_exact_mut(BLOCK)).enumerate() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 was detected; both blocks hold 32 values.
        let (d, sum) = if avx2 { unsafe { avx2::quantize_block(xs, q) } } else { quantize_block(xs, q) };
        #[cfg(not(target_arch = "x86_64"))]
        let (d, sum) = quantize_block(xs, q);
        row.d[b] = d;
        row.sum[b] = sum;
        row.scaled_sum[b] = d * sum as f32;
    }
    row
}

/// One block of [`quantize_row`]: writes `q`, returns `(d, Σ q)`.
fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in q.iter_mut().zip(xs) {
        let r = (v * id).round() as i32;
        *q = r.clamp(-127, 127) as i8;
        sum += *q as i32;
    }
    (d, sum)
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Whether the AVX2 row kernel can run: a non-scalar `isa` (which includes AVX2 and FMA) and F16C.
/// Decided once per product, not per row.
fn avx2_rows(isa: Isa) -> bool {
    #[cfg(target_arch = "x86_64")]
    return !matches!(isa, Isa::Scalar) && std::arch::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    return false;
}

/// Σ over the blocks of one weight row (`w`: its blocks' bytes) against one quantized input row.
/// `avx2` is [`avx2_rows`]`(isa)`.
fn dot_row(kind: QuantKind, isa: Isa, avx2: bool, w: &[u8], x: &Q8Row) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2_rows` found AVX2, FMA and F16C; `w` holds whole blocks of `kind`, `x` as many.
        return unsafe { avx2::dot_row(kind, w, x) };
    }
    let _ = avx2;
    dot_row_portable(kind, isa, w, x)
}

/// The per-block definition ([`dot_row`]'s reference): each block's integer sum scaled and added in
/// block order.
pub(super) fn dot_row_portable(kind: QuantKind, isa: Isa, w: &[u8], x: &Q8Row) -> f32 {
    let bb = kind.block_bytes();
    let mut acc = 0f32;
    for (b, block) in w.chunks_exact(bb).enumerate() {
        let qx = &x.q[b * BLOCK..(b + 1) * BLOCK];
        let d = f16_at(block, 0);
        acc += match kind {
            QuantKind::Q8_0 => {
                // SAFETY: both slices hold 32 bytes; `isa` comes from `Isa::detect`.
                let s = unsafe { dot_i8(isa, bytemuck::cast_slice(&block[2..34]), qx) };
                d * x.d[b] * s as f32
            }
            QuantKind::Q4_0 => {
                // SAFETY: 16 nibble bytes and 32 activation bytes; `isa` comes from `Isa::detect`.
                let s = unsafe { dot_nibbles(isa, &block[2..18], qx) };
                d * x.d[b] * (s - 8 * x.sum[b]) as f32
            }
            QuantKind::Q4_1 => {
                let m = f16_at(block, 2);
                // SAFETY: as above.
                let s = unsafe { dot_nibbles(isa, &block[4..20], qx) };
                d * x.d[b] * s as f32 + m * (x.d[b] * x.sum[b] as f32)
            }
            QuantKind::Q5_0 => {
                let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                // SAFETY: as above.
                let low = unsafe { dot_nibbles(isa, &block[6..22], qx) };
                // The fifth bits: bit j of qh is value j's 16s bit.
                let high: i32 = (0..32).filter(|j| qh >> j & 1 == 1).map(|j| 16 * qx[j] as i32).sum();
                d * x.d[b] * (low + high - 16 * x.sum[b]) as f32
            }
            QuantKind::Q4K | QuantKind::Q6K => unreachable!("K-quants are multiplied in kquant"),
        };
    }
    acc
}

/// Σ n_j q_j over one block: `nibbles[j] & 15` pairs with `q[j]`, `nibbles[j] >> 4` with `q[j + 16]`.
///
/// # Safety
/// `nibbles` holds 16 bytes, `q` 32; `isa` is supported by this CPU.
#[inline]
unsafe fn dot_nibbles(isa: Isa, nibbles: &[u8], q: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if !matches!(isa, Isa::Scalar) {
        // SAFETY: every non-scalar Isa includes AVX2 (forwarded contract).
        return unsafe { avx2::dot_nibbles(nibbles, q) };
    }
    let _ = isa;
    let mut s = 0i32;
    for j in 0..16 {
        s += (nibbles[j] & 15) as i32 * q[j] as i32 + (nibbles[j] >> 4) as i32 * q[j + 16] as i32;
    }
    s
}

/// Σ a_j b_j over 32 signed bytes.
///
/// # Safety
/// Both slices hold 32 bytes; `isa` is supported by this CPU.
#[inline]
unsafe fn dot_i8(isa: Isa, a: &[i8], b: &[i8]) -> i32 {
    #[cfg(target_arch = "x86_64")]
    if !matches!(isa, Isa::Scalar) {
        // SAFETY: forwarded contract.
        return unsafe { avx2::dot_i8(a, b) };
    }
    let _ = isa;
    a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{BLOCK, Q8Row};
    use crate::tensor::QuantKind;

    /// The f16 at `at` widened in hardware (the `half` crate converts in software unless the whole
    /// build targets F16C, and two conversions per block would dominate the block's cost).
    #[inline]
    #[target_feature(enable = "f16c")]
    fn f16_at(bytes: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// A whole row, as ggml's AVX2 `vec_dot`s do it: each block's integer products summed to 8 i32
    /// lanes, converted and scaled into 8 f32 accumulators (one FMA per block), one horizontal sum at
    /// the end. Same per-block integers as the portable path; the f32 sum is taken in 8 lanes.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `w` holds whole blocks of `kind` and `x` at least as many blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row(kind: QuantKind, w: &[u8], x: &Q8Row) -> f32 {
        let bb = kind.block_bytes();
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(15);
        let mut acc = _mm256_setzero_ps();
        let mut offset = 0f32;
        for (b, block) in w.chunks_exact(bb).enumerate() {
            // SAFETY: x.q holds 32 values per block; block bytes per the layout of `kind`.
            unsafe {
                let qx = _mm256_loadu_si256(x.q.as_ptr().add(b * BLOCK) as *const __m256i);
                let dx = x.d[b];
                let (sum, scale) = match kind {
                    QuantKind::Q8_0 => {
                        let qw = _mm256_loadu_si256(block.as_ptr().add(2) as *const __m256i);
                        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw));
                        (_mm256_madd_epi16(p, ones), f16_at(block, 0) * dx)
                    }
                    QuantKind::Q4_0 | QuantKind::Q4_1 | QuantKind::Q5_0 => {
                        let at = match kind {
                            QuantKind::Q4_0 => 2,
                            QuantKind::Q4_1 => 4,
                            _ => 6,
                        };
                        let packed = _mm_loadu_si128(block.as_ptr().add(at) as *const __m128i);
                        let mut n = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
                        if kind == QuantKind::Q5_0 {
                            // Byte j gains 16 where bit j of qh is set (values 0..31: still a valid
                            // unsigned maddubs operand, 2·31·127 fits i16).
                            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
                            n = _mm256_or_si256(n, _mm256_and_si256(bytes_from_bits(qh), _mm256_set1_epi8(16)));
                        }
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(n, qx), ones);
                        let d = f16_at(block, 0);
                        match kind {
                            // Σ (n − o) q = Σ n q − o Σ q, the offset taken out of the integer sum.
                            QuantKind::Q4_0 => offset -= d * dx * (8 * x.sum[b]) as f32,
                            QuantKind::Q5_0 => offset -= d * dx * (16 * x.sum[b]) as f32,
                            _ => offset += f16_at(block, 2) * (dx * x.sum[b] as f32),
                        }
                        (p, d * dx)
                    }
                    QuantKind::Q4K | QuantKind::Q6K => unreachable!("K-quants are multiplied in kquant"),
                };
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_set1_ps(scale), acc);
            }
        }
        hsum_ps(acc) + offset
    }

    /// 0xFF in byte j where bit j of `bits` is set, else 0 (ggml's `bytes_from_bits_32`).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn bytes_from_bits(bits: u32) -> __m256i {
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits as i32),
            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0),
        );
        let others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(others, _mm256_set1_epi64x(-1))
    }

    #[target_feature(enable = "avx2")]
    fn hsum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// [`super::quantize_block`] in 8 lanes. Rounding half away from zero without a library call:
    /// `t = trunc(a)`, `a − t` is exact, and `t ± 1` where `|a − t| ≥ 0.5`. The pack to bytes is ggml's
    /// (`packs` work per 128-bit lane, the final permutation restores value order).
    ///
    /// # Safety
    /// AVX2 is available; `xs` and `q` hold 32 values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
        let sign = _mm256_set1_ps(-0.0);
        // SAFETY: 32 values each (contract); unaligned loads and store.
        unsafe {
            let p = xs.as_ptr();
            let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let mut m = _mm256_andnot_ps(sign, v[0]);
            for vi in &v[1..] {
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
            }
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            let d = amax / 127.0;
            let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
            let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
            let mut ints = [_mm256_setzero_si256(); 4];
            for (i, vi) in v.iter().enumerate() {
                let a = _mm256_mul_ps(*vi, id);
                let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(a);
                let away = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_andnot_ps(sign, _mm256_sub_ps(a, t)), half);
                let step = _mm256_and_ps(away, _mm256_or_ps(_mm256_and_ps(a, sign), one));
                ints[i] = _mm256_max_epi32(_mm256_min_epi32(_mm256_cvtps_epi32(_mm256_add_ps(t, step)), hi), lo);
            }
            let sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(ints[0], ints[1]), _mm256_add_epi32(ints[2], ints[3])));
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(ints[0], ints[1]), _mm256_packs_epi32(ints[2], ints[3]));
            let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, bytes);
            (d, sum)
        }
    }

    /// # Safety
    /// AVX2 is available; `nibbles` holds 16 bytes and `q` 32.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_nibbles(nibbles: &[u8], q: &[i8]) -> i32 {
        // SAFETY: lengths per the contract; unaligned loads.
        unsafe {
            let packed = _mm_loadu_si128(nibbles.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(packed, _mm_set1_epi8(15));
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), _mm_set1_epi8(15));
            let n = _mm256_set_m128i(hi, lo); // values 0..15: usable as the unsigned operand
            let x = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
            let pairs = _mm256_maddubs_epi16(n, x); // |15 · 127 · 2| fits i16
            hsum_i32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    /// # Safety
    /// AVX2 is available; both slices hold 32 bytes.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
        // SAFETY: lengths per the contract; unaligned loads.
        unsafe {
            let a = _mm256_loadu_si256(a.as_ptr() as *const __m256i);
            let b = _mm256_loadu_si256(b.as_ptr() as *const __m256i);
            // maddubs takes an unsigned and a signed operand: |a| and b with a's sign. Weights are in
            // [-127, 127] (ggml's quantizer never writes -128), so |a| fits u8.
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
            hsum_i32(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }
    }

    #[target_feature(enable = "avx2")]
    fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }
}

/// Raw output pointer shared by the tasks of one product (each writes only its own rows).
pub(super) struct OutPtr(pub(super) *mut f32);
// SAFETY: tasks write disjoint elements, and the product waits for every task before returning.
unsafe impl Sync for OutPtr {}

/// Products with more input rows than this (prefill) dequantize their weights tile by tile and run the
/// exact f32 kernel: compute-bound work goes to the fast tiles, and the activations stay f32. Decode
/// batches (at most [`CpuBackend::BF16_EXACT_MAX_ROWS`] rows, the workers' largest) stay on the 8-bit
/// path, so a request decodes the same whatever else shares its step — the same line the bf16 path draws.
pub(crate) const DEQUANT_ABOVE_ROWS: usize = CpuBackend::BF16_EXACT_MAX_ROWS;
/// f32 values of one dequantized tile (256 KiB: stays in L2 while the inputs stream past).
const TILE_VALUES: usize = 64 * 1024;

/// `y[t, r] = Σ_c x[t, c] · w[r, c]` for `n` input rows and a quantized `[rows, cols]` weight matrix.
///
/// Cost: up to [`DEQUANT_ABOVE_ROWS`] rows, `n` row quantizations and one pass over the weight blocks;
/// above, one dequantization of the weights plus the f32 kernel's `n · rows · cols` FMAs. Split over the
/// pool's threads by rows either way.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    pool: &ThreadPool,
    isa: Isa,
    kind: QuantKind,
    x: &[f32],
    n: usize,
    blocks: &[u8],
    rows: usize,
    cols: usize,
    y: &mut [f32],
) {
    assert_eq!(cols % kind.block_values(), 0, "quantized rows are whole blocks");
    assert_eq!(x.len(), n * cols, "matmul input shape");
    assert_eq!(y.len(), n * rows, "matmul output shape");
    let row_bytes = kind.row_bytes(cols);
    assert_eq!(blocks.len(), rows * row_bytes, "quantized weight shape");
    if n > DEQUANT_ABOVE_ROWS {
        let dequantize = |start: usize, end: usize, tile: &mut [f32]| {
            crate::gguf::dequantize_into(kind.ggml_type(), &blocks[start * row_bytes..end * row_bytes], tile)
                .expect("quantized weights hold whole blocks of their kind (checked above)")
        };
        return matmul_dequantized(pool, isa, x, n, rows, cols, y, &dequantize);
    }
    let avx2 = avx2_rows(isa);
    // The activations quantized once per product, in the blocks the weights' kind pairs with.
    let (xq, xk): (Vec<Q8Row>, Vec<Q8KRow>) = if kind.is_k() {
        (Vec::new(), x.chunks_exact(cols).map(kquant::quantize_row).collect())
    } else {
        (x.chunks_exact(cols).map(quantize_row).collect(), Vec::new())
    };
    let dot = |w: &[u8], t: usize| {
        if kind.is_k() { kquant::dot_row(kind, avx2, w, &xk[t]) } else { dot_row(kind, isa, avx2, w, &xq[t]) }
    };
    let per_task = rows.div_ceil(pool.threads() * 4).max(16);
    let tasks = rows.div_ceil(per_task);
    let out = OutPtr(y.as_mut_ptr());
    pool.run(tasks, &|i| {
        let out = &out;
        for r in i * per_task..((i + 1) * per_task).min(rows) {
            let w = &blocks[r * row_bytes..(r + 1) * row_bytes];
            for t in 0..n {
                // SAFETY: t < n and r < rows, so the index is inside y; each (t, r) is written by the one
                // task that owns row r.
                unsafe { *out.0.add(t * rows + r) = dot(w, t) };
            }
        }
    });
}

/// [`matmul`] for weights in the interleaved layout of [`super::interleave`] (Q4_0, Q4_1, Q8_0):
/// the same split at [`DEQUANT_ABOVE_ROWS`]; below it the products of [`super::quant_interleaved`]
/// (their numerics differ from the row kernels' above: blocks summed per row in order, the same on
/// every instruction set).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_interleaved(
    pool: &ThreadPool,
    isa: Isa,
    kind: QuantKind,
    x: &[f32],
    n: usize,
    packed: &[u8],
    rows: usize,
    cols: usize,
    y: &mut [f32],
) {
    assert_eq!(cols % BLOCK, 0, "quantized rows are whole blocks");
    assert_eq!(x.len(), n * cols, "matmul input shape");
    assert_eq!(y.len(), n * rows, "matmul output shape");
    assert_eq!(packed.len(), interleave::interleaved_bytes(kind, rows, cols), "interleaved weight shape");
    if n > DEQUANT_ABOVE_ROWS {
        let row_bytes = kind.row_bytes(cols);
        let dequantize = |start: usize, end: usize, tile: &mut [f32]| {
            let mut bytes = vec![0u8; (end - start) * row_bytes];
            interleave::deinterleave_rows(kind, cols, packed, start, &mut bytes);
            crate::gguf::dequantize_into(kind.ggml_type(), &bytes, tile)
                .expect("interleaved weights hold whole blocks of their kind (checked above)")
        };
        return matmul_dequantized(pool, isa, x, n, rows, cols, y, &dequantize);
    }
    let xs: Vec<Q8Row> = x.chunks_exact(cols).map(quantize_row).collect();
    quant_interleaved::matmul(pool, quant_interleaved::Kernel::for_isa(isa), kind, &xs, packed, rows, cols, y);
}

/// Prefill: each task dequantizes tiles of its rows into f32 (`dequantize(start, end, tile)` writes
/// rows `start..end`) and runs the exact tiled kernel over every input row (see [`super::matvec`] for
/// the tile order and numerics).
#[allow(clippy::too_many_arguments)]
fn matmul_dequantized(
    pool: &ThreadPool,
    isa: Isa,
    x: &[f32],
    n: usize,
    rows: usize,
    cols: usize,
    y: &mut [f32],
    dequantize: &(dyn Fn(usize, usize, &mut [f32]) + Sync),
) {
    let tile_rows = (TILE_VALUES / cols).clamp(12, 256).next_multiple_of(12);
    let tasks = rows.div_ceil(tile_rows);
    let out = OutPtr(y.as_mut_ptr());
    pool.run(tasks, &|i| {
        let out = &out;
        let (start, end) = (i * tile_rows, ((i + 1) * tile_rows).min(rows));
        let mut tile = vec![0f32; (end - start) * cols];
        dequantize(start, end, &mut tile);
        let args = TileArgs {
            w: tile.as_ptr(),
            w_stride: cols,
            x: x.as_ptr(),
            x_stride: cols,
            cols,
            // SAFETY (pointer arithmetic): start < rows, inside y.
            y: unsafe { out.0.add(start) },
            y_stride: rows,
            y_row_step: 1,
            prefetch: 0,
        };
        for t0 in (0..n).step_by(64) {
            // SAFETY: the tile holds rows 0..end-start of cols values; inputs t0.. are inside x; each
            // task writes only the outputs of its own rows; `isa` comes from `Isa::detect`.
            unsafe { block_streams_for(isa, args, 0..end - start, t0..(t0 + 64).min(n)) };
        }
    });
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::gguf::GgmlType;

    /// Blocks of `kind` for `values`: ggml's reference quantizers for Q4_0, Q4_1 and Q8_0; for Q5_0 and
    /// the K-quants, seeded random bytes with sane f16 scales (every bit pattern of the values, scales,
    /// mins and high bits is a valid block, so random bytes reach corners a quantizer rarely writes).
    pub(crate) fn blocks_for(kind: QuantKind, weights: &[f32]) -> Vec<u8> {
        if matches!(kind, QuantKind::Q5_0 | QuantKind::Q4K | QuantKind::Q6K) {
            let blocks = weights.len() / kind.block_values();
            let bytes: Vec<u8> = values(weights.len() as u64 ^ 0x5eed, blocks * kind.block_bytes())
                .iter()
                .map(|v| ((v + 1.0) * 127.9) as u8)
                .collect();
            let mut out = bytes;
            for (b, block) in out.chunks_exact_mut(kind.block_bytes()).enumerate() {
                let scale = 0.001 + 0.0005 * (b % 7) as f32;
                let at = match kind {
                    QuantKind::Q6K => 208,
                    _ => 0,
                };
                block[at..at + 2].copy_from_slice(&f16::from_f32(scale).to_le_bytes());
                if kind == QuantKind::Q4K {
                    block[2..4].copy_from_slice(&f16::from_f32(scale * 0.7).to_le_bytes());
                }
            }
            return out;
        }
        let mut out = Vec::new();
        for xs in weights.chunks_exact(BLOCK) {
            match kind {
                QuantKind::Q8_0 => {
                    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(xs.iter().map(|v| ((v * id).round() as i8) as u8));
                }
                QuantKind::Q4_0 => {
                    let max = xs.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    for j in 0..16 {
                        let a = ((xs[j] * id + 8.5) as i32).clamp(0, 15) as u8;
                        let b = ((xs[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
                        out.push(a | (b << 4));
                    }
                }
                QuantKind::Q4_1 => {
                    let min = xs.iter().cloned().fold(f32::INFINITY, f32::min);
                    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend(f16::from_f32(d).to_le_bytes());
                    out.extend(f16::from_f32(min).to_le_bytes());
                    for j in 0..16 {
                        let a = (((xs[j] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                        let b = (((xs[j + 16] - min) * id + 0.5) as i32).clamp(0, 15) as u8;
                        out.push(a | (b << 4));
                    }
                }
                QuantKind::Q5_0 | QuantKind::Q4K | QuantKind::Q6K => unreachable!("handled above"),
            }
        }
        out
    }

    pub(crate) fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Runs `matmul` on every supported ISA for each kind and checks it against `reference(kind's
    /// dequantized weights, x)` computed in f64; `reference_x` maps the inputs the way the path under
    /// test sees them (8-bit rounding, or none).
    fn check_products(rows: usize, cols: usize, n: usize, seed: u64, reference_x: impl Fn(QuantKind, &[f32]) -> Vec<f32>) {
        let pool = ThreadPool::new(2);
        for kind in ALL_KINDS {
            let blocks = blocks_for(kind, &values(seed, rows * cols));
            let ggml: GgmlType = kind.ggml_type();
            let deq = crate::gguf::dequantize(ggml, &blocks, (rows * cols) as u64).unwrap();
            let x = values(seed + 1, n * cols);
            let xr = reference_x(kind, &x);
            for isa in Isa::all_supported() {
                let mut y = vec![0f32; n * rows];
                matmul(&pool, isa, kind, &x, n, &blocks, rows, cols, &mut y);
                for t in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols).map(|c| deq[r * cols + c] as f64 * xr[t * cols + c] as f64).sum();
                        let got = y[t * rows + r] as f64;
                        assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{kind:?} {isa:?} t{t} r{r}: {got} vs {want}");
                    }
                }
            }
        }
    }

    const ALL_KINDS: [QuantKind; 6] =
        [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q5_0, QuantKind::Q8_0, QuantKind::Q4K, QuantKind::Q6K];

    /// The inputs as the 8-bit path sees them: quantized per 32 values (ggml's Q8_0/Q8_1) or, for the
    /// K-quants, per 256 (ggml's Q8_K), and widened back.
    fn as_8_bit(kind: QuantKind, x: &[f32], cols: usize) -> Vec<f32> {
        x.chunks_exact(cols)
            .flat_map(|r| -> Vec<f32> {
                if kind.is_k() {
                    let q = kquant::quantize_row(r);
                    (0..cols).map(|c| q.q[c] as f32 * q.d[c / kquant::QK]).collect()
                } else {
                    let q = quantize_row(r);
                    (0..cols).map(|c| q.q[c] as f32 * q.d[c / BLOCK]).collect()
                }
            })
            .collect()
    }

    #[test]
    fn quantized_products_match_dequantized_weights_against_8_bit_activations() {
        let cols = 512;
        check_products(37, cols, 3, 1, |kind, x| as_8_bit(kind, x, cols));
    }

    #[test]
    fn prefill_sized_products_use_the_dequantized_weights_exactly() {
        check_products(50, 256, DEQUANT_ABOVE_ROWS + 3, 3, |_, x| x.to_vec());
    }

    /// A row's result is the same whatever else is in the batch and however the rows are split over
    /// threads: the integer block sums are exact and each row's f32 accumulation order is fixed.
    #[test]
    fn products_do_not_depend_on_batch_or_threads() {
        let (rows, cols) = (70, 768);
        let x = values(11, 5 * cols);
        for kind in ALL_KINDS {
            let blocks = blocks_for(kind, &values(10, rows * cols));
            for isa in Isa::all_supported() {
                let mut alone = vec![0f32; rows];
                matmul(&ThreadPool::new(1), isa, kind, &x[2 * cols..3 * cols], 1, &blocks, rows, cols, &mut alone);
                let mut batch = vec![0f32; 5 * rows];
                matmul(&ThreadPool::new(2), isa, kind, &x, 5, &blocks, rows, cols, &mut batch);
                assert_eq!(alone, batch[2 * rows..3 * rows], "{kind:?} {isa:?}");
            }
        }
    }

    /// The AVX2 quantizer equals the portable one bit for bit, ties (x.5 after scaling) included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vectorised_quantization_equals_the_portable_one() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut x = values(41, 32 * 64);
        // A block whose scale is exactly 1 (max 127), holding ties and near-ties both ways.
        let ties = [127.0, 2.5, -2.5, 0.5, -0.5, 126.5, -126.5, 0.49999997, -0.49999997, 1.5, -1.5, 3.5000002, 0.0, -0.0];
        x[..ties.len()].copy_from_slice(&ties);
        x[64..96].fill(0.0);
        for b in 0..x.len() / BLOCK {
            let xs = &x[b * BLOCK..(b + 1) * BLOCK];
            let (mut q1, mut q2) = ([0i8; BLOCK], [0i8; BLOCK]);
            let want = quantize_block(xs, &mut q1);
            // SAFETY: AVX2 was detected; 32 values each.
            let got = unsafe { avx2::quantize_block(xs, &mut q2) };
            assert_eq!((got.0.to_bits(), got.1, q2), (want.0.to_bits(), want.1, q1), "block {b}");
        }
        let mut q = [0i8; BLOCK];
        quantize_block(&x[..BLOCK], &mut q);
        assert_eq!(&q[..7], &[127, 3, -3, 1, -1, 127, -127], "half away from zero");
    }

    #[test]
    fn activations_quantize_like_ggml() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) / 7.0).collect();
        let q = quantize_row(&x);
        assert_eq!(q.d.len(), 2);
        let amax = x[..32].iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(q.d[0], amax / 127.0);
        assert!(q.q[..32].iter().any(|&v| v.abs() == 127));
        assert_eq!(q.sum[1], q.q[32..].iter().map(|&v| v as i32).sum::<i32>());
        let zeros = quantize_row(&[0.0; 32]);
        assert_eq!((zeros.d[0], zeros.sum[0]), (0.0, 0));
    }
}
