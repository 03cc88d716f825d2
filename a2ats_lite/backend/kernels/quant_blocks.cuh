// GGUF block decoders of the quantized-weight kernels.
// ==== BEGIN quant block decoders (shared by quant_matvec.cu and quant_dequant.cu, which
// ==== include this file; nvrtc.load_source inlines it textually for NVRTC and the shim) =====
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
