// Rotary position embedding in place, matching a2ats_lite.rope.Rope (both pairings, partial
// rotary, any base / linear freq_scale / llama3 freq_factors folded into the inv_freq table).
//
// x: float32 rows of tokens, token t's heads at x + t * token_stride: head h, dim i at
//    x[t * token_stride + h * head_dim + i] (token_stride = n_heads * head_dim for a dense
//    (n, n_heads, head_dim) array; larger to rotate q or k inside a fused qkv row).
// pos: int32 (n_tokens,) positions. inv_freq: float32 (n_rot / 2,) = Rope.inv_freq() cast
//    to float32. n_rot: rotated dims (even, <= 512, <= head_dim); dims >= n_rot untouched.
// pairing: 0 = adjacent pairs (x[2j], x[2j+1]) (llama GGUF), 1 = half-split (x[j], x[j+n_rot/2]).
// The angle pos * inv_freq and its sine/cosine are computed in double precision (once per token
// and frequency, shared by the heads), so the only error left is the float32 inv_freq table and
// the float32 rotation itself.
//
// Launch: grid (n_tokens), block (128) (any multiple of 32; threads stride over heads x pairs).
// budget: rope_f32 registers<=40 smem<=2048

#define ROPE_MAX_HALF 256

extern "C" __global__ void rope_f32(float* __restrict__ x, const int* __restrict__ pos,
                                    const float* __restrict__ inv_freq, int n_heads, int head_dim,
                                    int token_stride, int n_rot, int pairing) {
    __shared__ float cs[ROPE_MAX_HALF];
    __shared__ float sn[ROPE_MAX_HALF];
    const int t = blockIdx.x;
    const int half = n_rot >> 1;
    const double p = (double)pos[t];
    for (int j = threadIdx.x; j < half; j += blockDim.x) {
        double s, c;
        sincos(p * (double)inv_freq[j], &s, &c);
        cs[j] = (float)c;
        sn[j] = (float)s;
    }
    __syncthreads();
    float* row = x + (size_t)t * token_stride;
    const int n = n_heads * half;
    for (int k = threadIdx.x; k < n; k += blockDim.x) {
        const int h = k / half, j = k - h * half;
        float* xh = row + (size_t)h * head_dim;
        const int i0 = pairing ? j : 2 * j;
        const int i1 = pairing ? j + half : 2 * j + 1;
        const float a = xh[i0], b = xh[i1], c = cs[j], s = sn[j];
        xh[i0] = a * c - b * s;
        xh[i1] = a * s + b * c;
    }
}
