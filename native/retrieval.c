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

/* keys of n candidates of one head (codes cm[m][t], LUT L (M, C)) and the histogram of their top bits */
static void score_chunk(const float *L, const uint16_t *const *cm, int64_t M, int64_t C, int64_t n,
                        uint32_t *key, uint32_t *hist) {
    int64_t t = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        const __m256i sign = _mm256_set1_epi32((int)0x80000000u);
        const __m256 zero = _mm256_setzero_ps();
        for (; t + 8 <= n; t += 8) {
            __m256i c = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(cm[0] + t)));
            __m256 v = _mm256_i32gather_ps(L, c, 4);
            for (int64_t m = 1; m < M; m++) {
                c = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(cm[m] + t)));
                v = _mm256_add_ps(v, _mm256_i32gather_ps(L + m * C, c, 4));
            }
            v = _mm256_add_ps(v, zero);
            const __m256i b = _mm256_castps_si256(v);
            const __m256i k = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), sign));
            _mm256_storeu_si256((__m256i *)(key + t), k);
            for (int i = 0; i < 8; i++) hist[key[t + i] >> (32 - A2N_HBITS)]++;
        }
    }
#endif
    for (; t < n; t++) {
        float v = L[cm[0][t]];
        for (int64_t m = 1; m < M; m++) v += L[m * C + cm[m][t]];
        key[t] = a2n_score_key(v);
        hist[key[t] >> (32 - A2N_HBITS)]++;
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

/* highest bucket b with count(> b) < need <= count(>= b); *above = count(> b) */
static int find_bucket(const uint32_t *hist, int size, int64_t need, int64_t *above) {
    int64_t acc = 0;
    int b = size - 1;
    for (; b > 0; b--) {
        if (acc + hist[b] >= need) break;
        acc += hist[b];
    }
    *above = acc;
    return b;
}

/* mark in bits the top-K of key[0..n) (n > K), ties to the smaller position;
 * hist holds the histogram of the top A2N_HBITS bits; list is n int32 of scratch */
void a2n_radix_pick(const uint32_t *key, int64_t n, int64_t K, uint32_t *hist, int32_t *list,
                       uint64_t *bits) {
    int64_t above;
    const uint32_t b1 = (uint32_t)find_bucket(hist, A2N_HSIZE, K, &above);
    int64_t need = K - above, nl = 0;
    int64_t t = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        const __m256i thr = _mm256_set1_epi32((int)b1 - 1);
        for (; t + 8 <= n; t += 8) {
            const __m256i h = _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(key + t)), 32 - A2N_HBITS);
            if (!_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(h, thr)))) continue;
            for (int64_t i = t; i < t + 8; i++) {
                const uint32_t hb = key[i] >> (32 - A2N_HBITS);
                if (hb > b1) set_bit(bits, i);
                else if (hb == b1) list[nl++] = (int32_t)i;
            }
        }
    }
#endif
    for (; t < n; t++) {
        const uint32_t hb = key[t] >> (32 - A2N_HBITS);
        if (hb > b1) set_bit(bits, t);
        else if (hb == b1) list[nl++] = (int32_t)t;
    }
    /* refine the threshold bucket on the next 11 bits, then the last 10 */
    static const int shifts[2] = {32 - 2 * A2N_HBITS, 0};
    static const uint32_t masks[2] = {A2N_HSIZE - 1, (1u << (32 - 2 * A2N_HBITS)) - 1};
    for (int lv = 0; lv < 2 && need < nl; lv++) {
        memset(hist, 0, A2N_HSIZE * sizeof *hist);
        for (int64_t i = 0; i < nl; i++) hist[(key[list[i]] >> shifts[lv]) & masks[lv]]++;
        const uint32_t b = (uint32_t)find_bucket(hist, (int)masks[lv] + 1, need, &above);
        int64_t kept = 0;
        for (int64_t i = 0; i < nl; i++) {   /* in place, position order kept */
            const uint32_t v = (key[list[i]] >> shifts[lv]) & masks[lv];
            if (v > b) set_bit(bits, list[i]);
            else if (v == b) list[kept++] = list[i];
        }
        nl = kept;
        need -= above;
    }
    /* equal keys (or the whole bucket): the first `need` in position order */
    for (int64_t i = 0; i < need && i < nl; i++) set_bit(bits, list[i]);
}

static void sel_range(void *p, int64_t t0, int64_t t1) {
    sel_job *j = p;
    uint32_t *key = NULL, *hist = NULL;
    int32_t *list = NULL;
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
            key = scratch(0, ((size_t)(2 * j->nmax) + A2N_HSIZE) * 4);
            if (!key) {
                atomic_store(&j->err, A2N_E_NOMEM);
                break;
            }
            hist = key + j->nmax;
            list = (int32_t *)(hist + A2N_HSIZE);
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
        /* one head at a time: its keys (4n bytes) stay in L2 between the two passes */
        uint64_t *bits = j->bits + task * j->words;
        for (int64_t h = 0; h < j->g; h++) {
            memset(hist, 0, A2N_HSIZE * sizeof *hist);
            score_chunk(L + h * j->M * j->C, cmp, j->M, j->C, n, key, hist);
            a2n_radix_pick(key, n, j->K, hist, list, bits);
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
#ifndef PF_AHEAD
#define PF_AHEAD 64    /* rows prefetched ahead */
#endif

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

/* scratch of one worker: f32 tiles of a block of rows not stored as f32, block scores */
typedef struct {
    float *ktile, *vtile;
    float *sc;   /* (g, ATT_BLOCK) */
} att_scratch;

/* rows [r0, r1) of the selection of (s, k) for its g heads: running max m,
 * sum l and unnormalized acc (g, d). One pass: each block of ATT_BLOCK rows is
 * scored, folded into the online softmax and accumulated while the next
 * block's rows are being prefetched. */
static void att_rows(const att_job *j, const att_scratch *w, int64_t sk, int64_t r0, int64_t r1,
                     float *m, float *l, float *acc) {
    const int64_t s = sk / j->G, k = sk % j->G, g = j->g, d = j->d, cap = j->caps[s];
    const int64_t krb = j->krb, vrb = j->vrb;
    const char *kb = (const char *)j->keys[s] + k * cap * krb;
    const char *vb = (const char *)j->values[s] + k * cap * vrb;
    const int64_t *ix = j->idx + sk * j->kmax;
    const float *q = j->q + sk * g * d;
    const float *krow[ATT_BLOCK], *vrow[ATT_BLOCK];
    for (int64_t h = 0; h < g; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    memset(acc, 0, (size_t)(g * d) * sizeof *acc);
    /* prefetch PF_AHEAD rows ahead of the one being read (random rows of a large store) */
    int64_t pf_end = r0 + PF_AHEAD < r1 ? r0 + PF_AHEAD : r1;
    a2n_prefetch_rows(kb, ix + r0, pf_end - r0, krb);
    a2n_prefetch_rows(vb, ix + r0, pf_end - r0, vrb);
    for (int64_t b0 = r0; b0 < r1; b0 += ATT_BLOCK) {
        const int64_t nb = r1 - b0 < ATT_BLOCK ? r1 - b0 : ATT_BLOCK;
        const int64_t want = b0 + nb + PF_AHEAD < r1 ? b0 + nb + PF_AHEAD : r1;
        if (want > pf_end) {
            a2n_prefetch_rows(kb, ix + pf_end, want - pf_end, krb);
            a2n_prefetch_rows(vb, ix + pf_end, want - pf_end, vrb);
            pf_end = want;
        }
        for (int64_t r = 0; r < nb; r++) {
            const int64_t t = ix[b0 + r];
            if (j->kt == A2N_KV_F32) krow[r] = (const float *)(kb + t * krb);
            else {
                a2n_kv_decode_row(kb + t * krb, j->kt, d, w->ktile + r * d);
                krow[r] = w->ktile + r * d;
            }
            if (j->vt == A2N_KV_F32) vrow[r] = (const float *)(vb + t * vrb);
            else {
                a2n_kv_decode_row(vb + t * vrb, j->vt, d, w->vtile + r * d);
                vrow[r] = w->vtile + r * d;
            }
            a2n_dots_heads(q, d, g, d, krow[r], 0, w->sc + r, ATT_BLOCK, j->scale);
        }
        for (int64_t h = 0; h < g; h++) {
            float *ps = w->sc + h * ATT_BLOCK, mx = ps[0];
            for (int64_t r = 1; r < nb; r++) mx = ps[r] > mx ? ps[r] : mx;
            const float mo = m[h], mn = mx > mo ? mx : mo;
            const float corr = mo == -INFINITY ? 0.0f : expf(mo - mn);
            m[h] = mn;
            exp_sub(ps, nb, mn);
            float sum = 0.0f;
            for (int64_t r = 0; r < nb; r++) sum += ps[r];
            l[h] = l[h] * corr + sum;
            acc_rows(acc + h * d, corr, ps, vrow, nb, d);
        }
    }
}

static void att_range(void *p, int64_t t0, int64_t t1) {
    att_job *j = p;
    const int64_t g = j->g, d = j->d;
    /* m, l (2g), block scores (g * ATT_BLOCK), decoded tiles (2 * ATT_BLOCK * d) */
    const int tiles = j->kt != A2N_KV_F32 || j->vt != A2N_KV_F32;
    float *buf = scratch(1, (size_t)(2 * g + g * ATT_BLOCK + (tiles ? 2 * ATT_BLOCK * d : 0)) * sizeof *buf);
    if (!buf) {
        atomic_store(&j->err, A2N_E_NOMEM);
        return;
    }
    float *m = buf, *l = buf + g;
    att_scratch w = {.sc = buf + 2 * g};
    if (tiles) {
        w.ktile = w.sc + g * ATT_BLOCK;
        w.vtile = w.ktile + ATT_BLOCK * d;
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
