// Decode matrix-vector products: y[b, n] (+)= sum_k W[n, k] * x[b, k] for a batch of up to 8 rows.
// Memory-bound: every weight byte is read once per step, 16 bytes per lane per load (8 bf16), widened to
// f32 and multiplied against all rows of the batch; f32 accumulation, one warp per output row, the
// warp's partial sums combined by shuffles. With `accumulate` the result is added to y (the residual add
// of o_proj and down_proj fused into the product).
// With `norm` (non-null) the product takes RMSNorm(x) * norm instead of x, with the norm fused in: a warp
// reads all of x for its dot product anyway, so it also sums x^2 and scales at the end,
// y = (sum_k W[n,k] * norm[k] * x[k]) / sqrt(mean(x^2) + eps) — one launch and one pass over x fewer
// per norm than a separate rms_norm_f32.
// Requires K % 8 == 0 (16-byte aligned weight rows); the host falls back to cuBLAS otherwise.
// Grid: ceil(N / (blockDim.x / 32)) blocks.

// One 8-wide chunk of row b of x (at chunk c), times the norm weights when NORM; its squares go to ss.
template <bool NORM>
__device__ __forceinline__ void load_x(const float* __restrict__ x, const float* __restrict__ norm, int c,
                                       float xv[8], float& ss) {
    const float4* xp = reinterpret_cast<const float4*>(x) + 2 * c;
    const float4 lo = xp[0], hi = xp[1];
    xv[0] = lo.x; xv[1] = lo.y; xv[2] = lo.z; xv[3] = lo.w;
    xv[4] = hi.x; xv[5] = hi.y; xv[6] = hi.z; xv[7] = hi.w;
    if (NORM) {
        const float4* np = reinterpret_cast<const float4*>(norm) + 2 * c;
        const float4 nlo = np[0], nhi = np[1];
        ss += xv[0] * xv[0] + xv[1] * xv[1] + xv[2] * xv[2] + xv[3] * xv[3]
            + xv[4] * xv[4] + xv[5] * xv[5] + xv[6] * xv[6] + xv[7] * xv[7];
        xv[0] *= nlo.x; xv[1] *= nlo.y; xv[2] *= nlo.z; xv[3] *= nlo.w;
        xv[4] *= nhi.x; xv[5] *= nhi.y; xv[6] *= nhi.z; xv[7] *= nhi.w;
    }
}

__device__ __forceinline__ void unpack8(uint4 p, float v[8]) {
    v[0] = __uint_as_float(p.x << 16); v[1] = __uint_as_float(p.x & 0xffff0000u);
    v[2] = __uint_as_float(p.y << 16); v[3] = __uint_as_float(p.y & 0xffff0000u);
    v[4] = __uint_as_float(p.z << 16); v[5] = __uint_as_float(p.z & 0xffff0000u);
    v[6] = __uint_as_float(p.w << 16); v[7] = __uint_as_float(p.w & 0xffff0000u);
}

__device__ __forceinline__ float dot8(const float w[8], const float x[8]) {
    return w[0] * x[0] + w[1] * x[1] + w[2] * x[2] + w[3] * x[3] + w[4] * x[4] + w[5] * x[5] + w[6] * x[6] + w[7] * x[7];
}

template <int B, bool NORM>
__device__ __forceinline__ void matvec_rows(const bf16_t* __restrict__ w, const float* __restrict__ x,
                                            float* __restrict__ y, int n_out, int k, int accumulate,
                                            const float* __restrict__ norm, float eps) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_out) return;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    const int chunks = k >> 3;
    float acc[B], ss[B];
#pragma unroll
    for (int b = 0; b < B; ++b) { acc[b] = 0.0f; ss[b] = 0.0f; }
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32) {
        float wv[8];
        unpack8(__ldg(wr + c), wv);
#pragma unroll
        for (int b = 0; b < B; ++b) {
            float xv[8];
            load_x<NORM>(x + (size_t)b * k, norm, c, xv, ss[b]);
            acc[b] += dot8(wv, xv);
        }
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
        float s = warp_sum(acc[b]);
        if (NORM) s *= 1.0f / sqrtf(warp_sum(ss[b]) / (float)k + eps);
        if (lane == 0) {
            float* dst = y + (size_t)b * n_out + row;
            *dst = accumulate ? *dst + s : s;
        }
    }
}

extern "C" __global__ void matvec_bf16(const bf16_t* __restrict__ w, const float* __restrict__ x,
                                       float* __restrict__ y, int n_out, int k, int batch, int accumulate,
                                       const float* __restrict__ norm, float eps) {
    switch (batch) {
        case 1: if (norm) matvec_rows<1, true>(w, x, y, n_out, k, accumulate, norm, eps); else matvec_rows<1, false>(w, x, y, n_out, k, accumulate, norm, eps); break;
        case 2: if (norm) matvec_rows<2, true>(w, x, y, n_out, k, accumulate, norm, eps); else matvec_rows<2, false>(w, x, y, n_out, k, accumulate, norm, eps); break;
        case 3: if (norm) matvec_rows<3, true>(w, x, y, n_out, k, accumulate, norm, eps); else matvec_rows<3, false>(w, x, y, n_out, k, accumulate, norm, eps); break;
        case 4: if (norm) matvec_rows<4, true>(w, x, y, n_out, k, accumulate, norm, eps); else matvec_rows<4, false>(w, x, y, n_out, k, accumulate, norm, eps); break;
        case 5: if (norm) matvec_rows<5, true>(w, x, y, n_out, k, accumulate, norm, eps); else matvec_rows<5, false>(w, x, y, n_out, k, accumulate, norm, eps); break;
        case 6: if (norm) matvec_rows<6, true>(w, x, y, n_out, k, accumulate, norm, eps); else matvec_rows<6, false>(w, x, y, n_out, k, accumulate, norm, eps); break;
        case 7: if (norm) matvec_rows<7, true>(w, x, y, n_out, k, accumulate, norm, eps); else matvec_rows<7, false>(w, x, y, n_out, k, accumulate, norm, eps); break;
        case 8: if (norm) matvec_rows<8, true>(w, x, y, n_out, k, accumulate, norm, eps); else matvec_rows<8, false>(w, x, y, n_out, k, accumulate, norm, eps); break;
        default: break;
    }
}

// The SiLU-gated MLP's first half, fused: act[b, i] = silu(gate_i · x_b) * (up_i · x_b), where gate_i and
// up_i are rows i and ffn + i of the stacked gate/up matrix. One warp computes both dot products of its
// i (the same loads of x serve both), so neither the [rows, 2 * ffn] product nor a separate activation
// pass exists. The dot products (and the optional fused RMSNorm) are those of matvec_bf16, the silu
// expression that of silu_mul_f32. Bias-free MLPs only (the host uses the unfused pair otherwise).
// Grid: ceil(ffn / (blockDim.x / 32)) blocks.
template <int B, bool NORM>
__device__ __forceinline__ void swiglu_rows(const bf16_t* __restrict__ w, const float* __restrict__ x,
                                            float* __restrict__ act, int ffn, int k,
                                            const float* __restrict__ norm, float eps) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= ffn) return;
    const uint4* gr = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    const uint4* ur = reinterpret_cast<const uint4*>(w + (size_t)(ffn + row) * k);
    const int chunks = k >> 3;
    float ag[B], au[B], ss[B];
#pragma unroll
    for (int b = 0; b < B; ++b) { ag[b] = 0.0f; au[b] = 0.0f; ss[b] = 0.0f; }
#pragma unroll 2
    for (int c = lane; c < chunks; c += 32) {
        float g[8], u[8];
        unpack8(__ldg(gr + c), g);
        unpack8(__ldg(ur + c), u);
#pragma unroll
        for (int b = 0; b < B; ++b) {
            float xv[8];
            load_x<NORM>(x + (size_t)b * k, norm, c, xv, ss[b]);
            ag[b] += dot8(g, xv);
            au[b] += dot8(u, xv);
        }
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
        float gs = warp_sum(ag[b]), us = warp_sum(au[b]);
        if (NORM) {
            const float inv = 1.0f / sqrtf(warp_sum(ss[b]) / (float)k + eps);
            gs *= inv;
            us *= inv;
        }
        if (lane == 0) act[(size_t)b * ffn + row] = gs / (1.0f + expf(-gs)) * us;
    }
}

extern "C" __global__ void matvec_swiglu_bf16(const bf16_t* __restrict__ w, const float* __restrict__ x,
                                              float* __restrict__ act, int ffn, int k, int batch,
                                              const float* __restrict__ norm, float eps) {
    switch (batch) {
        case 1: if (norm) swiglu_rows<1, true>(w, x, act, ffn, k, norm, eps); else swiglu_rows<1, false>(w, x, act, ffn, k, norm, eps); break;
        case 2: if (norm) swiglu_rows<2, true>(w, x, act, ffn, k, norm, eps); else swiglu_rows<2, false>(w, x, act, ffn, k, norm, eps); break;
        case 3: if (norm) swiglu_rows<3, true>(w, x, act, ffn, k, norm, eps); else swiglu_rows<3, false>(w, x, act, ffn, k, norm, eps); break;
        case 4: if (norm) swiglu_rows<4, true>(w, x, act, ffn, k, norm, eps); else swiglu_rows<4, false>(w, x, act, ffn, k, norm, eps); break;
        case 5: if (norm) swiglu_rows<5, true>(w, x, act, ffn, k, norm, eps); else swiglu_rows<5, false>(w, x, act, ffn, k, norm, eps); break;
        case 6: if (norm) swiglu_rows<6, true>(w, x, act, ffn, k, norm, eps); else swiglu_rows<6, false>(w, x, act, ffn, k, norm, eps); break;
        case 7: if (norm) swiglu_rows<7, true>(w, x, act, ffn, k, norm, eps); else swiglu_rows<7, false>(w, x, act, ffn, k, norm, eps); break;
        case 8: if (norm) swiglu_rows<8, true>(w, x, act, ffn, k, norm, eps); else swiglu_rows<8, false>(w, x, act, ffn, k, norm, eps); break;
        default: break;
    }
}
