/* Inner loops of the dense-layer attention (attention_kernels.c), shared by attention.c only;
 * not part of the Python-facing API. */
#ifndef A2ATS_ATTENTION_KERNELS_H
#define A2ATS_ATTENTION_KERNELS_H
#include <stdint.h>

#define AT_KB 64   /* keys per block, aligned to absolute positions; score rows are AT_KB apart */

/* sc[r * AT_KB + x] = scale * q[r] . K[x] for rg rows q[r] = qp[r] and nk <= AT_KB keys: nk
 * consecutive rows of d values of A2N_KV_* type at krows; kt: AT_KB * d floats of scratch.
 * The same bits as float32 keys holding the decoded values. (sc[r * AT_KB + x] for
 * nk <= x < the next multiple of 8 is written too.) */
void a2n_at_qk(const float *const *qp, int64_t rg, const void *krows, int type, int64_t nk, int64_t d,
               float scale, float *sc, float *kt);
/* the largest of p[0, n) (-inf when n = 0) */
float a2n_at_max(const float *p, int64_t n);
/* p[i] = exp(p[i] - mx) in place; returns their sum */
float a2n_at_exp_sum(float *p, int64_t n, float mx);
/* o[0, d) += sum_t w[t] * V[t] over nt keys (rows of V d apart), t ascending */
void a2n_at_pv1(float *o, const float *w, const float *v, int64_t nt, int64_t d);
/* the same for nr <= AT_PV_ROWS rows o[r], w[r] sharing the keys: the same operations per element */
#define AT_PV_ROWS 6
/* rows of the next micro-kernel call (qk and pv) out of n >= 1 left: AT_PV_ROWS while twice
 * that are left, then the rest in two near-equal calls (10 = 5 + 5, not 6 + 4; 8 = 4 + 4,
 * not 6 + 2): a call of 1 or 2 rows has too few accumulators to hide the FMA latency */
static inline int a2n_at_group(int64_t n) {
    return n >= 2 * AT_PV_ROWS ? AT_PV_ROWS : n <= AT_PV_ROWS ? (int)n : (int)(n + 1) / 2;
}
void a2n_at_pv(float *const *o, const float *const *w, int nr, const float *v, int64_t nt, int64_t d);
/* n f16 -> f32 */
void a2n_at_widen(const uint16_t *src, float *dst, int64_t n);
/* n consecutive rows of d values of a non-float32 A2N_KV_* type -> float32 dst (n, d) */
void a2n_at_decode_rows(const void *src, int type, int64_t n, int64_t d, float *dst);
#endif
