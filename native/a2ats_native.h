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
 * ggml_type blocks (w_nbytes bytes): the decode-time product that reads the
 * quantized weights once, whatever n_vec (small batches). */
int a2n_matmul_q(int ggml_type, const void *w, int64_t w_nbytes,
                 int64_t n_out, int64_t n_in,
                 const float *x, int64_t n_vec, float *y, int n_threads);

const char *a2n_strerror(int code);

/* SIMD (AVX2/FMA/F16C) kernels: mode 1 uses them, 0 forces the portable
 * scalar code, -1 only asks. Returns the mode in force afterwards (0 when the
 * library was compiled without AVX2). For tests and benchmarks; not to be
 * switched while another call is running. */
int a2n_simd(int mode);
#endif
