// Gated activations and soft-capping, matching a2ats_lite.ops (f32 in / out, f32 math).
//
// gated_*: out[r, c] = act(gate[r * gate_stride + c]) * up[r * up_stride + c] for an
// (n_rows, n_cols) output stored contiguously; gate/up rows may be strided (e.g. the two halves
// of a fused [gate | up] row: gate = buf, up = buf + n_ff, strides 2 * n_ff). out may alias gate
// when gate_stride == n_cols (in place, as ops.gated_).
//   silu(x)      = x * (1 + tanh(x / 2)) / 2
//   gelu_tanh(x) = x * (1 + tanh(sqrt(2/pi) * (c + 0.044715 c^3))) / 2, c = clip(x, -10, 10)
// softcap_f32: out[i] = cap * tanh(x[i] / cap) (out may alias x).
//
// Launch (all): grid (min(ceil(total / 256), 65535 * 16)), block (256): a grid-stride loop
// over total = n_rows * n_cols (resp. n) elements, so any grid size is correct.
// budget: gated_silu_f32 registers<=48 smem<=0
// budget: gated_gelu_tanh_f32 registers<=48 smem<=0
// budget: softcap_f32 registers<=32 smem<=0

__device__ __forceinline__ float act_silu(float x) {
    return x * (0.5f * (1.0f + tanhf(0.5f * x)));
}

__device__ __forceinline__ float act_gelu_tanh(float x) {
    const float c = fminf(fmaxf(x, -10.0f), 10.0f);
    const float t = tanhf(0.7978845608028654f * c * (1.0f + 0.044715f * c * c));
    return x * (0.5f * (1.0f + t));
}

extern "C" __global__ void gated_silu_f32(const float* gate, const float* up, float* out,
                                          int n_rows, int n_cols, int gate_stride, int up_stride) {
    const long long total = (long long)n_rows * n_cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / n_cols, c = i - r * n_cols;
        out[i] = act_silu(gate[r * gate_stride + c]) * up[r * up_stride + c];
    }
}

extern "C" __global__ void gated_gelu_tanh_f32(const float* gate, const float* up, float* out,
                                               int n_rows, int n_cols, int gate_stride,
                                               int up_stride) {
    const long long total = (long long)n_rows * n_cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long r = i / n_cols, c = i - r * n_cols;
        out[i] = act_gelu_tanh(gate[r * gate_stride + c]) * up[r * up_stride + c];
    }
}

extern "C" __global__ void softcap_f32(const float* x, float* out, long long n, float cap) {
    const float inv = 1.0f / cap;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = cap * tanhf(x[i] * inv);
}
