/* Exact re-rank of A2ATS selections in one call per layer: the candidates a code selection
 * picked (a2n_select_topk / a2n_fs_select with r x K) are scored with the real q . k over
 * their stored keys (read in place from the host store, prefetched ahead: f32, f16, or ggml's
 * q8_0 / q4_0 blocks decoded one candidate row at a time into the thread's scratch), each
 * query head keeps its top-K (topk.c; ties to the smaller position) and the g heads' picks
 * are united. Work is split over the (sequence, KV head) pairs on the persistent pool of
 * ops.c. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "attention.h"
#include "internal.h"
#include "retrieval.h"
#include "sel_common.h"

#define RR_AHEAD 16   /* rows prefetched ahead of the ones being scored */
#define RR_CHUNK 8    /* rows scored together (a2n_dots_rows) */

/* per-thread scratch (sel_common.h), slot 0: one (s, k)'s candidates,
 * scores, keys, histogram, list, bitmap; 1: the calling thread's pick bitmaps */
static _Thread_local a2n_scratch rr_tls[2];

static void *rr_scratch(int slot, size_t bytes) { return a2n_scratch_get(&rr_tls[slot], bytes); }

typedef struct {
    const float *q;
    int64_t G, g, d;
    const void *const *keys;
    const int64_t *caps, *T;
    int kt;               /* A2N_KV_* type of the keys */
    int64_t rb;           /* their row bytes */
    const int64_t *idx_in;
    int64_t kmax_in;
    const int32_t *lens_in;
    int64_t sinks, window, K, nmax, words;
    uint64_t *bits;       /* (S*G, words) picks of each (s, k), relative to lo */
    int64_t *ncand;       /* (S*G) candidates in [lo, hi) */
    int64_t *idx;
    int64_t kmax;
    int32_t *lens;
    atomic_int err;
} rr_job;

static void rr_range(void *p, int64_t t0, int64_t t1) {
    rr_job *j = p;
    const int64_t g = j->g, d = j->d, row_bytes = j->rb, nm = j->nmax;
    const int blocks = j->kt != A2N_KV_F32 && j->kt != A2N_KV_F16;
    /* candidates (nm int64), bitmap over them, scores (g, nm) f32, keys (nm) u32, histogram,
     * list (nm) i32, a decoded key row (d f32): the 8-byte arrays first */
    const size_t o_bits = (size_t)nm * 8, o_sc = o_bits + (size_t)(nm + 63) / 64 * 8;
    const size_t o_key = o_sc + (size_t)(g * nm) * 4, o_hist = o_key + (size_t)nm * 4;
    const size_t o_list = o_hist + A2N_HSIZE * 4, o_row = o_list + (size_t)nm * 4;
    const size_t need = o_row + (size_t)d * 4;
    char *buf = NULL;
    for (int64_t task = t0; task < t1; task++) {
        const int64_t s = task / j->G, k = task % j->G;
        int64_t lo, hi;
        a2n_sel_bounds(j->T[s], j->sinks, j->window, &lo, &hi);
        const int64_t *in = j->idx_in + task * j->kmax_in;
        uint64_t *bits = j->bits + task * j->words;
        if (!buf && !(buf = rr_scratch(0, need))) {
            atomic_store(&j->err, A2N_E_NOMEM);
            return;
        }
        int64_t *cand = (int64_t *)buf, n = 0;
        for (int32_t i = 0; i < j->lens_in[task]; i++)
            if (in[i] >= lo && in[i] < hi) cand[n++] = in[i];
        j->ncand[task] = n;
        if (n <= j->K) {               /* every candidate stays */
            for (int64_t i = 0; i < n; i++) set_bit(bits, cand[i] - lo);
            continue;
        }
        uint64_t *cbits = (uint64_t *)(buf + o_bits);
        float *sc = (float *)(buf + o_sc);
        uint32_t *key = (uint32_t *)(buf + o_key), *hist = (uint32_t *)(buf + o_hist);
        int32_t *list = (int32_t *)(buf + o_list);
        float *row = (float *)(buf + o_row);
        const char *kb = (const char *)j->keys[s] + k * j->caps[s] * row_bytes;
        const float *q = j->q + task * g * d;
        /* a third or more of a head's rows are candidates: read in place, prefetched ahead */
        a2n_prefetch_rows(kb, cand, n < RR_AHEAD ? n : RR_AHEAD, row_bytes);
        for (int64_t i = 0; i < n; i += RR_CHUNK) {
            const int64_t nb = n - i < RR_CHUNK ? n - i : RR_CHUNK;
            const int64_t pf = i + RR_AHEAD + nb < n ? nb : n - i - RR_AHEAD;
            if (pf > 0) a2n_prefetch_rows(kb, cand + i + RR_AHEAD, pf, row_bytes);
            if (blocks) {      /* decoded one row at a time */
                for (int64_t r = 0; r < nb; r++) {
                    a2n_kv_decode_row(kb + cand[i + r] * row_bytes, j->kt, d, row);
                    a2n_dots_heads(q, d, g, d, row, 0, sc + i + r, nm, 1.0f);
                }
                continue;
            }
            const void *rows[RR_CHUNK];
            for (int64_t r = 0; r < nb; r++) rows[r] = kb + cand[i + r] * row_bytes;
            a2n_dots_rows(q, d, g, d, rows, nb, j->kt == A2N_KV_F16, sc + i, nm, 1.0f);
        }
        /* each head's top-K among the candidates (in position order: ties to the smaller) */
        memset(cbits, 0, (size_t)(n + 63) / 64 * 8);
        for (int64_t h = 0; h < g; h++) a2n_topk_f32(sc + h * nm, n, j->K, key, hist, list, cbits);
        for (int64_t w = 0; w < (n + 63) / 64; w++)
            for (uint64_t b = cbits[w]; b; b &= b - 1) set_bit(bits, cand[w * 64 + __builtin_ctzll(b)] - lo);
    }
}

static void rr_write(void *p, int64_t t0, int64_t t1) {
    rr_job *j = p;
    for (int64_t task = t0; task < t1; task++)
        a2n_sel_emit_task(task, j->G, j->T, j->sinks, j->window, j->bits, j->words, NULL, j->idx,
                          j->kmax, j->lens);
}

int a2n_rerank(const float *q, int64_t q_len, int64_t S, int64_t G, int64_t g, int64_t d,
               const void *const *keys, const int64_t *caps, int k_type, const int64_t *idx_in,
               int64_t kmax_in, const int32_t *lens_in, const int64_t *T, int64_t sinks,
               int64_t window, int64_t K, int64_t *idx, int64_t kmax, int32_t *lens,
               int64_t *ncand, int n_threads) {
    if (S < 0 || G < 0 || g < 1 || d < 1 || kmax_in < 0 || kmax < 0 || sinks < 0 || window < 0 ||
        K < 1)
        return A2N_E_ARG;
    const int64_t rb = a2n_kv_row_bytes(k_type, d);
    if (rb < 0) return A2N_E_ARG;
    int64_t nq, x;
    if (!a2n_mul4(S, G, g, d, &nq) || nq != q_len || !a2n_mul4(S, G, kmax_in, 1, &x) ||
        !a2n_mul4(S, G, kmax, 1, &x))
        return A2N_E_SIZE;
    if (S * G == 0) return A2N_OK;
    if (!q || !keys || !caps || !idx_in || !lens_in || !T || !idx || !lens || !ncand) return A2N_E_ARG;
    int rc = a2n_kv_checks(S, G, d, keys, caps);
    if (rc != A2N_OK) return rc;
    rr_job j = {.q = q, .G = G, .g = g, .d = d, .keys = keys, .caps = caps, .T = T, .kt = k_type, .rb = rb,
                .idx_in = idx_in, .kmax_in = kmax_in, .lens_in = lens_in, .sinks = sinks,
                .window = window, .K = K, .idx = idx, .kmax = kmax, .lens = lens, .ncand = ncand};
    int64_t Kg;
    if (!a2n_mul4(K, g, 1, 1, &Kg)) Kg = INT64_MAX;
    int64_t span = 0;
    for (int64_t s = 0; s < S; s++) {
        if (T[s] < 0 || T[s] > caps[s] || T[s] > INT32_MAX) return A2N_E_INDEX;
        int64_t lo, hi;
        a2n_sel_bounds(T[s], sinks, window, &lo, &hi);
        for (int64_t k = 0; k < G; k++) {
            const int32_t n = lens_in[s * G + k];
            if (n < 0 || n > kmax_in) return A2N_E_SIZE;
            const int64_t keep = n < Kg ? n : Kg;   /* picks <= min(candidates, g K) */
            if (lo + (hi - lo < keep ? hi - lo : keep) + (T[s] - hi) > kmax) return A2N_E_SIZE;
            if (n > j.nmax) j.nmax = n;
        }
        if (hi - lo > span) span = hi - lo;
    }
    j.words = (span + 63) / 64;
    const size_t nbits = (size_t)(S * G * j.words);
    j.bits = rr_scratch(1, (nbits ? nbits : 1) * sizeof *j.bits);
    if (!j.bits) return A2N_E_NOMEM;
    memset(j.bits, 0, nbits * sizeof *j.bits);
    atomic_init(&j.err, 0);
    a2n_parallel_for(S * G, n_threads, 1, rr_range, &j);
    if ((rc = atomic_load(&j.err))) return rc;
    a2n_parallel_for(S * G, n_threads, 8, rr_write, &j);
    return A2N_OK;
}
