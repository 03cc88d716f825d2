/* Causal (+ sliding window) attention of the dense layers, prefill and decode alike
 * (a2n_attention, see attention.h): flash-attention style, K/V read in place from the cache.
 *
 * Batch invariance is the design constraint. A query row's result must not depend on which
 * rows share its tile, which sequences share the call or how a prompt was chunked, so:
 *  - keys are taken in blocks of AT_KB absolute positions (pos0 + t) and each block updates
 *    the row's online softmax (max, exp, sum, rescale, P @ V) over the row's own keys in it
 *    only; the block's scores may be computed for more keys (other rows of the tile), but a
 *    row reads only its own;
 *  - blocks are grouped in chunks of AT_CHUNK absolute positions: each chunk starts from a
 *    fresh state, chunk states are merged in order. A call with few tiles computes chunks in
 *    parallel and merges them after; a call with many tiles does both in one task: the same
 *    operations either way;
 *  - the inner loops (attention_kernels.c) give each score and each P @ V element one fixed
 *    sequence of operations, whatever micro-kernel (rows x keys) computes it.
 * Tiles of several query rows (times the g heads of a KV head) share each block's K and V
 * (f16 widened, q8_0 / q4_0 blocks decoded, once per key block into a per-thread f32 scratch:
 * the cache is read in place, never copied whole): tiles as big as the threads' share of the
 * call allows, since that widening, the transposition of the keys and the pass over the
 * cache are paid once per tile. Threads take (tile, KV head) tasks one at a time. The
 * portable scalar path has the same structure with scalar inner loops (a2n_use_simd = 0). */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "attention.h"
#include "attention_kernels.h"
#include "internal.h"

#define AT_CHUNK 512                      /* positions per chunk (a multiple of AT_KB) */
#define AT_TILE 256                       /* most score rows (query rows x g heads) per tile */
#define AT_TILE_MIN 32                    /* ... the fewest, unless g is more */
#define AT_SPLIT_BYTES ((size_t)256 << 20) /* most memory for chunk states of a split call */
#define AT_POS_MAX ((int64_t)1 << 60)     /* positions and rows kept far from overflow */

typedef struct {
    int64_t s, r0, nr;    /* sequence, query rows [r0, r0 + nr) */
    int64_t ulo, uhi;     /* union of the rows' spans (ulo == uhi: none) */
    int64_t work;         /* for scheduling: heavy tiles first */
} at_tile;

typedef struct {
    int64_t tile, c;      /* chunk c of a tile: a task of a split call */
} at_entry;

typedef struct at_ws at_ws;

typedef struct at_job {
    const float *q;
    int64_t H, G, g, d;
    const void *const *keys, *const *values;
    const int64_t *ks, *vs, *pos0, *lo, *hi;
    int kt, vt;                /* A2N_KV_* types */
    int64_t kru, vru, keu, veu;   /* units per row, bytes per unit */
    float scale;
    float *out;
    const at_tile *tiles;
    int64_t ntiles, rgmax;
    const at_entry *entries;   /* split calls: every (tile, chunk), tile by tile */
    const int64_t *first;      /* (ntiles + 1): first entry of each tile */
    float *part;               /* (entries, G, rgmax * (d + 2)): their chunk states */
    atomic_int err;
    void (*task)(const struct at_job *, at_ws *, int64_t);   /* the pass run by run_tasks */
    int64_t ntasks;
    _Atomic int64_t next;      /* the next task not taken */
} at_job;

/* the softmax state of a tile's score rows: running max m, sum l, unnormalized output o */
typedef struct {
    float *m, *l, *o;   /* (rg), (rg), (rg, d) */
} at_state;

/* one thread's scratch for a tile */
struct at_ws {
    const float **qp;   /* (rgmax) query row of each score row */
    int64_t *ra, *rb;   /* (rgmax) each row's keys in the block, from the first key any reads */
    float *kb;          /* (d, AT_KB) the block's keys for the scores (a2n_at_qk's scratch) */
    float *vb;          /* (AT_KB, d) the block's values as f32, when V is not f32 */
    float *sc;          /* (rgmax, AT_KB) scores, then weights */
    at_state chunk, run;
};

static int mul_ok(int64_t a, int64_t b, int64_t *r) {
    if (a < 0 || b < 0) return 0;
    return !__builtin_mul_overflow(a, b, r);
}

/* Kept between calls: the pool's workers are persistent, and a fresh malloc per call of a
 * few hundred KB costs page faults. Grown on demand, never shrunk. */
static _Thread_local struct {
    void *p;
    size_t n;
} tls;

static int ws_get(const at_job *j, at_ws *w) {
    const size_t R = (size_t)j->rgmax, d = (size_t)j->d, B = AT_KB;
    const int vw = j->vt != A2N_KV_F32;
    const size_t nf = B * d + (vw ? B * d : 0) + R * B + 2 * R * (d + 2);
    const size_t need = R * (sizeof(float *) + 2 * sizeof(int64_t)) + 64 + nf * sizeof(float);
    if (tls.n < need) {
        free(tls.p);
        tls.p = malloc(need);
        tls.n = tls.p ? need : 0;
        if (!tls.p) return 0;
    }
    char *p = tls.p;
    w->qp = (const float **)p;
    w->ra = (int64_t *)(p + R * sizeof(float *));
    w->rb = w->ra + R;
    float *f = (float *)(((uintptr_t)(w->rb + R) + 63) & ~(uintptr_t)63);
    w->kb = f;                                       /* the block's keys, transposed */
    f += B * d;
    w->vb = vw ? f : NULL;
    f += vw ? B * d : 0;
    w->sc = f;
    f += R * B;
    w->chunk = (at_state){f, f + R, f + 2 * R};
    f += R * (d + 2);
    w->run = (at_state){f, f + R, f + 2 * R};
    return 1;
}

static void state_clear(at_state *st, int64_t rg, int64_t d) {
    for (int64_t r = 0; r < rg; r++) {
        st->m[r] = -INFINITY;
        st->l[r] = 0.0f;
    }
    memset(st->o, 0, (size_t)(rg * d) * sizeof(float));
}

/* ---- one block, one chunk, merging ------------------------------------------------------ */
/* row t of head k of a sequence's K or V: stride, units per row ru and bytes per unit eu */
static const void *kv_row(const void *base, int64_t stride, int64_t ru, int64_t eu, int64_t k, int64_t t) {
    return (const char *)base + (k * stride + t * ru) * eu;
}

/* rows [t0, t1) of head k of a sequence's V as f32: in place, or widened / decoded into buf */
static const float *v_rows(const at_job *j, int64_t s, int64_t k, int64_t t0, int64_t t1, float *buf) {
    const void *p = kv_row(j->values[s], j->vs[s], j->vru, j->veu, k, t0);
    if (j->vt == A2N_KV_F32) return p;
    a2n_at_decode_rows(p, j->vt, t1 - t0, j->d, buf);
    return buf;
}

/* the softmax update of score row r over its weights p[0, nk) (scores in, weights out) */
static void softmax_step(at_state *st, int64_t r, float *p, int64_t nk, int64_t d) {
    const float mx = a2n_at_max(p, nk), mo = st->m[r], mn = mx > mo ? mx : mo;
    const float corr = mo == -INFINITY ? 0.0f : mo == mn ? 1.0f : expf(mo - mn);   /* expf(0) = 1 */
    st->l[r] = st->l[r] * corr + a2n_at_exp_sum(p, nk, mn);
    st->m[r] = mn;
    if (corr != 1.0f) {
        float *o = st->o + r * d;
        for (int64_t e = 0; e < d; e++) o[e] *= corr;
    }
}

/* score row r's weights of keys [a, b) times V (a, b and the rows of vp from the block's first
 * key read) */
static void pv_row(const at_ws *w, at_state *st, int64_t r, const float *vp, int64_t a, int64_t b,
                   int64_t d) {
    if (a < b) a2n_at_pv1(st->o + r * d, w->sc + r * AT_KB + a, vp + a * d, b - a, d);
}

/* keys [t0, t1) (one block) of head k for the tile's rg score rows into st */
static void block_step(const at_job *j, at_ws *w, const at_tile *tl, int64_t k, int64_t t0, int64_t t1,
                       at_state *st) {
    const int64_t g = j->g, d = j->d, rg = tl->nr * g;
    int64_t bl = t1, bh = t0;                        /* keys any row reads */
    for (int64_t r = 0; r < rg; r++) {
        const int64_t i = tl->r0 + r / g;
        const int64_t a = j->lo[i] > t0 ? j->lo[i] : t0, b = j->hi[i] < t1 ? j->hi[i] : t1;
        w->ra[r] = a;
        w->rb[r] = b;
        if (a < b) {
            bl = a < bl ? a : bl;
            bh = b > bh ? b : bh;
        }
    }
    if (bl >= bh) return;
    for (int64_t r = 0; r < rg; r++) {               /* from here on relative to key bl */
        w->ra[r] -= bl;
        w->rb[r] -= bl;
    }
    const int64_t s = tl->s;
    a2n_at_qk(w->qp, rg, kv_row(j->keys[s], j->ks[s], j->kru, j->keu, k, bl), j->kt, bh - bl, d, j->scale,
              w->sc, w->kb);
    const float *vp = v_rows(j, s, k, bl, bh, w->vb);   /* from key bl */
    for (int64_t r = 0; r < rg; r++)
        if (w->ra[r] < w->rb[r]) softmax_step(st, r, w->sc + r * AT_KB + w->ra[r], w->rb[r] - w->ra[r], d);
    /* P @ V, keys in ascending order for every row: AT_PV_ROWS rows at a time over the keys
     * all of them read, each row's other keys alone (before and after) */
    for (int64_t r = 0, nr; r < rg; r += nr) {
        nr = a2n_at_group(rg - r);
        int64_t ca = 0, cb = AT_KB;
        for (int x = 0; x < nr; x++) {
            ca = w->ra[r + x] > ca ? w->ra[r + x] : ca;
            cb = w->rb[r + x] < cb ? w->rb[r + x] : cb;
        }
        if (ca >= cb) {                              /* nothing in common: one by one */
            for (int x = 0; x < nr; x++) pv_row(w, st, r + x, vp, w->ra[r + x], w->rb[r + x], d);
            continue;
        }
        float *o[AT_PV_ROWS];
        const float *p[AT_PV_ROWS];
        for (int x = 0; x < nr; x++) {
            o[x] = st->o + (r + x) * d;
            p[x] = w->sc + (r + x) * AT_KB + ca;
            pv_row(w, st, r + x, vp, w->ra[r + x], ca, d);
        }
        a2n_at_pv(o, p, nr, vp + ca * d, cb - ca, d);
        for (int x = 0; x < nr; x++) pv_row(w, st, r + x, vp, cb, w->rb[r + x], d);
    }
}

/* the state of chunk c alone (fresh, then its blocks in order) */
static void chunk_state(const at_job *j, at_ws *w, const at_tile *tl, int64_t k, int64_t c, at_state *st) {
    const int64_t p0 = j->pos0[tl->s];
    state_clear(st, tl->nr * j->g, j->d);
    const int64_t c_lo = c * AT_CHUNK - p0, c_hi = c_lo + AT_CHUNK;
    const int64_t t_hi = c_hi < tl->uhi ? c_hi : tl->uhi;
    for (int64_t t0 = c_lo > tl->ulo ? c_lo : tl->ulo; t0 < t_hi;) {
        const int64_t b_end = (p0 + t0) / AT_KB * AT_KB + AT_KB - p0;   /* the block's end */
        const int64_t t1 = b_end < t_hi ? b_end : t_hi;
        block_step(j, w, tl, k, t0, t1, st);
        t0 = t1;
    }
}

/* run = run (+) chunk state c, for rg rows */
static void merge(at_state *run, const at_state *c, int64_t rg, int64_t d) {
    for (int64_t r = 0; r < rg; r++) {
        if (c->m[r] == -INFINITY) continue;          /* no keys of this row in the chunk */
        float *o = run->o + r * d;
        const float *oc = c->o + r * d;
        if (run->m[r] == -INFINITY) {
            run->m[r] = c->m[r];
            run->l[r] = c->l[r];
            memcpy(o, oc, (size_t)d * sizeof *o);
            continue;
        }
        const float mn = run->m[r] > c->m[r] ? run->m[r] : c->m[r];
        const float a = expf(run->m[r] - mn), b = expf(c->m[r] - mn);
        run->m[r] = mn;
        run->l[r] = run->l[r] * a + c->l[r] * b;
        for (int64_t e = 0; e < d; e++) o[e] = o[e] * a + oc[e] * b;
    }
}

static void chunk_range(const at_job *j, const at_tile *tl, int64_t *c0, int64_t *c1) {
    const int64_t p0 = j->pos0[tl->s];
    *c0 = (p0 + tl->ulo) / AT_CHUNK;
    *c1 = tl->ulo < tl->uhi ? (p0 + tl->uhi - 1) / AT_CHUNK + 1 : *c0;
}

static void tile_begin(const at_job *j, at_ws *w, const at_tile *tl, int64_t k) {
    const int64_t g = j->g;
    for (int64_t r = 0; r < tl->nr * g; r++)
        w->qp[r] = j->q + ((tl->r0 + r / g) * j->H + k * g + r % g) * j->d;
}

/* out = o / l of each score row (zeros for a row without keys) */
static void tile_finish(const at_job *j, const at_tile *tl, int64_t k, const at_state *run) {
    const int64_t g = j->g, d = j->d;
    for (int64_t r = 0; r < tl->nr * g; r++) {
        float *out = j->out + ((tl->r0 + r / g) * j->H + k * g + r % g) * d;
        const float *o = run->o + r * d;
        if (run->m[r] == -INFINITY) {
            memset(out, 0, (size_t)d * sizeof *out);
            continue;
        }
        const float l = run->l[r];
        for (int64_t e = 0; e < d; e++) out[e] = o[e] / l;
    }
}

static at_state part_state(const at_job *j, int64_t e, int64_t k) {
    float *f = j->part + (e * j->G + k) * j->rgmax * (j->d + 2);
    return (at_state){f, f + j->rgmax, f + 2 * j->rgmax};
}

/* ---- tasks -------------------------------------------------------------------------------- */
/* task = (KV head, tile), head-major (the tiles of a head share its K and V in the cache;
 * heaviest first): every chunk of the tile, merged as it goes */
static void task_tile(const at_job *j, at_ws *w, int64_t task) {
    const at_tile *tl = j->tiles + task % j->ntiles;
    const int64_t k = task / j->ntiles, rg = tl->nr * j->g;
    tile_begin(j, w, tl, k);
    state_clear(&w->run, rg, j->d);
    int64_t c0, c1;
    chunk_range(j, tl, &c0, &c1);
    for (int64_t c = c0; c < c1; c++) {
        chunk_state(j, w, tl, k, c, &w->chunk);
        merge(&w->run, &w->chunk, rg, j->d);
    }
    tile_finish(j, tl, k, &w->run);
}

/* split calls, pass 1: task = (entry, KV head), its chunk state into part */
static void task_chunk(const at_job *j, at_ws *w, int64_t task) {
    const at_entry *en = j->entries + task / j->G;
    const at_tile *tl = j->tiles + en->tile;
    const int64_t k = task % j->G;
    at_state st = part_state(j, task / j->G, k);
    tile_begin(j, w, tl, k);
    chunk_state(j, w, tl, k, en->c, &st);
}

/* split calls, pass 2: task = (tile, KV head), its chunks merged in order */
static void task_merge(const at_job *j, at_ws *w, int64_t task) {
    const int64_t t = task / j->G, k = task % j->G;
    const at_tile *tl = j->tiles + t;
    const int64_t rg = tl->nr * j->g;
    state_clear(&w->run, rg, j->d);
    for (int64_t e = j->first[t]; e < j->first[t + 1]; e++) {
        const at_state st = part_state(j, e, k);
        merge(&w->run, &st, rg, j->d);
    }
    tile_finish(j, tl, k, &w->run);
}

/* a pool thread: takes tasks one at a time until none is left. Tasks are few and heavy
 * (a tile over every key of its span): taking them singly keeps the threads finishing
 * together, whichever of them the machine's other work slows down. */
static void run_tasks(void *p, int64_t i0, int64_t i1) {
    (void)i0, (void)i1;
    at_job *j = p;
    at_ws w;
    if (!ws_get(j, &w)) {
        atomic_store(&j->err, A2N_E_NOMEM);
        return;
    }
    for (int64_t t; (t = atomic_fetch_add(&j->next, 1)) < j->ntasks;) j->task(j, &w, t);
}

static void run_pass(at_job *j, void (*task)(const at_job *, at_ws *, int64_t), int64_t ntasks, int n_threads) {
    j->task = task;
    j->ntasks = ntasks;
    atomic_store(&j->next, 0);
    const int64_t nth = n_threads < ntasks ? n_threads : ntasks;
    a2n_parallel_for(nth, (int)nth, 1, run_tasks, j);
}

/* ---- entry point -------------------------------------------------------------------------- */
static int64_t unit_bytes(int type) {
    return type == A2N_KV_F32 ? 4 : type == A2N_KV_F16 ? 2 : 1;
}

static int cmp_work(const void *a, const void *b) {
    const int64_t x = ((const at_tile *)a)->work, y = ((const at_tile *)b)->work;
    return (x < y) - (x > y);   /* descending */
}

static int check_seqs(int64_t S, int64_t G, int64_t ru, const void *const *keys, const int64_t *ks,
                      const void *const *values, const int64_t *vs, const int64_t *rows, const int64_t *pos0) {
    for (int64_t s = 0; s < S; s++) {
        int64_t a, b;
        if (rows[s] < 0 || rows[s] > AT_POS_MAX || pos0[s] < 0 || pos0[s] > AT_POS_MAX) return A2N_E_ARG;
        if (ks[s] < 0 || vs[s] < 0) return A2N_E_ARG;
        /* the last unit read, (G - 1) * stride + rows * (units per row), must be addressable */
        if (!mul_ok(G - 1, ks[s] > vs[s] ? ks[s] : vs[s], &a) || !mul_ok(rows[s], ru, &b) ||
            a > INT64_MAX / 8 - b)
            return A2N_E_SIZE;
        if (rows[s] > 0 && (!keys[s] || !values[s])) return A2N_E_ARG;
    }
    return A2N_OK;
}

/* tiles: runs of up to R consecutive rows of one sequence whose spans overlap */
static int64_t make_tiles(int64_t n, int64_t R, int64_t g, const int64_t *seq, const int64_t *lo,
                          const int64_t *hi, at_tile *tiles, int64_t *rgmax) {
    int64_t nt = 0;
    at_tile *cur = NULL;
    for (int64_t i = 0; i < n; i++) {
        const int empty = lo[i] >= hi[i];
        const int joins = cur && cur->s == seq[i] && cur->nr < R &&
                          (empty || cur->ulo >= cur->uhi || (lo[i] <= cur->uhi && hi[i] >= cur->ulo));
        if (!joins) {
            cur = tiles + nt++;
            *cur = (at_tile){.s = seq[i], .r0 = i, .nr = 0, .ulo = 0, .uhi = 0};
        }
        cur->nr++;
        if (!empty) {
            if (cur->ulo >= cur->uhi) {
                cur->ulo = lo[i];
                cur->uhi = hi[i];
            } else {
                cur->ulo = lo[i] < cur->ulo ? lo[i] : cur->ulo;
                cur->uhi = hi[i] > cur->uhi ? hi[i] : cur->uhi;
            }
        }
    }
    *rgmax = 0;
    for (int64_t t = 0; t < nt; t++) {
        tiles[t].work = tiles[t].nr * g * (tiles[t].uhi - tiles[t].ulo + AT_KB);
        *rgmax = tiles[t].nr * g > *rgmax ? tiles[t].nr * g : *rgmax;
    }
    return nt;
}

int a2n_attention(const float *q, int64_t q_len, int64_t n, int64_t H, int64_t G, int64_t d,
                  int64_t S, const void *const *keys, const int64_t *k_stride, int k_type,
                  const void *const *values, const int64_t *v_stride, int v_type,
                  const int64_t *rows, const int64_t *pos0, const int64_t *seq,
                  const int64_t *lo, const int64_t *hi, float scale, float *out, int64_t out_len,
                  int n_threads) {
    if (n < 0 || H < 1 || G < 1 || H % G || d < 1 || S < 0) return A2N_E_ARG;
    const int64_t kru = a2n_kv_row_units(k_type, d), vru = a2n_kv_row_units(v_type, d);
    if (kru < 0 || vru < 0) return A2N_E_ARG;   /* an unknown type, or d not whole blocks */
    int64_t nh, nq;
    if (!mul_ok(n, H, &nh) || !mul_ok(nh, d, &nq) || nq != q_len || nq != out_len) return A2N_E_SIZE;
    if (n == 0) return A2N_OK;
    if (!q || !out || !seq || !lo || !hi) return A2N_E_ARG;
    if (S == 0) return A2N_E_INDEX;   /* rows but no sequence for them */
    if (!keys || !values || !k_stride || !v_stride || !rows || !pos0) return A2N_E_ARG;
    int rc = check_seqs(S, G, kru > vru ? kru : vru, keys, k_stride, values, v_stride, rows, pos0);
    if (rc != A2N_OK) return rc;
    for (int64_t i = 0; i < n; i++) {
        if (seq[i] < 0 || seq[i] >= S) return A2N_E_INDEX;
        if (lo[i] < 0 || lo[i] > hi[i] || hi[i] > rows[seq[i]]) return A2N_E_INDEX;
    }
    /* query rows per tile: the K / V blocks a tile widens serve more rows in a bigger tile,
     * but a call of few rows wants tiles enough for the threads (4 tasks each) */
    const int64_t g = H / G, nth = n_threads > 1 ? n_threads : 1;
    int64_t R = (n * G + 4 * nth - 1) / (4 * nth);
    R = R < AT_TILE_MIN / g ? AT_TILE_MIN / g : R;
    R = R > AT_TILE / g ? AT_TILE / g : R;
    R = R < 1 ? 1 : R;
    at_tile *tiles = malloc((size_t)n * sizeof *tiles);
    if (!tiles) return A2N_E_NOMEM;
    at_job j = {.q = q, .H = H, .G = G, .g = g, .d = d, .keys = keys, .values = values, .ks = k_stride,
                .vs = v_stride, .pos0 = pos0, .lo = lo, .hi = hi, .kt = k_type, .vt = v_type,
                .kru = kru, .vru = vru, .keu = unit_bytes(k_type), .veu = unit_bytes(v_type),
                .scale = scale, .out = out, .tiles = tiles};
    j.ntiles = make_tiles(n, R, g, seq, lo, hi, tiles, &j.rgmax);
    qsort(tiles, (size_t)j.ntiles, sizeof *tiles, cmp_work);
    atomic_init(&j.err, 0);
    /* few tiles for the threads (decode of few sequences): their chunks in parallel */
    int64_t nent = 0;
    for (int64_t t = 0; t < j.ntiles; t++) {
        int64_t c0, c1;
        chunk_range(&j, tiles + t, &c0, &c1);
        nent += c1 - c0;
    }
    at_entry *entries = NULL;
    int64_t *first = NULL;
    float *part = NULL;
    if (nth > 1 && j.ntiles * G < 2 * nth && nent > j.ntiles &&
        (size_t)nent * (size_t)G * (size_t)j.rgmax * (size_t)(d + 2) * sizeof(float) <= AT_SPLIT_BYTES) {
        entries = malloc((size_t)nent * sizeof *entries);
        first = malloc((size_t)(j.ntiles + 1) * sizeof *first);
        part = malloc((size_t)nent * (size_t)G * (size_t)j.rgmax * (size_t)(d + 2) * sizeof(float));
        if (!entries || !first || !part) {   /* no room: unsplit, the same arithmetic */
            free(entries); free(first); free(part);
            entries = NULL;
        }
    }
    if (entries) {
        int64_t e = 0;
        for (int64_t t = 0; t < j.ntiles; t++) {
            int64_t c0, c1;
            chunk_range(&j, tiles + t, &c0, &c1);
            first[t] = e;
            for (int64_t c = c0; c < c1; c++) entries[e++] = (at_entry){t, c};
        }
        first[j.ntiles] = e;
        j.entries = entries;
        j.first = first;
        j.part = part;
        run_pass(&j, task_chunk, nent * G, (int)nth);
        if (!atomic_load(&j.err)) run_pass(&j, task_merge, j.ntiles * G, (int)nth);
        free(entries); free(first); free(part);
    } else {
        run_pass(&j, task_tile, j.ntiles * G, (int)nth);
    }
    free(tiles);
    return atomic_load(&j.err);
}
