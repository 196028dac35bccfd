// RMSNorm: out = x / sqrt(mean(x^2) + eps) * weight, per row. Grid: one block per row.
extern "C" __global__ void rms_norm_f32(const float* __restrict__ x, const float* __restrict__ weight,
                                        float* __restrict__ out, int hidden, float eps) {
    const float* row = x + (size_t)blockIdx.x * hidden;
    float* dst = out + (size_t)blockIdx.x * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) ss += row[i] * row[i];
    ss = block_sum(ss);
    const float inv = 1.0f / sqrtf(ss / (float)hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = row[i] * inv * weight[i];
}
