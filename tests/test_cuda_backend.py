"""The CUDA backend (a2ats_lite/backend/cuda/) without a GPU: CUDABackend(xp=numpy,
loader=ShimModule) runs the unmodified kernels (kernels/*.cu) on the CPU shim through the very
code paths it takes on a GPU (grids, argument types, strides, buffer layouts), and is compared
with the CPU backend (backend/cpu.py), method by method on random inputs and end to end through
Model.forward with quantized weights and f32 / f16 K/V caches; then every retrieval policy on
the GPU path (host store, device codes, LUT / top-K kernels, staging gather), admission by
device memory, and CUDA graphs of decode steps (replays equal eager steps bit for bit). The GPU-marked test runs the
default model with Runtime(device="cuda") (skipped without a GPU).

Tolerances (stated against the CPU backend on the same weights; the CPU runs its f32 paths):
  elementwise kernels (rms_norm, rope, gated, softcap)   rel 1e-5 of the largest value
  matmul (matvec kernels, dequant tiles + matmul)        componentwise 1e-5 * (|x| @ |W|^T)
  embed                                                  bit-exact (get_rows dequantizes
                                                         exactly as the CPU)
  attention (f32 or f16 K/V)                             abs 2e-5 (outputs are O(1))
  end-to-end logits, f32 K/V                             max |diff| <= 1e-4 * max(1, max |logit|)
  end-to-end logits, f16 K/V                             max |diff| <= 5e-3 * max(1, max |logit|)
  (f16 K/V: a value computed 1e-7 apart in f32 may round to the other f16 neighbour, 2^-11
  relative, and the later layers carry that on: ~10 f16 ulps of room)
On the shim (g++ -O1, no FMA contraction, exact expf) the observed end-to-end error is 2e-6..2e-5
with f32 K/V and up to ~1e-3 (one flipped f16 rounding, then propagated) with f16 K/V.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from cuda_shim import ShimModule
from cuda_shim.shim import sanitizer

from a2ats_lite.backend.cpu import CPUBackend
from a2ats_lite.backend.cuda import CUDABackend, CudaMatrix
from a2ats_lite.errors import DeviceError, TokenizerError
from a2ats_lite.gguf import GGML_BLOCK
from a2ats_lite.kv import make_kv_cache
from a2ats_lite.model import Model
from a2ats_lite.rope import Rope

from test_model import ARCH_CONFIGS, random_arrays, tiny_config

TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8, "q4_k": 12, "q6_k": 14}


@pytest.fixture(scope="module")
def B():
    # small row grids: the dequant / get_rows kernels grid-stride over rows, and the shim runs
    # blocks one after another (~10 ms each)
    return CUDABackend(xp=np, loader=ShimModule, max_grid_rows=8, select_block=64, sparse="gpu")


@pytest.fixture
def C():
    return CPUBackend(native_retrieval=False)


def rand_raw(rng, t: str, n_out: int, n_in: int) -> np.ndarray:
    """Valid GGUF bytes of type t for an (n_out, n_in) matrix (F32: a float32 array)."""
    g = TYPES[t]
    x = (rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)).astype(np.float32)
    if t == "f32":
        return x
    if t == "f16":
        return x.astype(np.float16).view(np.uint8).reshape(-1)
    if t in ("q4_0", "q8_0"):
        import gguf.quants as gq
        return np.ascontiguousarray(gq.quantize(x, g), dtype=np.uint8).reshape(-1)
    # K types: gguf-py cannot quantize them: random blocks with sane f16 scales
    qk, bs = GGML_BLOCK[g]
    nb = n_in // qk
    raw = rng.integers(0, 256, (n_out, nb, bs), dtype=np.uint8)
    sc = (rng.uniform(1e-3, 4e-3, (n_out, nb)) * rng.choice([-1, 1], (n_out, nb))).astype(np.float16)
    if t == "q4_k":
        raw[:, :, 0:2] = sc.view(np.uint8).reshape(n_out, nb, 2)
        raw[:, :, 2:4] = np.abs(sc).view(np.uint8).reshape(n_out, nb, 2)
    else:
        raw[:, :, 208:210] = sc.view(np.uint8).reshape(n_out, nb, 2)
    return raw.reshape(-1)


def both(B, C, name, t, n_out, n_in, raw):
    return (B.matrix(name, TYPES[t], n_out, n_in, raw), C.matrix(name, TYPES[t], n_out, n_in, raw))


def close(got, ref, tol, what=""):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite outputs"
    err = np.abs(got - ref).max() if got.size else 0.0
    assert err <= tol, f"{what}: max abs err {err:.3g} > {tol:.3g}"
    return err


# ---- weights, matmul, embed ---------------------------------------------------------------------

@pytest.mark.parametrize("t,n_out,n_in", [("f32", 7, 40), ("f16", 5, 64), ("q4_0", 9, 64),
                                         ("q8_0", 6, 96), ("q4_k", 5, 256), ("q6_k", 3, 256)])
@pytest.mark.parametrize("n", [1, 3, 17])
def test_matmul(B, C, rng, t, n_out, n_in, n):
    wb, wc = both(B, C, "w", t, n_out, n_in, rand_raw(rng, t, n_out, n_in))
    assert isinstance(wb, CudaMatrix) and wb.shape == (n_out, n_in) and wb.nbytes == wc.nbytes
    x = rng.standard_normal((n, n_in)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    W = wc.dense().astype(np.float64)
    y = B.matmul(wb, x, B.vector(bias))
    ref = x.astype(np.float64) @ W.T + bias
    bound = np.abs(x.astype(np.float64)) @ np.abs(W).T + np.abs(bias)
    err = np.abs(y - ref) / bound
    assert y.dtype == np.float32 and y.shape == (n, n_out)
    assert err.max() <= 1e-5, f"{t} n={n}: componentwise err {err.max():.2e}"
    C.keep_f32(wc, True)        # the CPU's f32 path (its decode path quantizes x to int8)
    close(y, C.matmul(wc, x, bias), 1e-5 * np.abs(ref).max(), "vs CPU backend")


def test_matmul_many_rows_slices(B, C, rng, monkeypatch):
    # the output-row slicing of the dequant path (a slice smaller than n_out)
    import a2ats_lite.backend.cuda.dense as cu
    monkeypatch.setattr(cu, "OUT_SLICE_ROWS", 4)
    wb, wc = both(B, C, "w", "q8_0", 11, 64, rand_raw(rng, "q8_0", 11, 64))
    x = rng.standard_normal((20, 64)).astype(np.float32)
    close(B.matmul(wb, x), x.astype(np.float64) @ wc.dense().astype(np.float64).T, 1e-5)


def test_matrix_from_array_and_vector(B, rng):
    a = rng.standard_normal((4, 8)).astype(np.float32)
    m = B.matrix_from_array("a", a)
    assert m.ggml_type == 0 and m.shape == (4, 8) and B.matrix_from_array("a", m) is m
    assert m.f32_nbytes == 128 and m.read_bytes == 128
    assert not B.caps.f32_cache and not hasattr(B, "keep_f32")      # a CPU notion
    v = B.vector([1, 2, 3])
    assert v.dtype == np.float32 and v.shape == (3,)
    with pytest.raises(DeviceError, match="ggml type 10"):
        B.matrix("x", 10, 2, 256, np.zeros(2 * 84, np.uint8))


@pytest.mark.parametrize("t", ["f32", "q8_0", "q4_k"])
def test_embed(B, C, rng, t):
    n_in = 256 if t == "q4_k" else 32
    wb, wc = both(B, C, "e", t, 13, n_in, rand_raw(rng, t, 13, n_in))
    ids = rng.integers(0, 13, 9)
    for scale in (1.0, math.sqrt(n_in)):
        got = B.embed(wb, ids, scale)
        ref = C.embed(wc, ids, scale)
        assert got.dtype == np.float32 and np.array_equal(got, ref)
    with pytest.raises(TokenizerError, match="token id 13 out of range"):
        B.embed(wb, np.array([1, 13]), 1.0)
    with pytest.raises(TokenizerError, match="-1"):
        B.embed(wb, np.array([-1]), 1.0)


# ---- elementwise ----------------------------------------------------------------------------------

def test_rms_norm(B, C, rng):
    for shape in [(5, 40), (3, 4, 8), (2, 300)]:
        x = (rng.standard_normal(shape) * 3).astype(np.float32)
        w = (1 + 0.3 * rng.standard_normal(shape[-1])).astype(np.float32)
        ref = C.rms_norm(x, w, 1e-6)
        close(B.rms_norm(x, B.vector(w), 1e-6), ref, 1e-5 * np.abs(ref).max(), str(shape))


@pytest.mark.parametrize("pairing", ["adjacent", "half"])
@pytest.mark.parametrize("n_rot", [None, 4])
def test_rope(B, C, rng, pairing, n_rot):
    rope = Rope(head_dim=8, base=10000.0, pairing=pairing, n_rot=n_rot, freq_scale=0.5)
    x = rng.standard_normal((6, 3, 8)).astype(np.float32)
    keep = x.copy()
    pos = np.array([0, 1, 2, 57, 300, 4095])
    got = B.rope(x, pos, rope)
    assert got is not x and np.array_equal(x, keep), "rope must return a new array"
    close(got, C.rope(x, pos, rope), 2e-5, f"{pairing} n_rot={n_rot}")
    close(B.rope(x, pos, rope), got, 0.0, "cached inv_freq table")


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_gated(B, C, rng, act):
    g = (rng.standard_normal((5, 48)) * 4).astype(np.float32)
    u = rng.standard_normal((5, 48)).astype(np.float32)
    ref = C.gated(g.copy(), u, act)
    gb = g.copy()
    got = B.gated(gb, u, act)
    assert got is gb, "gated works in place on gate"
    close(got, ref, 1e-5 * np.abs(ref).max(), act)


def test_softcap_add_scale_take_rows(B, C, rng):
    x = (rng.standard_normal((4, 97)) * 20).astype(np.float32)
    close(B.softcap(x, 5.0), C.softcap(x, 5.0), 5e-6 * 5, "softcap")
    y = rng.standard_normal((4, 97)).astype(np.float32)
    a = x.copy()
    assert B.add(a, y) is a and np.array_equal(a, x + y)
    assert np.array_equal(B.scale(x, 0.25), C.scale(x, 0.25))
    assert np.array_equal(B.take_rows(x, np.array([3, 0, 3])), x[[3, 0, 3]])


def test_argmax(B, rng):
    lg = rng.standard_normal((3, 9000)).astype(np.float32)
    lg[1, 4097] = 50.0
    lg[2, 17] = lg[2, 8999] = 60.0          # tie: the first index wins (numpy.argmax)
    got = B.argmax(lg)
    assert got.tolist() == np.argmax(lg, axis=1).tolist() == [int(np.argmax(lg[0])), 4097, 17]
    assert B.argmax(lg[0]).tolist() == [int(np.argmax(lg[0]))]


# ---- attention ------------------------------------------------------------------------------------

def cache_views(rng, G, T, d, cap, kt, vt):
    """K, V (G, T, d) as LayerBuffer hands them out: views [:, :T] of (G, cap, d) buffers."""
    K = np.full((G, cap, d), np.nan, dtype=kt)
    V = np.full((G, cap, d), np.nan, dtype=vt)
    K[:, :T] = rng.standard_normal((G, T, d))
    V[:, :T] = rng.standard_normal((G, T, d))
    return K[:, :T], V[:, :T]


KV_TYPES = [(np.float32, np.float32), (np.float16, np.float16), (np.float16, np.float32)]


@pytest.mark.parametrize("kt,vt", KV_TYPES)
@pytest.mark.parametrize("H,G,d,n,k_pos0,window", [
    (4, 2, 8, 11, 0, None),          # GQA, one sequence's whole prefill
    (4, 1, 12, 5, 3, 4),             # window, keys dropped before k_pos0, odd-ish head_dim
    (2, 2, 40, 9, 0, 3),             # head_dim > 32 (two dims per lane)
    (2, 1, 256, 9, 0, None),         # head_dim 256 (gemma3-270m): f32 tiles need > 48 KiB smem
])
def test_attention_prefill(B, C, rng, kt, vt, H, G, d, n, k_pos0, window):
    T = 30
    K, V = cache_views(rng, G, T, d, T + 5, kt, vt)
    q = rng.standard_normal((n, H, d)).astype(np.float32)
    q_pos = np.arange(k_pos0 + T - n, k_pos0 + T)       # the chunk's own keys are the last ones
    scale = d ** -0.5
    ref = C.attention(q, K, V, q_pos, k_pos0, window, scale)
    close(B.attention(q, K, V, q_pos, k_pos0, window, scale), ref, 2e-5)


@pytest.mark.parametrize("kt,vt", KV_TYPES)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("split", [None, 3, 64])
def test_attention_decode(kt, vt, C, rng, window, split):
    B = CUDABackend(xp=np, loader=ShimModule, decode_split_len=split)
    H, G, d, T, k_pos0 = 6, 2, 16, 21, 5
    K, V = cache_views(rng, G, T, d, 32, kt, vt)
    q = rng.standard_normal((1, H, d)).astype(np.float32)
    for p in (k_pos0, k_pos0 + 9, k_pos0 + T - 1):
        Kp, Vp = K[:, :p - k_pos0 + 1], V[:, :p - k_pos0 + 1]
        ref = C.attention(q, Kp, Vp, [p], k_pos0, window, 0.3)
        close(B.attention(q, Kp, Vp, [p], k_pos0, window, 0.3), ref, 2e-5, f"p={p}")


@pytest.mark.parametrize("kt,vt", KV_TYPES)
def test_attention_decode_head_dim_256(B, C, rng, kt, vt):
    K, V = cache_views(rng, 1, 70, 256, 80, kt, vt)
    q = rng.standard_normal((1, 2, 256)).astype(np.float32)
    for window in (None, 50):
        ref = C.attention(q, K, V, [69], 0, window, 1 / 16)
        close(B.attention(q, K, V, [69], 0, window, 1 / 16), ref, 2e-5, f"window={window}")


@pytest.mark.parametrize("split", [None, 3])
@pytest.mark.parametrize("kt,vt", [(np.float16, np.float16), (np.float32, np.float16)])
def test_decode_attention_batched(C, rng, split, kt, vt):
    # one launch for 3 sequences of different lengths, buffers and first positions
    B = CUDABackend(xp=np, loader=ShimModule, decode_split_len=split)
    G, g, d, window = 2, 2, 8, 5
    bufs, pos = [], []
    for T, cap, pos0 in ((7, 9, 0), (12, 16, 4), (1, 4, 0)):
        K, V = cache_views(rng, G, T, d, cap, kt, vt)
        bufs.append((K.base if K.base is not None else K, V.base if V.base is not None else V,
                     pos0, T))
        pos.append(pos0 + T - 1)
    q = rng.standard_normal((3, G, g, d)).astype(np.float32)
    for w in (None, window):
        ref = C.decode_attention(q, bufs, np.array(pos), w, 0.35)
        close(B.decode_attention(q, bufs, np.array(pos), w, 0.35), ref, 2e-5, f"window={w}")


def test_attention_errors(B):
    K = np.zeros((1, 4, 8), np.float32)
    q = np.zeros((2, 2, 8), np.float32)
    with pytest.raises(ValueError, match="no keys"):
        B.attention(q, K, K, [4, 5], 0, None, 1.0)       # position 5 is not cached


# ---- retrieval, memory, wiring ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_sparse_attention_host_rows(B, rng, dtype):
    """Selected rows of host stores (different capacities per sequence, empty and full
    selections, GQA) gathered to staging and attended by the decode kernel, against the
    CPU's fused native kernel."""
    S, G, g, d = 3, 2, 4, 40
    caps = (70, 9, 130)
    keys = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    vals = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    kmax = 80
    idx = np.full((S, G, kmax), -1, np.int64)
    lens = np.zeros((S, G), np.int32)
    for s, n in enumerate([(1, 65), (0, 9), (80, 33)]):
        for k in range(G):
            idx[s, k, :n[k]] = np.sort(rng.choice(caps[s], n[k], replace=False))
            lens[s, k] = n[k]
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    got = B.sparse_attention(q, keys, vals, idx, lens, 0.2)
    ref = CPUBackend().sparse_attention(q, keys, vals, idx, lens, 0.2)
    close(got, ref, 2e-5, "sparse attention")
    assert (got[1, 0] == 0).all()          # an empty selection gives zeros, as on the CPU
    host = CUDABackend(xp=np, loader=ShimModule, sparse="host")
    close(host.sparse_attention(q, keys, vals, idx, lens, 0.2), ref, 1e-6, "host sparse attention")


class _NoMemory:
    """numpy, except that every allocation fails (as cupy's OutOfMemoryError would)."""
    def __getattr__(self, name):
        return getattr(np, name)

    def empty(self, shape, dtype=None):
        raise MemoryError("out of memory")


def test_memory():
    b = CUDABackend(xp=np, loader=ShimModule)
    assert b.memory_info() is None          # shim mode: numpy arrays
    b.xp = _NoMemory()
    with pytest.raises(DeviceError, match=r"GPU out of memory: .* needs 4096 more bytes.*context size"):
        b.empty((8, 128), np.float32)


def test_get_backend_cuda_reports_missing_gpu():
    pytest.importorskip("cupy")
    from conftest import _has_gpu
    if _has_gpu():
        pytest.skip("a CUDA GPU is present")
    from a2ats_lite.backend import get_backend
    with pytest.raises(DeviceError, match="device 'cuda': no") as ei:
        get_backend("cuda")
    assert "\n" not in str(ei.value)


# ---- end to end: Model.forward on the shim == the CPU backend -------------------------------------

def quantized_arrays(c, a, rng, backend, types: dict) -> dict:
    """arrays with the matrices named in types (suffix -> ggml type name) replaced by the
    backend's handles of their GGUF bytes (random blocks for the K types)."""
    out = dict(a)
    raws = {}
    for name, arr in a.items():
        if arr.ndim != 2:
            continue
        t = next((t for suffix, t in types.items() if name.endswith(suffix)), None)
        if t is None:
            continue
        n_out, n_in = arr.shape
        if t in ("q4_0", "q8_0"):
            import gguf.quants as gq
            raw = np.ascontiguousarray(gq.quantize(arr, TYPES[t]), dtype=np.uint8).reshape(-1)
        elif t == "f16":
            raw = arr.astype(np.float16).view(np.uint8).reshape(-1)
        else:
            raw = rand_raw(rng, t, n_out, n_in)
        raws[name] = (t, raw)
        out[name] = backend.matrix(name, TYPES[t], n_out, n_in, raw)
    return out, raws


E2E = {
    # untied output (F32), adjacent RoPE, softcap, SiLU; Q8_0 attention, Q4_0 gate/up, Q4_K down
    "llama": (dict(n_layer=2, n_ff=256, **ARCH_CONFIGS["llama"]),
              {"attn_q.weight": "q8_0", "attn_k.weight": "q8_0", "attn_v.weight": "q8_0",
               "attn_output.weight": "q4_0", "ffn_gate.weight": "q4_0", "ffn_up.weight": "q4_0",
               "ffn_down.weight": "q4_k"}),
    # tied Q8_0 embeddings, half RoPE, sliding window 5, q/k norms, post norms, GELU
    "gemma3": (dict(n_layer=3, n_ff=256),
               {"token_embd.weight": "q8_0", "attn_q.weight": "q4_0", "attn_k.weight": "q4_0",
                "attn_v.weight": "q8_0", "attn_output.weight": "f16", "ffn_gate.weight": "q8_0",
                "ffn_up.weight": "q4_0", "ffn_down.weight": "q4_k"}),
}
E2E_CASES = [("llama", "f32", None), ("llama", "f16", None), ("gemma3", "f32", None),
             ("gemma3", "f16", None), ("gemma3", "f16", "f32")]
if sanitizer():         # make cuda-san: one case (each launch is far slower there)
    E2E_CASES = [("gemma3", "f16", None)]


def run_model(c, arrays, backend, cache, cache_v, prompt, n_batch, decode):
    m = Model.from_arrays(c, arrays, n_batch=n_batch, backend=backend)
    kv = make_kv_cache("dense", m.attn_layers, 64, backend=backend, cache_type=cache,
                       cache_type_v=cache_v, initial=8)     # initial 8: the buffers grow
    s = kv.add_sequence()
    out = [m.forward([prompt], [s], kv, logits="all")[0]]
    for t in decode:
        out.append(m.forward([np.array([t])], [s], kv)[0][None])
    return np.concatenate(out), kv, s


@pytest.mark.parametrize("arch,cache,cache_v", E2E_CASES)
def test_model_forward_matches_cpu(B, rng, arch, cache, cache_v):
    kw, types = E2E[arch]
    c = tiny_config(arch, **kw)
    a = random_arrays(c, 7)
    arrays_b, raws = quantized_arrays(c, a, rng, B, types)
    # mixed K/V types: CPUBackend.decode_attention's native path rejects them (values must
    # have the keys' dtype), so the CPU reference takes its numpy path there
    # (and under make cuda-san: the native library's thread pool is not TSan-instrumented)
    C = CPUBackend(native_retrieval=(cache_v is None or cache_v == cache) and not sanitizer())
    arrays_c = dict(a)
    for name, (t, raw) in raws.items():
        arrays_c[name] = C.matrix(name, TYPES[t], *a[name].shape, raw)
    prompt = (np.arange(20) * 37 + 5) % c.n_vocab
    decode = [3, 50, 96]
    # n_batch 17: a 17-row chunk (dequant tiles + matmul, 3 prefill row blocks), then 3 rows
    # (matvec v4), then 3 single-row decode steps (matvec v1, flash decoding)
    got, kv, s = run_model(c, arrays_b, B, cache, cache_v, prompt, 17, decode)
    ref, _, _ = run_model(c, arrays_c, C, cache, cache_v, prompt, 17, decode)
    assert got.shape == (len(prompt) + len(decode), c.n_vocab)
    # the cache lives in the backend's arrays and grew by slicing / assignment
    K, V, pos0 = kv.view(0, s)
    assert K.dtype == np.dtype(np.float16 if cache == "f16" else np.float32)
    assert V.dtype == np.dtype(np.float16 if (cache_v or cache) == "f16" else np.float32)
    assert K.shape[1] == len(prompt) + len(decode) - pos0
    tol = (5e-3 if "f16" in (cache, cache_v) else 1e-4) * max(1.0, float(np.abs(ref).max()))
    err = close(got, ref, tol, f"{arch} K/V {cache}/{cache_v or cache}")
    print(f"{arch} {cache}/{cache_v or cache}: max |logit diff| {err:.2e} (max |logit| "
          f"{np.abs(ref).max():.2f})")
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9


# ---- on a GPU -------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_default_model_greedy_gpu_vs_cpu(default_model):
    from a2ats_lite.runtime import Runtime

    def greedy(rt, ids, n=16):
        seq = rt.kv.add_sequence()
        logits = rt.model.forward([np.asarray(ids)], [seq], rt.kv)[0]
        toks, steps = [], []
        for _ in range(n):
            t = int(np.argmax(logits))
            toks.append(t)
            steps.append(logits)
            logits = rt.model.forward([np.array([t])], [seq], rt.kv)[0]
        rt.kv.remove_sequence(seq)
        return toks, steps

    cpu = Runtime(default_model, device="cpu", n_ctx=512)
    gpu = Runtime(default_model, device="cuda", n_ctx=512)
    assert gpu.backend.name == "cuda" and gpu.backend.memory_info()[1] > 0
    ids = cpu.tokenize("The capital of France is")
    t_cpu, l_cpu = greedy(cpu, ids)
    t_gpu, l_gpu = greedy(gpu, ids)
    # the GPU's own argmax kernel agrees with numpy on its logits
    assert gpu.backend.argmax(l_gpu[0][None]).tolist() == [int(np.argmax(l_gpu[0]))]
    scale = float(np.abs(l_cpu[0]).max())
    # the CPU quantizes activations to int8 (~1e-3..1e-2 relative): a loose first-step check
    assert np.abs(l_gpu[0] - l_cpu[0]).max() <= 5e-2 * scale
    if t_cpu != t_gpu:
        i = next(j for j in range(len(t_cpu)) if t_cpu[j] != t_gpu[j])
        lc = l_cpu[i]
        gap = abs(float(lc[t_cpu[i]]) - float(lc[t_gpu[i]]))
        assert gap <= 0.02 * scale, (f"first divergence at token {i}: cpu {t_cpu[i]} vs gpu "
                                     f"{t_gpu[i]}, CPU logit gap {gap:.3f} is not a near-tie")


def test_from_gguf_synth(B, tmp_path):
    """Model.from_gguf on the CUDA backend (raw GGUF bytes of the mmap uploaded as they are)
    == the CPU backend's f32 path, on the synthetic 'tiny' llama GGUF (bench/make_synth_gguf)."""
    import importlib.util
    import sys
    from pathlib import Path
    from a2ats_lite.gguf import GGUFFile
    path = Path(__file__).resolve().parent.parent / "bench" / "make_synth_gguf.py"
    spec = importlib.util.spec_from_file_location("make_synth_gguf", path)
    synth = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, synth)
    spec.loader.exec_module(synth)
    f_path = tmp_path / "tiny.gguf"
    synth.write_synth_gguf(f_path, "tiny", "q8_0", n_ctx=256, n_vocab=300)
    f = GGUFFile(f_path)
    prompt = np.arange(3, 8)
    out = {}
    for be, f32 in ((CPUBackend(native_retrieval=not sanitizer()), True), (B, False)):
        m = Model.from_gguf(f, n_batch=16, f32_layers=f32, backend=be)
        kv = make_kv_cache("dense", m.attn_layers, 64, backend=be, cache_type="f16")
        s = kv.add_sequence()
        rows = [m.forward([prompt], [s], kv, logits="all")[0]]
        rows.append(m.forward([np.array([7])], [s], kv)[0][None])
        out[be.name] = np.concatenate(rows)
    assert isinstance(m.w.layers[0].attn_q, CudaMatrix) and m.w.layers[0].attn_q.ggml_type == 8
    ref = out["cpu"]
    close(out["cuda"], ref, 5e-3 * max(1.0, float(np.abs(ref).max())), "synthetic GGUF")


# ---- retrieval policies end to end on the shim ----------------------------------------------------

def tiny_calibration(layers, kind_L: bool, seed=0, n_centroids=16, M=1):
    """Random codebooks for every full-attention layer (a2ats: a random Cholesky-like L)."""
    from a2ats_lite.vq import Calibration, Codebook
    rng = np.random.default_rng(seed)
    books = {}
    for L in layers:
        if L.window is not None:
            continue
        d = L.head_dim
        for g in range(L.n_kv_heads):
            Lm = (np.eye(d) + 0.1 * np.tril(rng.standard_normal((d, d)), -1)).astype(np.float32) \
                if kind_L else np.eye(d, dtype=np.float32)
            if M == 1:
                books[(L.index, g)] = Codebook(rng.standard_normal((n_centroids, d)).astype(np.float32), Lm)
            else:
                books[(L.index, g)] = Codebook(None, Lm, rng.standard_normal((M, n_centroids, d // M))
                                               .astype(np.float32))
    return Calibration(params={"b": 2048, "w": 8, "s": 2, "n_centroids": n_centroids},
                       fingerprint="", a2ats=books, vq=dict(books))


class Selections:
    """on_select observer: every decode selection, in order."""
    def __init__(self):
        self.seen = []

    def on_select(self, layer, seq, pos, q_rot, sel):
        self.seen.append((layer, seq, pos, [np.asarray(x).tolist() for x in sel]))


def run_policy(c, arrays, backend, policy, params, prompts, decode, cache="f16"):
    """Prefill every prompt (one sequence each), then decode steps of all sequences together;
    -> (logits of the decode steps (steps, S, V), the selections seen)."""
    m = Model.from_arrays(c, arrays, n_batch=64, backend=backend)
    kv = make_kv_cache(policy, m.attn_layers, 96, backend=backend, cache_type=cache, initial=8,
                       **params)
    obs = Selections()
    kv.observers.append(obs)
    seqs = [kv.add_sequence() for _ in prompts]
    for s, p in zip(seqs, prompts):
        m.forward([p], [s], kv)
    out = []
    for t in decode:
        toks = [np.array([(t + 7 * i) % c.n_vocab]) for i in range(len(seqs))]
        out.append(np.stack([r[0] for r in m.forward(toks, seqs, kv)]))
    kv.close()
    return np.stack(out), obs.seen


RETRIEVAL_CASES = ["a2ats", "a2ats-pq", "vq", "oracle", "wrope", "quest", "window"]
if sanitizer():         # make cuda-san: the kernels' own tests cover the rest
    RETRIEVAL_CASES = ["a2ats-pq"]


def tiny_llama():
    c = tiny_config("llama", n_layer=2, n_ff=128, **{k: v for k, v in ARCH_CONFIGS["llama"].items()
                                                    if k != "n_ff"})
    return c, random_arrays(c, 11)


@pytest.mark.parametrize("policy", RETRIEVAL_CASES)
def test_retrieval_policy_matches_cpu(B, rng, policy):
    """A retrieval policy on the CUDA backend (shim): host store, codes assigned on the device,
    LUT + top-K select kernels (a2ats, vq; a2ats-pq: 2 product subspaces + exact re-rank),
    staging gather and attention give the CPU backend's selections and logits, for sequences
    of different lengths decoded together."""
    c, a = tiny_llama()
    params = dict(budget=4, sinks=2, window=4)
    if policy.startswith("a2ats") or policy == "vq":
        pq = policy == "a2ats-pq"
        layers = Model.from_arrays(c, a, backend=C_CPU).attn_layers
        params["calib"] = tiny_calibration(layers, True, M=2 if pq else 1)
        if pq:
            params["rerank"] = 2
        policy = policy.split("-")[0]
    prompts = [(np.arange(n) * 37 + 5) % c.n_vocab for n in (40, 23)]
    got, sel_b = run_policy(c, a, B, policy, params, prompts, [3, 50, 96])
    ref, sel_c = run_policy(c, a, C_CPU, policy, params, prompts, [3, 50, 96])
    assert sel_b == sel_c
    assert any(len(x) < pos + 1 for _, _, pos, sel in sel_c for x in sel)   # it did select
    close(got, ref, 5e-3 * max(1.0, float(np.abs(ref).max())), policy)


def test_a2ats_full_budget_equals_dense(B):
    """A budget covering the whole context selects every position: a2ats on the GPU path
    (host store, staging gather, sparse attention) gives the dense cache's logits."""
    c, a = tiny_llama()
    layers = Model.from_arrays(c, a, backend=C_CPU).attn_layers
    prompts = [(np.arange(n) * 37 + 5) % c.n_vocab for n in (30, 17)]
    got, sel = run_policy(c, a, B, "a2ats", dict(budget=1000, sinks=2, window=4,
                                                 calib=tiny_calibration(layers, True)),
                          prompts, [3, 50])
    ref, _ = run_policy(c, a, B, "dense", {}, prompts, [3, 50])
    assert all(x == list(range(pos + 1)) for _, _, pos, s in sel for x in s)
    close(got, ref, 1e-4 * max(1.0, float(np.abs(ref).max())), "a2ats full budget vs dense")


def test_row_cache_decode_equals_uncached(B):
    """a2ats decode through the GPU row caches (backend/cuda/rowcache.py) gives the logits of
    the path that gathers every selected row every step, bit for bit, across consecutive
    steps, a truncation (prefix reuse) and a removed sequence, and fetches fewer rows; the
    caches are counted in the sequence's device bytes and freed with it."""
    c, a = tiny_llama()
    layers = Model.from_arrays(c, a, backend=C_CPU).attn_layers
    calib = tiny_calibration(layers, True)
    prompts = [(np.arange(n) * 37 + 5) % c.n_vocab for n in (40, 23)]

    def run(backend):
        backend.fetch_stats.update(selected=0, fetched=0)
        m = Model.from_arrays(c, a, n_batch=64, backend=backend)
        kv = make_kv_cache("a2ats", m.attn_layers, 96, backend=backend, cache_type="f16",
                           initial=8, budget=4, sinks=2, window=4, calib=calib)
        seqs = [kv.add_sequence() for _ in prompts]
        for s, p in zip(seqs, prompts):
            m.forward([p], [s], kv)
        out = []
        for step in range(8):
            if step == 4:                    # back to 38 tokens: rows past it will be rewritten
                kv.truncate(seqs[0], 38)
            toks = [np.array([(11 * step + 7 * i) % c.n_vocab]) for i in range(len(seqs))]
            out.append(np.stack([r[0] for r in m.forward(toks, seqs, kv)]))
        held = kv.budget_bytes(seqs[0])
        rows = [kv._row_bytes(s) for s in seqs]
        kv.remove_sequence(seqs[0])
        return np.stack(out), held, kv, rows
    got, held, kv, rows = run(B)
    plain = CUDABackend(xp=np, loader=ShimModule, max_grid_rows=8, select_block=64, row_cache=0,
                        sparse="gpu")
    want, held0, _, _ = run(plain)
    np.testing.assert_array_equal(got, want)
    st, st0 = B.fetch_stats, plain.fetch_stats
    assert st["selected"] == st0["selected"] == st0["fetched"] > 0
    assert st["fetched"] < 0.5 * st["selected"]
    assert held > held0                      # the caches are device memory of the sequence
    assert min(rows) > 0 and kv._row_bytes(0) == 0 and kv._row_bytes(None) == rows[1]
    assert kv.estimate_bytes(96) > make_kv_cache(
        "a2ats", layers, 96, backend=plain, budget=4, sinks=2, window=4, calib=calib).estimate_bytes(96)


C_CPU = CPUBackend(native_retrieval=not sanitizer())   # (the native pool is not TSan-instrumented)


def ids_tokenizer():
    """What the engine needs of a tokenizer for a model without one: no end-of-generation
    ids, token ids as text."""
    from types import SimpleNamespace
    return SimpleNamespace(eog_ids=set(), decode=lambda ids: " ".join(map(str, ids)))


def test_engine_admits_by_device_memory(B):
    """On a GPU the engine's budget is device memory (free less a reserve), and a retrieval
    policy counts only what it keeps there (codes; window layers), not its host store: under
    one budget a2ats admits several sequences where dense admits one, and a request that can
    never fit gets one clear error naming GPU memory and what to lower."""
    from types import SimpleNamespace
    from a2ats_lite.engine import Engine
    from a2ats_lite.errors import CapacityError
    from a2ats_lite.runtime import GPU_RESERVE, device_kv_budget
    from a2ats_lite.sampling import SamplingParams

    fake = SimpleNamespace(memory_info=lambda: (20 * 2**30, 80 * 2**30))
    assert device_kv_budget(fake) == 20 * 2**30 - max(GPU_RESERVE, 8 * 2**30)
    assert device_kv_budget(C_CPU) is None
    c, a = tiny_llama()
    m = Model.from_arrays(c, a, n_batch=64, backend=B)
    n_ctx = 4096
    dense = make_kv_cache("dense", m.attn_layers, n_ctx, backend=B)
    coded = make_kv_cache("a2ats", m.attn_layers, n_ctx, backend=B,
                          calib=tiny_calibration(m.attn_layers, True))
    per_dense, per_coded = dense.estimate_bytes(n_ctx), coded.estimate_bytes(n_ctx)
    assert per_coded * 4 <= per_dense          # 2-byte codes vs f16 K and V rows
    budget = per_dense + per_dense // 2
    tok = ids_tokenizer()
    for kv, want in ((dense, 1), (coded, 4)):
        eng = Engine(m, kv, tok, max_seqs=8, kv_budget=budget)
        for _ in range(4):
            eng.add_request([1, 2, 3], SamplingParams(max_tokens=n_ctx, temperature=0))
        eng.step()
        assert len(eng.scheduler.running) == want, kv.name
        eng.close()
    eng = Engine(m, dense, tok, kv_budget=per_dense // 2)
    with pytest.raises(CapacityError, match="of GPU memory.*lower the context size"):
        eng.add_request([1, 2, 3], SamplingParams(max_tokens=n_ctx))


# ---- CUDA graphs of decode steps (backend/cuda/graphs.py) on the shim -------------------------------

def _graph_run(c, arrays, backend, steps):
    """Three sequences prefilled, decoded together; then one finishes, then a new one joins:
    the batch size goes 3 -> 2 -> 3 with another set of sequences. -> logits of every step."""
    m = Model.from_arrays(c, arrays, n_batch=64, backend=backend)
    kv = make_kv_cache("dense", m.attn_layers, 96, backend=backend, cache_type="f16", initial=8)
    seqs = [kv.add_sequence() for _ in range(3)]
    for s, n in zip(seqs, (13, 5, 22)):
        m.forward([(np.arange(n) * 31 + s) % c.n_vocab], [s], kv)
    out = []

    def decode(active, k):
        for t in range(k):
            toks = [np.array([(7 * t + 3 * s) % c.n_vocab]) for s in active]
            out.append(np.stack([r[0] for r in m.forward(toks, active, kv)]))
    decode(seqs, steps)
    kv.remove_sequence(seqs[1])
    decode([seqs[0], seqs[2]], 3)
    new = kv.add_sequence()
    m.forward([(np.arange(9) * 5) % c.n_vocab], [new], kv)
    decode([seqs[0], new, seqs[2]], 2)
    return out


@pytest.mark.skipif(bool(sanitizer()), reason="make cuda-san: minutes under the sanitizers; the graph "
                    "launches are the kernels' tested ones")
@pytest.mark.slow   # ~2 min on 2 cores (every CUDA thread of the shim is an OS thread): make test-slow
@pytest.mark.parametrize("arch", ["gemma3"])     # (llama's graphs: test_model_forward_matches_cpu)
def test_decode_graph_replays_equal_eager(rng, arch):
    """Decode steps replayed from a captured graph give exactly the eager steps' logits:
    sequences of different lengths, buffers that grow (initial 8 rows) and slide (gemma3's
    window), a batch that shrinks and one that changes members (a graph per batch size, its
    tables rewritten at every replay)."""
    kw, types = E2E[arch]
    c = tiny_config(arch, **kw)
    a = random_arrays(c, 5)
    opts = dict(xp=np, loader=ShimModule, max_grid_rows=8, decode_split_len=16)
    Bg, Be = CUDABackend(**opts), CUDABackend(graphs=False, **opts)
    arrays = quantized_arrays(c, a, rng, Bg, types)[0]     # (shim: one set of bytes serves both)
    got = _graph_run(c, arrays, Bg, 3)
    # per key: one eager warm-up step, one captured (and launched) step, then replays
    assert {k: g.replays for k, g in Bg._graphs.items()} == {("decode", 3, False): 1 + 2, ("decode", 2, False): 1}
    ref = _graph_run(c, arrays, Be, 3)
    assert not Be._graphs
    for i, (x, y) in enumerate(zip(got, ref)):
        np.testing.assert_array_equal(x, y, err_msg=f"step {i}")


def test_decode_graph_mismatch_falls_back_to_eager(rng):
    """A replay pass that would not launch what was captured (here: another split length)
    undoes its bookkeeping, runs the step eagerly and drops the graph; the logits are the
    eager backend's."""
    c, a = tiny_llama()
    outs = []
    for graphs in (True, False):
        B = CUDABackend(xp=np, loader=ShimModule, decode_split_len=16, graphs=graphs)
        m = Model.from_arrays(c, a, n_batch=64, backend=B)
        kv = make_kv_cache("dense", m.attn_layers, 64, backend=B, initial=8)
        s = kv.add_sequence()
        m.forward([np.arange(10) % c.n_vocab], [s], kv)
        out = []
        for t in range(5):
            if t == 3:
                B.decode_split_len = 32          # the captured launch no longer matches
            out.append(m.forward([np.array([t + 1])], [s], kv)[0])
            if graphs and t == 2:
                assert B._graphs[("decode", 1, False)].replays == 1
            if graphs and t == 3:
                assert ("decode", 1, False) not in B._graphs
        assert kv.length(s) == 15
        outs.append(out)
    for x, y in zip(*outs):
        np.testing.assert_array_equal(x, y)


def test_engine_greedy_tokens_chosen_in_the_graph():
    """Greedy requests: the engine asks the step for token ids, which the GPU path picks with
    its argmax kernels inside the captured graph (no logits copied); the tokens are those the
    sampler picks from the eager step's host logits."""
    from a2ats_lite.engine import Engine
    from a2ats_lite.sampling import SamplingParams
    c, a = tiny_llama()
    tok = ids_tokenizer()
    runs = []
    for graphs in (True, False):
        B = CUDABackend(xp=np, loader=ShimModule, decode_split_len=16, graphs=graphs)
        m = Model.from_arrays(c, a, n_batch=64, backend=B)
        kv = make_kv_cache("dense", m.attn_layers, 64, backend=B, initial=8)
        eng = Engine(m, kv, tok)
        # eager run: a presence penalty far below a float32 ulp of the logits changes no score
        # but makes the engine take the host sampler's path
        p = SamplingParams(temperature=0, max_tokens=6) if graphs else \
            SamplingParams(temperature=0, max_tokens=6, presence_penalty=1e-30)
        rids = [eng.add_request(list((np.arange(n) * 7 + 1) % c.n_vocab), p) for n in (9, 4)]
        out = {}
        while eng.has_unfinished():
            for o in eng.step():
                out.setdefault(o.rid, []).append(o.token)
        runs.append([out[r] for r in rids])
        if graphs:
            assert B._graphs[("decode", 2, True)].replays >= 2
    assert runs[0] == runs[1]
