/* Threaded entry points: dequantize, row gather, quantized matmul.
 * Every entry point validates its arguments before touching memory. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"

#define MAX_THREADS 64

typedef struct {
    a2n_range_fn fn;
    void *arg;
    int64_t begin, end;
} span;

static void *run_span(void *p) {
    span *s = p;
    s->fn(s->arg, s->begin, s->end);
    return NULL;
}

int a2n_parallel_for(int64_t n, int n_threads, int64_t min_per_thread, a2n_range_fn fn, void *arg) {
    if (n <= 0) return A2N_OK;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (min_per_thread < 1) min_per_thread = 1;
    if ((int64_t)n_threads > n / min_per_thread) n_threads = (int)(n / min_per_thread);
    if (n_threads <= 1) {
        fn(arg, 0, n);
        return A2N_OK;
    }
    pthread_t tid[MAX_THREADS];
    span spans[MAX_THREADS];
    int started = 0, rc = A2N_OK;
    for (int t = 0; t < n_threads; t++) {
        spans[t] = (span){fn, arg, n * t / n_threads, n * (t + 1) / n_threads};
    }
    for (int t = 1; t < n_threads; t++) {
        if (pthread_create(&tid[t], NULL, run_span, &spans[t]) != 0) {
            rc = A2N_E_THREAD;
            break;
        }
        started = t;
    }
    if (rc == A2N_OK) run_span(&spans[0]);
    for (int t = 1; t <= started; t++) pthread_join(tid[t], NULL);
    return rc;
}

/* ---- dequantize -------------------------------------------------------- */
typedef struct {
    const a2n_type *t;
    const uint8_t *src;
    void *dst;
    int f16;
} dq_job;

static void dq_range(void *p, int64_t b0, int64_t b1) {
    const dq_job *j = p;
    const int B = j->t->block;
    float tmp[256];
    for (int64_t b = b0; b < b1; b++) {
        const uint8_t *blk = j->src + b * j->t->bytes;
        if (!j->f16) {
            float *out = (float *)j->dst + b * B;
            j->t->dequant(blk, out);
        } else {
            uint16_t *out = (uint16_t *)j->dst + b * B;
            j->t->dequant(blk, tmp);
            for (int i = 0; i < B; i++) out[i] = a2n_f32_to_f16(tmp[i]);
        }
    }
}

static int dequantize(int ggml_type, const void *src, int64_t src_nbytes, void *dst,
                      int64_t n_elems, int n_threads, int f16) {
    const a2n_type *t = a2n_find_type(ggml_type);
    if (!t) return A2N_E_TYPE;
    if (!src || !dst || n_elems < 0) return A2N_E_ARG;
    if (n_elems % t->block || n_elems / t->block * t->bytes != src_nbytes) return A2N_E_SIZE;
    if (f16 && ggml_type == 1) {  /* f16 -> f16 is a copy */
        memcpy(dst, src, (size_t)src_nbytes);
        return A2N_OK;
    }
    dq_job j = {t, src, dst, f16};
    return a2n_parallel_for(n_elems / t->block, n_threads, 4096 / t->block + 1, dq_range, &j);
}

int a2n_dequantize_f32(int ggml_type, const void *src, int64_t src_nbytes, float *dst,
                       int64_t n_elems, int n_threads) {
    return dequantize(ggml_type, src, src_nbytes, dst, n_elems, n_threads, 0);
}

int a2n_dequantize_f16(int ggml_type, const void *src, int64_t src_nbytes, uint16_t *dst,
                       int64_t n_elems, int n_threads) {
    return dequantize(ggml_type, src, src_nbytes, dst, n_elems, n_threads, 1);
}

/* ---- row gather -------------------------------------------------------- */
typedef struct {
    const uint8_t *src;
    uint8_t *dst;
    const int64_t *idx;
    int64_t row_bytes;
} gather_job;

static void gather_range(void *p, int64_t i0, int64_t i1) {
    const gather_job *j = p;
    for (int64_t i = i0; i < i1; i++)
        memcpy(j->dst + i * j->row_bytes, j->src + j->idx[i] * j->row_bytes, (size_t)j->row_bytes);
}

int a2n_gather_rows(const void *src, int64_t n_src_rows, int64_t row_bytes, const int64_t *idx,
                    int64_t n_idx, void *dst, int64_t n_dst_rows, int n_threads) {
    if (n_idx < 0 || n_src_rows < 0 || row_bytes <= 0 || n_dst_rows < 0) return A2N_E_ARG;
    if (n_idx == 0) return A2N_OK;
    if (!src || !dst || !idx) return A2N_E_ARG;
    if (n_idx > n_dst_rows) return A2N_E_SIZE;
    /* check every index before copying anything: a bad index leaves dst untouched */
    for (int64_t i = 0; i < n_idx; i++)
        if (idx[i] < 0 || idx[i] >= n_src_rows) return A2N_E_INDEX;
    gather_job j = {src, dst, idx, row_bytes};
    /* threads only pay off for large copies (page faults of a memory-mapped store) */
    int64_t min_rows = (1 << 20) / row_bytes + 1;
    return a2n_parallel_for(n_idx, n_threads, min_rows, gather_range, &j);
}

/* ---- quantized matmul -------------------------------------------------- */
typedef struct {
    const a2n_type *t;
    const uint8_t *w;
    int64_t n_out, n_in, row_bytes, n_vec;
    const float *x;
    float *y;
} mm_job;

static void mm_range(void *p, int64_t r0, int64_t r1) {
    const mm_job *j = p;
    const int B = j->t->block;
    float blk[256];
    float acc[16];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = j->w + r * j->row_bytes;
        for (int64_t v0 = 0; v0 < j->n_vec; v0 += 16) {
            const int nv = (int)(j->n_vec - v0 < 16 ? j->n_vec - v0 : 16);
            for (int v = 0; v < nv; v++) acc[v] = 0.0f;
            if (B == 1) {
                /* unquantized rows: dequantize in 256-element slabs */
                for (int64_t c0 = 0; c0 < j->n_in; c0 += 256) {
                    const int nc = (int)(j->n_in - c0 < 256 ? j->n_in - c0 : 256);
                    for (int c = 0; c < nc; c++) j->t->dequant(row + (c0 + c) * j->t->bytes, blk + c);
                    for (int v = 0; v < nv; v++) {
                        const float *xv = j->x + (v0 + v) * j->n_in + c0;
                        float s = 0.0f;
                        for (int c = 0; c < nc; c++) s += blk[c] * xv[c];
                        acc[v] += s;
                    }
                }
            } else {
                for (int64_t b = 0; b < j->n_in / B; b++) {
                    j->t->dequant(row + b * j->t->bytes, blk);
                    for (int v = 0; v < nv; v++) {
                        const float *xv = j->x + (v0 + v) * j->n_in + b * B;
                        float s = 0.0f;
                        for (int c = 0; c < B; c++) s += blk[c] * xv[c];
                        acc[v] += s;
                    }
                }
            }
            for (int v = 0; v < nv; v++) j->y[(v0 + v) * j->n_out + r] = acc[v];
        }
    }
}

int a2n_matmul_q(int ggml_type, const void *w, int64_t w_nbytes, int64_t n_out, int64_t n_in,
                 const float *x, int64_t n_vec, float *y, int n_threads) {
    const a2n_type *t = a2n_find_type(ggml_type);
    if (!t) return A2N_E_TYPE;
    if (!w || !x || !y || n_out <= 0 || n_in <= 0 || n_vec <= 0) return A2N_E_ARG;
    if (n_in % t->block) return A2N_E_SIZE;
    const int64_t row_bytes = n_in / t->block * t->bytes;
    if (row_bytes * n_out != w_nbytes) return A2N_E_SIZE;
    mm_job j = {t, w, n_out, n_in, row_bytes, n_vec, x, y};
    return a2n_parallel_for(n_out, n_threads, 16, mm_range, &j);
}

const char *a2n_strerror(int code) {
    switch (code) {
    case A2N_OK: return "ok";
    case A2N_E_TYPE: return "unsupported ggml type";
    case A2N_E_SIZE: return "buffer size does not match the element count";
    case A2N_E_INDEX: return "row index out of range";
    case A2N_E_ARG: return "invalid argument";
    case A2N_E_THREAD: return "could not start worker threads";
    default: return "unknown error";
    }
}
