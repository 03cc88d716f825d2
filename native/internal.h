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
