//! The naive reference implementations the fast kernels are tested against (test builds only).
//!
//! Straight loops, f32 accumulation in index order, libm `exp`: slow and obviously correct.

#![allow(clippy::needless_range_loop)]

use super::{AttentionShape, KvView};
use crate::tensor::{Weight, WeightData};

/// `y[t, r] = Σ_c x[t, c] · w[r, c]` for `t < n`; `x` is `[n, w.cols]`, `y` is `[n, w.rows]`.
pub fn matmul(x: &[f32], n: usize, w: &Weight, y: &mut [f32]) {
    assert_eq!(x.len(), n * w.cols, "matmul input shape");
    assert_eq!(y.len(), n * w.rows, "matmul output shape");
    for t in 0..n {
        let xt = &x[t * w.cols..(t + 1) * w.cols];
        for r in 0..w.rows {
            let mut acc = 0f32;
            match &w.data {
                WeightData::F32(d) => {
                    for (a, b) in d[r * w.cols..(r + 1) * w.cols].iter().zip(xt) {
                        acc += a * b;
                    }
                }
                WeightData::Bf16(d) => {
                    for (a, b) in d[r * w.cols..(r + 1) * w.cols].iter().zip(xt) {
                        acc += a.to_f32() * b;
                    }
                }
                WeightData::Quant { .. } | WeightData::QuantInterleaved { .. } => {
                    let mut row = vec![0f32; w.cols];
                    w.row_f32(r, &mut row);
                    for (a, b) in row.iter().zip(xt) {
                        acc += a * b;
                    }
                }
            }
            y[t * w.rows + r] = acc;
        }
    }
}

/// Causal attention for `n` query tokens at absolute positions `first_pos..first_pos + n`.
///
/// `q` is `[n, n_heads, head_dim]` (already rotated), `kv` holds keys/values for positions
/// `0..first_pos + n`, and `out` receives `[n, n_heads, head_dim]`. Softmax runs in f32.
pub fn attention(q: &[f32], n: usize, first_pos: usize, kv: KvView<'_>, shape: AttentionShape, out: &mut [f32]) {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        sliding_window,
    } = shape;
    assert_eq!(q.len(), n * n_heads * head_dim, "attention query shape");
    assert_eq!(out.len(), q.len(), "attention output shape");
    assert!(kv.len >= first_pos + n, "KV cache shorter than the queries");
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let mut scores = vec![0f32; kv.len];
    for t in 0..n {
        let pos = first_pos + t;
        let start = match sliding_window {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        };
        for h in 0..n_heads {
            let kvh = h / group;
            let qh = &q[(t * n_heads + h) * head_dim..][..head_dim];
            let kbase = kvh * kv.capacity * head_dim;
            let mut max = f32::NEG_INFINITY;
            for j in start..=pos {
                let kj = |d: usize| kv.k[super::key_offset(kv.capacity, head_dim, kvh, j, d)];
                let s: f32 = qh.iter().enumerate().map(|(d, a)| a * kj(d)).sum::<f32>() * scale;
                scores[j] = s;
                max = max.max(s);
            }
            let mut sum = 0f32;
            for s in &mut scores[start..=pos] {
                *s = (*s - max).exp();
                sum += *s;
            }
            let oh = &mut out[(t * n_heads + h) * head_dim..][..head_dim];
            oh.fill(0.0);
            for j in start..=pos {
                let p = scores[j] / sum;
                let vj = &kv.v[kbase + j * head_dim..][..head_dim];
                for (o, v) in oh.iter_mut().zip(vj) {
                    *o += p * v;
                }
            }
        }
    }
}

/// RMSNorm in f32: `out = x / sqrt(mean(x²) + eps) * weight`, row by row over `[n, dim]`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// SwiGLU: `gate = silu(gate) * up`, in place.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}
