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
            /* the SIMD kernels of these types quantize x to int8 (as llama.cpp): ~1e-2 */
            const int q8 = a2n_simd(-1) && ((type >= 12 && type <= 14) || type == 2 || type == 6 || type == 8);
            CHECK(fabs(y[v * n_out + r] - ref) <= (q8 ? 1e-2 : 1e-4) * mag + 1e-6, "matmul value");
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

/* f32 and f16 stores; one pair with a long selection split over threads */
static int attention_cases(int f16, int64_t S, int64_t G, int64_t g, int64_t d, int64_t cap, int64_t kmax, int threads) {
    unsigned st = (unsigned)(d * 31 + f16);
    const int64_t esz = f16 ? 2 : 4, nkv = G * cap * d;
    float *q = malloc(S * G * g * d * sizeof *q), *out = malloc(S * G * g * d * sizeof *out);
    void *keys[4], *values[4];
    int64_t caps[4];
    float *kf[4], *vf[4];
    for (int64_t s = 0; s < S; s++) {
        caps[s] = cap;
        keys[s] = malloc(nkv * esz); values[s] = malloc(nkv * esz);
        kf[s] = malloc(nkv * sizeof(float)); vf[s] = malloc(nkv * sizeof(float));
        for (int64_t i = 0; i < nkv; i++) { kf[s][i] = frand(&st); vf[s][i] = frand(&st); }
        if (f16) {
            a2n_f32_to_f16_n(kf[s], keys[s], nkv); a2n_f32_to_f16_n(vf[s], values[s], nkv);
            for (int64_t i = 0; i < nkv; i++) {
                kf[s][i] = a2n_f16_to_f32(((uint16_t *)keys[s])[i]);
                vf[s][i] = a2n_f16_to_f32(((uint16_t *)values[s])[i]);
            }
        } else {
            memcpy(keys[s], kf[s], nkv * 4); memcpy(values[s], vf[s], nkv * 4);
        }
    }
    for (int64_t i = 0; i < S * G * g * d; i++) q[i] = 2 * frand(&st);
    int64_t *idx = malloc(S * G * kmax * sizeof *idx);
    int32_t *lens = malloc(S * G * sizeof *lens);
    for (int64_t p = 0; p < S * G; p++) {
        lens[p] = (int32_t)(kmax - p % 3);
        for (int64_t i = 0; i < kmax; i++) idx[p * kmax + i] = i < lens[p] ? (i * 7919 + p) % cap : -1;
    }
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, f16, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_OK, "attention");
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
    /* batched gather of the same selections into exactly-sized (S, G, kmax, d) buffers */
    {
        const int64_t esz = f16 ? 2 : 4, rb = d * esz;
        char *kd = malloc(S * G * kmax * rb), *vd = malloc(S * G * kmax * rb);
        CHECK(a2n_gather_sel(S, G, d, (const void *const *)keys, (const void *const *)values, caps, f16,
                             idx, kmax, lens, kd, vd, S * G * kmax, threads) == A2N_OK, "gather_sel");
        for (int64_t p = 0; p < S * G; p++)
            for (int64_t i = 0; i < lens[p]; i++) {
                const int64_t s = p / G, k = p % G, row = k * cap + idx[p * kmax + i];
                CHECK(!memcmp(kd + (p * kmax + i) * rb, (const char *)keys[s] + row * rb, rb), "gather_sel K row");
                CHECK(!memcmp(vd + (p * kmax + i) * rb, (const char *)values[s] + row * rb, rb), "gather_sel V row");
            }
        const int64_t at = lens[0] - 1, keep = idx[at];
        idx[at] = cap;
        CHECK(a2n_gather_sel(S, G, d, (const void *const *)keys, (const void *const *)values, caps, f16,
                             idx, kmax, lens, kd, vd, S * G * kmax, threads) == A2N_E_INDEX, "gather_sel bad row refused");
        idx[at] = keep;
        CHECK(a2n_gather_sel(S, G, d, (const void *const *)keys, (const void *const *)values, caps, f16,
                             idx, kmax, lens, kd, vd, S * G * kmax - 1, threads) == A2N_E_SIZE, "gather_sel dst size refused");
        free(kd); free(vd);
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
                                   caps, f16, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_INDEX, "bad row refused");
        idx[at] = keep;
    }
    lens[0] = (int32_t)kmax + 1;
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, f16, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_SIZE, "lens > kmax refused");
    lens[0] = -1;
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, f16, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_SIZE, "negative lens refused");
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, 2, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_E_ARG, "bad dtype flag refused");
    for (int64_t i = 0; i < S * G * g * d; i++) CHECK(out[i] == 7.0f, "out untouched after refusal");
    lens[0] = 0;   /* an empty selection gives zeros */
    CHECK(a2n_sparse_attention(q, S * G * g * d, S, G, g, d, (const void *const *)keys, (const void *const *)values,
                               caps, f16, idx, kmax, lens, 0.3f, out, S * G * g * d, threads) == A2N_OK, "empty selection");
    for (int64_t i = 0; i < g * d; i++) CHECK(out[i] == 0.0f, "empty selection is zero");
    /* exact scores over [lo, hi) of every sequence */
    int64_t lo[4], hi[4], width = cap - 3;
    for (int64_t s = 0; s < S; s++) { lo[s] = s; hi[s] = cap - 3 + s; }
    float *es = malloc(S * G * g * width * sizeof *es);
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, f16, lo, hi, es, width,
                           threads) == A2N_OK, "exact scores");
    CHECK(es[S * G * g * width - 1] == es[S * G * g * width - 1], "exact score finite");
    hi[S - 1] = cap + 1;
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, f16, lo, hi, es, width,
                           threads) == A2N_E_INDEX, "hi > cap refused");
    hi[S - 1] = cap;
    lo[0] = -1;
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, f16, lo, hi, es, width,
                           threads) == A2N_E_INDEX, "negative lo refused");
    lo[0] = 0;
    hi[0] = cap;
    CHECK(a2n_exact_scores(q, S * G * g * d, S, G, g, d, (const void *const *)keys, caps, f16, lo, hi, es, width,
                           threads) == A2N_E_SIZE, "narrow scores refused");
    free(es);
    for (int64_t s = 0; s < S; s++) { free(keys[s]); free(values[s]); free(kf[s]); free(vf[s]); }
    free(q); free(out); free(idx); free(lens);
    return 0;
}

static int retrieval_cases(void) {
    const int mode = a2n_simd(-1);
    int rc = lut_cases() || select_cases();
    a2n_simd(mode);   /* select_cases switches kernels */
    if (rc) return 1;
    for (int f16 = 0; f16 <= 1; f16++)
        if (attention_cases(f16, 3, 2, 4, 36, 300, 70, 3) ||     /* d off the 8-wide step */
            attention_cases(f16, 1, 1, 2, 64, 4000, 3000, 4) ||  /* split over threads */
            attention_cases(f16, 2, 1, 1, 8, 50, 5, 1))
            return 1;
    return 0;
}

int main(void) {
    const int have_simd = a2n_simd(1);
    for (int mode = have_simd; mode >= 0; mode--) {
        a2n_simd(mode);
        if (gather_cases() || quant_cases() || retrieval_cases()) return 1;
    }
    printf("asan driver: all native checks passed (simd kernels %s)\n", have_simd ? "and scalar" : "absent, scalar");
    return 0;
}
