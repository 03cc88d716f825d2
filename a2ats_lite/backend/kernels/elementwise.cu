// Small element-wise device kernels, so that a whole decode step (residual adds, bias adds,
// scaling, buffer copies / fills; the KV append is kv_write.cu) stays on the device and can be
// captured in a CUDA graph. f32 math, one operation per element (no FMA contraction is
// possible), so every result is exactly what numpy's float32 arithmetic gives.
//
// add_f32(x, y, n):                  x[i] += y[i]                         i < n
// add_rows_f32(x, b, n_rows, n_cols): x[r * n_cols + c] += b[c]            (bias over rows; x
//                                    contiguous (n_rows, n_cols), b (n_cols,))
// scale_f32(x, out, n, s):           out[i] = x[i] * s                    (out may equal x)
// copy_f32(src, dst, n):             dst[i] = src[i]                      (no overlap unless
//                                    src == dst)
// fill_f32(x, n, v) / fill_i32(x, n, v): x[i] = v
//
// Launch (all of the above): grid (min(ceil(total / 256), 65535 * 16)), block (256), total =
// n (resp. n_rows * n_cols). Each is a grid-stride loop over the elements with 64-bit indices,
// so any grid / block size is correct (total may exceed 2^31).
//
// budget: add_f32 registers<=32 smem<=0
// budget: add_rows_f32 registers<=32 smem<=0
// budget: scale_f32 registers<=32 smem<=0
// budget: copy_f32 registers<=32 smem<=0
// budget: fill_f32 registers<=32 smem<=0
// budget: fill_i32 registers<=32 smem<=0

extern "C" __global__ void add_f32(float* __restrict__ x, const float* __restrict__ y,
                                   long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += y[i];
}

extern "C" __global__ void add_rows_f32(float* __restrict__ x, const float* __restrict__ b,
                                        long long n_rows, int n_cols) {
    const long long total = n_rows * (long long)n_cols;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x)
        x[i] += b[i % n_cols];
}

extern "C" __global__ void scale_f32(const float* x, float* out, long long n, float s) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        out[i] = x[i] * s;
}

extern "C" __global__ void copy_f32(const float* src, float* dst, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}

extern "C" __global__ void fill_f32(float* x, long long n, float v) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = v;
}

extern "C" __global__ void fill_i32(int* x, long long n, int v) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x)
        x[i] = v;
}
