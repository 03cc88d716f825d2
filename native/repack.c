/* Weights repacked for the int8 products, and the activation records.
 *
 * A (n_out, n_in) weight becomes ceil(n_out / 8) groups of 8 output rows (rows
 * past n_out are zeros), each group its blocks in order, each block the 8 rows'
 * blocks interleaved so that one 32-byte register holds 4 consecutive quants
 * of each row: "register j" of a run of 32 elements holds elements 4j..4j+3,
 * byte 4r + e = element 4j + e of row r. A kernel multiplies register j by the
 * broadcast of the activation's quants 4j..4j+3 and gets the 8 rows' partial
 * dot products in 8 lanes: no horizontal sums, and an activation row's
 * arithmetic is the same whatever rows share the call. Quants keep their bit
 * width (nibbles, bit planes), so the copy is the size of the original (Q4_K /
 * Q5_K: +2.8% / +2.3% for the unpacked 6-bit scales and mins).
 *
 * Per block of 8 rows (fields in order; f16: the original half-float scales):
 *  Q4_0 (144 B):  d f16[8] | nibbles[4][32]: chunk t byte 4r+e = row r's original qs
 *                 byte 4t+e (low nibble: register t, high: register t+4). Value d*(q-8).
 *  Q5_0 (176 B):  as Q4_0 (low 4 bits) | qh[32]: bit j of byte 4r+e = the 5th bit of
 *                 register j's byte 4r+e. Value d*(q-16).
 *  Q8_0 (272 B):  d f16[8] | qs[8][32]: register j, int8. Value d*q.
 *  Q4_K (1184 B): d f16[8] | dmin f16[8] | sc[8 sub-blocks][8 rows] | m[4 pairs][8 rows][2]
 *                 (6-bit, one byte each) | per sub-block of 32: nibbles[4][32] as Q4_0.
 *                 Value d*sc*q - dmin*m.
 *  Q5_K (1440 B): as Q4_K | per sub-block: qh[32] as Q5_0.
 *  Q6_K (1680 B): d f16[8] | sc[8 pairs][8 rows][2] int8 (per 16 elements) | per 32
 *                 elements: q[4][32]: register j (0-3) whole in bits 0-5, the high 2 bits
 *                 of register j+4 in bits 6-7 | lo[2][32]: the low nibbles of registers
 *                 4+2p (low) and 5+2p (high). Registers 0-3 unpack with one operation, 4-7
 *                 with four or five. Value d*sc*(q-32).
 * The activation records are described at a2n_act_stride (internal.h). */
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"

#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

static const a2n_pack_type PACKED[] = {
    {2, 32, A2N_ACT_B32, 144},    {6, 32, A2N_ACT_B32, 176},    {8, 32, A2N_ACT_B32, 272},
    {12, 256, A2N_ACT_B256, 1184}, {13, 256, A2N_ACT_B256, 1440}, {14, 256, A2N_ACT_B256, 1680},
};

const a2n_pack_type *a2n_pack_find(int ggml_type) {
    for (size_t i = 0; i < sizeof PACKED / sizeof PACKED[0]; i++)
        if (PACKED[i].type == ggml_type) return &PACKED[i];
    return NULL;
}

int a2n_act_kind(int ggml_type) {
    const a2n_pack_type *p = a2n_pack_find(ggml_type);
    return p ? p->kind : 0;
}

int64_t a2n_repack_nbytes(int ggml_type, int64_t n_out, int64_t n_in) {
    const a2n_pack_type *p = a2n_pack_find(ggml_type);
    if (!p) return A2N_E_TYPE;
    if (n_out <= 0 || n_in <= 0) return A2N_E_ARG;
    if (n_in % p->block) return A2N_E_SIZE;
    const int64_t groups = (n_out + A2N_PACK_ROWS - 1) / A2N_PACK_ROWS, per_group = n_in / p->block * p->blk_bytes;
    if (groups > INT64_MAX / per_group) return A2N_E_SIZE;
    return groups * per_group;
}

/* ---- repack ----------------------------------------------------------------
 * One block of 8 rows at a time; blk[r] is row r's source block (NULL past n_out:
 * the output stays zero). */
static uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }

static void pack_q4_0(const uint8_t *const *blk, uint8_t *o) {
    for (int r = 0; r < 8; r++) {
        if (!blk[r]) continue;
        memcpy(o + 2 * r, blk[r], 2);
        for (int t = 0; t < 4; t++) memcpy(o + 16 + 32 * t + 4 * r, blk[r] + 2 + 4 * t, 4);
    }
}

static void pack_q5_0(const uint8_t *const *blk, uint8_t *o) {
    for (int r = 0; r < 8; r++) {
        if (!blk[r]) continue;
        memcpy(o + 2 * r, blk[r], 2);
        for (int t = 0; t < 4; t++) memcpy(o + 16 + 32 * t + 4 * r, blk[r] + 6 + 4 * t, 4);
        const uint32_t qh = le32(blk[r] + 2);   /* bit i: the 5th bit of element i */
        for (int e = 0; e < 4; e++) {
            int v = 0;
            for (int j = 0; j < 8; j++) v |= (int)((qh >> (4 * j + e)) & 1) << j;
            o[144 + 4 * r + e] = (uint8_t)v;
        }
    }
}

static void pack_q8_0(const uint8_t *const *blk, uint8_t *o) {
    for (int r = 0; r < 8; r++) {
        if (!blk[r]) continue;
        memcpy(o + 2 * r, blk[r], 2);
        for (int j = 0; j < 8; j++) memcpy(o + 16 + 32 * j + 4 * r, blk[r] + 2 + 4 * j, 4);
    }
}

/* Q4_K / Q5_K: sub-block s is the nibble s % 2 of bytes 32 * (s / 2) .. + 31 */
static void pack_q45_k(int type, const uint8_t *const *blk, uint8_t *o) {
    for (int r = 0; r < 8; r++) {
        const uint8_t *b = blk[r];
        if (!b) continue;
        memcpy(o + 2 * r, b, 2);
        memcpy(o + 16 + 2 * r, b + 2, 2);
        const uint8_t *qs = b + (type == 12 ? 16 : 48), *qh = b + 16;
        for (int s = 0; s < 8; s++) {
            int sc, m;
            a2n_k_scale_min(b + 4, s, &sc, &m);
            o[32 + 8 * s + r] = (uint8_t)sc;
            o[96 + 16 * (s / 2) + 2 * r + s % 2] = (uint8_t)m;
            const uint8_t *q = qs + 32 * (s / 2);
            const int sh = 4 * (s % 2);
            for (int t = 0; t < 4; t++)
                for (int e = 0; e < 4; e++)
                    o[160 + 128 * s + 32 * t + 4 * r + e] =
                        (uint8_t)(((q[4 * t + e] >> sh) & 15) | ((q[16 + 4 * t + e] >> sh) & 15) << 4);
            if (type == 13)   /* element 32s + 4j + e: bit s of qh[4j + e] */
                for (int e = 0; e < 4; e++) {
                    int v = 0;
                    for (int j = 0; j < 8; j++) v |= ((qh[4 * j + e] >> s) & 1) << j;
                    o[1184 + 32 * s + 4 * r + e] = (uint8_t)v;
                }
        }
    }
}

/* Q6_K: element 32c + i has the nibble (c / 2) % 2 of ql[64 (c / 4) + 32 (c % 2) + i] and the
 * bits 2 (c % 4) of qh[32 (c / 4) + i] */
static void pack_q6_k(const uint8_t *const *blk, uint8_t *o) {
    for (int r = 0; r < 8; r++) {
        const uint8_t *b = blk[r];
        if (!b) continue;
        memcpy(o + 2 * r, b + 208, 2);
        for (int k = 0; k < 16; k++) o[16 + 16 * (k / 2) + 2 * r + k % 2] = b[192 + k];
        for (int c = 0; c < 8; c++) {
            const uint8_t *ql = b + 64 * (c / 4) + 32 * (c % 2), *qh = b + 128 + 32 * (c / 4);
            const int sl = 4 * ((c % 4) / 2), sh = 2 * (c % 4);
            uint8_t q6[32], *q = o + 144 + 192 * c;
            for (int i = 0; i < 32; i++) q6[i] = (uint8_t)(((ql[i] >> sl) & 15) | ((qh[i] >> sh) & 3) << 4);
            for (int e = 0; e < 4; e++) {
                for (int j = 0; j < 4; j++)   /* register j whole, the high bits of j + 4 on top */
                    q[32 * j + 4 * r + e] = (uint8_t)(q6[4 * j + e] | (q6[4 * j + 16 + e] >> 4) << 6);
                for (int p = 0; p < 2; p++)   /* the low nibbles of registers 4 + 2p, 5 + 2p */
                    q[128 + 32 * p + 4 * r + e] = (uint8_t)((q6[16 + 8 * p + e] & 15) | (q6[20 + 8 * p + e] & 15) << 4);
            }
        }
    }
}

typedef struct {
    const a2n_pack_type *p;
    const uint8_t *w;
    int64_t n_out, nb, row_bytes, src_blk;
    uint8_t *dst;
} repack_job;

static void repack_block(const repack_job *j, int64_t g, int64_t b, uint8_t *o) {
    const uint8_t *blk[8];
    for (int r = 0; r < 8; r++)
        blk[r] = 8 * g + r < j->n_out ? j->w + (8 * g + r) * j->row_bytes + b * j->src_blk : NULL;
    memset(o, 0, (size_t)j->p->blk_bytes);
    switch (j->p->type) {
    case 2: pack_q4_0(blk, o); break;
    case 6: pack_q5_0(blk, o); break;
    case 8: pack_q8_0(blk, o); break;
    case 12: case 13: pack_q45_k(j->p->type, blk, o); break;
    default: pack_q6_k(blk, o); break;
    }
}

static void repack_range(void *p, int64_t g0, int64_t g1) {
    const repack_job *j = p;
    for (int64_t g = g0; g < g1; g++)
        for (int64_t b = 0; b < j->nb; b++)
            repack_block(j, g, b, j->dst + (g * j->nb + b) * j->p->blk_bytes);
}

int a2n_repack(int ggml_type, const void *w, int64_t w_nbytes, int64_t n_out, int64_t n_in, void *dst,
               int64_t dst_nbytes, int n_threads) {
    const int64_t need = a2n_repack_nbytes(ggml_type, n_out, n_in);
    if (need < 0) return (int)need;
    if (!w || !dst) return A2N_E_ARG;
    const a2n_type *t = a2n_find_type(ggml_type);
    const int64_t row_bytes = n_in / t->block * t->bytes;
    if (n_out > INT64_MAX / row_bytes || row_bytes * n_out != w_nbytes || dst_nbytes != need) return A2N_E_SIZE;
    const a2n_pack_type *p = a2n_pack_find(ggml_type);
    repack_job j = {p, w, n_out, n_in / p->block, row_bytes, t->bytes, dst};
    const int64_t groups = (n_out + 7) / 8;
    return a2n_parallel_for(groups, n_threads, (256 << 10) / (j.nb * p->blk_bytes) + 1, repack_range, &j);
}

/* ---- activation records ---------------------------------------------------- */
int64_t a2n_act_stride(int kind, int64_t n_in) {
    const int64_t extra = kind == A2N_ACT_B32 ? n_in / 32 * 12 : n_in / 256 * 4 + n_in / 8 + n_in / 16;
    return (n_in + extra + 63) / 64 * 64;
}

int64_t a2n_act_nbytes(int kind, int64_t n_vec, int64_t n_in) {
    if (kind != A2N_ACT_B32 && kind != A2N_ACT_B256) return A2N_E_TYPE;
    if (n_vec <= 0 || n_in <= 0) return A2N_E_ARG;
    if (n_in % (kind == A2N_ACT_B32 ? 32 : 256)) return A2N_E_SIZE;
    const int64_t stride = a2n_act_stride(kind, n_in);
    if (n_vec > INT64_MAX / stride) return A2N_E_SIZE;
    return n_vec * stride;
}

/* x * id rounded half to even, clamped to [-127, 127] so that the kernels' int16
 * sums cannot overflow; as the SIMD conversion, NaN and values past the int32
 * range give INT_MIN, which the packs saturate and the clamp lifts to -127
 * (only non-finite inputs get there). */
static inline int8_t q8_round(float v) {
    const float r = rintf(v);
    if (r != r || r >= 2147483648.0f || r < -2147483648.0f) return -127;
    return (int8_t)(r > 127.0f ? 127 : r < -127.0f ? -127 : r);
}

/* the sums of a record from its quants */
static void act_sums(int kind, uint8_t *rec, int64_t n_in) {
    const int8_t *q = (const int8_t *)rec;
    if (kind == A2N_ACT_B32) {
        const int64_t nb = n_in / 32;
        int32_t *c8 = (int32_t *)(rec + n_in + 4 * nb), *c16 = c8 + nb;
        for (int64_t b = 0; b < nb; b++) {
            int s = 0;
            for (int k = 0; k < 32; k++) s += q[32 * b + k];
            c8[b] = -8 * s;
            c16[b] = -16 * s;
        }
        return;
    }
    int16_t *s16 = (int16_t *)(rec + n_in + 4 * (n_in / 256)), *s32 = s16 + n_in / 16;
    for (int64_t g = 0; g < n_in / 16; g++) {
        int s = 0;
        for (int k = 0; k < 16; k++) s += q[16 * g + k];
        s16[g] = (int16_t)s;
        if (g & 1) s32[g / 2] = (int16_t)(s16[g - 1] + s);
    }
}

void a2n_quantize_ref(int kind, const float *x, int64_t n_vec, int64_t n_in, uint8_t *dst, int64_t stride) {
    const int B = kind == A2N_ACT_B32 ? 32 : 256;
    for (int64_t v = 0; v < n_vec; v++) {
        uint8_t *rec = dst + v * stride;
        float *d = (float *)(rec + n_in);
        for (int64_t b = 0; b < n_in / B; b++) {
            const float *xb = x + v * n_in + b * B;
            float amax = 0.0f;
            for (int k = 0; k < B; k++) {
                const float a = fabsf(xb[k]);
                amax = a > amax ? a : amax;
            }
            const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
            d[b] = db;
            for (int k = 0; k < B; k++) ((int8_t *)rec)[b * B + k] = q8_round(xb[k] * id);
        }
        act_sums(kind, rec, n_in);
    }
}

#if A2N_HAVE_AVX2
static inline int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* The same records as a2n_quantize_ref, bit for bit: the max is exact, the scale
 * is scalar, the conversion rounds half to even as rintf does. */
void a2n_quantize_avx2(int kind, const float *x, int64_t n_vec, int64_t n_in, uint8_t *dst, int64_t stride) {
    const int B = kind == A2N_ACT_B32 ? 32 : 256;
    const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7), lo = _mm256_set1_epi8(-127);
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int64_t v = 0; v < n_vec; v++) {
        uint8_t *rec = dst + v * stride;
        float *d = (float *)(rec + n_in);
        const int64_t nb = n_in / B;
        int32_t *c8 = (int32_t *)(rec + n_in + 4 * nb), *c16 = c8 + nb;
        int16_t *s16 = (int16_t *)(rec + n_in + 4 * nb), *s32 = s16 + n_in / 16;
        for (int64_t b = 0; b < nb; b++) {
            const float *xb = x + v * n_in + b * B;
            __m256 mx = _mm256_setzero_ps();
            for (int k = 0; k < B; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + k), nosign));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float db = _mm_cvtss_f32(m4) / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
            d[b] = db;
            const __m256 vid = _mm256_set1_ps(id);
            for (int k = 0; k < B; k += 32) {
                const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k), vid));
                const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 8), vid));
                const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 16), vid));
                const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 24), vid));
                __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
                q = _mm256_max_epi8(_mm256_permutevar8x32_epi32(q, order), lo);
                _mm256_storeu_si256((__m256i *)(rec + b * B + k), q);
                /* lane sums of 4 quants in element order: lanes 0-3 the first 16, 4-7 the rest */
                const __m256i s4 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, q), ones16);
                if (kind == A2N_ACT_B32) {
                    const int s = hsum_epi32(s4);
                    c8[b] = -8 * s;
                    c16[b] = -16 * s;
                } else {
                    __m128i h = _mm_hadd_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
                    h = _mm_hadd_epi32(h, h);   /* [first 16, second 16, ...] */
                    const int64_t g = (b * B + k) / 16;
                    s16[g] = (int16_t)_mm_cvtsi128_si32(h);
                    s16[g + 1] = (int16_t)_mm_extract_epi32(h, 1);
                    s32[g / 2] = (int16_t)(s16[g] + s16[g + 1]);
                }
            }
        }
    }
}
#endif

typedef struct {
    int kind;
    const float *x;
    int64_t n_in, stride;
    uint8_t *dst;
} quant_job;

static void quant_range(void *p, int64_t v0, int64_t v1) {
    const quant_job *j = p;
    const float *x = j->x + v0 * j->n_in;
    uint8_t *dst = j->dst + v0 * j->stride;
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        a2n_quantize_avx2(j->kind, x, v1 - v0, j->n_in, dst, j->stride);
        return;
    }
#endif
    a2n_quantize_ref(j->kind, x, v1 - v0, j->n_in, dst, j->stride);
}

int a2n_quantize_act(int kind, const float *x, int64_t n_vec, int64_t n_in, void *dst, int64_t dst_nbytes,
                     int n_threads) {
    const int64_t need = a2n_act_nbytes(kind, n_vec, n_in);
    if (need < 0) return (int)need;
    if (!x || !dst) return A2N_E_ARG;
    if (dst_nbytes != need) return A2N_E_SIZE;
    quant_job j = {kind, x, n_in, a2n_act_stride(kind, n_in), dst};
    /* a thread is worth waking for >= 4 K elements (~2 us; the hand-off costs well under 1 us) */
    return a2n_parallel_for(n_vec, n_threads, (4 << 10) / n_in + 1, quant_range, &j);
}
