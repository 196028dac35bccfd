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
//! path ([`super::gemm`]) reuses [`store_tile`], hence the same lane tree. The tests at the end of this
//! file check every tile shape against one input row at a time and against the order written out.
//!
//! Tile shapes ([`tile_shape`]): a block of input rows is cut into the fewest, most even groups of at
//! most `max_width` rows, and each tile of `rows` weight rows makes one pass over its weight vectors per
//! group. AVX-512 runs 3×8 for blocks of 7–8 rows (a decode batch of 8 in one pass instead of 6 + 2)
//! and 4×6 for all others; 16-register sets run 4×2.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512};
use super::simd::{Isa, Scalar, Simd};

/// Most outputs one tile accumulates (`R × T`), the size of [`store_tile`]'s reduction buffer.
pub(crate) const MAX_TILE_OUTPUTS: usize = 24;

/// The tile shape a token block runs with: weight rows per tile and the most input rows per tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TileShape {
    /// Weight rows per tile (the rows left below it run one at a time).
    pub rows: usize,
    /// Input rows per tile at most; see [`TokenGroups`].
    pub max_width: usize,
}

/// The tile shape for a block of `tokens` input rows on instruction set `S`.
///
/// A tile holds `rows × width` accumulators, `rows` weight vectors and one input vector in registers.
/// AVX-512 (32 registers) has two shapes with 24 accumulators: 4×6 (24 + 4 + 1 registers) and 3×8
/// (24 + 3 + 1). 3×8 serves blocks of 7 or 8 rows (a decode batch of 8), which it covers in one pass
/// over the weights where 4×6 needed a 6-wide and a 2-wide pass: each pass reloads, and for bf16
/// widens, every weight vector, and the 2-wide pass did only 2 FMAs per weight vector. Every other block
/// runs 4×6, which covers more weight rows per pass (four memory streams instead of three) and loads
/// fewer input vectors per FMA: with several passes either way (9 rows and up) it measured as fast or
/// faster than 3×8, by up to 6% for f32 at 16–24 rows streaming from memory. 16-register sets (AVX2,
/// portable): 4×2 (8 + 4 + 1) for every block.
#[inline(always)]
pub(crate) const fn tile_shape<S: Simd>(tokens: usize) -> TileShape {
    const FOUR_BY_SIX: TileShape = TileShape { rows: 4, max_width: 6 };
    const THREE_BY_EIGHT: TileShape = TileShape { rows: 3, max_width: 8 };
    if S::LANES < 16 {
        TileShape { rows: 4, max_width: 2 }
    } else if tokens > FOUR_BY_SIX.max_width && tokens <= THREE_BY_EIGHT.max_width {
        THREE_BY_EIGHT
    } else {
        FOUR_BY_SIX
    }
}

/// How a block of input rows is cut into tile widths: the fewest groups of at most `max_width` rows, as
/// even as possible (14 rows with width 6 run as 5 + 5 + 4, not as 6 + 6 + 2, whose 2-wide pass does
/// 2 FMAs per weight load). Computed once per block: the divisions stay out of the row loop.
#[derive(Clone, Copy, Debug)]
struct TokenGroups {
    count: usize,
    /// Every group has `base` rows, the first `extra` one more.
    base: usize,
    extra: usize,
}

impl TokenGroups {
    #[inline(always)]
    fn new(tokens: usize, max_width: usize) -> TokenGroups {
        let count = tokens.div_ceil(max_width);
        if count == 0 {
            return TokenGroups {
                count,
                base: 0,
                extra: 0,
            };
        }
        TokenGroups {
            count,
            base: tokens / count,
            extra: tokens % count,
        }
    }

    #[inline(always)]
    fn widths(self) -> impl Iterator<Item = usize> {
        (0..self.count).map(move |g| self.base + usize::from(g < self.extra))
    }
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
    const MAX: usize = MAX_TILE_OUTPUTS;
    const { assert!(R * T <= MAX, "tile has more outputs than MAX_TILE_OUTPUTS") };
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

/// Runs the tile of height `rows` and width `width`: the shapes [`tile_shape`] names for `S` (4×1–6,
/// 3×7–8, and height 1 for the rows left over).
///
/// # Safety
/// As [`tile`], for `rows × width`.
#[inline(always)]
pub(crate) unsafe fn tile_dyn<S: Simd, W: WeightElem>(s: S, rows: usize, width: usize, a: TileArgs<W>) {
    // Wide shapes only where the register file holds them (and only there are they instantiated).
    let wide = S::LANES >= 16;
    // SAFETY: forwarded contract; each arm matches the shape it was asked for.
    unsafe {
        match (rows, width) {
            (4, 1) => tile::<S, W, 4, 1>(s, a),
            (4, 2) => tile::<S, W, 4, 2>(s, a),
            (1, 1) => tile::<S, W, 1, 1>(s, a),
            (1, 2) => tile::<S, W, 1, 2>(s, a),
            (4, 3) if wide => tile::<S, W, 4, 3>(s, a),
            (4, 4) if wide => tile::<S, W, 4, 4>(s, a),
            (4, 5) if wide => tile::<S, W, 4, 5>(s, a),
            (4, 6) if wide => tile::<S, W, 4, 6>(s, a),
            (3, 7) if wide => tile::<S, W, 3, 7>(s, a),
            (3, 8) if wide => tile::<S, W, 3, 8>(s, a),
            (1, 3) if wide => tile::<S, W, 1, 3>(s, a),
            (1, 4) if wide => tile::<S, W, 1, 4>(s, a),
            (1, 5) if wide => tile::<S, W, 1, 5>(s, a),
            (1, 6) if wide => tile::<S, W, 1, 6>(s, a),
            (1, 7) if wide => tile::<S, W, 1, 7>(s, a),
            (1, 8) if wide => tile::<S, W, 1, 8>(s, a),
            _ => unreachable!("tile shape {rows}x{width} is never requested"),
        }
    }
}

/// All outputs for weight rows `rows` and input rows `tokens` (ranges), tiled with
/// [`tile_shape`]`(tokens.len())` (rows left below the tile height one at a time); weights read once from
/// memory per call (a tile's rows stay in L1 while they meet every group of input rows).
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
    let shape = tile_shape::<S>(tokens.len());
    let groups = TokenGroups::new(tokens.len(), shape.max_width);
    let mut r = rows.start;
    while r < rows.end {
        let height = if rows.end - r >= shape.rows { shape.rows } else { 1 };
        let mut t = tokens.start;
        for width in groups.widths() {
            let args = TileArgs {
                // SAFETY: offsets stay within the rows the caller vouched for.
                w: unsafe { a.w.add(r * a.w_stride) },
                x: unsafe { a.x.add(t * a.x_stride) },
                y: unsafe { a.y.add(t * a.y_stride + r * a.y_row_step) },
                ..a
            };
            // SAFETY: forwarded contract.
            unsafe { tile_dyn(s, height, width, args) };
            t += width;
        }
        r += height;
    }
}

/// Like [`block`], for memory-bound products: with tiles `h` rows high, the rows are cut into `h`
/// equal, contiguous parts and each tile takes one row from each part, so the weights are read as `h`
/// long sequential streams (what hardware prefetchers follow best) instead of one `h`-row zigzag; the
/// leftover rows run one at a time. Results are identical to [`block`] (same per-output order).
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
    let shape = tile_shape::<S>(tokens.len());
    let groups = TokenGroups::new(tokens.len(), shape.max_width);
    let part = rows.len() / shape.rows;
    for i in 0..part {
        let r = rows.start + i;
        let mut t = tokens.start;
        for width in groups.widths() {
            let args = TileArgs {
                // SAFETY: rows `r + k * part` (k < shape.rows) lie in `rows`, which the caller vouched for.
                w: unsafe { a.w.add(r * a.w_stride) },
                w_stride: part * a.w_stride,
                x: unsafe { a.x.add(t * a.x_stride) },
                y: unsafe { a.y.add(t * a.y_stride + r) },
                y_row_step: part,
                ..a
            };
            // SAFETY: forwarded contract.
            unsafe { tile_dyn(s, shape.rows, width, args) };
            t += width;
        }
    }
    // SAFETY: forwarded contract.
    unsafe { block(s, a, rows.start + part * shape.rows..rows.end, tokens) };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Reproducible values with a wide spread of magnitudes, so that any change in the order of the
    /// additions shows up in the low bits.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let unit = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                unit * 10f32.powi((i % 5) as i32 - 2)
            })
            .collect()
    }

    /// The summation order the module docs define, written out: lane `i` of `lanes` accumulates the
    /// products of columns `c ≡ i (mod lanes)` in increasing `c` (fused or not, as the instruction set
    /// does), then the lanes are added pairwise, `l[j] + l[j + half]`, halving down to one value.
    fn canonical_dot(w: &[f32], x: &[f32], lanes: usize, fused: bool) -> f32 {
        let mut acc = vec![0f32; lanes];
        for (c, (w, x)) in w.iter().zip(x).enumerate() {
            let a = &mut acc[c % lanes];
            *a = if fused { w.mul_add(*x, *a) } else { *w * *x + *a };
        }
        while acc.len() > 1 {
            let half = acc.len() / 2;
            acc = (0..half).map(|j| acc[j] + acc[j + half]).collect();
        }
        acc[0]
    }

    /// `y` for input rows `tokens` and weight rows `rows` through [`block_streams_for`] (every tile
    /// shape goes through there), all other outputs left NaN.
    #[allow(clippy::too_many_arguments)]
    fn run<W: WeightElem>(
        isa: Isa,
        w: &[W],
        x: &[f32],
        cols: usize,
        total_rows: usize,
        n: usize,
        rows: std::ops::Range<usize>,
        tokens: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        assert_eq!(w.len(), total_rows * cols);
        assert_eq!(x.len(), n * cols);
        assert_eq!(y.len(), n * total_rows);
        assert!(rows.end <= total_rows && tokens.end <= n);
        let args = TileArgs {
            w: w.as_ptr(),
            w_stride: cols,
            x: x.as_ptr(),
            x_stride: cols,
            cols,
            y: y.as_mut_ptr(),
            y_stride: total_rows,
            y_row_step: 1,
            prefetch: 1024,
        };
        // SAFETY: the shapes were checked above and `isa` comes from `Isa::all_supported`.
        unsafe { block_streams_for(isa, args, rows, tokens) };
    }

    /// Every tile shape, including the 3×7 and 3×8 AVX-512 tiles of 7–8 input rows, gives each output
    /// the same bits as the one-row-at-a-time path (4-high tiles, 1 input row) and as the documented
    /// order written out in plain Rust, for f32 and bf16 weights, batch sizes 1–17 (4×1–6, 3×7–8, then
    /// several 4×5–6 passes), row counts that leave rows below the tile height, and uneven row splits.
    #[test]
    fn every_tile_shape_gives_the_same_bits_as_one_input_row_at_a_time() {
        for isa in Isa::all_supported() {
            let (lanes, fused) = match isa {
                Isa::Avx512 | Isa::Avx512Bf16 => (16, true),
                Isa::Avx2 => (8, true),
                Isa::Scalar => (8, false),
            };
            for cols in [1usize, 7, 16, 33, 100, 579] {
                for rows in [1usize, 2, 3, 4, 5, 7, 8, 11, 12, 13, 26, 37] {
                    let w_f32 = values(rows * cols, (rows * 1000 + cols) as u64);
                    let w_bf16: Vec<u16> = w_f32.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
                    for bf16 in [false, true] {
                        // The weights as the kernel sees them (bf16 widened exactly).
                        let w_wide: Vec<f32> = if bf16 {
                            w_bf16.iter().map(|b| f32::from_bits((*b as u32) << 16)).collect()
                        } else {
                            w_f32.clone()
                        };
                        let max_n = 17;
                        let x = values(max_n * cols, cols as u64 + 7);
                        // One input row at a time: the reference bits.
                        let mut single = vec![f32::NAN; max_n * rows];
                        for t in 0..max_n {
                            let xt = &x[t * cols..(t + 1) * cols];
                            let yt = &mut single[t * rows..(t + 1) * rows];
                            if bf16 {
                                run(isa, &w_bf16, xt, cols, rows, 1, 0..rows, 0..1, yt);
                            } else {
                                run(isa, &w_f32, xt, cols, rows, 1, 0..rows, 0..1, yt);
                            }
                        }
                        for t in 0..max_n {
                            for r in 0..rows {
                                let want = canonical_dot(
                                    &w_wide[r * cols..(r + 1) * cols],
                                    &x[t * cols..(t + 1) * cols],
                                    lanes,
                                    fused,
                                );
                                assert_eq!(
                                    single[t * rows + r].to_bits(),
                                    want.to_bits(),
                                    "{isa:?} bf16={bf16} {rows}x{cols}: row {r}, input {t} against the documented order"
                                );
                            }
                        }
                        for n in 1..=max_n {
                            let xn = &x[..n * cols];
                            // All rows at once, and split unevenly in two as threads might split them.
                            for split in [rows, rows / 3 + 1] {
                                let mut y = vec![f32::NAN; n * rows];
                                for range in [0..split, split..rows] {
                                    if bf16 {
                                        run(isa, &w_bf16, xn, cols, rows, n, range.clone(), 0..n, &mut y);
                                    } else {
                                        run(isa, &w_f32, xn, cols, rows, n, range.clone(), 0..n, &mut y);
                                    }
                                }
                                let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                                let want: Vec<u32> = single[..n * rows].iter().map(|v| v.to_bits()).collect();
                                assert_eq!(
                                    got, want,
                                    "{isa:?} bf16={bf16} {rows}x{cols} n={n} split at row {split}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// The shape choice the test above relies on to reach the 3×8 tile, and the point of it: a decode
    /// batch of 7 or 8 is one pass over the weights on AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn batches_of_seven_and_eight_take_one_pass_on_avx512() {
        for n in 1..=17 {
            let shape = tile_shape::<Avx512>(n);
            let passes = TokenGroups::new(n, shape.max_width).count;
            let want = match n {
                7 | 8 => (3, 1),
                _ => (4, n.div_ceil(6)),
            };
            assert_eq!((shape.rows, passes), want, "n = {n}");
        }
        assert_eq!(tile_shape::<Avx2>(8), TileShape { rows: 4, max_width: 2 });
    }

    #[test]
    fn token_groups_are_even_and_cover_the_block() {
        for max_width in [2usize, 6, 8] {
            for tokens in 0..=40 {
                let widths: Vec<usize> = TokenGroups::new(tokens, max_width).widths().collect();
                assert_eq!(widths.iter().sum::<usize>(), tokens);
                assert_eq!(widths.len(), tokens.div_ceil(max_width));
                let (lo, hi) = (widths.iter().min(), widths.iter().max());
                if let (Some(lo), Some(hi)) = (lo, hi) {
                    assert!(
                        *hi <= max_width && hi - lo <= 1,
                        "{tokens} rows, width {max_width}: {widths:?}"
                    );
                }
            }
        }
    }
}
