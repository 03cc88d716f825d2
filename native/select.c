/* A2ATS selection by LUT scores of product codes (uint16 per subspace): a candidate's score
 * for each query head of a GQA group is the sum over subspaces of its codes' LUT entries; each
 * head keeps its top-K (topk.c: exact, ties to the smaller position) and the group's picks are
 * united. Work is spread over (sequence, KV head) pairs on the persistent pool of ops.c; every
 * code is checked against the LUT size before any is looked up. The LUTs are built by
 * retrieval.c; the 4-bit fast-scan selection is fastscan.c's. */
#include <stdatomic.h>
#include <stdlib.h>
#include "a2ats_native.h"
#include "internal.h"
#include "retrieval.h"
#include "sel_common.h"
#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

/* per-thread scratch (sel_common.h), slot 0: keys, histogram, list, the 4 heads' scores, the
 * interleaved LUT; 1: the calling thread's pick bitmaps */
static _Thread_local a2n_scratch sel_tls[2];

static void *scratch(int slot, size_t bytes) { return a2n_scratch_get(&sel_tls[slot], bytes); }

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

#if A2N_HAVE_AVX2
/* score_chunk for 4 heads at once (LUT rows L + h * M * C, h < 4) into sc + h * ld: the 4
 * heads' entries of each centroid interleaved first (L4 (M, C, 4)), so a token's term of
 * subspace m is one 16-byte load for the 4 heads instead of 4 gathered lanes; each head's sum
 * runs in subspace order, as score_chunk's (the same floats) */
static void score_chunk4(const float *L, float *L4, const uint16_t *const *cm, int64_t M, int64_t C,
                         int64_t n, float *sc, int64_t ld) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t c = 0; c < C; c++)
            for (int h = 0; h < 4; h++) L4[(m * C + c) * 4 + h] = L[(h * M + m) * C + c];
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        __m128 r[8];
        for (int x = 0; x < 8; x++) r[x] = _mm_loadu_ps(L4 + (int64_t)cm[0][t + x] * 4);
        for (int64_t m = 1; m < M; m++) {
            const float *Lm = L4 + m * C * 4;
            const uint16_t *c = cm[m] + t;
            for (int x = 0; x < 8; x++) r[x] = _mm_add_ps(r[x], _mm_loadu_ps(Lm + (int64_t)c[x] * 4));
        }
        /* (token, head) -> (head, token): a 4 x 4 transpose in each 128-bit half */
        const __m256 a0 = _mm256_set_m128(r[4], r[0]), a1 = _mm256_set_m128(r[5], r[1]);
        const __m256 a2 = _mm256_set_m128(r[6], r[2]), a3 = _mm256_set_m128(r[7], r[3]);
        const __m256 u0 = _mm256_unpacklo_ps(a0, a1), u1 = _mm256_unpackhi_ps(a0, a1);
        const __m256 u2 = _mm256_unpacklo_ps(a2, a3), u3 = _mm256_unpackhi_ps(a2, a3);
        _mm256_storeu_ps(sc + t, _mm256_shuffle_ps(u0, u2, 0x44));
        _mm256_storeu_ps(sc + ld + t, _mm256_shuffle_ps(u0, u2, 0xEE));
        _mm256_storeu_ps(sc + 2 * ld + t, _mm256_shuffle_ps(u1, u3, 0x44));
        _mm256_storeu_ps(sc + 3 * ld + t, _mm256_shuffle_ps(u1, u3, 0xEE));
    }
    for (; t < n; t++)
        for (int h = 0; h < 4; h++) {
            float v = L4[(int64_t)cm[0][t] * 4 + h];
            for (int64_t m = 1; m < M; m++) v += L4[(m * C + cm[m][t]) * 4 + h];
            sc[h * ld + t] = v;
        }
}
#endif

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
    float *sc = NULL, *L4 = NULL;
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
        if (!key) {   /* keys, histogram, list, 4 heads' scores, the interleaved LUT (M, C, 4) */
            key = scratch(0, ((size_t)(6 * j->nmax) + A2N_HSIZE + (size_t)(j->M * j->C * 4)) * 4);
            if (!key) {
                atomic_store(&j->err, A2N_E_NOMEM);
                break;
            }
            hist = key + j->nmax;
            list = (int32_t *)(hist + A2N_HSIZE);
            sc = (float *)(list + j->nmax);
            L4 = sc + 4 * j->nmax;
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
        /* four heads per pass over the codes where the SIMD path can, then one at a time */
        uint64_t *bits = j->bits + task * j->words;
        int64_t h = 0;
#if A2N_HAVE_AVX2
        for (; a2n_use_simd && h + 4 <= j->g; h += 4) {
            score_chunk4(L + h * j->M * j->C, L4, cmp, j->M, j->C, n, sc, j->nmax);
            for (int x = 0; x < 4; x++) a2n_topk_f32(sc + x * j->nmax, n, j->K, key, hist, list, bits);
        }
#endif
        for (; h < j->g; h++) {
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
    if (!(j.bits = a2n_sel_bitmaps(&sel_tls[1], S * G, j.nmax, &j.words, &j.npick)))
        return A2N_E_NOMEM;
    atomic_init(&j.err, 0);
    a2n_parallel_for(S * G, n_threads, 1, sel_range, &j);
    int rc = atomic_load(&j.err);
    if (rc == A2N_OK) a2n_parallel_for(S * G, n_threads, 8, sel_write, &j);
    return rc;
}
