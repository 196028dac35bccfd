// Small element-wise ops around the matrix products. (The residual adds have no kernel of their own: they
// are fused into the o_proj and down_proj products, as matvec_bf16's `accumulate` and cuBLAS's beta = 1.)

// y[r, c] += bias[c] over `rows` rows of `cols` (Qwen2's q/k/v biases, MLP and o_proj biases).
extern "C" __global__ void add_bias_f32(float* __restrict__ y, const float* __restrict__ bias, int rows, int cols) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (size_t)rows * cols) y[i] += bias[i % cols];
}

// Activations rounded to bf16 for the cuBLAS prefill GEMMs (bf16 x bf16, f32 accumulation).
extern "C" __global__ void f32_to_bf16(const float* __restrict__ x, bf16_t* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f32_to_bf16_bits(x[i]);
}
