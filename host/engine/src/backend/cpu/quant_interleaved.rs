//! Products with Q4_0, Q4_1 and Q8_0 weights in the interleaved layout of [`super::interleave`]
//! (16 rows side by side per block column) against inputs quantized to 8 bits per 32 values
//! ([`super::quant::quantize_row`], ggml's Q8_0/Q8_1 scheme). Same per-block arithmetic as
//! [`super::quant`]: each block's dot product is an exact integer sum, scaled once.
//!
//! One tile (16 blocks, one per row) is multiplied by one input block at once: each 4-byte group of
//! the input is broadcast to all 16 rows' 32-bit lanes, so a 512-bit `vpdpbusd` does 64 multiply-adds
//! for 16 rows, and the tile's 16 scales convert and multiply as one vector. The unpacked tile stays
//! in registers for up to 8 input rows (a batched decode step), so a batch reads and unpacks each
//! weight once.
//!
//! Numerics, the same on every instruction set, bit for bit, and equal to the per-block definition in
//! `quant.rs` (`dot_row_portable`): for weight row `r` and input row `t`, with `S_b` the exact integer
//! sum of block `b` (Q4_0's offset and Q8_0's storage bias taken out in integers, exact), each step
//! rounded to f32 and never fused, blocks in order:
//!
//! - Q4_0, Q8_0: `acc ← acc + f32(S_b) · (d_w · d_x)`;
//! - Q4_1: `acc ← acc + (f32(S_b) · (d_w · d_x) + m_w · s_x)` (`s_x = d_x · Σ q_x`,
//!   [`Q8Row::scaled_sum`]).
//!
//! That order depends neither on the batch, nor on the thread split, nor on the row's place in its
//! group, nor on the instruction set (the tests check all four), so a sharded run equals the unsharded
//! run bit for bit and a request's tokens do not depend on its batch-mates.
//!
//! Kernels ([`Kernel`]): AVX-512 VNNI (16 rows per vector, `vpdpbusd`), AVX2 (8 rows per vector,
//! `vpmaddubsw` + `vpmaddwd`; also what AVX-512 CPUs without VNNI run), and portable code.

use half::f16;

use super::interleave::{GROUP_ROWS, header_bytes, tile_bytes};
use super::pool::ThreadPool;
use super::quant::{BLOCK, OutPtr, Q8Row};
use super::simd::Isa;
use crate::tensor::QuantKind;

/// The instruction sets the interleaved products run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX-512 F/BW with VNNI and F16C: 16 rows per 512-bit vector, `vpdpbusd`.
    Avx512Vnni,
    /// AVX2, FMA and F16C: 8 rows per 256-bit vector.
    Avx2,
    /// Plain Rust, the definition the others equal bit for bit.
    Portable,
}

impl Kernel {
    /// The fastest kernel for `isa` on this CPU. Cost: a few cached CPUID lookups (once per product).
    pub(crate) fn for_isa(isa: Isa) -> Kernel {
        #[cfg(target_arch = "x86_64")]
        {
            let f16c = std::arch::is_x86_feature_detected!("f16c");
            if matches!(isa, Isa::Avx512Bf16 | Isa::Avx512) && f16c && std::arch::is_x86_feature_detected!("avx512vnni") {
                return Kernel::Avx512Vnni;
            }
            if !matches!(isa, Isa::Scalar) && f16c {
                return Kernel::Avx2;
            }
        }
        let _ = isa;
        Kernel::Portable
    }

    /// Every kernel this CPU can run, fastest first (tests compare them all).
    #[cfg(test)]
    pub(crate) fn all_supported() -> Vec<Kernel> {
        match Kernel::for_isa(Isa::detect()) {
            Kernel::Avx512Vnni => vec![Kernel::Avx512Vnni, Kernel::Avx2, Kernel::Portable],
            Kernel::Avx2 => vec![Kernel::Avx2, Kernel::Portable],
            Kernel::Portable => vec![Kernel::Portable],
        }
    }

    /// Input rows one pass over a group's tiles handles: as many as fit in registers beside the
    /// unpacked tile (AVX-512: 8 value vectors, 2 scale vectors, 2 accumulators per input row).
    fn max_width(self) -> usize {
        match self {
            Kernel::Avx512Vnni => 8,
            Kernel::Avx2 => 4,
            Kernel::Portable => 8,
        }
    }
}

/// `y[t, r] = Σ_c x[t, c] · w[r, c]` for the quantized input rows `xs` and an interleaved
/// `[rows, cols]` matrix of `kind` (`packed`, [`super::interleave::interleave`]'s output).
///
/// Cost: one pass over the weights per [`Kernel::max_width`] input rows, split over the pool's threads
/// by groups of 16 rows.
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul(
    pool: &ThreadPool,
    kernel: Kernel,
    kind: QuantKind,
    xs: &[Q8Row],
    packed: &[u8],
    rows: usize,
    cols: usize,
    y: &mut [f32],
) {
    assert!(super::interleave::interleavable(kind), "{kind:?} has no interleaved layout");
    let (n, nb) = (xs.len(), cols / BLOCK);
    assert_eq!(y.len(), n * rows, "matmul output shape");
    assert!(xs.iter().all(|x| x.q.len() == cols), "input rows of {cols} values");
    let group_bytes = nb * tile_bytes(kind);
    let groups = rows.div_ceil(GROUP_ROWS);
    assert_eq!(packed.len(), groups * group_bytes, "interleaved weight shape");
    if n == 0 || groups == 0 {
        return;
    }
    // Input rows cut into the fewest, most even passes (9 rows: 5 + 4, not 8 + 1).
    let passes = n.div_ceil(kernel.max_width());
    let per_task = groups.div_ceil(pool.threads() * 4).max(1);
    let tasks = groups.div_ceil(per_task);
    let out = OutPtr(y.as_mut_ptr());
    pool.run(tasks, &|i| {
        let out = &out;
        let mut acc = [[0f32; GROUP_ROWS]; 8];
        for g in i * per_task..((i + 1) * per_task).min(groups) {
            let tiles = &packed[g * group_bytes..(g + 1) * group_bytes];
            let valid = (rows - g * GROUP_ROWS).min(GROUP_ROWS);
            let mut t0 = 0;
            for p in 0..passes {
                let width = n / passes + usize::from(p < n % passes);
                let acc = &mut acc[..width];
                group_product(kernel, kind, tiles, nb, &xs[t0..t0 + width], acc);
                for (t, lanes) in acc.iter().enumerate() {
                    for (r, &v) in lanes[..valid].iter().enumerate() {
                        // SAFETY: t0 + t < n and g·16 + r < rows, inside y; each group's outputs are
                        // written by the one task that owns the group.
                        unsafe { *out.0.add((t0 + t) * rows + g * GROUP_ROWS + r) = v };
                    }
                }
                t0 += width;
            }
        }
    });
}

/// One group's 16 rows against `xs` (at most [`Kernel::max_width`] rows): `out[t][r]`.
fn group_product(kernel: Kernel, kind: QuantKind, tiles: &[u8], nb: usize, xs: &[Q8Row], out: &mut [[f32; GROUP_ROWS]]) {
    debug_assert!(xs.len() <= kernel.max_width() && xs.len() == out.len());
    debug_assert_eq!(tiles.len(), nb * tile_bytes(kind));
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::for_isa` found AVX-512 F/BW, VNNI and F16C; `tiles` holds `nb` tiles of
        // `kind` and every input row `nb` blocks (checked by `matmul`).
        Kernel::Avx512Vnni => unsafe { vnni::group(kind, tiles, nb, xs, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Kernel::for_isa` found AVX2, FMA and F16C; shapes as above.
        Kernel::Avx2 => unsafe { avx2::group(kind, tiles, nb, xs, out) },
        _ => group_portable(kind, tiles, nb, xs, out),
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The definition: every row lane and input row on its own, in the order of the module docs.
fn group_portable(kind: QuantKind, tiles: &[u8], nb: usize, xs: &[Q8Row], out: &mut [[f32; GROUP_ROWS]]) {
    let hb = header_bytes(kind);
    let mut acc = [[0f32; GROUP_ROWS]; 8];
    for (b, tile) in tiles.chunks_exact(tile_bytes(kind)).enumerate().take(nb) {
        let values = &tile[GROUP_ROWS * hb..];
        for r in 0..GROUP_ROWS {
            let d = f16_at(tile, 2 * r);
            for (t, x) in xs.iter().enumerate() {
                let qx = &x.q[b * BLOCK..(b + 1) * BLOCK];
                let mut s = 0i32;
                match kind {
                    QuantKind::Q4_0 | QuantKind::Q4_1 => {
                        for k in 0..4 {
                            for j in 0..4 {
                                let v = values[64 * k + 4 * r + j];
                                s += (v & 15) as i32 * qx[4 * k + j] as i32 + (v >> 4) as i32 * qx[16 + 4 * k + j] as i32;
                            }
                        }
                        if kind == QuantKind::Q4_0 {
                            s -= 8 * x.sum[b];
                        }
                    }
                    QuantKind::Q8_0 => {
                        for k in 0..8 {
                            for j in 0..4 {
                                s += (values[64 * k + 4 * r + j] ^ 0x80) as i8 as i32 * qx[4 * k + j] as i32;
                            }
                        }
                    }
                    _ => unreachable!("{kind:?} has no interleaved layout"),
                }
                let mut term = s as f32 * (d * x.d[b]);
                if kind == QuantKind::Q4_1 {
                    term = term + f16_at(tile, 32 + 2 * r) * x.scaled_sum[b];
                }
                acc[t][r] = acc[t][r] + term;
            }
        }
    }
    out.copy_from_slice(&acc[..out.len()]);
}

/// Calls `$f::<W, ...>(args)` for the runtime width `$w` in 1..=8.
#[cfg(target_arch = "x86_64")]
macro_rules! by_width {
    ($w:expr, $f:ident, [$($c:expr),*], $($a:expr),*) => {
        match $w {
            1 => $f::<1 $(, $c)*>($($a),*),
            2 => $f::<2 $(, $c)*>($($a),*),
            3 => $f::<3 $(, $c)*>($($a),*),
            4 => $f::<4 $(, $c)*>($($a),*),
            5 => $f::<5 $(, $c)*>($($a),*),
            6 => $f::<6 $(, $c)*>($($a),*),
            7 => $f::<7 $(, $c)*>($($a),*),
            8 => $f::<8 $(, $c)*>($($a),*),
            w => unreachable!("a pass has 1 to 8 input rows, not {w}"),
        }
    };
}

/// Pointers into one quantized input row, taken once per pass.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct InputPtrs {
    q: *const i8,
    d: *const f32,
    sum: *const i32,
    scaled_sum: *const f32,
}

#[cfg(target_arch = "x86_64")]
fn input_ptrs<const T: usize>(xs: &[Q8Row]) -> [InputPtrs; T] {
    std::array::from_fn(|t| InputPtrs {
        q: xs[t].q.as_ptr(),
        d: xs[t].d.as_ptr(),
        sum: xs[t].sum.as_ptr(),
        scaled_sum: xs[t].scaled_sum.as_ptr(),
    })
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{GROUP_ROWS, InputPtrs, Q8Row, input_ptrs};
    use crate::tensor::QuantKind;

    /// # Safety
    /// AVX-512 F/BW, VNNI and F16C are available; `tiles` holds `nb` tiles of `kind`, each input row
    /// `nb` blocks; `xs.len() == out.len()` is 1 to 8.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(super) unsafe fn group(kind: QuantKind, tiles: &[u8], nb: usize, xs: &[Q8Row], out: &mut [[f32; GROUP_ROWS]]) {
        let w = xs.len();
        // SAFETY: forwarded contract.
        unsafe {
            match kind {
                QuantKind::Q4_0 => by_width!(w, q4, [false], tiles.as_ptr(), nb, xs, out),
                QuantKind::Q4_1 => by_width!(w, q4, [true], tiles.as_ptr(), nb, xs, out),
                QuantKind::Q8_0 => by_width!(w, q8, [], tiles.as_ptr(), nb, xs, out),
                _ => unreachable!("{kind:?} has no interleaved layout"),
            }
        }
    }

    /// The four 4-byte groups of input block values `4·first..4·first + 16`, each broadcast to 16 lanes.
    #[inline(always)]
    unsafe fn broadcast4(q: *const i8, first: usize) -> [__m512i; 4] {
        // SAFETY: the caller's block holds 32 bytes from `q`; unaligned reads.
        unsafe {
            let p = (q as *const i32).add(first);
            [
                _mm512_set1_epi32(p.read_unaligned()),
                _mm512_set1_epi32(p.add(1).read_unaligned()),
                _mm512_set1_epi32(p.add(2).read_unaligned()),
                _mm512_set1_epi32(p.add(3).read_unaligned()),
            ]
        }
    }

    /// Σ_j dpbusd(w[j], x[j]) over four pairs, from zero: one exact i32 sum per lane.
    #[inline(always)]
    fn dot4(w: &[__m512i; 4], x: [__m512i; 4]) -> __m512i {
        // SAFETY (target features): only called from functions that enable avx512vnni.
        unsafe {
            let s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], x[0]);
            let s = _mm512_dpbusd_epi32(s, w[1], x[1]);
            let s = _mm512_dpbusd_epi32(s, w[2], x[2]);
            _mm512_dpbusd_epi32(s, w[3], x[3])
        }
    }

    /// Q4_0 (`MIN` false) and Q4_1 (`MIN` true) tiles: nibbles split into 8 vectors of values 0..15
    /// (chunk `k`'s low nibbles are values `4k..4k+4` of each row, its high nibbles `16+4k..`).
    ///
    /// # Safety
    /// As [`group`], with `T == xs.len() == out.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q4<const T: usize, const MIN: bool>(tiles: *const u8, nb: usize, xs: &[Q8Row], out: &mut [[f32; GROUP_ROWS]]) {
        let low = _mm512_set1_epi8(15);
        let header = if MIN { 64 } else { 32 };
        let tile = header + 256;
        let inputs: [InputPtrs; T] = input_ptrs(xs);
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..nb {
            // SAFETY: tile `b` is inside `tiles` and block `b` inside every input row (contract).
            unsafe {
                let p = tiles.add(b * tile);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
                let m = if MIN { _mm512_cvtph_ps(_mm256_loadu_si256(p.add(32) as *const __m256i)) } else { d };
                let mut lo = [_mm512_setzero_si512(); 4];
                let mut hi = [_mm512_setzero_si512(); 4];
                for k in 0..4 {
                    let v = _mm512_loadu_si512(p.add(header + 64 * k) as *const _);
                    lo[k] = _mm512_and_si512(v, low);
                    hi[k] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
                }
                for t in 0..T {
                    let x = inputs[t];
                    let q = x.q.add(b * 32);
                    // Two independent chains of four, for the dpbusd latency.
                    let mut s = _mm512_add_epi32(dot4(&lo, broadcast4(q, 0)), dot4(&hi, broadcast4(q, 4)));
                    if !MIN {
                        s = _mm512_sub_epi32(s, _mm512_set1_epi32(8 * *x.sum.add(b)));
                    }
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.add(b)));
                    let mut term = _mm512_mul_ps(_mm512_cvtepi32_ps(s), scale);
                    if MIN {
                        term = _mm512_add_ps(term, _mm512_mul_ps(m, _mm512_set1_ps(*x.scaled_sum.add(b))));
                    }
                    acc[t] = _mm512_add_ps(acc[t], term);
                }
            }
        }
        for t in 0..T {
            // SAFETY: out[t] holds 16 f32.
            unsafe { _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]) };
        }
    }

    /// Q8_0 tiles: values stored plus 128 (unsigned, as vpdpbusd's first operand wants), the
    /// `128 · Σ q_x` this adds taken out of the integer sum.
    ///
    /// # Safety
    /// As [`group`], with `T == xs.len() == out.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q8<const T: usize>(tiles: *const u8, nb: usize, xs: &[Q8Row], out: &mut [[f32; GROUP_ROWS]]) {
        const TILE: usize = 32 + 512;
        let inputs: [InputPtrs; T] = input_ptrs(xs);
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..nb {
            // SAFETY: as in `q4`.
            unsafe {
                let p = tiles.add(b * TILE);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i));
                let mut w0 = [_mm512_setzero_si512(); 4];
                let mut w1 = [_mm512_setzero_si512(); 4];
                for k in 0..4 {
                    w0[k] = _mm512_loadu_si512(p.add(32 + 64 * k) as *const _);
                    w1[k] = _mm512_loadu_si512(p.add(32 + 256 + 64 * k) as *const _);
                }
                for t in 0..T {
                    let x = inputs[t];
                    let q = x.q.add(b * 32);
                    let s = _mm512_add_epi32(dot4(&w0, broadcast4(q, 0)), dot4(&w1, broadcast4(q, 4)));
                    let s = _mm512_sub_epi32(s, _mm512_set1_epi32(*x.sum.add(b) << 7));
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x.d.add(b)));
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_cvtepi32_ps(s), scale));
                }
            }
        }
        for t in 0..T {
            // SAFETY: out[t] holds 16 f32.
            unsafe { _mm512_storeu_ps(out[t].as_mut_ptr(), acc[t]) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{GROUP_ROWS, InputPtrs, Q8Row, input_ptrs};
    use crate::tensor::QuantKind;

    /// # Safety
    /// AVX2, FMA and F16C are available; `tiles` holds `nb` tiles of `kind`, each input row `nb`
    /// blocks; `xs.len() == out.len()` is 1 to 4.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group(kind: QuantKind, tiles: &[u8], nb: usize, xs: &[Q8Row], out: &mut [[f32; GROUP_ROWS]]) {
        let w = xs.len();
        // SAFETY: forwarded contract.
        unsafe {
            match kind {
                QuantKind::Q4_0 => by_width!(w, q4, [false], tiles.as_ptr(), nb, xs, out),
                QuantKind::Q4_1 => by_width!(w, q4, [true], tiles.as_ptr(), nb, xs, out),
                QuantKind::Q8_0 => by_width!(w, q8, [], tiles.as_ptr(), nb, xs, out),
                _ => unreachable!("{kind:?} has no interleaved layout"),
            }
        }
    }

    /// 4-byte group `j` of an input block broadcast to 8 lanes.
    #[inline(always)]
    unsafe fn broadcast(q: *const i8, j: usize) -> __m256i {
        // SAFETY: the caller's block holds 32 bytes from `q`; unaligned read.
        unsafe { _mm256_set1_epi32((q as *const i32).add(j).read_unaligned()) }
    }

    /// Q4_0/Q4_1, one half-group (8 rows) at a time. `vpmaddubsw` sums two nibble × byte products to
    /// i16 (at most 2·15·127); the eight of a block are added in i16 (at most 30480, exact) before one
    /// `vpmaddwd` widens each row's pair to i32.
    ///
    /// # Safety
    /// As [`group`], with `T == xs.len() == out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4<const T: usize, const MIN: bool>(tiles: *const u8, nb: usize, xs: &[Q8Row], out: &mut [[f32; GROUP_ROWS]]) {
        let low = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let header = if MIN { 64 } else { 32 };
        let tile = header + 256;
        let inputs: [InputPtrs; T] = input_ptrs(xs);
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                // SAFETY: tile `b` is inside `tiles` and block `b` inside every input row (contract).
                unsafe {
                    let p = tiles.add(b * tile);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * half) as *const __m128i));
                    let m = if MIN { _mm256_cvtph_ps(_mm_loadu_si128(p.add(32 + 16 * half) as *const __m128i)) } else { d };
                    let mut pairs = [_mm256_setzero_si256(); T];
                    for k in 0..4 {
                        let v = _mm256_loadu_si256(p.add(header + 64 * k + 32 * half) as *const __m256i);
                        let lo = _mm256_and_si256(v, low);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
                        for t in 0..T {
                            let q = inputs[t].q.add(b * 32);
                            pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(lo, broadcast(q, k)));
                            pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(hi, broadcast(q, 4 + k)));
                        }
                    }
                    for t in 0..T {
                        let x = inputs[t];
                        let mut s = _mm256_madd_epi16(pairs[t], ones);
                        if !MIN {
                            s = _mm256_sub_epi32(s, _mm256_set1_epi32(8 * *x.sum.add(b)));
                        }
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x.d.add(b)));
                        let mut term = _mm256_mul_ps(_mm256_cvtepi32_ps(s), scale);
                        if MIN {
                            term = _mm256_add_ps(term, _mm256_mul_ps(m, _mm256_set1_ps(*x.scaled_sum.add(b))));
                        }
                        acc[t] = _mm256_add_ps(acc[t], term);
                    }
                }
            }
            for t in 0..T {
                // SAFETY: out[t] holds 16 f32; this half writes 8 of them.
                unsafe { _mm256_storeu_ps(out[t].as_mut_ptr().add(8 * half), acc[t]) };
            }
        }
    }

    /// Q8_0, one half-group at a time: the stored `v + 128` turned back into signed `v`, and
    /// `vpmaddubsw(|v|, ±x)` (at most 2·128·127, exact in i16), widened by `vpmaddwd` per chunk.
    ///
    /// # Safety
    /// As [`group`], with `T == xs.len() == out.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8<const T: usize>(tiles: *const u8, nb: usize, xs: &[Q8Row], out: &mut [[f32; GROUP_ROWS]]) {
        const TILE: usize = 32 + 512;
        let bias = _mm256_set1_epi8(-128);
        let ones = _mm256_set1_epi16(1);
        let inputs: [InputPtrs; T] = input_ptrs(xs);
        for half in 0..2 {
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                // SAFETY: as in `q4`.
                unsafe {
                    let p = tiles.add(b * TILE);
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * half) as *const __m128i));
                    let mut sums = [_mm256_setzero_si256(); T];
                    for k in 0..8 {
                        let v = _mm256_xor_si256(_mm256_loadu_si256(p.add(32 + 64 * k + 32 * half) as *const __m256i), bias);
                        let magnitude = _mm256_abs_epi8(v);
                        for t in 0..T {
                            let x = _mm256_sign_epi8(broadcast(inputs[t].q.add(b * 32), k), v);
                            sums[t] = _mm256_add_epi32(sums[t], _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, x), ones));
                        }
                    }
                    for t in 0..T {
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*inputs[t].d.add(b)));
                        acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_cvtepi32_ps(sums[t]), scale));
                    }
                }
            }
            for t in 0..T {
                // SAFETY: out[t] holds 16 f32; this half writes 8 of them.
                unsafe { _mm256_storeu_ps(out[t].as_mut_ptr().add(8 * half), acc[t]) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::interleave::interleave;
    use crate::backend::cpu::quant::{dot_row_portable, quantize_row};
    use crate::backend::cpu::quant::tests::{blocks_for, values};

    const KINDS: [QuantKind; 3] = [QuantKind::Q4_0, QuantKind::Q4_1, QuantKind::Q8_0];

    fn product(kernel: Kernel, threads: usize, kind: QuantKind, x: &[f32], n: usize, blocks: &[u8], rows: usize, cols: usize) -> Vec<f32> {
        let packed = interleave(kind, rows, cols, blocks);
        let xs: Vec<Q8Row> = x[..n * cols].chunks_exact(cols).map(quantize_row).collect();
        let mut y = vec![f32::NAN; n * rows];
        matmul(&ThreadPool::new(threads), kernel, kind, &xs, &packed, rows, cols, &mut y);
        y
    }

    /// Each product equals the f64 sum over its dequantized weights and its 8-bit inputs to 1e-4, on
    /// every kernel, for a row count that is not whole groups and batch widths on both sides of a pass.
    #[test]
    fn interleaved_products_match_dequantized_weights_against_8_bit_activations() {
        let (rows, cols) = (37, 160);
        for kind in KINDS {
            let blocks = blocks_for(kind, &values(21, rows * cols));
            let deq = crate::gguf::dequantize(kind.ggml_type(), &blocks, (rows * cols) as u64).unwrap();
            let x = values(22, 9 * cols);
            let xr: Vec<f32> = x
                .chunks_exact(cols)
                .flat_map(|r| {
                    let q = quantize_row(r);
                    (0..cols).map(move |c| q.q[c] as f32 * q.d[c / BLOCK]).collect::<Vec<_>>()
                })
                .collect();
            for kernel in Kernel::all_supported() {
                for n in [1, 4, 9] {
                    let y = product(kernel, 2, kind, &x, n, &blocks, rows, cols);
                    for t in 0..n {
                        for r in 0..rows {
                            let want: f64 = (0..cols).map(|c| deq[r * cols + c] as f64 * xr[t * cols + c] as f64).sum();
                            let got = y[t * rows + r] as f64;
                            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "{kind:?} {kernel:?} n{n} t{t} r{r}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    /// Bit for bit the same whatever the kernel, the batch (and so the pass widths) and the thread
    /// split: one input row alone on one thread with the portable code is the reference.
    #[test]
    fn interleaved_products_are_bit_identical_across_kernels_batches_and_threads() {
        let (rows, cols) = (70, 768);
        let x = values(31, 17 * cols);
        for kind in KINDS {
            let blocks = blocks_for(kind, &values(30, rows * cols));
            let mut alone = Vec::new();
            for t in 0..17 {
                alone.extend(product(Kernel::Portable, 1, kind, &x[t * cols..], 1, &blocks, rows, cols));
            }
            for kernel in Kernel::all_supported() {
                for (n, threads) in [(1, 1), (2, 2), (5, 1), (8, 2), (9, 2), (17, 2)] {
                    let y = product(kernel, threads, kind, &x, n, &blocks, rows, cols);
                    assert_eq!(
                        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        alone[..n * rows].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{kind:?} {kernel:?} n{n} threads {threads}"
                    );
                }
            }
        }
    }

    /// The interleaved products equal the per-block definition on ggml's rows (`dot_row_portable`) bit
    /// for bit.
    #[test]
    fn interleaved_products_equal_the_per_block_definition() {
        let (rows, cols) = (37, 512);
        let x = values(41, 3 * cols);
        for kind in KINDS {
            let blocks = blocks_for(kind, &values(40, rows * cols));
            let row_bytes = kind.row_bytes(cols);
            for kernel in Kernel::all_supported() {
                let y = product(kernel, 2, kind, &x, 3, &blocks, rows, cols);
                for t in 0..3 {
                    let xq = quantize_row(&x[t * cols..(t + 1) * cols]);
                    for r in 0..rows {
                        let want = dot_row_portable(kind, Isa::Scalar, &blocks[r * row_bytes..(r + 1) * row_bytes], &xq);
                        assert_eq!(y[t * rows + r].to_bits(), want.to_bits(), "{kind:?} {kernel:?} t{t} r{r}");
                    }
                }
            }
        }
    }

    /// Q8_0's extremes: weights −128 and 127 (the storage bias wraps both ways) against inputs ±127,
    /// where AVX2's `|v|` is 128 and the i16 pair sums are closest to overflowing.
    #[test]
    fn q8_0_extreme_values_are_exact() {
        let (rows, cols) = (16, 64);
        let mut blocks = Vec::new();
        for r in 0..rows {
            for b in 0..cols / BLOCK {
                blocks.extend(half::f16::from_f32(1.0).to_le_bytes());
                blocks.extend((0..32).map(|j| if (r + b + j) % 3 == 0 { 0x80u8 } else { 127 }));
            }
        }
        let x: Vec<f32> = (0..cols).map(|c| if c % 5 == 0 { -1.0 } else { 1.0 }).collect();
        let xq = quantize_row(&x);
        for kernel in Kernel::all_supported() {
            let y = product(kernel, 1, QuantKind::Q8_0, &x, 1, &blocks, rows, cols);
            for r in 0..rows {
                let mut want = 0f32;
                for b in 0..cols / BLOCK {
                    let s: i32 = (0..32)
                        .map(|j| {
                            let w = if (r + b + j) % 3 == 0 { -128 } else { 127 };
                            w * xq.q[b * BLOCK + j] as i32
                        })
                        .sum();
                    want = want + s as f32 * (1.0 * xq.d[b]);
                }
                assert_eq!(y[r].to_bits(), want.to_bits(), "{kernel:?} row {r}: {} vs {want}", y[r]);
            }
        }
    }
}
