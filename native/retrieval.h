/* a2ats-lite native retrieval kernels (A2ATS sparse attention at decode).
 * One call per layer covers every sequence s < S and KV head k < G of a decode
 * step; g query heads share each KV head. Every function checks its sizes and
 * indices before writing anything and returns 0 or a negative A2N_E* code.
 * Per-sequence arrays (codes, keys, values) are passed as arrays of S pointers
 * with their capacities caps[s] (rows per KV head). Threads: n_threads of the
 * persistent pool of ops.c; each thread keeps its scratch between calls (grown
 * on demand: ~8 bytes per scored candidate of the longest sequence, plus the
 * caller's pick bitmaps, S * G * n / 8 bytes). Bound by cffi: the text minus
 * preprocessor lines is part of the cdef (build_native.py).
 * Host store rows (keys / values below) are of one KV cache type each, k_type / v_type: the
 * A2N_KV_* ids of attention.h (0 f32, 1 f16, 8 q8_0, 2 q4_0; rows of d values, or d / 32
 * ggml blocks of 34 / 18 bytes, d % 32 == 0). Block rows are read in place and decoded one
 * selected row at a time into a thread's scratch, never as a decoded copy of the store; a
 * type the kernels do not read, or a d the type cannot hold, is A2N_E_ARG. */
#ifndef A2ATS_RETRIEVAL_H
#define A2ATS_RETRIEVAL_H
#include <stdint.h>

/* lut (S, G, g, M, C)[s,k,j,m,c] = q[s,k,j, m*dsub:(m+1)*dsub] . centroids[k,m,c,:]
 * q (S, G, g, d), centroids (G, M, C, dsub), d = M * dsub; *_len are element counts. */
int a2n_build_lut(const float *q, int64_t q_len, const float *centroids, int64_t cent_len,
                  int64_t S, int64_t G, int64_t g, int64_t d, int64_t M, int64_t C,
                  float *lut, int64_t lut_len, int n_threads);

/* Per (s, k): candidates [lo, hi), lo = min(sinks, T[s]), hi = max(lo, T[s] - window).
 * When hi - lo > K each query head j takes its top-K candidates by
 * score[t] = sum_m lut[s,k,j,m,codes[s][k,m,t]] (ties: smaller position first),
 * the picks of the g heads are united. idx (S, G, kmax) gets the sorted
 * positions [0, lo) + picks + [hi, T[s]), then -1; lens (S, G) their count.
 * codes[s] is (G, M, caps[s]) uint16; T[s] <= caps[s]. A code >= C among the
 * scored candidates returns A2N_E_INDEX with idx and lens untouched. */
int a2n_select_topk(const float *lut, int64_t lut_len, int64_t S, int64_t G, int64_t g,
                    int64_t M, int64_t C, const uint16_t *const *codes, const int64_t *caps,
                    const int64_t *T, int64_t sinks, int64_t window, int64_t K,
                    int64_t *idx, int64_t kmax, int32_t *lens, int n_threads);

/* out (S, G, g, d)[s,k,j] = softmax(scale * q[s,k,j] . K_s[k, sel]) @ V_s[k, sel] with
 * sel = idx[s,k,:lens[s,k]]; keys[s] / values[s] are (G, caps[s], row) rows of k_type /
 * v_type (they may differ). One pass over the selected rows (online softmax), float32
 * accumulation; an empty selection gives zeros. Any lens outside [0, kmax] or index
 * outside [0, caps[s]) returns an error before anything is computed or written. */
int a2n_sparse_attention(const float *q, int64_t q_len, int64_t S, int64_t G, int64_t g,
                         int64_t d, const void *const *keys, const void *const *values,
                         const int64_t *caps, int k_type, int v_type, const int64_t *idx,
                         int64_t kmax, const int32_t *lens, float scale, float *out,
                         int64_t out_len, int n_threads);

/* out (S, G, g, width)[s,k,j,t] = q[s,k,j] . K_s[k, lo[s] + t] for t < hi[s] - lo[s],
 * -inf after; keys of k_type; 0 <= lo[s] <= hi[s] <= caps[s], hi[s] - lo[s] <= width. */
int a2n_exact_scores(const float *q, int64_t q_len, int64_t S, int64_t G, int64_t g, int64_t d,
                     const void *const *keys, const int64_t *caps, int k_type,
                     const int64_t *lo, const int64_t *hi, float *out, int64_t width,
                     int n_threads);
/* Batched gather of selected rows (the GPU path's staging copy): for every sequence s and KV
 * head k, kdst[s,k,i] = K_s[k, idx[s,k,i]] and vdst[s,k,i] = V_s[k, idx[s,k,i]] for
 * i < lens[s,k]; keys/values as a2n_sparse_attention's. decode = 0: kdst / vdst are
 * (S, G, kmax, row) rows of k_type / v_type, copied as stored; decode = 1: (S, G, kmax, d)
 * float32, the rows decoded. Rows at i >= lens[s,k] are left as they are. Every length and
 * index is checked before anything is copied. */
int a2n_gather_sel(int64_t S, int64_t G, int64_t d, const void *const *keys,
                   const void *const *values, const int64_t *caps, int k_type, int v_type,
                   const int64_t *idx, int64_t kmax, const int32_t *lens, void *kdst,
                   void *vdst, int64_t dst_rows, int decode, int n_threads);
/* Bookkeeping of the GPU cache of retrieved rows (one step of one layer). Sequence s keeps, per
 * KV head k, slot_of[s] (G, map_caps[s]) int32: the cache slot holding token t, or -1, and
 * token_at[s] (G, slot_caps[s]) int32: the token in each slot, or -1; hand[s] (G,) int32 is the
 * clock hand of each head's eviction (first-in first-out among the slots the step does not use).
 * For every selected token idx[s,k,i] (i < lens[s,k]): a token the cache holds keeps its slot;
 * any other is given a slot not used by this step's selection (its previous token forgotten),
 * and recorded as a miss: miss_idx[s,k,m] the token, miss_slot[s,k,m] its slot, m < miss_n[s,k].
 * slots[s,k,i] gets the slot of idx[s,k,i] (-1 at i >= lens). Every index and length is checked
 * (token < map_caps[s], lens <= slot_caps[s]) before any map is changed; map entries that are
 * out of range or disagree with each other count as absent (memory safe whatever they hold). */
int a2n_rowcache_plan(int64_t S, int64_t G, const int64_t *idx, int64_t kmax, const int32_t *lens,
                      int32_t *const *slot_of, const int64_t *map_caps, int32_t *const *token_at,
                      const int64_t *slot_caps, int32_t *const *hand, int32_t *slots,
                      int64_t *miss_idx, int32_t *miss_slot, int32_t *miss_n, int n_threads);

/* ---- fast-scan selection of 4-bit product codes (fastscan.c) ----
 * Codes of M subspaces (M even, 2..128) of 16 centroids, packed per KV head in blocks of
 * 32 tokens: blocks (G, cap / 32, M / 2, 32) uint8, FAISS's bbs = 32 nibble layout (see
 * fastscan.c); cap (tokens) is a multiple of 32. */

/* qlut (rows, M, 16) = lut (rows, M, 16) quantized to 8 bits per row (query head):
 * qlut[r,m,c] = min(255, floor((lut[r,m,c] - min_c lut[r,m,:]) * scale[r] + 0.5)),
 * scale[r] = 255 / max_m (max_c - min_c of lut[r,m,:]) (0 if that is 0 or not finite),
 * bias[r] = sum_m min_c lut[r,m,:]; float32 arithmetic. A token's score
 * sum_m lut[r,m,code_m] ~= sum_m qlut[r,m,code_m] / scale[r] + bias[r]. */
int a2n_fs_quantize_lut(const float *lut, int64_t lut_len, int64_t rows, int64_t M, uint8_t *qlut,
                        int64_t qlut_len, float *scale, float *bias);

/* Write the codes (G, M, n) uint16 (each < 16) of tokens [first, first + n) into blocks
 * (G, cap / 32, M / 2, 32); the other tokens' nibbles are kept. A code >= 16 or a token
 * beyond cap returns an error before anything is written. */
int a2n_fs_pack(const uint16_t *codes, int64_t codes_len, int64_t G, int64_t M, int64_t n,
                uint8_t *blocks, int64_t blocks_len, int64_t cap, int64_t first);

/* a2n_select_topk's selection (candidates, union of the g heads' top-K, ties to the
 * smaller position, idx / lens) with the score of token t for head j the exact integer
 * sum_m qlut[s,k,j,m,code_m(t)], qlut the LUT (S, G, g, M, 16) float32 quantized as
 * a2n_fs_quantize_lut does. codes[s]: blocks (G, caps[s] / 32, M / 2, 32), T[s] <= caps[s]. */
int a2n_fs_select(const float *lut, int64_t lut_len, int64_t S, int64_t G, int64_t g, int64_t M,
                  const uint8_t *const *codes, const int64_t *caps, const int64_t *T, int64_t sinks,
                  int64_t window, int64_t K, int64_t *idx, int64_t kmax, int32_t *lens, int n_threads);

/* Exact re-rank of selections (one call per layer): for every (s, k), the entries of
 * idx_in[s,k,:lens_in[s,k]] inside [lo, hi) (lo, hi from T[s], sinks, window as in
 * a2n_select_topk; sorted, as the selections return them) are the candidates; ncand[s*G+k]
 * gets their count. When more than K, each is scored score[j, t] = q[s,k,j] . K_s[k, t]
 * (keys[s] (G, caps[s], row) rows of k_type; float32 accumulation), each head j
 * keeps its top-K (ties: smaller position) and the g heads' picks are united; else all stay.
 * idx (S, G, kmax) gets the sorted [0, lo) + picks + [hi, T[s]), then -1; lens (S, G). Entries
 * outside [lo, hi) are ignored; T[s] <= caps[s]; every size is checked before anything is
 * written. */
int a2n_rerank(const float *q, int64_t q_len, int64_t S, int64_t G, int64_t g, int64_t d,
               const void *const *keys, const int64_t *caps, int k_type, const int64_t *idx_in,
               int64_t kmax_in, const int32_t *lens_in, const int64_t *T, int64_t sinks,
               int64_t window, int64_t K, int64_t *idx, int64_t kmax, int32_t *lens,
               int64_t *ncand, int n_threads);
#endif
