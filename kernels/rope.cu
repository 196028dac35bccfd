// Rotary embeddings in place, HF's rotate-half convention (element i pairs with i + head_dim/2).
// `x` rows are `row_stride` floats apart and hold `heads` heads from the row's start: called once on the
// fused qkv buffer, it rotates the q heads and the k heads together and leaves v alone.
// Angles are position * inv_freq in f32, as HF computes them; `inv_freq` already carries any scaling
// (linear, `llama3`), computed once on the host from the model config.
// Grid: one block per row; positions come from the rows' descriptors.
extern "C" __global__ void rope_f32(float* __restrict__ x, const RowDesc* __restrict__ rows,
                                    const float* __restrict__ inv_freq, int heads, int head_dim, int row_stride) {
    const int half = head_dim / 2;
    const float pos = (float)rows[blockIdx.x].pos;
    float* row = x + (size_t)blockIdx.x * row_stride;
    for (int t = threadIdx.x; t < heads * half; t += blockDim.x) {
        const int h = t / half, i = t - h * half;
        const float angle = pos * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float* head = row + h * head_dim;
        const float x1 = head[i], x2 = head[i + half];
        head[i] = x1 * c - x2 * s;
        head[i + half] = x2 * c + x1 * s;
    }
}
