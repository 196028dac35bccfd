// Shared by every kernel file: the loader prepends this text to each source before NVRTC compiles it,
// so the kernels need no include paths and no CUDA headers (bf16 is handled as raw bits).
//
// Conventions: activations and accumulators are f32; weights are bf16 (raw u16, round-to-nearest-even
// as PyTorch stores them); matrices are row-major [rows, cols] as nn.Linear holds them.

typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#define NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ float bf16_to_f32(bf16_t v) { return __uint_as_float(((u32)v) << 16); }

// f32 -> bf16, round to nearest even; NaN stays NaN.
__device__ __forceinline__ bf16_t f32_to_bf16_bits(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u32 rounding = 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)((u + rounding) >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). Every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = lane < warps ? partial[lane] : 0.0f;
    return warp_sum(total);
}

// Maximum over the whole block, as block_sum.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = lane < warps ? partial[lane] : NEG_INF;
    return warp_max(total);
}

// One row of a step as the attention kernels see it: the request's KV cache (one allocation laid out
// [layer][k|v][kv_head][cap][head_dim], f32), its capacity in positions, and this row's position.
struct RowDesc {
    u64 cache;
    int cap;
    int pos;
};

__device__ __forceinline__ float* layer_keys(const RowDesc& d, int layer, int n_kv, int head_dim) {
    return reinterpret_cast<float*>(d.cache) + (size_t)layer * 2 * n_kv * d.cap * head_dim;
}
