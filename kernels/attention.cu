// Attention over the KV cache, for decode and for causal prefill alike: every row attends to the keys at
// positions [max(0, pos + 1 - window), pos] of its own request's cache, so a prefill step's rows (which
// share one cache, at consecutive positions) are causal by construction, and a decode batch may mix
// requests. Grouped-query attention: query head h reads kv head h / (n_heads / n_kv). The step's keys and
// values are already in the cache (rope_kv_append_f32 runs first in the same stream).

#define ATT_THREADS 256
#define ATT_TILE 256
#define ATT_MAX_HEAD_DIM 256

// Grid: (rows, n_heads); block: ATT_THREADS. Online softmax over tiles of ATT_TILE keys. Scores: each warp
// takes every 8th key of the tile, its lanes splitting head_dim. Weighted values: the block is cut into
// groups of head_dim threads (4 groups at head_dim 64, 2 at 128), each thread owning one output dim and
// every group-th key, and the groups' partial sums are added at the end. Softmax statistics are f32
// throughout; every group rescales by the same running maximum, so the partial sums add exactly.
extern "C" __global__ void __launch_bounds__(ATT_THREADS)
attention_f32(const float* __restrict__ qkv, const RowDesc* __restrict__ rows, float* __restrict__ out, int layer,
              int n_heads, int n_kv, int head_dim, int qkv_stride, int window, float scale) {
    __shared__ float q[ATT_MAX_HEAD_DIM];
    __shared__ float p[ATT_TILE];
    __shared__ float partial[ATT_THREADS];
    const int r = blockIdx.x, h = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warps = ATT_THREADS / 32;
    const RowDesc d = rows[r];
    const int kvh = h / (n_heads / n_kv);
    const float* keys = layer_keys(d, layer, n_kv, head_dim) + (size_t)kvh * d.cap * head_dim;
    const float* values = keys + (size_t)n_kv * d.cap * head_dim;
    const float* qsrc = qkv + (size_t)r * qkv_stride + h * head_dim;
    for (int i = tid; i < head_dim; i += ATT_THREADS) q[i] = qsrc[i];

    const int groups = ATT_THREADS / head_dim;  // >= 1: head_dim <= 256 is checked on the host
    const int dim = tid % head_dim, group = tid / head_dim;
    const bool active = group < groups;

    const int end = d.pos + 1;
    const int start = window > 0 && end > window ? end - window : 0;
    float m = NEG_INF, l = 0.0f, acc = 0.0f;
    for (int t0 = start; t0 < end; t0 += ATT_TILE) {
        const int n = min(ATT_TILE, end - t0);
        __syncthreads();  // q is written (first tile) / p is consumed (later tiles)
        for (int j = warp; j < n; j += warps) {
            const float* kr = keys + (size_t)(t0 + j) * head_dim;
            float s = 0.0f;
            for (int i = lane; i < head_dim; i += 32) s += q[i] * kr[i];
            s = warp_sum(s);
            if (lane == 0) p[j] = s * scale;
        }
        __syncthreads();
        float local_max = NEG_INF;
        for (int j = tid; j < n; j += ATT_THREADS) local_max = fmaxf(local_max, p[j]);
        const float m_new = fmaxf(m, block_max(local_max));
        const float correction = expf(m - m_new);  // 0 on the first tile (m = -inf)
        float local_sum = 0.0f;
        for (int j = tid; j < n; j += ATT_THREADS) {
            const float e = expf(p[j] - m_new);
            p[j] = e;
            local_sum += e;
        }
        const float tile_sum = block_sum(local_sum);  // its barriers also publish p
        float a = 0.0f;
        if (active) {
            const float* vcol = values + (size_t)t0 * head_dim + dim;
#pragma unroll 4
            for (int j = group; j < n; j += groups) a += p[j] * vcol[(size_t)j * head_dim];
        }
        l = l * correction + tile_sum;
        acc = acc * correction + a;
        m = m_new;
    }
    partial[tid] = active ? acc : 0.0f;
    __syncthreads();
    if (tid < head_dim) {
        float total = 0.0f;
        for (int g = 0; g < groups; ++g) total += partial[g * head_dim + tid];
        out[(size_t)r * n_heads * head_dim + h * head_dim + tid] = total / l;
    }
}
