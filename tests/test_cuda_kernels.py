"""The non-quantized CUDA kernels, run on the CPU through tests/cuda_shim, against float64
numpy references on fresh random inputs (seed printed; pin one with A2ATS_TEST_SEED=N).

Every output is NaN-poisoned before the launch, so an element a kernel forgets to write fails.
Sizes are small but odd on purpose: columns not a multiple of the block, partial warps and
partial blocks, context lengths 1/63/64/65 and longer than a split, both RoPE pairings and
partial rotary, sliding windows, GQA groups 1 and 4, sequences of different lengths in one
batched decode launch.

Error measure (stated per kernel below): max |got - ref| / max |ref| over the output
("normwise relative error"); exact equality where the kernel does no rounding beyond f32.

Under `make cuda-san` the same tests run with A2ATS_SHIM_SAN=thread and =address; the
test_sanitizer_* tests prove in a subprocess that the thread sanitizer reports a deleted
__syncthreads and that the address sanitizer reports an out-of-bounds read.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cuda_shim import shim_module
from cuda_shim.shim import sanitizer

ROOT = Path(__file__).resolve().parent.parent
NAN = np.float32("nan")

# normwise relative error limits (f32 kernels against float64 references)
TOL_RMSNORM = 2e-6
TOL_ROPE = 2e-6
TOL_ACT = 2e-6
TOL_ATTN = 2e-5     # f16 K/V are exact inputs; f32 dot/softmax/accumulate over <= 200 keys


def poisoned(shape, dtype=np.float32):
    return np.full(shape, NAN if np.dtype(dtype).kind == "f" else -1, dtype=dtype)


def rel_err(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape
    assert np.all(np.isfinite(got)), "non-finite output (unwritten element?)"
    scale = max(np.max(np.abs(ref)), 1e-30)
    return float(np.max(np.abs(got - ref)) / scale)


i32, f32 = np.int32, np.float32


# ---- rmsnorm ---------------------------------------------------------------------------------

def ref_rmsnorm(x, w, eps):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w.astype(np.float64)


@pytest.mark.parametrize("n_rows,n_cols,block", [(3, 1, 32), (2, 37, 64), (4, 300, 128), (2, 1000, 256)])
def test_rmsnorm(kmod, rng, n_rows, n_cols, block):
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32) * 3
    w = rng.standard_normal(n_cols).astype(np.float32)
    eps = 1e-6
    out = poisoned((n_rows, n_cols))
    kmod("rmsnorm").get_function("rmsnorm_f32")((n_rows,), (block,), (x, w, out, i32(n_cols), f32(eps)))
    assert rel_err(out, ref_rmsnorm(x, w, eps)) < TOL_RMSNORM


@pytest.mark.parametrize("n_rows,n_cols,block", [(3, 45, 64), (2, 640, 128)])
def test_add_rmsnorm(kmod, rng, n_rows, n_cols, block):
    x = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    r = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    w = (1 + rng.standard_normal(n_cols)).astype(np.float32)
    eps = 1e-5
    x_new = x + r                       # f32 addition: the kernel must match it exactly
    xk = x.copy()
    out = poisoned((n_rows, n_cols))
    kmod("rmsnorm").get_function("add_rmsnorm_f32")((n_rows,), (block,), (xk, r, w, out, i32(n_cols), f32(eps)))
    np.testing.assert_array_equal(xk, x_new)
    assert rel_err(out, ref_rmsnorm(x_new, w, eps)) < TOL_RMSNORM


# ---- rope ------------------------------------------------------------------------------------

def ref_inv_freq(rot, base, freq_scale, freq_factors):
    """float64 (rot/2,) inverse frequencies, as a2ats_lite.rope.Rope.inv_freq defines them."""
    f = base ** (-np.arange(0, rot, 2, dtype=np.float64) / rot)
    if freq_factors is not None:
        f = f / np.asarray(freq_factors, dtype=np.float64)
    return f * freq_scale


def runtime_rope(**kw):
    """The runtime's CPU Rope, or None if the module moved (the cross-check is then skipped)."""
    try:
        from a2ats_lite.rope import Rope
    except ImportError:
        return None
    return Rope(**kw)


def ref_rope(x, pos, inv_freq, n_rot, pairing):
    """float64 rotation of x (n, H, d) with the float32 inv_freq table the kernel gets."""
    x = x.astype(np.float64)
    out = x.copy()
    ang = pos.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    r = n_rot
    if pairing == "adjacent":
        a, b = x[..., 0:r:2], x[..., 1:r:2]
        out[..., 0:r:2], out[..., 1:r:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., : r // 2], x[..., r // 2: r]
        out[..., : r // 2], out[..., r // 2: r] = a * c - b * s, a * s + b * c
    return out


ROPE_CASES = [
    # n, heads, head_dim, n_rot, pairing, base, freq_scale, freq_factors, extra stride
    (5, 3, 64, None, "adjacent", 10000.0, 1.0, False, 0),
    (5, 3, 64, None, "half", 1e6, 1.0, False, 0),
    (3, 2, 80, 32, "half", 10000.0, 0.25, False, 0),       # partial rotary, linear scaling
    (4, 5, 96, 64, "adjacent", 500000.0, 1.0, True, 0),    # llama3 freq factors, partial
    (3, 2, 128, None, "half", 10000.0, 1.0, False, 96),    # q inside a fused qkv row
]


@pytest.mark.parametrize("n,H,d,n_rot,pairing,base,fs,ff,extra", ROPE_CASES)
def test_rope(kmod, rng, n, H, d, n_rot, pairing, base, fs, ff, extra):
    rot = n_rot or d
    factors = tuple(rng.uniform(1.0, 8.0, rot // 2)) if ff else None
    inv_freq = ref_inv_freq(rot, base, fs, factors).astype(np.float32)
    rope = runtime_rope(head_dim=d, base=base, pairing=pairing, n_rot=n_rot, freq_scale=fs,
                        freq_factors=factors)
    if rope is not None:
        np.testing.assert_array_equal(rope.inv_freq().astype(np.float32), inv_freq)
    assert inv_freq.shape == (rot // 2,)
    pos = rng.integers(0, 5000, n).astype(np.int32)
    pos[0] = 0
    stride = H * d + extra
    buf = rng.standard_normal((n, stride)).astype(np.float32)
    x = buf[:, : H * d].reshape(n, H, d).copy()
    tail = buf[:, H * d:].copy()
    k = kmod("rope").get_function("rope_f32")
    k((n,), (128,), (buf, pos, inv_freq, i32(H), i32(d), i32(stride), i32(rot), i32(pairing == "half")))
    got = buf[:, : H * d].reshape(n, H, d)
    np.testing.assert_array_equal(got[..., rot:], x[..., rot:])           # unrotated dims untouched
    if extra:
        np.testing.assert_array_equal(buf[:, H * d:], tail)               # the rest of the row
    assert rel_err(got, ref_rope(x, pos, inv_freq, rot, pairing)) < TOL_ROPE
    # and the runtime's own CPU function (float64 inv_freq): only the table's rounding differs
    if rope is not None:
        assert rel_err(got, rope(x, pos)) < 1e-3


def test_rope_extra_columns_untouched(kmod, rng):
    n, H, d, extra = 3, 2, 64, 40
    stride = H * d + extra
    buf = rng.standard_normal((n, stride)).astype(np.float32)
    tail = buf[:, H * d:].copy()
    inv_freq = ref_inv_freq(d, 10000.0, 1.0, None).astype(np.float32)
    pos = np.arange(n, dtype=np.int32)
    kmod("rope").get_function("rope_f32")((n,), (64,), (buf, pos, inv_freq, i32(H), i32(d), i32(stride), i32(d), i32(1)))
    np.testing.assert_array_equal(buf[:, H * d:], tail)


# ---- gated activations, softcap --------------------------------------------------------------

def ref_silu(x):
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))


def ref_gelu_tanh(x):
    c = np.clip(x, -10, 10)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2 / math.pi) * (c + 0.044715 * c ** 3)))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("n_rows,n_cols,fused,grid", [(3, 333, False, 2), (2, 1000, True, 64), (1, 7, False, 1)])
def test_gated(kmod, rng, act, n_rows, n_cols, fused, grid):
    if fused:   # one [gate | up] row per token
        buf = (rng.standard_normal((n_rows, 2 * n_cols)) * 6).astype(np.float32)
        buf[0, :7] = [-30, -10.5, 0, 10.5, 30, 1e20, -1e20]   # beyond the clip: no overflow
        gate, up = buf, buf[:, n_cols:]
        g_stride = u_stride = 2 * n_cols
        g64, u64 = buf[:, :n_cols].astype(np.float64), buf[:, n_cols:].astype(np.float64)
    else:
        gate = (rng.standard_normal((n_rows, n_cols)) * 6).astype(np.float32)
        gate.flat[:3] = [-30, 0, 30][: gate.size]
        up = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        g_stride = u_stride = n_cols
        g64, u64 = gate.astype(np.float64), up.astype(np.float64)
    out = poisoned((n_rows, n_cols))
    k = kmod("act").get_function(f"gated_{act}_f32")
    k((grid,), (256,), (gate, up, out, i32(n_rows), i32(n_cols), i32(g_stride), i32(u_stride)))
    ref = (ref_silu(g64) if act == "silu" else ref_gelu_tanh(g64)) * u64
    assert rel_err(out, ref) < TOL_ACT
    # agrees with the runtime's CPU function
    ops = pytest.importorskip("a2ats_lite.ops")
    assert rel_err(out, ops.gated_(g64.astype(np.float32), u64.astype(np.float32), act)) < 1e-5


def test_gated_in_place(kmod, rng):
    n_rows, n_cols = 2, 100
    gate = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    up = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
    ref = ref_silu(gate.astype(np.float64)) * up
    # a block of 100 threads: a partial last warp (the kernel has no warp collectives)
    kmod("act").get_function("gated_silu_f32")((1,), (100,), (gate, up, gate, i32(n_rows), i32(n_cols), i32(n_cols), i32(n_cols)))
    assert rel_err(gate, ref) < TOL_ACT


@pytest.mark.parametrize("n,cap", [(1, 30.0), (1001, 50.0)])
def test_softcap(kmod, rng, n, cap):
    x = (rng.standard_normal(n) * 80).astype(np.float32)
    out = poisoned(n)
    kmod("act").get_function("softcap_f32")((3,), (128,), (x, out, np.int64(n), f32(cap)))
    ref = cap * np.tanh(x.astype(np.float64) / cap)
    assert rel_err(out, ref) < TOL_ACT


# ---- argmax ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_vocab,chunk", [(1, 256), (5003, 512), (700, 4096)])
def test_argmax(kmod, rng, n_vocab, chunk):
    rows = 4
    x = rng.standard_normal((rows, n_vocab)).astype(np.float32)
    if n_vocab > 10:
        x[1, [n_vocab - 3, 7, n_vocab // 2]] = 50.0     # ties: first index wins
        x[2, :] = 1.0                                   # all equal
        x[3, :] = -np.inf                               # nothing finite
        x[3, n_vocab - 1] = -1e30
    n_splits = -(-n_vocab // chunk)
    pv, pi = poisoned((rows, n_splits)), poisoned((rows, n_splits), np.int32)
    out = poisoned(rows, np.int32)
    m = kmod("argmax")
    m.get_function("argmax_partial_f32")((n_splits, rows), (256,), (x, i32(n_vocab), i32(chunk), pv, pi))
    m.get_function("argmax_final")((rows,), (64,), (pv, pi, i32(n_splits), out))
    np.testing.assert_array_equal(out, np.argmax(x, axis=1))


def test_argmax_all_neg_inf(kmod):
    x = np.full((1, 300), -np.inf, np.float32)
    pv, pi, out = poisoned((1, 3)), poisoned((1, 3), np.int32), poisoned(1, np.int32)
    m = kmod("argmax")
    m.get_function("argmax_partial_f32")((3, 1), (64,), (x, i32(300), i32(100), pv, pi))
    m.get_function("argmax_final")((1,), (32,), (pv, pi, i32(3), out))
    assert out[0] == 0


# ---- the shim's own argument checks ------------------------------------------------------------

def test_shim_rejects_bad_arguments():
    k = shim_module("rmsnorm").get_function("rmsnorm_f32")
    x = np.ones((1, 32), np.float32)
    out = poisoned((1, 32))
    with pytest.raises(TypeError, match="Python int"):
        k((1,), (32,), (x, x[0], out, 32, f32(1e-6)))
    with pytest.raises(TypeError, match="bytes"):
        k((1,), (32,), (x, x[0], out, np.int64(32), f32(1e-6)))
    with pytest.raises(TypeError, match="floating|integer"):
        k((1,), (32,), (x, x[0], out, f32(32), f32(1e-6)))
    with pytest.raises(TypeError, match="numpy array"):
        k((1,), (32,), (x, 0, out, i32(32), f32(1e-6)))
    with pytest.raises(TypeError, match="takes 5 arguments"):
        k((1,), (32,), (x, x[0], out, i32(32)))
    with pytest.raises(ValueError, match="1024"):
        k((1,), (2048,), (x, x[0], out, i32(32), f32(1e-6)))
    with pytest.raises(ValueError, match="shared_mem"):
        k((1,), (32,), (x, x[0], out, i32(32), f32(1e-6)), shared_mem=64 * 1024)
    assert np.all(np.isnan(out))


_SHIM_SELFTEST = r"""
extern "C" __global__ void selftest(const int* __restrict__ in, int* __restrict__ out,
                                    float* __restrict__ fsum, unsigned long long* __restrict__ usum,
                                    int* __restrict__ poison, int n_live) {
    extern __shared__ int dyn[];
    __shared__ int stat[64];
    const int t = threadIdx.x + blockDim.x * threadIdx.y;      // 2-D block
    const int lane = t & 31;
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    if (t == 0) poison[b] = dyn[5];                            // unwritten dynamic smem
    if (t == 1) poison[4 + b] = stat[9];                       // unwritten static smem
    __syncthreads();
    dyn[t] = in[t];
    stat[t] = 2 * in[t];
    __syncthreads();
    const int v = dyn[(t + 1) % 64] + stat[63 - t];
    int* o = out + (size_t)b * 64 * 6;
    o[t] = v;
    o[64 + t] = __shfl_down_sync(0xffffffffu, v, 3);
    o[128 + t] = __shfl_up_sync(0xffffffffu, v, 5);
    o[192 + t] = __shfl_sync(0xffffffffu, v, 7);
    o[256 + t] = (int)__ballot_sync(0xffffffffu, (v & 1) != 0);
    __syncwarp();
    o[320 + t] = __shfl_xor_sync(0xffffffffu, v, 9);
    atomicAdd(fsum, 0.5f);
    atomicAdd(usum, (unsigned long long)lane);
    if (t >= n_live) return;                                   // early return
    __syncthreads();                                           // the others still meet here
    atomicAdd(usum, 1000ull);
}
"""


def test_shim_selftest(kmod, rng):
    """The shim's CUDA model: 2-D blocks, 3-D grid, dynamic (poisoned) and static shared memory,
    every shuffle flavour, ballot, atomics, early return before a __syncthreads."""
    m = kmod(_SHIM_SELFTEST)
    k = m.get_function("selftest")
    grid = (2, 1, 2)
    n_blocks = 4
    inp = rng.integers(-1000, 1000, 64).astype(np.int32)
    out = np.full(n_blocks * 64 * 6, -7, np.int32)
    fsum, usum = np.zeros(1, np.float32), np.zeros(1, np.uint64)
    poison = np.zeros(2 * n_blocks, np.int32)
    n_live = 40
    k(grid, (32, 2), (inp, out, fsum, usum, poison, i32(n_live)), shared_mem=64 * 4)
    assert np.all(poison == -1)          # 0xFF bytes, dynamic and static, in every block
    v = np.array([inp[(t + 1) % 64] + 2 * inp[63 - t] for t in range(64)])
    lane = np.arange(64) % 32
    base = np.arange(64) - lane
    for b in range(n_blocks):
        o = out[b * 384:(b + 1) * 384].reshape(6, 64)
        np.testing.assert_array_equal(o[0], v)
        np.testing.assert_array_equal(o[1], v[np.where(lane + 3 < 32, np.arange(64) + 3, np.arange(64))])
        np.testing.assert_array_equal(o[2], v[np.where(lane >= 5, np.arange(64) - 5, np.arange(64))])
        np.testing.assert_array_equal(o[3], v[base + 7])
        bal = [sum(int(v[w * 32 + i] & 1) << i for i in range(32)) for w in range(2)]
        np.testing.assert_array_equal(o[4].astype(np.uint32), np.repeat(np.array(bal, np.uint32), 32))
        np.testing.assert_array_equal(o[5], v[base + (lane ^ 9)])
    assert fsum[0] == 0.5 * 64 * n_blocks
    assert usum[0] == n_blocks * (2 * sum(range(32)) + 1000 * n_live)


_FAIL_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
from cuda_shim import ShimModule
m = ShimModule(sys.stdin.read())
out = np.zeros(64, np.float32)
m.get_function("k")((1,), (64,), (out,))
print("FINISHED")
"""


def _run_shim_subprocess(body: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "A2ATS_SHIM_SAN")}
    env.update(env_extra)
    src = 'extern "C" __global__ void k(float* out) {\n' + body + "\n}\n"
    script = _FAIL_SCRIPT.format(tests=str(ROOT / "tests"), root=str(ROOT))
    return subprocess.run([sys.executable, "-c", script], input=src, capture_output=True,
                          text=True, env=env, timeout=120)


def test_shim_deadlock_fails_loudly():
    """Half a warp in __syncthreads, the other half in a full-mask shuffle: a deadlock (undefined
    on the GPU). The shim aborts with a message after $A2ATS_SHIM_TIMEOUT s instead of hanging."""
    r = _run_shim_subprocess("if (threadIdx.x < 16) __syncthreads();\n"
                             "else out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);",
                             {"A2ATS_SHIM_TIMEOUT": "3"})
    assert r.returncode != 0 and "FINISHED" not in r.stdout
    assert "deadlock" in r.stderr, r.stderr[-2000:]


def test_shim_partial_mask_fails_loudly():
    r = _run_shim_subprocess("out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1);", {})
    assert r.returncode != 0 and "only full masks" in r.stderr, r.stderr[-2000:]


# ---- sanitizers catch what result checks cannot ---------------------------------------------------

def _san_runtime(lib: str) -> str | None:
    try:
        p = subprocess.run(["g++", f"-print-file-name={lib}"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
    return p if os.path.isabs(p) and os.path.exists(p) else None


_SAN_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
from cuda_shim import ShimModule
from a2ats_lite.backend.nvrtc import load_source
text = load_source("rmsnorm")
mode = sys.argv[1]
if mode == "race":      # delete the first __syncthreads of block_sum (common.cuh)
    marker = "if (lane == 0) scratch[warp] = v;\n    __syncthreads();"
    assert marker in text
    text = text.replace(marker, "if (lane == 0) scratch[warp] = v;", 1)
if mode == "oob":       # read one element past the end of the row
    marker = "for (int i = threadIdx.x; i < n_cols; i += blockDim.x) {{\n        const float v = xr[i];"
    assert marker in text
    text = text.replace(marker, "for (int i = threadIdx.x; i <= n_cols; i += blockDim.x) {{\n        const float v = xr[i];", 1)
m = ShimModule(text + "\n// " + mode + "\n")
n_rows, n_cols = 2, 100
x = np.random.default_rng(0).standard_normal((n_rows, n_cols)).astype(np.float32)
w = np.ones(n_cols, np.float32); out = np.full_like(x, np.nan)
m.get_function("rmsnorm_f32")((n_rows,), (128,), (x, w, out, np.int32(n_cols), np.float32(1e-6)))
ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6)
print("MAXERR", float(np.abs(out - ref).max()))
"""


def _run_san(san: str, lib: str, mode: str, extra_env: dict) -> subprocess.CompletedProcess:
    rt = _san_runtime(lib)
    if rt is None:
        pytest.skip(f"{lib} not available")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "A2ATS_SHIM_SAN")}
    env.update(LD_PRELOAD=rt, A2ATS_SHIM_SAN=san, **extra_env)
    script = _SAN_SCRIPT.format(tests=str(ROOT / "tests"), root=str(ROOT))
    return subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                          env=env, timeout=300)


def test_sanitizer_thread_catches_deleted_syncthreads():
    """TSan reports the race of a block reduction without its barrier; the intact kernel is clean.
    (Plain result checks typically still pass without the barrier.)"""
    bad = _run_san("thread", "libtsan.so", "race", {"TSAN_OPTIONS": "halt_on_error=0"})
    assert "WARNING: ThreadSanitizer: data race" in bad.stderr, bad.stderr[-3000:]
    assert "common.cuh" in bad.stderr            # the report points at the kernel source
    good = _run_san("thread", "libtsan.so", "ok", {"TSAN_OPTIONS": "halt_on_error=1"})
    assert good.returncode == 0 and "ThreadSanitizer" not in good.stderr, good.stderr[-3000:]
    assert float(good.stdout.split("MAXERR")[1]) < 1e-5


def test_sanitizer_address_catches_out_of_bounds():
    bad = _run_san("address", "libasan.so", "oob", {"ASAN_OPTIONS": "detect_leaks=0"})
    assert bad.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in bad.stderr, bad.stderr[-3000:]
    assert "rmsnorm.cu" in bad.stderr
