//! The bf16 prefill path: AVX-512 BF16 dot products (`vdpbf16ps`).
//!
//! Activations are rounded to bf16 (round to nearest even) and multiplied pairwise with the bf16 weights;
//! products are exact and sums are f32 (two roundings per instruction and lane, denormals flushed), so
//! results differ from the exact path ([`super::matvec`]) by roughly bf16 precision of the activations.
//! That is why `CpuBackend::matmul` uses it only above `BF16_EXACT_MAX_ROWS` rows. Each output still
//! depends only on its own weight row and input row, in a fixed order (pairs of columns in lane
//! `c / 2 mod 16`, increasing `c`, then the lanes in the fixed tree), so it is deterministic and
//! independent of the batch and of the thread count.
//!
//! Layout: activations are rounded once into a 64-byte aligned, zero-padded buffer; the work is cut
//! into (token block, row panel) tasks sized so that a token block (~256 KiB) and a panel copy
//! (~128 KiB, aligned and zero-padded) sit in L2 while 4×6 register tiles run over them. Measured on a
//! 2-vCPU Zen 4 VM: ~200 GFLOP/s per thread, 340–400 with two (85% of `vdpbf16ps` peak).

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code, unused_variables))]

use super::pool::ThreadPool;
use super::simd::Isa;
#[cfg(target_arch = "x86_64")]
use super::{
    dot::store_tile,
    scratch::{Slot, with_scratch},
    simd::{Avx512, Avx512Bf16Dot, Simd},
};

/// Target bytes of one token block of activations (kept in L2 while panels stream past it).
const TOKEN_BLOCK_BYTES: usize = 256 * 1024;
/// Target bytes of one weight panel (kept in L2 while it meets a token block).
const PANEL_BYTES: usize = 128 * 1024;

/// How a product is cut into tasks: `blocks × panels` tasks, token-block major (so the threads share a
/// token block in time and it is fetched into each L2 once).
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Padded row length in elements.
    padded: usize,
    panel_rows: usize,
    panels: usize,
    block_tokens: usize,
    blocks: usize,
}

impl Plan {
    fn new(rows: usize, n: usize, padded: usize, elem_bytes: usize, width: usize) -> Plan {
        let row_bytes = padded * elem_bytes;
        let panel_rows = (PANEL_BYTES / row_bytes)
            .clamp(4, 64)
            .next_multiple_of(4)
            .min(rows.next_multiple_of(4));
        let block_tokens = (TOKEN_BLOCK_BYTES / (padded * elem_bytes))
            .clamp(width, 240)
            .next_multiple_of(width)
            .min(n);
        Plan {
            padded,
            panel_rows,
            panels: rows.div_ceil(panel_rows),
            block_tokens,
            blocks: n.div_ceil(block_tokens.max(1)),
        }
    }

    fn tasks(&self) -> usize {
        self.panels * self.blocks
    }

    /// Rows and tokens of task `i`.
    fn task(&self, i: usize, rows: usize, n: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let (block, panel) = (i / self.panels, i % self.panels);
        let r0 = panel * self.panel_rows;
        let t0 = block * self.block_tokens;
        (
            r0..(r0 + self.panel_rows).min(rows),
            t0..(t0 + self.block_tokens).min(n),
        )
    }
}

/// Raw pointers of one product, shared by its tasks.
#[derive(Clone, Copy)]
struct Shared<W> {
    w: *const W,
    rows: usize,
    cols: usize,
    y: *mut f32,
}

// SAFETY: tasks read through `w` and write disjoint outputs through `y` (each output belongs to exactly
// one (token block, row panel) task).
unsafe impl<W: Sync> Sync for Shared<W> {}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint rows of one buffer to parallel tasks.
unsafe impl<T> Sync for SendPtr<T> {}

/// Whether [`gemm_bf16_dot`] can run on this CPU.
pub(crate) fn has_bf16_dot(isa: Isa) -> bool {
    isa == Isa::Avx512Bf16
}

/// bf16 product with activations rounded to bf16 and `vdpbf16ps` (see the module docs for numerics).
/// `w` holds raw bf16 bits. Requires [`has_bf16_dot`].
///
/// Cost: `n · rows · cols / 2` `vdpbf16ps` lane-operations (about twice the exact path's throughput),
/// plus rounding `x` once and copying each weight panel once per token block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_bf16_dot(
    pool: &ThreadPool,
    isa: Isa,
    x: &[f32],
    n: usize,
    w: &[u16],
    rows: usize,
    cols: usize,
    y: &mut [f32],
) {
    assert!(has_bf16_dot(isa), "gemm_bf16_dot needs AVX-512 BF16");
    assert_eq!(x.len(), n * cols, "gemm input shape");
    assert_eq!(w.len(), rows * cols, "gemm weight shape");
    assert_eq!(y.len(), n * rows, "gemm output shape");
    if n == 0 || rows == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let padded = cols.next_multiple_of(32).max(32);
        let plan = Plan::new(rows, n, padded, 2, BF16_TILE_WIDTH);
        let shared = Shared {
            w: w.as_ptr(),
            rows,
            cols,
            y: y.as_mut_ptr(),
        };
        with_scratch::<u16, _>(Slot::Call, n * padded, |xb| {
            let per_task = (65536 / (padded * 2)).max(1);
            let out_ptr = SendPtr(xb.as_mut_ptr());
            pool.run(n.div_ceil(per_task), &|i| {
                let out_ptr = &out_ptr;
                for t in i * per_task..((i + 1) * per_task).min(n) {
                    // SAFETY: `isa` has AVX-512 BF16 (asserted); row `t` of the buffer (which holds
                    // `n * padded` values) is written by this task only; `x` row `t` is in bounds.
                    unsafe {
                        round_row_bf16(
                            x[t * cols..(t + 1) * cols].as_ptr(),
                            cols,
                            out_ptr.0.add(t * padded),
                            padded,
                        )
                    };
                }
            });
            let xb: &[u16] = xb;
            pool.run(plan.tasks(), &|i| {
                let (rows_range, tokens) = plan.task(i, rows, n);
                with_scratch::<u16, _>(Slot::Task, rows_range.len() * padded, |panel| {
                    // SAFETY: AVX-512 BF16 is present (asserted); shapes checked above; this task owns
                    // outputs (tokens × rows_range).
                    unsafe { bf16_dot_task(shared, xb.as_ptr(), plan, rows_range, tokens, panel) };
                });
            });
        });
    }
}

/// Input rows per bf16 dot-product tile.
const BF16_TILE_WIDTH: usize = 6;

/// Rounds one row to bf16 into `out` and zero-fills it to `padded` (a multiple of 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
unsafe fn round_row_bf16(x: *const f32, cols: usize, out: *mut u16, padded: usize) {
    // SAFETY: the caller guarantees AVX-512 BF16, `cols` readable inputs and `padded` writable outputs.
    unsafe {
        let d = Avx512Bf16Dot::new_unchecked();
        let mut c = 0;
        while c + 32 <= cols {
            d.round_32(x.add(c), out.add(c));
            c += 32;
        }
        while c < padded {
            let mut tmp = [0f32; 32];
            let len = cols.saturating_sub(c).min(32);
            std::ptr::copy_nonoverlapping(x.add(c), tmp.as_mut_ptr(), len);
            d.round_32(tmp.as_ptr(), out.add(c));
            c += 32;
        }
    }
}

/// One bf16 dot-product task: copy the weight panel, then 4×6 tiles of `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")]
unsafe fn bf16_dot_task(
    shared: Shared<u16>,
    xb: *const u16,
    plan: Plan,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
    panel: &mut [u16],
) {
    let padded = plan.padded;
    // SAFETY: the caller guarantees AVX-512 BF16 and in-bounds rows; `panel` holds the panel.
    unsafe {
        let d = Avx512Bf16Dot::new_unchecked();
        for (i, r) in rows.clone().enumerate() {
            let dst = &mut panel[i * padded..(i + 1) * padded];
            let src = std::slice::from_raw_parts(shared.w.add(r * shared.cols), shared.cols);
            dst[..shared.cols].copy_from_slice(src);
            dst[shared.cols..].fill(0);
        }
        let mut r = 0;
        while r < rows.len() {
            let height = if rows.len() - r >= 4 { 4 } else { 1 };
            let mut t = tokens.start;
            while t < tokens.end {
                let width = BF16_TILE_WIDTH.min(tokens.end - t);
                let w = panel.as_ptr().add(r * padded);
                let x = xb.add(t * padded);
                let y = shared.y.add(t * shared.rows + rows.start + r);
                match (height, width) {
                    (4, 6) => bf16_tile::<4, 6>(d, w, x, padded, y, shared.rows),
                    (4, 5) => bf16_tile::<4, 5>(d, w, x, padded, y, shared.rows),
                    (4, 4) => bf16_tile::<4, 4>(d, w, x, padded, y, shared.rows),
                    (4, 3) => bf16_tile::<4, 3>(d, w, x, padded, y, shared.rows),
                    (4, 2) => bf16_tile::<4, 2>(d, w, x, padded, y, shared.rows),
                    (4, 1) => bf16_tile::<4, 1>(d, w, x, padded, y, shared.rows),
                    (1, 6) => bf16_tile::<1, 6>(d, w, x, padded, y, shared.rows),
                    (1, 5) => bf16_tile::<1, 5>(d, w, x, padded, y, shared.rows),
                    (1, 4) => bf16_tile::<1, 4>(d, w, x, padded, y, shared.rows),
                    (1, 3) => bf16_tile::<1, 3>(d, w, x, padded, y, shared.rows),
                    (1, 2) => bf16_tile::<1, 2>(d, w, x, padded, y, shared.rows),
                    (1, 1) => bf16_tile::<1, 1>(d, w, x, padded, y, shared.rows),
                    _ => unreachable!("bf16 tile shape {height}x{width} is never requested"),
                }
                t += width;
            }
            r += height;
        }
    }
}

/// `R × T` outputs over `padded` bf16 columns (pairs summed by `vdpbf16ps`, lanes by the fixed tree).
///
/// # Safety
/// Rows `w + r * padded` (r < R) and `x + t * padded` (t < T) readable for `padded` values; outputs
/// `y + t * y_stride + r` writable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::needless_range_loop)] // index loops over const bounds keep the tile in registers
unsafe fn bf16_tile<const R: usize, const T: usize>(
    d: Avx512Bf16Dot,
    w: *const u16,
    x: *const u16,
    padded: usize,
    y: *mut f32,
    y_stride: usize,
) {
    let s = d.0;
    let mut acc = [[s.zero(); T]; R];
    let mut c = 0;
    // SAFETY: `c + 32 <= padded` on every load; rows per the contract.
    unsafe {
        let zero = d.zero_raw();
        while c < padded {
            let mut wv = [zero; R];
            for r in 0..R {
                wv[r] = d.load_raw(w.add(r * padded + c));
            }
            for t in 0..T {
                let xv = d.load_raw(x.add(t * padded + c));
                for r in 0..R {
                    acc[r][t] = d.dot_pairs(acc[r][t], wv[r], xv);
                }
            }
            c += 32;
        }
    }
    store_tile::<Avx512, R, T>(s, &acc, y, y_stride, 1);
}
