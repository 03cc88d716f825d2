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
            CHECK(fabs(y[v * n_out + r] - ref) <= 1e-4 * mag + 1e-6, "matmul value");
        }
    CHECK(a2n_matmul_q(type, w, nb, n_out + 1, n_in, x, n_vec, y, 2) == A2N_E_SIZE, "matmul size refused");
    CHECK(a2n_matmul_q(type, w, nb - 1, n_out, n_in, x, n_vec, y, 2) == A2N_E_SIZE, "short weights refused");
    CHECK(a2n_matmul_q(type, w, nb, n_out, n_in, x, 0, y, 2) == A2N_E_ARG, "no vectors refused");
    free(w); free(x); free(y); free(wf);
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
    /* unblocked types with lengths off the 8-wide step */
    if (matmul_case(0, 3, 37, 2) || matmul_case(1, 3, 37, 5) || matmul_case(30, 2, 13, 1)) return 1;
    CHECK(a2n_type_nbytes(16, 256) == A2N_E_TYPE, "unsupported type");
    CHECK(a2n_type_nbytes(12, 100) == A2N_E_SIZE, "partial block refused");
    return 0;
}

int main(void) {
    const int have_simd = a2n_simd(1);
    for (int mode = have_simd; mode >= 0; mode--) {
        a2n_simd(mode);
        if (gather_cases() || quant_cases()) return 1;
    }
    printf("asan driver: all native checks passed (simd kernels %s)\n", have_simd ? "and scalar" : "absent, scalar");
    return 0;
}
