/* The dot products the retrieval kernels share (query heads against stored key rows, f32 or
 * f16: the LUT, the exact re-rank, sparse attention, exact scores), the prefetch of scattered
 * rows and the checks of per-sequence host-store arrays and of selections. */
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

/* the 4 heads q[0..3] (qs floats apart) against rows a and b (d % 8 == 0): the 8 dots as
 * (a.q0, a.q1, a.q2, a.q3, b.q0, .., b.q3); two rows share every q load, and the 8
 * accumulators keep the FMA unit busy through its latency */
static inline __m256 dots4x2(const float *q, int64_t qs, int64_t d, const void *a, const void *b, int f16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t i = 0; i < d; i += 8) {
        const __m256 ka = a2n_load8(a, i, f16), kb = a2n_load8(b, i, f16);
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

void a2n_prefetch_rows(const char *base, const int64_t *ix, int64_t n, int64_t row_bytes) {
    for (int64_t r = 0; r < n; r++) {
        const char *row = base + ix[r] * row_bytes;
        for (int64_t o = 0; o < row_bytes; o += 64) __builtin_prefetch(row + o, 0, 3);
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

typedef struct {
    int64_t G, kmax;
    const int64_t *caps, *idx;
    const int32_t *lens;
    atomic_int err;
} ix_job;

static void ix_range(void *p, int64_t t0, int64_t t1) {
    ix_job *j = p;
    for (int64_t task = t0; task < t1; task++) {
        const int64_t cap = j->caps[task / j->G], *ix = j->idx + task * j->kmax;
        int bad = 0;
        for (int32_t i = 0; i < j->lens[task]; i++) bad |= ix[i] < 0 || ix[i] >= cap;
        if (bad) atomic_store(&j->err, A2N_E_INDEX);
    }
}

int a2n_sel_index_check(int64_t S, int64_t G, const int64_t *caps, const int64_t *idx, int64_t kmax,
                        const int32_t *lens, int n_threads) {
    ix_job j = {.G = G, .kmax = kmax, .caps = caps, .idx = idx, .lens = lens};
    atomic_init(&j.err, 0);
    a2n_parallel_for(S * G, n_threads, 4, ix_range, &j);
    return atomic_load(&j.err);
}
