/* y (n_vec, n_out) = x (n_vec, n_in) @ W^T, W in GGUF blocks: every product of
 * the CPU backend, one vector or thousands.
 *
 * Two paths, each batch-invariant by construction (a vector's output bits do
 * not depend on the other vectors of the call, on the thread count or on the
 * tiling):
 *  - int8 (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K): W repacked once into groups of
 *    8 interleaved rows (repack.c), x quantized to int8 records once per step
 *    (a2n_quantize_act, shared by every product that reads the same x), and
 *    a kernel per (up to 4 vectors, 8 rows) over all of n_in (gemm_avx2.c,
 *    gemm_ref.c). Threads take chunks of row groups; within a chunk the
 *    vectors go 4 at a time over every group of the chunk, so the chunk's
 *    weights stay in L2 while the vectors stream (with more than 8 vectors
 *    the chunk's quants are unpacked to bytes once, in a per-thread scratch
 *    buffer). Relative error ~1e-3..1e-2 from the activation quantization,
 *    as llama.cpp.
 *  - float (F32, F16, BF16, Q4_1, Q5_1, Q2_K, Q3_K): x stays float32; a row
 *    piece is decoded to an L1 scratch buffer and dotted with every vector,
 *    each vector with its own fixed set of partial sums. */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"

#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

/* ---- int8 path ------------------------------------------------------------ */
#define PK_CHUNK_BYTES (192 << 10)   /* weights per chunk when many vectors: L2 resident */

#define PK_MAX_W 8                   /* weights multiplied by the same records in one call */

typedef struct {
    a2n_gemm_fn fn;
    a2n_expand_fn expand;   /* non-NULL: unpack each group once per chunk (many vectors) */
    const uint8_t *wp;
    int64_t group_bytes, ex_bytes, nb, n_out, groups, gpc, chunk0;   /* chunk0: its first chunk of the job */
    float *y;
} pk_weight;

#define PK_MAX_SLOTS 64              /* threads of one call (the pool's most) */

typedef struct {
    _Alignas(64) atomic_int_fast64_t next;   /* a cache line each: threads take chunks apart */
    int64_t end;
} pk_slot;

typedef struct {
    int nw, nslots;
    pk_weight w[PK_MAX_W];
    int64_t n_in, stride, n_vec;
    const uint8_t *act;
    pk_slot *slot;   /* nslots: chunks [next, end) of each thread's share */
} pk_job;

#define SCRATCH_KEEP (16 << 20)   /* largest scratch buffer a thread keeps between calls */

/* A scratch buffer of at least n bytes for the calling thread (slot 0: a call's activation
 * records, 1: a chunk's unpacked quants), kept for its next calls up to SCRATCH_KEEP:
 * fresh buffers of prefill size would be new mappings every call (page faults, and TLB
 * shootdowns across the threads when freed). A larger one is the caller's to free
 * (*own). NULL when out of memory. */
static uint8_t *scratch(int slot, size_t n, uint8_t **own) {
    static _Thread_local uint8_t *buf[2];
    static _Thread_local size_t cap[2];
    *own = NULL;
    n = (n + 4095) / 4096 * 4096;
    if (n > SCRATCH_KEEP) return *own = aligned_alloc(64, n);
    if (n > cap[slot]) {
        free(buf[slot]);
        buf[slot] = aligned_alloc(64, n);
        cap[slot] = buf[slot] ? n : 0;
    }
    return buf[slot];
}

/* Chunk c of the job: a run of row groups of one weight, times every vector, 4 at a time. */
static void pk_chunk(const pk_job *j, int64_t c) {
    int i = 0;
    while (i + 1 < j->nw && c >= j->w[i + 1].chunk0) i++;
    const pk_weight *w = &j->w[i];
    const int64_t g0 = (c - w->chunk0) * w->gpc, g1 = g0 + w->gpc < w->groups ? g0 + w->gpc : w->groups;
    uint8_t *own = NULL, *ex = w->expand ? scratch(1, (size_t)((g1 - g0) * w->ex_bytes), &own) : NULL;
    for (int64_t g = g0; ex && g < g1; g++) w->expand(w->wp + g * w->group_bytes, w->nb, ex + (g - g0) * w->ex_bytes);
    for (int64_t a0 = 0; a0 < j->n_vec; a0 += A2N_GEMM_NA) {
        const int na = (int)(j->n_vec - a0 < A2N_GEMM_NA ? j->n_vec - a0 : A2N_GEMM_NA);
        for (int64_t g = g0; g < g1; g++) {
            const int nvalid = (int)(w->n_out - 8 * g < 8 ? w->n_out - 8 * g : 8);
            w->fn(w->wp + g * w->group_bytes, w->nb, ex ? ex + (g - g0) * w->ex_bytes : NULL,
                  j->act + a0 * j->stride, j->stride, j->n_in, na, w->y + a0 * w->n_out + 8 * g, w->n_out, nvalid);
        }
    }
    free(own);   /* (an allocation failure leaves ex NULL: the kernels unpack, same bits) */
}

/* Slot s: its own run of chunks first, then what is left of the others'. The pool hands the
 * slots out in order and its caller takes the first, so a thread tends to get the same
 * slot, hence the same weights, call after call: products that fit the cores' L2 caches
 * are read from there instead of from the other core's; a thread that starts late
 * leaves its chunks to the others. */
static void pk_slots(void *p, int64_t s0, int64_t s1) {
    pk_job *j = p;
    for (int64_t s = s0; s < s1; s++)
        for (int k = 0; k < j->nslots; k++) {
            pk_slot *sl = &j->slot[(s + k) % j->nslots];
            for (int64_t c; (c = atomic_fetch_add(&sl->next, 1)) < sl->end;) pk_chunk(j, c);
        }
}

static a2n_gemm_fn gemm_for(int type) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) return a2n_gemm_avx2_for(type);
#endif
    return a2n_gemm_ref_for(type);
}

/* Unpacking a group once pays when at least 3 tiles of vectors read it. */
static a2n_expand_fn expand_for(int type, int64_t n_vec) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd && n_vec > 2 * A2N_GEMM_NA) return a2n_expand_avx2_for(type);
#endif
    (void)type;
    (void)n_vec;
    return NULL;
}

int a2n_matmul_packed_n(int n_w, const int *types, const void *const *wps, const int64_t *wp_nbytes,
                        const int64_t *n_outs, int64_t n_in, const void *act, int64_t act_nbytes, int64_t n_vec,
                        float *const *ys, int n_threads) {
    if (n_w < 1 || n_w > PK_MAX_W || !types || !wps || !wp_nbytes || !n_outs || !ys || !act || n_vec <= 0)
        return A2N_E_ARG;
    pk_slot slots[PK_MAX_SLOTS];   /* (only the first nslots are set) */
    pk_job j = {.nw = n_w, .n_in = n_in, .n_vec = n_vec, .act = act, .slot = slots};
    if (n_threads < 1) n_threads = 1;
    int64_t chunks = 0, reads = 0;
    for (int i = 0; i < n_w; i++) {
        const a2n_pack_type *p = a2n_pack_find(types[i]);
        if (!p) return A2N_E_TYPE;
        if (!wps[i] || !ys[i]) return A2N_E_ARG;
        const int64_t need = a2n_repack_nbytes(types[i], n_outs[i], n_in);
        if (need < 0) return (int)need;
        const int64_t need_act = a2n_act_nbytes(p->kind, n_vec, n_in);
        if (need_act < 0) return (int)need_act;
        if (wp_nbytes[i] != need || act_nbytes != need_act) return A2N_E_SIZE;   /* one kind for all */
        pk_weight *w = &j.w[i];
        w->fn = gemm_for(types[i]);
        w->expand = expand_for(types[i], n_vec);
        w->wp = wps[i];
        w->n_out = n_outs[i];
        w->y = ys[i];
        w->nb = n_in / p->block;
        w->group_bytes = w->nb * p->blk_bytes;
        w->ex_bytes = n_in * A2N_PACK_ROWS;   /* a byte per quant */
        w->groups = (n_outs[i] + 7) / 8;
        /* ~4 chunks per thread for balance; with many vectors a chunk's weights also fit L2 */
        w->gpc = (w->groups + 4 * n_threads - 1) / (4 * n_threads);
        if (n_vec > A2N_GEMM_NA && w->gpc * w->group_bytes > PK_CHUNK_BYTES) w->gpc = PK_CHUNK_BYTES / w->group_bytes;
        if (w->gpc < 1) w->gpc = 1;
        w->chunk0 = chunks;
        chunks += (w->groups + w->gpc - 1) / w->gpc;
        reads += need * ((n_vec + A2N_GEMM_NA - 1) / A2N_GEMM_NA);
        j.stride = a2n_act_stride(p->kind, n_in);
    }
    /* a thread is worth waking for ~64 KB of weight reads */
    if (reads < (64 << 10)) n_threads = 1;
    j.nslots = (int)(n_threads < chunks ? (n_threads < PK_MAX_SLOTS ? n_threads : PK_MAX_SLOTS) : chunks);
    for (int s = 0; s < j.nslots; s++) {
        atomic_init(&j.slot[s].next, chunks * s / j.nslots);
        j.slot[s].end = chunks * (s + 1) / j.nslots;
    }
    return a2n_parallel_for(j.nslots, j.nslots, 1, pk_slots, &j);
}

int a2n_matmul_packed(int ggml_type, const void *wp, int64_t wp_nbytes, int64_t n_out, int64_t n_in,
                      const void *act, int64_t act_nbytes, int64_t n_vec, float *y, int n_threads) {
    return a2n_matmul_packed_n(1, &ggml_type, &wp, &wp_nbytes, &n_out, n_in, act, act_nbytes, n_vec, &y, n_threads);
}

int a2n_matmul_packed_f32(int ggml_type, const void *wp, int64_t wp_nbytes, int64_t n_out, int64_t n_in,
                          const float *x, int64_t n_vec, float *y, int n_threads) {
    const a2n_pack_type *p = a2n_pack_find(ggml_type);
    if (!p) return A2N_E_TYPE;
    if (!x) return A2N_E_ARG;
    const int64_t act_bytes = a2n_act_nbytes(p->kind, n_vec, n_in);
    if (act_bytes < 0) return (int)act_bytes;
    uint8_t *own, *act = scratch(0, (size_t)act_bytes, &own);
    if (!act) return A2N_E_NOMEM;
    int rc = a2n_quantize_act(p->kind, x, n_vec, n_in, act, act_bytes, n_threads);
    if (rc == A2N_OK) rc = a2n_matmul_packed(ggml_type, wp, wp_nbytes, n_out, n_in, act, act_bytes, n_vec, y, n_threads);
    free(own);
    return rc;
}

/* raw weights: repacked into a scratch copy for this call */
static int matmul_int8(const a2n_pack_type *p, const void *w, int64_t w_nbytes, int64_t n_out, int64_t n_in,
                       const float *x, int64_t n_vec, float *y, int n_threads) {
    const int64_t wp_bytes = a2n_repack_nbytes(p->type, n_out, n_in);
    if (wp_bytes < 0) return (int)wp_bytes;
    uint8_t *wp = aligned_alloc(64, (size_t)(wp_bytes + 63) / 64 * 64);
    if (!wp) return A2N_E_NOMEM;
    int rc = a2n_repack(p->type, w, w_nbytes, n_out, n_in, wp, wp_bytes, n_threads);
    if (rc == A2N_OK) rc = a2n_matmul_packed_f32(p->type, wp, wp_bytes, n_out, n_in, x, n_vec, y, n_threads);
    free(wp);
    return rc;
}

/* ---- float path ----------------------------------------------------------- */
#define MM_CHUNK 1024   /* weights decoded at once: 4 KB of floats */
#define MM_VECS 16      /* vectors per pass over a decoded piece */

typedef struct {
    const a2n_type *t;
    const uint8_t *w;
    int64_t n_out, n_in, row_bytes, n_vec;
    const float *x;   /* (n_vec, ldx): a padded copy of the caller's x */
    int64_t ldx;
    float *y;
} mm_job;

#if A2N_HAVE_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* acc[4v..4v+3] += w . x_v over n (a multiple of 8), NV (1..2) vectors with 4
 * chains each: a vector's chains are the same whatever NV */
static inline __attribute__((always_inline)) void dot_avx(const float *w, int64_t n, const float *x,
                                                          int64_t ldx, __m256 *acc, const int NV) {
    __m256 a[8];
    for (int i = 0; i < 4 * NV; i++) a[i] = acc[i];
    int64_t k = 0;
    for (; k + 32 <= n; k += 32)
        for (int u = 0; u < 4; u++) {
            const __m256 wv = _mm256_loadu_ps(w + k + 8 * u);
            for (int v = 0; v < NV; v++)
                a[4 * v + u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + v * ldx + k + 8 * u), a[4 * v + u]);
        }
    for (; k + 8 <= n; k += 8) {
        const __m256 wv = _mm256_loadu_ps(w + k);
        for (int v = 0; v < NV; v++) a[4 * v] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + v * ldx + k), a[4 * v]);
    }
    for (int i = 0; i < 4 * NV; i++) acc[i] = a[i];
}

static void mm_row_avx(const mm_job *j, const uint8_t *row, const float *x, int nv, float *buf, float *out) {
    __m256 acc[4 * MM_VECS];
    float tail[MM_VECS] = {0};
    for (int i = 0; i < 4 * nv; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c0 = 0; c0 < j->n_in; c0 += MM_CHUNK) {
        const int64_t nc = j->n_in - c0 < MM_CHUNK ? j->n_in - c0 : MM_CHUNK;
        a2n_decode(j->t, row + c0 / j->t->block * j->t->bytes, nc / j->t->block, buf);
        const int64_t n8 = nc & ~(int64_t)7;
        int v = 0;
        for (; v + 2 <= nv; v += 2) dot_avx(buf, n8, x + v * j->ldx + c0, j->ldx, acc + 4 * v, 2);
        if (v < nv) dot_avx(buf, n8, x + v * j->ldx + c0, j->ldx, acc + 4 * v, 1);
        for (int64_t k = n8; k < nc; k++)   /* unblocked types: n_in % 8 leftovers */
            for (int u = 0; u < nv; u++) tail[u] += buf[k] * x[u * j->ldx + c0 + k];
    }
    for (int v = 0; v < nv; v++) {
        const __m256 *a = acc + 4 * v;
        out[v] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]))) + tail[v];
    }
}
#endif

/* portable: 8 partial sums per vector, which the compiler vectorizes */
static void mm_row_scalar(const mm_job *j, const uint8_t *row, const float *x, int nv, float *buf, float *out) {
    float acc[MM_VECS][8];
    memset(acc, 0, sizeof acc);
    float tail[MM_VECS] = {0};
    for (int64_t c0 = 0; c0 < j->n_in; c0 += MM_CHUNK) {
        const int64_t nc = j->n_in - c0 < MM_CHUNK ? j->n_in - c0 : MM_CHUNK;
        a2n_decode(j->t, row + c0 / j->t->block * j->t->bytes, nc / j->t->block, buf);
        const int64_t n8 = nc & ~(int64_t)7;
        for (int v = 0; v < nv; v++) {
            const float *xv = x + v * j->ldx + c0;
            for (int64_t k = 0; k < n8; k += 8)
                for (int l = 0; l < 8; l++) acc[v][l] += buf[k + l] * xv[k + l];
            for (int64_t k = n8; k < nc; k++) tail[v] += buf[k] * xv[k];
        }
    }
    for (int v = 0; v < nv; v++)
        out[v] = ((acc[v][0] + acc[v][1]) + (acc[v][2] + acc[v][3])) +
                 ((acc[v][4] + acc[v][5]) + (acc[v][6] + acc[v][7])) + tail[v];
}

static void mm_range(void *p, int64_t r0, int64_t r1) {
    const mm_job *j = p;
    float buf[MM_CHUNK] __attribute__((aligned(32)));
    float sums[MM_VECS];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = j->w + r * j->row_bytes;
        for (int64_t v0 = 0; v0 < j->n_vec; v0 += MM_VECS) {
            const int nv = (int)(j->n_vec - v0 < MM_VECS ? j->n_vec - v0 : MM_VECS);
            const float *x = j->x + v0 * j->ldx;
#if A2N_HAVE_AVX2
            if (a2n_use_simd)
                mm_row_avx(j, row, x, nv, buf, sums);
            else
#endif
                mm_row_scalar(j, row, x, nv, buf, sums);
            for (int v = 0; v < nv; v++) j->y[(v0 + v) * j->n_out + r] = sums[v];
        }
    }
}

static int matmul_float(const a2n_type *t, const void *w, int64_t n_out, int64_t n_in, int64_t row_bytes,
                        const float *x, int64_t n_vec, float *y, int n_threads) {
    /* x is copied with a 128-byte pad per vector: power-of-two strides (n_in =
     * 2048, 4096) would put every vector's loads in the same L1 set */
    const int64_t ldx = (n_in + 31) / 32 * 32 + 32;
    float *xp = aligned_alloc(64, (size_t)(n_vec * ldx * sizeof(float) + 63) / 64 * 64);
    if (!xp) return A2N_E_NOMEM;
    for (int64_t v = 0; v < n_vec; v++) memcpy(xp + v * ldx, x + v * n_in, (size_t)n_in * sizeof(float));
    mm_job j = {t, w, n_out, n_in, row_bytes, n_vec, xp, ldx, y};
    /* a thread is worth waking for >= ~32 KB of weights */
    const int rc = a2n_parallel_for(n_out, n_threads, (32 << 10) / row_bytes + 1, mm_range, &j);
    free(xp);
    return rc;
}

int a2n_matmul_q(int ggml_type, const void *w, int64_t w_nbytes, int64_t n_out, int64_t n_in, const float *x,
                 int64_t n_vec, float *y, int n_threads) {
    const a2n_type *t = a2n_find_type(ggml_type);
    if (!t) return A2N_E_TYPE;
    if (!w || !x || !y || n_out <= 0 || n_in <= 0 || n_vec <= 0) return A2N_E_ARG;
    if (n_in % t->block) return A2N_E_SIZE;
    const int64_t row_bytes = n_in / t->block * t->bytes;
    if (n_out > INT64_MAX / row_bytes || row_bytes * n_out != w_nbytes) return A2N_E_SIZE;
    const a2n_pack_type *p = a2n_pack_find(ggml_type);
    if (p) return matmul_int8(p, w, w_nbytes, n_out, n_in, x, n_vec, y, n_threads);
    return matmul_float(t, w, n_out, n_in, row_bytes, x, n_vec, y, n_threads);
}
