// Rotary embeddings and the KV cache append in one pass, for decode and prefill alike: rotates each row's
// q heads in place (attention reads them from the qkv rows), rotates its k heads into the row's cache at
// the row's position, and copies its v heads there too. One launch per layer instead of two.
// HF's rotate-half convention (element i pairs with i + head_dim/2); angles are position * inv_freq in
// f32, as HF computes them; `inv_freq` already carries any scaling (linear, `llama3`), computed once on
// the host from the model config. Rows are `qkv_stride` floats apart: [q heads | k heads | v heads].
// Grid: one block per row.
extern "C" __global__ void rope_kv_append_f32(float* __restrict__ qkv, const RowDesc* __restrict__ rows,
                                              const float* __restrict__ inv_freq, int layer, int n_heads,
                                              int n_kv, int head_dim, int qkv_stride) {
    const int half = head_dim / 2;
    const RowDesc d = rows[blockIdx.x];
    const float pos = (float)d.pos;
    float* row = qkv + (size_t)blockIdx.x * qkv_stride;
    float* keys = layer_keys(d, layer, n_kv, head_dim);
    float* values = keys + (size_t)n_kv * d.cap * head_dim;
    for (int t = threadIdx.x; t < (n_heads + n_kv) * half; t += blockDim.x) {
        const int h = t / half, i = t - h * half;
        const float angle = pos * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        float* head = row + h * head_dim;
        const float x1 = head[i], x2 = head[i + half];
        const float r1 = x1 * c - x2 * s, r2 = x2 * c + x1 * s;
        if (h < n_heads) {
            head[i] = r1;
            head[i + half] = r2;
        } else {
            float* dst = keys + ((size_t)(h - n_heads) * d.cap + d.pos) * head_dim;
            dst[i] = r1;
            dst[i + half] = r2;
        }
    }
    const float* v = row + (n_heads + n_kv) * head_dim;
    for (int t = threadIdx.x; t < n_kv * head_dim; t += blockDim.x) {
        const int h = t / head_dim, i = t - h * head_dim;
        values[((size_t)h * d.cap + d.pos) * head_dim + i] = v[t];
    }
}
