/* Fused elementwise steps of the forward pass (see fused.h): RMS norm and RoPE in one call
 * each instead of several numpy operations. Both work row by row, single-threaded (a decode
 * row is a few hundred floats: a thread hand-off costs more than the work), and check every
 * size and index before writing anything. */
#include <math.h>
#include "a2ats_native.h"
#include "fused.h"

/* a * b into *r without overflow, both >= 0 */
static int mul_fits(int64_t a, int64_t b, int64_t *r) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *r = a * b;
    return 1;
}

int a2n_rms_norm(const float *x, int64_t x_len, int64_t n_rows, int64_t d, const float *sumsq,
                 int64_t sumsq_len, const float *w, int64_t w_len, float eps, float *out,
                 int64_t out_len) {
    int64_t len;
    if (n_rows < 0 || d < 1 || !mul_fits(n_rows, d, &len)) return A2N_E_ARG;
    if (x_len != len || out_len != len || (w && w_len != d) || (sumsq && sumsq_len != n_rows))
        return A2N_E_SIZE;
    if (len == 0) return A2N_OK;
    if (!x || !out) return A2N_E_ARG;
    for (int64_t i = 0; i < n_rows; i++) {
        const float *xr = x + i * d;
        float *o = out + i * d;
        float ss;
        if (sumsq) {
            ss = sumsq[i];
        } else {
            double acc = 0.0;
            for (int64_t j = 0; j < d; j++) acc += (double)xr[j] * (double)xr[j];
            ss = (float)acc;
        }
        /* as ops.rms_norm: float32 mean, float32 1 / sqrt(ms + eps), (x * r) * w */
        const float ms = ss / (float)d;
        const float r = 1.0f / sqrtf(ms + eps);
        if (w) {
            for (int64_t j = 0; j < d; j++) {
                const float t = xr[j] * r;
                o[j] = t * w[j];
            }
        } else {
            for (int64_t j = 0; j < d; j++) o[j] = xr[j] * r;
        }
    }
    return A2N_OK;
}

int a2n_rope(const float *x, int64_t x_len, int64_t n, int64_t h, int64_t d, int64_t rot,
             int adjacent, const float *cos_t, const float *sin_t, int64_t tab_len,
             int64_t tab_rows, const int64_t *pos, float *out, int64_t out_len) {
    int64_t nh, len, tl;
    if (n < 0 || h < 1 || d < 1 || rot < 2 || rot > d || rot % 2 || tab_rows < 0)
        return A2N_E_ARG;
    if (!mul_fits(n, h, &nh) || !mul_fits(nh, d, &len) || !mul_fits(tab_rows, rot / 2, &tl))
        return A2N_E_ARG;
    if (x_len != len || out_len != len || tab_len != tl) return A2N_E_SIZE;
    if (n == 0) return A2N_OK;
    if (!x || !out || !pos || !cos_t || !sin_t) return A2N_E_ARG;
    for (int64_t i = 0; i < n; i++)
        if (pos[i] < 0 || pos[i] >= tab_rows) return A2N_E_INDEX;
    const int64_t half = rot / 2;
    for (int64_t i = 0; i < n; i++) {
        const float *c = cos_t + pos[i] * half, *s = sin_t + pos[i] * half;
        for (int64_t k = 0; k < h; k++) {
            const float *xr = x + (i * h + k) * d;
            float *o = out + (i * h + k) * d;
            for (int64_t j = 0; j < half; j++) {
                /* both inputs read before either output is written: in place is safe */
                const int64_t ia = adjacent ? 2 * j : j, ib = adjacent ? 2 * j + 1 : j + half;
                const float a = xr[ia], b = xr[ib];
                const float ac = a * c[j], bs = b * s[j], as = a * s[j], bc = b * c[j];
                o[ia] = ac - bs;
                o[ib] = as + bc;
            }
            if (o != xr)
                for (int64_t j = rot; j < d; j++) o[j] = xr[j];
        }
    }
    return A2N_OK;
}

/* ---- gated feed-forward: act(gate) * up around numpy's tanh -------------------------- *
 * ops.gelu_tanh_ / ops.silu_ are sequences of float32 operations around one np.tanh; the
 * operations before and after it are done here in the same order (one rounding each, no
 * contraction), the tanh stays numpy's, so the bits are those of ops.gated_. */
int a2n_gate_pre(int act, const float *x, int64_t x_len, float *t, int64_t t_len) {
    if (x_len < 0 || t_len != x_len) return A2N_E_SIZE;
    if (act != A2N_ACT_GELU_TANH && act != A2N_ACT_SILU) return A2N_E_ARG;
    if (x_len == 0) return A2N_OK;
    if (!x || !t) return A2N_E_ARG;
    if (act == A2N_ACT_SILU) {
        for (int64_t i = 0; i < x_len; i++) t[i] = x[i] * 0.5f;
        return A2N_OK;
    }
    const float k = (float)0.7978845608028654;    /* np.float32(sqrt(2 / pi)) */
    for (int64_t i = 0; i < x_len; i++) {
        const float v = x[i];
        const float c = v < -10.0f ? -10.0f : (v > 10.0f ? 10.0f : v);   /* np.clip; NaN stays */
        float u = c * c;
        u = u * 0.044715f;
        u = u + 1.0f;
        u = u * c;
        t[i] = u * k;
    }
    return A2N_OK;
}

int a2n_gate_post(float *gate, int64_t gate_len, const float *t, int64_t t_len, const float *up,
                  int64_t up_len) {
    if (gate_len < 0 || t_len != gate_len || up_len != gate_len) return A2N_E_SIZE;
    if (gate_len == 0) return A2N_OK;
    if (!gate || !t || !up) return A2N_E_ARG;
    for (int64_t i = 0; i < gate_len; i++) {
        float s = t[i] + 1.0f;
        s = s * 0.5f;
        const float g = gate[i] * s;
        gate[i] = g * up[i];
    }
    return A2N_OK;
}

int a2n_apply_bitmask(float *row, int64_t n, const uint32_t *mask, int64_t n_words) {
    if (n < 0 || n_words < 0 || n_words > INT64_MAX / 32) return A2N_E_ARG;
    if (n == 0) return A2N_OK;
    if (!row || (n_words && !mask)) return A2N_E_ARG;
    const int64_t m = n < 32 * n_words ? n : 32 * n_words;   /* tokens the mask covers */
    for (int64_t lo = 0; lo < m; lo += 32) {
        const uint32_t bits = mask[lo / 32];
        if (bits == 0xFFFFFFFFu) continue;                     /* a word allowing all 32 */
        const int64_t hi = lo + 32 < m ? lo + 32 : m;
        for (int64_t t = lo; t < hi; t++)                      /* branch-free: a select */
            row[t] = ((bits >> (t - lo)) & 1u) ? row[t] : -INFINITY;
    }
    for (int64_t t = m; t < n; t++) row[t] = -INFINITY;
    return A2N_OK;
}
