// The KV-cache append of one decode step, every sequence in one launch: row s of src goes to
// sequence s's own cache buffer at the row the host chose. Buffer addresses, strides and rows are
// read from device tables (data, not launch arguments), so a captured CUDA graph replays with
// new rows, and with buffers that moved (grown, or other sequences in the batch).
//
// src: float32 (S, G, d) contiguous (post-RoPE keys, or values, of the step's S decode rows).
// dst_ptr: uint64 (S,) device address of sequence s's (G, cap[s], d) buffer of DT (float or
// __half: __float2half_rn rounding); head_stride: int64 (S,) elements between its heads
// (>= cap[s] * d); cap: int32 (S,); row: int32 (S,) the row to write. A row outside
// [0, cap[s]) writes nothing for that sequence.
//   dst[g * head_stride[s] + row[s] * d + j] = src[(s * G + g) * d + j]
//
// Launch: grid (S, G), block (min(256, ceil(d / 32) * 32)), shared_mem = 0.
//
// budget: write_rows_tab_f32 registers<=32 smem<=0
// budget: write_rows_tab_f16 registers<=32 smem<=0

template <class DT>
__device__ __forceinline__ DT kvw_cast(float v);
template <>
__device__ __forceinline__ float kvw_cast<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half kvw_cast<__half>(float v) { return f32_to_f16(v); }

template <class DT>
__device__ __forceinline__ void write_rows_tab(const unsigned long long* __restrict__ dst_ptr,
                                               const long long* __restrict__ head_stride,
                                               const int* __restrict__ cap,
                                               const int* __restrict__ row,
                                               const float* __restrict__ src, int G, int d) {
    const int s = blockIdx.x, g = blockIdx.y;
    const int r = row[s];
    if (r < 0 || r >= cap[s]) return;                          // block-uniform
    DT* dst = reinterpret_cast<DT*>(dst_ptr[s]) + (long long)g * head_stride[s] + (long long)r * d;
    const float* in = src + ((size_t)s * G + g) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dst[j] = kvw_cast<DT>(in[j]);
}

extern "C" __global__ void write_rows_tab_f32(const unsigned long long* __restrict__ dst_ptr,
                                              const long long* __restrict__ head_stride,
                                              const int* __restrict__ cap,
                                              const int* __restrict__ row,
                                              const float* __restrict__ src, int G, int d) {
    write_rows_tab<float>(dst_ptr, head_stride, cap, row, src, G, d);
}

extern "C" __global__ void write_rows_tab_f16(const unsigned long long* __restrict__ dst_ptr,
                                              const long long* __restrict__ head_stride,
                                              const int* __restrict__ cap,
                                              const int* __restrict__ row,
                                              const float* __restrict__ src, int G, int d) {
    write_rows_tab<__half>(dst_ptr, head_stride, cap, row, src, G, d);
}
