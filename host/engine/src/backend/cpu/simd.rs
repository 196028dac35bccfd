//! The vector instruction sets the CPU kernels run on, behind one small trait.
//!
//! Every kernel is written once, generically over [`Simd`], and instantiated per instruction set inside a
//! `#[target_feature]` entry point (see `isa_entry!` users). All trait methods are `#[inline(always)]`,
//! so after inlining into such an entry point the intrinsics compile to plain instructions.
//!
//! Numerics that callers rely on for determinism:
//! - [`Simd::reduce_sum`] adds lanes in one fixed tree (documented on the method), and
//!   [`Simd::reduce_sums`] produces bit-identical results to calling `reduce_sum` on each vector.
//! - [`Simd::fma`] is fused on the SIMD sets and an unfused multiply-add on [`Scalar`]; a process picks
//!   one set at start-up ([`Isa::detect`]) and uses it for every call, so results never depend on it.
//! - [`Simd::exp`] is a fixed polynomial (Cephes `expf`, ~1 ulp on the range used by softmax).

#![allow(clippy::missing_safety_doc)]

/// The instruction set chosen for this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 F/BW/VL/DQ plus AVX-512 BF16 (`vdpbf16ps`), e.g. AMD Zen 4, Intel Sapphire Rapids.
    Avx512Bf16,
    /// AVX-512 F/BW/VL/DQ without BF16 dot products.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Portable code (8-wide arrays the compiler may vectorise).
    Scalar,
}

impl Isa {
    /// The best instruction set this CPU supports. Cost: a few cached CPUID lookups.
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma");
            if avx512 && is_x86_feature_detected!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            if avx512 {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// [`Isa::detect`], computed once per process.
    pub(crate) fn get() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(Isa::detect)
    }

    /// Every instruction set this CPU can run, best first (tests run kernels on each).
    #[cfg(test)]
    pub(crate) fn all_supported() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .filter(|isa| match (best, isa) {
                (Isa::Avx512Bf16, _) => true,
                (Isa::Avx512, i) => *i != Isa::Avx512Bf16,
                (Isa::Avx2, i) => matches!(i, Isa::Avx2 | Isa::Scalar),
                (Isa::Scalar, i) => *i == Isa::Scalar,
            })
            .collect()
    }
}

/// f32 vectors of one instruction set. Implementors are zero-sized tokens that exist only once the
/// instruction set has been detected, which is what makes the intrinsic calls inside sound.
pub(crate) trait Simd: Copy + Send + Sync + 'static {
    /// f32 lanes per vector.
    const LANES: usize;
    type F: Copy;

    fn zero(self) -> Self::F;
    fn splat(self, v: f32) -> Self::F;
    /// # Safety
    /// `p..p + LANES` must be readable.
    unsafe fn load(self, p: *const f32) -> Self::F;
    /// Loads `len < LANES` values and zero-fills the other lanes.
    /// # Safety
    /// `p..p + len` must be readable.
    unsafe fn load_partial(self, p: *const f32, len: usize) -> Self::F;
    /// # Safety
    /// `p..p + LANES` must be writable.
    unsafe fn store(self, p: *mut f32, v: Self::F);
    /// # Safety
    /// `p..p + len` must be writable (`len <= LANES`).
    unsafe fn store_partial(self, p: *mut f32, v: Self::F, len: usize);
    /// Loads `LANES` bf16 values (raw bits) widened exactly to f32.
    /// # Safety
    /// `p..p + LANES` must be readable.
    unsafe fn load_bf16(self, p: *const u16) -> Self::F;
    /// Loads `len < LANES` bf16 values widened to f32 and zero-fills the other lanes.
    /// # Safety
    /// `p..p + len` must be readable.
    unsafe fn load_bf16_partial(self, p: *const u16, len: usize) -> Self::F;
    /// A hint to pull the cache line at `p` into L1; never faults.
    fn prefetch(self, p: *const u8);

    /// `a * b + c` (fused on SIMD sets).
    fn fma(self, a: Self::F, b: Self::F, c: Self::F) -> Self::F;
    fn add(self, a: Self::F, b: Self::F) -> Self::F;
    fn sub(self, a: Self::F, b: Self::F) -> Self::F;
    fn mul(self, a: Self::F, b: Self::F) -> Self::F;
    fn div(self, a: Self::F, b: Self::F) -> Self::F;
    fn max(self, a: Self::F, b: Self::F) -> Self::F;
    /// Lanes `i < lo` or `i >= hi` replaced by `v`.
    fn fill_outside(self, a: Self::F, lo: usize, hi: usize, v: f32) -> Self::F;
    /// `e^a` lane-wise (Cephes polynomial; inputs below -88.38 give ~0, above 88.38 are clamped).
    fn exp(self, a: Self::F) -> Self::F;
    /// Lane `i` of `v`.
    fn lane(self, v: Self::F, i: usize) -> f32;

    /// Sum of the lanes in a fixed tree: with `L = LANES`, first `l[j] + l[j + L/2]`, then the same
    /// halving on the result, down to one value.
    fn reduce_sum(self, v: Self::F) -> f32;
    /// The largest lane (exact, so its order does not matter).
    fn reduce_max(self, v: Self::F) -> f32;

    /// `out[i] = reduce_sum(v[i])`, bit for bit, possibly faster for many vectors.
    #[inline(always)]
    fn reduce_sums(self, v: &[Self::F], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(v) {
            *o = self.reduce_sum(*v);
        }
    }
}

// Cephes expf constants.
const EXP_HI: f32 = 88.376_26;
const EXP_LO: f32 = -88.376_26;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const EXP_C1: f32 = 0.693_359_4;
const EXP_C2: f32 = -2.121_944_4e-4;
const EXP_P: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];

/// Portable implementation: 8 lanes as an array, unfused multiply-add.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    const LANES: usize = 8;
    type F = [f32; 8];

    #[inline(always)]
    fn zero(self) -> [f32; 8] {
        [0.0; 8]
    }
    #[inline(always)]
    fn splat(self, v: f32) -> [f32; 8] {
        [v; 8]
    }
    #[inline(always)]
    unsafe fn load(self, p: *const f32) -> [f32; 8] {
        // SAFETY: the caller guarantees 8 readable values.
        unsafe { std::ptr::read_unaligned(p as *const [f32; 8]) }
    }
    #[inline(always)]
    unsafe fn load_partial(self, p: *const f32, len: usize) -> [f32; 8] {
        let mut out = [0.0; 8];
        for (i, o) in out.iter_mut().enumerate().take(len) {
            // SAFETY: the caller guarantees `len` readable values.
            *o = unsafe { *p.add(i) };
        }
        out
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32, v: [f32; 8]) {
        // SAFETY: the caller guarantees 8 writable values.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; 8], v) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f32, v: [f32; 8], len: usize) {
        for (i, v) in v.iter().enumerate().take(len) {
            // SAFETY: the caller guarantees `len` writable values.
            unsafe { *p.add(i) = *v };
        }
    }
    #[inline(always)]
    unsafe fn load_bf16(self, p: *const u16) -> [f32; 8] {
        // SAFETY: the caller guarantees 8 readable values.
        let raw = unsafe { std::ptr::read_unaligned(p as *const [u16; 8]) };
        raw.map(|b| f32::from_bits((b as u32) << 16))
    }
    #[inline(always)]
    unsafe fn load_bf16_partial(self, p: *const u16, len: usize) -> [f32; 8] {
        let mut out = [0.0; 8];
        for (i, o) in out.iter_mut().enumerate().take(len) {
            // SAFETY: the caller guarantees `len` readable values.
            *o = f32::from_bits((unsafe { *p.add(i) } as u32) << 16);
        }
        out
    }
    #[inline(always)]
    fn prefetch(self, _p: *const u8) {}
    #[inline(always)]
    fn fma(self, a: [f32; 8], b: [f32; 8], c: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i] + c[i])
    }
    #[inline(always)]
    fn add(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] + b[i])
    }
    #[inline(always)]
    fn sub(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] - b[i])
    }
    #[inline(always)]
    fn mul(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] * b[i])
    }
    #[inline(always)]
    fn div(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| a[i] / b[i])
    }
    #[inline(always)]
    fn max(self, a: [f32; 8], b: [f32; 8]) -> [f32; 8] {
        std::array::from_fn(|i| if a[i] > b[i] { a[i] } else { b[i] })
    }
    #[inline(always)]
    fn fill_outside(self, a: [f32; 8], lo: usize, hi: usize, v: f32) -> [f32; 8] {
        std::array::from_fn(|i| if i >= lo && i < hi { a[i] } else { v })
    }
    #[inline(always)]
    fn exp(self, a: [f32; 8]) -> [f32; 8] {
        a.map(|x| {
            let x = x.clamp(EXP_LO, EXP_HI);
            let fx = (x * LOG2E).round_ties_even();
            let r = x - fx * EXP_C1 - fx * EXP_C2;
            let mut y = EXP_P[0];
            for p in &EXP_P[1..] {
                y = y * r + p;
            }
            let y = y * (r * r) + (r + 1.0);
            // 2^n in two factors so that n = -128..=128 stays in range.
            let n = fx as i32;
            let half = n >> 1;
            let p1 = f32::from_bits(((half + 127) as u32) << 23);
            let p2 = f32::from_bits(((n - half + 127) as u32) << 23);
            y * p1 * p2
        })
    }
    #[inline(always)]
    fn lane(self, v: [f32; 8], i: usize) -> f32 {
        v[i]
    }
    #[inline(always)]
    fn reduce_sum(self, v: [f32; 8]) -> f32 {
        let a: [f32; 4] = std::array::from_fn(|j| v[j] + v[j + 4]);
        let b = [a[0] + a[2], a[1] + a[3]];
        b[0] + b[1]
    }
    #[inline(always)]
    fn reduce_max(self, v: [f32; 8]) -> f32 {
        v.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512, Avx512Bf16Dot};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Lane masks for partial AVX2 loads: entry `len` has the first `len` lanes set.
    static AVX2_MASKS: [[i32; 8]; 9] = {
        let mut m = [[0i32; 8]; 9];
        let mut len = 0;
        while len <= 8 {
            let mut i = 0;
            while i < len {
                m[len][i] = -1;
                i += 1;
            }
            len += 1;
        }
        m
    };

    /// AVX2 + FMA, 8 lanes.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx2(());

    impl Avx2 {
        /// The token, if this CPU has AVX2 and FMA.
        #[cfg(test)]
        pub(crate) fn new() -> Option<Self> {
            (is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")).then_some(Avx2(()))
        }
        /// The token without checking.
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[inline(always)]
        pub(crate) unsafe fn new_unchecked() -> Self {
            Avx2(())
        }
        #[inline(always)]
        fn mask(len: usize) -> __m256i {
            // SAFETY: `len <= 8` (callers pass partial lengths) so the row exists; AVX is present.
            unsafe { _mm256_loadu_si256(AVX2_MASKS[len].as_ptr() as *const __m256i) }
        }
    }

    // SAFETY (for every `unsafe` block in this impl): an `Avx2` value exists only after AVX2 and FMA were
    // detected, so the intrinsics are supported; pointer validity is the caller's contract.
    impl Simd for Avx2 {
        const LANES: usize = 8;
        type F = __m256;

        #[inline(always)]
        fn zero(self) -> __m256 {
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, v: f32) -> __m256 {
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m256 {
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_partial(self, p: *const f32, len: usize) -> __m256 {
            unsafe { _mm256_maskload_ps(p, Self::mask(len)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m256) {
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, v: __m256, len: usize) {
            unsafe { _mm256_maskstore_ps(p, Self::mask(len), v) }
        }
        #[inline(always)]
        unsafe fn load_bf16(self, p: *const u16) -> __m256 {
            unsafe {
                let raw = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
            }
        }
        #[inline(always)]
        unsafe fn load_bf16_partial(self, p: *const u16, len: usize) -> __m256 {
            let mut buf = [0u16; 8];
            // SAFETY: the caller guarantees `len < 8` readable values; `buf` has room for 8.
            unsafe {
                std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), len);
                self.load_bf16(buf.as_ptr())
            }
        }
        #[inline(always)]
        fn prefetch(self, p: *const u8) {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        #[inline(always)]
        fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_div_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m256, b: __m256) -> __m256 {
            unsafe { _mm256_max_ps(a, b) }
        }
        #[inline(always)]
        fn fill_outside(self, a: __m256, lo: usize, hi: usize, v: f32) -> __m256 {
            unsafe {
                let keep = _mm256_andnot_si256(Self::mask(lo.min(8)), Self::mask(hi.min(8)));
                _mm256_blendv_ps(_mm256_set1_ps(v), a, _mm256_castsi256_ps(keep))
            }
        }
        #[inline(always)]
        fn exp(self, a: __m256) -> __m256 {
            unsafe {
                let x = _mm256_min_ps(_mm256_max_ps(a, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
                let fx = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
                    x,
                    _mm256_set1_ps(LOG2E),
                ));
                let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_C1), x);
                let r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(EXP_C2), r);
                let mut y = _mm256_set1_ps(EXP_P[0]);
                for p in &EXP_P[1..] {
                    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(*p));
                }
                let y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
                // 2^fx built in two steps so that fx = -127..128 never overflows the exponent field.
                let n = _mm256_cvtps_epi32(fx);
                let half = _mm256_srai_epi32::<1>(n);
                let p1 = _mm256_slli_epi32::<23>(_mm256_add_epi32(half, _mm256_set1_epi32(127)));
                let p2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_sub_epi32(n, half), _mm256_set1_epi32(127)));
                _mm256_mul_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(p1)), _mm256_castsi256_ps(p2))
            }
        }
        #[inline(always)]
        fn lane(self, v: __m256, i: usize) -> f32 {
            let mut buf = [0f32; 8];
            unsafe { _mm256_storeu_ps(buf.as_mut_ptr(), v) };
            buf[i]
        }
        #[inline(always)]
        fn reduce_sum(self, v: __m256) -> f32 {
            unsafe {
                let a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let b = _mm_add_ps(a, _mm_movehl_ps(a, a));
                let c = _mm_add_ss(b, _mm_shuffle_ps::<0b01>(b, b));
                _mm_cvtss_f32(c)
            }
        }
        #[inline(always)]
        fn reduce_max(self, v: __m256) -> f32 {
            unsafe {
                let a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let b = _mm_max_ps(a, _mm_movehl_ps(a, a));
                let c = _mm_max_ss(b, _mm_shuffle_ps::<0b01>(b, b));
                _mm_cvtss_f32(c)
            }
        }
    }

    /// AVX-512 F/BW/VL/DQ, 16 lanes.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx512(());

    impl Avx512 {
        /// The token, if this CPU has the AVX-512 subsets the kernels use (and AVX2/FMA).
        #[cfg(test)]
        pub(crate) fn new() -> Option<Self> {
            matches!(Isa::detect(), Isa::Avx512 | Isa::Avx512Bf16).then_some(Avx512(()))
        }
        /// The token without checking.
        /// # Safety
        /// The CPU must support AVX-512 F/BW/VL/DQ, AVX2 and FMA.
        #[inline(always)]
        pub(crate) unsafe fn new_unchecked() -> Self {
            Avx512(())
        }
        #[inline(always)]
        fn mask(len: usize) -> __mmask16 {
            if len >= 16 {
                0xFFFF
            } else {
                ((1u32 << len) - 1) as __mmask16
            }
        }
    }

    /// Adds vectors pairwise in the first step of the canonical tree for two vectors at once:
    /// lanes 0..8 of the result are `a[j] + a[j+8]`, lanes 8..16 are `b[j] + b[j+8]`.
    #[inline(always)]
    unsafe fn halve2(a: __m512, b: __m512) -> __m512 {
        // SAFETY: only called from AVX-512 contexts (see the impl below).
        unsafe {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b),
            )
        }
    }

    /// Second step for two vectors laid out as [`halve2`] leaves them (two 8-lane halves each): result
    /// quarter q holds `x[j] + x[j+4]` of the q-th 8-lane half among (a.lo, a.hi, b.lo, b.hi).
    #[inline(always)]
    unsafe fn quarter2(a: __m512, b: __m512) -> __m512 {
        // SAFETY: only called from AVX-512 contexts.
        unsafe {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        }
    }

    /// Sums of 16 vectors, each through the canonical tree; lane `i` of the result is the sum of `v[i]`.
    #[inline(always)]
    unsafe fn reduce16(v: &[__m512; 16]) -> __m512 {
        // SAFETY: only called from AVX-512 contexts.
        unsafe {
            // Step 1: l[j] + l[j+8]. t[i] holds vectors 2i (lanes 0..8) and 2i+1 (lanes 8..16).
            // (Plain loops, not closures: everything here must inline into the feature-gated caller.)
            let mut t = [_mm512_setzero_ps(); 8];
            for i in 0..8 {
                t[i] = halve2(v[2 * i], v[2 * i + 1]);
            }
            // Step 2: a[j] + a[j+4]. u[i] quarter q holds vector 4i+q.
            let mut u = [_mm512_setzero_ps(); 4];
            for i in 0..4 {
                u[i] = quarter2(t[2 * i], t[2 * i + 1]);
            }
            // Step 3: b[j] + b[j+2], within each 128-bit quarter. w[0] quarter q holds
            // (c0, c1) of vector q in lanes 0,1 and of vector 4+q in lanes 2,3; w[1] the same for 8+q, 12+q.
            let w0 = _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(u[0], u[1]),
                _mm512_shuffle_ps::<0b11_10_11_10>(u[0], u[1]),
            );
            let w1 = _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(u[2], u[3]),
                _mm512_shuffle_ps::<0b11_10_11_10>(u[2], u[3]),
            );
            // Step 4: c0 + c1. Quarter q lanes hold vectors q, 4+q, 8+q, 12+q.
            let d = _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(w0, w1),
                _mm512_shuffle_ps::<0b11_01_11_01>(w0, w1),
            );
            // Lane 4q + k holds vector 4k + q; put vector i in lane i.
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
            _mm512_permutexvar_ps(idx, d)
        }
    }

    /// Sums of 8 vectors through the canonical tree (the first half of [`reduce16`]'s work); lane `i < 8`
    /// of the result is the sum of `v[i]`, lanes 8.. are unspecified.
    #[inline(always)]
    unsafe fn reduce8(v: &[__m512; 8]) -> __m512 {
        // SAFETY: only called from AVX-512 contexts.
        unsafe {
            let mut t = [_mm512_setzero_ps(); 4];
            for i in 0..4 {
                t[i] = halve2(v[2 * i], v[2 * i + 1]);
            }
            let u0 = quarter2(t[0], t[1]);
            let u1 = quarter2(t[2], t[3]);
            let w = _mm512_add_ps(
                _mm512_shuffle_ps::<0b01_00_01_00>(u0, u1),
                _mm512_shuffle_ps::<0b11_10_11_10>(u0, u1),
            );
            // Quarter q: lane 0 holds vector q, lane 1 vector 4+q (as in `reduce16`).
            let d = _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(w, w),
                _mm512_shuffle_ps::<0b11_01_11_01>(w, w),
            );
            let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
            _mm512_permutexvar_ps(idx, d)
        }
    }

    // SAFETY (for every `unsafe` block in this impl): an `Avx512` value exists only after AVX-512
    // F/BW/VL/DQ were detected, so the intrinsics are supported; pointer validity is the caller's contract.
    impl Simd for Avx512 {
        const LANES: usize = 16;
        type F = __m512;

        #[inline(always)]
        fn zero(self) -> __m512 {
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn splat(self, v: f32) -> __m512 {
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn load(self, p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn load_partial(self, p: *const f32, len: usize) -> __m512 {
            unsafe { _mm512_maskz_loadu_ps(Self::mask(len), p) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32, v: __m512) {
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, v: __m512, len: usize) {
            unsafe { _mm512_mask_storeu_ps(p, Self::mask(len), v) }
        }
        #[inline(always)]
        unsafe fn load_bf16(self, p: *const u16) -> __m512 {
            unsafe {
                let raw = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
            }
        }
        #[inline(always)]
        unsafe fn load_bf16_partial(self, p: *const u16, len: usize) -> __m512 {
            unsafe {
                let raw = _mm256_maskz_loadu_epi16(Self::mask(len), p as *const i16);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
            }
        }
        #[inline(always)]
        fn prefetch(self, p: *const u8) {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn div(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_div_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn fill_outside(self, a: __m512, lo: usize, hi: usize, v: f32) -> __m512 {
            let keep = Self::mask(hi) & !Self::mask(lo);
            unsafe { _mm512_mask_blend_ps(keep, _mm512_set1_ps(v), a) }
        }
        #[inline(always)]
        fn exp(self, a: __m512) -> __m512 {
            unsafe {
                let x = _mm512_min_ps(_mm512_max_ps(a, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
                let fx = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
                    x,
                    _mm512_set1_ps(LOG2E),
                ));
                let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_C1), x);
                let r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(EXP_C2), r);
                let mut y = _mm512_set1_ps(EXP_P[0]);
                for p in &EXP_P[1..] {
                    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(*p));
                }
                let y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0)));
                _mm512_scalef_ps(y, fx)
            }
        }
        #[inline(always)]
        fn lane(self, v: __m512, i: usize) -> f32 {
            let mut buf = [0f32; 16];
            unsafe { _mm512_storeu_ps(buf.as_mut_ptr(), v) };
            buf[i]
        }
        #[inline(always)]
        fn reduce_sum(self, v: __m512) -> f32 {
            unsafe {
                let a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
                let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
                let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
                let d = _mm_add_ss(c, _mm_shuffle_ps::<0b01>(c, c));
                _mm_cvtss_f32(d)
            }
        }
        #[inline(always)]
        fn reduce_max(self, v: __m512) -> f32 {
            unsafe { _mm512_reduce_max_ps(v) }
        }
        #[inline(always)]
        fn reduce_sums(self, v: &[__m512], out: &mut [f32]) {
            debug_assert_eq!(v.len(), out.len());
            let mut chunks = v.chunks_exact(16);
            let mut outs = out.chunks_exact_mut(16);
            for (c, o) in (&mut chunks).zip(&mut outs) {
                let arr: &[__m512; 16] = c.try_into().expect("chunks_exact(16) yields 16 vectors");
                // SAFETY: `o` has exactly 16 writable values.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), reduce16(arr)) };
            }
            let rest = chunks.remainder();
            let out_rest = outs.into_remainder();
            if rest.len() > 8 {
                let mut arr = [self.zero(); 16];
                arr[..rest.len()].copy_from_slice(rest);
                // SAFETY: `out_rest` has `rest.len()` writable values, the mask covers exactly those.
                unsafe { _mm512_mask_storeu_ps(out_rest.as_mut_ptr(), Self::mask(rest.len()), reduce16(&arr)) };
            } else if rest.len() > 4 {
                let mut arr = [self.zero(); 8];
                arr[..rest.len()].copy_from_slice(rest);
                // SAFETY: as above.
                unsafe { _mm512_mask_storeu_ps(out_rest.as_mut_ptr(), Self::mask(rest.len()), reduce8(&arr)) };
            } else {
                for (o, v) in out_rest.iter_mut().zip(rest) {
                    *o = self.reduce_sum(*v);
                }
            }
        }
    }

    /// AVX-512 BF16 on top of [`Avx512`]: `vdpbf16ps` dot products of bf16 pairs into f32 lanes.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Avx512Bf16Dot(pub(crate) Avx512);

    impl Avx512Bf16Dot {
        /// The token without checking.
        /// # Safety
        /// The CPU must support everything [`Avx512`] needs plus AVX-512 BF16.
        #[inline(always)]
        pub(crate) unsafe fn new_unchecked() -> Self {
            Avx512Bf16Dot(Avx512(()))
        }

        /// `acc[i] += w[2i]·x[2i] + w[2i+1]·x[2i+1]` over 32 bf16 pairs (`vdpbf16ps`: products exact,
        /// two roundings per lane, denormal inputs and outputs flushed to zero).
        #[inline(always)]
        pub(crate) fn dot_pairs(self, acc: __m512, w: __m512i, x: __m512i) -> __m512 {
            // SAFETY: the token proves AVX-512 BF16; __m512i and __m512bh are both 64-byte vectors.
            unsafe {
                _mm512_dpbf16_ps(
                    acc,
                    std::mem::transmute::<__m512i, __m512bh>(w),
                    std::mem::transmute::<__m512i, __m512bh>(x),
                )
            }
        }

        /// An all-zero raw vector.
        #[inline(always)]
        pub(crate) fn zero_raw(self) -> __m512i {
            // SAFETY: the token proves AVX-512 F.
            unsafe { _mm512_setzero_si512() }
        }

        /// Loads 32 bf16 values (raw).
        /// # Safety
        /// `p..p + 32` must be readable.
        #[inline(always)]
        pub(crate) unsafe fn load_raw(self, p: *const u16) -> __m512i {
            // SAFETY: the caller guarantees 64 readable bytes.
            unsafe { _mm512_loadu_si512(p as *const __m512i) }
        }

        /// Rounds 32 f32 values to bf16 (round to nearest even, as `vcvtne2ps2bf16`) into `out`.
        /// # Safety
        /// `x..x + 32` readable, `out..out + 32` writable.
        #[inline(always)]
        pub(crate) unsafe fn round_32(self, x: *const f32, out: *mut u16) {
            // SAFETY: pointer validity is the caller's contract; the token proves AVX-512 BF16.
            unsafe {
                let lo = _mm512_loadu_ps(x);
                let hi = _mm512_loadu_ps(x.add(16));
                let packed = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(out as *mut __m512i, std::mem::transmute::<__m512bh, __m512i>(packed));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree16(l: &[f32; 16]) -> f32 {
        let a: [f32; 8] = std::array::from_fn(|j| l[j] + l[j + 8]);
        let b: [f32; 4] = std::array::from_fn(|j| a[j] + a[j + 4]);
        let c = [b[0] + b[2], b[1] + b[3]];
        c[0] + c[1]
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_reductions_follow_the_canonical_tree() {
        let Some(s) = Avx512::new() else { return };
        let mut seed = 1u32;
        let mut next = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            // Wide dynamic range so that any change of order shows up in the bits.
            (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
        };
        for count in [1usize, 3, 4, 5, 7, 8, 9, 12, 16, 17, 24, 40] {
            let lanes: Vec<[f32; 16]> = (0..count)
                .map(|i| std::array::from_fn(|_| next() * 10f32.powi((i % 7) as i32 - 3)))
                .collect();
            // SAFETY: each array has 16 readable values.
            let vecs: Vec<_> = lanes.iter().map(|l| unsafe { s.load(l.as_ptr()) }).collect();
            let mut fast = vec![0f32; count];
            s.reduce_sums(&vecs, &mut fast);
            for (i, l) in lanes.iter().enumerate() {
                assert_eq!(fast[i].to_bits(), tree16(l).to_bits(), "count {count}, vector {i}");
                assert_eq!(s.reduce_sum(vecs[i]).to_bits(), tree16(l).to_bits());
            }
        }
    }


    #[test]
    fn exp_is_accurate_on_every_isa() {
        fn check<S: Simd>(s: S) {
            let mut x = -90.0f32;
            while x < 10.0 {
                let xs = vec![x; S::LANES];
                // SAFETY: `xs` has LANES readable values.
                let got = s.lane(s.exp(unsafe { s.load(xs.as_ptr()) }), 0);
                let want = x.exp();
                let tol = want.abs() * 4e-7 + 1e-38;
                assert!((got - want).abs() <= tol, "exp({x}) = {got}, want {want}");
                x += 0.37;
            }
        }
        check(Scalar);
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(s) = Avx2::new() {
                check(s);
            }
            if let Some(s) = Avx512::new() {
                check(s);
            }
        }
    }
}
