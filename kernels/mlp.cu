// SiLU-gated MLP: out[r, i] = silu(gate[r, i]) * up[r, i], reading the fused gate_up product
// ([rows, 2 * ffn], gate first) in one pass. silu(g) = g / (1 + e^-g).
extern "C" __global__ void silu_mul_f32(const float* __restrict__ gate_up, float* __restrict__ out, int rows, int ffn) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)rows * ffn) return;
    const size_t r = i / ffn, c = i - r * ffn;
    const float g = gate_up[r * 2 * ffn + c], u = gate_up[r * 2 * ffn + ffn + c];
    out[i] = g / (1.0f + expf(-g)) * u;
}
