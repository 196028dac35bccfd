//! Element-wise and row-wise operations: RMSNorm and SwiGLU, vectorised, f32 throughout.
//!
//! Both run on the calling thread: they touch a few thousand values per token, far less than one
//! dispatch to the pool would cost.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{Isa, Scalar, Simd};

/// RMSNorm in f32: `out = x / sqrt(mean(x²) + eps) * weight`, row by row over `[n, dim]` with
/// `dim = weight.len()`.
///
/// Numerics: the sum of squares is accumulated lane-wise and reduced in a fixed tree (f32), then each
/// value is computed as `(x · inv) · weight`. Cost: about `3 · x.len()` flops, one pass over `x`.
///
/// # Panics
/// If `x.len()` is not a multiple of `weight.len()` or `out.len() != x.len()`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    assert_eq!(out.len(), x.len(), "rms_norm output shape");
    if dim == 0 {
        return;
    }
    assert_eq!(x.len() % dim, 0, "rms_norm input is not a whole number of rows");
    // SAFETY: `Isa::get` only returns instruction sets this CPU supports.
    unsafe {
        match Isa::get() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => rms_norm_avx512(x, weight, eps, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => rms_norm_avx2(x, weight, eps, out),
            _ => rms_norm_generic(Scalar, x, weight, eps, out),
        }
    }
}

/// SwiGLU in place: `gate = silu(gate) · up = gate / (1 + e^(−gate)) · up`, f32.
///
/// Numerics: `e^x` is the backend's fixed polynomial (~1 ulp), so results differ from libm's `exp` in the
/// last bit or so. Cost: one pass over both slices, ~20 flops per value.
///
/// # Panics
/// If the lengths differ.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul shapes");
    // SAFETY: `Isa::get` only returns instruction sets this CPU supports.
    unsafe {
        match Isa::get() {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => silu_mul_avx512(gate, up),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => silu_mul_avx2(gate, up),
            _ => silu_mul_generic(Scalar, gate, up),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn rms_norm_avx512(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // SAFETY: only reached on CPUs with these features.
    rms_norm_generic(unsafe { Avx512::new_unchecked() }, x, weight, eps, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rms_norm_avx2(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    // SAFETY: only reached on CPUs with these features.
    rms_norm_generic(unsafe { Avx2::new_unchecked() }, x, weight, eps, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn silu_mul_avx512(gate: &mut [f32], up: &[f32]) {
    // SAFETY: only reached on CPUs with these features.
    silu_mul_generic(unsafe { Avx512::new_unchecked() }, gate, up)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
    // SAFETY: only reached on CPUs with these features.
    silu_mul_generic(unsafe { Avx2::new_unchecked() }, gate, up)
}

/// Loads `len <= LANES` values starting at `i` (a full vector when `len == LANES`).
///
/// # Safety
/// `p..p + len` readable.
#[inline(always)]
unsafe fn load_n<S: Simd>(s: S, p: *const f32, len: usize) -> S::F {
    // SAFETY: forwarded.
    unsafe {
        if len == S::LANES {
            s.load(p)
        } else {
            s.load_partial(p, len)
        }
    }
}

#[inline(always)]
fn rms_norm_generic<S: Simd>(s: S, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    let lanes = S::LANES;
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mut acc = s.zero();
        let mut c = 0;
        // SAFETY (every load/store below): `c + len <= dim` and all three rows have `dim` values.
        while c < dim {
            let len = (dim - c).min(lanes);
            let v = unsafe { load_n(s, xr.as_ptr().add(c), len) };
            acc = s.fma(v, v, acc);
            c += lanes;
        }
        let ms = s.reduce_sum(acc) / dim as f32;
        let inv = s.splat(1.0 / (ms + eps).sqrt());
        let mut c = 0;
        while c < dim {
            let len = (dim - c).min(lanes);
            let v = unsafe { load_n(s, xr.as_ptr().add(c), len) };
            let w = unsafe { load_n(s, weight.as_ptr().add(c), len) };
            unsafe { s.store_partial(or.as_mut_ptr().add(c), s.mul(s.mul(v, inv), w), len) };
            c += lanes;
        }
    }
}

#[inline(always)]
fn silu_mul_generic<S: Simd>(s: S, gate: &mut [f32], up: &[f32]) {
    let lanes = S::LANES;
    let one = s.splat(1.0);
    let zero = s.zero();
    let mut c = 0;
    // SAFETY (every load/store below): `c + len <= gate.len() == up.len()`.
    while c < gate.len() {
        let len = (gate.len() - c).min(lanes);
        let g = unsafe { load_n(s, gate.as_ptr().add(c), len) };
        let u = unsafe { load_n(s, up.as_ptr().add(c), len) };
        let silu = s.div(g, s.add(one, s.exp(s.sub(zero, g))));
        unsafe { s.store_partial(gate.as_mut_ptr().add(c), s.mul(silu, u), len) };
        c += lanes;
    }
}
