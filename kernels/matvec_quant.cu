// Products with weights kept quantized on the device in ggml's block layouts (Q4_0, Q4_1, Q5_0, Q8_0:
// 32-value blocks; Q4_K, Q6_K: 256-value super-blocks), rows of blocks row-major as the CPU backend
// holds them (`WeightData::Quant`).
//
// matvec_<kind>: decode products of up to 8 rows, y[b, n] (+)= sum_k W[n, k] * x[b, k], with the same
// arguments, fused RMSNorm and residual add as matvec_bf16. One warp per output row; lane i takes the
// row's 32-value chunks i, i + 32, ... (a 32-value block, or one 32-value group of a super-block),
// dequantizes the chunk into registers with the operations of ggml's reference dequantizers (f32, same
// order; NVRTC may contract `q * d + m` into one FMA, so a value can differ from `gguf::dequantize`'s in
// its last bit; the index arithmetic was checked value for value against gguf-py), and multiplies it against
// every batch row's f32 activations. Decode reads 4.5-8.5 bits per weight instead of bf16's 16.
// Activations stay f32 (llama.cpp quantizes them to 8 bits; here the product is the dequantized
// weights' f32 dot product, so it differs from the CPU backend's 8-bit activations by that rounding).
//
// dequantize_<kind>_bf16: the prefill path. Widens a whole quantized matrix to bf16 into a scratch
// buffer for cuBLAS (compute-bound work, as the CPU backend dequantizes tile by tile above 32 rows).
// One thread per 32-value chunk.

#define KIND_Q4_0 0
#define KIND_Q4_1 1
#define KIND_Q5_0 2
#define KIND_Q8_0 3
#define KIND_Q4_K 4
#define KIND_Q6_K 5

typedef unsigned char u8;

__device__ __forceinline__ float f16_at(const u8* p) {
    const unsigned short bits = (unsigned short)p[0] | ((unsigned short)p[1] << 8);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(bits));
    return f;
}

template <int KIND> struct Layout;
template <> struct Layout<KIND_Q4_0> { static const int BLOCK_BYTES = 18, CHUNKS = 1; };
template <> struct Layout<KIND_Q4_1> { static const int BLOCK_BYTES = 20, CHUNKS = 1; };
template <> struct Layout<KIND_Q5_0> { static const int BLOCK_BYTES = 22, CHUNKS = 1; };
template <> struct Layout<KIND_Q8_0> { static const int BLOCK_BYTES = 34, CHUNKS = 1; };
template <> struct Layout<KIND_Q4_K> { static const int BLOCK_BYTES = 144, CHUNKS = 8; };
template <> struct Layout<KIND_Q6_K> { static const int BLOCK_BYTES = 210, CHUNKS = 8; };

// ggml's get_scale_min_k4.
__device__ __forceinline__ void scale_min_k4(int j, const u8* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Values c * 32 .. c * 32 + 31 of a row (`row`: its first block), as ggml's dequantize_row_<kind>.
template <int KIND>
__device__ __forceinline__ void decode_chunk(const u8* __restrict__ row, int c, float v[32]) {
    const int per = Layout<KIND>::CHUNKS;
    const u8* b = row + (size_t)(c / per) * Layout<KIND>::BLOCK_BYTES;
    const int s = c % per;
    if (KIND == KIND_Q4_0) {
        const float d = f16_at(b);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            v[j] = (float)((int)(b[2 + j] & 0x0F) - 8) * d;
            v[j + 16] = (float)((int)(b[2 + j] >> 4) - 8) * d;
        }
    } else if (KIND == KIND_Q4_1) {
        const float d = f16_at(b), m = f16_at(b + 2);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            v[j] = (float)(b[4 + j] & 0x0F) * d + m;
            v[j + 16] = (float)(b[4 + j] >> 4) * d + m;
        }
    } else if (KIND == KIND_Q5_0) {
        const float d = f16_at(b);
        const u32 qh = (u32)b[2] | ((u32)b[3] << 8) | ((u32)b[4] << 16) | ((u32)b[5] << 24);
#pragma unroll
        for (int j = 0; j < 16; ++j) {
            const int h0 = ((qh >> j) << 4) & 0x10;
            const int h1 = (qh >> (j + 12)) & 0x10;
            v[j] = (float)(((b[6 + j] & 0x0F) | h0) - 16) * d;
            v[j + 16] = (float)(((b[6 + j] >> 4) | h1) - 16) * d;
        }
    } else if (KIND == KIND_Q8_0) {
        const float d = f16_at(b);
#pragma unroll
        for (int j = 0; j < 32; ++j) v[j] = (float)(signed char)b[2 + j] * d;
    } else if (KIND == KIND_Q4_K) {
        // Group s of 8: 64-value chunk s / 2, low nibbles for even s, high for odd.
        const float d = f16_at(b), dmin = f16_at(b + 2);
        int sc, m;
        scale_min_k4(s, b + 4, sc, m);
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        const u8* q = b + 16 + (s / 2) * 32;
        const int shift = (s & 1) * 4;
#pragma unroll
        for (int l = 0; l < 32; ++l) v[l] = d1 * (float)((q[l] >> shift) & 0x0F) - m1;
    } else {  // KIND_Q6_K
        // Group s of 8: half s / 4 (128 values), quarter s % 4 within it.
        const float d = f16_at(b + 208);
        const int half = s / 4, quarter = s % 4;
        const u8* ql = b + half * 64 + (quarter & 1) * 32;
        const u8* qh = b + 128 + half * 32;
        const signed char* sc = (const signed char*)(b + 192) + half * 8 + 2 * quarter;
        const int lshift = (quarter >> 1) * 4, hshift = 2 * quarter;
#pragma unroll
        for (int l = 0; l < 32; ++l) {
            const int q = (((ql[l] >> lshift) & 0x0F) | (((qh[l] >> hshift) & 3) << 4)) - 32;
            v[l] = d * (float)sc[l / 16] * (float)q;
        }
    }
}

template <int KIND, int B, bool NORM>
__device__ __forceinline__ void matvec_quant_rows(const u8* __restrict__ w, const float* __restrict__ x,
                                                  float* __restrict__ y, int n_out, int k, int accumulate,
                                                  const float* __restrict__ norm, float eps) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_out) return;
    const int chunks = k >> 5;
    const size_t row_bytes = (size_t)(chunks / Layout<KIND>::CHUNKS) * Layout<KIND>::BLOCK_BYTES;
    const u8* wr = w + (size_t)row * row_bytes;
    float acc[B], ss[B];
#pragma unroll
    for (int b = 0; b < B; ++b) { acc[b] = 0.0f; ss[b] = 0.0f; }
    for (int c = lane; c < chunks; c += 32) {
        float v[32];
        decode_chunk<KIND>(wr, c, v);
#pragma unroll
        for (int b = 0; b < B; ++b) {
            const float4* xp = reinterpret_cast<const float4*>(x + (size_t)b * k) + 8 * c;
            const float4* np = reinterpret_cast<const float4*>(norm) + 8 * c;
            float a = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                float4 xv = xp[i];
                if (NORM) {
                    ss[b] += xv.x * xv.x + xv.y * xv.y + xv.z * xv.z + xv.w * xv.w;
                    const float4 nv = np[i];
                    xv.x *= nv.x; xv.y *= nv.y; xv.z *= nv.z; xv.w *= nv.w;
                }
                a += v[4 * i] * xv.x + v[4 * i + 1] * xv.y + v[4 * i + 2] * xv.z + v[4 * i + 3] * xv.w;
            }
            acc[b] += a;
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

template <int KIND>
__device__ __forceinline__ void matvec_quant(const u8* w, const float* x, float* y, int n_out, int k, int batch,
                                             int accumulate, const float* norm, float eps) {
#define MATVEC_QUANT_CASE(B)                                                                          \
    case B:                                                                                           \
        if (norm) matvec_quant_rows<KIND, B, true>(w, x, y, n_out, k, accumulate, norm, eps);         \
        else matvec_quant_rows<KIND, B, false>(w, x, y, n_out, k, accumulate, norm, eps);             \
        break;
    switch (batch) {
        MATVEC_QUANT_CASE(1) MATVEC_QUANT_CASE(2) MATVEC_QUANT_CASE(3) MATVEC_QUANT_CASE(4)
        MATVEC_QUANT_CASE(5) MATVEC_QUANT_CASE(6) MATVEC_QUANT_CASE(7) MATVEC_QUANT_CASE(8)
        default: break;
    }
#undef MATVEC_QUANT_CASE
}

template <int KIND>
__device__ __forceinline__ void dequantize_bf16(const u8* __restrict__ w, bf16_t* __restrict__ out, int rows, int k) {
    const size_t chunk = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int chunks = k >> 5;
    if (chunk >= (size_t)rows * chunks) return;
    const size_t row = chunk / chunks;
    const int c = (int)(chunk % chunks);
    const size_t row_bytes = (size_t)(chunks / Layout<KIND>::CHUNKS) * Layout<KIND>::BLOCK_BYTES;
    float v[32];
    decode_chunk<KIND>(w + row * row_bytes, c, v);
    bf16_t* o = out + row * k + (size_t)c * 32;
#pragma unroll
    for (int j = 0; j < 32; ++j) o[j] = f32_to_bf16_bits(v[j]);
}

// One entry point per kind and operation, spelled out so each name can be found in this file.

extern "C" __global__ void matvec_q4_0(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                   int n_out, int k, int batch, int accumulate, const float* __restrict__ norm, float eps) {
    matvec_quant<KIND_Q4_0>(w, x, y, n_out, k, batch, accumulate, norm, eps);
}
extern "C" __global__ void dequantize_q4_0_bf16(const u8* __restrict__ w, bf16_t* __restrict__ out, int rows, int k) {
    dequantize_bf16<KIND_Q4_0>(w, out, rows, k);
}

extern "C" __global__ void matvec_q4_1(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                   int n_out, int k, int batch, int accumulate, const float* __restrict__ norm, float eps) {
    matvec_quant<KIND_Q4_1>(w, x, y, n_out, k, batch, accumulate, norm, eps);
}
extern "C" __global__ void dequantize_q4_1_bf16(const u8* __restrict__ w, bf16_t* __restrict__ out, int rows, int k) {
    dequantize_bf16<KIND_Q4_1>(w, out, rows, k);
}

extern "C" __global__ void matvec_q5_0(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                   int n_out, int k, int batch, int accumulate, const float* __restrict__ norm, float eps) {
    matvec_quant<KIND_Q5_0>(w, x, y, n_out, k, batch, accumulate, norm, eps);
}
extern "C" __global__ void dequantize_q5_0_bf16(const u8* __restrict__ w, bf16_t* __restrict__ out, int rows, int k) {
    dequantize_bf16<KIND_Q5_0>(w, out, rows, k);
}

extern "C" __global__ void matvec_q8_0(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                   int n_out, int k, int batch, int accumulate, const float* __restrict__ norm, float eps) {
    matvec_quant<KIND_Q8_0>(w, x, y, n_out, k, batch, accumulate, norm, eps);
}
extern "C" __global__ void dequantize_q8_0_bf16(const u8* __restrict__ w, bf16_t* __restrict__ out, int rows, int k) {
    dequantize_bf16<KIND_Q8_0>(w, out, rows, k);
}

extern "C" __global__ void matvec_q4_k(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                   int n_out, int k, int batch, int accumulate, const float* __restrict__ norm, float eps) {
    matvec_quant<KIND_Q4_K>(w, x, y, n_out, k, batch, accumulate, norm, eps);
}
extern "C" __global__ void dequantize_q4_k_bf16(const u8* __restrict__ w, bf16_t* __restrict__ out, int rows, int k) {
    dequantize_bf16<KIND_Q4_K>(w, out, rows, k);
}

extern "C" __global__ void matvec_q6_k(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y,
                                   int n_out, int k, int batch, int accumulate, const float* __restrict__ norm, float eps) {
    matvec_quant<KIND_Q6_K>(w, x, y, n_out, k, batch, accumulate, norm, eps);
}
extern "C" __global__ void dequantize_q6_k_bf16(const u8* __restrict__ w, bf16_t* __restrict__ out, int rows, int k) {
    dequantize_bf16<KIND_Q6_K>(w, out, rows, k);
}
