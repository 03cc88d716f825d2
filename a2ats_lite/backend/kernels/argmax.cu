// Per-row argmax of (n_rows, n_vocab) float32 logits; the first index wins ties (numpy.argmax).
// NaN logits are not ordered (never selected unless the whole row is NaN); a row of -inf
// returns 0.
//
// Two passes, so one long row (262144-token vocabulary) spreads over many SMs:
//   argmax_partial_f32: grid (n_splits, n_rows), block (256): block s scans
//       [s * chunk, min((s + 1) * chunk, n_vocab)) and writes part_val/part_idx[row * n_splits + s]
//       (an empty chunk writes -inf / INT_MAX). n_splits = ceil(n_vocab / chunk).
//   argmax_final: grid (n_rows), block (256): reduces the n_splits partials into out[row] (int32).
// budget: argmax_partial_f32 registers<=32 smem<=256
// budget: argmax_final registers<=32 smem<=256

#define ARGMAX_NO_INDEX 0x7fffffff

__device__ __forceinline__ void argmax_take(float& v, int& i, float v2, int i2) {
    // (v2, i2) wins if larger, or equal with a smaller index
    if (v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

// block-wide (max, first index); blockDim.x a multiple of 32. Result valid in every thread.
__device__ __forceinline__ void argmax_block(float& v, int& i, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(A2ATS_FULL_MASK, v, o);
        const int i2 = __shfl_xor_sync(A2ATS_FULL_MASK, i, o);
        argmax_take(v, i, v2, i2);
    }
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = lane < n_warps ? sv[lane] : A2ATS_NEG_INF;
    i = lane < n_warps ? si[lane] : ARGMAX_NO_INDEX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(A2ATS_FULL_MASK, v, o);
        const int i2 = __shfl_xor_sync(A2ATS_FULL_MASK, i, o);
        argmax_take(v, i, v2, i2);
    }
}

extern "C" __global__ void argmax_partial_f32(const float* __restrict__ logits, int n_vocab,
                                              int chunk, float* __restrict__ part_val,
                                              int* __restrict__ part_idx) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int row = blockIdx.y, s = blockIdx.x, n_splits = gridDim.x;
    const float* lr = logits + (size_t)row * n_vocab;
    const int lo = s * chunk, hi = min(n_vocab, lo + chunk);
    float v = A2ATS_NEG_INF;
    int i = ARGMAX_NO_INDEX;
    for (int k = lo + threadIdx.x; k < hi; k += blockDim.x) argmax_take(v, i, lr[k], k);
    argmax_block(v, i, sv, si);
    if (threadIdx.x == 0) {
        part_val[(size_t)row * n_splits + s] = v;
        part_idx[(size_t)row * n_splits + s] = i;
    }
}

extern "C" __global__ void argmax_final(const float* __restrict__ part_val,
                                        const int* __restrict__ part_idx, int n_splits,
                                        int* __restrict__ out) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int row = blockIdx.x;
    float v = A2ATS_NEG_INF;
    int i = ARGMAX_NO_INDEX;
    for (int k = threadIdx.x; k < n_splits; k += blockDim.x)
        argmax_take(v, i, part_val[(size_t)row * n_splits + k], part_idx[(size_t)row * n_splits + k]);
    argmax_block(v, i, sv, si);
    if (threadIdx.x == 0) out[row] = i == ARGMAX_NO_INDEX ? 0 : i;
}
