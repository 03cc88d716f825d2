/* Shared between the native sources; not part of the Python-facing API. */
#ifndef A2ATS_INTERNAL_H
#define A2ATS_INTERNAL_H
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define A2N_HAVE_AVX2 1
#else
#define A2N_HAVE_AVX2 0
#endif

/* Decode n_blocks consecutive blocks to f32, bit-exact with gguf-py. */
typedef void (*a2n_decode_fn)(const uint8_t *src, int64_t n_blocks, float *dst);

typedef struct {
    int id;                 /* ggml type id */
    int block;              /* elements per block */
    int bytes;              /* bytes per block */
    void (*dequant)(const uint8_t *block, float *out);  /* portable scalar, one block */
    a2n_decode_fn simd;     /* AVX2 version of many blocks, NULL when there is none */
} a2n_type;

extern int a2n_use_simd;   /* 1: take the AVX2 kernels (set by a2n_simd) */

const a2n_type *a2n_find_type(int ggml_type);
float a2n_f16_to_f32(uint16_t h);
uint16_t a2n_f32_to_f16(float f);

/* n_blocks blocks of type t -> f32, SIMD when enabled and available. */
void a2n_decode(const a2n_type *t, const uint8_t *src, int64_t n_blocks, float *dst);
/* n f32 -> f16, round to nearest even like numpy's astype(float16). */
void a2n_f32_to_f16_n(const float *src, uint16_t *dst, int64_t n);

#if A2N_HAVE_AVX2
void a2n_decode_f16_avx2(const uint8_t *src, int64_t n_blocks, float *dst);
void a2n_decode_bf16_avx2(const uint8_t *src, int64_t n_blocks, float *dst);
void a2n_decode_q4_0_avx2(const uint8_t *src, int64_t n_blocks, float *dst);
void a2n_decode_q5_0_avx2(const uint8_t *src, int64_t n_blocks, float *dst);
void a2n_decode_q8_0_avx2(const uint8_t *src, int64_t n_blocks, float *dst);
void a2n_decode_q4_k_avx2(const uint8_t *src, int64_t n_blocks, float *dst);
void a2n_decode_q5_k_avx2(const uint8_t *src, int64_t n_blocks, float *dst);
void a2n_decode_q6_k_avx2(const uint8_t *src, int64_t n_blocks, float *dst);
void a2n_f32_to_f16_avx2(const float *src, uint16_t *dst, int64_t n);

#include <immintrin.h>
/* exp(x) for x <= ~88 (Cephes polynomial, ~2 ulp); very negative x gives 0 (the softmax of
 * attention_kernels.c and sparse_attention.c) */
static inline __m256 a2n_exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(underflow, y);
}
#endif

/* ---- int8 products on repacked weights (repack.c, gemm_avx2.c, gemm_ref.c) ----
 * Weights of the types below are repacked once into groups of 8 interleaved
 * output rows (layouts in repack.c), activations quantized to int8 records
 * (a2n_act_*), and every output element comes out of one kernel call that runs
 * over all of n_in in a fixed order: its bits do not depend on the other rows
 * of the product, on the thread count or on where its tile falls. */
#define A2N_PACK_ROWS 8

typedef struct {
    int type;             /* ggml type id */
    int block;            /* weight elements per block (32 or 256) */
    int kind;             /* activation record kind: A2N_ACT_B32 or A2N_ACT_B256 */
    int64_t blk_bytes;    /* bytes of one block of 8 interleaved rows */
} a2n_pack_type;

const a2n_pack_type *a2n_pack_find(int ggml_type);   /* NULL: the float path */

/* One vector's activation record, n_in int8 quants q first, then per kind:
 *  B32 (Q4_0/Q5_0/Q8_0), blocks of 32: d float[nb], c8 int32[nb] = -8 * sum(q),
 *      c16 int32[nb] = -16 * sum(q) (the offsets of unsigned Q4_0 / Q5_0 quants);
 *  B256 (K types), blocks of 256: d float[nb], s16 int16[n_in / 16] and s32
 *      int16[n_in / 32]: sums of q per 16 / 32.
 * Per block d = amax / 127 (float), q = rint(x * (1 / d)) half to even. */
#define A2N_ACT_B32 1
#define A2N_ACT_B256 2
int64_t a2n_act_stride(int kind, int64_t n_in);     /* bytes per record, a multiple of 64 */
static inline int64_t a2n_act_nb(int kind, int64_t n_in) { return n_in / (kind == A2N_ACT_B32 ? 32 : 256); }

/* Records of vectors [0, n_vec) of x (n_vec, n_in) into dst (stride bytes apart). */
void a2n_quantize_ref(int kind, const float *x, int64_t n_vec, int64_t n_in, uint8_t *dst, int64_t stride);
#if A2N_HAVE_AVX2
void a2n_quantize_avx2(int kind, const float *x, int64_t n_vec, int64_t n_in, uint8_t *dst, int64_t stride);
#endif

/* na (1..A2N_GEMM_NA) activation records (act, act + stride, ...) times one
 * group of 8 packed rows (w, nb weight blocks of n_in): y[a * ldy + r] for
 * a < na, r < nvalid. ex: NULL, or the group's quants unpacked by the type's
 * a2n_expand_fn (read instead of unpacking them again for every tile). */
typedef void (*a2n_gemm_fn)(const uint8_t *w, int64_t nb, const uint8_t *ex, const uint8_t *act, int64_t stride,
                            int64_t n_in, int na, float *y, int64_t ldy, int nvalid);
/* A group's quants as bytes: 8 registers of 32 per run of 32 elements (256 bytes per
 * block of 32, 2048 per block of 256). */
typedef void (*a2n_expand_fn)(const uint8_t *w, int64_t nb, uint8_t *ex);
#define A2N_GEMM_NA 4
/* the kernel of a packed type: portable (gemm_ref.c) or AVX2 (gemm_avx2.c) */
a2n_gemm_fn a2n_gemm_ref_for(int ggml_type);
#if A2N_HAVE_AVX2
a2n_gemm_fn a2n_gemm_avx2_for(int ggml_type);
a2n_expand_fn a2n_expand_avx2_for(int ggml_type);   /* NULL: not worth it (4-bit types, Q8_0) */
#endif

/* 6-bit scale and min of sub-block k (0..7) of a Q4_K / Q5_K block (ggml's get_scale_min_k4). */
static inline void a2n_k_scale_min(const uint8_t *s, int k, int *sc, int *m) {
    if (k < 4) {
        *sc = s[k] & 63;
        *m = s[k + 4] & 63;
    } else {
        *sc = (s[k + 4] & 0xf) | ((s[k - 4] >> 6) << 4);
        *m = (s[k + 4] >> 4) | ((s[k] >> 6) << 4);
    }
}

/* Run fn(arg, begin, end) over [0, n) split across up to n_threads threads
 * (the caller's thread does the first share) of a persistent pool. Always
 * returns A2N_OK: work whose thread cannot be started runs on the caller's. */
typedef void (*a2n_range_fn)(void *arg, int64_t begin, int64_t end);
int a2n_parallel_for(int64_t n, int n_threads, int64_t min_per_thread, a2n_range_fn fn, void *arg);
#endif
