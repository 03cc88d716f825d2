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
//
// put_rows_f32 / put_rows_f16: the row cache's fill (kv/rowcache.py), every (sequence, KV head)
// entry e < E in one launch: its n[e] rows fetched from the host store this step, staged
// src_k / src_v (E, m, d) of DT, go to rows slot[e * m + i] (i < n[e]) of its cache head at
// dst_k[e] / dst_v[e] (device addresses, d contiguous elements per row, cap[e] rows). A count
// outside [0, m] or a slot outside [0, cap[e]) writes nothing for it and sets bit 2 of err[0].
// Launch: grid (E, ceil(m / PUT_ROWS)), block (128), shared_mem = 0.
//
// budget: put_rows_f32 registers<=40 smem<=0
// budget: put_rows_f16 registers<=40 smem<=0

#define PUT_ROWS 8

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

template <class DT>
__device__ __forceinline__ void put_rows(const DT* __restrict__ src_k, const DT* __restrict__ src_v,
                                         const unsigned long long* __restrict__ dst_k,
                                         const unsigned long long* __restrict__ dst_v,
                                         const int* __restrict__ cap, const int* __restrict__ slot,
                                         const int* __restrict__ n, int m, int d,
                                         int* __restrict__ err) {
    const int e = blockIdx.x, i0 = blockIdx.y * PUT_ROWS;
    const int ne = n[e];
    if (ne < 0 || ne > m) {                                    // block-uniform
        if (threadIdx.x == 0 && blockIdx.y == 0) atomicOr(err, 2);
        return;
    }
    const int i1 = min(ne, i0 + PUT_ROWS);
    for (int i = i0; i < i1; ++i) {                            // block-uniform loop
        const int r = slot[(long long)e * m + i];
        if (r < 0 || r >= cap[e]) {
            if (threadIdx.x == 0) atomicOr(err, 2);
            continue;
        }
        const long long so = ((long long)e * m + i) * d, dof = (long long)r * d;
        DT* k = reinterpret_cast<DT*>(dst_k[e]) + dof;
        DT* v = reinterpret_cast<DT*>(dst_v[e]) + dof;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            k[j] = src_k[so + j];
            v[j] = src_v[so + j];
        }
    }
}

extern "C" __global__ void put_rows_f32(const float* __restrict__ src_k, const float* __restrict__ src_v,
                                        const unsigned long long* __restrict__ dst_k,
                                        const unsigned long long* __restrict__ dst_v,
                                        const int* __restrict__ cap, const int* __restrict__ slot,
                                        const int* __restrict__ n, int m, int d, int* __restrict__ err) {
    put_rows<float>(src_k, src_v, dst_k, dst_v, cap, slot, n, m, d, err);
}

extern "C" __global__ void put_rows_f16(const __half* __restrict__ src_k, const __half* __restrict__ src_v,
                                        const unsigned long long* __restrict__ dst_k,
                                        const unsigned long long* __restrict__ dst_v,
                                        const int* __restrict__ cap, const int* __restrict__ slot,
                                        const int* __restrict__ n, int m, int d, int* __restrict__ err) {
    put_rows<__half>(src_k, src_v, dst_k, dst_v, cap, slot, n, m, d, err);
}
