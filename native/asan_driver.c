/* AddressSanitizer driver for the native library: valid and hostile calls on
 * exactly-sized heap buffers, so any out-of-bounds read or write aborts.
 * Every case runs with the AVX2 kernels (when compiled in) and with the
 * portable scalar code. Built and run by `make asan` (tests/test_native_asan.py). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"
#include "retrieval.h"
#include "attention.h"
#include "fused.h"

#define CHECK(cond, msg)                                              \
    do {                                                              \
        if (!(cond)) {                                                \
            fprintf(stderr, "FAIL (simd=%d): %s\n", a2n_simd(-1), msg); \
            return 1;                                                 \
        }                                                             \
    } while (0)

static const int TYPES[] = {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30};
#define N_TYPES (int)(sizeof TYPES / sizeof TYPES[0])

/* byte offsets of the f16 scale fields per block (random bytes there give NaN/Inf) */
static void sane_scales(int type, unsigned char *b, int64_t n_blocks, int bytes) {
    int offs[2] = {-1, -1};
    switch (type) {
    case 2: case 6: case 8: offs[0] = 0; break;
    case 3: case 7: case 12: case 13: offs[0] = 0; offs[1] = 2; break;
    case 10: offs[0] = 80; offs[1] = 82; break;
    case 11: offs[0] = 108; break;
    case 14: offs[0] = 208; break;
    default: return;
    }
    for (int64_t k = 0; k < n_blocks; k++)
        for (int i = 0; i < 2; i++)
            if (offs[i] >= 0) {  /* f16 0x2000..0x27ff: about 0.008..0.03 */
                b[k * bytes + offs[i]] = (unsigned char)(k * 31);
                b[k * bytes + offs[i] + 1] = (unsigned char)(0x20 + (k % 8));
            }
}

static int gather_cases(void) {
    const int64_t rows = 257, row_bytes = 96;
    unsigned char *src = malloc(rows * row_bytes), *dst = malloc(64 * row_bytes);
    int64_t *idx = malloc(64 * sizeof *idx);
    for (int64_t i = 0; i < rows * row_bytes; i++) src[i] = (unsigned char)(i * 7);
    for (int i = 0; i < 64; i++) idx[i] = (i * 37) % rows;
    for (int threads = 1; threads <= 4; threads++) {
        CHECK(a2n_gather_rows(src, rows, row_bytes, idx, 64, dst, 64, threads) == A2N_OK, "valid gather");
        for (int i = 0; i < 64; i++)
            CHECK(memcmp(dst + i * row_bytes, src + idx[i] * row_bytes, row_bytes) == 0, "gathered row");
    }
    /* big rows so that the copy is split across threads */
    const int64_t big = 3 << 20;
    unsigned char *bsrc = malloc(4 * big), *bdst = malloc(3 * big);
    memset(bsrc, 0x5A, 4 * big);
    int64_t bidx[3] = {3, 0, 2};
    CHECK(a2n_gather_rows(bsrc, 4, big, bidx, 3, bdst, 3, 3) == A2N_OK, "threaded gather");
    CHECK(bdst[0] == 0x5A && bdst[3 * big - 1] == 0x5A, "threaded gather copied");
    free(bsrc); free(bdst);

    memset(dst, 0xAB, 64 * row_bytes);
    int64_t bad[] = {-1, rows, rows + 1000000, INT64_MAX, INT64_MIN};
    for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
        idx[63] = bad[b];
        CHECK(a2n_gather_rows(src, rows, row_bytes, idx, 64, dst, 64, 2) == A2N_E_INDEX, "bad index refused");
        idx[0] = bad[b];
        CHECK(a2n_gather_rows(src, rows, row_bytes, idx, 64, dst, 64, 2) == A2N_E_INDEX, "bad first index");
        idx[0] = 0;
    }
    for (int i = 0; i < 64 * row_bytes; i++) CHECK(dst[i] == 0xAB, "dst untouched after refusal");
    idx[63] = 0;
    CHECK(a2n_gather_rows(src, rows, row_bytes, idx, 64, dst, 63, 2) == A2N_E_SIZE, "dst too small refused");
    CHECK(a2n_gather_rows(src, rows, -5, idx, 64, dst, 64, 2) == A2N_E_ARG, "negative row size refused");
    CHECK(a2n_gather_rows(NULL, rows, row_bytes, idx, 64, dst, 64, 2) == A2N_E_ARG, "null src refused");
    CHECK(a2n_gather_rows(src, rows, row_bytes, idx, -1, dst, 64, 2) == A2N_E_ARG, "negative count refused");
    free(src); free(dst); free(idx);
    return 0;
}

/* y = x @ W^T through a2n_matmul_q and through dequantize + double dot */
static int matmul_case(int type, int64_t n_out, int64_t n_in, int64_t n_vec) {
    const int64_t nb = a2n_type_nbytes(type, n_out * n_in);
    CHECK(nb > 0, "matmul type size");
    unsigned char *w = malloc(nb);
    for (int64_t i = 0; i < nb; i++) w[i] = (unsigned char)(i * 131 + type);
    if (type == 0) for (int64_t i = 0; i < n_out * n_in; i++) ((float *)w)[i] = (float)((i * 7) % 13) - 6.0f;
    else if (type == 1 || type == 30) for (int64_t i = 0; i < n_out * n_in; i++) w[2 * i + 1] = 0x3c;
    else {
        int64_t bs = a2n_type_nbytes(type, type >= 10 && type <= 14 ? 256 : 32);
        sane_scales(type, w, nb / bs, (int)bs);
    }
    float *x = malloc(n_vec * n_in * sizeof *x), *y = malloc(n_vec * n_out * sizeof *y);
    float *wf = malloc(n_out * n_in * sizeof *wf);
    for (int64_t i = 0; i < n_vec * n_in; i++) x[i] = (float)((i * 17) % 29) / 29.0f - 0.5f;
    CHECK(a2n_dequantize_f32(type, w, nb, wf, n_out * n_in, 2) == A2N_OK, "matmul reference dequant");
    CHECK(a2n_matmul_q(type, w, nb, n_out, n_in, x, n_vec, y, 3) == A2N_OK, "matmul");
    for (int64_t v = 0; v < n_vec; v++)
        for (int64_t r = 0; r < n_out; r++) {
            double ref = 0, mag = 0;
            for (int64_t k = 0; k < n_in; k++) {
                ref += (double)wf[r * n_in + k] * x[v * n_in + k];
                mag += fabs((double)wf[r * n_in + k] * x[v * n_in + k]);
            }
            /* the int8 types quantize x (as llama.cpp): ~1e-2 */
            const int q8 = a2n_act_kind(type) > 0;
            CHECK(fabs(y[v * n_out + r] - ref) <= (q8 ? 1e-2 : 1e-4) * mag + 1e-6, "matmul value");
        }
    CHECK(a2n_matmul_q(type, w, nb, n_out + 1, n_in, x, n_vec, y, 2) == A2N_E_SIZE, "matmul size refused");
    CHECK(a2n_matmul_q(type, w, nb - 1, n_out, n_in, x, n_vec, y, 2) == A2N_E_SIZE, "short weights refused");
    CHECK(a2n_matmul_q(type, w, nb, n_out, n_in, x, 0, y, 2) == A2N_E_ARG, "no vectors refused");
    free(w); free(x); free(y); free(wf);
    return 0;
}

/* The int8 path step by step on exactly-sized buffers: repack, quantize, product; every
 * vector alone equals its row of the batch (batch invariance), the raw-weight entry point and
 * (in the SIMD pass) the portable kernels give the same bits; bad sizes are refused. */
static int pack_case(int type, int64_t n_out, int64_t n_in, int64_t n_vec, int threads) {
    const int kind = a2n_act_kind(type);
    const int64_t nb = a2n_type_nbytes(type, n_out * n_in), pb = a2n_repack_nbytes(type, n_out, n_in);
    const int64_t ab = a2n_act_nbytes(kind, n_vec, n_in), ab1 = a2n_act_nbytes(kind, 1, n_in);
    CHECK(kind > 0 && nb > 0 && pb > 0 && ab > 0 && ab1 > 0 && ab == n_vec * ab1, "pack sizes");
    unsigned char *w = malloc(nb), *wp = malloc(pb), *act = malloc(ab), *one = malloc(ab1);
    for (int64_t i = 0; i < nb; i++) w[i] = (unsigned char)(i * 151 + type * 7);
    const int64_t bs = a2n_type_nbytes(type, kind == 1 ? 32 : 256);
    sane_scales(type, w, nb / bs, (int)bs);
    float *x = malloc(n_vec * n_in * sizeof *x), *y = malloc(n_vec * n_out * sizeof *y);
    float *y1 = malloc(n_out * sizeof *y1), *y2 = malloc(n_vec * n_out * sizeof *y2);
    for (int64_t i = 0; i < n_vec * n_in; i++) x[i] = (float)((i * 37) % 41) / 13.0f - 1.5f;
    for (int64_t i = 0; i < n_in && i < 32; i++) x[i] = 0.0f;   /* an all-zero block: d = 0 */
    CHECK(a2n_repack(type, w, nb, n_out, n_in, wp, pb, threads) == A2N_OK, "repack");
    CHECK(a2n_quantize_act(kind, x, n_vec, n_in, act, ab, threads) == A2N_OK, "quantize");
    CHECK(a2n_matmul_packed(type, wp, pb, n_out, n_in, act, ab, n_vec, y, threads) == A2N_OK, "packed");
    for (int64_t v = 0; v < n_vec; v++) {
        memcpy(one, act + v * ab1, (size_t)ab1);
        CHECK(a2n_matmul_packed(type, wp, pb, n_out, n_in, one, ab1, 1, y1, 1) == A2N_OK, "packed one");
        CHECK(memcmp(y1, y + v * n_out, (size_t)n_out * sizeof *y1) == 0, "a vector alone = its row");
    }
    {   /* two weights on the same records in one call: each the bits of its own call */
        float *y3 = malloc(n_vec * n_out * sizeof *y3);
        const int types[2] = {type, type};
        const void *wps[2] = {wp, wp};
        const int64_t sizes[2] = {pb, pb}, outs[2] = {n_out, n_out};
        float *ys[2] = {y2, y3};
        CHECK(a2n_matmul_packed_n(2, types, wps, sizes, outs, n_in, act, ab, n_vec, ys, threads) == A2N_OK,
              "packed pair");
        CHECK(memcmp(y2, y, (size_t)(n_vec * n_out) * sizeof *y) == 0 &&
              memcmp(y3, y, (size_t)(n_vec * n_out) * sizeof *y) == 0, "pair = single");
        CHECK(a2n_matmul_packed_n(0, types, wps, sizes, outs, n_in, act, ab, n_vec, ys, 2) == A2N_E_ARG, "no weights");
        CHECK(a2n_matmul_packed_n(9, types, wps, sizes, outs, n_in, act, ab, n_vec, ys, 2) == A2N_E_ARG,
              "too many weights");
        free(y3);
    }
    CHECK(a2n_matmul_q(type, w, nb, n_out, n_in, x, n_vec, y2, 2) == A2N_OK, "raw entry point");
    CHECK(memcmp(y2, y, (size_t)(n_vec * n_out) * sizeof *y) == 0, "raw = packed");
    if (a2n_simd(-1)) {
        a2n_simd(0);
        const int rc = a2n_matmul_packed_f32(type, wp, pb, n_out, n_in, x, n_vec, y2, threads);
        a2n_simd(1);
        CHECK(rc == A2N_OK && memcmp(y2, y, (size_t)(n_vec * n_out) * sizeof *y) == 0, "simd = portable");
    }
    CHECK(a2n_repack(type, w, nb - 1, n_out, n_in, wp, pb, 2) == A2N_E_SIZE, "short weights refused");
    CHECK(a2n_repack(type, w, nb, n_out, n_in, wp, pb - 1, 2) == A2N_E_SIZE, "short repack refused");
    CHECK(a2n_repack(type, w, nb, n_out, n_in + 1, wp, pb, 2) == A2N_E_SIZE, "partial block refused");
    CHECK(a2n_repack(1, w, nb, n_out, n_in, wp, pb, 2) == A2N_E_TYPE, "no int8 path refused");
    CHECK(a2n_quantize_act(kind, x, n_vec, n_in, act, ab - 1, 2) == A2N_E_SIZE, "short records refused");
    CHECK(a2n_quantize_act(3, x, n_vec, n_in, act, ab, 2) == A2N_E_TYPE, "bad kind refused");
    CHECK(a2n_quantize_act(kind, NULL, n_vec, n_in, act, ab, 2) == A2N_E_ARG, "null x refused");
    CHECK(a2n_matmul_packed(type, wp, pb, n_out, n_in, act, ab, n_vec + 1, y, 2) == A2N_E_SIZE,
          "records short of n_vec refused");
    CHECK(a2n_matmul_packed(type, wp, pb - 1, n_out, n_in, act, ab, n_vec, y, 2) == A2N_E_SIZE,
          "short packed weights refused");
    CHECK(a2n_matmul_packed(type, wp, pb, n_out, n_in, act, ab, 0, y, 2) == A2N_E_ARG, "no vectors refused");
    CHECK(a2n_matmul_packed(type, NULL, pb, n_out, n_in, act, ab, n_vec, y, 2) == A2N_E_ARG, "null weights");
    free(w); free(wp); free(act); free(one); free(x); free(y); free(y1); free(y2);
    return 0;
}

static int pack_cases(void) {
    static const int INT8[] = {2, 6, 8, 12, 13, 14};
    for (int k = 0; k < 6; k++) {
        const int64_t B = INT8[k] >= 12 ? 256 : 32;
        /* 1..7 rows in the last group of 8, 1..3 vectors in the last tile of 4, enough
         * groups for the worker pool and chunks of the vectors-many path */
        if (pack_case(INT8[k], 13, 3 * B, 7, 2) || pack_case(INT8[k], 1, B, 1, 1) ||
            pack_case(INT8[k], 8 * 40 + 5, 2 * B, 18, 3) || pack_case(INT8[k], 9, 17 * B, 2, 4))
            return 1;
    }
    return 0;
}

static int quant_cases(void) {
    const int64_t n = 64 * 256;   /* enough blocks for several threads */
    for (int k = 0; k < N_TYPES; k++) {
        int64_t nb = a2n_type_nbytes(TYPES[k], n);
        CHECK(nb > 0, "type size");
        unsigned char *src = malloc(nb);
        for (int64_t i = 0; i < nb; i++) src[i] = (unsigned char)(i * 13 + k);
        float *dst = malloc(n * sizeof *dst);
        unsigned short *h = malloc(n * sizeof *h);
        CHECK(a2n_dequantize_f32(TYPES[k], src, nb, dst, n, 3) == A2N_OK, "dequant f32");
        CHECK(a2n_dequantize_f16(TYPES[k], src, nb, h, n, 3) == A2N_OK, "dequant f16");
        CHECK(a2n_dequantize_f32(TYPES[k], src, nb - 1, dst, n, 3) == A2N_E_SIZE, "short src refused");
        CHECK(a2n_dequantize_f32(TYPES[k], NULL, nb, dst, n, 3) == A2N_E_ARG, "null src refused");
        free(src); free(dst); free(h);
        /* odd shapes: n_vec past one group of 8, rows wider than L1 holds for 8
         * vectors, and enough rows to run on the worker pool */
        if (matmul_case(TYPES[k], 5, 256, 3) || matmul_case(TYPES[k], 7, 512, 17) ||
            matmul_case(TYPES[k], 9, 2304, 8) || matmul_case(TYPES[k], 1024, 256, 2))
            return 1;
    }
    if (pack_cases()) return 1;
    /* unblocked types with lengths off the 8-wide step */
    if (matmul_case(0, 3, 37, 2) || matmul_case(1, 3, 37, 5) || matmul_case(30, 2, 13, 1)) return 1;
    CHECK(a2n_type_nbytes(16, 256) == A2N_E_TYPE, "unsupported type");
    CHECK(a2n_type_nbytes(12, 100) == A2N_E_SIZE, "partial block refused");
    return 0;
}

/* ---- retrieval kernels (retrieval.c) ---------------------------------------- */
static float frand(unsigned *st) {
    *st = *st * 1103515245u + 12345u;
    return (float)((*st >> 8) & 0xFFFF) / 32768.0f - 1.0f;
}

static int lut_cases(void) {
    const int64_t S = 2, G = 3, g = 4, d = 36, M = 4, C = 17, ds = d / M;
    unsigned st = 1;
    float *q = malloc(S * G * g * d * sizeof *q), *cent = malloc(G * M * C * ds * sizeof *cent);
    float *lut = malloc(S * G * g * M * C * sizeof *lut);
    for (int64_t i = 0; i < S * G * g * d; i++) q[i] = frand(&st);
    for (int64_t i = 0; i < G * M * C * ds; i++) cent[i] = frand(&st);
    CHECK(a2n_build_lut(q, S * G * g * d, cent, G * M * C * ds, S, G, g, d, M, C, lut,
                        S * G * g * M * C, 3) == A2N_OK, "lut");
    for (int64_t s = 0; s < S; s++)
        for (int64_t k = 0; k < G; k++)
            for (int64_t j = 0; j < g; j++)
                for (int64_t m = 0; m < M; m++)
                    for (int64_t c = 0; c < C; c++) {
                        double ref = 0;
                        for (int64_t x = 0; x < ds; x++)
                            ref += (double)q[((s * G + k) * g + j) * d + m * ds + x] * cent[((k * M + m) * C + c) * ds + x];
                        CHECK(fabs(lut[(((s * G + k) * g + j) * M + m) * C + c] - ref) < 1e-5, "lut value");
                    }
    CHECK(a2n_build_lut(q, S * G * g * d, cent, G * M * C * ds, S, G, g, d, M, C, lut,
                        S * G * g * M * C - 1, 3) == A2N_E_SIZE, "short lut refused");
    CHECK(a2n_build_lut(q, S * G * g * d, cent, G * M * C * ds, S, G, g, d, 5, C, lut,
                        S * G * g * M * C, 3) == A2N_E_ARG, "M not dividing d refused");
    CHECK(a2n_build_lut(q, S * G * g * d, cent, G * M * C * ds, S, G, g, d, M, INT64_MAX / 4, lut,
                        S * G * g * M * C, 3) == A2N_E_SIZE, "overflowing sizes refused");
    free(q); free(cent); free(lut);
    return 0;
}

#define RS 3
static int select_cases(void) {
    const int64_t G = 2, g = 4, M = 2, C = 64, sinks = 4, window = 16, K = 25;
    const int64_t caps[RS] = {300, 1200, 50}, T[RS] = {290, 1200, 30};
    unsigned st = 7;
    float *lut = malloc(RS * G * g * M * C * sizeof *lut);
    for (int64_t i = 0; i < RS * G * g * M * C; i++) lut[i] = (float)(int)(4 * frand(&st));  /* many ties */
    uint16_t *codes[RS];
    for (int s = 0; s < RS; s++) {
        codes[s] = malloc(G * M * caps[s] * sizeof(uint16_t));
        for (int64_t i = 0; i < G * M * caps[s]; i++) codes[s][i] = (uint16_t)((st = st * 1103515245u + 12345u) >> 10) % C;
    }
    int64_t kmax = 0;
    for (int s = 0; s < RS; s++) {
        int64_t lo = sinks < T[s] ? sinks : T[s], hi = T[s] - window > lo ? T[s] - window : lo;
        int64_t n = hi - lo < K * g ? hi - lo : K * g, need = lo + n + T[s] - hi;
        kmax = need > kmax ? need : kmax;
    }
    int64_t *idx = malloc(RS * G * kmax * sizeof *idx), *idx2 = malloc(RS * G * kmax * sizeof *idx2);
    int32_t *lens = malloc(RS * G * sizeof *lens), *lens2 = malloc(RS * G * sizeof *lens2);
    const uint16_t *const *cp = (const uint16_t *const *)codes;
    for (int threads = 1; threads <= 3; threads += 2) {
        CHECK(a2n_select_topk(lut, RS * G * g * M * C, RS, G, g, M, C, cp, caps, T, sinks, window, K,
                              idx, kmax, lens, threads) == A2N_OK, "select");
        for (int s = 0; s < RS; s++)
            for (int k = 0; k < G; k++) {
                const int64_t *o = idx + (s * G + k) * kmax;
                int64_t n = lens[s * G + k];
                CHECK(n <= kmax && n <= T[s], "select length");
                for (int64_t i = 0; i < n; i++) CHECK(o[i] >= 0 && o[i] < T[s] && (i == 0 || o[i] > o[i - 1]), "select sorted");
                for (int64_t i = n; i < kmax; i++) CHECK(o[i] == -1, "select padding");
            }
    }
    /* the other kernel set gives the same selection */
    a2n_simd(a2n_simd(-1) ? 0 : 1);
    CHECK(a2n_select_topk(lut, RS * G * g * M * C, RS, G, g, M, C, cp, caps, T, sinks, window, K,
                          idx2, kmax, lens2, 2) == A2N_OK, "select other kernels");
    CHECK(memcmp(idx, idx2, RS * G * kmax * sizeof *idx) == 0 && memcmp(lens, lens2, RS * G * sizeof *lens) == 0,
          "simd and scalar selections agree");
    /* refusals leave idx and lens untouched */
    memset(idx, 0xAB, RS * G * kmax * sizeof *idx);
    memset(lens, 0xAB, RS * G * sizeof *lens);
    codes[1][1 * M * caps[1] + 1 * caps[1] + 600] = (uint16_t)C;
    CHECK(a2n_select_topk(lut, RS * G * g * M * C, RS, G, g, M, C, cp, caps, T, sinks, window, K,
                          idx, kmax, lens, 3) == A2N_E_INDEX, "code >= C refused");
    codes[1][1 * M * caps[1] + 1 * caps[1] + 600] = 0;
    int64_t badT[RS] = {290, 1201, 30};
    CHECK(a2n_select_topk(lut, RS * G * g * M * C, RS, G, g, M, C, cp, caps, badT, sinks, window, K,
                          idx, kmax, lens, 3) == A2N_E_INDEX, "T > cap refused");
    CHECK(a2n_select_topk(lut, RS * G * g * M * C, RS, G, g, M, C, cp, caps, T, sinks, window, K,
                          idx, kmax - 1, lens, 3) == A2N_E_SIZE, "narrow idx refused");
    CHECK(a2n_select_topk(lut, RS * G * g * M * C - 1, RS, G, g, M, C, cp, caps, T, sinks, window, K,
                          idx, kmax, lens, 3) == A2N_E_SIZE, "short lut refused");
    CHECK(a2n_select_topk(lut, RS * G * g * M * C, RS, G, g, M, C, cp, caps, T, sinks, window, 0,
                          idx, kmax, lens, 3) == A2N_E_ARG, "K = 0 refused");
    for (int64_t i = 0; i < RS * G * kmax; i++) CHECK(idx[i] == (int64_t)0xABABABABABABABABull, "idx untouched");
    for (int64_t i = 0; i < RS * G; i++) CHECK(lens[i] == (int32_t)0xABABABABu, "lens untouched");
    for (int s = 0; s < RS; s++) free(codes[s]);
    free(lut); free(idx); free(idx2); free(lens); free(lens2);
    return 0;
}

static void *kv_buffer(int t, float *f, int64_t nkv);

/* bytes of a store row of d values of A2N_KV_* type t */
static int64_t row_bytes(int t, int64_t d) {
    return a2n_kv_row_units(t, d) * (t == A2N_KV_F32 ? 4 : t == A2N_KV_F16 ? 2 : 1);
}

/* stores of K type kt and V type vt (f32, f16, q8_0 / q4_0 blocks: exactly-sized heap buffers);
 * one pair with a long selection split over threads */
static int attention_cases(int kt, int vt, int64_t S, int64_t G, int64_t g, int64_t d, int64_t cap,
                           int64_t kmax, int threads) {
    unsigned st = (unsigned)(d * 31 + kt * 3 + vt);
    const int64_t nkv = G * cap * d, krb = row_bytes(kt, d), vrb = row_bytes(vt, d);
    float *q = malloc(S * G * g * d * sizeof *q), *out = malloc(S * G * g * d * sizeof *out);
    void *keys[4], *values[4];
    int64_t caps[4];
    float *kf[4], *vf[4];
    for (int64_t s = 0; s < S; s++) {   /* kf, vf: the values the buffers hold */
        caps[s] = cap;
        kf[s] = malloc(nkv * sizeof(float)); vf[s] = malloc(nkv * sizeof(float));
        for (int64_t i = 0; i < nkv; i++) { kf[s][i] = frand(&st); vf[s][i] = frand(&st); }
        keys[s] = kv_buffer(kt, kf[s], nkv); values[s] = kv_buffer(vt, vf[s], nkv);
        CHECK(keys[s] && values[s], "store buffers");
    }
    for (int64_t i = 0; i < S * G * g * d; i++) q[i] = 2 * frand(&st);
    int64_t *idx = malloc(S * G * kmax * sizeof *idx);
    int32_t *lens = malloc(S * G * sizeof *lens);
    for (int64_t p = 0; p < S * G; p++) {
        lens[p] = (int32_t)(kmax - p % 3);
        for (int64_t i = 0; i < kmax; i++) idx[p * kmax + i] = i < lens[p] ? (i * 7919 + p) % cap : -1;
    }
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, kt, vt, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_OK, "attention");
    double *sc = malloc(kmax * sizeof *sc);
    for (int64_t p = 0; p < S * G; p++)
        for (int64_t j = 0; j < g; j++) {
            const int64_t s = p / G, k = p % G;
            double mx = -1e300, l = 0;
            for (int64_t i = 0; i < lens[p]; i++) {
                double a = 0;
                for (int64_t x = 0; x < d; x++) a += (double)q[(p * g + j) * d + x] * kf[s][(k * cap + idx[p * kmax + i]) * d + x];
                sc[i] = 0.3 * a;
                mx = sc[i] > mx ? sc[i] : mx;
            }
            for (int64_t x = 0; x < d; x++) {
                double acc = 0;
                l = 0;
                for (int64_t i = 0; i < lens[p]; i++) {
                    double w = exp(sc[i] - mx);
                    l += w;
                    acc += w * vf[s][(k * cap + idx[p * kmax + i]) * d + x];
                }
                CHECK(fabs(out[(p * g + j) * d + x] - acc / l) < 5e-5, "attention value");
            }
        }
    free(sc);
    /* batched gather of the same selections into exactly-sized (S, G, kmax, row) buffers as
     * stored, then into (S, G, kmax, d) float32 decoded */
    {
        char *kd = malloc(S * G * kmax * krb), *vd = malloc(S * G * kmax * vrb);
        float *kdf = malloc(S * G * kmax * d * sizeof *kdf), *vdf = malloc(S * G * kmax * d * sizeof *vdf);
        const void *const *kp = (const void *const *)keys, *const *vp = (const void *const *)values;
        CHECK(a2n_gather_sel(S, G, d, kp, vp, caps, kt, vt, idx, kmax, lens, kd, vd, S * G * kmax, 0,
                             threads) == A2N_OK, "gather_sel");
        CHECK(a2n_gather_sel(S, G, d, kp, vp, caps, kt, vt, idx, kmax, lens, kdf, vdf, S * G * kmax, 1,
                             threads) == A2N_OK, "gather_sel decoded");
        for (int64_t p = 0; p < S * G; p++)
            for (int64_t i = 0; i < lens[p]; i++) {
                const int64_t s = p / G, k = p % G, row = k * cap + idx[p * kmax + i];
                CHECK(!memcmp(kd + (p * kmax + i) * krb, (const char *)keys[s] + row * krb, krb), "gather_sel K row");
                CHECK(!memcmp(vd + (p * kmax + i) * vrb, (const char *)values[s] + row * vrb, vrb), "gather_sel V row");
                CHECK(!memcmp(kdf + (p * kmax + i) * d, kf[s] + row * d, d * sizeof(float)), "gather_sel decoded K row");
                CHECK(!memcmp(vdf + (p * kmax + i) * d, vf[s] + row * d, d * sizeof(float)), "gather_sel decoded V row");
            }
        const int64_t at = lens[0] - 1, keep = idx[at];
        idx[at] = cap;
        CHECK(a2n_gather_sel(S, G, d, kp, vp, caps, kt, vt, idx, kmax, lens, kd, vd, S * G * kmax, 0,
                             threads) == A2N_E_INDEX, "gather_sel bad row refused");
        idx[at] = keep;
        CHECK(a2n_gather_sel(S, G, d, kp, vp, caps, kt, vt, idx, kmax, lens, kd, vd, S * G * kmax - 1, 0,
                             threads) == A2N_E_SIZE, "gather_sel dst size refused");
        CHECK(a2n_gather_sel(S, G, d, kp, vp, caps, kt, 5, idx, kmax, lens, kd, vd, S * G * kmax, 0,
                             threads) == A2N_E_ARG, "gather_sel unknown type refused");
        CHECK(a2n_gather_sel(S, G, d, kp, vp, caps, kt, vt, idx, kmax, lens, kd, vd, S * G * kmax, 2,
                             threads) == A2N_E_ARG, "gather_sel bad decode flag refused");
        free(kd); free(vd); free(kdf); free(vdf);
    }
    /* row cache bookkeeping over the same selections, twice (the second: all hits), in
     * exactly-sized maps; then a token past the map is refused with the maps unchanged */
    {
        const int64_t C = kmax, nm = cap;
        int32_t **map = malloc(S * sizeof *map), **tok = malloc(S * sizeof *tok), **hand = malloc(S * sizeof *hand);
        int64_t *mcaps = malloc(S * sizeof *mcaps), *scaps = malloc(S * sizeof *scaps);
        for (int64_t s = 0; s < S; s++) {
            map[s] = malloc(G * nm * 4); tok[s] = malloc(G * C * 4); hand[s] = calloc(G, 4);
            memset(map[s], 0xff, G * nm * 4); memset(tok[s], 0xff, G * C * 4);
            mcaps[s] = nm; scaps[s] = C;
        }
        int32_t *slots = malloc(S * G * kmax * 4), *mslot = malloc(S * G * kmax * 4), *mn = malloc(S * G * 4);
        int64_t *midx = malloc(S * G * kmax * 8);
        for (int pass = 0; pass < 2; pass++) {
            CHECK(a2n_rowcache_plan(S, G, idx, kmax, lens, map, mcaps, tok, scaps, hand, slots, midx,
                                    mslot, mn, threads) == A2N_OK, "rowcache_plan");
            for (int64_t p = 0; p < S * G; p++) {
                CHECK(mn[p] == (pass ? 0 : lens[p]), "rowcache_plan misses");
                for (int64_t i = 0; i < lens[p]; i++)
                    CHECK(tok[p / G][(p % G) * C + slots[p * kmax + i]] == idx[p * kmax + i], "rowcache slot");
            }
        }
        const int64_t at = lens[0] - 1, keep = idx[at];
        idx[at] = cap;
        CHECK(a2n_rowcache_plan(S, G, idx, kmax, lens, map, mcaps, tok, scaps, hand, slots, midx,
                                mslot, mn, threads) == A2N_E_INDEX, "rowcache_plan bad token refused");
        idx[at] = keep;
        for (int64_t s = 0; s < S; s++) { free(map[s]); free(tok[s]); free(hand[s]); }
        free(map); free(tok); free(hand); free(mcaps); free(scaps); free(slots); free(mslot); free(mn); free(midx);
    }
    /* refusals: out untouched */
    for (int64_t i = 0; i < S * G * g * d; i++) out[i] = 7.0f;    /* refusals: out untouched */
    for (int64_t i = 0; i < S * G * g * d; i++) out[i] = 7.0f;
    const int64_t bad[] = {-1, cap, INT64_MAX, INT64_MIN};
    for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
        const int64_t at = (S * G - 1) * kmax + lens[S * G - 1] - 1, keep = idx[at];
        idx[at] = bad[b];
        CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                                   caps, kt, vt, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_INDEX, "bad row refused");
        idx[at] = keep;
    }
    lens[0] = (int32_t)kmax + 1;
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, kt, vt, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_SIZE, "lens > kmax refused");
    lens[0] = -1;
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, kt, vt, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_SIZE, "negative lens refused");
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, 5, vt, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_ARG, "unknown K type refused");
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, kt, -1, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_ARG, "unknown V type refused");
    if (d % 32)   /* block rows need whole blocks */
        CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                                   caps, A2N_KV_Q8_0, vt, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_ARG,
              "partial blocks refused");
    for (int64_t i = 0; i < S * G * g * d; i++) CHECK(out[i] == 7.0f, "out untouched after refusal");
    lens[0] = 0;   /* an empty selection gives zeros */
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, kt, vt, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_OK, "empty selection");
    for (int64_t i = 0; i < g * d; i++) CHECK(out[i] == 0.0f, "empty selection is zero");
    /* exact scores over [lo, hi) of every sequence */
    int64_t lo[4], hi[4], width = cap - 3;
    for (int64_t s = 0; s < S; s++) { lo[s] = s; hi[s] = cap - 3 + s; }
    float *es = malloc(S * G * g * width * sizeof *es);
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, kt, lo, hi, es, width,
                           threads) == A2N_OK, "exact scores");
    for (int64_t p = 0; p < S * G * g; p += 2) {   /* against double dots of the values held */
        const int64_t s = p / (G * g), k = p / g % G;
        for (int64_t t = 0; t < hi[s] - lo[s]; t += 7) {
            double a = 0;
            for (int64_t x = 0; x < d; x++) a += (double)q[p * d + x] * kf[s][(k * cap + lo[s] + t) * d + x];
            CHECK(fabs(es[p * width + t] - a) < 1e-5 * d, "exact score value");
        }
        for (int64_t t = hi[s] - lo[s]; t < width; t++) CHECK(es[p * width + t] == -INFINITY, "exact score padding");
    }
    hi[S - 1] = cap + 1;
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, kt, lo, hi, es, width,
                           threads) == A2N_E_INDEX, "hi > cap refused");
    hi[S - 1] = cap;
    lo[0] = -1;
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, kt, lo, hi, es, width,
                           threads) == A2N_E_INDEX, "negative lo refused");
    lo[0] = 0;
    hi[0] = cap;
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, kt, lo, hi, es, width,
                           threads) == A2N_E_SIZE, "narrow scores refused");
    hi[0] = cap - 3;
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, 5, lo, hi, es, width,
                           threads) == A2N_E_ARG, "exact scores unknown type refused");
    free(es);
    for (int64_t s = 0; s < S; s++) { free(keys[s]); free(values[s]); free(kf[s]); free(vf[s]); }
    free(q); free(out); free(idx); free(lens);
    return 0;
}

/* fast-scan (fastscan.c): packing, LUT quantization and selection on exactly-sized buffers;
 * g = 3 (a pair of heads and a single one per block), M = 6, lengths off the block of 32 */
static int fastscan_cases(void) {
    enum { FS = 3, FG = 2, Fg = 3, FM = 6 };
    const int64_t caps[FS] = {96, 0, 320}, T[FS] = {77, 0, 301}, sinks = 5, window = 9;
    unsigned st = 7;
    uint8_t *blk[FS];
    for (int64_t s = 0; s < FS; s++) {
        const int64_t nb = FG * FM / 2 * caps[s];
        blk[s] = nb ? malloc(nb) : NULL;
        if (nb) memset(blk[s], 0, nb);
        const int64_t n = T[s] - 3;   /* all but the last 3 tokens, then those 3 */
        if (n <= 0) continue;
        uint16_t *c = malloc(FG * FM * n * sizeof *c);
        for (int64_t i = 0; i < FG * FM * n; i++) c[i] = (uint16_t)((st = st * 1103515245u + 12345u) >> 20 & 15);
        CHECK(a2n_fs_pack(c, FG * FM * n, FG, FM, n, blk[s], nb, caps[s], 0) == A2N_OK, "fs pack");
        CHECK(a2n_fs_pack(c, FG * FM * 3, FG, FM, 3, blk[s], nb, caps[s], n) == A2N_OK, "fs pack tail");
        CHECK(a2n_fs_pack(c, FG * FM * 3, FG, FM, 3, blk[s], nb, caps[s], caps[s] - 2) == A2N_E_INDEX,
              "fs pack beyond cap refused");
        CHECK(a2n_fs_pack(c, FG * FM * 3, FG, FM, 3, blk[s], nb - 1, caps[s], 0) == A2N_E_SIZE,
              "fs pack short blocks refused");
        CHECK(a2n_fs_pack(c, FG * FM * 3, FG, 5, 3, blk[s], nb, caps[s], 0) == A2N_E_ARG, "fs pack odd M refused");
        c[FG * FM * 3 - 1] = 16;
        CHECK(a2n_fs_pack(c, FG * FM * 3, FG, FM, 3, blk[s], nb, caps[s], 0) == A2N_E_INDEX, "fs pack code 16 refused");
        free(c);
    }
    const int64_t nl = FS * FG * Fg * FM * 16;
    float *lut = malloc(nl * sizeof *lut), *sc = malloc(FS * FG * Fg * sizeof *sc), *bi = malloc(FS * FG * Fg * sizeof *bi);
    uint8_t *q = malloc(nl);
    for (int64_t i = 0; i < nl; i++) lut[i] = (float)(int)(6 * frand(&st));   /* ties */
    lut[5] = NAN;
    lut[FG * Fg * FM * 16 + 9] = INFINITY;
    CHECK(a2n_fs_quantize_lut(lut, nl, FS * FG * Fg, FM, q, nl, sc, bi) == A2N_OK, "fs quantize");
    CHECK(a2n_fs_quantize_lut(lut, nl, FS * FG * Fg, FM, q, nl - 1, sc, bi) == A2N_E_SIZE, "fs quantize short");
    lut[5] = 0.5f;
    lut[FG * Fg * FM * 16 + 9] = 1.0f;
    const int64_t kmax = 305;   /* T[2] = 301 fits with room: -1 padding */
    int64_t *idx = malloc(FS * FG * kmax * sizeof *idx), *idx2 = malloc(FS * FG * kmax * sizeof *idx2);
    int32_t *lens = malloc(FS * FG * sizeof *lens), *lens2 = malloc(FS * FG * sizeof *lens2);
    const uint8_t *const *cp = (const uint8_t *const *)blk;
    const int64_t Ks[] = {1, 9, 40, 1000};
    for (int i = 0; i < 4; i++) {
        const int64_t K = Ks[i];
        CHECK(a2n_fs_select(lut, nl, FS, FG, Fg, FM, cp, caps, T, sinks, window, K, idx, kmax, lens, 3) == A2N_OK,
              "fs select");
        for (int64_t p = 0; p < FS * FG; p++) {
            const int64_t *o = idx + p * kmax;
            CHECK(lens[p] <= T[p / FG], "fs select length");
            for (int64_t x = 0; x < lens[p]; x++) CHECK(o[x] >= 0 && o[x] < T[p / FG] && (x == 0 || o[x] > o[x - 1]), "fs sorted");
            for (int64_t x = lens[p]; x < kmax; x++) CHECK(o[x] == -1, "fs padding");
        }
        const int mode = a2n_simd(-1);
        a2n_simd(!mode);
        const int rc = a2n_fs_select(lut, nl, FS, FG, Fg, FM, cp, caps, T, sinks, window, K, idx2, kmax, lens2, 2);
        a2n_simd(mode);
        CHECK(rc == A2N_OK && memcmp(idx, idx2, FS * FG * kmax * sizeof *idx) == 0 &&
              memcmp(lens, lens2, FS * FG * sizeof *lens) == 0, "fs simd and scalar selections agree");
    }
    /* refusals */
    const int64_t odd[FS] = {96, 0, 310}, over[FS] = {97, 0, 301};
    CHECK(a2n_fs_select(lut, nl, FS, FG, Fg, FM, cp, odd, T, sinks, window, 3, idx, kmax, lens, 2) == A2N_E_SIZE,
          "fs capacity off the block refused");
    CHECK(a2n_fs_select(lut, nl, FS, FG, Fg, FM, cp, caps, over, sinks, window, 3, idx, kmax, lens, 2) == A2N_E_INDEX,
          "fs T beyond capacity refused");
    CHECK(a2n_fs_select(lut, nl - 1, FS, FG, Fg, FM, cp, caps, T, sinks, window, 3, idx, kmax, lens, 2) == A2N_E_SIZE,
          "fs short lut refused");
    CHECK(a2n_fs_select(lut, nl, FS, FG, Fg, FM, cp, caps, T, sinks, window, 3, idx, 20, lens, 2) == A2N_E_SIZE,
          "fs short kmax refused");
    CHECK(a2n_fs_select(lut, nl, FS, FG, Fg, 5, cp, caps, T, sinks, window, 3, idx, kmax, lens, 2) == A2N_E_ARG,
          "fs odd M refused");
    CHECK(a2n_fs_select(lut, nl, FS, FG, Fg, FM, cp, caps, T, sinks, window, 0, idx, kmax, lens, 2) == A2N_E_ARG,
          "fs K = 0 refused");
    for (int64_t s = 0; s < FS; s++) free(blk[s]);
    free(lut); free(sc); free(bi); free(q); free(idx); free(idx2); free(lens); free(lens2);
    return 0;
}

/* exact re-rank (rerank.c) on exactly-sized stores of every type, against the other kernel
 * set; keys whose 32-value blocks start with 127/32 (q8_0: scale 1/32) or -4 (q4_0: scale
 * 1/2) then hold small integers: every type stores them exactly, the dots are exact */
static int rerank_cases(int kt) {
    enum { RSQ = 2, RG = 2, Rg = 5, Rd = 64 };   /* heads: a group of 4 (two rows at once) and one */
    const int64_t caps[RSQ] = {90, 40}, T[RSQ] = {90, 33}, sinks = 3, window = 5, kin = 60;
    unsigned st = 11;
    void *keys[RSQ];
    for (int64_t s = 0; s < RSQ; s++) {
        const int64_t n = RG * caps[s] * Rd;
        float *f = malloc(n * sizeof *f);
        for (int64_t i = 0; i < n; i++)
            f[i] = i % 32 ? (float)(int)(4 * frand(&st)) : kt == A2N_KV_Q4_0 ? -4.0f : 3.96875f;
        keys[s] = kv_buffer(kt, f, n);
        CHECK(keys[s], "rerank store");
        for (int64_t i = 0; i < n; i++) CHECK(f[i] == (float)(int)f[i] || i % 32 == 0, "rerank keys exact");
        free(f);
    }
    float *q = malloc(RSQ * RG * Rg * Rd * sizeof *q);
    for (int64_t i = 0; i < RSQ * RG * Rg * Rd; i++) q[i] = (float)(int)(3 * frand(&st));
    int64_t *in = malloc(RSQ * RG * kin * sizeof *in);
    int32_t *lin = malloc(RSQ * RG * sizeof *lin);
    for (int64_t p = 0; p < RSQ * RG; p++) {   /* every other position, up to kin */
        int32_t n = 0;
        for (int64_t t = p % 2; t < T[p / RG] && n < kin; t += 2) in[p * kin + n++] = t;
        lin[p] = n;
        for (int64_t i = n; i < kin; i++) in[p * kin + i] = -1;
    }
    const int64_t kmax = 90;
    int64_t *idx = malloc(RSQ * RG * kmax * sizeof *idx), *idx2 = malloc(RSQ * RG * kmax * sizeof *idx2);
    int64_t *nc = malloc(RSQ * RG * sizeof *nc);
    int32_t *lens = malloc(RSQ * RG * sizeof *lens), *lens2 = malloc(RSQ * RG * sizeof *lens2);
    const void *const *kp = (const void *const *)keys;
    const int64_t Ks[] = {1, 4, 100};
    for (int i = 0; i < 3; i++) {
        CHECK(a2n_rerank(q, RSQ * RG * Rg * Rd, RSQ, RG, Rg, Rd, kp, caps, kt, in, kin, lin, T, sinks,
                         window, Ks[i], idx, kmax, lens, nc, 3) == A2N_OK, "rerank");
        for (int64_t p = 0; p < RSQ * RG; p++) {
            const int64_t *o = idx + p * kmax;
            for (int64_t x = 0; x < lens[p]; x++) CHECK(o[x] >= 0 && o[x] < T[p / RG] && (x == 0 || o[x] > o[x - 1]), "rerank sorted");
            for (int64_t x = lens[p]; x < kmax; x++) CHECK(o[x] == -1, "rerank padding");
        }
        const int mode = a2n_simd(-1);
        a2n_simd(!mode);
        const int rc = a2n_rerank(q, RSQ * RG * Rg * Rd, RSQ, RG, Rg, Rd, kp, caps, kt, in, kin, lin, T,
                                  sinks, window, Ks[i], idx2, kmax, lens2, nc, 2);
        a2n_simd(mode);
        CHECK(rc == A2N_OK && memcmp(idx, idx2, RSQ * RG * kmax * sizeof *idx) == 0 &&
              memcmp(lens, lens2, RSQ * RG * sizeof *lens) == 0, "rerank simd and scalar agree");
    }
    const int64_t over[RSQ] = {90, 41};
    CHECK(a2n_rerank(q, RSQ * RG * Rg * Rd, RSQ, RG, Rg, Rd, kp, caps, kt, in, kin, lin, over, sinks, window, 4,
                     idx, kmax, lens, nc, 2) == A2N_E_INDEX, "rerank T beyond capacity refused");
    CHECK(a2n_rerank(q, RSQ * RG * Rg * Rd, RSQ, RG, Rg, Rd, kp, caps, kt, in, kin, lin, T, sinks, window, 4,
                     idx, 15, lens, nc, 2) == A2N_E_SIZE, "rerank short kmax refused");
    lin[3] = (int32_t)kin + 1;
    CHECK(a2n_rerank(q, RSQ * RG * Rg * Rd, RSQ, RG, Rg, Rd, kp, caps, kt, in, kin, lin, T, sinks, window, 4,
                     idx, kmax, lens, nc, 2) == A2N_E_SIZE, "rerank lens beyond kmax refused");
    for (int64_t s = 0; s < RSQ; s++) free(keys[s]);
    free(q); free(in); free(lin); free(idx); free(idx2); free(nc); free(lens); free(lens2);
    return 0;
}

static int retrieval_cases(void) {
    const int mode = a2n_simd(-1);
    enum { F32 = A2N_KV_F32, F16 = A2N_KV_F16, Q8 = A2N_KV_Q8_0, Q4 = A2N_KV_Q4_0 };
    int rc = lut_cases() || select_cases() || fastscan_cases() || rerank_cases(F32) ||
             rerank_cases(F16) || rerank_cases(Q8) || rerank_cases(Q4);
    a2n_simd(mode);   /* these cases switch kernels */
    if (rc) return 1;
    for (int f16 = 0; f16 <= 1; f16++)
        if (attention_cases(f16, f16, 3, 2, 4, 36, 300, 70, 3) ||     /* d off the 8-wide step */
            attention_cases(f16, f16, 1, 1, 2, 64, 4000, 3000, 4) ||  /* split over threads */
            attention_cases(f16, f16, 2, 1, 1, 8, 50, 5, 1) ||
            attention_cases(f16, f16, 2, 2, 5, 64, 300, 100, 2))     /* heads in 4s and one */
            return 1;
    /* quantized host stores, K and V of different types */
    return attention_cases(Q8, Q8, 3, 2, 4, 64, 300, 70, 3) ||
           attention_cases(Q4, Q8, 1, 1, 2, 256, 4000, 3000, 4) ||    /* split over threads */
           attention_cases(F16, Q4, 2, 1, 1, 32, 50, 5, 1) ||
           attention_cases(Q8, F32, 2, 2, 3, 96, 120, 40, 2);
}

/* ---- causal attention (attention.c, kv_quant.c) ------------------------------ */
/* buf (nkv values of type t: A2N_KV_*, exactly sized) from the values f, then f = the values
 * the buffer holds (rounded to f16, or the blocks decoded) */
static void *kv_buffer(int t, float *f, int64_t nkv) {
    const int fl = t == A2N_KV_F32 || t == A2N_KV_F16;
    const int64_t units = fl ? nkv : nkv / 32 * a2n_kv_row_units(t, 32), ub = t == A2N_KV_F32 ? 4 : fl ? 2 : 1;
    void *b = malloc(units * ub);
    if (t == A2N_KV_F32) memcpy(b, f, nkv * 4);
    else if (t == A2N_KV_F16) {
        a2n_f32_to_f16_n(f, b, nkv);
        for (int64_t i = 0; i < nkv; i++) f[i] = a2n_f16_to_f32(((uint16_t *)b)[i]);
    } else if (a2n_kv_quantize(t, f, nkv, b, units) != A2N_OK ||
               a2n_dequantize_f32(t, b, units, f, nkv, 1) != A2N_OK) {
        free(b);
        return NULL;
    }
    return b;
}

/* S sequences of T rows (exactly-sized (G, T, row) heap buffers, K and V each of an A2N_KV_*
 * type, sequence s at positions pos0 + s..), queries at the last nq positions of each (a
 * prefill chunk, or a decode row when nq = 1: few tiles, chunks split over threads); window
 * < 0: none. Every output checked against a double reference of the values held, rows
 * recomputed alone must be bit-identical, then bad spans and arguments refused with out
 * untouched. */
static int causal_attention_case(int kt, int vt, int64_t S, int64_t G, int64_t g, int64_t d,
                                 int64_t T, int64_t nq, int64_t pos0, int64_t window, int threads) {
    const int64_t H = G * g, n = S * nq, nkv = G * T * d;
    const int64_t kru = a2n_kv_row_units(kt, d), vru = a2n_kv_row_units(vt, d);
    unsigned st = (unsigned)(d * 7 + kt * 2 + vt + T);
    float *q = malloc(n * H * d * sizeof *q), *out = malloc(n * H * d * sizeof *out);
    float *one = malloc(H * d * sizeof *one);
    const void *keys[4], *values[4];
    float *kf[4], *vf[4];
    int64_t ks[4], vs[4], rows[4], p0[4];
    int64_t *seq = malloc(n * sizeof *seq), *lo = malloc(n * sizeof *lo), *hi = malloc(n * sizeof *hi);
    for (int64_t s = 0; s < S; s++) {
        kf[s] = malloc(nkv * sizeof(float)); vf[s] = malloc(nkv * sizeof(float));
        for (int64_t i = 0; i < nkv; i++) { kf[s][i] = frand(&st); vf[s][i] = frand(&st); }
        keys[s] = kv_buffer(kt, kf[s], nkv);
        values[s] = kv_buffer(vt, vf[s], nkv);
        CHECK(keys[s] && values[s], "cache buffers");
        ks[s] = T * kru; vs[s] = T * vru; rows[s] = T; p0[s] = pos0 + s;
        for (int64_t r = 0; r < nq; r++) {
            const int64_t i = s * nq + r, t = T - nq + r, p = p0[s] + t;
            seq[i] = s;
            lo[i] = window < 0 ? 0 : (p - window + 1 > p0[s] ? p - window + 1 : p0[s]) - p0[s];
            hi[i] = t + 1;
        }
    }
    for (int64_t i = 0; i < n * H * d; i++) q[i] = 2 * frand(&st);
    const float scale = 1.0f / sqrtf((float)d);
#define ATT(qq, nn, sq, l, h, o, nt) a2n_attention(qq, (nn) * H * d, nn, H, G, d, S, keys, ks, kt, values, vs, vt, \
                                                   rows, p0, sq, l, h, scale, o, (nn) * H * d, nt)
    CHECK(ATT(q, n, seq, lo, hi, out, threads) == A2N_OK, "causal attention");
    double *sc = malloc(T * sizeof *sc);
    for (int64_t i = 0; i < n; i += 3)
        for (int64_t h = 0; h < H; h++) {
            const int64_t s = seq[i], k = h / g;
            const float *qv = q + (i * H + h) * d;
            double mx = -1e300, l = 0;
            for (int64_t t = lo[i]; t < hi[i]; t++) {
                double a = 0;
                for (int64_t x = 0; x < d; x++) a += (double)qv[x] * kf[s][(k * T + t) * d + x];
                sc[t] = scale * a;
                mx = sc[t] > mx ? sc[t] : mx;
            }
            for (int64_t t = lo[i]; t < hi[i]; t++) l += exp(sc[t] - mx);
            for (int64_t x = 0; x < d; x++) {
                double acc = 0;
                for (int64_t t = lo[i]; t < hi[i]; t++) acc += exp(sc[t] - mx) * vf[s][(k * T + t) * d + x];
                CHECK(fabs(out[(i * H + h) * d + x] - acc / l) < 5e-5, "causal attention value");
            }
        }
    free(sc);
    for (int64_t i = 0; i < n; i += 5) {   /* a row alone: the same bits */
        CHECK(ATT(q + i * H * d, 1, seq + i, lo + i, hi + i, one, 1) == A2N_OK, "row alone");
        CHECK(!memcmp(one, out + i * H * d, H * d * sizeof *one), "row alone is bit-identical");
    }
    for (int64_t i = 0; i < n * H * d; i++) out[i] = 7.0f;   /* refusals: out untouched */
    hi[n - 1] = T + 1;
    CHECK(ATT(q, n, seq, lo, hi, out, threads) == A2N_E_INDEX, "span past the rows refused");
    hi[n - 1] = T;
    lo[0] = -1;
    CHECK(ATT(q, n, seq, lo, hi, out, threads) == A2N_E_INDEX, "negative span refused");
    lo[0] = hi[0] + 1;
    CHECK(ATT(q, n, seq, lo, hi, out, threads) == A2N_E_INDEX, "lo > hi refused");
    lo[0] = 0;
    seq[0] = S;
    CHECK(ATT(q, n, seq, lo, hi, out, threads) == A2N_E_INDEX, "sequence index refused");
    seq[0] = 0;
    rows[0] = -1;
    CHECK(ATT(q, n, seq, lo, hi, out, threads) == A2N_E_ARG, "negative rows refused");
    rows[0] = T;
    ks[0] = -d;
    CHECK(ATT(q, n, seq, lo, hi, out, threads) == A2N_E_ARG, "negative stride refused");
    ks[0] = T * kru;
    CHECK(a2n_attention(q, n * H * d, n, H, H + 1, d, S, keys, ks, kt, values, vs, vt, rows, p0, seq, lo,
                        hi, scale, out, n * H * d, threads) == A2N_E_ARG, "heads not shared evenly refused");
    CHECK(a2n_attention(q, n * H * d - 1, n, H, G, d, S, keys, ks, kt, values, vs, vt, rows, p0, seq, lo,
                        hi, scale, out, n * H * d, threads) == A2N_E_SIZE, "short q refused");
    CHECK(a2n_attention(q, n * H * d, n, H, G, d, S, keys, ks, 5, values, vs, vt, rows, p0, seq, lo,
                        hi, scale, out, n * H * d, threads) == A2N_E_ARG, "unknown cache type refused");
    if (d % 32) /* block types need whole blocks per row */
        CHECK(a2n_attention(q, n * H * d, n, H, G, d, S, keys, ks, A2N_KV_Q8_0, values, vs, vt, rows, p0, seq,
                            lo, hi, scale, out, n * H * d, threads) == A2N_E_ARG, "partial blocks refused");
    for (int64_t i = 0; i < n * H * d; i++) CHECK(out[i] == 7.0f, "out untouched after refusal");
#undef ATT
    for (int64_t s = 0; s < S; s++) { free((void *)keys[s]); free((void *)values[s]); free(kf[s]); free(vf[s]); }
    free(q); free(out); free(one); free(seq); free(lo); free(hi);
    return 0;
}

static int causal_attention_cases(void) {
    enum { F32 = A2N_KV_F32, F16 = A2N_KV_F16, Q8 = A2N_KV_Q8_0, Q4 = A2N_KV_Q4_0 };
    return causal_attention_case(F16, F16, 2, 1, 4, 256, 300, 40, 0, -1, 2) ||  /* the default model's shape */
           causal_attention_case(F32, F16, 3, 2, 2, 36, 150, 150, 1000, 50, 3) || /* window, d off 8, prompts */
           causal_attention_case(F16, F32, 1, 2, 4, 8, 1300, 1, 5, -1, 4) ||    /* decode: chunks split */
           causal_attention_case(F32, F32, 2, 2, 4, 19, 90, 3, 0, 64, 1) ||     /* d off 8, one thread */
           causal_attention_case(Q8, Q8, 2, 1, 4, 256, 300, 40, 0, -1, 2) ||    /* q8_0 K/V */
           causal_attention_case(Q4, F16, 3, 2, 2, 64, 150, 150, 1000, 50, 3) || /* q4_0 K, window */
           causal_attention_case(F32, Q4, 1, 2, 4, 32, 1300, 1, 5, -1, 4) ||    /* q4_0 V, decode split */
           causal_attention_case(Q8, Q4, 2, 2, 4, 96, 90, 3, 0, 64, 1);         /* mixed blocks, one thread */
}

/* fused.c: the forward pass's elementwise steps on exactly-sized buffers; bad sizes and
 * positions refused before anything is written. */
static int fused_cases(void) {
    enum { N = 3, H = 2, D = 8, ROWS = 5, V = 70 };
    float *x = malloc(sizeof(float) * N * H * D), *out = malloc(sizeof(float) * N * H * D);
    float *w = malloc(sizeof(float) * D), *ct = malloc(sizeof(float) * ROWS * D / 2);
    float *st = malloc(sizeof(float) * ROWS * D / 2), *t = malloc(sizeof(float) * N * H * D);
    float *logits = malloc(sizeof(float) * V);
    uint32_t *mask = malloc(sizeof(uint32_t) * 2);                 /* covers 64 of 70 tokens */
    int64_t *pos = malloc(sizeof(int64_t) * N);
    for (int i = 0; i < N * H * D; i++) x[i] = (float)((i * 37) % 11) / 7.0f - 0.6f;
    for (int i = 0; i < D; i++) w[i] = 1.0f + 0.1f * (float)i;
    for (int i = 0; i < ROWS * D / 2; i++) { ct[i] = cosf((float)i); st[i] = sinf((float)i); }
    for (int i = 0; i < N; i++) pos[i] = i + 1;
    CHECK(a2n_rms_norm(x, N * H * D, N * H, D, NULL, 0, w, D, 1e-6f, out, N * H * D) == A2N_OK,
          "rms_norm");
    CHECK(a2n_rms_norm(x, N * H * D, N * H, D, NULL, 0, w, D, 1e-6f, out, N * H * D - 1)
          == A2N_E_SIZE, "rms_norm short out refused");
    CHECK(a2n_rope(x, N * H * D, N, H, D, D, 1, ct, st, ROWS * D / 2, ROWS, pos, out, N * H * D)
          == A2N_OK, "rope");
    pos[1] = ROWS;
    CHECK(a2n_rope(x, N * H * D, N, H, D, D, 0, ct, st, ROWS * D / 2, ROWS, pos, out, N * H * D)
          == A2N_E_INDEX, "rope position past the table refused");
    pos[1] = -1;
    CHECK(a2n_rope(x, N * H * D, N, H, D, D, 0, ct, st, ROWS * D / 2, ROWS, pos, out, N * H * D)
          == A2N_E_INDEX, "rope negative position refused");
    CHECK(a2n_gate_pre(A2N_ACT_GELU_TANH, x, N * H * D, t, N * H * D) == A2N_OK, "gate_pre");
    CHECK(a2n_gate_post(out, N * H * D, t, N * H * D, x, N * H * D) == A2N_OK, "gate_post");
    CHECK(a2n_gate_post(out, N * H * D, t, N * H * D - 1, x, N * H * D) == A2N_E_SIZE,
          "gate_post size refused");
    for (int i = 0; i < V; i++) logits[i] = (float)i;
    mask[0] = 0x0F0F0F0Fu; mask[1] = 0xFFFFFFFFu;
    CHECK(a2n_apply_bitmask(logits, V, mask, 2) == A2N_OK, "apply_bitmask");
    CHECK(isinf(logits[4]) && logits[0] == 0.0f && logits[40] == 40.0f && isinf(logits[69]),
          "apply_bitmask masks what its bits say and the tail");
    CHECK(a2n_apply_bitmask(logits, V, mask, -1) == A2N_E_ARG, "apply_bitmask bad words refused");
    free(x); free(out); free(w); free(ct); free(st); free(t); free(logits); free(mask); free(pos);
    return 0;
}

int main(void) {
    const int have_simd = a2n_simd(1);
    for (int mode = have_simd; mode >= 0; mode--) {
        a2n_simd(mode);
        if (gather_cases() || quant_cases() || retrieval_cases() || causal_attention_cases() || fused_cases())
            return 1;
    }
    printf("asan driver: all native checks passed (simd kernels %s)\n", have_simd ? "and scalar" : "absent, scalar");
    return 0;
}
