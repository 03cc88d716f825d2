/* Portable kernels of the int8 products: the values of gemm_avx2.c bit for bit
 * (exact integer sums, then the same float operations in the same order, the
 * fused multiply-add included), read from the repacked layouts of repack.c
 * one output row at a time. The reference the SIMD kernels are tested
 * against, and the path of a2n_simd(0) and of builds without AVX2. */
#include <math.h>
#include <string.h>
#include "internal.h"

static float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return a2n_f16_to_f32(h);
}

/* acc + a * b rounded once, as the SIMD kernels' vfmadd (an FMA instruction
 * under -march with FMA; a build without it has no SIMD path to match) */
static inline float fma_(float a, float b, float c) {
#if defined(__FMA__)
    return fmaf(a, b, c);
#else
    return a * b + c;
#endif
}

/* quant i (0..31) of row r in a nibble run: register i / 4, byte 4r + i % 4 */
static inline int nib_at(const uint8_t *run, int r, int i) {
    const int j = i / 4;
    const uint8_t v = run[32 * (j & 3) + 4 * r + i % 4];
    return j < 4 ? v & 15 : v >> 4;
}

/* the 5th bit of quant i of row r: bit (register) of byte 4r + i % 4 */
static inline int bit4_at(const uint8_t *qh, int r, int i) { return (qh[4 * r + i % 4] >> (i / 4)) & 1; }

/* the 6-bit quant i (0..31) of row r in a Q6_K run: registers 0-3 whole in bits 0-5 of
 * their bytes, 4-7 a low nibble of lo[(j - 4) / 2] and the bits 6-7 of register j - 4 */
static inline int q6_at(const uint8_t *run, int r, int i) {
    const int j = i / 4, o = 4 * r + i % 4;
    if (j < 4) return run[32 * j + o] & 63;
    const uint8_t lo = run[128 + 32 * ((j - 4) / 2) + o];
    return ((j & 1) ? lo >> 4 : lo & 15) | (run[32 * (j - 4) + o] >> 6) << 4;
}

typedef struct {
    const int8_t *q;
    const float *d;
    const void *sums;   /* c8 / c16 (int32) or s16 (int16), per kind */
} act_row;

static void row_q4q5(int T, const uint8_t *w, int64_t nb, const act_row *x, float acc[8]) {
    const int BYTES = T == 2 ? 144 : 176;
    const int32_t *c = (const int32_t *)x->sums + (T == 2 ? 0 : nb);
    for (int64_t b = 0; b < nb; b++, w += BYTES)
        for (int r = 0; r < 8; r++) {
            int dot = 0;
            for (int i = 0; i < 32; i++) {
                const int u = nib_at(w + 16, r, i) | (T == 6 ? bit4_at(w + 144, r, i) << 4 : 0);
                dot += u * x->q[32 * b + i];
            }
            acc[r] = fma_((float)(dot + c[b]), f16(w + 2 * r) * x->d[b], acc[r]);
        }
}

static void row_q8(const uint8_t *w, int64_t nb, const act_row *x, float acc[8]) {
    for (int64_t b = 0; b < nb; b++, w += 272)
        for (int r = 0; r < 8; r++) {
            int dot = 0;
            for (int i = 0; i < 32; i++) dot += (int8_t)w[16 + 32 * (i / 4) + 4 * r + i % 4] * x->q[32 * b + i];
            acc[r] = fma_((float)dot, f16(w + 2 * r) * x->d[b], acc[r]);
        }
}

static void row_q4q5k(int T, const uint8_t *w, int64_t nb, int64_t n_in, const act_row *x, float acc[8]) {
    const int BYTES = T == 12 ? 1184 : 1440;
    const int16_t *s32 = (const int16_t *)x->sums + n_in / 16;
    for (int64_t b = 0; b < nb; b++, w += BYTES)
        for (int r = 0; r < 8; r++) {
            int isum = 0, ms = 0;
            for (int s = 0; s < 8; s++) {
                int dot = 0;
                for (int i = 0; i < 32; i++) {
                    int u = nib_at(w + 160 + 128 * s, r, i);
                    if (T == 13) u |= bit4_at(w + 1184 + 32 * s, r, i) << 4;
                    dot += u * x->q[256 * b + 32 * s + i];
                }
                isum += w[32 + 8 * s + r] * dot;
                ms += w[96 + 16 * (s / 2) + 2 * r + s % 2] * s32[8 * b + s];
            }
            const float dx = x->d[b];
            acc[r] = fma_((float)isum, f16(w + 2 * r) * dx, acc[r]);
            acc[r] = fma_(-(float)ms, f16(w + 16 + 2 * r) * dx, acc[r]);
        }
}

static void row_q6k(const uint8_t *w, int64_t nb, const act_row *x, float acc[8]) {
    const int16_t *s16 = x->sums;
    for (int64_t b = 0; b < nb; b++, w += 1680)
        for (int r = 0; r < 8; r++) {
            int isum = 0, corr = 0;
            for (int k = 0; k < 16; k++) {   /* sub-blocks of 16: half k % 2 of run k / 2 */
                const uint8_t *run = w + 144 + 192 * (k / 2);
                const int sc = (int8_t)w[16 + 16 * (k / 2) + 2 * r + k % 2];
                int dot = 0;
                for (int i = 16 * (k % 2); i < 16 * (k % 2) + 16; i++)
                    dot += q6_at(run, r, i) * x->q[256 * b + 32 * (k / 2) + i];
                isum += sc * dot;
                corr += sc * s16[16 * b + k];
            }
            acc[r] = fma_((float)(isum - 32 * corr), f16(w + 2 * r) * x->d[b], acc[r]);
        }
}

#define REF(name, T)                                                                                        \
    static void name(const uint8_t *w, int64_t nb, const uint8_t *ex, const uint8_t *act, int64_t stride,      \
                     int64_t n_in, int na, float *y, int64_t ldy, int nvalid) {                             \
        (void)ex;   /* the portable kernels read the packed quants */                                       \
        for (int a = 0; a < na; a++) {                                                                      \
            const uint8_t *rec = act + a * stride;                                                          \
            const act_row x = {(const int8_t *)rec, (const float *)(rec + n_in), rec + n_in + 4 * nb};       \
            float acc[8] = {0};                                                                             \
            switch (T) {                                                                                    \
            case 2: case 6: row_q4q5(T, w, nb, &x, acc); break;                                             \
            case 8: row_q8(w, nb, &x, acc); break;                                                          \
            case 12: case 13: row_q4q5k(T, w, nb, n_in, &x, acc); break;                                    \
            default: row_q6k(w, nb, &x, acc); break;                                                        \
            }                                                                                               \
            memcpy(y + a * ldy, acc, (size_t)nvalid * sizeof(float));                                       \
        }                                                                                                   \
    }
REF(ref_q4_0, 2)
REF(ref_q5_0, 6)
REF(ref_q8_0, 8)
REF(ref_q4_k, 12)
REF(ref_q5_k, 13)
REF(ref_q6_k, 14)

a2n_gemm_fn a2n_gemm_ref_for(int ggml_type) {
    switch (ggml_type) {
    case 2: return ref_q4_0;
    case 6: return ref_q5_0;
    case 8: return ref_q8_0;
    case 12: return ref_q4_k;
    case 13: return ref_q5_k;
    case 14: return ref_q6_k;
    default: return NULL;
    }
}
