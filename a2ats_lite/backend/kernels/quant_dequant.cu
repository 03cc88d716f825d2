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

// ==== BEGIN quant block decoders (kept identical in quant_matvec.cu and quant_dequant.cu;
// ==== tests/test_cuda_quant.py checks that the two copies match) ============================
//
// Each type T describes one GGUF block: QK values in BYTES bytes, cut into U "units" of E
// values (E = 8 or 16, QK = U * E). T::decode(blk, p, w) writes the E values of unit p (in
// float32, bit-exact with native/quants.c); they lie in E/4 runs of 4 contiguous values, run r
// starting at block element T::run(p, r). F32/F16 (QK = 1) are handled per element (T::one).
namespace a2q {

#ifdef A2ATS_SHIM
__device__ __forceinline__ float mul_rn(float a, float b) { return a * b; }
__device__ __forceinline__ float add_rn(float a, float b) { return a + b; }
__device__ __forceinline__ float sub_rn(float a, float b) { return a - b; }
#else   // explicit rounding: keeps nvcc/NVRTC from contracting a*b+c into an FMA
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
#endif

__device__ __forceinline__ uint32_t ld16(const uint8_t* p) {   // p must be 2-byte aligned
    return *reinterpret_cast<const uint16_t*>(p);
}
__device__ __forceinline__ uint32_t ld32(const uint8_t* p) {   // 4 bytes at a 2-aligned p
    return ld16(p) | (ld16(p + 2) << 16);
}
__device__ __forceinline__ float ldh(const uint8_t* p) {       // f16 at a 2-aligned p
    return f16_to_f32(*reinterpret_cast<const __half*>(p));
}

// 6-bit scale and min of sub-block k of a Q4_K/Q5_K block (s = the 12 scale bytes)
__device__ __forceinline__ void k_scale_min(const uint8_t* s, int k, int& sc, int& m) {
    if (k < 4) {
        sc = s[k] & 63;
        m = s[k + 4] & 63;
    } else {
        sc = (s[k + 4] & 0xf) | ((s[k - 4] >> 6) << 4);
        m = (s[k + 4] >> 4) | ((s[k] >> 6) << 4);
    }
}

struct F32 {
    static constexpr int QK = 1, BYTES = 4, U = 1, E = 1;
    static __device__ __forceinline__ float one(const uint8_t* row, long long i) {
        return reinterpret_cast<const float*>(row)[i];   // rows of F32 are 4-byte aligned
    }
};

struct F16 {
    static constexpr int QK = 1, BYTES = 2, U = 1, E = 1;
    static __device__ __forceinline__ float one(const uint8_t* row, long long i) {
        return ldh(row + 2 * i);
    }
};

// d f16 | qs[16]: value j = d * ((qs[j] & 15) - 8), value j + 16 = d * ((qs[j] >> 4) - 8)
// unit p (0..3): qs[4p .. 4p+3] -> values 4p.. (runs at 4p and 16+4p)
struct Q4_0 {
    static constexpr int QK = 32, BYTES = 18, U = 4, E = 8;
    static __device__ __forceinline__ int run(int p, int r) { return 4 * p + 16 * r; }
    static __device__ __forceinline__ void decode(const uint8_t* b, int p, float* w) {
        const float d = ldh(b);
        const uint32_t q = ld32(b + 2 + 4 * p);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t c = (q >> (8 * i)) & 0xff;
            w[i] = d * (float)((int)(c & 0xf) - 8);
            w[4 + i] = d * (float)((int)(c >> 4) - 8);
        }
    }
};

// d f16 | m f16 | qs[16]: value = d * q + m
struct Q4_1 {
    static constexpr int QK = 32, BYTES = 20, U = 4, E = 8;
    static __device__ __forceinline__ int run(int p, int r) { return 4 * p + 16 * r; }
    static __device__ __forceinline__ void decode(const uint8_t* b, int p, float* w) {
        const float d = ldh(b), m = ldh(b + 2);
        const uint32_t q = ld32(b + 4 + 4 * p);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint32_t c = (q >> (8 * i)) & 0xff;
            w[i] = add_rn(mul_rn(d, (float)(c & 0xf)), m);
            w[4 + i] = add_rn(mul_rn(d, (float)(c >> 4)), m);
        }
    }
};

// d f16 | qh u32 (bytes 2..5) | qs[16]: value j = d * ((qs[j]&15 | bit j of qh << 4) - 16),
// value j + 16 uses the high nibble and bit j + 16
struct Q5_0 {
    static constexpr int QK = 32, BYTES = 22, U = 4, E = 8;
    static __device__ __forceinline__ int run(int p, int r) { return 4 * p + 16 * r; }
    static __device__ __forceinline__ void decode(const uint8_t* b, int p, float* w) {
        const float d = ldh(b);
        const uint32_t qh = ld32(b + 2);
        const uint32_t q = ld32(b + 6 + 4 * p);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int j = 4 * p + i;
            const uint32_t c = (q >> (8 * i)) & 0xff;
            const int lo = (int)((c & 0xf) | (((qh >> j) & 1) << 4));
            const int hi = (int)((c >> 4) | (((qh >> (j + 16)) & 1) << 4));
            w[i] = d * (float)(lo - 16);
            w[4 + i] = d * (float)(hi - 16);
        }
    }
};

// d f16 | qs int8[32]: value = q * d. unit p (0..3): values 8p .. 8p+7
struct Q8_0 {
    static constexpr int QK = 32, BYTES = 34, U = 4, E = 8;
    static __device__ __forceinline__ int run(int p, int r) { return 8 * p + 4 * r; }
    static __device__ __forceinline__ void decode(const uint8_t* b, int p, float* w) {
        const float d = ldh(b);
        const uint32_t q0 = ld32(b + 2 + 8 * p), q1 = ld32(b + 6 + 8 * p);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[i] = (float)(int)(int8_t)(uint8_t)(q0 >> (8 * i)) * d;
            w[4 + i] = (float)(int)(int8_t)(uint8_t)(q1 >> (8 * i)) * d;
        }
    }
};

// d f16 | dmin f16 | scales[12] | qs[128]. Sub-block k (0..7) of 32 values: value k*32 + j =
// (d*sc_k) * ((qs[(k/2)*32 + j] >> 4*(k%2)) & 15) - (dmin*m_k).
// unit p (0..15): g = p/4, j0 = 8*(p%4): values j0..j0+7 of sub-blocks 2g and 2g+1
// (runs at 64g+j0, 64g+j0+4, 64g+32+j0, 64g+32+j0+4).
struct Q4_K {
    static constexpr int QK = 256, BYTES = 144, U = 16, E = 16;
    static __device__ __forceinline__ int run(int p, int r) {
        return 64 * (p >> 2) + 8 * (p & 3) + 4 * (r & 1) + 32 * (r >> 1);
    }
    static __device__ __forceinline__ void decode(const uint8_t* b, int p, float* w) {
        const float d = ldh(b), dmin = ldh(b + 2);
        const int g = p >> 2, j0 = 8 * (p & 3);
        int sc0, m0, sc1, m1;
        k_scale_min(b + 4, 2 * g, sc0, m0);
        k_scale_min(b + 4, 2 * g + 1, sc1, m1);
        const float dl0 = d * (float)sc0, ml0 = dmin * (float)m0;
        const float dl1 = d * (float)sc1, ml1 = dmin * (float)m1;
        const uint8_t* qs = b + 16 + 32 * g + j0;
        const uint32_t qa = ld32(qs), qb = ld32(qs + 4);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t c = ((i < 4 ? qa : qb) >> (8 * (i & 3))) & 0xff;
            w[i] = sub_rn(mul_rn(dl0, (float)(c & 0xf)), ml0);
            w[8 + i] = sub_rn(mul_rn(dl1, (float)(c >> 4)), ml1);
        }
    }
};

// d | dmin | scales[12] | qh[32] | qs[128]: as Q4_K with bit k of qh[j] as the 5th bit of
// value k*32 + j. Same units as Q4_K.
struct Q5_K {
    static constexpr int QK = 256, BYTES = 176, U = 16, E = 16;
    static __device__ __forceinline__ int run(int p, int r) { return Q4_K::run(p, r); }
    static __device__ __forceinline__ void decode(const uint8_t* b, int p, float* w) {
        const float d = ldh(b), dmin = ldh(b + 2);
        const int g = p >> 2, j0 = 8 * (p & 3);
        int sc0, m0, sc1, m1;
        k_scale_min(b + 4, 2 * g, sc0, m0);
        k_scale_min(b + 4, 2 * g + 1, sc1, m1);
        const float dl0 = d * (float)sc0, ml0 = dmin * (float)m0;
        const float dl1 = d * (float)sc1, ml1 = dmin * (float)m1;
        const uint8_t* qs = b + 48 + 32 * g + j0;
        const uint8_t* qh = b + 16 + j0;
        const uint32_t qa = ld32(qs), qb = ld32(qs + 4);
        const uint32_t ha = ld32(qh), hb = ld32(qh + 4);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            const uint32_t c = ((i < 4 ? qa : qb) >> (8 * (i & 3))) & 0xff;
            const uint32_t h = ((i < 4 ? ha : hb) >> (8 * (i & 3))) & 0xff;
            const int lo = (int)((c & 0xf) | (((h >> (2 * g)) & 1) << 4));
            const int hi = (int)((c >> 4) | (((h >> (2 * g + 1)) & 1) << 4));
            w[i] = sub_rn(mul_rn(dl0, (float)lo), ml0);
            w[8 + i] = sub_rn(mul_rn(dl1, (float)hi), ml1);
        }
    }
};

// ql[128] | qh[64] | scales int8[16] | d f16. Value i = g*128 + s*32 + j (g<2, s<4, j<32):
// (d * sc[i/16]) * ((ql[64g + 32(s%2) + j] >> 4(s/2)) & 15 | ((qh[32g + j] >> 2s) & 3) << 4) - 32)
// unit p (0..15): g = p/8, j0 = 4*(p%8): values j0..j0+3 of the four s (runs at 128g+32s+j0).
struct Q6_K {
    static constexpr int QK = 256, BYTES = 210, U = 16, E = 16;
    static __device__ __forceinline__ int run(int p, int r) {
        return 128 * (p >> 3) + 32 * r + 4 * (p & 7);
    }
    static __device__ __forceinline__ void decode(const uint8_t* b, int p, float* w) {
        const float d = ldh(b + 208);
        const int g = p >> 3, j0 = 4 * (p & 7);
        const uint32_t l0 = ld32(b + 64 * g + j0), l1 = ld32(b + 64 * g + 32 + j0);
        const uint32_t h = ld32(b + 128 + 32 * g + j0);
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + 8 * g + (j0 >> 4));
#pragma unroll
        for (int s = 0; s < 4; s++) {
            const float ds = d * (float)sc[2 * s];
            const uint32_t l = (s & 1) ? l1 : l0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int lo = (int)((l >> (8 * i + 4 * (s >> 1))) & 0xf);
                const int hi = (int)((h >> (8 * i + 2 * s)) & 3);
                w[4 * s + i] = ds * (float)((lo | (hi << 4)) - 32);
            }
        }
    }
};

}  // namespace a2q
// ==== END quant block decoders ==============================================================

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
