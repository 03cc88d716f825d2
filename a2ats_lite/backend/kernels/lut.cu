// A2ATS lookup tables, matching a2ats_lite.backend.cpu.CPUBackend.build_lut (numpy path):
//   lut[s, kh, j, m, c] = sum_{i < ds} q[s, kh, j, m * ds + i] * cent[kh, m, c, i]
// f32 in, f32 accumulate (in order i = 0 .. ds - 1), f32 out.
//
// q: float32 (S, G, g, d) contiguous, d = M * ds (the decode queries of each KV head's group,
// already in the codebook's query space); cent: float32 (G, M, C, ds) contiguous (per KV head,
// per subspace, C centroids of ds dims); lut: float32 (S, G, g, M, C) contiguous.
// Limits: 1 <= g <= LUT_GMAX (16), 1 <= ds <= LUT_DMAX (256), any C >= 1. A launch outside
// them writes nothing (the caller checks them on the host).
//
// Launch: grid (ceil(C / blockDim.x), M, S * G), block (128) [any size <= 1024: no warp
// collectives], shared_mem = 0. gridDim.y must be M (it also gives the row length d = M * ds of
// q); blockIdx.z = s * G + kh (S * G <= 65535). Thread x of block bx owns centroid
// c = bx * blockDim.x + x: it reads the centroid row once (twice for g > 8) and scores it against the g query
// sub-vectors staged in shared memory (read as broadcasts). The writes of one (j, m) row are
// consecutive in c (coalesced).
//
// budget: build_lut_f32 registers<=48 smem<=16384

#define LUT_GMAX 16
#define LUT_DMAX 256

// The scoring loop for g <= GB queries (GB a compile-time bucket, so acc[] lives in registers
// and a small group does not pay for 8 accumulators).
template <int GB>
__device__ __forceinline__ void lut_score(const float* __restrict__ crow, const float* qs,
                                          float* __restrict__ out, int g, int ds,
                                          size_t j_stride) {
    float acc[GB];
#pragma unroll
    for (int j = 0; j < GB; ++j) acc[j] = 0.0f;
    for (int i = 0; i < ds; ++i) {
        const float cv = crow[i];
#pragma unroll
        for (int j = 0; j < GB; ++j)
            if (j < g) acc[j] += qs[j * ds + i] * cv;
    }
#pragma unroll
    for (int j = 0; j < GB; ++j)
        if (j < g) out[j * j_stride] = acc[j];
}

extern "C" __global__ void build_lut_f32(const float* __restrict__ q,
                                         const float* __restrict__ cent,
                                         float* __restrict__ lut, int G, int g, int C, int ds) {
    __shared__ float qs[LUT_GMAX * LUT_DMAX];          // [j][i]: g sub-vectors of ds dims
    if (g < 1 || g > LUT_GMAX || ds < 1 || ds > LUT_DMAX || C < 1) return;   // grid-uniform
    const int m = blockIdx.y, M = gridDim.y, sk = blockIdx.z, kh = sk % G;
    const int d = M * ds;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const float* qb = q + (size_t)sk * g * d + (size_t)m * ds;       // q[s, kh, 0, m * ds]
    for (int k = threadIdx.x; k < g * ds; k += blockDim.x) {
        const int j = k / ds, i = k - j * ds;
        qs[k] = qb[(size_t)j * d + i];
    }
    __syncthreads();
    if (c >= C) return;                                 // partial last block (after the barrier)
    const float* crow = cent + (((size_t)kh * M + m) * C + c) * ds;
    float* out = lut + ((size_t)sk * g * M + m) * C + c;             // lut[s, kh, 0, m, c]
    const size_t js = (size_t)M * C;                                 // j -> j + 1 in lut
    if (g == 1) lut_score<1>(crow, qs, out, g, ds, js);
    else if (g == 2) lut_score<2>(crow, qs, out, g, ds, js);
    else if (g <= 4) lut_score<4>(crow, qs, out, g, ds, js);
    else if (g <= 8) lut_score<8>(crow, qs, out, g, ds, js);
    else    // 9..16 queries: two passes of 8 (the row is re-read from L1; 16 accumulators
            // would double the registers of every launch)
        for (int j0 = 0; j0 < g; j0 += 8)
            lut_score<8>(crow, qs + j0 * ds, out + j0 * js, min(8, g - j0), ds, js);
}
