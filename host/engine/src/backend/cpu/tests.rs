//! Backend-level tests: every fast path against the naive reference, and the determinism invariants.

use super::simd::Isa;
use super::{AttentionShape, CpuBackend, KvView, reference};
use crate::tensor::{Weight, WeightData};
use half::bf16;

/// A small deterministic generator (no dependency, reproducible failures).
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next_f32()).collect()
    }
}

fn weight(rng: &mut Rng, rows: usize, cols: usize, bf16_weights: bool) -> Weight {
    let values = rng.vec(rows * cols);
    let data = if bf16_weights {
        WeightData::Bf16(values.iter().map(|v| bf16::from_f32(*v)).collect())
    } else {
        WeightData::F32(values.into())
    };
    Weight { rows, cols, data }
}

/// `Σ_c |x[t, c] · w[r, c]|`, the scale a summation error is measured against.
fn magnitudes(x: &[f32], n: usize, w: &Weight) -> Vec<f32> {
    let abs_w = Weight {
        rows: w.rows,
        cols: w.cols,
        data: WeightData::F32(w.to_f32().iter().map(|v| v.abs()).collect()),
    };
    let abs_x: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let mut out = vec![0f32; n * w.rows];
    reference::matmul(&abs_x, n, &abs_w, &mut out);
    out
}

fn assert_close(got: &[f32], want: &[f32], scale: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len());
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        assert!(
            (g - w).abs() <= tol * s + 1e-30,
            "{what}: element {i}: got {g}, want {w} (scale {s})"
        );
    }
}

const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (3, 5),
    (5, 17),
    (13, 33),
    (7, 64),
    (37, 100),
    (9, 129),
    (22, 576),
    (6, 1000),
];

#[test]
fn matmul_matches_reference_on_every_isa() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for isa in Isa::all_supported() {
        let backend = CpuBackend::with_isa(2, isa);
        for &(rows, cols) in SHAPES {
            for bf in [false, true] {
                let w = weight(&mut rng, rows, cols, bf);
                for n in (1..=9).chain([16, 17, 31, 40, 75]) {
                    let x = rng.vec(n * cols);
                    let mut got = vec![f32::NAN; n * rows];
                    backend.matmul(&x, n, &w, &mut got);
                    let mut want = vec![0f32; n * rows];
                    let scale = magnitudes(&x, n, &w);
                    let what = format!("{isa:?} {rows}x{cols} bf16={bf} n={n}");
                    if bf && n > CpuBackend::BF16_EXACT_MAX_ROWS && isa == Isa::Avx512Bf16 {
                        // bf16 dot products: exact against activations rounded to bf16 …
                        let xr: Vec<f32> = x.iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
                        reference::matmul(&xr, n, &w, &mut want);
                        assert_close(&got, &want, &scale, 2e-5, &what);
                        // … and within bf16 precision of the exact product.
                        reference::matmul(&x, n, &w, &mut want);
                        assert_close(&got, &want, &scale, 8e-3, &what);
                    } else {
                        reference::matmul(&x, n, &w, &mut want);
                        assert_close(&got, &want, &scale, 1e-5, &what);
                    }
                }
            }
        }
    }
}

/// The batching invariant: a (weight row, input row) result is bit-identical whatever the batch size
/// (decode and exact prefill paths alike) and whatever the thread count.
#[test]
fn matmul_rows_are_bit_identical_across_batch_sizes_and_threads() {
    let mut rng = Rng(42);
    for isa in Isa::all_supported() {
        let backends: Vec<CpuBackend> = [1, 2, 3].into_iter().map(|t| CpuBackend::with_isa(t, isa)).collect();
        for &(rows, cols) in &[(37, 100), (22, 576), (41, 33), (8, 1537)] {
            for bf in [false, true] {
                let w = weight(&mut rng, rows, cols, bf);
                let max_n = if bf { CpuBackend::BF16_EXACT_MAX_ROWS } else { 300 };
                let exact = CpuBackend::with_isa(2, isa).with_bf16_dot_products(false);
                let x = rng.vec(max_n * cols);
                // Each input row alone, single-threaded: the reference bits.
                let single: Vec<Vec<f32>> = (0..max_n)
                    .map(|t| {
                        let mut y = vec![0f32; rows];
                        backends[0].matmul(&x[t * cols..(t + 1) * cols], 1, &w, &mut y);
                        y
                    })
                    .collect();
                for backend in &backends {
                    for n in (1..=18).chain([max_n]) {
                        let n = n.min(max_n);
                        let mut y = vec![0f32; n * rows];
                        backend.matmul(&x[..n * cols], n, &w, &mut y);
                        for t in 0..n {
                            let got: Vec<u32> = y[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                            let want: Vec<u32> = single[t].iter().map(|v| v.to_bits()).collect();
                            assert_eq!(
                                got,
                                want,
                                "{isa:?} {rows}x{cols} bf16={bf} n={n} threads={} row {t}",
                                backend.threads()
                            );
                        }
                    }
                }
                // With bf16 dot products off, bf16 is exact for every batch size too.
                if bf {
                    let n = 300;
                    let x: Vec<f32> = (0..n)
                        .flat_map(|t| x[(t % max_n) * cols..(t % max_n + 1) * cols].to_vec())
                        .collect();
                    let mut y = vec![0f32; n * rows];
                    exact.matmul(&x, n, &w, &mut y);
                    for t in 0..n {
                        let got: Vec<u32> = y[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                        let want: Vec<u32> = single[t % max_n].iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{isa:?} {rows}x{cols} exact bf16 n={n} row {t}");
                    }
                }
            }
        }
    }
}

/// The bf16 prefill path depends only on the row itself too (deterministic, batch independent).
#[test]
fn bf16_prefill_rows_do_not_depend_on_the_batch() {
    if Isa::detect() != Isa::Avx512Bf16 {
        return;
    }
    let mut rng = Rng(7);
    let (rows, cols) = (29, 200);
    let w = weight(&mut rng, rows, cols, true);
    let big = 100;
    let x = rng.vec(big * cols);
    let mut full = vec![0f32; big * rows];
    CpuBackend::new(2).matmul(&x, big, &w, &mut full);
    let n = CpuBackend::BF16_EXACT_MAX_ROWS + 5;
    let offset = 11;
    let mut part = vec![0f32; n * rows];
    CpuBackend::new(1).matmul(&x[offset * cols..(offset + n) * cols], n, &w, &mut part);
    let want: Vec<u32> = full[offset * rows..(offset + n) * rows]
        .iter()
        .map(|v| v.to_bits())
        .collect();
    let got: Vec<u32> = part.iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, want);
}

struct AttnCase {
    shape: AttentionShape,
    first_pos: usize,
    n: usize,
    capacity: usize,
}

fn attention_inputs(rng: &mut Rng, case: &AttnCase) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        ..
    } = case.shape;
    let q: Vec<f32> = rng.vec(case.n * n_heads * head_dim).iter().map(|v| v * 2.0).collect();
    let mut k = rng.vec(n_kv_heads * case.capacity * head_dim);
    let v = rng.vec(n_kv_heads * case.capacity * head_dim);
    // Positions past `len` hold garbage the kernels must never read into a result.
    let len = case.first_pos + case.n;
    for h in 0..n_kv_heads {
        for p in len..case.capacity {
            for d in 0..head_dim {
                k[super::key_offset(case.capacity, head_dim, h, p, d)] = f32::NAN;
            }
        }
    }
    (q, k, v)
}

fn attention_cases() -> Vec<AttnCase> {
    let shape = |n_heads, n_kv_heads, head_dim, sliding_window| AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        sliding_window,
    };
    vec![
        AttnCase {
            shape: shape(9, 3, 64, None),
            first_pos: 0,
            n: 1,
            capacity: 64,
        },
        AttnCase {
            shape: shape(9, 3, 64, None),
            first_pos: 200,
            n: 1,
            capacity: 256,
        },
        AttnCase {
            shape: shape(9, 3, 64, None),
            first_pos: 63,
            n: 1,
            capacity: 128,
        },
        AttnCase {
            shape: shape(9, 3, 64, None),
            first_pos: 0,
            n: 100,
            capacity: 192,
        },
        AttnCase {
            shape: shape(9, 3, 64, None),
            first_pos: 30,
            n: 37,
            capacity: 128,
        },
        AttnCase {
            shape: shape(4, 4, 40, None),
            first_pos: 5,
            n: 3,
            capacity: 64,
        },
        AttnCase {
            shape: shape(8, 2, 128, Some(5)),
            first_pos: 70,
            n: 4,
            capacity: 128,
        },
        AttnCase {
            shape: shape(6, 2, 24, Some(70)),
            first_pos: 10,
            n: 90,
            capacity: 128,
        },
        AttnCase {
            shape: shape(6, 1, 200, Some(33)),
            first_pos: 0,
            n: 20,
            capacity: 64,
        },
        AttnCase {
            shape: shape(2, 1, 16, Some(1)),
            first_pos: 3,
            n: 5,
            capacity: 64,
        },
    ]
}

#[test]
fn attention_matches_reference_on_every_isa() {
    let mut rng = Rng(3);
    for isa in Isa::all_supported() {
        let backend = CpuBackend::with_isa(2, isa);
        for case in attention_cases() {
            let (q, k, v) = attention_inputs(&mut rng, &case);
            let kv = KvView {
                k: &k,
                v: &v,
                capacity: case.capacity,
                len: case.first_pos + case.n,
            };
            let mut got = vec![f32::NAN; q.len()];
            backend.attention(&q, case.n, case.first_pos, kv, case.shape, &mut got);
            let mut want = vec![0f32; q.len()];
            reference::attention(&q, case.n, case.first_pos, kv, case.shape, &mut want);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 2e-5 * (1.0 + w.abs()),
                    "{isa:?} {:?} first_pos {} n {}: element {i}: got {g}, want {w}",
                    case.shape,
                    case.first_pos,
                    case.n
                );
            }
        }
    }
}

/// A query's attention output is bit-identical whether it is computed in a prefill batch or one token at
/// a time (decode), on any thread count.
#[test]
fn attention_is_bit_identical_between_prefill_and_decode() {
    let mut rng = Rng(11);
    for isa in Isa::all_supported() {
        for case in attention_cases() {
            let (q, k, v) = attention_inputs(&mut rng, &case);
            let width = case.shape.n_heads * case.shape.head_dim;
            let kv = KvView {
                k: &k,
                v: &v,
                capacity: case.capacity,
                len: case.first_pos + case.n,
            };
            let mut batch = vec![0f32; q.len()];
            CpuBackend::with_isa(2, isa).attention(&q, case.n, case.first_pos, kv, case.shape, &mut batch);
            for threads in [1, 3] {
                let backend = CpuBackend::with_isa(threads, isa);
                for t in 0..case.n {
                    let kv = KvView {
                        len: case.first_pos + t + 1,
                        ..kv
                    };
                    let mut one = vec![0f32; width];
                    backend.attention(
                        &q[t * width..(t + 1) * width],
                        1,
                        case.first_pos + t,
                        kv,
                        case.shape,
                        &mut one,
                    );
                    let got: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                    let want: Vec<u32> = batch[t * width..(t + 1) * width].iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, want, "{isa:?} {:?} token {t} threads {threads}", case.shape);
                }
            }
        }
    }
}

#[test]
fn norms_and_activations_match_reference() {
    let mut rng = Rng(5);
    for dim in [1usize, 7, 16, 33, 576] {
        let n = 3;
        let x = rng.vec(n * dim);
        let w = rng.vec(dim);
        let mut got = vec![0f32; n * dim];
        let mut want = vec![0f32; n * dim];
        super::rms_norm(&x, &w, 1e-5, &mut got);
        reference::rms_norm(&x, &w, 1e-5, &mut want);
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "rms_norm dim {dim}: {g} vs {w}"
            );
        }
        let mut gate: Vec<f32> = rng.vec(n * dim).iter().map(|v| v * 20.0).collect();
        let up = rng.vec(n * dim);
        let mut want = gate.clone();
        super::silu_mul(&mut gate, &up);
        reference::silu_mul(&mut want, &up);
        for (g, w) in gate.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * (1.0 + w.abs()),
                "silu_mul dim {dim}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn the_backend_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CpuBackend>();
    // Two callers at once: one gets the pool, the other runs inline; both must be right.
    let backend = CpuBackend::new(2);
    let mut rng = Rng(9);
    let w = weight(&mut rng, 300, 70, true);
    let x = rng.vec(3 * 70);
    let mut want = vec![0f32; 3 * 300];
    backend.matmul(&x, 3, &w, &mut want);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..50 {
                    let mut y = vec![0f32; 3 * 300];
                    backend.matmul(&x, 3, &w, &mut y);
                    assert_eq!(y, want);
                }
            });
        }
    });
}
