/* A2ATS fast-scan selection for 4-bit product codes (M subspaces of 16 centroids), after
 * FAISS's PQ fast-scan (bbs = 32): the float LUT of each query head is quantized to 8 bits
 * (one scale and bias per head, so a token's score is an exact integer sum), kept in AVX2
 * registers and looked up with vpshufb over codes stored in blocks of 32 tokens; the g
 * query heads of a GQA group are scored in one pass over the codes, accumulating in
 * uint16; each head's top-K is found by counting (a histogram of the integer scores gives
 * the K-th largest, then one pass collects); the g picks are united. Work is split over the
 * (sequence, KV head) pairs on the persistent pool of ops.c.
 *
 * Block layout (one block = 32 tokens of one KV head, M / 2 groups of 32 bytes): group p
 * holds subspaces 2p (bytes 0..15) and 2p + 1 (bytes 16..31); within the 16 bytes of a
 * subspace, byte j holds token PERM[j] in its low nibble and token PERM[j] + 16 in its
 * high nibble, PERM = 0, 8, 1, 9, .., 7, 15. One vpshufb of a group against the 32 LUT
 * bytes of subspaces (2p, 2p + 1) then gives, as 16-bit words, token i in the low byte
 * and token 8 + i in the high byte of word i, lane 0 for subspace 2p, lane 1 for 2p + 1. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"
#include "retrieval.h"
#include "sel_common.h"
#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

#define FS_C 16          /* centroids per subspace: 4-bit codes */
#define FS_B 32          /* tokens per block */
#define FS_MAX_M 128     /* 255 * M fits a signed 16-bit score (the SIMD compares) */

/* byte (within a subspace's 16) holding token i % 16 of a block: the inverse of PERM */
static inline int fs_byte(int64_t i) { return (int)((i & 7) * 2 + ((i >> 3) & 1)); }

/* the code of token i (0..31) of a block in subspace m */
static inline int fs_code(const uint8_t *blk, int64_t m, int64_t i) {
    const uint8_t b = blk[(m >> 1) * FS_B + (m & 1) * 16 + fs_byte(i & 15)];
    return (i & 16) ? b >> 4 : b & 15;
}

/* Per-thread scratch (sel_common.h), slot 0: scores, histogram and
 * quantized LUT of one (s, k); 1: the calling thread's pick bitmaps. */
static _Thread_local a2n_scratch fs_tls[2];

static void *fs_scratch(int slot, size_t bytes) { return a2n_scratch_get(&fs_tls[slot], bytes); }

/* ---- LUT quantization ----------------------------------------------------- */
/* One query head: q[m, c] = clamp(floor((lut[m, c] - min_m) * a + 0.5), 0, 255) with
 * a = 255 / max_m(max_c lut[m, c] - min_m), float32 throughout (FAISS's
 * round_uint8_per_column). *scale = a (0 when every span is 0 or not finite), *bias = sum_m
 * min_m: score ~= sum_m q[m, code_m] / a + bias. NaN entries are skipped by min/max and
 * give 0. */
static void quantize_head(const float *lut, int64_t M, uint8_t *q, float *scale, float *bias) {
    float span = 0.0f, b = 0.0f;
    for (int64_t m = 0; m < M; m++) {
        float lo = INFINITY, hi = -INFINITY;
        for (int c = 0; c < FS_C; c++) {
            const float v = lut[m * FS_C + c];
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        const float sp = hi - lo;
        span = sp > span ? sp : span;
    }
    const float a = span > 0.0f && span < INFINITY ? 255.0f / span : 0.0f;
    for (int64_t m = 0; m < M; m++) {
        float lo = INFINITY;
        for (int c = 0; c < FS_C; c++) lo = lut[m * FS_C + c] < lo ? lut[m * FS_C + c] : lo;
        b += lo;
        for (int c = 0; c < FS_C; c++) {
            const float v = floorf((lut[m * FS_C + c] - lo) * a + 0.5f);
            q[m * FS_C + c] = (uint8_t)(v >= 0.0f ? (v <= 255.0f ? v : 255.0f) : 0.0f);
        }
    }
    if (scale) *scale = a;
    if (bias) *bias = b;
}

int a2n_fs_quantize_lut(const float *lut, int64_t lut_len, int64_t rows, int64_t M, uint8_t *qlut,
                        int64_t qlut_len, float *scale, float *bias) {
    if (rows < 0 || M < 1) return A2N_E_ARG;
    int64_t n;
    if (!a2n_mul4(rows, M, FS_C, 1, &n) || n != lut_len || n != qlut_len) return A2N_E_SIZE;
    if (n == 0) return A2N_OK;
    if (!lut || !qlut || !scale || !bias) return A2N_E_ARG;
    for (int64_t r = 0; r < rows; r++)
        quantize_head(lut + r * M * FS_C, M, qlut + r * M * FS_C, scale + r, bias + r);
    return A2N_OK;
}

/* ---- packing -------------------------------------------------------------- */
int a2n_fs_pack(const uint16_t *codes, int64_t codes_len, int64_t G, int64_t M, int64_t n,
                uint8_t *blocks, int64_t blocks_len, int64_t cap, int64_t first) {
    if (G < 0 || M < 2 || M % 2 || M > FS_MAX_M || n < 0 || cap < 0 || cap % FS_B || first < 0)
        return A2N_E_ARG;
    int64_t nc, nb;
    if (!a2n_mul4(G, M, n, 1, &nc) || nc != codes_len || !a2n_mul4(G, M / 2, cap, 1, &nb) ||
        nb != blocks_len)
        return A2N_E_SIZE;
    if (first > cap || n > cap - first) return A2N_E_INDEX;
    if (nc == 0) return A2N_OK;
    if (!codes || !blocks) return A2N_E_ARG;
    for (int64_t i = 0; i < nc; i++)
        if (codes[i] >= FS_C) return A2N_E_INDEX;
    const int64_t blk_bytes = M / 2 * FS_B, nblk = cap / FS_B;
    for (int64_t k = 0; k < G; k++)
        for (int64_t m = 0; m < M; m++) {
            const uint16_t *src = codes + (k * M + m) * n;
            for (int64_t i = 0; i < n; i++) {
                const int64_t t = first + i, j = t % FS_B;
                uint8_t *b = blocks + (k * nblk + t / FS_B) * blk_bytes + (m >> 1) * FS_B + (m & 1) * 16
                             + fs_byte(j & 15);
                const int sh = (j & 16) ? 4 : 0;
                *b = (uint8_t)((*b & ~(15 << sh)) | (src[i] << sh));
            }
        }
    return A2N_OK;
}

/* ---- scoring -------------------------------------------------------------- */
/* out[h * ld + i] = sum_m q[h][m, code_m(token i)] for the 32 tokens of one block and the
 * nq heads of q (M * 16 bytes apart), portable */
static void fs_block_ref(const uint8_t *blk, const uint8_t *q, int64_t M, int64_t nq, uint16_t *out,
                         int64_t ld) {
    for (int64_t h = 0; h < nq; h++)
        for (int64_t i = 0; i < FS_B; i++) {
            unsigned s = 0;
            for (int64_t m = 0; m < M; m++) s += q[(h * M + m) * FS_C + fs_code(blk, m, i)];
            out[h * ld + i] = (uint16_t)s;
        }
}

#if A2N_HAVE_AVX2
/* The same with vpshufb, NQ heads per pass (constant: the accumulators stay in registers).
 * acc0 gathers words (token i) + 256 (token 8 + i) modulo 2^16 and acc1 the high bytes
 * alone, so acc0 - (acc1 << 8) is the exact low-byte sum (every sum is < 2^16: M <= 128). */
static inline __attribute__((always_inline)) void fs_block_nq(const uint8_t *blk, const uint8_t *q,
                                                              int64_t M, int NQ, uint16_t *out,
                                                              int64_t ld) {
    __m256i acc[4][4];
    for (int h = 0; h < NQ; h++)
        for (int r = 0; r < 4; r++) acc[h][r] = _mm256_setzero_si256();
    const __m256i nib = _mm256_set1_epi8(0x0f);
    for (int64_t p = 0; p < M / 2; p++) {
        const __m256i c = _mm256_loadu_si256((const __m256i *)(blk + p * FS_B));
        const __m256i clo = _mm256_and_si256(c, nib);
        const __m256i chi = _mm256_and_si256(_mm256_srli_epi16(c, 4), nib);
        for (int h = 0; h < NQ; h++) {
            const __m256i lut = _mm256_loadu_si256((const __m256i *)(q + h * M * FS_C + p * FS_B));
            const __m256i r0 = _mm256_shuffle_epi8(lut, clo), r1 = _mm256_shuffle_epi8(lut, chi);
            acc[h][0] = _mm256_add_epi16(acc[h][0], r0);
            acc[h][1] = _mm256_add_epi16(acc[h][1], _mm256_srli_epi16(r0, 8));
            acc[h][2] = _mm256_add_epi16(acc[h][2], r1);
            acc[h][3] = _mm256_add_epi16(acc[h][3], _mm256_srli_epi16(r1, 8));
        }
    }
    for (int h = 0; h < NQ; h++)
        for (int r = 0; r < 4; r += 2) {
            const __m256i lo = _mm256_sub_epi16(acc[h][r], _mm256_slli_epi16(acc[h][r + 1], 8));
            const __m256i hi = acc[h][r + 1];
            /* lanes summed: tokens 0..7 (+16) from lo, 8..15 (+16) from hi */
            const __m256i d = _mm256_add_epi16(_mm256_permute2x128_si256(lo, hi, 0x21),
                                               _mm256_blend_epi32(lo, hi, 0xF0));
            _mm256_storeu_si256((__m256i *)(out + h * ld + r * 8), d);
        }
}

/* All nq heads on one block: the block is read from memory once and stays in L1 while
 * heads go through it two at a time (four at a time spill the 16 accumulators to the stack
 * and run ~20% slower) */
static void fs_block_avx2(const uint8_t *blk, const uint8_t *q, int64_t M, int64_t nq, uint16_t *out,
                          int64_t ld) {
    int64_t h = 0;
    for (; h + 2 <= nq; h += 2) fs_block_nq(blk, q + h * M * FS_C, M, 2, out + h * ld, ld);
    if (h < nq) fs_block_nq(blk, q + h * M * FS_C, M, 1, out + h * ld, ld);
}
#endif

/* ---- top-K by counting ---------------------------------------------------- */
#if A2N_HAVE_AVX2
/* bit i = word i of a 16-bit compare result (0 / -1), in order */
static inline uint32_t mask16(__m256i c) {
    const __m128i w = _mm_packs_epi16(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    return (uint32_t)_mm_movemask_epi8(w);
}
#endif

/* Bits of positions [i, i + 16) of sc with score > thr (gt) and == thr (eq); scores are
 * below 2^15 (M <= 128), so the signed compares are right */
static inline void fs_cmp16(const uint16_t *sc, int thr, uint32_t *gt, uint32_t *eq) {
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)sc), t = _mm256_set1_epi16((short)thr);
        *gt = mask16(_mm256_cmpgt_epi16(v, t));
        *eq = mask16(_mm256_cmpeq_epi16(v, t));
        return;
    }
#endif
    uint32_t a = 0, b = 0;
    for (int i = 0; i < 16; i++) {
        a |= (uint32_t)(sc[i] > thr) << i;
        b |= (uint32_t)(sc[i] == thr) << i;
    }
    *gt = a;
    *eq = b;
}

/* Mark in bits (positions relative to sc) the top-K of sc[0..n) (n > K), ties to the
 * smaller position: the K-th largest score from the histogram of all n (nbins = 255 M + 1;
 * a branch-free count is cheaper here than counting a sample and then the scores above
 * its guess, whose bit loops mispredict), then one pass taking every larger score and the
 * first ties. */
static void fs_pick(const uint16_t *sc, int64_t n, int64_t K, uint32_t *hist, int64_t nbins,
                    uint64_t *bits) {
    memset(hist, 0, (size_t)nbins * sizeof *hist);
    for (int64_t t = 0; t < n; t++) hist[sc[t]]++;
    int64_t v = nbins - 1, above = 0;
    while (above + hist[v] < K) above += hist[v--];     /* stops: the counts sum to n > K */
    int64_t need = K - above;                           /* ties at v to take, >= 1 */
    int64_t t = 0;
    for (; t + 16 <= n; t += 16) {
        uint32_t gt, eq;
        fs_cmp16(sc + t, (int)v, &gt, &eq);
        if (need > 0 && eq) {
            if (__builtin_popcount(eq) <= need) need -= __builtin_popcount(eq);
            else {
                uint32_t keep = 0;
                for (; need > 0; need--, eq &= eq - 1) keep |= eq & -eq;
                eq = keep;
            }
            gt |= eq;
        }
        bits[t >> 6] |= (uint64_t)gt << (t & 63);       /* t is a multiple of 16 */
    }
    for (; t < n; t++)
        if (sc[t] > v || (sc[t] == v && need-- > 0)) set_bit(bits, t);
}

/* ---- selection ------------------------------------------------------------ */
typedef struct {
    const float *lut;
    int64_t G, g, M;
    const uint8_t *const *codes;
    const int64_t *caps, *T;
    int64_t sinks, window, K, nmax, words;
    uint64_t *bits;      /* (S*G, words) picks of each (s, k), relative to lo */
    int64_t *npick;      /* (S*G): -1 takes every candidate */
    int64_t *idx;
    int64_t kmax;
    int32_t *lens;
    atomic_int err;
} fs_job;

static void fs_range(void *p, int64_t t0, int64_t t1) {
    fs_job *j = p;
    const int64_t g = j->g, M = j->M, nbins = 255 * M + 1, blk_bytes = M / 2 * FS_B;
    const int64_t ld = (j->nmax + 2 * FS_B + 15) / 16 * 16;   /* scores of one head */
    uint8_t *buf = NULL;
    for (int64_t task = t0; task < t1; task++) {
        const int64_t s = task / j->G, k = task % j->G;
        int64_t lo, hi;
        a2n_sel_bounds(j->T[s], j->sinks, j->window, &lo, &hi);
        const int64_t n = hi - lo;
        if (n <= j->K) {
            j->npick[task] = -1;
            continue;
        }
        if (!buf) {   /* scores (g, ld) u16, histogram, quantized LUT (g, M, 16) */
            buf = fs_scratch(0, (size_t)(g * ld * 2 + nbins * 4 + g * M * FS_C) + 64);
            if (!buf) {
                atomic_store(&j->err, A2N_E_NOMEM);
                return;
            }
        }
        uint16_t *sc = (uint16_t *)buf;
        uint32_t *hist = (uint32_t *)(buf + (g * ld * 2 + 3) / 4 * 4);
        uint8_t *q = (uint8_t *)(hist + nbins);
        for (int64_t h = 0; h < g; h++)
            quantize_head(j->lut + ((s * j->G + k) * g + h) * M * FS_C, M, q + h * M * FS_C, NULL, NULL);
        const int64_t b0 = lo / FS_B, b1 = (hi + FS_B - 1) / FS_B, off = lo - b0 * FS_B;
        const uint8_t *base = j->codes[s] + k * (j->caps[s] / FS_B) * blk_bytes;
        for (int64_t b = b0; b < b1; b++) {
#if A2N_HAVE_AVX2
            if (a2n_use_simd) {
                fs_block_avx2(base + b * blk_bytes, q, M, g, sc + (b - b0) * FS_B, ld);
                continue;
            }
#endif
            fs_block_ref(base + b * blk_bytes, q, M, g, sc + (b - b0) * FS_B, ld);
        }
        uint64_t *bits = j->bits + task * j->words;
        for (int64_t h = 0; h < g; h++) fs_pick(sc + h * ld + off, n, j->K, hist, nbins, bits);
        j->npick[task] = a2n_sel_count(bits, n);
    }
}

static void fs_write(void *p, int64_t t0, int64_t t1) {
    fs_job *j = p;
    for (int64_t task = t0; task < t1; task++)
        a2n_sel_emit_task(task, j->G, j->T, j->sinks, j->window, j->bits, j->words, j->npick, j->idx,
                          j->kmax, j->lens);
}

int a2n_fs_select(const float *lut, int64_t lut_len, int64_t S, int64_t G, int64_t g, int64_t M,
                  const uint8_t *const *codes, const int64_t *caps, const int64_t *T, int64_t sinks,
                  int64_t window, int64_t K, int64_t *idx, int64_t kmax, int32_t *lens, int n_threads) {
    if (S < 0 || G < 0 || g < 1 || M < 2 || M % 2 || M > FS_MAX_M || sinks < 0 || window < 0 ||
        K < 1 || kmax < 0)
        return A2N_E_ARG;
    int64_t nl, ni, x;
    if (!a2n_mul4(S, G, g, M, &x) || !a2n_mul4(x, FS_C, 1, 1, &nl) || nl != lut_len) return A2N_E_SIZE;
    if (!a2n_mul4(S, G, kmax, 1, &ni)) return A2N_E_SIZE;
    if (S * G == 0) return A2N_OK;
    if (!lut || !codes || !caps || !T || !idx || !lens) return A2N_E_ARG;
    fs_job j = {.lut = lut, .G = G, .g = g, .M = M, .codes = codes, .caps = caps, .T = T,
                .sinks = sinks, .window = window, .K = K, .idx = idx, .kmax = kmax, .lens = lens};
    int64_t Kg;
    if (!a2n_mul4(K, g, 1, 1, &Kg)) Kg = INT64_MAX;
    for (int64_t s = 0; s < S; s++) {
        int64_t cg;
        const int fits = caps[s] % FS_B == 0 && a2n_mul4(G, M / 2, caps[s], 1, &cg);
        const int rc = a2n_sel_check_seq(caps[s], T[s], fits, codes[s], sinks, window, Kg, kmax, &j.nmax);
        if (rc != A2N_OK) return rc;
    }
    /* the scores of (g, nmax + 64) and the histogram per thread: refuse what cannot fit */
    int64_t need;
    if (!a2n_mul4(g, j.nmax + 2 * FS_B + 16, 2, 1, &need) || need > ((int64_t)1 << 40)) return A2N_E_SIZE;
    if (!(j.bits = a2n_sel_bitmaps(&fs_tls[1], S * G, j.nmax, &j.words, &j.npick))) return A2N_E_NOMEM;
    atomic_init(&j.err, 0);
    a2n_parallel_for(S * G, n_threads, 1, fs_range, &j);
    int rc = atomic_load(&j.err);
    if (rc == A2N_OK) a2n_parallel_for(S * G, n_threads, 8, fs_write, &j);
    return rc;
}
