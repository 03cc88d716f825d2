// Dequantization of GGUF weight rows on the GPU.
//
//   W  (n_rows, n_in) in its GGUF blocks, raw bytes, rows of whole blocks (row r starts at byte
//      r * (n_in / QK) * BLOCK_BYTES; QK = 1 for F16/F32). Needs only 2-byte alignment (4 for
//      F32): loads inside blocks are bytes or aligned uint16.
//
// dequant_<type>_f32 / dequant_<type>_f16: rows [r0, r1) -> out (r1 - r0, n_in), row-major,
//   float32 (bit-exact with native.dequantize / gguf-py) or f16 (round-to-nearest-even of that
//   float32 value, bit-exact with native.dequantize(..., dtype=float16)). For prefill: a tile
//   of rows to f16, then cuBLAS (cupy.matmul).
// get_rows_<type>: embedding rows by id: out[i, :] = W[ids[i], :] as float32 (n_ids, n_in).
//   An id outside [0, n_rows) writes a row of zeros and, if err is not null, sets *err = 1
//   (the kernel never clears *err: zero it before the launch, read it after).
//
// Alignment: for the block types (n_in % 32 == 0) `out` must be 16-byte (f32) / 8-byte (f16)
// aligned: values are stored in runs of 4 (CuPy allocations are 256-byte aligned).
//
// Launch (all entry points): block = (256,) (any multiple of 32 up to 256),
//   grid = (ceil(U / 256), min(n_out_rows, 65535)), shared_mem = 0, where U = units per row
//   = (n_in / QK) * UNITS (Q4_0/Q4_1/Q5_0/Q8_0: n_in / 8; Q4_K/Q5_K/Q6_K: n_in / 16;
//   F16/F32: n_in) and n_out_rows = r1 - r0 (dequant) or n_ids (get_rows). Rows are
//   grid-strided over gridDim.y, units over gridDim.x, so a smaller grid is also correct.
//
// Arguments, in order:
//   dequant_<type>_f32(const uint8_t* W, float* out, int n_in, int r0, int r1)
//   dequant_<type>_f16(const uint8_t* W, __half* out, int n_in, int r0, int r1)
//   get_rows_<type>(const uint8_t* W, const int32_t* ids, float* out, int n_ids, int n_rows,
//                   int n_in, int32_t* err)
//
// budget: dequant_f32_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_f32_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_f16_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_f16_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_f16 registers<=64 smem<=0 spill<=0
// budget: dequant_q4_0_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_q4_0_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_q4_0 registers<=64 smem<=0 spill<=0
// budget: dequant_q4_1_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_q4_1_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_q4_1 registers<=64 smem<=0 spill<=0
// budget: dequant_q5_0_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_q5_0_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_q5_0 registers<=64 smem<=0 spill<=0
// budget: dequant_q8_0_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_q8_0_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_q8_0 registers<=64 smem<=0 spill<=0
// budget: dequant_q4_k_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_q4_k_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_q4_k registers<=64 smem<=0 spill<=0
// budget: dequant_q5_k_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_q5_k_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_q5_k registers<=64 smem<=0 spill<=0
// budget: dequant_q6_k_f32 registers<=64 smem<=0 spill<=0
// budget: dequant_q6_k_f16 registers<=64 smem<=0 spill<=0
// budget: get_rows_q6_k registers<=64 smem<=0 spill<=0

#include "quant_blocks.cuh"   // inlined by nvrtc.load_source (NVRTC and the shim see one text)

namespace a2q {

struct alignas(16) F4 { float a, b, c, d; };
struct alignas(8) H4 { __half a, b, c, d; };

__device__ __forceinline__ void store4(float* p, const float* v) {
    F4 o; o.a = v[0]; o.b = v[1]; o.c = v[2]; o.d = v[3];
    *reinterpret_cast<F4*>(p) = o;
}
__device__ __forceinline__ void store4(__half* p, const float* v) {
    H4 o;
    o.a = f32_to_f16(v[0]); o.b = f32_to_f16(v[1]); o.c = f32_to_f16(v[2]); o.d = f32_to_f16(v[3]);
    *reinterpret_cast<H4*>(p) = o;
}
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__half* p, float v) { *p = f32_to_f16(v); }

// Output row i (i < n_out_rows) = W row (ids ? ids[i] : r0 + i); bad ids give zeros + *err = 1.
template <class T, class OT>
__device__ __forceinline__ void dequant_rows(const uint8_t* __restrict__ W,
                                             const int32_t* __restrict__ ids, OT* __restrict__ out,
                                             int n_out_rows, int r0, int n_rows, int n_in,
                                             int32_t* __restrict__ err) {
    const int n_units = (n_in / T::QK) * T::U;
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= n_units) return;
    const long long row_bytes = (long long)(n_in / T::QK) * T::BYTES;
    for (int i = blockIdx.y; i < n_out_rows; i += gridDim.y) {
        OT* o = out + (long long)i * n_in;
        int r = r0 + i;
        if (ids != nullptr) {
            r = ids[i];
            if (r < 0 || r >= n_rows) {
                if (u == 0 && err != nullptr) atomicOr(err, 1);
                if constexpr (T::E == 1) {
                    store1(o + u, 0.0f);
                } else {
                    const float z[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                    const int e0 = (u / T::U) * T::QK, p = u % T::U;
#pragma unroll
                    for (int k = 0; k < T::E / 4; k++) store4(o + e0 + T::run(p, k), z);
                }
                continue;
            }
        }
        const uint8_t* wr = W + (long long)r * row_bytes;
        if constexpr (T::E == 1) {
            store1(o + u, T::one(wr, u));
        } else {
            const int blk = u / T::U, p = u % T::U;
            float w[T::E];
            T::decode(wr + (long long)blk * T::BYTES, p, w);
            const int e0 = blk * T::QK;
#pragma unroll
            for (int k = 0; k < T::E / 4; k++) store4(o + e0 + T::run(p, k), w + 4 * k);
        }
    }
}

}  // namespace a2q

// ---- entry points (written out: the shim finds kernels by their `extern "C" __global__` text)
extern "C" __global__ void __launch_bounds__(256)
dequant_f32_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::F32>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_f32_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::F32>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_f32(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
             int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::F32>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_f16_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::F16>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_f16_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::F16>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_f16(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
             int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::F16>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q4_0_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q4_0>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q4_0_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q4_0>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_q4_0(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
              int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::Q4_0>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q4_1_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q4_1>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q4_1_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q4_1>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_q4_1(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
              int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::Q4_1>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q5_0_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q5_0>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q5_0_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q5_0>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_q5_0(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
              int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::Q5_0>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q8_0_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q8_0>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q8_0_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q8_0>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_q8_0(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
              int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::Q8_0>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q4_k_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q4_K>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q4_k_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q4_K>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_q4_k(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
              int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::Q4_K>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q5_k_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q5_K>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q5_k_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q5_K>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_q5_k(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
              int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::Q5_K>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q6_k_f32(const uint8_t* __restrict__ W, float* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q6_K>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
dequant_q6_k_f16(const uint8_t* __restrict__ W, __half* __restrict__ out, int n_in, int r0, int r1) {
    a2q::dequant_rows<a2q::Q6_K>(W, nullptr, out, r1 - r0, r0, 0, n_in, nullptr);
}

extern "C" __global__ void __launch_bounds__(256)
get_rows_q6_k(const uint8_t* __restrict__ W, const int32_t* __restrict__ ids, float* __restrict__ out,
              int n_ids, int n_rows, int n_in, int32_t* __restrict__ err) {
    a2q::dequant_rows<a2q::Q6_K>(W, ids, out, n_ids, 0, n_rows, n_in, err);
}
