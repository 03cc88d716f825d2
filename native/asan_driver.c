/* AddressSanitizer driver for the native library: valid and hostile calls on
 * exactly-sized heap buffers, so any out-of-bounds read or write aborts.
 * Built and run by `make asan` (and tests/test_native_asan.py). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"

#define CHECK(cond, msg) do { if (!(cond)) { fprintf(stderr, "FAIL: %s\n", msg); return 1; } } while (0)

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
    memset(dst, 0xAB, 64 * row_bytes);
    int64_t bad[] = {-1, rows, rows + 1000000, INT64_MAX, INT64_MIN};
    for (size_t b = 0; b < sizeof bad / sizeof bad[0]; b++) {
        idx[63] = bad[b];
        CHECK(a2n_gather_rows(src, rows, row_bytes, idx, 64, dst, 64, 2) == A2N_E_INDEX, "bad index refused");
    }
    for (int i = 0; i < 64 * row_bytes; i++) CHECK(dst[i] == 0xAB, "dst untouched after refusal");
    idx[63] = 0;
    CHECK(a2n_gather_rows(src, rows, row_bytes, idx, 64, dst, 63, 2) == A2N_E_SIZE, "dst too small refused");
    CHECK(a2n_gather_rows(src, rows, -5, idx, 64, dst, 64, 2) == A2N_E_ARG, "negative row size refused");
    CHECK(a2n_gather_rows(NULL, rows, row_bytes, idx, 64, dst, 64, 2) == A2N_E_ARG, "null src refused");
    free(src); free(dst); free(idx);
    return 0;
}

static int quant_cases(void) {
    const int types[] = {0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30};
    const int64_t n = 4 * 256;
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
        int64_t nb = a2n_type_nbytes(types[k], n);
        CHECK(nb > 0, "type size");
        unsigned char *src = malloc(nb);
        for (int64_t i = 0; i < nb; i++) src[i] = (unsigned char)(i * 13 + k);
        float *dst = malloc(n * sizeof *dst);
        unsigned short *h = malloc(n * sizeof *h);
        CHECK(a2n_dequantize_f32(types[k], src, nb, dst, n, 3) == A2N_OK, "dequant f32");
        CHECK(a2n_dequantize_f16(types[k], src, nb, h, n, 3) == A2N_OK, "dequant f16");
        CHECK(a2n_dequantize_f32(types[k], src, nb - 1, dst, n, 3) == A2N_E_SIZE, "short src refused");
        float *x = malloc(3 * 256 * sizeof *x), *y = malloc(3 * 4 * sizeof *y);
        for (int i = 0; i < 3 * 256; i++) x[i] = (float)i / 256.0f;
        CHECK(a2n_matmul_q(types[k], src, nb, 4, 256, x, 3, y, 2) == A2N_OK, "matmul");
        CHECK(a2n_matmul_q(types[k], src, nb, 5, 256, x, 3, y, 2) == A2N_E_SIZE, "matmul size refused");
        free(src); free(dst); free(h); free(x); free(y);
    }
    CHECK(a2n_type_nbytes(16, 256) == A2N_E_TYPE, "unsupported type");
    return 0;
}

int main(void) {
    if (gather_cases() || quant_cases()) return 1;
    printf("asan driver: all native checks passed\n");
    return 0;
}
