/* Shared between the native sources; not part of the Python-facing API. */
#ifndef A2ATS_INTERNAL_H
#define A2ATS_INTERNAL_H
#include <stdint.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define A2N_HAVE_AVX2 1
#else
#define A2N_HAVE_AVX2 0
#endif
/* AVX-512 BW/VL + VNNI: the integer matmul kernels of the 32-blocked types
 * take two blocks per 512-bit register (and change the activation layout,
 * see a2n_q8act) */
#if A2N_HAVE_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__)
#define A2N_HAVE_AVX512 1
#else
#define A2N_HAVE_AVX512 0
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

/* Activations of a2n_matmul_q quantized to int8 once per call, like llama.cpp's
 * quantize_row_q8_0 (blocks of 32) / q8_K (blocks of 256): per block d =
 * amax / 127, q = round-half-even(x * (1 / d)), so |q| <= 127. Vector v's
 * quants are q + v * ldq, its block scales d + v * ldd; for the K types also
 * the sums of its quants per 16 (s16) and per 32 (s32).
 * With A2N_HAVE_AVX512 the 32-blocked types interleave instead, per pair of
 * blocks (b, b + 1) 192 bytes at q + v * ldq + 96 * b: the 64 quants, then each
 * block scale 8 times (16 floats), then the negated sums of 4 consecutive
 * quants (16 int32); an odd last block fills the first halves. d is unused. */
typedef struct {
    const int8_t *q;
    const float *d;
    const int16_t *s16, *s32;
    int64_t ldq, ldd, lds16, lds32;
} a2n_q8act;

/* out[r * 8 + v] = row_r . x_v over nb weight blocks starting at block b0 of
 * the activations, for nr (1..4) rows row_r = row + r * row_bytes and nv (1..8)
 * vectors; a->q etc. already point at vector 0. w_end: the end of the weight
 * buffer (kernels may read past a block inside it, never beyond). */
typedef void (*a2n_q8dot_fn)(const uint8_t *row, int64_t row_bytes, int nr, int64_t nb, const a2n_q8act *a,
                             int64_t b0, int nv, float *out, const uint8_t *w_end);
/* the integer kernel of a weight type (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K), else NULL */
a2n_q8dot_fn a2n_q8dot_for(int ggml_type);
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
