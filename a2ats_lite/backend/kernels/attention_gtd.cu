// Attention over one sequence's LayerBuffer views (kv/storage.py), matching
// a2ats_lite.backend.cpu.CPUBackend.attention: exact softmax attention, causal (query at position
// t sees keys at positions p <= t), sliding window (t - p < window), GQA (query head h reads KV
// head h / (n_heads / n_kv_heads)). Scores, softmax and outputs accumulate in f32.
//
// K, V: the cache view (G, T, head_dim) of positions k_pos0 .. k_pos0 + T - 1, in the storage
// type (float or __half; K and V may differ: --cache-type-k/-v). Rows of one head are contiguous
// (row stride head_dim); heads are k_head_stride / v_head_stride ELEMENTS apart (the buffer's
// capacity * head_dim: the view K[:, :n] of a (G, cap, d) buffer is used in place, never copied).
// q: float32 (n_q, n_heads, head_dim) contiguous, post-RoPE, NOT pre-scaled (`scale` here).
// out: float32 (n_q, n_heads, head_dim) contiguous. head_dim <= 256 (GTD_DMAX), any value.
// All loads are scalar (no alignment needs beyond the element type).
//
// Entry points, per (K type, V type) in {f32, f16}^2 (suffix _k<KT>_v<VT>):
//
// ---- decode (one query row per sequence, S sequences at once): flash decoding -------------------
// attn_gtd_decode_k*_v*: sequence s has its own cache buffer: K of sequence s starts at device
//   address k_ptr[s] (a view (G, T_s, d) with head stride k_hs[s] elements; likewise v_ptr, v_hs),
//   and its query q[s] (n_heads, head_dim) sees exactly the keys j in [j_lo[s], j_hi[s]) of it
//   (the host computes them from the query position, the buffer's first position and the
//   window). The keys are cut into splits of split_len keys starting at j_lo[s].
//   Launch: grid (n_splits, n_heads, S), n_splits = max_s ceil((j_hi[s] - j_lo[s]) / split_len)
//   (a split past a sequence's j_hi writes an empty partial), block (128) [4 warps: warp w walks
//   keys j_lo + split*split_len + w, step 4; lane l holds dims l + 32 i], shared_mem = 0.
//   Writes at index p = (s * n_heads + h) * n_splits + split: part_m[p] (max scaled score, -inf
//   if empty), part_l[p] (sum exp(score - m)), part_o[p * head_dim + d] (sum exp(score - m) v).
// attn_gtd_decode_idx_k*_v* (f32/f32, f16/f16): the same over rows listed by index (the GPU row
//   cache of retrieved rows, kv/rowcache.py): key j of sequence s is row rows[s * rows_stride + j]
//   of its view, for j in [j_lo[s], j_hi[s]); a row outside [0, n_rows[s]) is skipped and sets
//   bit 1 of err[0]. Rows are read in list order, so the sums are those of a gathered copy.
// attn_gtd_combine: grid (n_heads, S), block (ceil(head_dim / 32) * 32, <= 256): out (S, n_heads,
//   head_dim) = sum_s e^(m_s - M) o_s[d] / sum_s e^(m_s - M) l_s (zeros if every split is empty).
//
// ---- prefill (n_q >= 1 rows of one sequence) --------------------------------------------------
// attn_gtd_prefill_k*_v*: q_pos int32 (n_q,) the query positions (ascending, as the forward pass
//   gives them). Key j (position k_pos0 + j) is visible to a row at position t iff
//   k_pos0 + j <= t and (window <= 0 or t - (k_pos0 + j) < window). A row that sees no key
//   gets zeros.
//   Launch: grid (ceil(n_q / GTD_PF_ROWS), n_heads), block (128) [4 warps x 2 query rows],
//   shared_mem (dynamic) = gtd_prefill_smem(head_dim, sizeof(KT), sizeof(VT)) =
//     4 * GTD_PF_ROWS * head_dim                   scaled queries (f32)
//   + GTD_PF_KEYS * (head_dim + 1) * sizeof(KT)    K tile (padded rows)
//   + GTD_PF_KEYS * head_dim * sizeof(VT)          V tile
//   rounded up to 16 (f16/f16 at head_dim 256: 41,024 bytes; f32/f32: 73,856 bytes, above the
//   default 48 KiB: the caller raises max_dynamic_shared_size_bytes).
//
// budget: attn_gtd_decode_kf32_vf32 registers<=64 smem<=1056
// budget: attn_gtd_decode_kf16_vf16 registers<=64 smem<=1056
// budget: attn_gtd_decode_kf32_vf16 registers<=64 smem<=1056
// budget: attn_gtd_decode_kf16_vf32 registers<=64 smem<=1056
// budget: attn_gtd_decode_idx_kf32_vf32 registers<=64 smem<=1056
// budget: attn_gtd_decode_idx_kf16_vf16 registers<=64 smem<=1056
// budget: attn_gtd_combine registers<=40 smem<=0
// budget: attn_gtd_prefill_kf32_vf32 registers<=80 smem<=0
// budget: attn_gtd_prefill_kf16_vf16 registers<=80 smem<=0
// budget: attn_gtd_prefill_kf32_vf16 registers<=80 smem<=0
// budget: attn_gtd_prefill_kf16_vf32 registers<=80 smem<=0

#define GTD_DMAX 256
#define GTD_PER_LANE (GTD_DMAX / 32)     // dims per lane
#define GTD_WARPS 4
#define GTD_PF_KEYS 32                   // keys per shared tile (one per lane for the scores)
#define GTD_PF_RPW 2                     // query rows per warp
#define GTD_PF_ROWS (GTD_WARPS * GTD_PF_RPW)

namespace gtd {

__device__ __forceinline__ float ld(const float* p) { return *p; }
__device__ __forceinline__ float ld(const __half* p) { return f16_to_f32(*p); }

// ---- decode -------------------------------------------------------------------------------------
// IDX: key j of sequence s is row rows[s * rows_stride + j] of its view (the row cache's slots),
// checked against n_rows[s]: a row outside [0, n_rows[s]) is skipped and sets bit 1 of *err.
template <class KT, class VT, bool IDX>
__device__ __forceinline__ void decode_split(
        const float* __restrict__ q, const unsigned long long* __restrict__ k_ptr,
        const unsigned long long* __restrict__ v_ptr, const long long* __restrict__ k_hs,
        const long long* __restrict__ v_hs, const int* __restrict__ j_lo_s,
        const int* __restrict__ j_hi_s, float* __restrict__ part_m, float* __restrict__ part_l,
        float* __restrict__ part_o, int n_heads, int n_kv_heads, int head_dim, int split_len,
        float scale, const int* __restrict__ rows, long long rows_stride,
        const int* __restrict__ n_rows, int* __restrict__ err) {
    __shared__ float s_m[GTD_WARPS];
    __shared__ float s_l[GTD_WARPS];
    __shared__ float s_o[GTD_WARPS * GTD_DMAX / 4];   // reused 4 times: GTD_DMAX/4 dims a pass
    const int split = blockIdx.x, h = blockIdx.y, s = blockIdx.z, n_splits = gridDim.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = h / (n_heads / n_kv_heads);
    const int k0 = j_lo_s[s] + split * split_len, k1 = min(j_hi_s[s], k0 + split_len);
    const size_t pidx = ((size_t)s * n_heads + h) * n_splits + split;
    const KT* Kh = reinterpret_cast<const KT*>(k_ptr[s]) + (long long)g * k_hs[s];
    const VT* Vh = reinterpret_cast<const VT*>(v_ptr[s]) + (long long)g * v_hs[s];

    float qv[GTD_PER_LANE], acc[GTD_PER_LANE];
    const float* qh = q + ((size_t)s * n_heads + h) * head_dim;
#pragma unroll
    for (int i = 0; i < GTD_PER_LANE; ++i) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? qh[d] * scale : 0.0f;
        acc[i] = 0.0f;
    }
    float m = A2ATS_NEG_INF, l = 0.0f;
    for (int j = k0 + warp; j < k1; j += GTD_WARPS) {          // warp-uniform loop
        long long r = j;
        if (IDX) {
            r = rows[(long long)s * rows_stride + j];
            if (r < 0 || r >= n_rows[s]) {                        // warp-uniform
                if (lane == 0) atomicOr(err, 1);
                continue;
            }
        }
        const KT* kp = Kh + (size_t)r * head_dim;
        const VT* vp = Vh + (size_t)r * head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < GTD_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) dot += qv[i] * ld(kp + d);
        }
        dot = warp_sum(dot);
        const float m_new = fmaxf(m, dot);
        const float corr = __expf(m - m_new);       // m = -inf at the first key: 0
        const float p = __expf(dot - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < GTD_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = acc[i] * corr + p * ld(vp + d);
        }
        m = m_new;
    }
    // combine the 4 warps of the block
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
    __syncthreads();
    float M = A2ATS_NEG_INF;
#pragma unroll
    for (int w = 0; w < GTD_WARPS; ++w) M = fmaxf(M, s_m[w]);
    const float f = m == A2ATS_NEG_INF ? 0.0f : __expf(m - M);   // empty warp contributes 0
    if (threadIdx.x == 0) {
        float lsum = 0.0f;
        if (M != A2ATS_NEG_INF)
            for (int w = 0; w < GTD_WARPS; ++w)
                if (s_m[w] != A2ATS_NEG_INF) lsum += s_l[w] * __expf(s_m[w] - M);
        part_m[pidx] = M;
        part_l[pidx] = lsum;
    }
    // the outputs in passes of 2 lane-dims (64 dims): s_o holds [warp][64]
#pragma unroll
    for (int i0 = 0; i0 < GTD_PER_LANE; i0 += 2) {
        if (32 * i0 >= head_dim) break;                          // block-uniform
        __syncthreads();                                          // s_o free again
        s_o[warp * 64 + lane] = acc[i0] * f;
        s_o[warp * 64 + 32 + lane] = acc[i0 + 1] * f;
        __syncthreads();
        for (int k = threadIdx.x; k < 64; k += blockDim.x) {
            const int d = 32 * i0 + k;
            if (d < head_dim) {
                float o = 0.0f;
#pragma unroll
                for (int w = 0; w < GTD_WARPS; ++w) o += s_o[w * 64 + k];
                part_o[pidx * head_dim + d] = o;
            }
        }
    }
}

// ---- prefill ------------------------------------------------------------------------------------
template <class KT, class VT>
__device__ __forceinline__ void prefill(
        const float* __restrict__ q, const KT* __restrict__ K, const VT* __restrict__ V,
        const int* __restrict__ q_pos, float* __restrict__ out, int n_q, int n_heads,
        int n_kv_heads, int head_dim, long long k_head_stride, long long v_head_stride, int T,
        int k_pos0, int window, float scale) {
    extern __shared__ __align__(16) unsigned char gtd_smem[];
    float* Qs = reinterpret_cast<float*>(gtd_smem);                       // [ROWS][head_dim]
    KT* Ks = reinterpret_cast<KT*>(Qs + GTD_PF_ROWS * head_dim);          // [KEYS][head_dim+1]
    const int kstride = head_dim + 1;
    // V tile after the K tile, aligned for VT (K tile bytes are a multiple of 2; f32 V needs 4)
    size_t voff = (size_t)GTD_PF_KEYS * kstride * sizeof(KT);
    voff = (voff + 3) & ~(size_t)3;
    VT* Vs = reinterpret_cast<VT*>(reinterpret_cast<unsigned char*>(Ks) + voff);   // [KEYS][head_dim]

    const int h = blockIdx.y, g = h / (n_heads / n_kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r0 = blockIdx.x * GTD_PF_ROWS;
    const int rows = min(GTD_PF_ROWS, n_q - r0);
    const KT* Kh = K + (long long)g * k_head_stride;
    const VT* Vh = V + (long long)g * v_head_stride;

    for (int k = threadIdx.x; k < GTD_PF_ROWS * head_dim; k += blockDim.x) {
        const int r = k / head_dim, d = k - r * head_dim;
        Qs[k] = r < rows ? q[((size_t)(r0 + r) * n_heads + h) * head_dim + d] * scale : 0.0f;
    }
    // the key range any row of this block can see
    int t_min = q_pos[r0], t_max = q_pos[r0];
    for (int r = 1; r < rows; ++r) { t_min = min(t_min, q_pos[r0 + r]); t_max = max(t_max, q_pos[r0 + r]); }
    int j_lo = 0;
    if (window > 0) j_lo = max(0, t_min - window + 1 - k_pos0);
    const int j_hi = min(T, t_max - k_pos0 + 1);

    int t_pos[GTD_PF_RPW];
    float m[GTD_PF_RPW], l[GTD_PF_RPW], acc[GTD_PF_RPW][GTD_PER_LANE];
#pragma unroll
    for (int r = 0; r < GTD_PF_RPW; ++r) {
        const int qr = warp * GTD_PF_RPW + r;
        t_pos[r] = qr < rows ? q_pos[r0 + qr] : 0;
        m[r] = A2ATS_NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < GTD_PER_LANE; ++i) acc[r][i] = 0.0f;
    }
    for (int tile = j_lo; tile < j_hi; tile += GTD_PF_KEYS) {    // block-uniform loop
        const int nk = min(GTD_PF_KEYS, j_hi - tile);
        __syncthreads();                                          // previous tile consumed
        for (int k = threadIdx.x; k < GTD_PF_KEYS * head_dim; k += blockDim.x) {
            const int t = k / head_dim, d = k - t * head_dim;
            if (t < nk) {
                Ks[t * kstride + d] = Kh[(size_t)(tile + t) * head_dim + d];
                Vs[t * head_dim + d] = Vh[(size_t)(tile + t) * head_dim + d];
            }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < GTD_PF_RPW; ++r) {
            const int qr = warp * GTD_PF_RPW + r;                 // warp-uniform
            if (qr >= rows) continue;
            const int t = t_pos[r];
            const int kpos = k_pos0 + tile + lane;                // lane = key of the tile
            const bool vis = lane < nk && kpos <= t && (window <= 0 || t - kpos < window);
            float sc = A2ATS_NEG_INF;
            if (vis) {
                const float* qs = Qs + qr * head_dim;
                const KT* ks = Ks + lane * kstride;
                float dot = 0.0f;
                for (int d = 0; d < head_dim; ++d) dot += qs[d] * ld(ks + d);
                sc = dot;
            }
            const float tmax = warp_max(sc);
            if (tmax == A2ATS_NEG_INF) continue;                  // nothing visible (uniform)
            const float m_new = fmaxf(m[r], tmax);
            const float corr = __expf(m[r] - m_new);
            const float p = vis ? __expf(sc - m_new) : 0.0f;
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int i = 0; i < GTD_PER_LANE; ++i) acc[r][i] *= corr;
            for (int kk = 0; kk < nk; ++kk) {
                const float pt = __shfl_sync(A2ATS_FULL_MASK, p, kk);
                if (pt == 0.0f) continue;                         // warp-uniform (broadcast)
                const VT* vs = Vs + kk * head_dim;
#pragma unroll
                for (int i = 0; i < GTD_PER_LANE; ++i) {
                    const int d = lane + 32 * i;
                    if (d < head_dim) acc[r][i] += pt * ld(vs + d);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < GTD_PF_RPW; ++r) {
        const int qr = warp * GTD_PF_RPW + r;
        if (qr >= rows) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        float* o = out + ((size_t)(r0 + qr) * n_heads + h) * head_dim;
#pragma unroll
        for (int i = 0; i < GTD_PER_LANE; ++i) {
            const int d = lane + 32 * i;
            if (d < head_dim) o[d] = acc[r][i] * inv;
        }
    }
}

}  // namespace gtd

// ---- entry points (written out: the shim finds kernels by their `extern "C" __global__` text) --
extern "C" __global__ void attn_gtd_decode_idx_kf32_vf32(
        const float* __restrict__ q, const unsigned long long* __restrict__ k_ptr,
        const unsigned long long* __restrict__ v_ptr, const long long* __restrict__ k_hs,
        const long long* __restrict__ v_hs, const int* __restrict__ j_lo,
        const int* __restrict__ j_hi, float* __restrict__ part_m, float* __restrict__ part_l,
        float* __restrict__ part_o, int n_heads, int n_kv_heads, int head_dim, int split_len,
        float scale, const int* __restrict__ rows, long long rows_stride,
        const int* __restrict__ n_rows, int* __restrict__ err) {
    gtd::decode_split<float, float, true>(q, k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi, part_m, part_l,
                                        part_o, n_heads, n_kv_heads, head_dim, split_len, scale,
                                        rows, rows_stride, n_rows, err);
}

extern "C" __global__ void attn_gtd_decode_idx_kf16_vf16(
        const float* __restrict__ q, const unsigned long long* __restrict__ k_ptr,
        const unsigned long long* __restrict__ v_ptr, const long long* __restrict__ k_hs,
        const long long* __restrict__ v_hs, const int* __restrict__ j_lo,
        const int* __restrict__ j_hi, float* __restrict__ part_m, float* __restrict__ part_l,
        float* __restrict__ part_o, int n_heads, int n_kv_heads, int head_dim, int split_len,
        float scale, const int* __restrict__ rows, long long rows_stride,
        const int* __restrict__ n_rows, int* __restrict__ err) {
    gtd::decode_split<__half, __half, true>(q, k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi, part_m, part_l,
                                        part_o, n_heads, n_kv_heads, head_dim, split_len, scale,
                                        rows, rows_stride, n_rows, err);
}

extern "C" __global__ void attn_gtd_decode_kf32_vf32(
        const float* __restrict__ q, const unsigned long long* __restrict__ k_ptr,
        const unsigned long long* __restrict__ v_ptr, const long long* __restrict__ k_hs,
        const long long* __restrict__ v_hs, const int* __restrict__ j_lo,
        const int* __restrict__ j_hi, float* __restrict__ part_m, float* __restrict__ part_l,
        float* __restrict__ part_o, int n_heads, int n_kv_heads, int head_dim, int split_len,
        float scale) {
    gtd::decode_split<float, float, false>(q, k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi, part_m, part_l,
                                        part_o, n_heads, n_kv_heads, head_dim, split_len, scale,
                                        nullptr, 0, nullptr, nullptr);
}

extern "C" __global__ void attn_gtd_decode_kf16_vf16(
        const float* __restrict__ q, const unsigned long long* __restrict__ k_ptr,
        const unsigned long long* __restrict__ v_ptr, const long long* __restrict__ k_hs,
        const long long* __restrict__ v_hs, const int* __restrict__ j_lo,
        const int* __restrict__ j_hi, float* __restrict__ part_m, float* __restrict__ part_l,
        float* __restrict__ part_o, int n_heads, int n_kv_heads, int head_dim, int split_len,
        float scale) {
    gtd::decode_split<__half, __half, false>(q, k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi, part_m, part_l,
                                        part_o, n_heads, n_kv_heads, head_dim, split_len, scale,
                                        nullptr, 0, nullptr, nullptr);
}

extern "C" __global__ void attn_gtd_decode_kf32_vf16(
        const float* __restrict__ q, const unsigned long long* __restrict__ k_ptr,
        const unsigned long long* __restrict__ v_ptr, const long long* __restrict__ k_hs,
        const long long* __restrict__ v_hs, const int* __restrict__ j_lo,
        const int* __restrict__ j_hi, float* __restrict__ part_m, float* __restrict__ part_l,
        float* __restrict__ part_o, int n_heads, int n_kv_heads, int head_dim, int split_len,
        float scale) {
    gtd::decode_split<float, __half, false>(q, k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi, part_m, part_l,
                                        part_o, n_heads, n_kv_heads, head_dim, split_len, scale,
                                        nullptr, 0, nullptr, nullptr);
}

extern "C" __global__ void attn_gtd_decode_kf16_vf32(
        const float* __restrict__ q, const unsigned long long* __restrict__ k_ptr,
        const unsigned long long* __restrict__ v_ptr, const long long* __restrict__ k_hs,
        const long long* __restrict__ v_hs, const int* __restrict__ j_lo,
        const int* __restrict__ j_hi, float* __restrict__ part_m, float* __restrict__ part_l,
        float* __restrict__ part_o, int n_heads, int n_kv_heads, int head_dim, int split_len,
        float scale) {
    gtd::decode_split<__half, float, false>(q, k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi, part_m, part_l,
                                        part_o, n_heads, n_kv_heads, head_dim, split_len, scale,
                                        nullptr, 0, nullptr, nullptr);
}

extern "C" __global__ void attn_gtd_combine(const float* __restrict__ part_m,
                                            const float* __restrict__ part_l,
                                            const float* __restrict__ part_o,
                                            float* __restrict__ out, int head_dim, int n_splits) {
    const int h = blockIdx.x, s = blockIdx.y, n_heads = gridDim.x;
    const size_t p0 = ((size_t)s * n_heads + h) * n_splits;
    float M = A2ATS_NEG_INF;
    for (int k = 0; k < n_splits; ++k) M = fmaxf(M, part_m[p0 + k]);
    float lsum = 0.0f;
    for (int k = 0; k < n_splits; ++k) {
        const float mk = part_m[p0 + k];
        if (mk != A2ATS_NEG_INF) lsum += part_l[p0 + k] * __expf(mk - M);
    }
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int k = 0; k < n_splits; ++k) {
            const float mk = part_m[p0 + k];
            if (mk != A2ATS_NEG_INF) o += part_o[(p0 + k) * head_dim + d] * __expf(mk - M);
        }
        out[((size_t)s * n_heads + h) * head_dim + d] = o * inv;
    }
}

extern "C" __global__ void attn_gtd_prefill_kf32_vf32(
        const float* __restrict__ q, const float* __restrict__ K, const float* __restrict__ V,
        const int* __restrict__ q_pos, float* __restrict__ out, int n_q, int n_heads,
        int n_kv_heads, int head_dim, long long k_head_stride, long long v_head_stride, int T,
        int k_pos0, int window, float scale) {
    gtd::prefill(q, K, V, q_pos, out, n_q, n_heads, n_kv_heads, head_dim, k_head_stride,
                 v_head_stride, T, k_pos0, window, scale);
}

extern "C" __global__ void attn_gtd_prefill_kf16_vf16(
        const float* __restrict__ q, const __half* __restrict__ K, const __half* __restrict__ V,
        const int* __restrict__ q_pos, float* __restrict__ out, int n_q, int n_heads,
        int n_kv_heads, int head_dim, long long k_head_stride, long long v_head_stride, int T,
        int k_pos0, int window, float scale) {
    gtd::prefill(q, K, V, q_pos, out, n_q, n_heads, n_kv_heads, head_dim, k_head_stride,
                 v_head_stride, T, k_pos0, window, scale);
}

extern "C" __global__ void attn_gtd_prefill_kf32_vf16(
        const float* __restrict__ q, const float* __restrict__ K, const __half* __restrict__ V,
        const int* __restrict__ q_pos, float* __restrict__ out, int n_q, int n_heads,
        int n_kv_heads, int head_dim, long long k_head_stride, long long v_head_stride, int T,
        int k_pos0, int window, float scale) {
    gtd::prefill(q, K, V, q_pos, out, n_q, n_heads, n_kv_heads, head_dim, k_head_stride,
                 v_head_stride, T, k_pos0, window, scale);
}

extern "C" __global__ void attn_gtd_prefill_kf16_vf32(
        const float* __restrict__ q, const __half* __restrict__ K, const float* __restrict__ V,
        const int* __restrict__ q_pos, float* __restrict__ out, int n_q, int n_heads,
        int n_kv_heads, int head_dim, long long k_head_stride, long long v_head_stride, int T,
        int k_pos0, int window, float scale) {
    gtd::prefill(q, K, V, q_pos, out, n_q, n_heads, n_kv_heads, head_dim, k_head_stride,
                 v_head_stride, T, k_pos0, window, scale);
}
