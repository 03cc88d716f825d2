/* A2ATS retrieval kernels: query-centroid lookup tables, top-K selection by
 * LUT scores (radix select on the float bits, O(n) per head), and sparse
 * attention fused with the row gather (online softmax, no gathered copy).
 * Host store rows are f32, f16 or ggml's q8_0 / q4_0 blocks (K and V may differ),
 * read in place; a selected row that is not f32 is decoded into a thread's scratch
 * as it is read. Work is spread over (sequence, KV head) pairs on the persistent
 * pool of ops.c; every size and index is checked before anything is written. The
 * selection of 4-bit codes by quantized LUTs (fast-scan) is fastscan.c's. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "attention.h"
#include "internal.h"
#include "retrieval.h"
#include "sel_common.h"
#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

/* Per-thread scratch (sel_common.h), slot 0: selection keys / histograms / lists,
 * 1: attention state, 2: the calling thread's pick bitmaps, 3: a decoded key row of the
 * exact scores. */
static _Thread_local a2n_scratch tls_scratch[4];

static void *scratch(int slot, size_t bytes) { return a2n_scratch_get(&tls_scratch[slot], bytes); }

/* ---- LUT ------------------------------------------------------------------ */
typedef struct {
    const float *q, *cent;
    float *lut;
    int64_t G, g, d, M, C, dsub;
} lut_job;

static float dot_f32(const float *a, const float *b, int64_t n) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h);
        for (; i < n; i++) s += a[i] * b[i];
        return s;
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* a f32 . b f16 */
static float dot_f16(const float *a, const uint16_t *b, int64_t n) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i),
                                  _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i))), acc);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        float s = _mm_cvtss_f32(h);
        for (; i < n; i++) s += a[i] * a2n_f16_to_f32(b[i]);
        return s;
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += a[i] * a2n_f16_to_f32(b[i]);
    return s;
}

#if A2N_HAVE_AVX2
/* (q[0] . row, .., q[3] . row) over d elements, q rows qs floats apart; row f32 or f16 */
static inline __m128 dots4(const float *q, int64_t qs, int64_t d, const void *row, int f16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 8 <= d; i += 8) {
        const __m256 k = f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
                             : _mm256_loadu_ps((const float *)row + i);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), k, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + qs + i), k, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 2 * qs + i), k, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 3 * qs + i), k, a3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    if (i < d) {
        float t[4] = {0, 0, 0, 0};
        for (; i < d; i++) {
            const float k = f16 ? a2n_f16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
            for (int x = 0; x < 4; x++) t[x] += q[x * qs + i] * k;
        }
        r = _mm_add_ps(r, _mm_loadu_ps(t));
    }
    return r;
}
#endif

/* out[h * stride] = scale * q[h] . row for n heads q[h] = q + h * qs (d elements); row f32 or f16 */
void a2n_dots_heads(const float *q, int64_t qs, int64_t n, int64_t d, const void *row, int f16,
                       float *out, int64_t stride, float scale) {
    int64_t h = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd)
        for (; h + 4 <= n; h += 4) {
            float t[4];
            _mm_storeu_ps(t, _mm_mul_ps(dots4(q + h * qs, qs, d, row, f16), _mm_set1_ps(scale)));
            for (int x = 0; x < 4; x++) out[(h + x) * stride] = t[x];
        }
#endif
    for (; h < n; h++)
        out[h * stride] = scale * (f16 ? dot_f16(q + h * qs, (const uint16_t *)row, d) : dot_f32(q + h * qs, (const float *)row, d));
}

#if A2N_HAVE_AVX2
static inline __m256 load8(const void *row, int64_t i, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
               : _mm256_loadu_ps((const float *)row + i);
}

/* the 4 heads q[0..3] (qs floats apart) against rows a and b (d % 8 == 0): the 8 dots as
 * (a.q0, a.q1, a.q2, a.q3, b.q0, .., b.q3); two rows share every q load, and the 8
 * accumulators keep the FMA unit busy through its latency */
static inline __m256 dots4x2(const float *q, int64_t qs, int64_t d, const void *a, const void *b, int f16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t i = 0; i < d; i += 8) {
        const __m256 ka = load8(a, i, f16), kb = load8(b, i, f16);
        __m256 x = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(x, ka, a0);
        b0 = _mm256_fmadd_ps(x, kb, b0);
        x = _mm256_loadu_ps(q + qs + i);
        a1 = _mm256_fmadd_ps(x, ka, a1);
        b1 = _mm256_fmadd_ps(x, kb, b1);
        x = _mm256_loadu_ps(q + 2 * qs + i);
        a2 = _mm256_fmadd_ps(x, ka, a2);
        b2 = _mm256_fmadd_ps(x, kb, b2);
        x = _mm256_loadu_ps(q + 3 * qs + i);
        a3 = _mm256_fmadd_ps(x, ka, a3);
        b3 = _mm256_fmadd_ps(x, kb, b3);
    }
    const __m256 ha = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 hb = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
    return _mm256_add_ps(_mm256_permute2f128_ps(ha, hb, 0x20), _mm256_permute2f128_ps(ha, hb, 0x31));
}
#endif

void a2n_dots_rows(const float *q, int64_t qs, int64_t n, int64_t d, const void *const *rows,
                   int64_t nr, int f16, float *out, int64_t stride, float scale) {
    int64_t h = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd && d % 8 == 0) {
        const __m256 sc = _mm256_set1_ps(scale);
        for (; h + 4 <= n; h += 4) {
            int64_t r = 0;
            for (; r + 2 <= nr; r += 2) {
                float t[8];
                _mm256_storeu_ps(t, _mm256_mul_ps(dots4x2(q + h * qs, qs, d, rows[r], rows[r + 1], f16), sc));
                for (int x = 0; x < 4; x++) {
                    out[(h + x) * stride + r] = t[x];
                    out[(h + x) * stride + r + 1] = t[4 + x];
                }
            }
            if (r < nr) a2n_dots_heads(q + h * qs, qs, 4, d, rows[r], f16, out + h * stride + r, stride, scale);
        }
    }
#endif
    for (int64_t r = 0; h < n && r < nr; r++)
        a2n_dots_heads(q + h * qs, qs, n - h, d, rows[r], f16, out + h * stride + r, stride, scale);
}

/* task = (s, k, m): the g x C block of one subspace */
static void lut_range(void *p, int64_t t0, int64_t t1) {
    const lut_job *j = p;
    for (int64_t t = t0; t < t1; t++) {
        const int64_t m = t % j->M, sk = t / j->M, k = sk % j->G;
        const float *cent = j->cent + (k * j->M + m) * j->C * j->dsub;
        const float *qv = j->q + sk * j->g * j->d + m * j->dsub;
        float *row = j->lut + (sk * j->g * j->M + m) * j->C;
        for (int64_t c = 0; c < j->C; c++)   /* the g heads against one centroid */
            a2n_dots_heads(qv, j->d, j->g, j->dsub, cent + c * j->dsub, 0, row + c, j->M * j->C, 1.0f);
    }
}

int a2n_build_lut(const float *q, int64_t q_len, const float *centroids, int64_t cent_len,
                  int64_t S, int64_t G, int64_t g, int64_t d, int64_t M, int64_t C,
                  float *lut, int64_t lut_len, int n_threads) {
    if (S < 0 || G < 0 || g < 0 || d < 1 || M < 1 || C < 1 || d % M) return A2N_E_ARG;
    int64_t nq, nc, nl, x;
    if (!a2n_mul4(S, G, g, d, &nq) || !a2n_mul4(G, M, C, d / M, &nc) || !a2n_mul4(S, G, g, M, &x) ||
        !a2n_mul4(x, C, 1, 1, &nl))
        return A2N_E_SIZE;
    if (nq != q_len || nc != cent_len || nl != lut_len) return A2N_E_SIZE;
    if (nl == 0) return A2N_OK;
    if (!q || !centroids || !lut) return A2N_E_ARG;
    lut_job j = {q, centroids, lut, G, g, d, M, C, d / M};
    const int64_t per_task = g * C * (d / M);
    return a2n_parallel_for(S * G * M, n_threads, 32768 / (per_task + 1) + 1, lut_range, &j);
}

/* ---- top-K selection ------------------------------------------------------ */

typedef struct {
    const float *lut;
    int64_t G, g, M, C;
    const uint16_t *const *codes;
    const int64_t *caps, *T;
    int64_t sinks, window, K, nmax, words;
    uint64_t *bits;      /* (S*G, words) picks of each (s, k) */
    int64_t *npick;      /* (S*G) */
    int64_t *idx;
    int64_t kmax;
    int32_t *lens;
    atomic_int err;
} sel_job;

static void sk_bounds(const sel_job *j, int64_t s, int64_t *lo, int64_t *hi) {
    a2n_sel_bounds(j->T[s], j->sinks, j->window, lo, hi);
}

/* scores of n candidates of one head: sum over m of L[m][cm[m][t]] (codes cm, LUT L (M, C)) */
static void score_chunk(const float *L, const uint16_t *const *cm, int64_t M, int64_t C, int64_t n,
                        float *sc) {
    int64_t t = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        for (; t + 8 <= n; t += 8) {
            __m256i c = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(cm[0] + t)));
            __m256 v = _mm256_i32gather_ps(L, c, 4);
            for (int64_t m = 1; m < M; m++) {
                c = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(cm[m] + t)));
                v = _mm256_add_ps(v, _mm256_i32gather_ps(L + m * C, c, 4));
            }
            _mm256_storeu_ps(sc + t, v);
        }
    }
#endif
    for (; t < n; t++) {
        float v = L[cm[0][t]];
        for (int64_t m = 1; m < M; m++) v += L[m * C + cm[m][t]];
        sc[t] = v;
    }
}

/* max of n uint16 (0 when n == 0) */
static uint16_t max_u16(const uint16_t *x, int64_t n) {
    int64_t i = 0;
    uint16_t mx = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd && n >= 16) {
        __m256i v = _mm256_setzero_si256();
        for (; i + 16 <= n; i += 16) v = _mm256_max_epu16(v, _mm256_loadu_si256((const __m256i *)(x + i)));
        __m128i h = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        h = _mm_max_epu16(h, _mm_srli_si128(h, 8));
        h = _mm_max_epu16(h, _mm_srli_si128(h, 4));
        h = _mm_max_epu16(h, _mm_srli_si128(h, 2));
        mx = (uint16_t)_mm_extract_epi16(h, 0);
    }
#endif
    for (; i < n; i++) mx = x[i] > mx ? x[i] : mx;
    return mx;
}

static void sel_range(void *p, int64_t t0, int64_t t1) {
    sel_job *j = p;
    uint32_t *key = NULL, *hist = NULL;
    int32_t *list = NULL;
    float *sc = NULL;
    for (int64_t task = t0; task < t1; task++) {
        if (atomic_load_explicit(&j->err, memory_order_relaxed)) break;
        const int64_t s = task / j->G, k = task % j->G;
        int64_t lo, hi;
        sk_bounds(j, s, &lo, &hi);
        const int64_t n = hi - lo;
        if (n <= j->K) {
            j->npick[task] = -1;   /* every candidate */
            continue;
        }
        if (!key) {
            key = scratch(0, ((size_t)(3 * j->nmax) + A2N_HSIZE) * 4);
            if (!key) {
                atomic_store(&j->err, A2N_E_NOMEM);
                break;
            }
            hist = key + j->nmax;
            list = (int32_t *)(hist + A2N_HSIZE);
            sc = (float *)(list + j->nmax);
        }
        const int64_t cap = j->caps[s];
        const uint16_t *base = j->codes[s] + k * j->M * cap + lo;
        const float *L = j->lut + (s * j->G + k) * j->g * j->M * j->C;
        const uint16_t *cm[64];
        const uint16_t **cmp = j->M <= 64 ? cm : malloc((size_t)j->M * sizeof *cmp);
        if (!cmp) {
            atomic_store(&j->err, A2N_E_NOMEM);
            break;
        }
        /* every code that will be looked up is checked first */
        int bad = 0;
        for (int64_t m = 0; m < j->M; m++) {
            cmp[m] = base + m * cap;
            bad |= max_u16(cmp[m], n) >= j->C;
        }
        if (bad) {
            if (cmp != cm) free(cmp);
            atomic_store(&j->err, A2N_E_INDEX);
            break;
        }
        /* one head at a time: its scores (4n bytes) stay in L2 between the passes */
        uint64_t *bits = j->bits + task * j->words;
        for (int64_t h = 0; h < j->g; h++) {
            score_chunk(L + h * j->M * j->C, cmp, j->M, j->C, n, sc);
            a2n_topk_f32(sc, n, j->K, key, hist, list, bits);
        }
        if (cmp != cm) free(cmp);
        j->npick[task] = a2n_sel_count(bits, n);
    }
}

static void sel_write(void *p, int64_t t0, int64_t t1) {
    sel_job *j = p;
    for (int64_t task = t0; task < t1; task++)
        a2n_sel_emit_task(task, j->G, j->T, j->sinks, j->window, j->bits, j->words, j->npick, j->idx,
                          j->kmax, j->lens);
}

int a2n_select_topk(const float *lut, int64_t lut_len, int64_t S, int64_t G, int64_t g,
                    int64_t M, int64_t C, const uint16_t *const *codes, const int64_t *caps,
                    const int64_t *T, int64_t sinks, int64_t window, int64_t K,
                    int64_t *idx, int64_t kmax, int32_t *lens, int n_threads) {
    if (S < 0 || G < 0 || g < 1 || M < 1 || C < 1 || C > 65536 || sinks < 0 || window < 0 ||
        K < 1 || kmax < 0)
        return A2N_E_ARG;
    int64_t nl, x, ni;
    if (!a2n_mul4(S, G, g, M, &x) || !a2n_mul4(x, C, 1, 1, &nl) || nl != lut_len) return A2N_E_SIZE;
    if (!a2n_mul4(S, G, kmax, 1, &ni)) return A2N_E_SIZE;
    if (S * G == 0) return A2N_OK;
    if (!lut || !codes || !caps || !T || !idx || !lens) return A2N_E_ARG;
    sel_job j = {.lut = lut, .G = G, .g = g, .M = M, .C = C, .codes = codes, .caps = caps, .T = T,
                 .sinks = sinks, .window = window, .K = K, .idx = idx, .kmax = kmax, .lens = lens};
    int64_t Kg;
    if (!a2n_mul4(K, g, 1, 1, &Kg)) Kg = INT64_MAX;
    for (int64_t s = 0; s < S; s++) {
        int64_t cg;
        const int fits = a2n_mul4(G, M, caps[s], 1, &cg);
        const int rc = a2n_sel_check_seq(caps[s], T[s], fits, codes[s], sinks, window, Kg, kmax, &j.nmax);
        if (rc != A2N_OK) return rc;
    }
    if (!(j.bits = a2n_sel_bitmaps(&tls_scratch[2], S * G, j.nmax, &j.words, &j.npick)))
        return A2N_E_NOMEM;
    atomic_init(&j.err, 0);
    a2n_parallel_for(S * G, n_threads, 1, sel_range, &j);
    int rc = atomic_load(&j.err);
    if (rc == A2N_OK) a2n_parallel_for(S * G, n_threads, 8, sel_write, &j);
    return rc;
}

/* ---- sparse attention ----------------------------------------------------- */
#define ATT_BLOCK 32   /* rows scored before their softmax update */
#define ATT_MAX_G 64   /* query heads per KV head that acc_heads serves (more: per head) */

/* in place p[i] = exp(p[i] - mx) */
static void exp_sub(float *p, int64_t n, float mx) {
    int64_t i = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        const __m256 m = _mm256_set1_ps(mx);
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(p + i, a2n_exp256(_mm256_sub_ps(_mm256_loadu_ps(p + i), m)));
    }
#endif
    for (; i < n; i++) p[i] = expf(p[i] - mx);
}

/* acc[0..d) = acc * corr + sum_r w[r] * rows[r][0..d) */
static void acc_rows(float *acc, float corr, const float *w, const float *const *rows, int64_t nb, int64_t d) {
    int64_t i = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        const __m256 c = _mm256_set1_ps(corr);
        for (; i + 32 <= d; i += 32) {   /* 4 accumulators in registers over the block */
            __m256 a0 = _mm256_mul_ps(c, _mm256_loadu_ps(acc + i)), a1 = _mm256_mul_ps(c, _mm256_loadu_ps(acc + i + 8));
            __m256 a2 = _mm256_mul_ps(c, _mm256_loadu_ps(acc + i + 16)), a3 = _mm256_mul_ps(c, _mm256_loadu_ps(acc + i + 24));
            for (int64_t r = 0; r < nb; r++) {
                const __m256 wr = _mm256_set1_ps(w[r]);
                const float *v = rows[r] + i;
                a0 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(v), a0);
                a1 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(v + 8), a1);
                a2 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(v + 16), a2);
                a3 = _mm256_fmadd_ps(wr, _mm256_loadu_ps(v + 24), a3);
            }
            _mm256_storeu_ps(acc + i, a0);
            _mm256_storeu_ps(acc + i + 8, a1);
            _mm256_storeu_ps(acc + i + 16, a2);
            _mm256_storeu_ps(acc + i + 24, a3);
        }
        for (; i + 8 <= d; i += 8) {
            __m256 a0 = _mm256_mul_ps(c, _mm256_loadu_ps(acc + i));
            for (int64_t r = 0; r < nb; r++) a0 = _mm256_fmadd_ps(_mm256_set1_ps(w[r]), _mm256_loadu_ps(rows[r] + i), a0);
            _mm256_storeu_ps(acc + i, a0);
        }
    }
#endif
    for (; i < d; i++) {
        float a = acc[i] * corr;
        for (int64_t r = 0; r < nb; r++) a += w[r] * rows[r][i];
        acc[i] = a;
    }
}

#if A2N_HAVE_AVX2
/* HN (1..4, a constant in each instance) heads' acc over 16 values at `off`: acc[h] =
 * acc[h] * corr[h] + sum_r p[h * ATT_BLOCK + r] * rows[r][off..off+16), row by row (each
 * value's sum in row order, as acc_rows's) with the 2 * HN accumulators in registers and each
 * row's 16 values loaded (and widened from f16) once for the HN heads */
static inline __attribute__((always_inline)) void acc_heads16(
    float *acc, int64_t d, const float *corr, const float *p, const void *const *rows, int64_t nb,
    int64_t off, int f16, const int HN) {
    __m256 a[4][2];
    for (int h = 0; h < HN; h++) {
        const __m256 c = _mm256_set1_ps(corr[h]);
        a[h][0] = _mm256_mul_ps(c, _mm256_loadu_ps(acc + h * d + off));
        a[h][1] = _mm256_mul_ps(c, _mm256_loadu_ps(acc + h * d + off + 8));
    }
    for (int64_t r = 0; r < nb; r++) {
        const __m256 v0 = load8(rows[r], off, f16), v1 = load8(rows[r], off + 8, f16);
        for (int h = 0; h < HN; h++) {
            const __m256 w = _mm256_broadcast_ss(p + h * ATT_BLOCK + r);
            a[h][0] = _mm256_fmadd_ps(w, v0, a[h][0]);
            a[h][1] = _mm256_fmadd_ps(w, v1, a[h][1]);
        }
    }
    for (int h = 0; h < HN; h++) {
        _mm256_storeu_ps(acc + h * d + off, a[h][0]);
        _mm256_storeu_ps(acc + h * d + off + 8, a[h][1]);
    }
}

/* acc_rows for all g heads at once (d % 16 == 0), rows f32 or f16 read in place */
static void acc_heads(float *acc, const float *corr, const float *p, const void *const *rows,
                      int64_t nb, int64_t g, int64_t d, int f16) {
    for (int64_t h = 0; h < g; h += 4) {
        float *ah = acc + h * d;
        const float *ch = corr + h, *ph = p + h * ATT_BLOCK;
        for (int64_t off = 0; off < d; off += 16) {
            switch (g - h < 4 ? g - h : 4) {
            case 4: acc_heads16(ah, d, ch, ph, rows, nb, off, f16, 4); break;
            case 3: acc_heads16(ah, d, ch, ph, rows, nb, off, f16, 3); break;
            case 2: acc_heads16(ah, d, ch, ph, rows, nb, off, f16, 2); break;
            default: acc_heads16(ah, d, ch, ph, rows, nb, off, f16, 1); break;
            }
        }
    }
}
#endif

typedef struct {
    const float *q;
    int64_t G, g, d;
    const void *const *keys, *const *values;
    const int64_t *caps;
    int kt, vt;               /* A2N_KV_* types of the keys and the values */
    int64_t krb, vrb;         /* their row bytes */
    const int64_t *idx;
    int64_t kmax;
    const int32_t *lens;
    float scale;
    float *out;
    int64_t parts;
    float *pm, *pl, *pacc;    /* partial states (S*G*parts, g) and (.., g, d) when parts > 1 */
    atomic_int err;
} att_job;

static void att_check(void *p, int64_t t0, int64_t t1) {
    att_job *j = p;
    for (int64_t task = t0; task < t1; task++) {
        const int64_t cap = j->caps[task / j->G], *ix = j->idx + task * j->kmax;
        int bad = 0;
        for (int32_t i = 0; i < j->lens[task]; i++) bad |= ix[i] < 0 || ix[i] >= cap;
        if (bad) atomic_store(&j->err, A2N_E_INDEX);
    }
}

void a2n_prefetch_rows(const char *base, const int64_t *ix, int64_t n, int64_t row_bytes) {
    for (int64_t r = 0; r < n; r++) {
        const char *row = base + ix[r] * row_bytes;
        for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(row + o, 0, 3);
    }
}

/* scratch of one worker: two sets (the block being computed, the next being fetched) of
 * tiles holding a block's K and V rows, block scores */
typedef struct {
    float *ktile[2], *vtile[2];   /* (ATT_BLOCK, d) floats each: f32 rows, f16 rows or decoded */
    float *sc;                    /* (g, ATT_BLOCK) */
} att_scratch;

/* rows ix[0..nb) of K (kb) and V (vb) into tile set `set`, krow / vrow pointing at them: f32
 * and f16 rows copied as stored (vraw 0: V widened/decoded to f32), q8_0 / q4_0 blocks decoded to
 * f32 (a2n_copy_row says why the rows are copied). */
static void att_fetch(const att_job *j, const att_scratch *w, int set, const char *kb,
                      const char *vb, const int64_t *ix, int64_t nb, int vraw, const void **krow,
                      const void **vrow) {
    const int64_t d = j->d, krb = j->krb, vrb = j->vrb;
    const int kraw = j->kt == A2N_KV_F32 || j->kt == A2N_KV_F16;
    float *kt = w->ktile[set], *vt = w->vtile[set];
    for (int64_t r = 0; r < nb; r++) {
        const int64_t t = ix[r];
        if (kraw) a2n_copy_row((char *)kt + r * krb, kb + t * krb, krb);
        else a2n_kv_decode_row(kb + t * krb, j->kt, d, kt + r * d);
        krow[r] = kraw ? (const void *)((char *)kt + r * krb) : (const void *)(kt + r * d);
        if (vraw) a2n_copy_row((char *)vt + r * vrb, vb + t * vrb, vrb);
        else a2n_kv_decode_row(vb + t * vrb, j->vt, d, vt + r * d);
        vrow[r] = vraw ? (const void *)((char *)vt + r * vrb) : (const void *)(vt + r * d);
    }
}

/* rows [r0, r1) of the selection of (s, k) for its g heads: running max m,
 * sum l and unnormalized acc (g, d). Each block of ATT_BLOCK rows is scored, folded into the
 * online softmax and accumulated after the next block's rows were fetched into the other tile
 * set (their misses overlap this block's arithmetic). */
static void att_rows(const att_job *j, const att_scratch *w, int64_t sk, int64_t r0, int64_t r1,
                     float *m, float *l, float *acc) {
    const int64_t s = sk / j->G, k = sk % j->G, g = j->g, d = j->d, cap = j->caps[s];
    const char *kb = (const char *)j->keys[s] + k * cap * j->krb;
    const char *vb = (const char *)j->values[s] + k * cap * j->vrb;
    const int64_t *ix = j->idx + sk * j->kmax;
    const float *q = j->q + sk * g * d;
    const void *krow[2][ATT_BLOCK], *vrow[2][ATT_BLOCK];
    /* acc_heads reads f32 or f16 V rows (SIMD, d % 16 == 0); acc_rows f32 rows */
    int vheads = 0;
#if A2N_HAVE_AVX2
    vheads = a2n_use_simd && d % 16 == 0 && g <= ATT_MAX_G;
#endif
    const int vraw = j->vt == A2N_KV_F32 || (j->vt == A2N_KV_F16 && vheads);
    const int kf16 = j->kt == A2N_KV_F16;
    float corr[ATT_MAX_G];
    for (int64_t h = 0; h < g; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    memset(acc, 0, (size_t)(g * d) * sizeof *acc);
    if (r1 > r0)
        att_fetch(j, w, 0, kb, vb, ix + r0, r1 - r0 < ATT_BLOCK ? r1 - r0 : ATT_BLOCK, vraw, krow[0], vrow[0]);
    for (int64_t b0 = r0, set = 0; b0 < r1; b0 += ATT_BLOCK, set ^= 1) {
        const int64_t nb = r1 - b0 < ATT_BLOCK ? r1 - b0 : ATT_BLOCK, b1 = b0 + nb;
        if (b1 < r1)
            att_fetch(j, w, (int)set ^ 1, kb, vb, ix + b1, r1 - b1 < ATT_BLOCK ? r1 - b1 : ATT_BLOCK,
                      vraw, krow[set ^ 1], vrow[set ^ 1]);
        a2n_dots_rows(q, d, g, d, krow[set], nb, kf16, w->sc, ATT_BLOCK, j->scale);
        for (int64_t h = 0; h < g; h++) {
            float *ps = w->sc + h * ATT_BLOCK, mx = ps[0];
            for (int64_t r = 1; r < nb; r++) mx = ps[r] > mx ? ps[r] : mx;
            const float mo = m[h], mn = mx > mo ? mx : mo;
            const float c = mo == -INFINITY ? 0.0f : expf(mo - mn);
            m[h] = mn;
            exp_sub(ps, nb, mn);
            float sum = 0.0f;
            for (int64_t r = 0; r < nb; r++) sum += ps[r];
            l[h] = l[h] * c + sum;
            if (vheads) corr[h] = c;
            else acc_rows(acc + h * d, c, ps, (const float *const *)vrow[set], nb, d);
        }
#if A2N_HAVE_AVX2
        if (vheads) acc_heads(acc, corr, w->sc, vrow[set], nb, g, d, j->vt == A2N_KV_F16);
#endif
    }
}

static void att_range(void *p, int64_t t0, int64_t t1) {
    att_job *j = p;
    const int64_t g = j->g, d = j->d;
    /* m, l (2g), block scores (g * ATT_BLOCK), two sets of K and V tiles (4 * ATT_BLOCK * d) */
    float *buf = scratch(1, (size_t)(2 * g + g * ATT_BLOCK + 4 * ATT_BLOCK * d) * sizeof *buf);
    if (!buf) {
        atomic_store(&j->err, A2N_E_NOMEM);
        return;
    }
    float *m = buf, *l = buf + g;
    att_scratch w = {.sc = buf + 2 * g};
    for (int x = 0; x < 2; x++) {
        w.ktile[x] = w.sc + g * ATT_BLOCK + 2 * x * ATT_BLOCK * d;
        w.vtile[x] = w.ktile[x] + ATT_BLOCK * d;
    }
    for (int64_t task = t0; task < t1; task++) {
        const int64_t sk = task / j->parts, part = task % j->parts, len = j->lens[sk];
        const int64_t per = (len + j->parts - 1) / j->parts;
        const int64_t r0 = part * per < len ? part * per : len, r1 = r0 + per < len ? r0 + per : len;
        if (j->parts > 1) {
            att_rows(j, &w, sk, r0, r1, j->pm + task * g, j->pl + task * g, j->pacc + task * g * d);
            continue;
        }
        float *o = j->out + sk * g * d;
        att_rows(j, &w, sk, r0, r1, m, l, o);
        for (int64_t h = 0; h < g; h++) {
            const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
            for (int64_t i = 0; i < d; i++) o[h * d + i] *= inv;
        }
    }
}

/* combine the partial states of (s, k) */
static void att_combine(void *p, int64_t t0, int64_t t1) {
    att_job *j = p;
    const int64_t g = j->g, d = j->d, P = j->parts;
    for (int64_t sk = t0; sk < t1; sk++)
        for (int64_t h = 0; h < g; h++) {
            float mx = -INFINITY, l = 0.0f;
            for (int64_t pt = 0; pt < P; pt++) mx = j->pm[(sk * P + pt) * g + h] > mx ? j->pm[(sk * P + pt) * g + h] : mx;
            float *o = j->out + (sk * g + h) * d;
            memset(o, 0, (size_t)d * sizeof *o);
            if (mx == -INFINITY) continue;   /* empty selection */
            for (int64_t pt = 0; pt < P; pt++) {
                const int64_t st = (sk * P + pt) * g + h;
                if (j->pm[st] == -INFINITY) continue;
                const float w = expf(j->pm[st] - mx);
                l += w * j->pl[st];
                const float *a = j->pacc + st * d;
                for (int64_t i = 0; i < d; i++) o[i] += w * a[i];
            }
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            for (int64_t i = 0; i < d; i++) o[i] *= inv;
        }
}

int a2n_kv_checks(int64_t S, int64_t G, int64_t d, const void *const *arr, const int64_t *caps) {
    for (int64_t s = 0; s < S; s++) {
        int64_t n;
        if (caps[s] < 0) return A2N_E_ARG;
        if (!a2n_mul4(G, caps[s], d, 2 * sizeof(float), &n)) return A2N_E_SIZE;
        if (caps[s] > 0 && !arr[s]) return A2N_E_ARG;
    }
    return A2N_OK;
}

int a2n_sparse_attention(const float *q, int64_t q_len, int64_t S, int64_t G, int64_t g,
                         int64_t d, const void *const *keys, const void *const *values,
                         const int64_t *caps, int k_type, int v_type, const int64_t *idx,
                         int64_t kmax, const int32_t *lens, float scale, float *out,
                         int64_t out_len, int n_threads) {
    if (S < 0 || G < 0 || g < 1 || d < 1 || kmax < 0) return A2N_E_ARG;
    const int64_t krb = a2n_kv_row_bytes(k_type, d), vrb = a2n_kv_row_bytes(v_type, d);
    if (krb < 0 || vrb < 0) return A2N_E_ARG;
    int64_t nq, ni;
    if (!a2n_mul4(S, G, g, d, &nq) || nq != q_len || nq != out_len || !a2n_mul4(S, G, kmax, 1, &ni))
        return A2N_E_SIZE;
    if (nq == 0) return A2N_OK;
    if (!q || !keys || !values || !caps || !idx || !lens || !out) return A2N_E_ARG;
    int rc = a2n_kv_checks(S, G, d, keys, caps);
    if (rc == A2N_OK) rc = a2n_kv_checks(S, G, d, values, caps);
    if (rc != A2N_OK) return rc;
    int64_t maxlen = 0;
    for (int64_t i = 0; i < S * G; i++) {
        if (lens[i] < 0 || lens[i] > kmax) return A2N_E_SIZE;
        maxlen = lens[i] > maxlen ? lens[i] : maxlen;
    }
    att_job j = {.q = q, .G = G, .g = g, .d = d, .keys = keys, .values = values, .caps = caps,
                 .kt = k_type, .vt = v_type, .krb = krb, .vrb = vrb, .idx = idx, .kmax = kmax,
                 .lens = lens, .scale = scale,
                 .out = out, .parts = 1};
    atomic_init(&j.err, 0);
    a2n_parallel_for(S * G, n_threads, 4, att_check, &j);
    if ((rc = atomic_load(&j.err))) return rc;
    /* few (s, k) pairs for the threads: split long selections, combine after */
    const int64_t want = 2 * (int64_t)(n_threads > 0 ? n_threads : 1);
    if (S * G < want && n_threads > 1) {
        int64_t P = (want + S * G - 1) / (S * G);
        if (P > maxlen / 256) P = maxlen / 256;
        if (P > 1) j.parts = P;
    }
    if (j.parts > 1) {
        const size_t nst = (size_t)(S * G * j.parts * g);
        j.pm = malloc(nst * sizeof(float));
        j.pl = malloc(nst * sizeof(float));
        j.pacc = malloc(nst * (size_t)d * sizeof(float));
        if (!j.pm || !j.pl || !j.pacc) {
            free(j.pm); free(j.pl); free(j.pacc);
            j.parts = 1;   /* no room for the split: unsplit */
            j.pm = j.pl = j.pacc = NULL;
        }
    }
    a2n_parallel_for(S * G * j.parts, n_threads, 1, att_range, &j);
    if (j.parts > 1) a2n_parallel_for(S * G, n_threads, 4, att_combine, &j);
    free(j.pm); free(j.pl); free(j.pacc);
    return atomic_load(&j.err);
}

/* ---- exact scores --------------------------------------------------------- */
#define SC_CHUNK 256

typedef struct {
    const float *q;
    int64_t G, g, d, width, chunks;
    const void *const *keys;
    const int64_t *caps, *lo, *hi;
    int kt;              /* A2N_KV_* type of the keys */
    int64_t rb;          /* their row bytes */
    float *out;
    atomic_int err;
} sc_job;

static void sc_range(void *p, int64_t t0, int64_t t1) {
    sc_job *j = p;
    const int64_t g = j->g, d = j->d, rb = j->rb;
    const int blocks = j->kt != A2N_KV_F32 && j->kt != A2N_KV_F16;   /* decoded row by row */
    float *row = blocks ? scratch(3, (size_t)d * sizeof *row) : NULL;
    if (blocks && !row) {
        atomic_store(&j->err, A2N_E_NOMEM);
        return;
    }
    for (int64_t task = t0; task < t1; task++) {
        const int64_t sk = task / j->chunks, c0 = task % j->chunks * SC_CHUNK;
        const int64_t s = sk / j->G, k = sk % j->G, cap = j->caps[s];
        const int64_t n = j->hi[s] - j->lo[s], c1 = c0 + SC_CHUNK < j->width ? c0 + SC_CHUNK : j->width;
        const char *kb = (const char *)j->keys[s] + (k * cap + j->lo[s]) * rb;
        float *o = j->out + sk * g * j->width;
        const int64_t ce = c1 < n ? c1 : n;
        for (int64_t t = c0; t < ce; t++) {
            const void *kr = kb + t * rb;
            if (blocks) {
                a2n_kv_decode_row(kr, j->kt, d, row);
                kr = row;
            }
            a2n_dots_heads(j->q + sk * g * d, d, g, d, kr, j->kt == A2N_KV_F16, o + t, j->width, 1.0f);
        }
        for (int64_t h = 0; h < g; h++)
            for (int64_t t = ce > c0 ? ce : c0; t < c1; t++) o[h * j->width + t] = -INFINITY;
    }
}

int a2n_exact_scores(const float *q, int64_t q_len, int64_t S, int64_t G, int64_t g, int64_t d,
                     const void *const *keys, const int64_t *caps, int k_type,
                     const int64_t *lo, const int64_t *hi, float *out, int64_t width,
                     int n_threads) {
    if (S < 0 || G < 0 || g < 1 || d < 1 || width < 0) return A2N_E_ARG;
    const int64_t rb = a2n_kv_row_bytes(k_type, d);
    if (rb < 0) return A2N_E_ARG;
    int64_t nq, no;
    if (!a2n_mul4(S, G, g, d, &nq) || nq != q_len || !a2n_mul4(S, G, g, width, &no)) return A2N_E_SIZE;
    if (no == 0) return A2N_OK;
    if (!q || !keys || !caps || !lo || !hi || !out) return A2N_E_ARG;
    int rc = a2n_kv_checks(S, G, d, keys, caps);
    if (rc != A2N_OK) return rc;
    for (int64_t s = 0; s < S; s++) {
        if (lo[s] < 0 || lo[s] > hi[s] || hi[s] > caps[s]) return A2N_E_INDEX;
        if (hi[s] - lo[s] > width) return A2N_E_SIZE;
    }
    sc_job j = {.q = q, .G = G, .g = g, .d = d, .width = width, .chunks = (width + SC_CHUNK - 1) / SC_CHUNK,
                .keys = keys, .caps = caps, .lo = lo, .hi = hi, .kt = k_type, .rb = rb, .out = out};
    atomic_init(&j.err, 0);
    a2n_parallel_for(S * G * j.chunks, n_threads, 1, sc_range, &j);
    return atomic_load(&j.err);
}

/* ---- batched gather of selections ------------------------------------------ */
typedef struct {
    int64_t G, d;
    const void *const *keys, *const *values;
    const int64_t *caps, *idx;
    int64_t kmax;
    const int32_t *lens;
    char *kdst, *vdst;
    int kt, vt, decode;
    int64_t krb, vrb;     /* stored row bytes */
} gs_job;

static void gs_range(void *p, int64_t t0, int64_t t1) {
    const gs_job *j = p;
    for (int64_t task = t0; task < t1; task++) {      /* task = (s * G + k) * 2 + (0: K, 1: V) */
        const int64_t sk = task >> 1, s = sk / j->G, k = sk % j->G, cap = j->caps[s];
        const int v = (int)(task & 1), type = v ? j->vt : j->kt;
        const int64_t rb = v ? j->vrb : j->krb, db = j->decode ? j->d * 4 : rb;
        const char *src = (const char *)(v ? j->values[s] : j->keys[s]) + k * cap * rb;
        char *dst = (v ? j->vdst : j->kdst) + sk * j->kmax * db;
        const int64_t *ix = j->idx + sk * j->kmax;
        for (int32_t i = 0; i < j->lens[sk]; i++) {
            if (j->decode) a2n_kv_decode_row(src + ix[i] * rb, type, j->d, (float *)(dst + i * db));
            else memcpy(dst + i * db, src + ix[i] * rb, (size_t)rb);
        }
    }
}

int a2n_gather_sel(int64_t S, int64_t G, int64_t d, const void *const *keys,
                   const void *const *values, const int64_t *caps, int k_type, int v_type,
                   const int64_t *idx, int64_t kmax, const int32_t *lens, void *kdst,
                   void *vdst, int64_t dst_rows, int decode, int n_threads) {
    if (S < 0 || G < 0 || d < 1 || kmax < 0 || (decode != 0 && decode != 1)) return A2N_E_ARG;
    const int64_t krb = a2n_kv_row_bytes(k_type, d), vrb = a2n_kv_row_bytes(v_type, d);
    if (krb < 0 || vrb < 0) return A2N_E_ARG;
    int64_t nrows;
    if (!a2n_mul4(S, G, kmax, 1, &nrows) || nrows != dst_rows) return A2N_E_SIZE;
    if (nrows == 0) return A2N_OK;
    if (!keys || !values || !caps || !idx || !lens || !kdst || !vdst) return A2N_E_ARG;
    int rc = a2n_kv_checks(S, G, d, keys, caps);
    if (rc == A2N_OK) rc = a2n_kv_checks(S, G, d, values, caps);
    if (rc != A2N_OK) return rc;
    for (int64_t i = 0; i < S * G; i++)
        if (lens[i] < 0 || lens[i] > kmax) return A2N_E_SIZE;
    att_job chk = {.G = G, .caps = caps, .idx = idx, .kmax = kmax, .lens = lens};
    atomic_init(&chk.err, 0);
    a2n_parallel_for(S * G, n_threads, 4, att_check, &chk);
    if ((rc = atomic_load(&chk.err))) return rc;
    gs_job j = {.G = G, .d = d, .keys = keys, .values = values, .caps = caps, .idx = idx,
                .kmax = kmax, .lens = lens, .kdst = kdst, .vdst = vdst, .kt = k_type,
                .vt = v_type, .decode = decode, .krb = krb, .vrb = vrb};
    a2n_parallel_for(S * G * 2, n_threads, 1, gs_range, &j);
    return A2N_OK;
}

/* ---- GPU row cache bookkeeping -------------------------------------------- */
typedef struct {
    int64_t G, kmax;
    const int64_t *idx;
    const int32_t *lens;
    int32_t *const *slot_of, *const *token_at, *const *hand;
    const int64_t *map_caps, *slot_caps;
    int32_t *slots, *miss_slot, *miss_n;
    int64_t *miss_idx;
    atomic_int err;
} rc_job;

static void rc_check(void *p, int64_t t0, int64_t t1) {
    rc_job *j = p;
    for (int64_t task = t0; task < t1; task++) {
        const int64_t s = task / j->G, cap = j->map_caps[s], *ix = j->idx + task * j->kmax;
        int bad = j->lens[task] < 0 || j->lens[task] > j->kmax || j->lens[task] > j->slot_caps[s];
        for (int32_t i = 0; !bad && i < j->lens[task]; i++) bad |= ix[i] < 0 || ix[i] >= cap;
        if (bad) atomic_store(&j->err, A2N_E_INDEX);
    }
}

static void rc_range(void *p, int64_t t0, int64_t t1) {
    rc_job *j = p;
    for (int64_t task = t0; task < t1; task++) {
        const int64_t s = task / j->G, k = task % j->G, C = j->slot_caps[s], mc = j->map_caps[s];
        const int64_t *ix = j->idx + task * j->kmax;
        int32_t *map = j->slot_of[s] + k * mc, *tok = j->token_at[s] + k * C, *hand = j->hand[s] + k;
        int32_t *out = j->slots + task * j->kmax, *mslot = j->miss_slot + task * j->kmax;
        int64_t *mtok = j->miss_idx + task * j->kmax;
        const int32_t n = j->lens[task];
        uint64_t *used = n ? scratch(0, (size_t)(C + 63) / 64 * 8) : NULL;
        if (n && !used) { atomic_store(&j->err, A2N_E_NOMEM); return; }
        if (n) memset(used, 0, (size_t)(C + 63) / 64 * 8);
        for (int32_t i = 0; i < n; i++) {          /* hits keep their slots */
            const int32_t sl = map[ix[i]];
            const int hit = sl >= 0 && sl < C && tok[sl] == ix[i];
            out[i] = hit ? sl : -1;
            if (hit) set_bit(used, sl);
        }
        int32_t m = 0, h = (*hand >= 0 && *hand < C) ? *hand : 0;
        for (int32_t i = 0; i < n; i++) {          /* misses take the next unused slots */
            if (out[i] >= 0) continue;
            const int32_t again = map[ix[i]];      /* a token listed twice: its first miss' slot */
            if (again >= 0 && again < C && tok[again] == ix[i]) { out[i] = again; continue; }
            while (used[h >> 6] >> (h & 63) & 1) h = h + 1 == C ? 0 : h + 1;   /* n <= C: ends */
            const int32_t old = tok[h];
            if (old >= 0 && old < mc && map[old] == h) map[old] = -1;
            tok[h] = (int32_t)ix[i];
            map[ix[i]] = h;
            set_bit(used, h);
            out[i] = h;
            mtok[m] = ix[i];
            mslot[m++] = h;
            h = h + 1 == C ? 0 : h + 1;
        }
        for (int64_t i = n; i < j->kmax; i++) out[i] = -1;
        for (int64_t i = m; i < j->kmax; i++) { mtok[i] = -1; mslot[i] = -1; }
        j->miss_n[task] = m;
        *hand = h;
    }
}

int a2n_rowcache_plan(int64_t S, int64_t G, const int64_t *idx, int64_t kmax, const int32_t *lens,
                      int32_t *const *slot_of, const int64_t *map_caps, int32_t *const *token_at,
                      const int64_t *slot_caps, int32_t *const *hand, int32_t *slots,
                      int64_t *miss_idx, int32_t *miss_slot, int32_t *miss_n, int n_threads) {
    if (S < 0 || G < 0 || kmax < 0) return A2N_E_ARG;
    int64_t n;
    if (!a2n_mul4(S, G, kmax, 1, &n)) return A2N_E_SIZE;
    if (S * G == 0) return A2N_OK;
    if (!idx || !lens || !slot_of || !map_caps || !token_at || !slot_caps || !hand || !slots
        || !miss_idx || !miss_slot || !miss_n) return A2N_E_ARG;
    for (int64_t s = 0; s < S; s++) {
        int64_t x;
        if (map_caps[s] < 0 || map_caps[s] > INT32_MAX || slot_caps[s] < 0
            || slot_caps[s] > INT32_MAX || !a2n_mul4(G, map_caps[s], 1, 1, &x) || !a2n_mul4(G, slot_caps[s], 1, 1, &x))
            return A2N_E_SIZE;
        if ((map_caps[s] && !slot_of[s]) || (slot_caps[s] && !token_at[s]) || !hand[s]) return A2N_E_ARG;
    }
    rc_job j = {.G = G, .kmax = kmax, .idx = idx, .lens = lens, .slot_of = slot_of,
                .token_at = token_at, .hand = hand, .map_caps = map_caps, .slot_caps = slot_caps,
                .slots = slots, .miss_slot = miss_slot, .miss_n = miss_n, .miss_idx = miss_idx};
    atomic_init(&j.err, 0);
    a2n_parallel_for(S * G, n_threads, 4, rc_check, &j);
    int rc = atomic_load(&j.err);
    if (rc) return rc;
    a2n_parallel_for(S * G, n_threads, 4, rc_range, &j);
    return atomic_load(&j.err);
}
