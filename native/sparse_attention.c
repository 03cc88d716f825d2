/* Sparse attention of decode queries over the rows a selection picked in a host store,
 * fused with the row gather (online softmax, no gathered copy of the store): each block of
 * rows is fetched into a thread's tiles while the previous block computes. Host store rows
 * are f32, f16 or ggml's q8_0 / q4_0 blocks (K and V may differ); f32 and f16 rows are read
 * as stored, blocks decoded as they are fetched. Work is spread over (sequence, KV head)
 * pairs (split further when there are fewer pairs than threads) on the persistent pool of
 * ops.c; every index is checked before anything is written. */
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

/* per-thread attention state and tiles (sel_common.h) */
static _Thread_local a2n_scratch att_tls;

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
        const __m256 v0 = a2n_load8(rows[r], off, f16), v1 = a2n_load8(rows[r], off + 8, f16);
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
    float *buf = a2n_scratch_get(&att_tls, (size_t)(2 * g + g * ATT_BLOCK + 4 * ATT_BLOCK * d) * sizeof *buf);
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
    if ((rc = a2n_sel_index_check(S, G, caps, idx, kmax, lens, n_threads))) return rc;
    atomic_init(&j.err, 0);
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
