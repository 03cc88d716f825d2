// Attention over a dense f16 KV cache, matching a2ats_lite.kv.dense (exact softmax attention,
// causal, sliding window "query pos - key pos < window", GQA: query head h reads KV head
// h / (n_heads / n_kv_heads)). Scores, softmax and outputs accumulate in f32.
//
// KV cache layout (both K and V): __half [n_slots][n_kv_heads][head_dim]; one buffer shared by
// all sequences, each owning a contiguous run of slots. head_dim even and <= 256 (ATT_DMAX).
// Queries are float32 after RoPE, NOT pre-scaled (`scale` is applied here).
// window <= 0 means no sliding window.
//
// budget: kv_append_f16 registers<=24 smem<=0
// budget: attn_decode_split_f16 registers<=64 smem<=4128
// budget: attn_decode_combine registers<=48 smem<=0
// budget: attn_prefill_f16 registers<=72 smem<=0  (+ 160*head_dim+128 dynamic)

#define ATT_DMAX 256
#define ATT_PER_LANE (ATT_DMAX / 64)     // half2 pairs per lane
#define ATT_WARPS 4

// ---- cache append -----------------------------------------------------------------------------
// k, v: float32 (n_rows, row_elems) with row_elems = n_kv_heads * head_dim (post-RoPE keys);
// row i goes to cache slot slot0 + i. Launch: grid (min(ceil(n_rows*row_elems/256), 65535)),
// block (256); grid-stride.
extern "C" __global__ void kv_append_f16(const float* __restrict__ k, const float* __restrict__ v,
                                         __half* __restrict__ K, __half* __restrict__ V,
                                         int n_rows, int row_elems, int slot0) {
    const long long total = (long long)n_rows * row_elems;
    const long long off = (long long)slot0 * row_elems;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        K[off + i] = __float2half_rn(k[i]);
        V[off + i] = __float2half_rn(v[i]);
    }
}

// ---- flash decoding: one query row per sequence ---------------------------------------------
// Sequence s (0..n_seqs-1) has seq_len[s] >= 1 cached keys in slots seq_base[s] ..
// seq_base[s] + seq_len[s] - 1, at consecutive positions ending with the query's own position
// (its key is appended first). Key j is visible iff window <= 0 or seq_len[s] - 1 - j < window.
// q: float32 (n_seqs, n_heads, head_dim). The keys are cut into splits of split_len keys;
//
// Pass 1, attn_decode_split_f16: grid (n_splits, n_heads, n_seqs), block (128) [4 warps].
//   n_splits >= ceil(max(seq_len) / split_len); splits past a sequence's end (or before its
//   window) write an empty partial. Writes, at index ((s * n_heads + h) * n_splits + split):
//   part_m (running max of the scaled scores), part_l (sum of exp(score - m)),
//   part_o[... * head_dim + d] (sum of exp(score - m) * v, unnormalized).
// Pass 2, attn_decode_combine: grid (n_heads, n_seqs), block (ceil(head_dim/32)*32 <= 256):
//   out (n_seqs, n_heads, head_dim) float32 = sum_s e^(m_s-M) o_s / sum_s e^(m_s-M) l_s.
extern "C" __global__ void attn_decode_split_f16(
        const float* __restrict__ q, const __half* __restrict__ K, const __half* __restrict__ V,
        const int* __restrict__ seq_base, const int* __restrict__ seq_len,
        float* __restrict__ part_m, float* __restrict__ part_l, float* __restrict__ part_o,
        int n_heads, int n_kv_heads, int head_dim, int split_len, int window, float scale) {
    __shared__ float s_m[ATT_WARPS];
    __shared__ float s_l[ATT_WARPS];
    __shared__ float s_o[ATT_WARPS][ATT_DMAX];
    const int split = blockIdx.x, h = blockIdx.y, s = blockIdx.z, n_splits = gridDim.x;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = h / (n_heads / n_kv_heads);
    const int L = seq_len[s], base = seq_base[s];
    const int lo = window > 0 ? max(0, L - window) : 0;
    const int k0 = max(lo, split * split_len), k1 = min(L, (split + 1) * split_len);
    const size_t pidx = ((size_t)s * n_heads + h) * n_splits + split;

    // this lane's dims: 2 * lane + 64 * i (+1), i < ATT_PER_LANE
    float2 qv[ATT_PER_LANE];
    const float* qh = q + ((size_t)s * n_heads + h) * head_dim;
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        const int d = 2 * lane + 64 * i;
        qv[i] = d < head_dim ? make_float2(qh[d] * scale, qh[d + 1] * scale) : make_float2(0.f, 0.f);
    }
    float m = A2ATS_NEG_INF, l = 0.0f;
    float2 acc[ATT_PER_LANE];
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) acc[i] = make_float2(0.f, 0.f);

    const size_t row = (size_t)n_kv_heads * head_dim;
    for (int j = k0 + warp; j < k1; j += ATT_WARPS) {       // warp-uniform loop
        const __half* kp = K + (size_t)(base + j) * row + (size_t)g * head_dim;
        const __half* vp = V + (size_t)(base + j) * row + (size_t)g * head_dim;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; ++i) {
            const int d = 2 * lane + 64 * i;
            if (d < head_dim) {
                const float2 kf = __half22float2(*reinterpret_cast<const __half2*>(kp + d));
                dot += qv[i].x * kf.x + qv[i].y * kf.y;
            }
        }
        dot = warp_sum(dot);
        const float m_new = fmaxf(m, dot);
        const float corr = __expf(m - m_new);     // m = -inf at the first key: 0
        const float p = __expf(dot - m_new);
        l = l * corr + p;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; ++i) {
            const int d = 2 * lane + 64 * i;
            if (d < head_dim) {
                const float2 vf = __half22float2(*reinterpret_cast<const __half2*>(vp + d));
                acc[i].x = acc[i].x * corr + p * vf.x;
                acc[i].y = acc[i].y * corr + p * vf.y;
            }
        }
        m = m_new;
    }
    // combine the warps of this block
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
    __syncthreads();
    float M = A2ATS_NEG_INF;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; ++w) M = fmaxf(M, s_m[w]);
    const float f = M == A2ATS_NEG_INF ? 0.0f : __expf(m - M);   // empty warp: m = -inf -> 0
#pragma unroll
    for (int i = 0; i < ATT_PER_LANE; ++i) {
        const int d = 2 * lane + 64 * i;
        if (d < head_dim) { s_o[warp][d] = acc[i].x * f; s_o[warp][d + 1] = acc[i].y * f; }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float lsum = 0.0f;
        if (M != A2ATS_NEG_INF)
            for (int w = 0; w < ATT_WARPS; ++w) lsum += s_l[w] * __expf(s_m[w] - M);
        part_m[pidx] = M;
        part_l[pidx] = lsum;
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < ATT_WARPS; ++w) o += s_o[w][d];
        part_o[pidx * head_dim + d] = o;
    }
}

extern "C" __global__ void attn_decode_combine(const float* __restrict__ part_m,
                                               const float* __restrict__ part_l,
                                               const float* __restrict__ part_o,
                                               float* __restrict__ out, int n_heads,
                                               int head_dim, int n_splits) {
    const int h = blockIdx.x, s = blockIdx.y;
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

// ---- prefill: a block of query rows of ONE sequence over its cache -----------------------------
// q: float32 (n_q, n_heads, head_dim), query row i at position q_pos0 + i.
// The sequence's cache holds n_kv keys at positions kv_pos0 .. kv_pos0 + n_kv - 1 in slots
// kv_base .. kv_base + n_kv - 1 (the rows of this chunk already appended). Key at position p
// is visible to query position t iff p <= t and (window <= 0 or t - p < window). A query
// that sees no key gets zeros.
// out: float32 (n_q, n_heads, head_dim).
// Launch: grid (ceil(n_q / ATT_PF_ROWS), n_heads), block (128) [4 warps x 2 query rows],
// shared_mem (dynamic) = 160 * head_dim + 128 bytes (41088 at head_dim 256):
//   K tile ATT_PF_KEYS x (head_dim + 2) halves (padded rows: conflict-free reads),
//   V tile ATT_PF_KEYS x head_dim halves, the block's scaled queries ATT_PF_ROWS x head_dim f32.
#define ATT_PF_KEYS 32
#define ATT_PF_RPW 2                           // query rows per warp
#define ATT_PF_ROWS (ATT_WARPS * ATT_PF_RPW)   // query rows per block
// bytes = 2*ATT_PF_KEYS*(head_dim+2) + 2*ATT_PF_KEYS*head_dim + 4*ATT_PF_ROWS*head_dim
//       = 160 * head_dim + 128

extern "C" __global__ void attn_prefill_f16(
        const float* __restrict__ q, const __half* __restrict__ K, const __half* __restrict__ V,
        float* __restrict__ out, int n_q, int q_pos0, int n_kv, int kv_pos0, int kv_base,
        int n_heads, int n_kv_heads, int head_dim, int window, float scale) {
    extern __shared__ __align__(16) unsigned char att_smem[];
    const int kstride = head_dim + 2;                       // padded: conflict-free row reads
    __half* Ks = reinterpret_cast<__half*>(att_smem);
    __half* Vs = Ks + ATT_PF_KEYS * kstride;
    float* Qs = reinterpret_cast<float*>(Vs + ATT_PF_KEYS * head_dim);   // 4-byte aligned
    const int h = blockIdx.y, g = h / (n_heads / n_kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int r0 = blockIdx.x * ATT_PF_ROWS;
    const int rows = min(ATT_PF_ROWS, n_q - r0);

    for (int k = threadIdx.x; k < ATT_PF_ROWS * head_dim; k += blockDim.x) {
        const int r = k / head_dim, d = k - r * head_dim;
        Qs[k] = r < rows ? q[((size_t)(r0 + r) * n_heads + h) * head_dim + d] * scale : 0.0f;
    }
    // key index range (relative to the cache) that any row of this block can see
    const int t_first = q_pos0 + r0, t_last = q_pos0 + r0 + rows - 1;
    int j_lo = 0;
    if (window > 0) j_lo = max(0, t_first - window + 1 - kv_pos0);
    const int j_hi = min(n_kv, t_last - kv_pos0 + 1);

    float m[ATT_PF_RPW], l[ATT_PF_RPW];
    float2 acc[ATT_PF_RPW][ATT_PER_LANE];
#pragma unroll
    for (int r = 0; r < ATT_PF_RPW; ++r) {
        m[r] = A2ATS_NEG_INF;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; ++i) acc[r][i] = make_float2(0.f, 0.f);
    }
    const size_t krow = (size_t)n_kv_heads * head_dim;
    const int hd2 = head_dim >> 1;
    for (int tile = j_lo; tile < j_hi; tile += ATT_PF_KEYS) {
        const int nk = min(ATT_PF_KEYS, j_hi - tile);
        __syncthreads();                                   // previous tile fully consumed
        for (int k = threadIdx.x; k < ATT_PF_KEYS * hd2; k += blockDim.x) {
            const int t = k / hd2, d = 2 * (k - t * hd2);
            __half2 kv2 = __floats2half2_rn(0.f, 0.f), vv2 = kv2;
            if (t < nk) {
                const size_t src = (size_t)(kv_base + tile + t) * krow + (size_t)g * head_dim + d;
                kv2 = *reinterpret_cast<const __half2*>(K + src);
                vv2 = *reinterpret_cast<const __half2*>(V + src);
            }
            *reinterpret_cast<__half2*>(Ks + t * kstride + d) = kv2;
            *reinterpret_cast<__half2*>(Vs + t * head_dim + d) = vv2;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < ATT_PF_RPW; ++r) {
            const int qr = warp * ATT_PF_RPW + r;           // warp-uniform
            if (qr >= rows) continue;
            const int t_pos = q_pos0 + r0 + qr;
            // lane = key of the tile
            const int kpos = kv_pos0 + tile + lane;
            const bool vis = lane < nk && kpos <= t_pos && (window <= 0 || t_pos - kpos < window);
            float sc = A2ATS_NEG_INF;
            if (vis) {
                const float* qs = Qs + qr * head_dim;
                const __half* ks = Ks + lane * kstride;
                float dot = 0.0f;
                for (int d = 0; d < head_dim; d += 2) {
                    const float2 kf = __half22float2(*reinterpret_cast<const __half2*>(ks + d));
                    dot += qs[d] * kf.x + qs[d + 1] * kf.y;
                }
                sc = dot;
            }
            const float tmax = warp_max(sc);
            if (tmax == A2ATS_NEG_INF) continue;            // nothing visible in this tile
            const float m_new = fmaxf(m[r], tmax);
            const float corr = __expf(m[r] - m_new);
            const float p = vis ? __expf(sc - m_new) : 0.0f;
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int i = 0; i < ATT_PER_LANE; ++i) { acc[r][i].x *= corr; acc[r][i].y *= corr; }
            for (int t = 0; t < nk; ++t) {
                const float pt = __shfl_sync(A2ATS_FULL_MASK, p, t);
                if (pt == 0.0f) continue;                   // warp-uniform (broadcast value)
                const __half* vs = Vs + t * head_dim;
#pragma unroll
                for (int i = 0; i < ATT_PER_LANE; ++i) {
                    const int d = 2 * lane + 64 * i;
                    if (d < head_dim) {
                        const float2 vf = __half22float2(*reinterpret_cast<const __half2*>(vs + d));
                        acc[r][i].x += pt * vf.x;
                        acc[r][i].y += pt * vf.y;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ATT_PF_RPW; ++r) {
        const int qr = warp * ATT_PF_RPW + r;
        if (qr >= rows) continue;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        float* o = out + ((size_t)(r0 + qr) * n_heads + h) * head_dim;
#pragma unroll
        for (int i = 0; i < ATT_PER_LANE; ++i) {
            const int d = 2 * lane + 64 * i;
            if (d < head_dim) { o[d] = acc[r][i].x * inv; o[d + 1] = acc[r][i].y * inv; }
        }
    }
}
