/* a2ats-lite native elementwise steps of the forward pass (fused.c): the per-layer RMS norms
 * and RoPE rotations that, done as several small numpy operations each, cost a decode step
 * more in Python overhead than in arithmetic. One row's result depends only on that row.
 * Bound by cffi: the text minus preprocessor lines is part of the cdef (build_native.py). */
#ifndef A2ATS_FUSED_H
#define A2ATS_FUSED_H
#include <stdint.h>

/* out (n_rows, d) = x / sqrt(mean(x^2) + eps) * w per row (w (d,) or NULL for none), in
 * float32 as ops.rms_norm rounds it. sumsq (n_rows,): each row's sum of squares as the caller
 * computed it (ops.rms_norm's own einsum, so that the bits are the same), or NULL to sum here
 * (in double). x_len and out_len (elements) must be n_rows * d, sumsq_len n_rows, w_len d
 * (each ignored when its pointer is NULL); out may be x itself (in place), not another overlap. */
int a2n_rms_norm(const float *x, int64_t x_len, int64_t n_rows, int64_t d, const float *sumsq,
                 int64_t sumsq_len, const float *w, int64_t w_len, float eps, float *out,
                 int64_t out_len);

/* out (n, h, d) = x rotated at row i by the angles of table row pos[i]: cos_t / sin_t
 * (tab_rows, rot / 2) float32. adjacent = 1: pairs (x[2j], x[2j+1]); 0: (x[j], x[j + rot/2]).
 * Dims from rot on are copied. out = x (a*c - b*s, a*s + b*c, each product rounded to float32
 * as rope.Rope.apply does). x_len / out_len must be n * h * d, tab_len tab_rows * rot / 2;
 * rot even in [2, d]; every pos in [0, tab_rows) (A2N_E_INDEX before anything is written);
 * out may be x itself, not another overlap. */
int a2n_rope(const float *x, int64_t x_len, int64_t n, int64_t h, int64_t d, int64_t rot,
             int adjacent, const float *cos_t, const float *sin_t, int64_t tab_len,
             int64_t tab_rows, const int64_t *pos, float *out, int64_t out_len);

/* The feed-forward gate act(gate) * up, split around the tanh (left to the caller: numpy's,
 * so that the bits are ops.gated_'s). a2n_gate_pre: t = the tanh's argument of act(x):
 * gelu_tanh sqrt(2/pi) * c * (1 + 0.044715 c^2) with c = x clipped to [-10, 10], silu x / 2.
 * a2n_gate_post, after t = tanh(t): gate = gate * (t + 1) / 2 * up, in place.
 * Every length (elements) must be the same. */
enum { A2N_ACT_GELU_TANH = 1, A2N_ACT_SILU = 2 };
int a2n_gate_pre(int act, const float *x, int64_t x_len, float *t, int64_t t_len);
int a2n_gate_post(float *gate, int64_t gate_len, const float *t, int64_t t_len, const float *up,
                  int64_t up_len);

/* A grammar's token mask on one row of logits, in place: row[t] = -inf where bit t of mask
 * (32 tokens per uint32 word, least significant bit first, as llguidance writes it) is 0;
 * tokens from 32 * n_words on (logits wider than the mask) are disallowed too. n >= 0,
 * n_words >= 0; the other entries are not touched. */
int a2n_apply_bitmask(float *row, int64_t n, const uint32_t *mask, int64_t n_words);

#endif
