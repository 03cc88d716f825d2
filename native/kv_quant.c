/* The KV cache's block types (llama.cpp's --cache-type-k/-v q8_0 and q4_0): new cache rows
 * quantized into ggml's block layouts, rounding exactly as ggml's reference quantizers
 * (quantize_row_q8_0_ref, quantize_row_q4_0_ref). Attention reads the blocks in place
 * (attention.c); their decoding is the weights' (quants.c, a2n_decode).
 *   q8_0, 34 bytes per 32 values: d f16 = amax / 127, then int8 q = roundf(x * (1 / d));
 *   q4_0, 18 bytes per 32 values: d f16 = max / -8 (max: the value of largest magnitude,
 *        the first one on ties), then 16 bytes, byte j holding q[j] (low nibble) and q[j + 16]
 *        (high), q = min(15, (int8)(x * (1 / d) + 8.5)); a value is (q - 8) * d.
 * Scalar on purpose: a cache write is a few rows per step, and the reference's own float
 * operations (in this order, no contraction: -ffp-contract=off) are what makes it bit-exact. */
#include <math.h>
#include <string.h>
#include "a2ats_native.h"
#include "attention.h"
#include "internal.h"
#include "sel_common.h"

static void put_f16(uint8_t *p, float d) {
    const uint16_t h = a2n_f32_to_f16(d);
    memcpy(p, &h, 2);
}

static void quant_q8_0(const float *x, uint8_t *y) {
    float amax = 0.0f;
    for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    for (int j = 0; j < 32; j++) ((int8_t *)y)[2 + j] = (int8_t)roundf(x[j] * id);
}

static void quant_q4_0(const float *x, uint8_t *y) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; j++)
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    const float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    put_f16(y, d);
    for (int j = 0; j < 16; j++) {
        const int a = (int8_t)(x[j] * id + 8.5f), b = (int8_t)(x[16 + j] * id + 8.5f);
        y[2 + j] = (uint8_t)((a < 15 ? a : 15) | (b < 15 ? b : 15) << 4);
    }
}

int64_t a2n_kv_row_units(int type, int64_t d) {
    switch (type) {
    case A2N_KV_F32: case A2N_KV_F16: return d > 0 ? d : A2N_E_ARG;
    case A2N_KV_Q8_0: return d > 0 && d % 32 == 0 ? d / 32 * 34 : A2N_E_ARG;
    case A2N_KV_Q4_0: return d > 0 && d % 32 == 0 ? d / 32 * 18 : A2N_E_ARG;
    default: return A2N_E_TYPE;
    }
}

int a2n_kv_quantize(int type, const float *x, int64_t n_elems, void *dst, int64_t dst_nbytes) {
    if (type != A2N_KV_Q8_0 && type != A2N_KV_Q4_0) return A2N_E_TYPE;
    if (n_elems < 0 || n_elems % 32) return A2N_E_ARG;
    const int64_t nb = n_elems / 32, bytes = type == A2N_KV_Q8_0 ? 34 : 18;
    if (dst_nbytes != nb * bytes) return A2N_E_SIZE;
    if (nb && (!x || !dst)) return A2N_E_ARG;
    uint8_t *y = dst;
    for (int64_t b = 0; b < nb; b++) {
        if (type == A2N_KV_Q8_0) quant_q8_0(x + 32 * b, y + bytes * b);
        else quant_q4_0(x + 32 * b, y + bytes * b);
    }
    return A2N_OK;
}

/* ---- the host store's rows, for the retrieval kernels (sel_common.h) ---- */
int64_t a2n_kv_row_bytes(int type, int64_t d) {
    if (type != A2N_KV_F32 && type != A2N_KV_F16 && type != A2N_KV_Q8_0 && type != A2N_KV_Q4_0)
        return A2N_E_ARG;
    const int64_t units = a2n_kv_row_units(type, d);
    if (units < 0) return A2N_E_ARG;
    return units * (type == A2N_KV_F32 ? 4 : type == A2N_KV_F16 ? 2 : 1);
}

void a2n_kv_decode_row(const void *src, int type, int64_t d, float *dst) {
    const a2n_type *t = a2n_find_type(type);     /* f16: blocks of 1; q8_0 / q4_0: of 32 */
    a2n_decode(t, src, d / t->block, dst);
}
