// A2ATS top-K token selection, matching CPUBackend(native_retrieval=False).select_topk bit for bit
// (a2ats_lite/backend/cpu.py: lut_lookup, topk_union; padding as batch.pad_selection but int32).
//
// Per (sequence s, KV head kh), with t = max(T[s], 0), lo = min(sinks, t),
// hi = max(lo, t - window), n = hi - lo candidates:
//   * n <= k: the row is 0 .. t-1;
//   * else, for every query head j < g: score(tok) = lut[s,kh,j,0,c0] + lut[s,kh,j,1,c1] + ...
//     (c_m = code of tok in subspace m), summed in f32 in m order exactly as lut_lookup (adds
//     without FTZ, so denormals are kept under CuPy's -ftz=true); the top k of the n scores, ties
//     to the EARLIER token (all tokens with score > the k-th largest value v, then the first
//     k - #above tokens with score == v in position order); picked = the sorted union over j.
//     The row is [0 .. lo-1] ++ picked ++ [hi .. t-1].
// -0.0 and +0.0 are the same score (as numpy compares them). NaN scores are NOT supported.
// k <= 0 with n > 0 picks no candidate (the CPU reference raises). sinks, window >= 0.
//
// How: scores become order-preserving uint32 keys (-0.0 -> +0.0 first); the k-th largest key of
// each head is found by a 4-pass radix select (8 bits a pass, 256-bin shared histogram), then one
// ordered pass marks key > v and the first `need` keys == v (block prefix counts over chunks of
// blockDim tokens), OR-ing into per-token flags; a last ordered pass compacts the flags. Token
// i = tok - lo is always handled by thread i % blockDim, so the scratch entries a thread reads
// are ones it wrote itself (no cross-thread global traffic, no fences).
//
// select_topk_lut: grid (G, S), block (B) with B any multiple of 32 up to 1024 (256 .. 1024 on a
//   GPU; the shim tests 32 .. 1024), shared_mem = lut_smem ? M * C * 4 : 0 (lut_smem = 1 stages the
//   (M, C) LUT slice of the current head in shared memory; above 48 KiB the caller raises
//   max_dynamic_shared_size_bytes or passes lut_smem = 0 to read the LUT from global memory).
//   lut      float32 (S, G, g, M, C) contiguous.
//   code_ptr uint64 (S,): device address of sequence s's uint16 codes, layout (G, M, n_ctx_s):
//            code of token tok, subspace m, KV head kh at [(kh * M + m) * code_stride[s] + tok].
//   code_stride int64 (S,): n_ctx_s (must be >= hi).
//   T        int32 (S,): tokens the query of sequence s sees.
//   cap      scratch capacity per (s, kh) in tokens (>= max_s n; max_s T[s] always suffices).
//   keys     uint32 (S, G, cap) scratch, flags uint8 (S, G, cap) scratch: no initial contents
//            needed (every entry read is written first by this launch).
//   idx      int32 (S, G, Kmax): the row, then -1 up to Kmax. A row is a subset of 0 .. t-1 of
//            length <= lo + min(n, g * k) + (t - hi), so Kmax = max(1, max_s T[s]) always
//            suffices; a smaller Kmax is checked (err bit 1), never written past.
//   lens     int32 (S, G): min(row length, Kmax).
//   err      int32 (1,): the caller zeroes it; bits OR-ed in: 1 = a row longer than Kmax (cut to
//            Kmax), 2 = a code >= C (that term read as 0.0f), 4 = hi > code_stride[s] or n > cap
//            (that row left empty: lens 0, all -1).
// budget: select_topk_lut registers<=64 smem<=1200

#define SEL_ERR_KMAX 1
#define SEL_ERR_CODE 2
#define SEL_ERR_BOUNDS 4

namespace sel {

// f32 add without FTZ (numpy keeps denormals; CuPy compiles with -ftz=true) and never contracted
__device__ __forceinline__ float add_rn(float a, float b) {
#ifdef A2ATS_SHIM
    return a + b;
#else
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#endif
}

// order-preserving uint32 key of a non-NaN float; -0.0 is mapped to +0.0 first (on the bits:
// a float compare would treat denormals as zero under -ftz=true)
__device__ __forceinline__ unsigned key_of(float f) {
    unsigned u = __float_as_uint(f);
    if (u == 0x80000000u) u = 0u;
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Warp 0 only: the digit b of the kk-th largest key (1-based) from the 256-bin histogram:
// sum(hist[> b]) < kk <= sum(hist[>= b]); writes out[0] = b, out[1] = kk - sum(hist[> b]).
// The caller guarantees sum(hist) >= kk.
__device__ __forceinline__ void pick_digit(const unsigned* hist, unsigned kk, unsigned* out) {
    const int lane = threadIdx.x & 31, top = 255 - 8 * lane;    // lane holds bins top .. top-7
    unsigned c = 0;
#pragma unroll
    for (int b = 0; b < 8; ++b) c += hist[top - b];
    unsigned incl = c;                                            // inclusive scan from bin 255
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const unsigned v = __shfl_up_sync(A2ATS_FULL_MASK, incl, o);
        if (lane >= o) incl += v;
    }
    const unsigned hit = __ballot_sync(A2ATS_FULL_MASK, incl >= kk);
    if (lane == __ffs((int)hit) - 1) {
        unsigned cum = incl - c;
        for (int b = 0; b < 8; ++b) {
            const unsigned h = hist[top - b];
            if (cum + h >= kk) { out[0] = (unsigned)(top - b); out[1] = kk - cum; break; }
            cum += h;
        }
    }
}

// Block-wide exclusive count of p in thread order; *total = the block's count. Every thread
// must call it (two __syncthreads). wsum: __shared__ int[32].
__device__ __forceinline__ int block_rank(bool p, int* wsum, int* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const unsigned b = __ballot_sync(A2ATS_FULL_MASK, p);
    if (lane == 0) wsum[warp] = __popc(b);
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < n_warps; ++w) {
        const int v = wsum[w];
        before += w < warp ? v : 0;
        all += v;
    }
    __syncthreads();                                              // wsum reused right after
    *total = all;
    return before + __popc(b & ((1u << lane) - 1u));
}

__device__ __forceinline__ void put(int* out, int p, int v, int Kmax, int* err) {
    if (p < Kmax) out[p] = v;
    else atomicOr(err, SEL_ERR_KMAX);
}

}  // namespace sel

extern "C" __global__ void __launch_bounds__(1024) select_topk_lut(
        const float* __restrict__ lut, const unsigned long long* __restrict__ code_ptr,
        const long long* __restrict__ code_stride, const int* __restrict__ T, int g, int M,
        int C, int sinks, int window, int k, int Kmax, int cap, int lut_smem,
        unsigned int* __restrict__ keys, unsigned char* __restrict__ flags,
        int* __restrict__ idx, int* __restrict__ lens, int* __restrict__ err) {
    extern __shared__ float s_lut[];
    __shared__ unsigned int s_hist[256];
    __shared__ int s_wsum[32];
    __shared__ unsigned int s_sel[2];
    const int kh = blockIdx.x, s = blockIdx.y, G = gridDim.x;
    const int tid = threadIdx.x, bd = blockDim.x;
    const size_t row = (size_t)s * G + kh;
    int* out = idx + row * (size_t)Kmax;
    const int t = max(T[s], 0);
    const int lo = min(max(sinks, 0), t), hi = max(lo, t - max(window, 0)), n = hi - lo;
    int len;                                                      // block-uniform
    if (n <= k) {                                                 // everything: 0 .. t-1
        for (int p = tid; p < t; p += bd) sel::put(out, p, p, Kmax, err);
        len = t;
    } else if (hi > code_stride[s] || n > cap) {                  // caller bug: empty row
        if (tid == 0) atomicOr(err, SEL_ERR_BOUNDS);
        len = 0;
    } else {
        unsigned* kr = keys + row * (size_t)cap;
        unsigned char* fr = flags + row * (size_t)cap;
        const uint16_t* cs = reinterpret_cast<const uint16_t*>(code_ptr[s]);
        const long long stride = code_stride[s];
        const size_t MC = (size_t)M * C;
        for (int j = 0; j < g && k > 0; ++j) {
            // ---- pass 0: keys of head j (kept in the scratch) + histogram of the top byte ----
            const float* L = lut + (row * g + j) * MC;
            if (lut_smem) {
                for (size_t i = tid; i < MC; i += bd) s_lut[i] = L[i];
                L = s_lut;
            }
            for (int i = tid; i < 256; i += bd) s_hist[i] = 0u;
            __syncthreads();
            for (int i = tid; i < n; i += bd) {
                const uint16_t* c = cs + (size_t)kh * M * stride + (lo + i);
                float acc = 0.0f;
                for (int m = 0; m < M; ++m) {
                    const int cm = c[(size_t)m * stride];
                    float v = 0.0f;
                    if (cm < C) v = L[(size_t)m * C + cm];
                    else atomicOr(err, SEL_ERR_CODE);
                    acc = m == 0 ? v : sel::add_rn(acc, v);
                }
                const unsigned key = sel::key_of(acc);
                kr[i] = key;
                atomicAdd(&s_hist[key >> 24], 1u);
            }
            __syncthreads();
            if (tid < 32) sel::pick_digit(s_hist, (unsigned)k, s_sel);
            __syncthreads();
            unsigned prefix = s_sel[0] << 24, kk = s_sel[1];
            // ---- passes 1..3: the next bytes among keys matching the prefix so far ----
            for (int shift = 16; shift >= 0; shift -= 8) {
                for (int i = tid; i < 256; i += bd) s_hist[i] = 0u;
                __syncthreads();
                for (int i = tid; i < n; i += bd) {
                    const unsigned key = kr[i];
                    if (((key ^ prefix) >> (shift + 8)) == 0u)      // matches the digits so far
                        atomicAdd(&s_hist[(key >> shift) & 255u], 1u);
                }
                __syncthreads();
                if (tid < 32) sel::pick_digit(s_hist, kk, s_sel);
                __syncthreads();
                prefix |= s_sel[0] << shift;
                kk = s_sel[1];
            }
            // ---- mark: key > v, plus the first kk (= need) keys == v in position order ----
            int taken = 0;                                        // block-uniform
            for (int base = 0; base < n; base += bd) {
                const int i = base + tid;
                const unsigned key = i < n ? kr[i] : 0u;
                const bool eq = i < n && key == prefix;
                bool pick = i < n && key > prefix;
                if (taken < (int)kk) {
                    int tot;
                    const int r = sel::block_rank(eq, s_wsum, &tot);
                    pick = pick || (eq && taken + r < (int)kk);
                    taken += tot;
                }
                if (i < n && (j == 0 || pick)) fr[i] = pick ? 1 : 0;
            }
        }
        // ---- compact: [sinks][picked in position order][window] ----
        int npick = 0;
        for (int base = 0; base < n; base += bd) {
            const int i = base + tid;
            const bool f = i < n && k > 0 && fr[i] != 0;
            int tot;
            const int r = sel::block_rank(f, s_wsum, &tot);
            if (f) sel::put(out, lo + npick + r, lo + i, Kmax, err);
            npick += tot;
        }
        for (int p = tid; p < lo; p += bd) sel::put(out, p, p, Kmax, err);
        for (int q = tid; q < t - hi; q += bd) sel::put(out, lo + npick + q, hi + q, Kmax, err);
        len = lo + npick + (t - hi);
    }
    for (int p = len + tid; p < Kmax; p += bd) out[p] = -1;
    if (tid == 0) lens[row] = min(len, Kmax);
}
