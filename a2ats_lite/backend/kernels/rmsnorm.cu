// RMSNorm over rows, matching a2ats_lite.ops.rms_norm: out = x / sqrt(mean(x^2) + eps) * w.
// f32 in, f32 accumulate, f32 out. One block per row; blockDim.x a multiple of 32 (<= 1024),
// 256 suggested; any n_cols (threads stride over the row). x and out are (n_rows, n_cols)
// contiguous; w is (n_cols,).
//
// budget: rmsnorm_f32 registers<=32 smem<=128
// budget: add_rmsnorm_f32 registers<=32 smem<=128

// Launch: grid (n_rows), block (256).
extern "C" __global__ void rmsnorm_f32(const float* __restrict__ x, const float* __restrict__ w,
                                       float* __restrict__ out, int n_cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * n_cols;
    float* orow = out + (size_t)blockIdx.x * n_cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n_cols; i += blockDim.x) {
        const float v = xr[i];
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)n_cols + eps);
    for (int i = threadIdx.x; i < n_cols; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}

// Fused residual: x += r (x is updated in place: the new residual stream), then
// out = rms_norm(x) * w. Launch: grid (n_rows), block (256). out must not alias x or r.
extern "C" __global__ void add_rmsnorm_f32(float* __restrict__ x, const float* __restrict__ r,
                                           const float* __restrict__ w, float* __restrict__ out,
                                           int n_cols, float eps) {
    __shared__ float scratch[32];
    float* xr = x + (size_t)blockIdx.x * n_cols;
    const float* rr = r + (size_t)blockIdx.x * n_cols;
    float* orow = out + (size_t)blockIdx.x * n_cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n_cols; i += blockDim.x) {
        const float v = xr[i] + rr[i];
        xr[i] = v;       // each element is read back below by the same thread only
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)n_cols + eps);
    for (int i = threadIdx.x; i < n_cols; i += blockDim.x) orow[i] = xr[i] * inv * w[i];
}
