// Token selection on the device, so a greedy or top-k step copies a few ids back instead of the logits.

// (value, index) order: larger value first; equal values, the lower index first (the host's argmax
// picks the first maximum too). NaN never wins.
__device__ __forceinline__ bool better(float v, int i, float bv, int bi) {
    return v > bv || (v == bv && i < bi);
}

__device__ __forceinline__ void block_best(float& v, int& i) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
    __syncthreads();
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = lane < warps ? sv[lane] : NEG_INF;
    i = lane < warps ? si[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (better(ov, oi, v, i)) { v = ov; i = oi; }
    }
}

// ids[r] = argmax(logits[r, :]). Grid: one block per row (blockDim a multiple of 32).
extern "C" __global__ void argmax_f32(const float* __restrict__ logits, int vocab, u32* __restrict__ ids) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = NEG_INF;
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        if (better(row[j], j, bv, bi)) { bv = row[j]; bi = j; }
    }
    block_best(bv, bi);
    if (threadIdx.x == 0) ids[blockIdx.x] = bi < vocab ? (u32)bi : 0u;
}

// The k best (value, index) pairs of each row, best first: k passes, each taking the best pair that is
// strictly worse than the previous pass's pick, so ties resolve by index and nothing is picked twice.
// O(k * vocab) per row, for the small k of top-k sampling. Grid: one block per row.
extern "C" __global__ void topk_f32(const float* __restrict__ logits, int vocab, int k,
                                    float* __restrict__ values, u32* __restrict__ ids) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float prev_v = __int_as_float(0x7f800000);
    int prev_i = -1;
    for (int pass = 0; pass < k; ++pass) {
        float bv = NEG_INF;
        int bi = 0x7fffffff;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float v = row[j];
            if (better(prev_v, prev_i, v, j) && better(v, j, bv, bi)) { bv = v; bi = j; }
        }
        block_best(bv, bi);
        if (threadIdx.x == 0) {
            values[(size_t)blockIdx.x * k + pass] = bv;
            ids[(size_t)blockIdx.x * k + pass] = bi < vocab ? (u32)bi : 0u;
        }
        prev_v = bv;
        prev_i = bi;
        if (bi >= vocab) prev_i = vocab;  // the row is exhausted (k > number of non-NaN values)
    }
}
