/* AVX2 block decoders: the same values as quants.c, 8 or 32 at a time.
 *
 * Bit-exact with gguf-py like the scalar code: every product and difference is
 * a separate float32 operation in gguf-py's order (d*q, (d*sc)*q - dmin*m),
 * never a fused multiply-add (the build passes -ffp-contract=off). The scale
 * fields are converted with F16C, which is exact for f16 -> f32. */
#include <string.h>
#include "internal.h"

#if A2N_HAVE_AVX2
#include <immintrin.h>

static inline float rd_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline __m256i load32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 8 signed / unsigned bytes of v (a 128-bit half) as 8 floats */
static inline __m256 i8_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
static inline __m256 u8_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

/* y[0..32) = d * q for 32 signed bytes q */
static inline void store_i8_scaled(__m256i q, __m256 d, float *y) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(y, _mm256_mul_ps(d, i8_ps(lo)));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(d, i8_ps(_mm_srli_si128(lo, 8))));
    _mm256_storeu_ps(y + 16, _mm256_mul_ps(d, i8_ps(hi)));
    _mm256_storeu_ps(y + 24, _mm256_mul_ps(d, i8_ps(_mm_srli_si128(hi, 8))));
}

/* y[0..32) = dl * q - ml for 32 unsigned bytes q (K-quant sub-block) */
static inline void store_u8_affine(__m256i q, __m256 dl, __m256 ml, float *y) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    _mm256_storeu_ps(y, _mm256_sub_ps(_mm256_mul_ps(dl, u8_ps(lo)), ml));
    _mm256_storeu_ps(y + 8, _mm256_sub_ps(_mm256_mul_ps(dl, u8_ps(_mm_srli_si128(lo, 8))), ml));
    _mm256_storeu_ps(y + 16, _mm256_sub_ps(_mm256_mul_ps(dl, u8_ps(hi)), ml));
    _mm256_storeu_ps(y + 24, _mm256_sub_ps(_mm256_mul_ps(dl, u8_ps(_mm_srli_si128(hi, 8))), ml));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (ggml's bytes_from_bits_32) */
static inline __m256i bits_to_bytes(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* 16 packed bytes -> 32 nibbles: low nibbles first (elements 0..15), then high */
static inline __m256i nibbles16(const uint8_t *p) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0f);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
}

void a2n_decode_f16_avx2(const uint8_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * i))));
    for (; i < n; i++) dst[i] = rd_f16(src + 2 * i);
}

void a2n_decode_bf16_avx2(const uint8_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 2 * i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
    }
    for (; i < n; i++) {
        uint32_t bits = (uint32_t)(src[2 * i] | (src[2 * i + 1] << 8)) << 16;
        memcpy(dst + i, &bits, 4);
    }
}

void a2n_f32_to_f16_avx2(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = a2n_f32_to_f16(src[i]);
}

void a2n_decode_q4_0_avx2(const uint8_t *src, int64_t n_blocks, float *y) {
    for (int64_t b = 0; b < n_blocks; b++, src += 18, y += 32) {
        const __m256i q = _mm256_sub_epi8(nibbles16(src + 2), _mm256_set1_epi8(8));
        store_i8_scaled(q, _mm256_set1_ps(rd_f16(src)), y);
    }
}

void a2n_decode_q5_0_avx2(const uint8_t *src, int64_t n_blocks, float *y) {
    for (int64_t b = 0; b < n_blocks; b++, src += 22, y += 32) {
        const __m256i hb = _mm256_and_si256(bits_to_bytes(src + 2), _mm256_set1_epi8(0x10));
        const __m256i q = _mm256_sub_epi8(_mm256_or_si256(nibbles16(src + 6), hb), _mm256_set1_epi8(16));
        store_i8_scaled(q, _mm256_set1_ps(rd_f16(src)), y);
    }
}

void a2n_decode_q8_0_avx2(const uint8_t *src, int64_t n_blocks, float *y) {
    for (int64_t b = 0; b < n_blocks; b++, src += 34, y += 32)
        store_i8_scaled(load32(src + 2), _mm256_set1_ps(rd_f16(src)), y);
}

void a2n_decode_q4_k_avx2(const uint8_t *src, int64_t n_blocks, float *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < n_blocks; b++, src += 144, y += 256) {
        const float d = rd_f16(src), dmin = rd_f16(src + 2);
        for (int g = 0; g < 4; g++) {
            const __m256i v = load32(src + 16 + 32 * g);
            for (int h = 0; h < 2; h++) {
                int sc, m;
                a2n_k_scale_min(src + 4, 2 * g + h, &sc, &m);
                const __m256i q = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, m4);
                store_u8_affine(q, _mm256_set1_ps(d * (float)sc), _mm256_set1_ps(dmin * (float)m),
                                y + 64 * g + 32 * h);
            }
        }
    }
}

void a2n_decode_q5_k_avx2(const uint8_t *src, int64_t n_blocks, float *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    for (int64_t b = 0; b < n_blocks; b++, src += 176, y += 256) {
        const float d = rd_f16(src), dmin = rd_f16(src + 2);
        const __m256i qh = load32(src + 16);
        for (int g = 0; g < 4; g++) {
            const __m256i v = load32(src + 48 + 32 * g);
            for (int h = 0; h < 2; h++) {
                const int k = 2 * g + h;
                int sc, m;
                a2n_k_scale_min(src + 4, k, &sc, &m);
                const __m256i lo = _mm256_and_si256(h ? _mm256_srli_epi16(v, 4) : v, m4);
                /* bit k of each qh byte -> bit 4; 16-bit shifts cannot leak across bytes after the mask */
                const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, k), one), 4);
                store_u8_affine(_mm256_or_si256(lo, hi), _mm256_set1_ps(d * (float)sc),
                                _mm256_set1_ps(dmin * (float)m), y + 32 * k);
            }
        }
    }
}

void a2n_decode_q6_k_avx2(const uint8_t *src, int64_t n_blocks, float *y) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m2 = _mm256_set1_epi8(3), c32 = _mm256_set1_epi8(32);
    for (int64_t b = 0; b < n_blocks; b++, src += 210, y += 256) {
        const float d = rd_f16(src + 208);
        const int8_t *sc = (const int8_t *)(src + 192);
        for (int g = 0; g < 2; g++) {
            const __m256i ql0 = load32(src + 64 * g), ql1 = load32(src + 64 * g + 32);
            const __m256i qh = load32(src + 128 + 32 * g);
            for (int s = 0; s < 4; s++) {
                const __m256i qlv = (s & 1) ? ql1 : ql0;
                const __m256i lo = _mm256_and_si256(s >= 2 ? _mm256_srli_epi16(qlv, 4) : qlv, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), m2);
                const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), c32);
                /* one scale per 16 elements: (d * sc) first, as gguf-py */
                const __m256 d0 = _mm256_set1_ps(d * (float)sc[8 * g + 2 * s]);
                const __m256 d1 = _mm256_set1_ps(d * (float)sc[8 * g + 2 * s + 1]);
                const __m128i lo128 = _mm256_castsi256_si128(q), hi128 = _mm256_extracti128_si256(q, 1);
                float *o = y + 128 * g + 32 * s;
                _mm256_storeu_ps(o, _mm256_mul_ps(d0, i8_ps(lo128)));
                _mm256_storeu_ps(o + 8, _mm256_mul_ps(d0, i8_ps(_mm_srli_si128(lo128, 8))));
                _mm256_storeu_ps(o + 16, _mm256_mul_ps(d1, i8_ps(hi128)));
                _mm256_storeu_ps(o + 24, _mm256_mul_ps(d1, i8_ps(_mm_srli_si128(hi128, 8))));
            }
        }
    }
}

/* ---- integer dot products for a2n_matmul_q ------------------------------ *
 * llama.cpp's ggml_vec_dot_{q4_0,q5_0,q8_0}_q8_0 and {q4_K,q5_K,q6_K}_q8_K
 * block math, for up to 8 activation vectors per pass over a weight row: the
 * weight quants of a block are unpacked into registers once and multiplied
 * with every vector's int8 quants (maddubs + madd, or VNNI dpbusd), the
 * scales are applied per block in float. Activations: a2n_q8act (see
 * internal.h), |q| <= 127 so that the sign trick and maddubs cannot overflow. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define A2N_VNNI(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define A2N_VNNI(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#endif

/* 8 int32 sums of 4 products u8 * s8 (u <= 128 or pairs that fit int16) */
static inline __m256i dot_us8(__m256i u, __m256i s) {
#ifdef A2N_VNNI
    return A2N_VNNI(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 signed quants of a Q4_0 / Q5_0 / Q8_0 block, in element order. */
static inline __attribute__((always_inline)) __m256i q8blk_quants(const int T, const uint8_t *blk) {
    switch (T) {
    case 2: return _mm256_sub_epi8(nibbles16(blk + 2), _mm256_set1_epi8(8));
    case 6: {
        const __m256i hb = _mm256_and_si256(bits_to_bytes(blk + 2), _mm256_set1_epi8(0x10));
        return _mm256_sub_epi8(_mm256_or_si256(nibbles16(blk + 6), hb), _mm256_set1_epi8(16));
    }
    default: return load32(blk + 2);
    }
}

/* One block into the accumulators acc[v] (one set of NV). */
static inline __attribute__((always_inline)) void q8blk_step(const int T, const int NV, const uint8_t *blk,
                                                            const int8_t *q, int64_t ldq, const float *d,
                                                            int64_t ldd, __m256 *acc) {
    const __m256i w = q8blk_quants(T, blk);
    const __m256i aw = _mm256_sign_epi8(w, w);   /* |w| <= 128 as u8 */
    const __m256 dw = _mm256_set1_ps(rd_f16(blk));
    for (int v = 0; v < NV; v++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(q + v * ldq));
        const __m256i p = dot_us8(aw, _mm256_sign_epi8(xv, w));
        const __m256 dd = _mm256_mul_ps(dw, _mm256_broadcast_ss(d + v * ldd));
        acc[v] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(p), acc[v]);
    }
}

#if A2N_HAVE_AVX512
/* Two blocks b, b + 1 of a 32-blocked type as unsigned quants u = w + K (K =
 * 8, 16, 128 for Q4_0, Q5_0, Q8_0: u is the unsigned operand of vpdpbusd, x
 * the signed one) in element order, and their two scales, 8 copies each. Q4_0
 * and Q5_0 come from one masked 64-byte load (no read past the pair) and one
 * byte permutation. */
static inline __attribute__((always_inline)) void pair_quants(const int T, const uint8_t *blk,
                                                             const uint8_t *w_end, __m512i *u, __m512 *dw) {
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    __m512i raw, wl;   /* wl: 16-bit lanes 0..7 = scale of b, 8..15 = scale of b + 1 */
    /* 64 bytes from blk, of which the pair uses the first 2 * BYTES: a plain
     * load (reading into the next blocks) except at the end of the weights,
     * where a masked one. (Masked loads throughout halve the streaming speed
     * from DRAM.) */
    const int PB = T == 2 ? 36 : T == 6 ? 44 : 36;
    if (__builtin_expect(blk + 64 <= w_end, 1)) raw = _mm512_loadu_si512(blk);
    else raw = _mm512_maskz_loadu_epi8((__mmask64)((1ull << PB) - 1), blk);
    if (T == 8) {
        *u = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(load32(blk + 2)), load32(blk + 36), 1),
                              _mm512_set1_epi8((char)0x80));
        wl = _mm512_permutexvar_epi16(_mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 17, 17, 17, 17,
                                                       17, 17, 17, 17, 0, 0, 0, 0, 0, 0, 0, 0),
                                      raw);
    } else {
        const int BYTES = T == 2 ? 18 : 22, QS = T == 2 ? 2 : 6;
        /* 16-byte pieces [qs_b, qs_b, qs_b1, qs_b1]: low nibbles of the 1st copy, high of the 2nd */
        uint8_t idx[64];
        for (int k = 0; k < 64; k++) idx[k] = (uint8_t)((k < 32 ? QS : BYTES + QS) + (k & 15));
        const __m512i z = _mm512_permutexvar_epi8(_mm512_loadu_si512(idx), raw);
        *u = _mm512_and_si512(_mm512_srlv_epi16(z, _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0,
                                                                     0x0004000400040004, 0x0004000400040004, 0, 0)),
                              m4);
        if (T == 6) {   /* bit k of qh -> +16 on element k */
            uint8_t hidx[64];
            for (int k = 0; k < 64; k++) hidx[k] = (uint8_t)((k < 32 ? 2 : BYTES + 2) + (k & 31) / 8);
            const __m512i hb = _mm512_permutexvar_epi8(_mm512_loadu_si512(hidx), raw);
            const __mmask64 m = _mm512_test_epi8_mask(hb, _mm512_set1_epi64(0x8040201008040201));
            *u = _mm512_mask_add_epi8(*u, m, *u, _mm512_set1_epi8(16));
        }
        const short hw = (short)(BYTES / 2);
        wl = _mm512_permutexvar_epi16(_mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, hw, hw, hw, hw,
                                                       hw, hw, hw, hw, 0, 0, 0, 0, 0, 0, 0, 0),
                                      raw);
    }
    *dw = _mm512_cvtph_ps(_mm512_castsi512_si256(wl));
}

/* One pair into the accumulators acc[v]: per block d_w * d_x * (u . x - K * sum x),
 * the correction from the activations' negated sums of 4 shifted by log2 K. */
static inline __attribute__((always_inline)) void q8pair_step(const int T, const int NV, const uint8_t *blk,
                                                             const uint8_t *xp, int64_t ldq, const uint8_t *w_end,
                                                             __m512 *acc) {
    const int LK = T == 2 ? 3 : T == 6 ? 4 : 7;
    __m512i u;
    __m512 dw;
    pair_quants(T, blk, w_end, &u, &dw);
    for (int v = 0; v < NV; v++) {
        const uint8_t *x = xp + v * ldq;
        const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(x + 128), LK);
        const __m512i p = _mm512_dpbusd_epi32(corr, u, _mm512_loadu_si512(x));
        acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_loadu_ps((const float *)(x + 64))),
                                 acc[v]);
    }
}

/* NV vectors; b0 is even (a pair boundary). (Several rows per call, sharing
 * the activation loads, is faster from cache but slower streaming from DRAM:
 * the prefetchers follow one stream best.) */
static inline __attribute__((always_inline)) void q8blk_row(const int T, const int BYTES, const int NV,
                                                           const uint8_t *row, int64_t nb,
                                                           const a2n_q8act *a, int64_t b0, float *out,
                                                           const uint8_t *w_end) {
    const int LK = T == 2 ? 3 : T == 6 ? 4 : 7;
    /* pairs alternate between two accumulator sets (FMA latency) whatever NV, so a
     * vector's sum is the same whichever vectors share the call (batch invariance) */
    __m512 acc0[8], acc1[8];
    for (int v = 0; v < NV; v++) acc0[v] = acc1[v] = _mm512_setzero_ps();
    const uint8_t *xp = (const uint8_t *)a->q + b0 / 2 * 192;
    const int64_t ldq = a->ldq;
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        q8pair_step(T, NV, row + b * BYTES, xp + b / 2 * 192, ldq, w_end, acc0);
        q8pair_step(T, NV, row + (b + 2) * BYTES, xp + (b / 2 + 1) * 192, ldq, w_end, acc1);
    }
    for (; b + 2 <= nb; b += 2) q8pair_step(T, NV, row + b * BYTES, xp + b / 2 * 192, ldq, w_end, acc0);
    if (b < nb) {   /* an odd last block: the first half of its pair, 256-bit */
        const __m256i u = _mm256_add_epi8(q8blk_quants(T, row + b * BYTES), _mm256_set1_epi8((char)(1 << LK)));
        const __m256 dw = _mm256_set1_ps(rd_f16(row + b * BYTES));
        for (int v = 0; v < NV; v++) {
            const uint8_t *x = xp + v * ldq + b / 2 * 192;
            const __m256i corr = _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(x + 128)), LK);
            const __m256i p = _mm256_dpbusd_epi32(corr, u, _mm256_loadu_si256((const __m256i *)x));
            const __m256 t =
                _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dw, _mm256_loadu_ps((const float *)(x + 64))));
            acc0[v] = _mm512_add_ps(acc0[v], _mm512_zextps256_ps512(t));
        }
    }
    for (int v = 0; v < NV; v++) acc0[v] = _mm512_add_ps(acc0[v], acc1[v]);
    for (int v = 0; v < NV; v++) out[v] = _mm512_reduce_add_ps(acc0[v]);
}
#else
static inline __attribute__((always_inline)) void q8blk_row(const int T, const int BYTES, const int NV,
                                                           const uint8_t *row, int64_t nb,
                                                           const a2n_q8act *a, int64_t b0, float *out,
                                                           const uint8_t *w_end) {
    (void)w_end;   /* every load stays inside its block */
    __m256 acc0[8], acc1[8];
    for (int v = 0; v < NV; v++) acc0[v] = acc1[v] = _mm256_setzero_ps();
    const int8_t *q = a->q + b0 * 32;
    const float *d = a->d + b0;
    int64_t b = 0;
    if (NV <= 4)   /* few vectors: blocks in pairs into two accumulator sets (FMA latency) */
        for (; b + 2 <= nb; b += 2) {
            q8blk_step(T, NV, row + b * BYTES, q + b * 32, a->ldq, d + b, a->ldd, acc0);
            q8blk_step(T, NV, row + (b + 1) * BYTES, q + (b + 1) * 32, a->ldq, d + b + 1, a->ldd, acc1);
        }
    for (; b < nb; b++) q8blk_step(T, NV, row + b * BYTES, q + b * 32, a->ldq, d + b, a->ldd, acc0);
    for (int v = 0; v < NV; v++) out[v] = hsum8(_mm256_add_ps(acc0[v], acc1[v]));
}
#endif

/* byte shuffle that broadcasts 16-bit lane i (0..7) of each 128-bit half */
static inline __m256i bcast16(__m256i v, int i) {
    return _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)(((2 * i + 1) << 8) | (2 * i))));
}

/* Q4_K (T 12) / Q5_K (T 13) row: per super-block sum_s sc_s * (q_s . x_s) in
 * int32, times d * d_x; minus dmin * d_x * sum_s m_s * (sum of x_s quants). */
static inline __attribute__((always_inline)) void qk45_row(const int T, const int NV, const uint8_t *row,
                                                          int64_t nb, const a2n_q8act *a, int64_t b0,
                                                          float *out) {
    const int BYTES = T == 12 ? 144 : 176;
    const __m256i m4 = _mm256_set1_epi8(0x0f), one = _mm256_set1_epi8(1);
    __m256 acc[8];
    for (int v = 0; v < NV; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * BYTES;
        uint32_t u[4];
        memcpy(u, blk + 4, 12);   /* ggml's unpacking of the 6-bit scales and mins */
        u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        const uint32_t m1 = u[1] & 0x3f3f3f3f;
        u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        u[2] = m1;
        u[0] &= 0x3f3f3f3f;
        const __m256i sm = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
        const __m128i mins = _mm256_extracti128_si256(sm, 1);
        const __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(sm));
        const float d = rd_f16(blk), dmin = rd_f16(blk + 2);
        const __m256i qh = T == 13 ? load32(blk + 16) : _mm256_setzero_si256();
        const uint8_t *qs = blk + (T == 12 ? 16 : 48);
        __m256i sumi[8];
        for (int v = 0; v < NV; v++) sumi[v] = _mm256_setzero_si256();
        const int8_t *q = a->q + (b0 + b) * 256;
        for (int j = 0; j < 4; j++) {
            const __m256i bits = load32(qs + 32 * j);
            __m256i ql = _mm256_and_si256(bits, m4), qhi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            if (T == 13) {
                ql = _mm256_or_si256(ql, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), one), 4));
                qhi = _mm256_or_si256(qhi,
                                      _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j + 1), one), 4));
            }
            const __m256i sl = bcast16(scales, 2 * j), sh = bcast16(scales, 2 * j + 1);
            for (int v = 0; v < NV; v++) {
                const int8_t *qv = q + v * a->ldq + 64 * j;
                const __m256i pl = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(ql, _mm256_loadu_si256((const __m256i *)qv)), sl);
                const __m256i ph = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(qhi, _mm256_loadu_si256((const __m256i *)(qv + 32))), sh);
                sumi[v] = _mm256_add_epi32(sumi[v], _mm256_add_epi32(pl, ph));
            }
        }
        for (int v = 0; v < NV; v++) {
            const float dx = a->d[v * a->ldd + b0 + b];
            const __m128i s32 = _mm_loadu_si128((const __m128i *)(a->s32 + v * a->lds32 + (b0 + b) * 8));
            const __m256i pm = _mm256_inserti128_si256(_mm256_setzero_si256(), _mm_madd_epi16(mins, s32), 0);
            acc[v] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(sumi[v]), acc[v]);
            acc[v] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * dx), _mm256_cvtepi32_ps(pm), acc[v]);
        }
    }
    for (int v = 0; v < NV; v++) out[v] = hsum8(acc[v]);
}

/* Q6_K row: unsigned 6-bit quants q (0..63) times x per 16 with int8 scales,
 * minus 32 * sum_j sc_j * (sum of x quants j) per super-block. */
static inline __attribute__((always_inline)) void q6k_row(const int NV, const uint8_t *row, int64_t nb,
                                                         const a2n_q8act *a, int64_t b0, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), m3 = _mm256_set1_epi8(3);
    /* within each 128-bit half: low half broadcasts int16 0, high half int16 1 */
    const __m256i half_sel = _mm256_set_epi64x(0x0302030203020302, 0x0302030203020302,
                                               0x0100010001000100, 0x0100010001000100);
    __m256 acc[8];
    for (int v = 0; v < NV; v++) acc[v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 210;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
        const float d = rd_f16(blk + 208);
        __m256i sumi[8];
        for (int v = 0; v < NV; v++) sumi[v] = _mm256_setzero_si256();
        const int8_t *q = a->q + (b0 + b) * 256;
        for (int g = 0; g < 2; g++) {
            const __m256i ql0 = load32(blk + 64 * g), ql1 = load32(blk + 64 * g + 32);
            const __m256i qh = load32(blk + 128 + 32 * g);
            for (int ss = 0; ss < 4; ss++) {
                const __m256i qlv = (ss & 1) ? ql1 : ql0;
                const __m256i lo = _mm256_and_si256(ss >= 2 ? _mm256_srli_epi16(qlv, 4) : qlv, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * ss), m3);
                const __m256i q6 = _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4));
                const __m256i sc = _mm256_shuffle_epi8(
                    _mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(4 * g + ss)), half_sel);
                for (int v = 0; v < NV; v++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(q + v * a->ldq + 128 * g + 32 * ss));
                    sumi[v] = _mm256_add_epi32(sumi[v], _mm256_madd_epi16(_mm256_maddubs_epi16(q6, xv), sc));
                }
            }
        }
        for (int v = 0; v < NV; v++) {
            const float dx = a->d[v * a->ldd + b0 + b];
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a->s16 + v * a->lds16 + (b0 + b) * 16));
            const __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
            acc[v] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx), _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[v], corr)),
                                     acc[v]);
        }
    }
    for (int v = 0; v < NV; v++) out[v] = hsum8(acc[v]);
}

#if A2N_HAVE_AVX512
/* 512-bit versions of qk45_row / q6k_row: two sub-blocks of 32 (Q6_K: four
 * scale groups of 16) per register, madd + add fused into vpdpwssd. */
static inline __m512i upper_half_epi16(int lo, int hi) {   /* 16-bit lanes: lo in bits 0..255, hi above */
    return _mm512_inserti64x4(_mm512_set1_epi16((short)lo), _mm256_set1_epi16((short)hi), 1);
}
static inline __m512i upper_half_epi8(int lo, int hi) {
    return _mm512_inserti64x4(_mm512_set1_epi8((char)lo), _mm256_set1_epi8((char)hi), 1);
}

static inline __attribute__((always_inline)) void qk45_row512(const int T, const int NV, const uint8_t *row,
                                                             int64_t nb, const a2n_q8act *a, int64_t b0,
                                                             float *out) {
    const int BYTES = T == 12 ? 144 : 176;
    const __m512i m4 = _mm512_set1_epi8(0x0f), sh = upper_half_epi16(0, 4);
    __m512 acc[8];
    for (int v = 0; v < NV; v++) acc[v] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * BYTES;
        uint32_t u[4];
        memcpy(u, blk + 4, 12);   /* ggml's unpacking of the 6-bit scales and mins */
        u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
        const uint32_t m1 = u[1] & 0x3f3f3f3f;
        u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
        u[2] = m1;
        u[0] &= 0x3f3f3f3f;
        const __m256i sm = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
        const __m512i sm512 = _mm512_castsi256_si512(sm);
        const __m128i mins = _mm256_extracti128_si256(sm, 1);
        const float d = rd_f16(blk), dmin = rd_f16(blk + 2);
        const __m512i qh = T == 13 ? _mm512_broadcast_i64x4(load32(blk + 16)) : _mm512_setzero_si512();
        const uint8_t *qs = blk + (T == 12 ? 16 : 48);
        const uint8_t *q = (const uint8_t *)a->q + (b0 + b) * 256;
        __m512i sumi[8];
        for (int v = 0; v < NV; v++) sumi[v] = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            /* sub-blocks 2j (low nibbles) and 2j + 1 (high nibbles) */
            __m512i z = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(load32(qs + 32 * j)), sh), m4);
            if (T == 13)
                z = _mm512_mask_add_epi8(z, _mm512_test_epi8_mask(qh, upper_half_epi8(1 << (2 * j), 1 << (2 * j + 1))),
                                         z, _mm512_set1_epi8(16));
            const __m512i sc = _mm512_permutexvar_epi16(upper_half_epi16(2 * j, 2 * j + 1), sm512);
            for (int v = 0; v < NV; v++)
                sumi[v] = _mm512_dpwssd_epi32(
                    sumi[v], _mm512_maddubs_epi16(z, _mm512_loadu_si512(q + v * a->ldq + 64 * j)), sc);
        }
        for (int v = 0; v < NV; v++) {
            const float dx = a->d[v * a->ldd + b0 + b];
            const __m128i s32 = _mm_loadu_si128((const __m128i *)(a->s32 + v * a->lds32 + (b0 + b) * 8));
            const __m512i pm = _mm512_zextsi128_si512(_mm_madd_epi16(mins, s32));
            acc[v] = _mm512_fmadd_ps(_mm512_set1_ps(d * dx), _mm512_cvtepi32_ps(sumi[v]), acc[v]);
            acc[v] = _mm512_fnmadd_ps(_mm512_set1_ps(dmin * dx), _mm512_cvtepi32_ps(pm), acc[v]);
        }
    }
    for (int v = 0; v < NV; v++) out[v] = _mm512_reduce_add_ps(acc[v]);
}

static inline __attribute__((always_inline)) void q6k_row512(const int NV, const uint8_t *row, int64_t nb,
                                                            const a2n_q8act *a, int64_t b0, float *out) {
    const __m512i m4 = _mm512_set1_epi8(0x0f), m3 = _mm512_set1_epi8(3);
    __m512 acc[8];
    for (int v = 0; v < NV; v++) acc[v] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 210;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
        const __m512i sc512 = _mm512_castsi256_si512(sc16);
        const float d = rd_f16(blk + 208);
        const uint8_t *q = (const uint8_t *)a->q + (b0 + b) * 256;
        __m512i sumi[8];
        for (int v = 0; v < NV; v++) sumi[v] = _mm512_setzero_si512();
        for (int g = 0; g < 2; g++) {
            const __m512i ql = _mm512_loadu_si512(blk + 64 * g);
            const __m512i qh = _mm512_broadcast_i64x4(load32(blk + 128 + 32 * g));
            for (int h = 0; h < 2; h++) {   /* elements 128g + 64h .. + 63: sub-blocks 2h, 2h + 1 of group g */
                const __m512i lo = _mm512_and_si512(h ? _mm512_srli_epi16(ql, 4) : ql, m4);
                const __m512i hi = _mm512_and_si512(_mm512_srlv_epi16(qh, upper_half_epi16(4 * h, 4 * h + 2)), m3);
                const __m512i q6 = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
                const int P = 4 * (2 * g + h);   /* its scales P .. P + 3, 16 elements each */
                const __m512i idx = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16((short)(P + 1)), _mm_set1_epi16((short)P))),
                    _mm256_set_m128i(_mm_set1_epi16((short)(P + 3)), _mm_set1_epi16((short)(P + 2))), 1);
                const __m512i sc = _mm512_permutexvar_epi16(idx, sc512);
                for (int v = 0; v < NV; v++)
                    sumi[v] = _mm512_dpwssd_epi32(
                        sumi[v], _mm512_maddubs_epi16(q6, _mm512_loadu_si512(q + v * a->ldq + 128 * g + 64 * h)), sc);
            }
        }
        for (int v = 0; v < NV; v++) {
            const float dx = a->d[v * a->ldd + b0 + b];
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(a->s16 + v * a->lds16 + (b0 + b) * 16));
            const __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);   /* 32 * sum sc_j * bs_j */
            const __m512i si = _mm512_sub_epi32(sumi[v], _mm512_zextsi256_si512(corr));
            acc[v] = _mm512_fmadd_ps(_mm512_set1_ps(d * dx), _mm512_cvtepi32_ps(si), acc[v]);
        }
    }
    for (int v = 0; v < NV; v++) out[v] = _mm512_reduce_add_ps(acc[v]);
}
#define qk45_row qk45_row512
#define q6k_row q6k_row512
#endif

static inline __attribute__((always_inline)) void q8dot_row(const int T, const int NV, const uint8_t *row,
                                                           int64_t nb, const a2n_q8act *a, int64_t b0,
                                                           float *out, const uint8_t *w_end) {
    switch (T) {
    case 2: q8blk_row(2, 18, NV, row, nb, a, b0, out, w_end); break;
    case 6: q8blk_row(6, 22, NV, row, nb, a, b0, out, w_end); break;
    case 8: q8blk_row(8, 34, NV, row, nb, a, b0, out, w_end); break;
    case 12: qk45_row(12, NV, row, nb, a, b0, out); break;
    case 13: qk45_row(13, NV, row, nb, a, b0, out); break;
    case 14: q6k_row(NV, row, nb, a, b0, out); break;
    }
}

/* nr rows x nv vectors (1..8), out[r * 8 + v]. One row at a time: processing
 * several rows at once (sharing the activation loads) is faster from cache
 * but slower when streaming from DRAM (the prefetchers follow one stream). */
#define Q8DOT(T)                                                                                     \
    static void q8dot_##T(const uint8_t *row, int64_t row_bytes, int nr, int64_t nb, const a2n_q8act *a, \
                          int64_t b0, int nv, float *out, const uint8_t *w_end) {                    \
        for (int r = 0; r < nr; r++, row += row_bytes, out += 8) switch (nv) {                      \
            case 1: q8dot_row(T, 1, row, nb, a, b0, out, w_end); break;                              \
            case 2: q8dot_row(T, 2, row, nb, a, b0, out, w_end); break;                              \
            case 3: q8dot_row(T, 3, row, nb, a, b0, out, w_end); break;                              \
            case 4: q8dot_row(T, 4, row, nb, a, b0, out, w_end); break;                              \
            case 5: q8dot_row(T, 5, row, nb, a, b0, out, w_end); break;                              \
            case 6: q8dot_row(T, 6, row, nb, a, b0, out, w_end); break;                              \
            case 7: q8dot_row(T, 7, row, nb, a, b0, out, w_end); break;                              \
            default: q8dot_row(T, 8, row, nb, a, b0, out, w_end); break;                             \
            }                                                                                        \
    }
Q8DOT(2)
Q8DOT(6)
Q8DOT(8)
Q8DOT(12)
Q8DOT(13)
Q8DOT(14)

a2n_q8dot_fn a2n_q8dot_for(int ggml_type) {
    switch (ggml_type) {
    case 2: return q8dot_2;
    case 6: return q8dot_6;
    case 8: return q8dot_8;
    case 12: return q8dot_12;
    case 13: return q8dot_13;
    case 14: return q8dot_14;
    default: return NULL;
    }
}
#else
/* compiled without AVX2: quants.c uses the scalar decoders only */
typedef int a2n_no_avx2;
#endif
