/* a2ats-lite native library: the C side of everything that must run at
 * memory speed on the CPU. Every function checks its arguments and returns
 * 0 on success or a negative A2N_E* code; nothing writes outside the
 * destination it was given. Bound to Python with cffi (API mode), see
 * build_native.py and a2ats_lite/native.py. */
#ifndef A2ATS_NATIVE_H
#define A2ATS_NATIVE_H
#include <stddef.h>
#include <stdint.h>

#define A2N_OK 0
#define A2N_E_TYPE -1     /* unsupported ggml type */
#define A2N_E_SIZE -2     /* buffer size does not match the element count */
#define A2N_E_INDEX -3    /* a row index is out of range */
#define A2N_E_ARG -4      /* invalid argument (null pointer, negative count, ...) */
#define A2N_E_THREAD -5   /* could not start worker threads */
#define A2N_E_NOMEM -6    /* out of memory for a scratch buffer */

/* Bytes needed by n_elems elements of ggml_type (n_elems must be a multiple of
 * the type's block size); negative error code when it is not. */
int64_t a2n_type_nbytes(int ggml_type, int64_t n_elems);

/* Dequantize n_elems elements of ggml_type from src (src_nbytes bytes) to f32 / f16. */
int a2n_dequantize_f32(int ggml_type, const void *src, int64_t src_nbytes,
                       float *dst, int64_t n_elems, int n_threads);
int a2n_dequantize_f16(int ggml_type, const void *src, int64_t src_nbytes,
                       uint16_t *dst, int64_t n_elems, int n_threads);

/* Row gather: dst[i] = src[idx[i]] for rows of row_bytes bytes.
 * src holds n_src_rows rows (may be a memory-mapped file), dst holds
 * n_dst_rows rows; n_idx <= n_dst_rows. Any idx outside [0, n_src_rows)
 * returns A2N_E_INDEX before anything is copied. */
int a2n_gather_rows(const void *src, int64_t n_src_rows, int64_t row_bytes,
                    const int64_t *idx, int64_t n_idx,
                    void *dst, int64_t n_dst_rows, int n_threads);

/* y (n_vec, n_out) = x (n_vec, n_in) @ W^T where W is (n_out, n_in) stored in
 * ggml_type blocks (w_nbytes bytes). The int8 types (a2n_act_kind > 0) are
 * repacked and x quantized into scratch buffers for this call alone: a model
 * repacks once (a2n_repack) and calls a2n_matmul_packed. */
int a2n_matmul_q(int ggml_type, const void *w, int64_t w_nbytes,
                 int64_t n_out, int64_t n_in,
                 const float *x, int64_t n_vec, float *y, int n_threads);

/* ---- int8 products on repacked weights ----
 * The activation record kind a type's product reads: 1 (blocks of 32: Q4_0,
 * Q5_0, Q8_0), 2 (blocks of 256: Q4_K, Q5_K, Q6_K), 0 (no int8 path). */
int a2n_act_kind(int ggml_type);
/* Bytes of the repacked copy of a (n_out, n_in) weight (groups of 8 interleaved
 * rows, about the size of the original); negative A2N_E_* when there is none. */
int64_t a2n_repack_nbytes(int ggml_type, int64_t n_out, int64_t n_in);
int a2n_repack(int ggml_type, const void *w, int64_t w_nbytes, int64_t n_out, int64_t n_in,
               void *dst, int64_t dst_nbytes, int n_threads);
/* Bytes of n_vec activation records of kind for vectors of n_in. */
int64_t a2n_act_nbytes(int kind, int64_t n_vec, int64_t n_in);
/* x (n_vec, n_in) float32 -> int8 records (per block d = amax / 127); the
 * same records serve every product of x with weights of that kind. */
int a2n_quantize_act(int kind, const float *x, int64_t n_vec, int64_t n_in,
                     void *dst, int64_t dst_nbytes, int n_threads);
/* y (n_vec, n_out) = records @ W^T for repacked W. A vector's output bits do not
 * depend on n_vec, the other vectors or n_threads. */
int a2n_matmul_packed(int ggml_type, const void *wp, int64_t wp_nbytes, int64_t n_out, int64_t n_in,
                      const void *act, int64_t act_nbytes, int64_t n_vec, float *y, int n_threads);
/* The same for n_w (1..8) weights of one activation kind read by the same records
 * (q/k/v, gate/up): one call, one split of all their rows across the threads;
 * ys[i] (n_vec, n_outs[i]). Each output is the bits a2n_matmul_packed gives. */
int a2n_matmul_packed_n(int n_w, const int *types, const void *const *wps, const int64_t *wp_nbytes,
                        const int64_t *n_outs, int64_t n_in, const void *act, int64_t act_nbytes,
                        int64_t n_vec, float *const *ys, int n_threads);
/* The same from float32 x (n_vec, n_in), quantized inside (one call for a product of its own). */
int a2n_matmul_packed_f32(int ggml_type, const void *wp, int64_t wp_nbytes, int64_t n_out, int64_t n_in,
                          const float *x, int64_t n_vec, float *y, int n_threads);

const char *a2n_strerror(int code);

/* SIMD (AVX2/FMA/F16C) kernels: mode 1 uses them, 0 forces the portable
 * scalar code, -1 only asks. Returns the mode in force afterwards (0 when the
 * library was compiled without AVX2). For tests and benchmarks; not to be
 * switched while another call is running. */
int a2n_simd(int mode);
#endif
