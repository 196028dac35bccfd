// Decode matrix-vector products: y[b, n] (+)= sum_k W[n, k] * x[b, k] for a batch of up to 8 rows.
// Memory-bound: every weight byte is read once per step, 16 bytes per lane per load (8 bf16), widened to
// f32 and multiplied against all rows of the batch; f32 accumulation, one warp per output row, the
// warp's partial sums combined by shuffles. With `accumulate` the result is added to y (the residual add
// of o_proj and down_proj fused into the product).
// Requires K % 8 == 0 (16-byte aligned weight rows); the host falls back to cuBLAS otherwise.
// Grid: ceil(N / (blockDim.x / 32)) blocks.

template <int B>
__device__ __forceinline__ void matvec_rows(const bf16_t* __restrict__ w, const float* __restrict__ x,
                                            float* __restrict__ y, int n_out, int k, int accumulate) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (row >= n_out) return;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)row * k);
    const int chunks = k >> 3;
    float acc[B];
#pragma unroll
    for (int b = 0; b < B; ++b) acc[b] = 0.0f;
#pragma unroll 4
    for (int c = lane; c < chunks; c += 32) {
        const uint4 packed = __ldg(wr + c);
        float wv[8];
        wv[0] = __uint_as_float(packed.x << 16); wv[1] = __uint_as_float(packed.x & 0xffff0000u);
        wv[2] = __uint_as_float(packed.y << 16); wv[3] = __uint_as_float(packed.y & 0xffff0000u);
        wv[4] = __uint_as_float(packed.z << 16); wv[5] = __uint_as_float(packed.z & 0xffff0000u);
        wv[6] = __uint_as_float(packed.w << 16); wv[7] = __uint_as_float(packed.w & 0xffff0000u);
#pragma unroll
        for (int b = 0; b < B; ++b) {
            const float4* xp = reinterpret_cast<const float4*>(x + (size_t)b * k) + 2 * c;
            const float4 lo = xp[0], hi = xp[1];
            acc[b] += wv[0] * lo.x + wv[1] * lo.y + wv[2] * lo.z + wv[3] * lo.w
                    + wv[4] * hi.x + wv[5] * hi.y + wv[6] * hi.z + wv[7] * hi.w;
        }
    }
#pragma unroll
    for (int b = 0; b < B; ++b) {
        const float s = warp_sum(acc[b]);
        if (lane == 0) {
            float* dst = y + (size_t)b * n_out + row;
            *dst = accumulate ? *dst + s : s;
        }
    }
}

extern "C" __global__ void matvec_bf16(const bf16_t* __restrict__ w, const float* __restrict__ x,
                                       float* __restrict__ y, int n_out, int k, int batch, int accumulate) {
    switch (batch) {
        case 1: matvec_rows<1>(w, x, y, n_out, k, accumulate); break;
        case 2: matvec_rows<2>(w, x, y, n_out, k, accumulate); break;
        case 3: matvec_rows<3>(w, x, y, n_out, k, accumulate); break;
        case 4: matvec_rows<4>(w, x, y, n_out, k, accumulate); break;
        case 5: matvec_rows<5>(w, x, y, n_out, k, accumulate); break;
        case 6: matvec_rows<6>(w, x, y, n_out, k, accumulate); break;
        case 7: matvec_rows<7>(w, x, y, n_out, k, accumulate); break;
        case 8: matvec_rows<8>(w, x, y, n_out, k, accumulate); break;
        default: break;
    }
}
