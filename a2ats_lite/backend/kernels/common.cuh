// Shared prelude of every kernel source in this directory.
//
// a2ats_lite.backend.nvrtc.load_source(name) returns THIS text followed by NAME.cu (textual
// concatenation with #line markers), and that one string is what NVRTC compiles (CuPy RawModule,
// tests/test_cuda_compile.py) and what the CPU shim compiles (tests/cuda_shim). So never #include
// this file from a .cu file, and keep it free of anything only one of the two compilers accepts.
//
// Under the shim, A2ATS_SHIM is defined (tests/cuda_shim/cuda_shim.h is force-included first and
// provides __half, warp shuffles, __syncthreads, atomics ...).
#ifdef A2ATS_SHIM
#include <cstdint>
#else
// <stdint.h>/<cstdint> fail under NVRTC: plain typedefs (LP64 device ABI).
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#include <cuda_fp16.h>
#endif

#define A2ATS_FULL_MASK 0xffffffffu
#define A2ATS_NEG_INF __int_as_float(0xff800000)

// ---- half / bfloat16 ----------------------------------------------------------------------
// f16 loads/stores go through __half2float / __float2half_rn (cuda_fp16.h; the shim maps them
// to _Float16). bf16 is handled as raw 16-bit patterns so no cuda_bf16.h is needed.
__device__ __forceinline__ float f16_to_f32(__half h) { return __half2float(h); }
__device__ __forceinline__ __half f32_to_f16(float f) { return __float2half_rn(f); }
__device__ __forceinline__ float bf16_to_f32(uint16_t b) { return __uint_as_float(((uint32_t)b) << 16); }
__device__ __forceinline__ uint16_t f32_to_bf16(float f) {
    // round to nearest even; NaN kept quiet
    uint32_t u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

// ---- warp reductions (full warps only: every lane of the warp must call them) --------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(A2ATS_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(A2ATS_FULL_MASK, v, o));
    return v;
}

// ---- block reductions over a 1-D block whose size is a multiple of 32 (<= 1024) -------------
// scratch: __shared__ float[32]. Every thread gets the result. Contains two __syncthreads, so
// every thread of the block must call it (no early return before it).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();   // scratch may be reused right after
    return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_warps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < n_warps ? scratch[lane] : A2ATS_NEG_INF;
    v = warp_max(v);
    __syncthreads();
    return v;
}
