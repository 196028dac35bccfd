//! Row products for ggml's K-quants (Q4_K, Q6_K: 256-value super-blocks), as llama.cpp computes them:
//! each input row is quantized like ggml's `quantize_row_q8_K` (256 values per block, one f32 scale,
//! round-half-to-even, the per-16-value sums kept), and each super-block's dot product is an exact
//! integer sum, scaled once:
//!
//! - Q4_K: `d_x · (d_w · Σ_s sc_s Σ n q_x − dmin_w · Σ_s m_s Σ q_x)` over its eight 32-value groups `s`
//!   (6-bit scales `sc` and mins `m`, nibbles `n`)
//! - Q6_K: `d_x · d_w · Σ_g sc_g Σ (n − 32) q_x` over its sixteen 16-value groups (signed 8-bit scales,
//!   6-bit values `n`)
//!
//! Numerics are [`super::quant`]'s: integer sums are exact, blocks are accumulated in f32 in a fixed
//! order (block order on the portable path; 8 lanes, then one horizontal sum, on AVX2), so a row's
//! result depends neither on the batch nor on the thread split.

use half::f16;

use crate::gguf::scale_min_k4;
use crate::tensor::QuantKind;

/// Values per super-block.
pub(crate) const QK: usize = 256;
/// Values per partial sum kept with a quantized row (ggml's `bsums`).
const GROUP: usize = 16;

/// One input row quantized to 8 bits per 256-value block (ggml's `block_q8_K`, unpacked).
#[derive(Debug, Clone, Default)]
pub(crate) struct Q8KRow {
    pub q: Vec<i8>,
    /// Per block: the scale `d_x`.
    pub d: Vec<f32>,
    /// Per 16 values: `Σ q_x` (exact).
    pub bsums: Vec<i32>,
}

/// Quantizes `x` (a multiple of 256 values) as ggml's `quantize_row_q8_K_ref`: the value of largest
/// magnitude maps to −127 (`iscale = −127 / max`, `d = 1 / iscale`), values round half to even (ggml's
/// `nearest_int`), capped at 127.
pub(crate) fn quantize_row(x: &[f32]) -> Q8KRow {
    debug_assert_eq!(x.len() % QK, 0);
    let blocks = x.len() / QK;
    let mut row = Q8KRow { q: vec![0; x.len()], d: vec![0.0; blocks], bsums: vec![0; x.len() / GROUP] };
    for b in 0..blocks {
        let xs = &x[b * QK..(b + 1) * QK];
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in xs {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            continue; // d = 0, q = 0, sums 0: already so.
        }
        let iscale = -127.0 / max;
        let qs = &mut row.q[b * QK..(b + 1) * QK];
        for (q, &v) in qs.iter_mut().zip(xs) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (g, sum) in row.bsums[b * QK / GROUP..(b + 1) * QK / GROUP].iter_mut().enumerate() {
            *sum = qs[g * GROUP..(g + 1) * GROUP].iter().map(|&q| q as i32).sum();
        }
        row.d[b] = 1.0 / iscale;
    }
    row
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Σ over the super-blocks of one weight row (`w`: its blocks' bytes) against one quantized input row.
/// `avx2` says AVX2, FMA and F16C were found (decided once per product by the caller).
pub(crate) fn dot_row(kind: QuantKind, avx2: bool, w: &[u8], x: &Q8KRow) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller found AVX2, FMA and F16C; `w` holds whole blocks of `kind`, `x` as many.
        return unsafe {
            match kind {
                QuantKind::Q4K => avx2::dot_row_q4k(w, x),
                QuantKind::Q6K => avx2::dot_row_q6k(w, x),
                _ => unreachable!("{kind:?} is not a K-quant"),
            }
        };
    }
    let _ = avx2;
    dot_row_portable(kind, w, x)
}

/// The per-block definition ([`dot_row`]'s reference): each super-block's integer sums scaled and added
/// in block order.
pub(crate) fn dot_row_portable(kind: QuantKind, w: &[u8], x: &Q8KRow) -> f32 {
    let mut acc = 0f32;
    let mut n = [0u8; QK];
    for (b, block) in w.chunks_exact(kind.block_bytes()).enumerate() {
        let qx = &x.q[b * QK..(b + 1) * QK];
        let bsums = &x.bsums[b * QK / GROUP..(b + 1) * QK / GROUP];
        acc += match kind {
            QuantKind::Q4K => {
                let (d, dmin) = (f16_at(block, 0), f16_at(block, 2));
                let scales = &block[4..16];
                unpack_q4k(&block[16..144], &mut n);
                let (mut isum, mut msum) = (0i32, 0i32);
                for s in 0..8 {
                    let (sc, m) = scale_min_k4(s, scales);
                    let dot: i32 = (s * 32..(s + 1) * 32).map(|j| n[j] as i32 * qx[j] as i32).sum();
                    isum += sc as i32 * dot;
                    msum += m as i32 * (bsums[2 * s] + bsums[2 * s + 1]);
                }
                x.d[b] * (d * isum as f32 - dmin * msum as f32)
            }
            QuantKind::Q6K => {
                let d = f16_at(block, 208);
                unpack_q6k(&block[0..128], &block[128..192], &mut n);
                let mut isum = 0i32;
                for g in 0..QK / GROUP {
                    let dot: i32 = (g * GROUP..(g + 1) * GROUP).map(|j| (n[j] as i32 - 32) * qx[j] as i32).sum();
                    isum += block[192 + g] as i8 as i32 * dot;
                }
                d * x.d[b] * isum as f32
            }
            _ => unreachable!("{kind:?} is not a K-quant"),
        };
    }
    acc
}

/// Q4_K's 4-bit values in value order: each 32-byte run holds one 64-value chunk, low nibbles first.
fn unpack_q4k(qs: &[u8], n: &mut [u8; QK]) {
    for chunk in 0..4 {
        for l in 0..32 {
            let q = qs[chunk * 32 + l];
            n[chunk * 64 + l] = q & 15;
            n[chunk * 64 + 32 + l] = q >> 4;
        }
    }
}

/// Q6_K's 6-bit values (unsigned, before the −32) in value order (ggml's `dequantize_row_q6_K`).
fn unpack_q6k(ql: &[u8], qh: &[u8], n: &mut [u8; QK]) {
    for half in 0..2 {
        let (ql, qh) = (&ql[half * 64..half * 64 + 64], &qh[half * 32..half * 32 + 32]);
        let base = half * 128;
        for l in 0..32 {
            n[base + l] = (ql[l] & 15) | ((qh[l] & 3) << 4);
            n[base + l + 32] = (ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4);
            n[base + l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            n[base + l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{GROUP, Q8KRow, QK};
    use crate::gguf::scale_min_k4;

    #[inline]
    #[target_feature(enable = "f16c")]
    fn f16_at(bytes: &[u8], at: usize) -> f32 {
        let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[target_feature(enable = "avx2")]
    fn hsum_ps(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// Q4_K, as ggml's AVX2 `ggml_vec_dot_q4_K_q8_K`: per 64-value chunk, both nibble halves times the
    /// activations (`maddubs`, at most 2·15·127 per i16 lane), times the group's scale (`madd`) into 8
    /// i32 lanes; one FMA per block; the mins term from the activation sums, in a scalar.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `w` holds whole Q4_K blocks and `x` at least as many.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row_q4k(w: &[u8], x: &Q8KRow) -> f32 {
        let low = _mm256_set1_epi8(15);
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (b, block) in w.chunks_exact(144).enumerate() {
            let dx = x.d[b];
            let scales = &block[4..16];
            let bsums = &x.bsums[b * QK / GROUP..(b + 1) * QK / GROUP];
            let mut sumi = _mm256_setzero_si256();
            let mut msum = 0i32;
            for chunk in 0..4 {
                let (sc0, m0) = scale_min_k4(2 * chunk, scales);
                let (sc1, m1) = scale_min_k4(2 * chunk + 1, scales);
                msum += m0 as i32 * (bsums[4 * chunk] + bsums[4 * chunk + 1])
                    + m1 as i32 * (bsums[4 * chunk + 2] + bsums[4 * chunk + 3]);
                // SAFETY: 128 value bytes at 16.., 256 activations per block (contract).
                unsafe {
                    let q = _mm256_loadu_si256(block.as_ptr().add(16 + 32 * chunk) as *const __m256i);
                    let xq = x.q.as_ptr().add(b * QK + 64 * chunk);
                    let x0 = _mm256_loadu_si256(xq as *const __m256i);
                    let x1 = _mm256_loadu_si256(xq.add(32) as *const __m256i);
                    let p0 = _mm256_maddubs_epi16(_mm256_and_si256(q, low), x0);
                    let p1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(q, 4), low), x1);
                    let p0 = _mm256_madd_epi16(p0, _mm256_set1_epi16(sc0 as i16));
                    let p1 = _mm256_madd_epi16(p1, _mm256_set1_epi16(sc1 as i16));
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(f16_at(block, 0) * dx), acc);
            mins += f16_at(block, 2) * dx * msum as f32;
        }
        hsum_ps(acc) - mins
    }

    /// Q6_K, as ggml's AVX2 `ggml_vec_dot_q6_K_q8_K`: per 128-value half, four 32-value vectors of 6-bit
    /// values rebuilt from `ql`/`qh`, times the activations (`maddubs`, at most 2·63·127 per i16 lane)
    /// less 32 times the activations (exact in i16), times each 16-value group's signed scale (`madd`)
    /// into 8 i32 lanes; one FMA per block.
    ///
    /// # Safety
    /// AVX2, FMA and F16C are available; `w` holds whole Q6_K blocks and `x` at least as many.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_row_q6k(w: &[u8], x: &Q8KRow) -> f32 {
        let low = _mm256_set1_epi8(15);
        let three = _mm256_set1_epi8(3);
        let m32 = _mm256_set1_epi8(32);
        let mut acc = _mm256_setzero_ps();
        for (b, block) in w.chunks_exact(210).enumerate() {
            let sc = &block[192..208];
            let mut sumi = _mm256_setzero_si256();
            for half in 0..2 {
                // SAFETY: ql at 0..128, qh at 128..192; 256 activations per block (contract).
                unsafe {
                    let ql0 = _mm256_loadu_si256(block.as_ptr().add(64 * half) as *const __m256i);
                    let ql1 = _mm256_loadu_si256(block.as_ptr().add(64 * half + 32) as *const __m256i);
                    let qh = _mm256_loadu_si256(block.as_ptr().add(128 + 32 * half) as *const __m256i);
                    let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, three), 4);
                    let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), three), 4);
                    let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), three), 4);
                    let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), three), 4);
                    let q = [
                        _mm256_or_si256(_mm256_and_si256(ql0, low), h0),
                        _mm256_or_si256(_mm256_and_si256(ql1, low), h1),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low), h2),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low), h3),
                    ];
                    let xq = x.q.as_ptr().add(b * QK + 128 * half);
                    for (k, qk) in q.into_iter().enumerate() {
                        let xk = _mm256_loadu_si256(xq.add(32 * k) as *const __m256i);
                        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(qk, xk), _mm256_maddubs_epi16(m32, xk));
                        let g = 8 * half + 2 * k;
                        let scales = _mm256_set_m128i(
                            _mm_set1_epi16(sc[g + 1] as i8 as i16),
                            _mm_set1_epi16(sc[g] as i8 as i16),
                        );
                        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scales));
                    }
                }
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(f16_at(block, 208) * x.d[b]), acc);
        }
        hsum_ps(acc)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn activations_quantize_like_ggml_q8_k() {
        let mut x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0).collect();
        x[300] = 20.0; // the block's largest magnitude maps to −127 (ggml's sign convention)
        let q = quantize_row(&x);
        assert_eq!(q.d.len(), 2);
        assert_eq!(q.bsums.len(), 32);
        let max0 = x[..256].iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        assert_eq!(q.d[0], 1.0 / (-127.0 / max0));
        assert_eq!(q.q[300], -127);
        assert_eq!(q.bsums[20], q.q[320..336].iter().map(|&v| v as i32).sum::<i32>());
        // ggml's nearest_int rounds half to even: 2.5 → 2 (not 3), 0.5 → 0, 3.5 → 4.
        let mut t = vec![0f32; 256];
        t[0] = -127.0;
        t[1] = 2.5;
        t[2] = 0.5;
        t[3] = 3.5;
        let q = quantize_row(&t);
        assert_eq!(&q.q[..4], &[-127, 2, 0, 4]);
        let zeros = quantize_row(&[0.0; 256]);
        assert_eq!((zeros.d[0], zeros.bsums[3]), (0.0, 0));
    }
}
