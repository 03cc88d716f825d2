/* a2ats-lite native retrieval kernels (A2ATS sparse attention at decode).
 * One call per layer covers every sequence s < S and KV head k < G of a decode
 * step; g query heads share each KV head. Every function checks its sizes and
 * indices before writing anything and returns 0 or a negative A2N_E* code.
 * Per-sequence arrays (codes, keys, values) are passed as arrays of S pointers
 * with their capacities caps[s] (rows per KV head). Threads: n_threads of the
 * persistent pool of ops.c; each thread keeps its scratch between calls (grown
 * on demand: ~8 bytes per scored candidate of the longest sequence, plus the
 * caller's pick bitmaps, S * G * n / 8 bytes). Bound by cffi: the text minus
 * preprocessor lines is part of the cdef (build_native.py). */
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
 * sel = idx[s,k,:lens[s,k]]; keys[s] / values[s] are (G, caps[s], d) float32
 * (kv_f16 = 0) or float16 (kv_f16 = 1). One pass over the selected rows (online
 * softmax), float32 accumulation; an empty selection gives zeros. Any
 * lens outside [0, kmax] or index outside [0, caps[s]) returns an error before
 * anything is computed or written. */
int a2n_sparse_attention(const float *q, int64_t q_len, int64_t S, int64_t G, int64_t g,
                         int64_t d, const void *const *keys, const void *const *values,
                         const int64_t *caps, int kv_f16, const int64_t *idx, int64_t kmax,
                         const int32_t *lens, float scale, float *out, int64_t out_len,
                         int n_threads);

/* out (S, G, g, width)[s,k,j,t] = q[s,k,j] . K_s[k, lo[s] + t] for t < hi[s] - lo[s],
 * -inf after; 0 <= lo[s] <= hi[s] <= caps[s], hi[s] - lo[s] <= width. */
int a2n_exact_scores(const float *q, int64_t q_len, int64_t S, int64_t G, int64_t g, int64_t d,
                     const void *const *keys, const int64_t *caps, int kv_f16,
                     const int64_t *lo, const int64_t *hi, float *out, int64_t width,
                     int n_threads);
/* Batched gather of selected rows (the GPU path's staging copy): for every sequence s and KV
 * head k, kdst[s,k,i] = K_s[k, idx[s,k,i]] and vdst[s,k,i] = V_s[k, idx[s,k,i]] for
 * i < lens[s,k]; kdst/vdst are (S, G, kmax, d) rows of the store's type (f16 if kv_f16), rows
 * at i >= lens[s,k] are left as they are. keys/values as a2n_sparse_attention's. Every
 * length and index is checked before anything is copied. */
int a2n_gather_sel(int64_t S, int64_t G, int64_t d, const void *const *keys,
                   const void *const *values, const int64_t *caps, int kv_f16,
                   const int64_t *idx, int64_t kmax, const int32_t *lens, void *kdst,
                   void *vdst, int64_t dst_rows, int n_threads);
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
#endif
