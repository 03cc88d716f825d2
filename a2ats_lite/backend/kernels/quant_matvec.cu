// Quantized matrix-vector products for (batched) decode: y = x @ W^T.
//
//   W  (n_out, n_in) in its GGUF blocks, raw bytes, rows of whole blocks (row r starts at byte
//      r * (n_in / QK) * BLOCK_BYTES; QK = 1 for F16/F32, 32 for Q4_0/Q4_1/Q5_0/Q8_0, 256 for
//      Q4_K/Q5_K/Q6_K). Needs only 2-byte alignment (4 for F32): blocks are
//      18/20/22/34/144/176/210 bytes, so every load inside a block is a byte or an aligned
//      uint16, never a 4-byte load at a block-relative offset.
//   x  (n_vec, n_in) row-major float32. For the block types x must be 16-byte aligned: it is
//      read in runs of 4 contiguous floats (CuPy allocations are 256-byte aligned; a row
//      slice x[k:] keeps that because n_in % 32 == 0).
//   y  (n_vec, n_out) row-major float32; every y[v, r] with v < n_vec, r < n_out is written.
//
// matvec_<type>_v<NV> (NV = 1, 4, 8, 16) handles 1 <= n_vec <= NV and writes nothing if n_vec
// is outside that range; pick the smallest NV >= n_vec (separate kernels so that the n_vec == 1
// decode path keeps few registers). Every weight byte is read once per launch and multiplied
// with all n_vec vectors. Each warp computes R whole rows (R = 2 for v1/v4, 1 for v8/v16: the
// R rows share every x load); its lanes walk the rows' blocks (4 lanes per 32-value block, 16
// lanes per 256-value super-block, one value per lane for F16/F32), f32 accumulation (fmaf),
// then a warp-shuffle sum per output.
//
// Launch: block = (128,) (any multiple of 32 up to 256),
//         grid  = (ceil(n_out / (R * block / 32)),)   e.g. ceil(n_out / 8) for v1/v4 and
//                 ceil(n_out / 4) for v8/v16 with block 128; shared_mem = 0.
//         A larger grid only adds warps that exit at once (so ceil(n_out / 4) is safe for all
//         buckets with block 128); a smaller one leaves rows unwritten. For a small n_out
//         (fewer than ~2 blocks per SM) use block (64,) or (32,) to spread rows over more SMs.
//
// Arguments of every entry point, in order:
//   (const uint8_t* W, const float* x, float* y, int n_out, int n_in, int n_vec)
//
// Weights are dequantized exactly as native/quants.c (== gguf-py) computes them (explicit
// round-to-nearest multiplies/adds, no FMA contraction), then multiplied in f32.
//
// budget: matvec_f32_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_f32_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_f32_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_f32_v16 registers<=160 smem<=0 spill<=0
// budget: matvec_f16_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_f16_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_f16_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_f16_v16 registers<=160 smem<=0 spill<=0
// budget: matvec_q4_0_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_q4_0_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_q4_0_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_q4_0_v16 registers<=160 smem<=0 spill<=0
// budget: matvec_q4_1_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_q4_1_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_q4_1_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_q4_1_v16 registers<=160 smem<=0 spill<=0
// budget: matvec_q5_0_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_q5_0_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_q5_0_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_q5_0_v16 registers<=160 smem<=0 spill<=0
// budget: matvec_q8_0_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_q8_0_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_q8_0_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_q8_0_v16 registers<=160 smem<=0 spill<=0
// budget: matvec_q4_k_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_q4_k_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_q4_k_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_q4_k_v16 registers<=160 smem<=0 spill<=0
// budget: matvec_q5_k_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_q5_k_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_q5_k_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_q5_k_v16 registers<=160 smem<=0 spill<=0
// budget: matvec_q6_k_v1 registers<=80 smem<=0 spill<=0
// budget: matvec_q6_k_v4 registers<=96 smem<=0 spill<=0
// budget: matvec_q6_k_v8 registers<=96 smem<=0 spill<=0
// budget: matvec_q6_k_v16 registers<=160 smem<=0 spill<=0

#include "quant_blocks.cuh"   // inlined by nvrtc.load_source (NVRTC and the shim see one text)

namespace a2q {

struct alignas(16) F4 { float a, b, c, d; };
struct alignas(8) H4 { __half a, b, c, d; };

// 4 contiguous x values starting at p (p 16-byte aligned for float, 8-byte for __half). The
// __half overloads serve an f16-x variant (matvec<T, NV, __half>); no entry point uses it yet.
__device__ __forceinline__ void ldx4(const float* p, float* o) {
    const F4 v = *reinterpret_cast<const F4*>(p);
    o[0] = v.a; o[1] = v.b; o[2] = v.c; o[3] = v.d;
}
__device__ __forceinline__ void ldx4(const __half* p, float* o) {
    const H4 v = *reinterpret_cast<const H4*>(p);
    o[0] = f16_to_f32(v.a); o[1] = f16_to_f32(v.b); o[2] = f16_to_f32(v.c); o[3] = f16_to_f32(v.d);
}
__device__ __forceinline__ float ldx1(const float* p) { return *p; }
__device__ __forceinline__ float ldx1(const __half* p) { return f16_to_f32(*p); }

// One warp computes y[v, row0 + j] for v < n_vec, j < R (rows past n_out are computed on a
// clamped valid row and not stored). R rows per warp share each x load: x (4 bytes per value)
// is read from L1 once per R rows instead of once per row. NV is a compile-time bound on n_vec
// so the R * NV accumulators stay in registers.
template <class T, int NV, int R, class XT>
__device__ __forceinline__ void matvec_rows(const uint8_t* __restrict__ W, const XT* __restrict__ x,
                                            float* __restrict__ y, int n_out, int n_in, int n_vec,
                                            int row0, int lane) {
    float acc[R][NV];
#pragma unroll
    for (int j = 0; j < R; j++)
#pragma unroll
        for (int v = 0; v < NV; v++) acc[j][v] = 0.0f;
    const long long row_bytes = (long long)(n_in / T::QK) * T::BYTES;
    const uint8_t* wr[R];
#pragma unroll
    for (int j = 0; j < R; j++) wr[j] = W + (long long)min(row0 + j, n_out - 1) * row_bytes;
    if constexpr (T::E == 1) {
        for (int i = lane; i < n_in; i += 32) {
            float w[R];
#pragma unroll
            for (int j = 0; j < R; j++) w[j] = T::one(wr[j], i);
#pragma unroll
            for (int v = 0; v < NV; v++) {
                if (NV == 1 || v < n_vec) {
                    const float xv = ldx1(x + (long long)v * n_in + i);
#pragma unroll
                    for (int j = 0; j < R; j++) acc[j][v] = fmaf(w[j], xv, acc[j][v]);
                }
            }
        }
    } else {
        const int n_units = (n_in / T::QK) * T::U;
#pragma unroll 1   // keeps register pressure down (the v/r loops inside are unrolled)
        for (int u = lane; u < n_units; u += 32) {
            const int blk = u / T::U, p = u % T::U;
            float w[R][T::E];
#pragma unroll
            for (int j = 0; j < R; j++) T::decode(wr[j] + (long long)blk * T::BYTES, p, w[j]);
            const XT* xb = x + blk * T::QK;
#pragma unroll
            for (int r = 0; r < T::E / 4; r++) {
                const XT* xr = xb + T::run(p, r);
#pragma unroll
                for (int v = 0; v < NV; v++) {
                    if (NV == 1 || v < n_vec) {
                        float xx[4];
                        ldx4(xr + (long long)v * n_in, xx);
#pragma unroll
                        for (int j = 0; j < R; j++)
#pragma unroll
                            for (int i = 0; i < 4; i++)
                                acc[j][v] = fmaf(w[j][4 * r + i], xx[i], acc[j][v]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < R; j++) {
#pragma unroll
        for (int v = 0; v < NV; v++) {
            if (NV == 1 || v < n_vec) {       // uniform over the warp: every lane shuffles
                const float s = warp_sum(acc[j][v]);
                if (lane == ((j * NV + v) & 31) && row0 + j < n_out) y[(long long)v * n_out + row0 + j] = s;
            }
        }
    }
}

// R = rows per warp: warp w of block b computes rows [(b * warps + w) * R, ... + R) (those
// < n_out). The grid must cover n_out: ceil(n_out / (R * blockDim.x / 32)) blocks. (A grid-
// strided row loop cost up to 1.6x the registers under ptxas 12.9, so there is none.)
template <class T, int NV, int R, class XT>
__device__ __forceinline__ void matvec(const uint8_t* __restrict__ W, const XT* __restrict__ x,
                                       float* __restrict__ y, int n_out, int n_in, int n_vec) {
    const int row0 = (blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    if (row0 >= n_out || n_vec < 1 || n_vec > NV) return;   // whole warps leave together
    matvec_rows<T, NV, R>(W, x, y, n_out, n_in, n_vec, row0, threadIdx.x & 31);
}

}  // namespace a2q

// Rows per warp of each vector bound: two rows share every x load for n_vec <= 4 (halves the
// L1 traffic of x, 4 bytes per weight value, at ~+50% registers); R = 2 for v8/v16 took up to
// 194 registers. Chosen from ptxas counts only: not yet timed on a GPU.
#define A2Q_R1 2
#define A2Q_R4 2
#define A2Q_R8 1
#define A2Q_R16 1

// ---- entry points ------------------------------------------------------------------------------
// matvec_<type>_v<NV> handles 1 <= n_vec <= NV (NV = 1, 4, 8, 16): separate kernels so that the
// n_vec == 1 decode path keeps 30-72 registers instead of the up to ~145 that 16 accumulators
// take. No __launch_bounds__: with it ptxas spilled a few bytes in some v8/v16 kernels.
// Written out (no macros): the shim finds kernels by their `extern "C" __global__` text.

extern "C" __global__ void
matvec_f32_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
              int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::F32, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_f32_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
              int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::F32, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_f32_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
              int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::F32, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_f32_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::F32, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_f16_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
              int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::F16, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_f16_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
              int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::F16, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_f16_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
              int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::F16, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_f16_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::F16, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_0_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_0, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_0_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_0, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_0_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_0, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_0_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_0, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_1_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_1, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_1_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_1, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_1_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_1, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_1_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_1, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q5_0_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q5_0, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q5_0_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q5_0, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q5_0_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q5_0, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q5_0_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q5_0, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q8_0_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q8_0, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q8_0_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q8_0, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q8_0_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q8_0, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q8_0_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q8_0, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_k_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_K, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_k_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_K, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_k_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_K, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q4_k_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q4_K, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q5_k_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q5_K, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q5_k_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q5_K, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q5_k_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q5_K, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q5_k_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q5_K, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q6_k_v1(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q6_K, 1, A2Q_R1>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q6_k_v4(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q6_K, 4, A2Q_R4>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q6_k_v8(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
               int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q6_K, 8, A2Q_R8>(W, x, y, n_out, n_in, n_vec);
}

extern "C" __global__ void
matvec_q6_k_v16(const uint8_t* __restrict__ W, const float* __restrict__ x, float* __restrict__ y,
                int n_out, int n_in, int n_vec) {
    a2q::matvec<a2q::Q6_K, 16, A2Q_R16>(W, x, y, n_out, n_in, n_vec);
}
