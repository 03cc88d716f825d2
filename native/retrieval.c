/* A2ATS retrieval kernels: query-centroid lookup tables, exact scores of key ranges, the
 * batched gather of selected rows and the GPU row cache's bookkeeping. Host store rows are f32, f16 or ggml's q8_0 / q4_0
 * blocks, read in place; a row that is not f32 or f16 is decoded into a thread's scratch as
 * it is read. Work is spread over (sequence, KV head) pairs on the persistent pool of ops.c;
 * every size and index is checked before anything is written. The top-K selection by LUT
 * scores is select.c's, that of 4-bit codes by quantized LUTs (fast-scan) fastscan.c's, the exact re-rank rerank.c's, sparse
 * attention sparse_attention.c's, the shared dot products dots.c's. */
#include <math.h>
#include <stdatomic.h>
#include <string.h>
#include "a2ats_native.h"
#include "attention.h"
#include "internal.h"
#include "retrieval.h"
#include "sel_common.h"

/* Per-thread scratch (sel_common.h), slot 0: the row cache's bitmap, 1: a decoded key row of
 * the exact scores. */
static _Thread_local a2n_scratch tls_scratch[2];

static void *scratch(int slot, size_t bytes) { return a2n_scratch_get(&tls_scratch[slot], bytes); }

/* ---- LUT ------------------------------------------------------------------ */
typedef struct {
    const float *q, *cent;
    float *lut;
    int64_t G, g, d, M, C, dsub;
} lut_job;

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
    float *row = blocks ? scratch(1, (size_t)d * sizeof *row) : NULL;
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
    if ((rc = a2n_sel_index_check(S, G, caps, idx, kmax, lens, n_threads))) return rc;
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
