/* a2ats-lite native causal attention: the dense layers' attention of every query row of a
 * step (prefill chunks and decode rows alike) over each sequence's cached K/V, read in place.
 * Bound by cffi: the text minus preprocessor lines is part of the cdef (build_native.py). */
#ifndef A2ATS_ATTENTION_H
#define A2ATS_ATTENTION_H
#include <stdint.h>

/* KV cache element types: their ggml type ids. A row of d values is d float32 / float16
 * elements, or d / 32 blocks of 34 (q8_0) / 18 (q4_0) bytes (ggml's layouts, d % 32 == 0). */
enum { A2N_KV_F32 = 0, A2N_KV_F16 = 1, A2N_KV_Q4_0 = 2, A2N_KV_Q8_0 = 8 };

/* the units (elements of a float type, bytes of a block type) of a row of d values;
 * A2N_E_TYPE for another type, A2N_E_ARG for a d the type cannot hold (kv_quant.c) */
int64_t a2n_kv_row_units(int type, int64_t d);
/* n_elems float32 (a multiple of 32) -> q8_0 / q4_0 blocks, rounded as ggml's reference
 * quantizers (quantize_row_q8_0_ref / _q4_0_ref); dst_nbytes must be the blocks' size */
int a2n_kv_quantize(int type, const float *x, int64_t n_elems, void *dst, int64_t dst_nbytes);

/* out (n, H, d)[i, h] = softmax_t(scale * q[i, h] . K_s[k, t]) @ V_s[k, t] over the rows
 * t in [lo[i], hi[i]) of sequence s = seq[i], k = h / (H / G) (GQA); zeros when the span is
 * empty. q (n, H, d) float32 post-RoPE. K and V each of one A2N_KV_* type (k_type, v_type:
 * they may differ). Per sequence s < S: keys[s] / values[s] point at row 0 of KV head 0, row t
 * of head k at unit k * k_stride[s] + t * a2n_kv_row_units(k_type, d) (units: elements of
 * a float type, bytes of a block type), rows[s] rows per head, row 0 at absolute position
 * pos0[s]. Block rows are decoded per key block into a thread's scratch (as f16 rows are
 * widened), never copied whole: a row's numbers are those of a float32 cache holding the
 * decoded values.
 * Every query row's arithmetic is one fixed sequence of operations that depends only on its
 * own q, span and the keys/values in it: an online softmax over key blocks whose boundaries
 * are fixed in absolute positions (pos0 + t), merged per fixed chunk of absolute positions.
 * Outputs are therefore bit-identical whatever other rows or sequences share the call and
 * however a prompt was chunked (for one a2n_simd mode). Work is split over (query tile of one
 * sequence, KV head) and, when there are few of those, over chunks too, on n_threads of the
 * pool. Every size, pointer, sequence index and span is checked before anything is written:
 * A2N_E_ARG / A2N_E_SIZE / A2N_E_INDEX. */
int a2n_attention(const float *q, int64_t q_len, int64_t n, int64_t H, int64_t G, int64_t d,
                  int64_t S, const void *const *keys, const int64_t *k_stride, int k_type,
                  const void *const *values, const int64_t *v_stride, int v_type,
                  const int64_t *rows, const int64_t *pos0, const int64_t *seq,
                  const int64_t *lo, const int64_t *hi, float scale, float *out, int64_t out_len,
                  int n_threads);
#endif
