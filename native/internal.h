/* Shared between the native sources; not part of the Python-facing API. */
#ifndef A2ATS_INTERNAL_H
#define A2ATS_INTERNAL_H
#include <stdint.h>

typedef struct {
    int id;                 /* ggml type id */
    int block;              /* elements per block */
    int bytes;              /* bytes per block */
    void (*dequant)(const uint8_t *block, float *out);
} a2n_type;

const a2n_type *a2n_find_type(int ggml_type);
float a2n_f16_to_f32(uint16_t h);
uint16_t a2n_f32_to_f16(float f);

/* Run fn(arg, begin, end) over [0, n) split across up to n_threads threads
 * (the caller's thread does the first share). Returns A2N_OK or A2N_E_THREAD. */
typedef void (*a2n_range_fn)(void *arg, int64_t begin, int64_t end);
int a2n_parallel_for(int64_t n, int n_threads, int64_t min_per_thread, a2n_range_fn fn, void *arg);
#endif
