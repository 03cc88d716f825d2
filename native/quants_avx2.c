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

#else
/* compiled without AVX2: quants.c uses the scalar decoders only */
typedef int a2n_no_avx2;
#endif
