// Embedding lookup: out[r, :] = table[tokens[r], :], widened from bf16 to f32.
// Grid: one block per row. Token ids are validated on the host before a step is launched.
extern "C" __global__ void embedding_bf16(const bf16_t* __restrict__ table, const u32* __restrict__ tokens,
                                          float* __restrict__ out, int hidden) {
    const bf16_t* src = table + (size_t)tokens[blockIdx.x] * hidden;
    float* dst = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = bf16_to_f32(src[i]);
}
