// Attention over the KV cache, for decode and for causal prefill alike: every row attends to the keys at
// positions [max(0, pos + 1 - window), pos] of its own request's cache, so a prefill step's rows (which
// share one cache, at consecutive positions) are causal by construction, and a decode batch may mix
// requests. Grouped-query attention: query head h reads kv head h / (n_heads / n_kv).

// Copies each row's new key and value (the k and v parts of the fused qkv row) into its cache at the
// row's position. Grid: one block per row. Runs before attention_f32 in the same stream.
extern "C" __global__ void kv_append_f32(const float* __restrict__ qkv, const RowDesc* __restrict__ rows, int layer,
                                         int n_heads, int n_kv, int head_dim, int qkv_stride) {
    const RowDesc d = rows[blockIdx.x];
    float* keys = layer_keys(d, layer, n_kv, head_dim);
    float* values = keys + (size_t)n_kv * d.cap * head_dim;
    const float* k = qkv + (size_t)blockIdx.x * qkv_stride + n_heads * head_dim;
    const float* v = k + n_kv * head_dim;
    for (int t = threadIdx.x; t < n_kv * head_dim; t += blockDim.x) {
        const int h = t / head_dim, i = t - h * head_dim;
        const size_t dst = ((size_t)h * d.cap + d.pos) * head_dim + i;
        keys[dst] = k[t];
        values[dst] = v[t];
    }
}

#define ATT_THREADS 128
#define ATT_TILE 128
#define ATT_MAX_HEAD_DIM 256

// Grid: (rows, n_heads); block: ATT_THREADS. Online softmax over tiles of ATT_TILE keys: a warp scores a
// key (lanes split head_dim), then each thread owns output dims tid and tid + ATT_THREADS.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention_f32(const float* __restrict__ qkv, const RowDesc* __restrict__ rows, float* __restrict__ out, int layer,
              int n_heads, int n_kv, int head_dim, int qkv_stride, int window, float scale) {
    __shared__ float q[ATT_MAX_HEAD_DIM];
    __shared__ float p[ATT_TILE];
    const int r = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const RowDesc d = rows[r];
    const int kvh = h / (n_heads / n_kv);
    const float* keys = layer_keys(d, layer, n_kv, head_dim) + (size_t)kvh * d.cap * head_dim;
    const float* values = keys + (size_t)n_kv * d.cap * head_dim;
    const float* qsrc = qkv + (size_t)r * qkv_stride + h * head_dim;
    for (int i = tid; i < head_dim; i += ATT_THREADS) q[i] = qsrc[i];

    const int end = d.pos + 1;
    const int start = window > 0 && end > window ? end - window : 0;
    float m = NEG_INF, l = 0.0f, acc0 = 0.0f, acc1 = 0.0f;
    for (int t0 = start; t0 < end; t0 += ATT_TILE) {
        const int n = min(ATT_TILE, end - t0);
        __syncthreads();  // q is written (first tile) / p is consumed (later tiles)
        for (int j = warp; j < n; j += ATT_THREADS / 32) {
            const float* kr = keys + (size_t)(t0 + j) * head_dim;
            float s = 0.0f;
            for (int i = lane; i < head_dim; i += 32) s += q[i] * kr[i];
            s = warp_sum(s);
            if (lane == 0) p[j] = s * scale;
        }
        __syncthreads();
        float tile_max = NEG_INF;
        for (int j = 0; j < n; ++j) tile_max = fmaxf(tile_max, p[j]);
        const float m_new = fmaxf(m, tile_max);
        const float correction = expf(m - m_new);  // 0 on the first tile (m = -inf)
        __syncthreads();
        for (int j = tid; j < n; j += ATT_THREADS) p[j] = expf(p[j] - m_new);
        __syncthreads();
        float tile_sum = 0.0f;
        float a0 = 0.0f, a1 = 0.0f;
        const int d0 = tid, d1 = tid + ATT_THREADS;
        for (int j = 0; j < n; ++j) {
            const float w = p[j];
            tile_sum += w;
            const float* vr = values + (size_t)(t0 + j) * head_dim;
            if (d0 < head_dim) a0 += w * vr[d0];
            if (d1 < head_dim) a1 += w * vr[d1];
        }
        l = l * correction + tile_sum;
        acc0 = acc0 * correction + a0;
        acc1 = acc1 * correction + a1;
        m = m_new;
    }
    float* dst = out + (size_t)r * n_heads * head_dim + h * head_dim;
    const float inv = 1.0f / l;
    if (tid < head_dim) dst[tid] = acc0 * inv;
    if (tid + ATT_THREADS < head_dim) dst[tid + ATT_THREADS] = acc1 * inv;
}
