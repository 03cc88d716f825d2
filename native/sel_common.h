/* Shared by the two A2ATS selection kernels (select.c: float LUT scores of any code
 * layout; fastscan.c: quantized scores of 4-bit codes): size arithmetic, the candidate
 * range of a sequence, the writing of one (sequence, KV head) selection and the per-thread
 * scratch (also rerank.c's). Not part of the Python-facing API. */
#ifndef A2ATS_SEL_COMMON_H
#define A2ATS_SEL_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include "a2ats_native.h"
#include "internal.h"
#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

/* One slot of per-thread scratch that outlives a call: the pool's workers are persistent, and
 * a fresh malloc of a large buffer per call (mmap + page faults + zeroing by the kernel) costs
 * more than a selection. Declare `static _Thread_local a2n_scratch name[n]`. */
typedef struct {
    void *p;
    size_t n;
} a2n_scratch;

/* slot's buffer of at least bytes (grown on demand, never shrunk); NULL when out of memory */
static inline void *a2n_scratch_get(a2n_scratch *slot, size_t bytes) {
    if (slot->n < bytes) {
        free(slot->p);
        slot->p = malloc(bytes);
        slot->n = slot->p ? bytes : 0;
    }
    return slot->p;
}

/* one stored row of rb bytes into dst (a tile of the rows a kernel is about to read): whole
 * 32-byte chunks where they fit. Copying a block of scattered rows in one tight loop of
 * independent loads keeps many of their cache misses in flight at once; read in place from
 * inside arithmetic loops, the misses come one or two at a time. */
static inline void a2n_copy_row(void *dst, const char *src, int64_t rb) {
#if A2N_HAVE_AVX2
    if (rb % 32 == 0) {
        for (int64_t o = 0; o < rb; o += 32)
            _mm256_storeu_si256((__m256i *)((char *)dst + o), _mm256_loadu_si256((const __m256i *)(src + o)));
        return;
    }
#endif
    __builtin_memcpy(dst, src, (size_t)rb);
}

#if A2N_HAVE_AVX2
/* 8 floats of a row from element i: f32, or f16 widened */
static inline __m256 a2n_load8(const void *row, int64_t i, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
               : _mm256_loadu_ps((const float *)row + i);
}
#endif

/* a * b * c * e into *r; 0 on overflow or a negative factor */
static inline int a2n_mul4(int64_t a, int64_t b, int64_t c, int64_t e, int64_t *r) {
    int64_t x, y;
    if (a < 0 || b < 0 || c < 0 || e < 0) return 0;
    return !__builtin_mul_overflow(a, b, &x) && !__builtin_mul_overflow(x, c, &y) &&
           !__builtin_mul_overflow(y, e, r);
}

static inline void set_bit(uint64_t *bits, int64_t t) { bits[t >> 6] |= 1ull << (t & 63); }

/* the scored candidates [lo, hi) of a sequence of T tokens: after the sinks, before the window */
static inline void a2n_sel_bounds(int64_t T, int64_t sinks, int64_t window, int64_t *lo, int64_t *hi) {
    *lo = sinks < T ? sinks : T;
    *hi = T - window > *lo ? T - window : *lo;
}

/* o[0..kmax) = the sorted positions [0, lo) + picks + [hi, T), then -1; *len their count.
 * picks: bit i of bits is candidate lo + i; NULL takes every candidate. */
static inline void a2n_sel_emit(int64_t T, int64_t sinks, int64_t window, const uint64_t *bits,
                                int64_t *o, int64_t kmax, int32_t *len) {
    int64_t lo, hi, c = 0;
    a2n_sel_bounds(T, sinks, window, &lo, &hi);
    if (!bits) {
        for (int64_t t = 0; t < T; t++) o[c++] = t;
    } else {
        for (int64_t t = 0; t < lo; t++) o[c++] = t;
        for (int64_t w = 0; w < (hi - lo + 63) / 64; w++)
            for (uint64_t b = bits[w]; b; b &= b - 1) o[c++] = lo + w * 64 + __builtin_ctzll(b);
        for (int64_t t = hi; t < T; t++) o[c++] = t;
    }
    *len = (int32_t)c;
    for (int64_t i = c; i < kmax; i++) o[i] = -1;
}

/* a2n_sel_emit of task (sequence task / G) of a call: its picks are bits + task * words, or
 * every candidate where npick (NULL: none) says -1 */
static inline void a2n_sel_emit_task(int64_t task, int64_t G, const int64_t *T, int64_t sinks,
                                     int64_t window, const uint64_t *bits, int64_t words,
                                     const int64_t *npick, int64_t *idx, int64_t kmax, int32_t *lens) {
    a2n_sel_emit(T[task / G], sinks, window, npick && npick[task] < 0 ? NULL : bits + task * words,
                 idx + task * kmax, kmax, lens + task);
}

/* the number of picks (bits set) among n candidates */
static inline int64_t a2n_sel_count(const uint64_t *bits, int64_t n) {
    int64_t cnt = 0;
    for (int64_t w = 0; w < (n + 63) / 64; w++) cnt += __builtin_popcountll(bits[w]);
    return cnt;
}

/* The checks of sequence s of a code selection, in this order: 0 <= T <= cap (and int32),
 * fits (its codes' size holds), codes (non-NULL where T > 0), and lo + min(n, Kg) + T - hi
 * <= kmax for its n = hi - lo candidates; *nmax = max(*nmax, n). A2N_OK or the error. */
static inline int a2n_sel_check_seq(int64_t cap, int64_t T, int fits, const void *codes,
                                    int64_t sinks, int64_t window, int64_t Kg, int64_t kmax,
                                    int64_t *nmax) {
    if (cap < 0 || T < 0 || T > cap || T > INT32_MAX) return A2N_E_INDEX;
    if (!fits) return A2N_E_SIZE;
    if (T > 0 && !codes) return A2N_E_ARG;
    int64_t lo, hi;
    a2n_sel_bounds(T, sinks, window, &lo, &hi);
    const int64_t n = hi - lo;
    if (lo + (n < Kg ? n : Kg) + (T - hi) > kmax) return A2N_E_SIZE;
    if (n > *nmax) *nmax = n;
    return A2N_OK;
}

/* In slot: the zeroed pick bitmaps of tasks selections of up to nmax candidates (*words
 * per task), then *npick (tasks int64). NULL when out of memory. */
static inline uint64_t *a2n_sel_bitmaps(a2n_scratch *slot, int64_t tasks, int64_t nmax,
                                        int64_t *words, int64_t **npick) {
    *words = (nmax + 63) / 64;
    const size_t nbits = (size_t)(tasks * *words);
    uint64_t *bits = a2n_scratch_get(slot, (nbits + (size_t)tasks) * sizeof *bits);
    if (!bits) return NULL;
    __builtin_memset(bits, 0, nbits * sizeof *bits);
    *npick = (int64_t *)(bits + nbits);
    return bits;
}

/* orderable key of a float score: larger score -> larger key; -0 is +0 */
static inline uint32_t a2n_score_key(float f) {
    f += 0.0f;
    uint32_t b;
    __builtin_memcpy(&b, &f, 4);
    return b ^ ((b & 0x80000000u) ? 0xFFFFFFFFu : 0x80000000u);
}

/* ---- select.c's and topk.c's, shared with rerank.c ---- */
#define A2N_HBITS 11                  /* top bits of a score key in the first histogram */
#define A2N_HSIZE (1 << A2N_HBITS)

/* out[h * stride] = scale * q[h] . row for n heads q[h] = q + h * qs (d elements); row f32
 * (f16 = 0) or f16 */
void a2n_dots_heads(const float *q, int64_t qs, int64_t n, int64_t d, const void *row, int f16,
                    float *out, int64_t stride, float scale);
/* out[h * stride + r] = scale * q[h] . rows[r] for n heads and nr rows (f32 or f16): as
 * a2n_dots_heads row by row, two rows at a time where the SIMD path can */
void a2n_dots_rows(const float *q, int64_t qs, int64_t n, int64_t d, const void *const *rows,
                   int64_t nr, int f16, float *out, int64_t stride, float scale);
/* (topk.c) mark in bits the top-K of float scores sc[0..n) (n > K), ties to the smaller index
 * (the radix pick's order of a2n_score_key); key: n uint32, hist: A2N_HSIZE, list: n int32 of
 * scratch */
void a2n_topk_f32(const float *sc, int64_t n, int64_t K, uint32_t *key, uint32_t *hist,
                  int32_t *list, uint64_t *bits);
/* prefetch rows ix[0..n) of base (row_bytes each) */
void a2n_prefetch_rows(const char *base, const int64_t *ix, int64_t n, int64_t row_bytes);
/* (dots.c) every selected position idx[(s, k), 0..lens) within [0, caps[s]): A2N_E_INDEX if
 * not; lens already checked against kmax */
int a2n_sel_index_check(int64_t S, int64_t G, const int64_t *caps, const int64_t *idx, int64_t kmax,
                        const int32_t *lens, int n_threads);
/* per-sequence (G, caps[s], d) row arrays: sizes that fit, non-NULL where caps[s] > 0 */
int a2n_kv_checks(int64_t S, int64_t G, int64_t d, const void *const *arr, const int64_t *caps);
/* (kv_quant.c) bytes of a host store row of d values of KV cache type `type` (A2N_KV_*), or
 * A2N_E_ARG for a type the retrieval kernels do not read or a d it cannot hold */
int64_t a2n_kv_row_bytes(int type, int64_t d);
/* one row of d values of such a type -> float32 dst (f16 widened, blocks decoded, f32 copied) */
void a2n_kv_decode_row(const void *src, int type, int64_t d, float *dst);
#endif
