/* Threaded entry points: thread pool, dequantize, row gather.
 * Every entry point validates its arguments before touching memory. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include "a2ats_native.h"
#include "internal.h"

#define MAX_THREADS 64

/* ---- thread pool ------------------------------------------------------- *
 * Decode runs ~130 products per token, many of them 100 KB matrices: creating
 * threads per call (~20-40 us each) would cost more than the work, so workers
 * are started once. Work is handed out in chunks from an atomic counter, and
 * the caller's thread takes chunks too: a worker that the OS schedules late
 * (a busy machine) simply gets fewer chunks instead of holding up the call,
 * and one that has not joined by the end is not waited for. After a job a
 * worker spins briefly (decode calls come back to back and a condition-variable
 * wake-up costs ~10-20 us), then sleeps on a condition variable.
 * One call uses the pool at a time; a concurrent call (another Python thread)
 * runs on its caller's thread alone. A forked child starts with an empty pool. */
#include <sched.h>
#include <stdatomic.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif
#define SPIN_ROUNDS 4000   /* ~100 us of pause instructions */

static struct {
    pthread_mutex_t mu, busy;
    pthread_cond_t work;
    int n_workers;
    atomic_uint_fast64_t gen;   /* bumped when a job is posted */
    atomic_int open;            /* 1 while the job fields below are valid */
    atomic_int active;          /* workers between joining and leaving a job */
    a2n_range_fn fn;
    void *arg;
    int64_t n, chunk;
    atomic_int_fast64_t next;   /* first item not yet handed out */
    atomic_int_fast64_t done;   /* items finished */
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .busy = PTHREAD_MUTEX_INITIALIZER,
          .work = PTHREAD_COND_INITIALIZER};

/* take chunks until none are left */
static void drain(void) {
    for (;;) {
        const int64_t b = atomic_fetch_add(&pool.next, pool.chunk);
        if (b >= pool.n) return;
        const int64_t e = b + pool.chunk < pool.n ? b + pool.chunk : pool.n;
        pool.fn(pool.arg, b, e);
        atomic_fetch_add(&pool.done, e - b);
    }
}

static void *worker(void *p) {
    uint64_t seen = (uint64_t)(uintptr_t)p;   /* gen at creation */
    for (;;) {
        uint64_t g = atomic_load(&pool.gen);
        for (int i = 0; i < SPIN_ROUNDS && g == seen; i++) {
            CPU_RELAX();
            g = atomic_load(&pool.gen);
        }
        if (g == seen) {
            pthread_mutex_lock(&pool.mu);
            while ((g = atomic_load(&pool.gen)) == seen) pthread_cond_wait(&pool.work, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = g;
        /* join: announce first, then check the job is still open (seq_cst
         * pairs with the caller's wait for active == 0 before the next job) */
        atomic_fetch_add(&pool.active, 1);
        if (atomic_load(&pool.open)) drain();
        atomic_fetch_sub(&pool.active, 1);
    }
    return NULL;
}

static void pool_reset_after_fork(void) {
    /* only the forking thread exists in the child: the workers are gone */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_mutex_init(&pool.busy, NULL);
    pthread_cond_init(&pool.work, NULL);
    pool.n_workers = 0;
    atomic_store(&pool.open, 0);
    atomic_store(&pool.active, 0);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, pool_reset_after_fork); }

int a2n_parallel_for(int64_t n, int n_threads, int64_t min_per_thread, a2n_range_fn fn, void *arg) {
    if (n <= 0) return A2N_OK;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    if (min_per_thread < 1) min_per_thread = 1;
    if ((int64_t)n_threads > n / min_per_thread) n_threads = (int)(n / min_per_thread);
    pthread_once(&fork_once, register_fork_handler);
    if (n_threads <= 1 || pthread_mutex_trylock(&pool.busy) != 0) {
        fn(arg, 0, n);
        return A2N_OK;
    }
    pthread_mutex_lock(&pool.mu);
    while (pool.n_workers < n_threads - 1) {
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const uintptr_t gen0 = (uintptr_t)atomic_load(&pool.gen);
        const int err = pthread_create(&tid, &attr, worker, (void *)gen0);
        pthread_attr_destroy(&attr);
        if (err) break;   /* fewer helpers: the caller takes their chunks */
        pool.n_workers++;
    }
    pthread_mutex_unlock(&pool.mu);
    /* a late worker of the previous job may still be leaving it */
    while (atomic_load(&pool.active) > 0) CPU_RELAX();
    pool.fn = fn;
    pool.arg = arg;
    pool.n = n;
    /* ~4 chunks per thread: balance when a thread starts late, few atomics */
    int64_t chunk = n / (4 * (int64_t)n_threads);
    pool.chunk = chunk < min_per_thread / 2 + 1 ? min_per_thread / 2 + 1 : chunk;
    atomic_store(&pool.next, 0);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.open, 1);
    pthread_mutex_lock(&pool.mu);
    atomic_fetch_add(&pool.gen, 1);
    pthread_cond_broadcast(&pool.work);
    pthread_mutex_unlock(&pool.mu);
    drain();
    /* wait for chunks other threads are still running */
    for (int i = 0; atomic_load(&pool.done) < n; i++) {
        if (i < SPIN_ROUNDS) CPU_RELAX();
        else sched_yield();
    }
    atomic_store(&pool.open, 0);
    pthread_mutex_unlock(&pool.busy);
    return A2N_OK;
}

/* ---- dequantize -------------------------------------------------------- */
typedef struct {
    const a2n_type *t;
    const uint8_t *src;
    void *dst;
    int f16;
} dq_job;

#define DQ_CHUNK 4096  /* f16 output: elements decoded to an f32 scratch at a time */

static void dq_range(void *p, int64_t b0, int64_t b1) {
    const dq_job *j = p;
    const int B = j->t->block;
    if (!j->f16) {
        a2n_decode(j->t, j->src + b0 * j->t->bytes, b1 - b0, (float *)j->dst + b0 * B);
        return;
    }
    float tmp[DQ_CHUNK];
    const int64_t per = DQ_CHUNK / B;
    for (int64_t b = b0; b < b1; b += per) {
        const int64_t nb = b1 - b < per ? b1 - b : per;
        a2n_decode(j->t, j->src + b * j->t->bytes, nb, tmp);
        a2n_f32_to_f16_n(tmp, (uint16_t *)j->dst + b * B, nb * B);
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

const char *a2n_strerror(int code) {
    switch (code) {
    case A2N_OK: return "ok";
    case A2N_E_TYPE: return "unsupported ggml type";
    case A2N_E_SIZE: return "buffer size does not match the element count";
    case A2N_E_INDEX: return "row index out of range";
    case A2N_E_ARG: return "invalid argument";
    case A2N_E_THREAD: return "could not start worker threads";
    case A2N_E_NOMEM: return "out of memory";
    default: return "unknown error";
    }
}
