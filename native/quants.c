/* GGUF block formats -> f32, one block at a time.
 *
 * Each dequant_<type>(block, out) writes the block's values in order. The
 * float arithmetic follows gguf-py's quants.py operation for operation (e.g.
 * Q4_K is (d*sc)*q - (dmin*m) in float32), so results are bit-exact with
 * gguf.quants.dequantize; the tests check that on random blocks. */
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"

float a2n_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            int e = -1;
            do { man <<= 1; e++; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t a2n_f32_to_f16(float f) {
    /* round to nearest even, like numpy's astype(float16) */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)                       /* inf / nan */
        return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 | ((ax >> 13) & 0x3ff) : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  /* overflow -> inf */
    if (ax < 0x38800000u) {                      /* result is subnormal or zero */
        if (ax < 0x33000000u) return (uint16_t)sign;          /* < half the smallest subnormal */
        uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000;
        /* value = m * 2^(e-150); subnormal unit = 2^-24 -> q = m * 2^(e-126) */
        uint32_t drop = 126 - e;                 /* bits to drop from m (>= 14) */
        uint32_t q = m >> drop, rem = m & ((1u << drop) - 1), half = 1u << (drop - 1);
        if (rem > half || (rem == half && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t h = ((ax >> 13) - ((127 - 15) << 10));
    uint32_t rem = ax & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)(sign | h);
}

static inline float rd_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return a2n_f16_to_f32(h);
}

static void dq_f32(const uint8_t *b, float *y) { memcpy(y, b, 4); }
static void dq_f16(const uint8_t *b, float *y) { y[0] = rd_f16(b); }
static void dq_bf16(const uint8_t *b, float *y) {
    uint32_t bits = (uint32_t)(b[0] | (b[1] << 8)) << 16;
    memcpy(y, &bits, 4);
}

static void dq_q4_0(const uint8_t *b, float *y) {      /* d f16 | qs[16] */
    const float d = rd_f16(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)((int)(qs[j] & 0xf) - 8);
        y[j + 16] = d * (float)((int)(qs[j] >> 4) - 8);
    }
}

static void dq_q4_1(const uint8_t *b, float *y) {      /* d f16 | m f16 | qs[16] */
    const float d = rd_f16(b), m = rd_f16(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = d * (float)(qs[j] & 0xf) + m;
        y[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

static void dq_q5_0(const uint8_t *b, float *y) {      /* d f16 | qh u32 | qs[16] */
    const float d = rd_f16(b);
    uint32_t qh;
    memcpy(&qh, b + 2, 4);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0xf) | (((qh >> j) & 1) << 4);
        int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)(lo - 16);
        y[j + 16] = d * (float)(hi - 16);
    }
}

static void dq_q5_1(const uint8_t *b, float *y) {      /* d f16 | m f16 | qh u32 | qs[16] */
    const float d = rd_f16(b), m = rd_f16(b + 2);
    uint32_t qh;
    memcpy(&qh, b + 4, 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0xf) | (((qh >> j) & 1) << 4);
        int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (float)lo + m;
        y[j + 16] = d * (float)hi + m;
    }
}

static void dq_q8_0(const uint8_t *b, float *y) {      /* d f16 | qs int8[32] */
    const float d = rd_f16(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = (float)qs[j] * d;
}

static void dq_q2_k(const uint8_t *b, float *y) {      /* scales[16] | qs[64] | d | dmin */
    const uint8_t *sc = b, *qs = b + 16;
    const float d = rd_f16(b + 80), dmin = rd_f16(b + 82);
    for (int g = 0; g < 2; g++)
        for (int s = 0; s < 4; s++)
            for (int j = 0; j < 32; j++) {
                int i = g * 128 + s * 32 + j;
                float dl = d * (float)(sc[i / 16] & 0xf), ml = dmin * (float)(sc[i / 16] >> 4);
                y[i] = dl * (float)((qs[g * 32 + j] >> (2 * s)) & 3) - ml;
            }
}

static void dq_q3_k(const uint8_t *b, float *y) {      /* hmask[32] | qs[64] | scales[12] | d */
    const uint8_t *hm = b, *qs = b + 32, *sc = b + 96;
    const float d = rd_f16(b + 108);
    float dl[16];
    for (int k = 0; k < 16; k++) {
        int lo = (k < 8 ? sc[k] : sc[k - 8] >> 4) & 0xf;
        int hi = (sc[8 + (k % 4)] >> (2 * (k / 4))) & 3;
        dl[k] = d * (float)((int8_t)(lo | (hi << 4)) - 32);
    }
    for (int g = 0; g < 2; g++)
        for (int s = 0; s < 4; s++)
            for (int j = 0; j < 32; j++) {
                int i = g * 128 + s * 32 + j;
                int ql = (qs[g * 32 + j] >> (2 * s)) & 3;
                int qh = ((hm[j] >> (i / 32)) & 1) ^ 1;
                y[i] = dl[i / 16] * (float)(ql - (qh << 2));
            }
}

static void dq_q4_k(const uint8_t *b, float *y) {      /* d | dmin | scales[12] | qs[128] */
    const float d = rd_f16(b), dmin = rd_f16(b + 2);
    const uint8_t *qs = b + 16;
    for (int k = 0; k < 8; k++) {
        int sc, m;
        a2n_k_scale_min(b + 4, k, &sc, &m);
        const float dl = d * (float)sc, ml = dmin * (float)m;
        const int g = k / 2, sh = 4 * (k % 2);
        for (int j = 0; j < 32; j++) y[k * 32 + j] = dl * (float)((qs[g * 32 + j] >> sh) & 0xf) - ml;
    }
}

static void dq_q5_k(const uint8_t *b, float *y) {      /* d | dmin | scales[12] | qh[32] | qs[128] */
    const float d = rd_f16(b), dmin = rd_f16(b + 2);
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int k = 0; k < 8; k++) {
        int sc, m;
        a2n_k_scale_min(b + 4, k, &sc, &m);
        const float dl = d * (float)sc, ml = dmin * (float)m;
        const int g = k / 2, sh = 4 * (k % 2);
        for (int j = 0; j < 32; j++) {
            int q = ((qs[g * 32 + j] >> sh) & 0xf) | (((qh[j] >> k) & 1) << 4);
            y[k * 32 + j] = dl * (float)q - ml;
        }
    }
}

static void dq_q6_k(const uint8_t *b, float *y) {      /* ql[128] | qh[64] | scales int8[16] | d */
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    const float d = rd_f16(b + 208);
    for (int g = 0; g < 2; g++)
        for (int s = 0; s < 4; s++)
            for (int j = 0; j < 32; j++) {
                int i = g * 128 + s * 32 + j;
                int lo = (ql[g * 64 + (s % 2) * 32 + j] >> (4 * (s / 2))) & 0xf;
                int hi = (qh[g * 32 + j] >> (2 * s)) & 3;
                y[i] = (d * (float)sc[i / 16]) * (float)((lo | (hi << 4)) - 32);
            }
}

#if A2N_HAVE_AVX2
#define SIMD(f) f
int a2n_use_simd = 1;
#else
#define SIMD(f) NULL
int a2n_use_simd = 0;
#endif

static const a2n_type TYPES[] = {
    {0, 1, 4, dq_f32, NULL},
    {1, 1, 2, dq_f16, SIMD(a2n_decode_f16_avx2)},
    {2, 32, 18, dq_q4_0, SIMD(a2n_decode_q4_0_avx2)},
    {3, 32, 20, dq_q4_1, NULL},
    {6, 32, 22, dq_q5_0, SIMD(a2n_decode_q5_0_avx2)},
    {7, 32, 24, dq_q5_1, NULL},
    {8, 32, 34, dq_q8_0, SIMD(a2n_decode_q8_0_avx2)},
    {10, 256, 84, dq_q2_k, NULL},
    {11, 256, 110, dq_q3_k, NULL},
    {12, 256, 144, dq_q4_k, SIMD(a2n_decode_q4_k_avx2)},
    {13, 256, 176, dq_q5_k, SIMD(a2n_decode_q5_k_avx2)},
    {14, 256, 210, dq_q6_k, SIMD(a2n_decode_q6_k_avx2)},
    {30, 1, 2, dq_bf16, SIMD(a2n_decode_bf16_avx2)},
};

const a2n_type *a2n_find_type(int ggml_type) {
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (TYPES[i].id == ggml_type) return &TYPES[i];
    return NULL;
}

void a2n_decode(const a2n_type *t, const uint8_t *src, int64_t n_blocks, float *dst) {
    if (t->id == 0) {                    /* f32: a copy */
        memcpy(dst, src, (size_t)n_blocks * 4);
        return;
    }
    if (a2n_use_simd && t->simd) {
        t->simd(src, n_blocks, dst);
        return;
    }
    for (int64_t b = 0; b < n_blocks; b++) t->dequant(src + b * t->bytes, dst + b * t->block);
}

void a2n_f32_to_f16_n(const float *src, uint16_t *dst, int64_t n) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        a2n_f32_to_f16_avx2(src, dst, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) dst[i] = a2n_f32_to_f16(src[i]);
}

int a2n_simd(int mode) {
    if (mode >= 0) a2n_use_simd = A2N_HAVE_AVX2 && mode > 0;
    return a2n_use_simd;
}

int64_t a2n_type_nbytes(int ggml_type, int64_t n_elems) {
    const a2n_type *t = a2n_find_type(ggml_type);
    if (!t) return A2N_E_TYPE;
    if (n_elems < 0 || n_elems % t->block) return A2N_E_SIZE;
    return n_elems / t->block * t->bytes;
}
