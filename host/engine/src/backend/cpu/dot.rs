//! The register-tiled dot-product kernel every f32-accumulating matrix product is built on.
//!
//! A tile computes `y[t, r] = Σ_c x[t, c] · w[r, c]` for `R` weight rows and `T` input rows at once, in
//! "dot-product form": both operands are read along `c`, which is contiguous in both, so nothing has to be
//! packed or transposed. Each output owns one vector accumulator whose lane `i` sums the products of the
//! columns `c ≡ i (mod LANES)` in increasing `c` order (the last, partial chunk is zero-filled), and the
//! lanes are then added in the fixed tree of [`Simd::reduce_sum`].
//!
//! That order depends only on `cols` and the instruction set, never on `R`, `T`, the number of input rows,
//! or how rows are split between threads. This is what makes batched decode and prefill give bit-identical
//! results for the same weight row and input row (invariant 2 of ARCHITECTURE.md). The bf16 dot-product
//! path ([`super::gemm`]) reuses [`store_tile`], hence the same lane tree.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{Isa, Scalar, Simd};

/// Largest tile height (weight rows per tile).
pub(crate) const TILE_ROWS: usize = 4;
/// Largest tile width (input rows per tile) on any instruction set; see [`tile_width`].
pub(crate) const MAX_TILE_WIDTH: usize = 6;

/// Input rows per tile for an instruction set: as many as its register file holds next to
/// `TILE_ROWS` weight vectors (AVX-512: 4×6 accumulators in 32 registers; 16-register sets: 4×2).
pub(crate) const fn tile_width<S: Simd>() -> usize {
    if S::LANES >= 16 { 6 } else { 2 }
}

/// Element types a weight row can be stored in; loads widen to f32 exactly.
pub(crate) trait WeightElem: Copy + Send + Sync + 'static {
    /// # Safety
    /// `p..p + S::LANES` must be readable.
    unsafe fn load<S: Simd>(s: S, p: *const Self) -> S::F;
    /// # Safety
    /// `p..p + len` must be readable.
    unsafe fn load_partial<S: Simd>(s: S, p: *const Self, len: usize) -> S::F;
}

impl WeightElem for f32 {
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const f32) -> S::F {
        // SAFETY: forwarded contract.
        unsafe { s.load(p) }
    }
    #[inline(always)]
    unsafe fn load_partial<S: Simd>(s: S, p: *const f32, len: usize) -> S::F {
        // SAFETY: forwarded contract.
        unsafe { s.load_partial(p, len) }
    }
}

/// bf16 as raw bits (`half::bf16` is a transparent `u16`): widened by a 16-bit left shift.
impl WeightElem for u16 {
    #[inline(always)]
    unsafe fn load<S: Simd>(s: S, p: *const u16) -> S::F {
        // SAFETY: forwarded contract.
        unsafe { s.load_bf16(p) }
    }
    #[inline(always)]
    unsafe fn load_partial<S: Simd>(s: S, p: *const u16, len: usize) -> S::F {
        // SAFETY: forwarded contract.
        unsafe { s.load_bf16_partial(p, len) }
    }
}

/// Where a tile reads and writes. Strides are in elements.
#[derive(Clone, Copy)]
pub(crate) struct TileArgs<W> {
    /// First weight row of the tile; row `r` starts at `w + r * w_stride`.
    pub w: *const W,
    pub w_stride: usize,
    /// First input row of the tile; row `t` starts at `x + t * x_stride`.
    pub x: *const f32,
    pub x_stride: usize,
    /// Dot-product length.
    pub cols: usize,
    /// Output of (input row t, weight row r) goes to `y + t * y_stride + r * y_row_step`.
    pub y: *mut f32,
    pub y_stride: usize,
    pub y_row_step: usize,
    /// Bytes ahead of the current column to prefetch weight rows from (0: no software prefetch).
    pub prefetch: usize,
}

/// One `R × T` tile over the full dot-product length. See the module docs for the summation order.
///
/// # Safety
/// Every row named by `a` must be readable for `a.cols` elements and every output writable.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over const bounds keep the tile in registers
pub(crate) unsafe fn tile<S: Simd, W: WeightElem, const R: usize, const T: usize>(s: S, a: TileArgs<W>) {
    let lanes = S::LANES;
    let mut acc = [[s.zero(); T]; R];
    let full = a.cols - a.cols % lanes;
    let mut c = 0;
    // SAFETY (all pointer arithmetic below): `c + lanes <= full <= cols` for full loads, `c..cols` for the
    // partial one, and rows `< R` / `< T` are readable per the contract.
    unsafe {
        while c < full {
            if a.prefetch != 0 {
                for r in 0..R {
                    let p = a.w.add(r * a.w_stride + c) as *const u8;
                    s.prefetch(p.wrapping_add(a.prefetch));
                }
            }
            let mut wv = [s.zero(); R];
            for r in 0..R {
                wv[r] = W::load(s, a.w.add(r * a.w_stride + c));
            }
            for t in 0..T {
                let xv = s.load(a.x.add(t * a.x_stride + c));
                for r in 0..R {
                    acc[r][t] = s.fma(wv[r], xv, acc[r][t]);
                }
            }
            c += lanes;
        }
        if c < a.cols {
            let len = a.cols - c;
            let mut wv = [s.zero(); R];
            for r in 0..R {
                wv[r] = W::load_partial(s, a.w.add(r * a.w_stride + c), len);
            }
            for t in 0..T {
                let xv = s.load_partial(a.x.add(t * a.x_stride + c), len);
                for r in 0..R {
                    acc[r][t] = s.fma(wv[r], xv, acc[r][t]);
                }
            }
        }
    }
    store_tile::<S, R, T>(s, &acc, a.y, a.y_stride, a.y_row_step);
}

/// Reduces an `R × T` block of accumulators and writes output `(t, r)` to
/// `y + t * y_stride + r * y_row_step`.
#[inline(always)]
pub(crate) fn store_tile<S: Simd, const R: usize, const T: usize>(
    s: S,
    acc: &[[S::F; T]; R],
    y: *mut f32,
    y_stride: usize,
    y_row_step: usize,
) {
    const MAX: usize = TILE_ROWS * MAX_TILE_WIDTH;
    let mut flat = [s.zero(); MAX];
    for r in 0..R {
        for t in 0..T {
            flat[t * R + r] = acc[r][t];
        }
    }
    let mut sums = [0f32; MAX];
    s.reduce_sums(&flat[..R * T], &mut sums[..R * T]);
    for t in 0..T {
        for r in 0..R {
            // SAFETY: the caller of `tile` guarantees these outputs are writable.
            unsafe { *y.add(t * y_stride + r * y_row_step) = sums[t * R + r] };
        }
    }
}

/// Runs the tile of height `rows` (1 or [`TILE_ROWS`]) and width `width` (1..=[`tile_width`]).
///
/// # Safety
/// As [`tile`], for `rows × width`.
#[inline(always)]
pub(crate) unsafe fn tile_dyn<S: Simd, W: WeightElem>(s: S, rows: usize, width: usize, a: TileArgs<W>) {
    // SAFETY: forwarded contract; each arm matches the shape it was asked for.
    unsafe {
        match (rows, width) {
            (4, 1) => tile::<S, W, 4, 1>(s, a),
            (4, 2) => tile::<S, W, 4, 2>(s, a),
            (1, 1) => tile::<S, W, 1, 1>(s, a),
            (1, 2) => tile::<S, W, 1, 2>(s, a),
            (4, 3) if tile_width::<S>() >= 3 => tile::<S, W, 4, 3>(s, a),
            (4, 4) if tile_width::<S>() >= 4 => tile::<S, W, 4, 4>(s, a),
            (4, 5) if tile_width::<S>() >= 5 => tile::<S, W, 4, 5>(s, a),
            (4, 6) if tile_width::<S>() >= 6 => tile::<S, W, 4, 6>(s, a),
            (1, 3) if tile_width::<S>() >= 3 => tile::<S, W, 1, 3>(s, a),
            (1, 4) if tile_width::<S>() >= 4 => tile::<S, W, 1, 4>(s, a),
            (1, 5) if tile_width::<S>() >= 5 => tile::<S, W, 1, 5>(s, a),
            (1, 6) if tile_width::<S>() >= 6 => tile::<S, W, 1, 6>(s, a),
            _ => unreachable!("tile shape {rows}x{width} is never requested"),
        }
    }
}

/// All outputs for weight rows `rows` and input rows `tokens` (ranges), tiled; weights read once from
/// memory per call (a 4-row tile stays in L1 while it meets every group of input rows).
///
/// # Safety
/// `a` describes row 0 / input row 0 (tile offsets are added here); all named rows must be valid.
#[inline(always)]
pub(crate) unsafe fn block<S: Simd, W: WeightElem>(
    s: S,
    a: TileArgs<W>,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) {
    let width = tile_width::<S>();
    let mut r = rows.start;
    while r < rows.end {
        let height = if rows.end - r >= TILE_ROWS { TILE_ROWS } else { 1 };
        let mut t = tokens.start;
        while t < tokens.end {
            let w = width.min(tokens.end - t);
            let args = TileArgs {
                // SAFETY: offsets stay within the rows the caller vouched for.
                w: unsafe { a.w.add(r * a.w_stride) },
                x: unsafe { a.x.add(t * a.x_stride) },
                y: unsafe { a.y.add(t * a.y_stride + r * a.y_row_step) },
                ..a
            };
            // SAFETY: forwarded contract.
            unsafe { tile_dyn(s, height, w, args) };
            t += w;
        }
        r += height;
    }
}

/// Like [`block`], for memory-bound products: the rows are cut into [`TILE_ROWS`] equal, contiguous
/// quarters and each tile takes one row from each quarter, so the weights are read as four long
/// sequential streams (what hardware prefetchers follow best) instead of one 4-row zigzag; the leftover
/// rows run one at a time. Results are identical to [`block`] (same per-output order).
///
/// # Safety
/// As [`block`]; `a.y_row_step` must be 1.
#[inline(always)]
pub(crate) unsafe fn block_streams<S: Simd, W: WeightElem>(
    s: S,
    a: TileArgs<W>,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) {
    let width = tile_width::<S>();
    let quarter = rows.len() / TILE_ROWS;
    for i in 0..quarter {
        let r = rows.start + i;
        let mut t = tokens.start;
        while t < tokens.end {
            let w = width.min(tokens.end - t);
            let args = TileArgs {
                // SAFETY: rows `r + k * quarter` (k < 4) lie in `rows`, which the caller vouched for.
                w: unsafe { a.w.add(r * a.w_stride) },
                w_stride: quarter * a.w_stride,
                x: unsafe { a.x.add(t * a.x_stride) },
                y: unsafe { a.y.add(t * a.y_stride + r) },
                y_row_step: quarter,
                ..a
            };
            // SAFETY: forwarded contract.
            unsafe { tile_dyn(s, TILE_ROWS, w, args) };
            t += w;
        }
    }
    // SAFETY: forwarded contract.
    unsafe { block(s, a, rows.start + quarter * TILE_ROWS..rows.end, tokens) };
}

// SAFETY (for the Sync impl): `TileArgs` is a bundle of pointers handed to parallel tasks; every caller
// gives each task disjoint output elements and only reads through the input pointers.
unsafe impl<W: Sync> Sync for TileArgs<W> {}
// SAFETY: see above.
unsafe impl<W: Sync> Send for TileArgs<W> {}

/// [`block_streams`] on the instruction set `isa`.
///
/// # Safety
/// As [`block`]; `isa` must be supported by this CPU (it comes from [`Isa::detect`]).
pub(crate) unsafe fn block_streams_for<W: WeightElem>(
    isa: Isa,
    a: TileArgs<W>,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) {
    // SAFETY: `isa` is supported, so the feature-gated entry points may run; the rest is forwarded.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 | Isa::Avx512Bf16 => block_streams_avx512(a, rows, tokens),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => block_streams_avx2(a, rows, tokens),
            _ => block_streams(Scalar, a, rows, tokens),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn block_streams_avx512<W: WeightElem>(
    a: TileArgs<W>,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) {
    // SAFETY: this function only runs on CPUs with these features (see `block_streams_for`).
    unsafe { block_streams(Avx512::new_unchecked(), a, rows, tokens) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_streams_avx2<W: WeightElem>(
    a: TileArgs<W>,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) {
    // SAFETY: this function only runs on CPUs with these features (see `block_streams_for`).
    unsafe { block_streams(Avx2::new_unchecked(), a, rows, tokens) }
}
