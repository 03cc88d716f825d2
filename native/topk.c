/* Exact top-K of n scores, ties to the smaller position, in O(n): shared by the LUT selection
 * (retrieval.c) and the exact re-rank (rerank.c). The picks are marked in a bitmap.
 *
 * Float scores (a2n_topk_f32): one pass finds their min and max, a histogram of TOPK_BINS
 * linear bins between the two finds the bin holding the K-th largest, and only that bin's
 * scores go through the radix refinement on the float bits. Bins are monotone in the score
 * (a rounded subtraction and a product by a positive constant keep the order), so every score
 * of a higher bin is larger than every score of the bin and all scores of lower ones are
 * smaller: the result is the radix pick's, exactly. Why linear bins: the top bits of a float
 * (sign, exponent, two mantissa bits) put most of one head's scores in a handful of buckets,
 * and consecutive increments of one bucket serialize through memory; spread over many bins
 * they do not. Non-finite scores or a zero range: the radix pick over every score's bits. */
#include <math.h>
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"
#include "sel_common.h"
#if A2N_HAVE_AVX2
#include <immintrin.h>
#endif

#define TOPK_BINS 1024          /* linear bins (<= A2N_HSIZE: the caller's histogram) */

/* highest bucket b with count(> b) < need <= count(>= b); *above = count(> b) */
static int find_bucket(const uint32_t *hist, int size, int64_t need, int64_t *above) {
    int64_t acc = 0;
    int b = size - 1;
    for (; b > 0; b--) {
        if (acc + hist[b] >= need) break;
        acc += hist[b];
    }
    *above = acc;
    return b;
}

/* mark the `need` largest of key[list[0..nl)) in bits (list in position order: ties to the
 * earlier entry), radix levels lv.. of the 32-bit keys (11, 11 and 10 bits from the top) */
static void refine(const uint32_t *key, int32_t *list, int64_t nl, int64_t need, int lv,
                   uint32_t *hist, uint64_t *bits) {
    static const int shifts[3] = {32 - A2N_HBITS, 32 - 2 * A2N_HBITS, 0};
    static const uint32_t masks[3] = {A2N_HSIZE - 1, A2N_HSIZE - 1, (1u << (32 - 2 * A2N_HBITS)) - 1};
    for (; lv < 3 && need < nl; lv++) {
        memset(hist, 0, A2N_HSIZE * sizeof *hist);
        for (int64_t i = 0; i < nl; i++) hist[(key[list[i]] >> shifts[lv]) & masks[lv]]++;
        int64_t above;
        const uint32_t b = (uint32_t)find_bucket(hist, (int)masks[lv] + 1, need, &above);
        int64_t kept = 0;
        for (int64_t i = 0; i < nl; i++) {   /* in place, position order kept */
            const uint32_t v = (key[list[i]] >> shifts[lv]) & masks[lv];
            if (v > b) set_bit(bits, list[i]);
            else if (v == b) list[kept++] = list[i];
        }
        nl = kept;
        need -= above;
    }
    /* equal keys (or the whole bucket): the first `need` in position order */
    for (int64_t i = 0; i < need && i < nl; i++) set_bit(bits, list[i]);
}

/* indices with bucket[i] > b into bits, == b onto list (returns its length); bucket[i] is
 * key[i] >> shift */
static int64_t split_at(const uint32_t *key, int64_t n, int shift, uint32_t b, int32_t *list,
                        uint64_t *bits) {
    int64_t t = 0, nl = 0;
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        /* buckets fit in 31 bits (shift >= 1, or bins < 2^31): signed compares are exact */
        const __m256i vb = _mm256_set1_epi32((int)b);
        for (; t + 8 <= n; t += 8) {     /* t % 8 == 0: the 8 bits share one bitmap word */
            const __m256i h = _mm256_srli_epi32(_mm256_loadu_si256((const __m256i *)(key + t)), shift);
            const unsigned gt = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(h, vb)));
            unsigned eq = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(h, vb)));
            bits[t >> 6] |= (uint64_t)gt << (t & 63);
            for (; eq; eq &= eq - 1) list[nl++] = (int32_t)(t + __builtin_ctz(eq));
        }
    }
#endif
    for (; t < n; t++) {
        const uint32_t hb = key[t] >> shift;
        if (hb > b) set_bit(bits, t);
        else if (hb == b) list[nl++] = (int32_t)t;
    }
    return nl;
}

/* mark in bits the top-K of key[0..n) (n > K), ties to the smaller index; hist: the histogram
 * (A2N_HSIZE) of key >> (32 - A2N_HBITS); list: n int32 of scratch */
static void radix_pick(const uint32_t *key, int64_t n, int64_t K, uint32_t *hist, int32_t *list,
                       uint64_t *bits) {
    int64_t above;
    const uint32_t b1 = (uint32_t)find_bucket(hist, A2N_HSIZE, K, &above);
    const int64_t nl = split_at(key, n, 32 - A2N_HBITS, b1, list, bits);
    refine(key, list, nl, K - above, 1, hist, bits);
}

/* min and max of sc[0..n) (n >= 1); 0 when a score is not finite */
static int min_max(const float *sc, int64_t n, float *mn, float *mx) {
    int64_t i = 0;
    float lo = sc[0], hi = sc[0];
    int ok = 1;
#if A2N_HAVE_AVX2
    if (a2n_use_simd && n >= 8) {
        __m256 vl = _mm256_loadu_ps(sc), vh = vl, fin = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        const __m256 big = _mm256_set1_ps(3.4028234663852886e38f);
        const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        for (; i + 8 <= n; i += 8) {
            const __m256 v = _mm256_loadu_ps(sc + i);
            vl = _mm256_min_ps(vl, v);
            vh = _mm256_max_ps(vh, v);
            fin = _mm256_and_ps(fin, _mm256_cmp_ps(_mm256_and_ps(v, absm), big, _CMP_LE_OQ));
        }
        ok = _mm256_movemask_ps(fin) == 0xFF;
        float l8[8], h8[8];
        _mm256_storeu_ps(l8, vl);
        _mm256_storeu_ps(h8, vh);
        for (int x = 0; x < 8; x++) {
            lo = l8[x] < lo ? l8[x] : lo;
            hi = h8[x] > hi ? h8[x] : hi;
        }
    }
#endif
    for (; i < n; i++) {
        ok &= isfinite(sc[i]) != 0;
        lo = sc[i] < lo ? sc[i] : lo;
        hi = sc[i] > hi ? sc[i] : hi;
    }
    *mn = lo;
    *mx = hi;
    return ok;
}

/* key[i] = the linear bin of sc[i]: floor(min((sc[i] - mn) * scale, TOPK_BINS - 1)), and its
 * histogram */
static void bin_scores(const float *sc, int64_t n, float mn, float scale, uint32_t *key, uint32_t *hist) {
    int64_t i = 0;
    const float top = (float)(TOPK_BINS - 1);
#if A2N_HAVE_AVX2
    if (a2n_use_simd) {
        const __m256 vm = _mm256_set1_ps(mn), vs = _mm256_set1_ps(scale), vt = _mm256_set1_ps(top);
        for (; i + 8 <= n; i += 8) {
            const __m256 x = _mm256_min_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + i), vm), vs), vt);
            _mm256_storeu_si256((__m256i *)(key + i), _mm256_cvttps_epi32(x));
            for (int64_t r = i; r < i + 8; r++) hist[key[r]]++;
        }
    }
#endif
    for (; i < n; i++) {
        const float x = (sc[i] - mn) * scale;
        key[i] = (uint32_t)(x < top ? x : top);
        hist[key[i]]++;
    }
}

void a2n_topk_f32(const float *sc, int64_t n, int64_t K, uint32_t *key, uint32_t *hist,
                  int32_t *list, uint64_t *bits) {
    float mn, mx;
    const int finite = min_max(sc, n, &mn, &mx);
    const float range = mx - mn, scale = (float)TOPK_BINS / range;
    if (!finite || !(range > 0.0f) || !isfinite(range) || !isfinite(scale)) {
        memset(hist, 0, A2N_HSIZE * sizeof *hist);
        for (int64_t i = 0; i < n; i++) {
            key[i] = a2n_score_key(sc[i]);
            hist[key[i] >> (32 - A2N_HBITS)]++;
        }
        radix_pick(key, n, K, hist, list, bits);
        return;
    }
    memset(hist, 0, TOPK_BINS * sizeof *hist);
    bin_scores(sc, n, mn, scale, key, hist);
    int64_t above;
    const uint32_t b = (uint32_t)find_bucket(hist, TOPK_BINS, K, &above);
    const int64_t nl = split_at(key, n, 0, b, list, bits);
    for (int64_t i = 0; i < nl; i++) key[list[i]] = a2n_score_key(sc[list[i]]);
    refine(key, list, nl, K - above, 0, hist, bits);
}
