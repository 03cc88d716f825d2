/* y (n_vec, n_out) = x (n_vec, n_in) @ W^T, W in GGUF blocks: the decode product.
 *
 * Threads take chunks of output rows. Every weight byte is read from memory
 * once per call whatever n_vec. Two paths:
 *  - integer (default with the AVX2 kernels, for Q4_0, Q5_0, Q8_0, Q4_K, Q5_K,
 *    Q6_K): like llama.cpp, x is quantized to int8 once per call (blocks of 32
 *    for the 32-blocked types, of 256 with per-16/32 sums for the K types, see
 *    a2n_q8act) and each weight block is multiplied in integer SIMD
 *    (quants_avx2.c), up to 8 vectors per pass over a row. Relative error
 *    ~1e-3..1e-2 from the activation quantization, as llama.cpp.
 *  - float: x stays float32 (relative error ~1e-6): the other types, the
 *    portable build, a2n_simd(0), and A2ATS_MATMUL=f32 in the environment (read
 *    once; the baseline of bench/bench_matmul.py). The types above have fused
 *    AVX2 kernels that decode 32 weights into registers and multiply them with
 *    up to 8 vectors at once; the others decode a row piece to an L1 scratch
 *    buffer and take dot products from there. */
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"

#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

#define MM_CHUNK 1024   /* weights decoded at once: 4 KB of floats */
#define MM_VECS 16      /* vectors multiplied per pass over a row */
#define MM_ACC 4        /* partial sums per vector (independent FMA chains) */

typedef struct {
    const a2n_type *t;
    const uint8_t *w;
    int64_t n_out, n_in, row_bytes, n_vec;
    const float *x;         /* (n_vec, ldx): a padded copy of the caller's x */
    int64_t ldx;
    const float *xsum;      /* (n_vec, ldx / 32) sums of x per 32-group, when n_in % 32 == 0 */
    float *y;
} mm_job;

#if A2N_HAVE_AVX2
/* acc[v*MM_ACC + u] += w . x_v over n (a multiple of 8) with NV*U independent
 * chains: U per vector keeps the FMA pipes busy when NV is small. */
static inline __attribute__((always_inline)) void dot_avx(const float *w, int64_t n, const float *x,
                                                          int64_t ldx, __m256 *acc, const int NV,
                                                          const int U) {
    __m256 a[8 * MM_ACC];
    for (int v = 0; v < NV; v++)
        for (int u = 0; u < U; u++) a[v * U + u] = acc[v * MM_ACC + u];
    int64_t k = 0;
    for (; k + 8 * U <= n; k += 8 * U)
        for (int u = 0; u < U; u++) {
            const __m256 wv = _mm256_loadu_ps(w + k + 8 * u);
            for (int v = 0; v < NV; v++)
                a[v * U + u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + v * ldx + k + 8 * u), a[v * U + u]);
        }
    for (; k + 8 <= n; k += 8) {
        const __m256 wv = _mm256_loadu_ps(w + k);
        for (int v = 0; v < NV; v++) a[v * U] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + v * ldx + k), a[v * U]);
    }
    for (int v = 0; v < NV; v++)
        for (int u = 0; u < U; u++) acc[v * MM_ACC + u] = a[v * U + u];
}

/* up to 8 vectors per call (16 accumulators fit the 16 ymm registers) */
static void dot_group_avx(const float *w, int64_t n, const float *x, int64_t ldx, __m256 *acc, int nv) {
    switch (nv) {
    case 1: dot_avx(w, n, x, ldx, acc, 1, 4); break;
    case 2: dot_avx(w, n, x, ldx, acc, 2, 2); break;
    case 3: dot_avx(w, n, x, ldx, acc, 3, 2); break;
    case 4: dot_avx(w, n, x, ldx, acc, 4, 1); break;
    case 5: dot_avx(w, n, x, ldx, acc, 5, 1); break;
    case 6: dot_avx(w, n, x, ldx, acc, 6, 1); break;
    case 7: dot_avx(w, n, x, ldx, acc, 7, 1); break;
    default: dot_avx(w, n, x, ldx, acc, 8, 1); break;
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void mm_row_avx(const mm_job *j, const uint8_t *row, const float *x, int nv, float *buf,
                       float *out /* nv sums */) {
    const a2n_type *t = j->t;
    __m256 acc[MM_VECS * MM_ACC];
    float tail[MM_VECS] = {0};
    for (int i = 0; i < nv * MM_ACC; i++) acc[i] = _mm256_setzero_ps();
    for (int64_t c0 = 0; c0 < j->n_in; c0 += MM_CHUNK) {
        const int64_t nc = j->n_in - c0 < MM_CHUNK ? j->n_in - c0 : MM_CHUNK;
        a2n_decode(t, row + c0 / t->block * t->bytes, nc / t->block, buf);
        const int64_t n8 = nc & ~(int64_t)7;
        for (int v0 = 0; v0 < nv; v0 += 8)
            dot_group_avx(buf, n8, x + v0 * j->ldx + c0, j->ldx, acc + v0 * MM_ACC,
                          nv - v0 < 8 ? nv - v0 : 8);
        for (int64_t k = n8; k < nc; k++)      /* unblocked types: n_in % 8 leftovers */
            for (int v = 0; v < nv; v++) tail[v] += buf[k] * x[v * j->ldx + c0 + k];
    }
    for (int v = 0; v < nv; v++) {
        const __m256 *a = acc + v * MM_ACC;
        out[v] = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]))) + tail[v];
    }
}
#endif

/* portable: 8 partial sums per vector, which the compiler vectorizes */
static void mm_row_scalar(const mm_job *j, const uint8_t *row, const float *x, int nv, float *buf,
                          float *out) {
    const a2n_type *t = j->t;
    float acc[MM_VECS][8];
    memset(acc, 0, sizeof acc);
    float tail[MM_VECS] = {0};
    for (int64_t c0 = 0; c0 < j->n_in; c0 += MM_CHUNK) {
        const int64_t nc = j->n_in - c0 < MM_CHUNK ? j->n_in - c0 : MM_CHUNK;
        a2n_decode(t, row + c0 / t->block * t->bytes, nc / t->block, buf);
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

#if A2N_HAVE_AVX2
/* ---- fused kernels for the types of Q4_K_M / Q8_0 files ---------------- *
 * A group of 32 weights is decoded straight into 4 registers of unscaled
 * quants q, never stored, and the scale is applied per group, not per weight:
 * s_v = sum q*x_v (two short FMA chains), acc_v += d * s_v, and the min of
 * Q4_K/Q5_K as m * sum(x_v) from precomputed group sums of x. (Scaling the
 * weights first, w = d*q - m, then acc_v += w*x_v, measured 1.5x slower: one
 * long FMA chain per vector.) T (ggml type) and NV are compile-time constants
 * in each instantiation. */
static inline __m256 i8x8(const uint8_t *p) {  /* 8 int8 in memory -> 8 floats */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline __m256 i8x8r(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
static inline __m256 u8x8r(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* 32 bytes in a register -> 4 x 8 floats */
static inline void split_i8(__m256i q, __m256 w[4]) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    w[0] = i8x8r(lo);
    w[1] = i8x8r(_mm_unpackhi_epi64(lo, lo));
    w[2] = i8x8r(hi);
    w[3] = i8x8r(_mm_unpackhi_epi64(hi, hi));
}
static inline void split_u8(__m256i q, __m256 w[4]) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    w[0] = u8x8r(lo);
    w[1] = u8x8r(_mm_unpackhi_epi64(lo, lo));
    w[2] = u8x8r(hi);
    w[3] = u8x8r(_mm_unpackhi_epi64(hi, hi));
}

static inline __m256i nib16(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
}

static inline __m256i bits32(const uint8_t *p) {   /* 0xFF bytes where a bit is set */
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}

/* Group s (32 weights) of block blk of type T: unscaled quants w[4]; the
 * weights are d0*w[0..1], d1*w[2..3] (d1 == d0 except Q6_K), minus ml. */
static inline __attribute__((always_inline)) void group32(const int T, const uint8_t *blk, const int s,
                                                         __m256 w[4], float *d0, float *d1, float *ml) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    *ml = 0.0f;
    switch (T) {
    case 2: /* Q4_0 */
        split_i8(_mm256_sub_epi8(nib16(blk + 2), _mm256_set1_epi8(8)), w);
        *d0 = *d1 = f16_at(blk);
        break;
    case 6: { /* Q5_0 */
        const __m256i hb = _mm256_and_si256(bits32(blk + 2), _mm256_set1_epi8(0x10));
        split_i8(_mm256_sub_epi8(_mm256_or_si256(nib16(blk + 6), hb), _mm256_set1_epi8(16)), w);
        *d0 = *d1 = f16_at(blk);
        break;
    }
    case 8: /* Q8_0 */
        for (int u = 0; u < 4; u++) w[u] = i8x8(blk + 2 + 8 * u);
        *d0 = *d1 = f16_at(blk);
        break;
    case 12: { /* Q4_K */
        int sc, m;
        a2n_k_scale_min(blk + 4, s, &sc, &m);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * (s / 2)));
        split_u8(_mm256_and_si256((s & 1) ? _mm256_srli_epi16(v, 4) : v, m4), w);
        *d0 = *d1 = f16_at(blk) * (float)sc;
        *ml = f16_at(blk + 2) * (float)m;
        break;
    }
    case 13: { /* Q5_K */
        int sc, m;
        a2n_k_scale_min(blk + 4, s, &sc, &m);
        const __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 48 + 32 * (s / 2)));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16));
        const __m256i lo = _mm256_and_si256((s & 1) ? _mm256_srli_epi16(v, 4) : v, m4);
        const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, s), _mm256_set1_epi8(1)), 4);
        split_u8(_mm256_or_si256(lo, hi), w);
        *d0 = *d1 = f16_at(blk) * (float)sc;
        *ml = f16_at(blk + 2) * (float)m;
        break;
    }
    case 14: { /* Q6_K: s = 4*g + ss */
        const int g = s / 4, ss = s % 4;
        const __m256i qlv = _mm256_loadu_si256((const __m256i *)(blk + 64 * g + 32 * (ss & 1)));
        const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * g));
        const __m256i lo = _mm256_and_si256(ss >= 2 ? _mm256_srli_epi16(qlv, 4) : qlv, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * ss), _mm256_set1_epi8(3));
        split_i8(_mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32)), w);
        const int8_t *sc = (const int8_t *)(blk + 192) + 8 * g + 2 * ss;
        const float d = f16_at(blk + 208);
        *d0 = d * (float)sc[0];
        *d1 = d * (float)sc[1];
        break;
    }
    }
}

/* One group into the accumulators. P: which of the 2 accumulator sets (a
 * constant), so that consecutive groups do not wait on each other's sums. */
static inline __attribute__((always_inline)) void group_fma(const int T, const int NV, const int P,
                                                           const uint8_t *blk, const int s, const float *xc,
                                                           int64_t ldx, const float *xs, __m256 *acc,
                                                           float *macc) {
    __m256 w[4];
    float d0, d1, ml;
    group32(T, blk, s, w, &d0, &d1, &ml);
    for (int v = 0; v < NV; v++) {
        const float *xv = xc + v * ldx;
        const int ai = NV <= 3 ? 2 * v + P : v;   /* few vectors: alternate two accumulators */
        __m256 a = acc[ai];
        if (T == 14) {   /* two scales per group */
            __m256 s0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xv));
            __m256 s1 = _mm256_mul_ps(w[2], _mm256_loadu_ps(xv + 16));
            s0 = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xv + 8), s0);
            s1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xv + 24), s1);
            a = _mm256_fmadd_ps(_mm256_set1_ps(d0), s0, a);
            a = _mm256_fmadd_ps(_mm256_set1_ps(d1), s1, a);
        } else {
            __m256 s0 = _mm256_mul_ps(w[0], _mm256_loadu_ps(xv));
            __m256 s1 = _mm256_mul_ps(w[1], _mm256_loadu_ps(xv + 8));
            s0 = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xv + 16), s0);
            s1 = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xv + 24), s1);
            a = _mm256_fmadd_ps(_mm256_set1_ps(d0), _mm256_add_ps(s0, s1), a);
        }
        acc[ai] = a;
        if (T == 12 || T == 13) macc[v] += ml * xs[v * (ldx / 32)];
    }
}

/* out[v] = row[0..n) . x_v[0..n) for NV vectors (x_v = x + v*ldx); xs: per-32-group
 * sums of x with the same vector stride ldx / 32 (K types with mins) */
static inline __attribute__((always_inline)) void fused_row(const int T, const int BLK, const int BYTES,
                                                           const int NV, const uint8_t *row, int64_t n,
                                                           int64_t ldx, const float *x, const float *xs,
                                                           float *out) {
    __m256 acc[16];
    float macc[8];
    for (int i = 0; i < 16; i++) acc[i] = _mm256_setzero_ps();
    for (int v = 0; v < NV; v++) macc[v] = 0.0f;
    const int64_t nb = n / BLK;
    int64_t b = 0;
    if (BLK == 32) {        /* blocks in pairs: two independent accumulator sets */
        for (; b + 2 <= nb; b += 2) {
            group_fma(T, NV, 0, row + b * BYTES, 0, x + b * 32, ldx, xs + b, acc, macc);
            group_fma(T, NV, 1, row + (b + 1) * BYTES, 0, x + (b + 1) * 32, ldx, xs + b + 1, acc, macc);
        }
    }
    for (; b < nb; b++) {
        const uint8_t *blk = row + b * BYTES;
        for (int s = 0; s < BLK / 32; s++)
            group_fma(T, NV, s & 1, blk, s, x + b * BLK + 32 * s, ldx, xs + b * (BLK / 32) + s, acc, macc);
    }
    for (int v = 0; v < NV; v++) {
        const __m256 a = NV <= 3 ? _mm256_add_ps(acc[2 * v], acc[2 * v + 1]) : acc[v];
        out[v] = hsum(a) - macc[v];
    }
}

#define FUSED_NV(T, BLK, BYTES)                                                                   \
    static void fused_##T(const uint8_t *row, int64_t n, int64_t ldx, const float *x, const float *xs, \
                          int nv, float *out) {                                                   \
        switch (nv) {                                                                             \
        case 1: fused_row(T, BLK, BYTES, 1, row, n, ldx, x, xs, out); break;                      \
        case 2: fused_row(T, BLK, BYTES, 2, row, n, ldx, x, xs, out); break;                      \
        case 3: fused_row(T, BLK, BYTES, 3, row, n, ldx, x, xs, out); break;                      \
        case 4: fused_row(T, BLK, BYTES, 4, row, n, ldx, x, xs, out); break;                      \
        case 5: fused_row(T, BLK, BYTES, 5, row, n, ldx, x, xs, out); break;                      \
        case 6: fused_row(T, BLK, BYTES, 6, row, n, ldx, x, xs, out); break;                      \
        case 7: fused_row(T, BLK, BYTES, 7, row, n, ldx, x, xs, out); break;                      \
        default: fused_row(T, BLK, BYTES, 8, row, n, ldx, x, xs, out); break;                     \
        }                                                                                         \
    }
FUSED_NV(2, 32, 18)
FUSED_NV(6, 32, 22)
FUSED_NV(8, 32, 34)
FUSED_NV(12, 256, 144)
FUSED_NV(13, 256, 176)
FUSED_NV(14, 256, 210)

typedef void (*fused_fn)(const uint8_t *row, int64_t n, int64_t ldx, const float *x, const float *xs,
                         int nv, float *out);

static fused_fn fused_for(int type) {
    switch (type) {
    case 2: return fused_2;
    case 6: return fused_6;
    case 8: return fused_8;
    case 12: return fused_12;
    case 13: return fused_13;
    case 14: return fused_14;
    default: return NULL;
    }
}
#endif

#if A2N_HAVE_AVX2
#ifndef MM_X_TILE_AT
#define MM_X_TILE_AT (40 << 10)  /* x bytes above which column chunks are used */
#endif
#define MM_X_CHUNK (16 << 10)    /* x bytes per column chunk */
#define MM_TILE_ROWS 16

/* Rows r0..r1 with a fused kernel, 8 vectors per kernel call, all vectors per
 * row before the next row: every weight is read from memory once. When the
 * vectors do not fit L1 (8 x 2048 floats) the columns are cut into chunks that
 * do and a tile of rows is swept chunk by chunk, prefetching the next row's
 * piece, so that x comes from L1 instead of L2. Below that size whole rows are
 * faster (the hardware prefetcher follows one stream). */
static void mm_range_fused(const mm_job *j, fused_fn fused, int64_t r0, int64_t r1) {
    const int B = j->t->block;
    const int64_t n_in = j->n_in, n_vec = j->n_vec, nxs = j->ldx / 32;
    float sums[8];
    int64_t cc = n_in;   /* columns per chunk */
    if (n_vec * n_in * 4 > MM_X_TILE_AT) {
        cc = MM_X_CHUNK / (4 * n_vec) / B * B;
        if (cc < B) cc = B;
        if (cc > n_in) cc = n_in;
    }
    const int64_t tile = cc == n_in ? r1 - r0 : MM_TILE_ROWS;
    for (int64_t t0 = r0; t0 < r1; t0 += tile) {
        const int64_t t1 = r1 - t0 < tile ? r1 : t0 + tile;
        for (int64_t c0 = 0; c0 < n_in; c0 += cc) {
            const int64_t nc = n_in - c0 < cc ? n_in - c0 : cc;
            const int64_t off = c0 / B * j->t->bytes, nbytes = nc / B * j->t->bytes;
            for (int64_t r = t0; r < t1; r++) {
                const uint8_t *w = j->w + r * j->row_bytes + off;
                if (cc != n_in && r + 1 < t1)
                    for (int64_t k = 0; k < nbytes; k += 64) __builtin_prefetch(w + j->row_bytes + k);
                for (int64_t v0 = 0; v0 < n_vec; v0 += 8) {
                    const int nv = (int)(n_vec - v0 < 8 ? n_vec - v0 : 8);
                    fused(w, nc, j->ldx, j->x + v0 * j->ldx + c0, j->xsum + v0 * nxs + c0 / 32, nv, sums);
                    for (int v = 0; v < nv; v++) {
                        float *o = j->y + (v0 + v) * j->n_out + r;
                        *o = c0 ? *o + sums[v] : sums[v];
                    }
                }
            }
        }
    }
}
#endif

#if A2N_HAVE_AVX2
typedef struct {
    const uint8_t *w;
    int64_t n_out, n_in, row_bytes, n_vec;
    int block, bytes;           /* of the weight type */
    a2n_q8dot_fn dot;
    a2n_q8act a;
    int64_t act_bytes;          /* activation bytes per element, about */
    float *y;
} mm_q8_job;

#ifndef MM_Q8_TILE_AT
#define MM_Q8_TILE_AT (64 << 10)  /* activation bytes of 8 vectors above which column chunks are used */
#endif
#ifndef MM_Q8_CHUNK
#define MM_Q8_CHUNK (24 << 10)    /* activation bytes of 8 vectors per column chunk */
#endif

/* Rows r0..r1 (4 rows and up to 8 vectors per kernel call), all vectors per
 * row before the next rows. When the quantized vectors do not fit L1 the
 * columns are cut into chunks that do, swept over a tile of rows (as
 * mm_range_fused). */
static void mm_range_q8(void *p, int64_t r0, int64_t r1) {
    const mm_q8_job *j = p;
    const int B = j->block;
    const int64_t n_in = j->n_in, n_vec = j->n_vec;
    float sums[4 * 8];
    int64_t cc = n_in;
    const int64_t nvg = n_vec < 8 ? n_vec : 8;   /* vectors per kernel call */
    if (nvg * n_in * j->act_bytes > MM_Q8_TILE_AT) {
        const int64_t step = A2N_HAVE_AVX512 && B == 32 ? 2 * B : B;   /* whole pairs */
        cc = MM_Q8_CHUNK / (nvg * j->act_bytes) / step * step;
        if (cc < step) cc = step;
        if (cc > n_in) cc = n_in;
    }
    const int64_t tile = cc == n_in ? r1 - r0 : MM_TILE_ROWS;
    for (int64_t t0 = r0; t0 < r1; t0 += tile) {
        const int64_t t1 = r1 - t0 < tile ? r1 : t0 + tile;
        for (int64_t c0 = 0; c0 < n_in; c0 += cc) {
            const int64_t nc = n_in - c0 < cc ? n_in - c0 : cc;
            const int64_t b0 = c0 / B, nb = nc / B, off = b0 * j->bytes, nbytes = nb * j->bytes;
            for (int64_t r = t0; r < t1; r += 4) {
                const int nr = (int)(t1 - r < 4 ? t1 - r : 4);
                const uint8_t *w = j->w + r * j->row_bytes + off;
                if (cc != n_in && r + nr < t1)
                    for (int i = 0; i < nr && r + nr + i < t1; i++)
                        for (int64_t k = 0; k < nbytes; k += 64) __builtin_prefetch(w + (nr + i) * j->row_bytes + k);
                for (int64_t v0 = 0; v0 < n_vec; v0 += 8) {
                    const int nv = (int)(n_vec - v0 < 8 ? n_vec - v0 : 8);
                    a2n_q8act a = j->a;
                    a.q += v0 * a.ldq;
                    a.d += v0 * a.ldd;
                    if (a.s16) a.s16 += v0 * a.lds16, a.s32 += v0 * a.lds32;
                    j->dot(w, j->row_bytes, nr, nb, &a, b0, nv, sums, j->w + j->n_out * j->row_bytes);
                    for (int i = 0; i < nr; i++)
                        for (int v = 0; v < nv; v++) {
                            float *o = j->y + (v0 + v) * j->n_out + r + i;
                            *o = c0 ? *o + sums[i * 8 + v] : sums[i * 8 + v];
                        }
                }
            }
        }
    }
}

/* x (n_vec, n_in) -> int8 blocks of B (32 or 256) as described at a2n_q8act:
 * d = amax / 127, q = rint(x * (1 / d)) (round half to even). */
static void quantize_act(const float *x, int64_t n_vec, int64_t n_in, int B, int wide, const a2n_q8act *a) {
    for (int64_t v = 0; v < n_vec; v++)
        for (int64_t b = 0; b < n_in / B; b++) {
            const float *xb = x + v * n_in + b * B;
            /* the pair layout of the AVX-512 kernels, else plain rows */
            int8_t *qb = (int8_t *)a->q + v * a->ldq + (wide ? b / 2 * 192 + (b & 1) * 32 : b * B);
            __m256 mx = _mm256_setzero_ps();
            const __m256 nosign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
            for (int k = 0; k < B; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(xb + k), nosign));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
            /* x * id rounded half to even (the default MXCSR mode, as rintf), packed to int8 */
            const __m256 vid = _mm256_set1_ps(id);
            for (int k = 0; k < B; k += 32) {
                const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k), vid));
                const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 8), vid));
                const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 16), vid));
                const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + k + 24), vid));
                const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
                _mm256_storeu_si256((__m256i *)(qb + k),
                                    _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            }
            if (wide) {
                float dd[8];
                int32_t cs[8];
                for (int i = 0; i < 8; i++) {
                    dd[i] = db;
                    cs[i] = -(qb[4 * i] + qb[4 * i + 1] + qb[4 * i + 2] + qb[4 * i + 3]);
                }
                memcpy((uint8_t *)qb + 64, dd, sizeof dd);    /* same half of the pair's scales */
                memcpy((uint8_t *)qb + 128, cs, sizeof cs);   /* and of its sums */
                continue;
            }
            ((float *)a->d)[v * a->ldd + b] = db;
            if (a->s16)
                for (int g = 0; g < B / 16; g++) {
                    int s = 0;
                    for (int k = 0; k < 16; k++) s += qb[16 * g + k];
                    int16_t *s16 = (int16_t *)a->s16 + v * a->lds16 + b * (B / 16);
                    s16[g] = (int16_t)s;
                    if (g & 1) ((int16_t *)a->s32)[v * a->lds32 + b * (B / 32) + g / 2] = (int16_t)(s16[g - 1] + s);
                }
        }
}

/* 1: the integer path for the types that have it; 0: A2ATS_MATMUL=f32 */
static int mm_int_mode(void) {
    static int mode = -1;
    int m = __atomic_load_n(&mode, __ATOMIC_RELAXED);
    if (m < 0) {
        const char *e = getenv("A2ATS_MATMUL");
        m = !(e && strcmp(e, "f32") == 0);
        __atomic_store_n(&mode, m, __ATOMIC_RELAXED);
    }
    return m;
}

static int matmul_q8(const a2n_type *t, a2n_q8dot_fn dot, const void *w, int64_t n_out, int64_t n_in,
                     int64_t row_bytes, const float *x, int64_t n_vec, float *y, int n_threads) {
    const int B = t->block;
    const int ksums = B == 256, wide = A2N_HAVE_AVX512 && B == 32;
    /* per vector: quants (+ the pair layout's scales and sums), padded by 64
     * bytes against L1 set aliasing at power-of-two n_in */
    const int64_t nb = n_in / B;
    const int64_t ldq = (wide ? (nb + 1) / 2 * 192 : n_in) + 64, ldd = wide ? 0 : nb,
                  lds16 = ksums ? n_in / 16 : 0, lds32 = ksums ? n_in / 32 : 0;
    const size_t bytes = (size_t)(n_vec * ldq) + (size_t)(n_vec * ldd) * sizeof(float) +
                         (size_t)(n_vec * (lds16 + lds32)) * sizeof(int16_t);
    uint8_t *buf = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!buf) return A2N_E_NOMEM;
    if (wide && nb % 2) memset(buf, 0, bytes);   /* the unused halves of odd last pairs */
    float *d = (float *)(buf + n_vec * ldq);      /* ldq is a multiple of 32: aligned */
    int16_t *s16 = ksums ? (int16_t *)(d + n_vec * ldd) : NULL;
    int16_t *s32 = ksums ? s16 + n_vec * lds16 : NULL;
    mm_q8_job j = {w, n_out, n_in, row_bytes, n_vec, B, t->bytes, dot,
                   {(const int8_t *)buf, d, s16, s32, ldq, ldd, lds16, lds32}, (ldq + 4 * ldd + n_in / 2) / n_in, y};
    quantize_act(x, n_vec, n_in, B, wide, &j.a);
    const int64_t min_rows = (32 << 10) / row_bytes + 1;
    const int rc = a2n_parallel_for(n_out, n_threads, min_rows, mm_range_q8, &j);
    free(buf);
    return rc;
}
#endif

static void mm_range(void *p, int64_t r0, int64_t r1) {
    const mm_job *j = p;
    float buf[MM_CHUNK] __attribute__((aligned(32)));
    float sums[MM_VECS];
#if A2N_HAVE_AVX2
    const fused_fn fused = a2n_use_simd ? fused_for(j->t->id) : NULL;
    if (fused) {
        mm_range_fused(j, fused, r0, r1);
        return;
    }
#endif
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

int a2n_matmul_q(int ggml_type, const void *w, int64_t w_nbytes, int64_t n_out, int64_t n_in,
                 const float *x, int64_t n_vec, float *y, int n_threads) {
    const a2n_type *t = a2n_find_type(ggml_type);
    if (!t) return A2N_E_TYPE;
    if (!w || !x || !y || n_out <= 0 || n_in <= 0 || n_vec <= 0) return A2N_E_ARG;
    if (n_in % t->block) return A2N_E_SIZE;
    const int64_t row_bytes = n_in / t->block * t->bytes;
    if (n_out > INT64_MAX / row_bytes || row_bytes * n_out != w_nbytes) return A2N_E_SIZE;
#if A2N_HAVE_AVX2
    const a2n_q8dot_fn dot = a2n_use_simd && mm_int_mode() ? a2n_q8dot_for(ggml_type) : NULL;
    if (dot) return matmul_q8(t, dot, w, n_out, n_in, row_bytes, x, n_vec, y, n_threads);
#endif
    /* x is copied with a 128-byte pad per vector: power-of-two strides (n_in =
     * 2048, 4096) would put every vector's loads in the same L1 set. The group
     * sums of x serve the min term of Q4_K/Q5_K (m * sum(x) per group). */
    const int64_t ldx = (n_in + 31) / 32 * 32 + 32;   /* group sums: ldx / 32 per vector */
    const int64_t n_xs = n_in % 32 ? 0 : n_in / 32;
    float *xp = aligned_alloc(64, (size_t)(n_vec * (ldx + ldx / 32) * sizeof(float) + 63) / 64 * 64);
    if (!xp) return A2N_E_NOMEM;
    float *xs = xp + n_vec * ldx;
    for (int64_t v = 0; v < n_vec; v++) {
        memcpy(xp + v * ldx, x + v * n_in, (size_t)n_in * sizeof(float));
        for (int64_t g = 0; g < n_xs; g++) {
            float s = 0.0f;
            for (int k = 0; k < 32; k++) s += x[v * n_in + g * 32 + k];
            xs[v * (ldx / 32) + g] = s;
        }
    }
    mm_job j = {t, w, n_out, n_in, row_bytes, n_vec, xp, ldx, xs, y};
    /* a thread is worth waking for >= ~32 KB of weights */
    const int64_t min_rows = (32 << 10) / row_bytes + 1;
    int rc = a2n_parallel_for(n_out, n_threads, min_rows, mm_range, &j);
    free(xp);
    return rc;
}
