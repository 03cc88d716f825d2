// A2ATS code assignment of newly appended keys, matching a2ats_lite.vq.Codebook.assign_codes:
// per KV head kh, key i and subspace m,
//   x' = x[i, kh] @ L[kh]                     (x'[t] = sum_k x[k] * L[k, t], f32 accumulation)
//   code = argmin_c (cnorm[kh, m, c] - 2 * x'[m * ds : (m + 1) * ds] . sub[kh, m, c])
// (|x' - c|^2 minus the constant |x'|^2), the smallest c on ties.
//
// x: float32 (n, G, d) contiguous, pre-RoPE keys; Lmat: float32 (G, d, d) contiguous, the
// codebook's Cholesky factor L per KV head (any matrix works; it is used as given); sub: float32
// (G, M, C, ds) contiguous, the k'-space subspace centroids (Codebook.subspaces()), d = M * ds;
// cnorm: float32 (G, M, C), |sub[kh, m, c]|^2. codes: uint16 (G, M, n_ctx), the caller's code
// buffer; key i is written at column first + i:
//   codes[(kh * M + m) * n_ctx + first + i]
// and nothing else is touched. Limits: 1 <= d <= VQA_DMAX (256), d % M == 0, 1 <= C <= 65536,
// 0 <= first, first + n <= n_ctx: a launch outside them writes nothing at all (the caller
// checks them on the host). A NaN or +inf distance is never selected (if all are: code 0).
//
// Launch: grid (n, G), block (256) [a multiple of 32, <= 1024], shared_mem = 0.
// One block per (key, KV head): x and x' in shared memory; per subspace every thread scans
// centroids c = tid, tid + blockDim, ... keeping its (best distance, smallest c), then one
// block argmin.
//
// budget: vq_assign_f32 registers<=40 smem<=2304

#define VQA_DMAX 256
#define VQA_NO_INDEX 0x7fffffff
#define VQA_POS_INF __int_as_float(0x7f800000)

__device__ __forceinline__ void vqa_take(float& v, int& i, float v2, int i2) {
    // (v2, i2) wins if smaller, or equal with a smaller index (numpy.argmin order)
    if (v2 < v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

// block-wide (min, smallest index); blockDim.x a multiple of 32. Result valid in every thread.
// Ends with a barrier: sv/si may be reused by the next call right away.
__device__ __forceinline__ void vqa_argmin_block(float& v, int& i, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(A2ATS_FULL_MASK, v, o);
        const int i2 = __shfl_xor_sync(A2ATS_FULL_MASK, i, o);
        vqa_take(v, i, v2, i2);
    }
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    v = lane < n_warps ? sv[lane] : VQA_POS_INF;
    i = lane < n_warps ? si[lane] : VQA_NO_INDEX;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v2 = __shfl_xor_sync(A2ATS_FULL_MASK, v, o);
        const int i2 = __shfl_xor_sync(A2ATS_FULL_MASK, i, o);
        vqa_take(v, i, v2, i2);
    }
    __syncthreads();
}

extern "C" __global__ void vq_assign_f32(const float* __restrict__ x,
                                         const float* __restrict__ Lmat,
                                         const float* __restrict__ sub,
                                         const float* __restrict__ cnorm,
                                         uint16_t* __restrict__ codes, int n, int d, int M, int C,
                                         int n_ctx, int first) {
    __shared__ float xs[VQA_DMAX];                      // the key x[i, kh]
    __shared__ float xp[VQA_DMAX];                      // x' = x @ L
    __shared__ float sv[32];
    __shared__ int si[32];
    // argument checks, uniform over the grid: an invalid launch writes nothing
    if (n < 1 || d < 1 || d > VQA_DMAX || M < 1 || d % M != 0 || C < 1 || C > 65536 ||
        first < 0 || (long long)first + n > (long long)n_ctx)
        return;
    const int i = blockIdx.x, kh = blockIdx.y, G = gridDim.y;
    if (i >= n) return;                                 // whole block: no barrier reached
    const int ds = d / M;
    const float* xr = x + ((size_t)i * G + kh) * d;
    for (int k = threadIdx.x; k < d; k += blockDim.x) xs[k] = xr[k];
    __syncthreads();
    const float* L = Lmat + (size_t)kh * d * d;
    for (int t = threadIdx.x; t < d; t += blockDim.x) {
        float acc = 0.0f;
        for (int k = 0; k < d; ++k) acc += xs[k] * L[(size_t)k * d + t];   // coalesced in t
        xp[t] = acc;
    }
    __syncthreads();
    for (int m = 0; m < M; ++m) {                       // block-uniform loop
        const float* xm = xp + m * ds;
        const float* cb = sub + ((size_t)kh * M + m) * C * ds;
        const float* cn = cnorm + ((size_t)kh * M + m) * C;
        float best = VQA_POS_INF;
        int bi = VQA_NO_INDEX;
        for (int c = threadIdx.x; c < C; c += blockDim.x) {   // ascending c: strict < keeps the first
            const float* cr = cb + (size_t)c * ds;
            float dot = 0.0f;
            for (int k = 0; k < ds; ++k) dot += xm[k] * cr[k];
            const float dist = cn[c] - 2.0f * dot;
            if (dist < best) { best = dist; bi = c; }
        }
        vqa_argmin_block(best, bi, sv, si);
        if (threadIdx.x == 0)
            codes[((size_t)kh * M + m) * n_ctx + first + i] = (uint16_t)(bi == VQA_NO_INDEX ? 0 : bi);
    }
}
