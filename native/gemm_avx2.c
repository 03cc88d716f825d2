/* AVX2 kernels of the int8 products: NA (1..4) activation rows times one group
 * of 8 repacked weight rows (layouts in repack.c), over all of n_in.
 *
 * Register j of a weight run (8 rows x 4 quants) is multiplied by the broadcast
 * of the activation's 4 quants with maddubs (unsigned weight quants x signed
 * activations), giving each row's partial sums in its own 2 int16 lanes;
 * those are summed in int16 as far as they cannot overflow (|q_x| <= 127:
 * 8 terms for 4-bit, 4 for 5-bit, 2 for 6-bit quants), then madd (x 1 or x the
 * sub-block scales) makes one int32 lane per row. The unsigned quants' offsets
 * (Q4_0 8, Q5_0 16, Q6_K 32) and the K types' mins are subtracted with the
 * activation sums; Q8_0 is signed and takes the sign trick. Per weight block:
 * acc = fma(float(int sum), d_w * d_x, acc), lane r = output row r: no
 * horizontal sums. Each activation row's operations are the same whatever NA
 * is, and gemm_ref.c computes the same values in the same order, so both paths
 * give identical bits. With many activation rows the driver unpacks a group's
 * quants once into bytes (the expand functions) and the EX instances read them
 * instead of unpacking per tile: the same integers, so the same bits. */
#include <string.h>
#include "internal.h"

#if A2N_HAVE_AVX2
#include <immintrin.h>

/* GCC's temporary-expression replacement would move the int16 sums down to their
 * use and keep every maddubs result alive meanwhile (spilling most of them);
 * without it (and the reassociation of the integer sums) the sums stay in
 * the order written: a few live registers per activation row. */
#pragma GCC optimize("no-tree-ter", "no-tree-reassoc")

#define INLINE static inline __attribute__((always_inline))

INLINE __m256i load32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* the same, loaded once into a register: GCC would fold the load into every instruction that
 * reads it, and loads (two a cycle) are what the 1-row kernels run out of first */
INLINE __m256i load32r(const uint8_t *p) {
    __m256i v = load32(p);
    __asm__("" : "+x"(v));
    return v;
}
INLINE __m256 f16x8(const uint8_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
/* 4 activation quants broadcast to the 8 rows' lanes */
INLINE __m256i bc4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* bit j of each byte moved to bit 4 (a 16-bit shift: the bit stays in its byte) */
INLINE __m256i bit4(__m256i qh, const int j) {
    const __m256i m = _mm256_set1_epi8(0x10);
    if (j < 4) return _mm256_and_si256(_mm256_slli_epi16(qh, 4 - j), m);
    if (j == 4) return _mm256_and_si256(qh, m);
    return _mm256_and_si256(_mm256_srli_epi16(qh, j - 4), m);
}

/* 4-bit quants of register j of a nibble run from its 4 registers as loaded (p) */
INLINE __m256i nib_reg(const __m256i *p, const int j) {
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    return j < 4 ? _mm256_and_si256(p[j], m4) : _mm256_and_si256(_mm256_srli_epi16(p[j & 3], 4), m4);
}

INLINE void store8(float *y, __m256 v, int nvalid) {
    if (nvalid == 8) {
        _mm256_storeu_ps(y, v);
        return;
    }
    float t[8];
    _mm256_storeu_ps(t, v);
    memcpy(y, t, (size_t)nvalid * sizeof(float));
}

/* The unsigned quants of register j of a Q4_0 (T 2) / Q5_0 (T 6) block or K sub-block (T 12,
 * 13) from its registers as loaded: p[0..3] the nibbles, p[4] the 5th bits (T 6, 13). The
 * kernels load each register once: it feeds two (nibbles) or eight (5th bits) registers. */
INLINE __m256i q45_reg(const int T, const __m256i *p, const int j) {
    const __m256i u = nib_reg(p, j);
    return T == 6 || T == 13 ? _mm256_or_si256(u, bit4(p[4], j)) : u;
}

/* the same from the block itself (a Q4_0 / Q5_0 block: nibbles at 16, 5th bits at 144) */
INLINE __m256i q45_u(const int T, const uint8_t *blk, const int j) {
    __m256i p[5];
    for (int t = 0; t < (T == 2 ? 4 : 5); t++) p[t] = load32(blk + 16 + 32 * t);
    return q45_reg(T, p, j);
}

/* Q4_0 (T 2) / Q5_0 (T 6); EX: the quants come unpacked from ex (256 bytes per block) */
INLINE void k_q4q5(const int T, const int NA, const int EX, const uint8_t *w, int64_t nb, const uint8_t *ex,
                   const uint8_t *act, int64_t stride, int64_t n_in, float *y, int64_t ldy, int nvalid) {
    const int BYTES = T == 2 ? 144 : 176;
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *xq[A2N_GEMM_NA];
    const float *xd[A2N_GEMM_NA];
    const int32_t *xc[A2N_GEMM_NA];
    __m256 acc[A2N_GEMM_NA];
    for (int a = 0; a < NA; a++) {
        xq[a] = act + a * stride;
        xd[a] = (const float *)(xq[a] + n_in);
        xc[a] = (const int32_t *)(xd[a] + nb) + (T == 2 ? 0 : nb);
        acc[a] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++, w += BYTES) {
        __m256i s[A2N_GEMM_NA], i32[A2N_GEMM_NA], p[5];
        for (int t = 0; t < (T == 2 ? 4 : 5) && !EX; t++) p[t] = load32r(w + 16 + 32 * t);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i u = EX ? load32(ex + 256 * b + 32 * j) : q45_reg(T, p, j);
#pragma GCC unroll 8
            for (int a = 0; a < NA; a++) {
                const __m256i m = _mm256_maddubs_epi16(u, bc4(xq[a] + 32 * b + 4 * j));
                s[a] = (j & (T == 2 ? 7 : 3)) ? _mm256_add_epi16(s[a], m) : m;
            }
            if (T == 6 && j == 3)   /* 5-bit quants: 4 terms fit int16 */
                for (int a = 0; a < NA; a++) i32[a] = _mm256_madd_epi16(s[a], ones);
        }
        const __m256 dw = f16x8(w);
        for (int a = 0; a < NA; a++) {
            __m256i i = _mm256_madd_epi16(s[a], ones);
            if (T == 6) i = _mm256_add_epi32(i32[a], i);
            i = _mm256_add_epi32(i, _mm256_set1_epi32(xc[a][b]));
            acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dw, _mm256_set1_ps(xd[a][b])), acc[a]);
        }
    }
    for (int a = 0; a < NA; a++) store8(y + a * ldy, acc[a], nvalid);
}

/* Q8_0: |w| as the unsigned operand, the activations with w's sign. |w| = max(w, -w) (-128:
 * 128 unsigned) takes two operations off the two ports that maddubs, madd and sign share,
 * where vpabsb would take a third slot there. */
INLINE void k_q8(const int NA, const uint8_t *w, int64_t nb, const uint8_t *act, int64_t stride, int64_t n_in,
                 float *y, int64_t ldy, int nvalid) {
    const __m256i ones = _mm256_set1_epi16(1);
    const uint8_t *xq[A2N_GEMM_NA];
    const float *xd[A2N_GEMM_NA];
    __m256 acc[A2N_GEMM_NA];
    for (int a = 0; a < NA; a++) {
        xq[a] = act + a * stride;
        xd[a] = (const float *)(xq[a] + n_in);
        acc[a] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++, w += 272) {
        __m256i i32[A2N_GEMM_NA];
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            const __m256i q = load32r(w + 16 + 32 * j);
            const __m256i aq = _mm256_max_epi8(q, _mm256_sub_epi8(_mm256_setzero_si256(), q));
#pragma GCC unroll 8
            for (int a = 0; a < NA; a++) {
                const __m256i p = _mm256_madd_epi16(
                    _mm256_maddubs_epi16(aq, _mm256_sign_epi8(bc4(xq[a] + 32 * b + 4 * j), q)), ones);
                i32[a] = j ? _mm256_add_epi32(i32[a], p) : p;
            }
        }
        const __m256 dw = f16x8(w);
        for (int a = 0; a < NA; a++)
            acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[a]), _mm256_mul_ps(dw, _mm256_set1_ps(xd[a][b])), acc[a]);
    }
    for (int a = 0; a < NA; a++) store8(y + a * ldy, acc[a], nvalid);
}

/* lanes (2r, 2r+1) = the 8 bytes p[r], zero-extended */
INLINE __m256i dup_u8(const uint8_t *p) {
    int64_t v;
    memcpy(&v, p, 8);
    const __m128i x = _mm_cvtsi64_si128(v);
    return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(x, x));
}

/* The registers of sub-block s of a Q4_K (T 12) / Q5_K (T 13) block for q45_reg: p[0..3] at
 * 160 + 128 s, p[4] at 1184 + 32 s; R: each into a register once (load32r). */
INLINE void k45_load(const int T, const int R, const uint8_t *blk, const int s, __m256i *p) {
    const uint8_t *nib = blk + 160 + 128 * s, *qh = blk + 1184 + 32 * s;
    for (int t = 0; t < 4; t++) p[t] = R ? load32r(nib + 32 * t) : load32(nib + 32 * t);
    if (T == 13) p[4] = R ? load32r(qh) : load32(qh);
}

/* The unsigned quants of register j of sub-block s of a Q4_K / Q5_K block. */
INLINE __m256i k45_u(const int T, const uint8_t *blk, const int s, const int j) {
    __m256i p[5];
    k45_load(T, 0, blk, s, p);
    return q45_reg(T, p, j);
}

/* Q4_K (T 12) / Q5_K (T 13): per sub-block sc * (u . x); minus sum m * (sum x). EX: the
 * quants come unpacked from ex (2048 bytes per block) */
INLINE void k_q4q5k(const int T, const int NA, const int EX, const uint8_t *w, int64_t nb, const uint8_t *ex,
                    const uint8_t *act, int64_t stride, int64_t n_in, float *y, int64_t ldy, int nvalid) {
    const int BYTES = T == 12 ? 1184 : 1440;
    const uint8_t *xq[A2N_GEMM_NA];
    const float *xd[A2N_GEMM_NA];
    const int16_t *xs32[A2N_GEMM_NA];
    __m256 acc[A2N_GEMM_NA];
    for (int a = 0; a < NA; a++) {
        xq[a] = act + a * stride;
        xd[a] = (const float *)(xq[a] + n_in);
        xs32[a] = (const int16_t *)(xd[a] + nb) + n_in / 16;
        acc[a] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++, w += BYTES) {
        __m256i isum[A2N_GEMM_NA];
        for (int a = 0; a < NA; a++) isum[a] = _mm256_setzero_si256();
        for (int s = 0; s < 8; s++) {
            const __m256i sc = dup_u8(w + 32 + 8 * s);
            __m256i s16[A2N_GEMM_NA], p[5];
            if (!EX) k45_load(T, 1, w, s, p);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const __m256i u = EX ? load32(ex + 2048 * b + 256 * s + 32 * j) : q45_reg(T, p, j);
#pragma GCC unroll 8
                for (int a = 0; a < NA; a++) {
                    const __m256i m = _mm256_maddubs_epi16(u, bc4(xq[a] + 256 * b + 32 * s + 4 * j));
                    s16[a] = (j & (T == 12 ? 7 : 3)) ? _mm256_add_epi16(s16[a], m) : m;
                }
                if (j == 7 || (T == 13 && j == 3))
                    for (int a = 0; a < NA; a++) {
                        const __m256i p = _mm256_madd_epi16(s16[a], sc);
                        isum[a] = _mm256_add_epi32(isum[a], p);
                    }
            }
        }
        const __m256 d = f16x8(w), dmin = f16x8(w + 16);
        for (int a = 0; a < NA; a++) {
            const int16_t *bs = xs32[a] + 8 * b;
            __m256i ms = _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + 96))),
                                           bc4((const uint8_t *)bs));
            for (int t = 1; t < 4; t++)
                ms = _mm256_add_epi32(ms, _mm256_madd_epi16(
                                              _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(w + 96 + 16 * t))),
                                              bc4((const uint8_t *)(bs + 2 * t))));
            const __m256 dx = _mm256_set1_ps(xd[a][b]);
            acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[a]), _mm256_mul_ps(d, dx), acc[a]);
            acc[a] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(ms), _mm256_mul_ps(dmin, dx), acc[a]);
        }
    }
    for (int a = 0; a < NA; a++) store8(y + a * ldy, acc[a], nvalid);
}

/* The unsigned 6-bit quants of register j of a Q6_K run (32 elements), q: its first 4
 * registers as loaded (registers 4-7 take their high bits from them). */
INLINE __m256i k6_reg(const uint8_t *run, const __m256i *q, const int j) {
    if (j < 4) return _mm256_and_si256(q[j], _mm256_set1_epi8(0x3f));
    const __m256i lo = load32(run + 128 + 32 * ((j - 4) / 2)), m4 = _mm256_set1_epi8(0x0f);
    const __m256i l = j & 1 ? _mm256_and_si256(_mm256_srli_epi16(lo, 4), m4) : _mm256_and_si256(lo, m4);
    return _mm256_or_si256(l, _mm256_and_si256(_mm256_srli_epi16(q[j - 4], 2), _mm256_set1_epi8(0x30)));
}

/* register j of run c of a Q6_K block, alone */
INLINE __m256i k6_u(const uint8_t *blk, const int c, const int j) {
    const uint8_t *run = blk + 144 + 192 * c;
    const __m256i q[4] = {load32(run), load32(run + 32), load32(run + 64), load32(run + 96)};
    return k6_reg(run, q, j);
}

/* Q6_K: per 16 elements sc * (u . x), minus 32 * sum sc * (sum x). EX: the quants come
 * unpacked from ex (2048 bytes per block) */
INLINE void k_q6k(const int NA, const int EX, const uint8_t *w, int64_t nb, const uint8_t *ex, const uint8_t *act,
                  int64_t stride, int64_t n_in, float *y, int64_t ldy, int nvalid) {
    /* pick byte 2r + h of a 16-byte scale pair into bytes 2r, 2r + 1 */
    const __m128i pick0 = _mm_setr_epi8(0, 0, 2, 2, 4, 4, 6, 6, 8, 8, 10, 10, 12, 12, 14, 14);
    const __m128i pick1 = _mm_add_epi8(pick0, _mm_set1_epi8(1));
    const uint8_t *xq[A2N_GEMM_NA];
    const float *xd[A2N_GEMM_NA];
    const int16_t *xs16[A2N_GEMM_NA];
    __m256 acc[A2N_GEMM_NA];
    for (int a = 0; a < NA; a++) {
        xq[a] = act + a * stride;
        xd[a] = (const float *)(xq[a] + n_in);
        xs16[a] = (const int16_t *)(xd[a] + nb);
        acc[a] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++, w += 1680) {
        __m256i isum[A2N_GEMM_NA];
        for (int a = 0; a < NA; a++) isum[a] = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const __m128i scp = _mm_loadu_si128((const __m128i *)(w + 16 + 16 * c));
            const uint8_t *run = w + 144 + 192 * c;
            __m256i q[4];   /* loaded once: each feeds two registers */
            for (int t = 0; t < 4 && !EX; t++) q[t] = load32r(run + 32 * t);
#pragma GCC unroll 8
            for (int h = 0; h < 2; h++) {
                const __m256i sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scp, h ? pick1 : pick0));
                __m256i s16[A2N_GEMM_NA];
#pragma GCC unroll 8
                for (int k = 0; k < 4; k++) {
                    const __m256i u = EX ? load32(ex + 2048 * b + 256 * c + 32 * (4 * h + k))
                                         : k6_reg(run, q, 4 * h + k);
#pragma GCC unroll 8
                    for (int a = 0; a < NA; a++) {
                        const __m256i m =
                            _mm256_maddubs_epi16(u, bc4(xq[a] + 256 * b + 32 * c + 4 * (4 * h + k)));
                        if (!(k & 1)) {
                            s16[a] = m;
                            continue;
                        }
                        const __m256i p = _mm256_madd_epi16(_mm256_add_epi16(s16[a], m), sc);
                        isum[a] = _mm256_add_epi32(isum[a], p);
                    }
                }
            }
        }
        const __m256 dw = f16x8(w);
        for (int a = 0; a < NA; a++) {
            const int16_t *bs = xs16[a] + 16 * b;
            __m256i corr = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16))),
                                             bc4((const uint8_t *)bs));
            for (int p = 1; p < 8; p++)
                corr = _mm256_add_epi32(
                    corr, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16 + 16 * p))),
                                            bc4((const uint8_t *)(bs + 2 * p))));
            const __m256i i = _mm256_sub_epi32(isum[a], _mm256_slli_epi32(corr, 5));
            acc[a] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(dw, _mm256_set1_ps(xd[a][b])), acc[a]);
        }
    }
    for (int a = 0; a < NA; a++) store8(y + a * ldy, acc[a], nvalid);
}

/* one function per type, NA and EX compile-time constants in each case */
#define DISPATCH(name, call)                                                                                  \
    static void name(const uint8_t *w, int64_t nb, const uint8_t *ex, const uint8_t *act, int64_t stride,       \
                     int64_t n_in, int na, float *y, int64_t ldy, int nvalid) {                               \
        switch (na + 4 * (ex != NULL)) {                                                                      \
        case 1: call(1, 0); break;                                                                            \
        case 2: call(2, 0); break;                                                                            \
        case 3: call(3, 0); break;                                                                            \
        case 4: call(4, 0); break;                                                                            \
        case 5: call(1, 1); break;                                                                            \
        case 6: call(2, 1); break;                                                                            \
        case 7: call(3, 1); break;                                                                            \
        default: call(4, 1); break;                                                                           \
        }                                                                                                     \
    }
#define ARGS w, nb, ex, act, stride, n_in, y, ldy, nvalid
#define C_Q4_0(NA, EX) k_q4q5(2, NA, 0, ARGS)   /* (4-bit types are not expanded, see below) */
#define C_Q5_0(NA, EX) k_q4q5(6, NA, EX, ARGS)
#define C_Q8_0(NA, EX) k_q8(NA, w, nb, act, stride, n_in, y, ldy, nvalid)
#define C_Q4_K(NA, EX) k_q4q5k(12, NA, 0, ARGS)
#define C_Q5_K(NA, EX) k_q4q5k(13, NA, EX, ARGS)
#define C_Q6_K(NA, EX) k_q6k(NA, EX, ARGS)
DISPATCH(gemm_q4_0, C_Q4_0)
DISPATCH(gemm_q5_0, C_Q5_0)
DISPATCH(gemm_q8_0, C_Q8_0)
DISPATCH(gemm_q4_k, C_Q4_K)
DISPATCH(gemm_q5_k, C_Q5_K)
DISPATCH(gemm_q6_k, C_Q6_K)

/* ---- the quants of a group unpacked once for many activation tiles ----
 * (5- and 6-bit types: their unpacking costs as much as a tile's products; the
 * 4-bit types unpack with two operations a register, and reading their bytes
 * back measured no faster) */
static void expand_q5_0(const uint8_t *w, int64_t nb, uint8_t *ex) {
    for (int64_t b = 0; b < nb; b++, w += 176)
        for (int j = 0; j < 8; j++) _mm256_storeu_si256((__m256i *)(ex + 256 * b + 32 * j), q45_u(6, w, j));
}
static void expand_q5_k(const uint8_t *w, int64_t nb, uint8_t *ex) {
    for (int64_t b = 0; b < nb; b++, w += 1440)
        for (int s = 0; s < 8; s++)
            for (int j = 0; j < 8; j++)
                _mm256_storeu_si256((__m256i *)(ex + 2048 * b + 256 * s + 32 * j), k45_u(13, w, s, j));
}
static void expand_q6_k(const uint8_t *w, int64_t nb, uint8_t *ex) {
    for (int64_t b = 0; b < nb; b++, w += 1680)
        for (int c = 0; c < 8; c++)
            for (int j = 0; j < 8; j++)
                _mm256_storeu_si256((__m256i *)(ex + 2048 * b + 256 * c + 32 * j), k6_u(w, c, j));
}

a2n_expand_fn a2n_expand_avx2_for(int ggml_type) {
    switch (ggml_type) {
    case 6: return expand_q5_0;
    case 13: return expand_q5_k;
    case 14: return expand_q6_k;
    default: return NULL;   /* Q4_0, Q4_K (see above), Q8_0 (bytes already) */
    }
}

a2n_gemm_fn a2n_gemm_avx2_for(int ggml_type) {
    switch (ggml_type) {
    case 2: return gemm_q4_0;
    case 6: return gemm_q5_0;
    case 8: return gemm_q8_0;
    case 12: return gemm_q4_k;
    case 13: return gemm_q5_k;
    case 14: return gemm_q6_k;
    default: return NULL;
    }
}
#else
typedef int a2n_no_avx2_gemm;   /* compiled without AVX2: gemm_ref.c only */
#endif
