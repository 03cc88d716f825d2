/* The inner loops of a2n_attention (attention.c): scores of a tile's rows against a block of
 * keys, the block's exponentials, P @ V. AVX2 + FMA + F16C kernels when a2n_use_simd, else
 * portable scalar loops. Each output element is one fixed sequence of operations whatever the
 * micro-kernel (rows x keys) computing it, which is what makes attention batch-invariant:
 *  - a score: one FMA chain over d in order (a lane of a vector of 8 keys: the block's keys
 *    are transposed first), then the scale;
 *  - P @ V: per output element one chain over the keys in ascending order (FMA for the
 *    elements below d & ~7, multiply-add after);
 *  - exponentials elementwise; max and sum in an order fixed by the count.
 * Keys of the block types (q8_0, q4_0) are decoded as they are transposed (SIMD) or into a
 * scratch first (scalar); a value q * d is exact in float32, so every path decodes to the
 * same bits and the scores are those of float32 keys holding the decoded values. */
#include <math.h>
#include <string.h>
#include "a2ats_native.h"
#include "attention.h"
#include "attention_kernels.h"
#include "internal.h"
#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

#if A2N_HAVE_AVX2
/* 8 x 8 transpose: row i of r becomes column i, stored at o + c * AT_KB for c < 8 */
static inline void store_t8(const __m256 *r, float *o) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    _mm256_storeu_ps(o + 0 * AT_KB, _mm256_permute2f128_ps(u0, u4, 0x20));
    _mm256_storeu_ps(o + 1 * AT_KB, _mm256_permute2f128_ps(u1, u5, 0x20));
    _mm256_storeu_ps(o + 2 * AT_KB, _mm256_permute2f128_ps(u2, u6, 0x20));
    _mm256_storeu_ps(o + 3 * AT_KB, _mm256_permute2f128_ps(u3, u7, 0x20));
    _mm256_storeu_ps(o + 4 * AT_KB, _mm256_permute2f128_ps(u0, u4, 0x31));
    _mm256_storeu_ps(o + 5 * AT_KB, _mm256_permute2f128_ps(u1, u5, 0x31));
    _mm256_storeu_ps(o + 6 * AT_KB, _mm256_permute2f128_ps(u2, u6, 0x31));
    _mm256_storeu_ps(o + 7 * AT_KB, _mm256_permute2f128_ps(u3, u7, 0x31));
}

/* elements [e0, e0 + 8) of a key row of type T as f32 (block types: q * d, exact in f32, so
 * the bits of the blocks' decoding; e0 % 8 == 0 keeps the 8 inside one block) */
static inline __attribute__((always_inline)) __m256 load8(const uint8_t *row, int64_t e0, const int T) {
    if (T == A2N_KV_F32) return _mm256_loadu_ps((const float *)row + e0);
    if (T == A2N_KV_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + e0)));
    const int64_t j = e0 & 31;
    const uint8_t *blk = row + (e0 >> 5) * (T == A2N_KV_Q8_0 ? 34 : 18);
    uint16_t h;
    memcpy(&h, blk, 2);
    const __m256 scale = _mm256_set1_ps(_cvtsh_ss(h));
    __m256i q;
    if (T == A2N_KV_Q8_0) {
        q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + j)));
    } else {   /* q4_0: values j..j+7 are the low (j < 16) or high nibbles of bytes j % 16.. */
        q = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + (j & 15))));
        q = j < 16 ? _mm256_and_si256(q, _mm256_set1_epi32(15)) : _mm256_srli_epi32(q, 4);
        q = _mm256_sub_epi32(q, _mm256_set1_epi32(8));
    }
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), scale);
}

/* elements [e0, e0 + 8) of m <= 8 rows (rs bytes apart) as f32, zeros for rows >= m */
static inline __attribute__((always_inline)) void load_rows8(const uint8_t *krows, int64_t rs, int64_t e0, int m,
                                                             const int T, __m256 *r) {
    for (int i = 0; i < 8; i++) r[i] = i >= m ? _mm256_setzero_ps() : load8(krows + i * rs, e0, T);
}

/* kt[e * AT_KB + x] = K[x][e] for x < nk (zeros up to the next multiple of 8), e < d: the block's
 * keys transposed (widened from f16, decoded from blocks), so that a vector holds one element
 * of 8 keys */
static inline __attribute__((always_inline)) void transpose_t(const void *krows, int64_t nk, int64_t d, float *kt,
                                                              const int T) {
    const int64_t d8 = d & ~(int64_t)7, rs = a2n_kv_row_units(T, d) * (T == A2N_KV_F32 ? 4 : T == A2N_KV_F16 ? 2 : 1);
    for (int64_t x0 = 0; x0 < nk; x0 += 8) {
        const int m = nk - x0 < 8 ? (int)(nk - x0) : 8;
        const uint8_t *rows = (const uint8_t *)krows + x0 * rs;
        __m256 r[8];
        if (m == 8)
            for (int64_t e0 = 0; e0 < d8; e0 += 8) {
                load_rows8(rows, rs, e0, 8, T, r);
                store_t8(r, kt + e0 * AT_KB + x0);
            }
        else
            for (int64_t e0 = 0; e0 < d8; e0 += 8) {
                load_rows8(rows, rs, e0, m, T, r);
                store_t8(r, kt + e0 * AT_KB + x0);
            }
        for (int64_t e = d8; e < d; e++)   /* float types only: block rows are whole blocks of 32 */
            for (int i = 0; i < 8; i++)
                kt[e * AT_KB + x0 + i] = i >= m ? 0.0f
                                         : T == A2N_KV_F16 ? a2n_f16_to_f32(((const uint16_t *)(rows + i * rs))[e])
                                                           : ((const float *)(rows + i * rs))[e];
    }
}

static void transpose_keys(const void *krows, int type, int64_t nk, int64_t d, float *kt) {
    switch (type) {
    case A2N_KV_F16: transpose_t(krows, nk, d, kt, A2N_KV_F16); break;
    case A2N_KV_Q8_0: transpose_t(krows, nk, d, kt, A2N_KV_Q8_0); break;
    case A2N_KV_Q4_0: transpose_t(krows, nk, d, kt, A2N_KV_Q4_0); break;
    default: transpose_t(krows, nk, d, kt, A2N_KV_F32); break;
    }
}

/* scores of NR rows x NV vectors of 8 keys: per lane one FMA chain over e */
static inline __attribute__((always_inline)) void qk_micro(const float *const *q, const float *kt, int64_t d,
                                                           float scale, float *sc, const int NR, const int NV) {
    __m256 acc[6][2] = {{_mm256_setzero_ps()}};
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm256_setzero_ps();
    for (int64_t e = 0; e < d; e++) {
        __m256 k[2];
        for (int v = 0; v < NV; v++) k[v] = _mm256_loadu_ps(kt + e * AT_KB + 8 * v);
        for (int r = 0; r < NR; r++) {
            const __m256 qb = _mm256_broadcast_ss(q[r] + e);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm256_fmadd_ps(qb, k[v], acc[r][v]);
        }
    }
    const __m256 sv = _mm256_set1_ps(scale);
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(sc + r * AT_KB + 8 * v, _mm256_mul_ps(acc[r][v], sv));
}

static void qk_avx(const float *const *qp, int64_t rg, const void *krows, int type, int64_t nk, int64_t d,
                   float scale, float *sc, float *kt) {
    transpose_keys(krows, type, nk, d, kt);
    const int64_t nv = (nk + 7) / 8;
    for (int64_t r0 = 0, nr; r0 < rg; r0 += nr) {
        nr = a2n_at_group(rg - r0);
        const float *const *q = qp + r0;
        float *s = sc + r0 * AT_KB;
        for (int64_t v0 = 0; v0 < nv; v0 += 2) {
            const float *k = kt + 8 * v0;
            float *o = s + 8 * v0;
            if (nv - v0 >= 2) {
                switch (nr) {
                case 6: qk_micro(q, k, d, scale, o, 6, 2); break;
                case 5: qk_micro(q, k, d, scale, o, 5, 2); break;
                case 4: qk_micro(q, k, d, scale, o, 4, 2); break;
                case 3: qk_micro(q, k, d, scale, o, 3, 2); break;
                case 2: qk_micro(q, k, d, scale, o, 2, 2); break;
                default: qk_micro(q, k, d, scale, o, 1, 2); break;
                }
            } else {
                switch (nr) {
                case 6: qk_micro(q, k, d, scale, o, 6, 1); break;
                case 5: qk_micro(q, k, d, scale, o, 5, 1); break;
                case 4: qk_micro(q, k, d, scale, o, 4, 1); break;
                case 3: qk_micro(q, k, d, scale, o, 3, 1); break;
                case 2: qk_micro(q, k, d, scale, o, 2, 1); break;
                default: qk_micro(q, k, d, scale, o, 1, 1); break;
                }
            }
        }
    }
}

/* o[r][e, e + 16) += sum_t w[r][t] * V[t][e, e + 16) for NR rows, t ascending */
static inline __attribute__((always_inline)) void pv_micro(float *const *o, const float *const *w, const float *v,
                                                           int64_t nt, int64_t d, int64_t e, const int NR) {
    __m256 a[6][2];
    for (int r = 0; r < NR; r++) {
        a[r][0] = _mm256_loadu_ps(o[r] + e);
        a[r][1] = _mm256_loadu_ps(o[r] + e + 8);
    }
    for (int64_t t = 0; t < nt; t++) {
        __m256 v0 = _mm256_loadu_ps(v + t * d + e), v1 = _mm256_loadu_ps(v + t * d + e + 8);
        __asm__("" : "+x"(v0), "+x"(v1));   /* loaded once, not once per FMA */
        for (int r = 0; r < NR; r++) {
            const __m256 wr = _mm256_broadcast_ss(w[r] + t);
            a[r][0] = _mm256_fmadd_ps(wr, v0, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(wr, v1, a[r][1]);
        }
    }
    for (int r = 0; r < NR; r++) {
        _mm256_storeu_ps(o[r] + e, a[r][0]);
        _mm256_storeu_ps(o[r] + e + 8, a[r][1]);
    }
}

/* pv for nr (1..AT_PV_ROWS) rows sharing their keys */
static void pvn_avx(float *const *o, const float *const *w, int nr, const float *v, int64_t nt, int64_t d) {
    const int64_t d16 = d & ~(int64_t)15, d8 = d & ~(int64_t)7;
    for (int64_t e = 0; e < d16; e += 16) switch (nr) {
        case 6: pv_micro(o, w, v, nt, d, e, 6); break;
        case 5: pv_micro(o, w, v, nt, d, e, 5); break;
        case 4: pv_micro(o, w, v, nt, d, e, 4); break;
        case 3: pv_micro(o, w, v, nt, d, e, 3); break;
        case 2: pv_micro(o, w, v, nt, d, e, 2); break;
        default: pv_micro(o, w, v, nt, d, e, 1); break;
        }
    for (int64_t e = d16; e < d8; e += 8)
        for (int r = 0; r < nr; r++) {
            __m256 a = _mm256_loadu_ps(o[r] + e);
            for (int64_t t = 0; t < nt; t++)
                a = _mm256_fmadd_ps(_mm256_broadcast_ss(w[r] + t), _mm256_loadu_ps(v + t * d + e), a);
            _mm256_storeu_ps(o[r] + e, a);
        }
    for (int64_t e = d8; e < d; e++)
        for (int r = 0; r < nr; r++) {
            float x = o[r][e];
            for (int64_t t = 0; t < nt; t++) x += w[r][t] * v[t * d + e];
            o[r][e] = x;
        }
}

/* one row of pvn_avx: the same operations per element */
static void pv1_avx(float *o, const float *w, const float *v, int64_t nt, int64_t d) {
    const int64_t d32 = d & ~(int64_t)31, d8 = d & ~(int64_t)7;
    int64_t e = 0;
    for (; e < d32; e += 32) {
        __m256 a[4];
        for (int u = 0; u < 4; u++) a[u] = _mm256_loadu_ps(o + e + 8 * u);
        for (int64_t t = 0; t < nt; t++) {
            const __m256 wt = _mm256_broadcast_ss(w + t);
            for (int u = 0; u < 4; u++) a[u] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(v + t * d + e + 8 * u), a[u]);
        }
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(o + e + 8 * u, a[u]);
    }
    for (; e < d8; e += 8) {
        __m256 a = _mm256_loadu_ps(o + e);
        for (int64_t t = 0; t < nt; t++) a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + t), _mm256_loadu_ps(v + t * d + e), a);
        _mm256_storeu_ps(o + e, a);
    }
    for (; e < d; e++) {
        float x = o[e];
        for (int64_t t = 0; t < nt; t++) x += w[t] * v[t * d + e];
        o[e] = x;
    }
}
#endif

void a2n_at_qk(const float *const *qp, int64_t rg, const void *krows, int type, int64_t nk, int64_t d,
               float scale, float *sc, float *kt) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {   /* transposed, widened / decoded as it goes */
        qk_avx(qp, rg, krows, type, nk, d, scale, sc, kt);
        return;
    }
#endif
    const float *kp = krows;
    if (type != A2N_KV_F32) {   /* rows widened / decoded into the scratch */
        a2n_at_decode_rows(krows, type, nk, d, kt);
        kp = kt;
    }
    for (int64_t r = 0; r < rg; r++)
        for (int64_t x = 0; x < nk; x++) {
            const float *a = qp[r], *b = kp + x * d;
            float s = 0.0f;
            for (int64_t e = 0; e < d; e++) s += a[e] * b[e];
            sc[r * AT_KB + x] = s * scale;
        }
}

/* the largest of p[0, n) */
float a2n_at_max(const float *p, int64_t n) {
    int64_t i = 0;
    float mx = -INFINITY;
#if A2N_HAVE_AVX2
    if (a2n_use_simd && n >= 8) {
        __m256 m = _mm256_loadu_ps(p);
        for (i = 8; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(p + i));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        mx = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    }
#endif
    for (; i < n; i++) mx = p[i] > mx ? p[i] : mx;
    return mx;
}

/* p[i] = exp(p[i] - mx) in place; returns their sum, added in an order fixed by n */
float a2n_at_exp_sum(float *p, int64_t n, float mx) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        const __m256 m = _mm256_set1_ps(mx);
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            const __m256 e = a2n_exp256(_mm256_sub_ps(_mm256_loadu_ps(p + i), m));
            _mm256_storeu_ps(p + i, e);
            acc = _mm256_add_ps(acc, e);
        }
        if (i < n) {   /* the tail through the same polynomial; padding gives exp(-inf) = 0 */
            float t[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
            memcpy(t, p + i, (size_t)(n - i) * sizeof *t);
            const __m256 e = a2n_exp256(_mm256_sub_ps(_mm256_loadu_ps(t), m));
            _mm256_storeu_ps(t, e);
            memcpy(p + i, t, (size_t)(n - i) * sizeof *t);
            acc = _mm256_add_ps(acc, e);
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
    }
#endif
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        p[i] = expf(p[i] - mx);
        sum += p[i];   /* in key order */
    }
    return sum;
}

void a2n_at_pv1(float *o, const float *w, const float *v, int64_t nt, int64_t d) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        pv1_avx(o, w, v, nt, d);
        return;
    }
#endif
    for (int64_t t = 0; t < nt; t++)
        for (int64_t e = 0; e < d; e++) o[e] += w[t] * v[t * d + e];
}

void a2n_at_pv(float *const *o, const float *const *w, int nr, const float *v, int64_t nt, int64_t d) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        pvn_avx(o, w, nr, v, nt, d);
        return;
    }
#endif
    for (int r = 0; r < nr; r++) a2n_at_pv1(o[r], w[r], v, nt, d);
}

/* n rows of d f16 (row stride d) -> f32 */
void a2n_at_widen(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd)
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = a2n_f16_to_f32(src[i]);
}

void a2n_at_decode_rows(const void *src, int type, int64_t n, int64_t d, float *dst) {
    if (type == A2N_KV_F16) {
        a2n_at_widen(src, dst, n * d);
        return;
    }
    /* rows of whole blocks: n rows are n * d / 32 consecutive blocks */
    a2n_decode(a2n_find_type(type), src, n * d / 32, dst);
}

