"""The quantized-weight CUDA kernels (kernels/quant_matvec.cu, kernels/quant_dequant.cu), run on
the CPU through tests/cuda_shim and, under ``pytest -m gpu`` on a machine with a GPU, through
cupy.RawModule with the very same inputs (seed printed; pin one with A2ATS_TEST_SEED=N).

Weights: Q4_0/Q4_1/Q5_0/Q8_0 rows are gguf.quants.quantize of random floats; Q4_K/Q5_K/Q6_K rows
are random bytes with valid (finite, some subnormal) f16 scale fields; F16/F32 random values.
The reference is a2ats_lite.native.dequantize (bit-exact with gguf-py), then a float64 product.
Every output is NaN-poisoned before the launch (and has a poisoned guard row behind it), so an
element a kernel forgets to write, or one it writes past the end, fails.

Limits:
  matvec_*        |y - y_ref| <= TOL_MATVEC * (|x| @ |W|^T) for every element (componentwise,
                  float64 reference): f32 products and sums of <= n_in / 32 + 5 rounded terms
                  per lane and shuffle step (on the CPU shim observed <= 5e-8).
  dequant_*_f32   bit-exact with native.dequantize (also on the GPU: explicit __fmul_rn/__fsub_rn
                  keep NVRTC from contracting d*q - m into an FMA).
  dequant_*_f16   bit-exact with native.dequantize(..., dtype=float16) (round to nearest even of
                  the exact f32 value), i.e. within half an f16 ulp of the f32 result.
  get_rows_*      bit-exact with native.dequantize of the selected rows; ids outside
                  [0, n_rows) give a zero row and *err = 1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest


from a2ats_lite import native
from a2ats_lite.backend.nvrtc import load_source
from a2ats_lite.gguf import GGML_BLOCK

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "a2ats_lite" / "backend" / "kernels"
NAN = np.float32("nan")

TOL_MATVEC = 4e-6

# name in the kernel entry points -> ggml type id
TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q8_0": 8,
         "q4_k": 12, "q5_k": 13, "q6_k": 14}
# the values of one "unit" (one thread's share of a block) per type: block values / units
UNIT = {"f32": 1, "f16": 1, "q4_0": 8, "q4_1": 8, "q5_0": 8, "q8_0": 8,
        "q4_k": 16, "q5_k": 16, "q6_k": 16}
NV_BUCKETS = (1, 4, 8, 16)
MV_ROWS_PER_WARP = {1: 2, 4: 2, 8: 1, 16: 1}    # R of matvec_*_v<NV>
MV_BLOCK = 128
DQ_BLOCK = 256          # dequant / get_rows


def i32(v):
    return np.int32(v)


# ---- running a kernel: CPU shim, or the GPU through cupy.RawModule ---------------------------------

@pytest.fixture
def kernels(kmod):
    """kernels(source_name).get_function(kernel)(grid, block, args) on the shim or the GPU."""
    return kmod


# ---- test data -------------------------------------------------------------------------------------

def row_bytes(t: str, n_in: int) -> int:
    qk, bs = GGML_BLOCK[TYPES[t]]
    assert n_in % qk == 0
    return n_in // qk * bs


def rand_f16(rng, shape, lo, hi, subnormal_frac=0.0):
    """Random finite f16 values, |v| in [lo, hi), random sign; some subnormal if asked."""
    v = (rng.uniform(lo, hi, shape) * rng.choice([-1.0, 1.0], shape)).astype(np.float16)
    if subnormal_frac:
        sub = rng.random(shape) < subnormal_frac
        v[sub] = (rng.integers(1, 1024, int(sub.sum())).astype(np.uint16)).view(np.float16)
    return v


def rand_weights(rng, t: str, n_out: int, n_in: int, subnormal_frac=0.0) -> np.ndarray:
    """(n_out, row_bytes) uint8: valid GGUF rows of type t."""
    g = TYPES[t]
    if t == "f32":
        return rng.standard_normal((n_out, n_in)).astype(np.float32).view(np.uint8)
    if t == "f16":
        return rng.standard_normal((n_out, n_in)).astype(np.float16).view(np.uint8)
    if t in ("q4_0", "q4_1", "q5_0", "q8_0"):
        import gguf.quants as gq
        # rows of different magnitudes, some with an offset (exercises Q4_1's m)
        x = rng.standard_normal((n_out, n_in)) * rng.uniform(0.01, 3.0, (n_out, 1))
        x += rng.uniform(-1, 1, (n_out, 1)) * (rng.random((n_out, 1)) < 0.5)
        raw = np.ascontiguousarray(gq.quantize(x.astype(np.float32), g), dtype=np.uint8)
        if subnormal_frac:      # some blocks with a subnormal d
            qk, bs = GGML_BLOCK[g]
            blocks = raw.reshape(n_out, n_in // qk, bs)
            sub = rng.random(blocks.shape[:2]) < subnormal_frac
            d = rng.integers(1, 1024, int(sub.sum())).astype(np.uint16).view(np.uint8).reshape(-1, 2)
            blocks[sub, 0:2] = d
        return raw
    qk, bs = GGML_BLOCK[g]
    nb = n_in // qk
    raw = rng.integers(0, 256, (n_out, nb, bs), dtype=np.uint8)

    def put(off, lo, hi):
        h = rand_f16(rng, (n_out, nb), lo, hi, subnormal_frac)
        raw[:, :, off:off + 2] = h.view(np.uint8).reshape(n_out, nb, 2)

    if t in ("q4_k", "q5_k"):           # d, dmin at bytes 0, 2 (the 6-bit scales are up to 63)
        put(0, 1e-3, 2e-2)
        put(2, 1e-3, 2e-2)
    else:                               # q6_k: d at byte 208 (int8 scales up to 128)
        put(208, 1e-3, 2e-2)
    return raw.reshape(n_out, nb * bs)


def dequant_ref(raw: np.ndarray, t: str, n_rows: int, n_in: int, dtype=np.float32) -> np.ndarray:
    return native.dequantize(raw, TYPES[t], (n_rows, n_in), dtype=dtype)


def poisoned(shape, dtype=np.float32):
    return np.full(shape, NAN, dtype=dtype)


def nv_bucket(n_vec: int) -> int:
    return next(b for b in NV_BUCKETS if b >= n_vec)


# ---- matvec ------------------------------------------------------------------------------------------

def run_matvec(kernels, t, W, x, n_out, n_in, nv=None, block=MV_BLOCK):
    n_vec = x.shape[0]
    nv = nv or nv_bucket(n_vec)
    k = kernels("quant_matvec").get_function(f"matvec_{t}_v{nv}")
    y = poisoned((n_vec + 1, n_out))            # last row: guard
    rows_per_block = block // 32 * MV_ROWS_PER_WARP[nv]
    k(((n_out + rows_per_block - 1) // rows_per_block,), (block,),
      (W, x, y, i32(n_out), i32(n_in), i32(n_vec)))
    assert np.isnan(y[n_vec]).all(), "matvec wrote past y"
    return y[:n_vec]


def check_matvec(y, x, Wf):
    x64, W64 = x.astype(np.float64), Wf.astype(np.float64)
    ref = x64 @ W64.T
    scale = np.abs(x64) @ np.abs(W64).T
    assert not np.isnan(y).any(), "unwritten (NaN) outputs"
    err = np.abs(y.astype(np.float64) - ref) / np.maximum(scale, 1e-30)
    assert err.max() <= TOL_MATVEC, f"componentwise rel err {err.max():.2e} > {TOL_MATVEC}"
    return float(err.max())


def matvec_shapes(t):
    # n_out: not a multiple of the rows per block (4 or 8), and 1 (a warp's 2nd row clamped)
    if t in ("f32", "f16"):
        return [(5, 256), (7, 77), (1, 64)]            # n_in needs no blocks here
    if t.endswith("_k"):
        return [(5, 256), (7, 768), (3, 1280)]         # 1, 3, 5 super-blocks per row
    return [(5, 256), (7, 768), (3, 288), (1, 32)]     # 8, 24, 9, 1 blocks per row


@pytest.mark.parametrize("n_vec", [1, 3, 16])
@pytest.mark.parametrize("t", list(TYPES))
def test_matvec(kernels, rng, t, n_vec):
    for n_out, n_in in matvec_shapes(t):
        W = rand_weights(rng, t, n_out, n_in)
        Wf = dequant_ref(W, t, n_out, n_in)
        x = rng.standard_normal((n_vec, n_in)).astype(np.float32)
        y = run_matvec(kernels, t, W, x, n_out, n_in)
        check_matvec(y, x, Wf)


@pytest.mark.parametrize("t", ["q4_0", "q8_0", "q4_k", "q6_k", "f16"])
def test_matvec_buckets_and_blocks(kernels, rng, t):
    """Any n_vec <= NV works in matvec_*_vNV; other block sizes (one warp per row) work; n_vec
    above the bucket writes nothing."""
    n_out, n_in = 9, 512
    W = rand_weights(rng, t, n_out, n_in)
    Wf = dequant_ref(W, t, n_out, n_in)
    for n_vec, nv, block in [(1, 4, 128), (3, 16, 128), (5, 8, 64), (8, 8, 32), (2, 4, 96),
                             (16, 16, 256)]:
        x = rng.standard_normal((n_vec, n_in)).astype(np.float32)
        check_matvec(run_matvec(kernels, t, W, x, n_out, n_in, nv=nv, block=block), x, Wf)
    x = rng.standard_normal((5, n_in)).astype(np.float32)
    y = run_matvec(kernels, t, W, x, n_out, n_in, nv=4)
    assert np.isnan(y).all(), "n_vec > NV must write nothing"


@pytest.mark.parametrize("t", ["q4_k", "f32"])
def test_matvec_grid_larger_than_needed(kernels, rng, t):
    """ceil(n_out / 4) blocks of 128 for every bucket: the surplus warps write nothing."""
    n_out, n_in = 11, 256
    W = rand_weights(rng, t, n_out, n_in)
    Wf = dequant_ref(W, t, n_out, n_in)
    for nv in NV_BUCKETS:
        x = rng.standard_normal((min(nv, 3), n_in)).astype(np.float32)
        k = kernels("quant_matvec").get_function(f"matvec_{t}_v{nv}")
        y = poisoned((x.shape[0] + 1, n_out))
        k(((n_out + 3) // 4 + 2,), (128,), (W, x, y, i32(n_out), i32(n_in), i32(x.shape[0])))
        assert np.isnan(y[-1]).all()
        check_matvec(y[:-1], x, Wf)


def test_matvec_large_values(kernels, rng):
    """Q8_0 with big scales and x: nothing overflows or loses relative accuracy."""
    n_out, n_in = 4, 256
    W = rand_weights(rng, "q8_0", n_out, n_in)
    blocks = W.reshape(n_out, n_in // 32, 34)
    blocks[:, :, 0:2] = np.array([300.0], np.float16).view(np.uint8)
    Wf = dequant_ref(W, "q8_0", n_out, n_in)
    x = (rng.standard_normal((2, n_in)) * 1e3).astype(np.float32)
    check_matvec(run_matvec(kernels, "q8_0", W, x, n_out, n_in), x, Wf)


# ---- dequantization -----------------------------------------------------------------------------------

def dq_grid(t, n_in, n_rows_out, max_y=65535):
    units = n_in // UNIT[t] if UNIT[t] > 1 else n_in
    return ((units + DQ_BLOCK - 1) // DQ_BLOCK, min(n_rows_out, max_y))


def dq_shapes(t):
    if t in ("f32", "f16"):
        return [(6, 77), (3, 600)]
    if t.endswith("_k"):
        return [(6, 256), (3, 1280)]
    return [(6, 96), (3, 2112)]        # 2112 / 8 = 264 units: more than one x-block


@pytest.mark.parametrize("out_dtype", ["f32", "f16"])
@pytest.mark.parametrize("t", list(TYPES))
def test_dequant_bit_exact(kernels, rng, t, out_dtype):
    np_dtype = np.float32 if out_dtype == "f32" else np.float16
    k = kernels("quant_dequant").get_function(f"dequant_{t}_{out_dtype}")
    for n_rows, n_in in dq_shapes(t):
        W = rand_weights(rng, t, n_rows, n_in, subnormal_frac=0.05)
        ref = dequant_ref(W, t, n_rows, n_in, dtype=np_dtype)
        for r0, r1, max_y in [(0, n_rows, 65535), (2, n_rows, 65535), (1, 2, 65535),
                              (0, n_rows, 2)]:   # the last: rows grid-strided over gridDim.y
            out = poisoned((r1 - r0 + 1, n_in), np_dtype)    # + a guard row
            k(dq_grid(t, n_in, r1 - r0, max_y), (DQ_BLOCK,), (W, out, i32(n_in), i32(r0), i32(r1)))
            assert np.isnan(out[r1 - r0]).all(), "wrote past the tile"
            got, want = out[:r1 - r0], ref[r0:r1]
            bits = np.uint32 if np_dtype == np.float32 else np.uint16
            bad = got.view(bits) != want.view(bits)
            assert not bad.any(), (f"rows [{r0},{r1}) n_in={n_in}: {int(bad.sum())} values differ, "
                                   f"first at {np.argwhere(bad)[0]}: {got[bad][0]} vs {want[bad][0]}")


@pytest.mark.parametrize("t", list(TYPES))
def test_get_rows(kernels, rng, t):
    n_rows, n_in = 7, (256 if t.endswith("_k") else 96 if t.startswith("q") else 45)
    W = rand_weights(rng, t, n_rows, n_in)
    ref = dequant_ref(W, t, n_rows, n_in)
    k = kernels("quant_dequant").get_function(f"get_rows_{t}")
    # repeated ids and the last row
    ids = np.array([n_rows - 1, 0, 3, 3, n_rows - 1, 2], np.int32)
    out = poisoned((len(ids) + 1, n_in))
    err = np.zeros(1, np.int32)
    k(dq_grid(t, n_in, len(ids)), (DQ_BLOCK,),
      (W, ids, out, i32(len(ids)), i32(n_rows), i32(n_in), err))
    assert np.isnan(out[-1]).all(), "wrote past out"
    assert np.array_equal(out[:-1].view(np.uint32), ref[ids].view(np.uint32))
    assert err[0] == 0
    # ids outside [0, n_rows): zero rows and the error flag; the valid ones still gathered
    ids = np.array([-1, n_rows, 4, 2**31 - 1, -2**31, n_rows - 1], np.int32)
    out = poisoned((len(ids), n_in))
    k(dq_grid(t, n_in, len(ids), 4), (DQ_BLOCK,),
      (W, ids, out, i32(len(ids)), i32(n_rows), i32(n_in), err))
    assert err[0] == 1
    good = (ids >= 0) & (ids < n_rows)
    assert np.array_equal(out[good].view(np.uint32), ref[ids[good]].view(np.uint32))
    assert (out[~good].view(np.uint32) == 0).all()


# ---- source hygiene ------------------------------------------------------------------------------------

def _decoders(path: Path) -> str:
    text = path.read_text() if path.suffix == ".cuh" else load_source(path.stem)
    m = re.search(r"// ==== BEGIN quant block decoders.*?// ==== END quant block decoders[^\n]*\n",
                  text, re.S)
    assert m, f"{path.name}: decoder section markers missing"
    return m.group(0)


def test_decoders_shared_through_load_source():
    """quant_matvec.cu and quant_dequant.cu both get the one quant_blocks.cuh, inlined by
    nvrtc.load_source (NVRTC and the shim compile the same self-contained text)."""
    shared = _decoders(KERNELS / "quant_blocks.cuh")
    assert _decoders(KERNELS / "quant_matvec.cu") == shared == _decoders(KERNELS / "quant_dequant.cu")


def test_no_unaligned_wide_loads_in_blocks():
    """Inside GGUF blocks only byte and uint16 loads (blocks of 18/22/34/210 bytes leave 4-byte
    loads misaligned): the decoders never cast a block pointer to a 4-byte or wider type."""
    dec = _decoders(KERNELS / "quant_blocks.cuh")
    casts = re.findall(r"reinterpret_cast<const (\w+)\s*\*>", dec)
    assert set(casts) <= {"uint16_t", "int8_t", "__half", "float"}, casts
    # the only float cast is F32's row access (rows of F32 are 4-byte aligned)
    assert dec.count("reinterpret_cast<const float*>") == 1


# ---- UBSan sees a misaligned 4-byte load inside a block (why the decoders read uint16 pieces) -----

_UBSAN_KERNEL = """
extern "C" __global__ void q8_rows(const uint8_t* W, float* out, int n_blocks) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= n_blocks * 4) return;
    float w[8];
    a2q::Q8_0::decode(W + (u / 4) * 34, u % 4, w);
    for (int k = 0; k < 8; k++) out[(u / 4) * 32 + a2q::Q8_0::run(u % 4, k / 4) + k % 4] = w[k];
}
"""

_UBSAN_SCRIPT = r"""
import sys, numpy as np
sys.path.insert(0, {tests!r}); sys.path.insert(0, {root!r})
from cuda_shim import ShimModule
import gguf.quants as gq
text = open(sys.argv[2]).read()
W = np.ascontiguousarray(gq.quantize(np.random.default_rng(0).standard_normal(64).astype(np.float32), 8))
out = np.full(64, np.nan, np.float32)
ShimModule(text).get_function("q8_rows")((1,), (32,), (W, out, np.int32(2)))
print("EXACT", bool(np.array_equal(out, gq.dequantize(W, 8))))
"""


def test_ubsan_catches_misaligned_block_load(tmp_path):
    """A 4-byte load at a 2-aligned offset inside a 34-byte Q8_0 block is reported by UBSan (a
    fault on the GPU); the project's uint16-piece loads are clean and exact."""
    try:
        rt = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                            text=True).stdout.strip()
    except OSError:
        rt = ""
    if not (os.path.isabs(rt) and os.path.exists(rt)):
        pytest.skip("libasan.so not available")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "A2ATS_SHIM_SAN")}
    env.update(LD_PRELOAD=rt, A2ATS_SHIM_SAN="address", ASAN_OPTIONS="detect_leaks=0")
    script = _UBSAN_SCRIPT.format(tests=str(ROOT / "tests"), root=str(ROOT))
    prelude = (KERNELS / "common.cuh").read_text()
    dec = _decoders(KERNELS / "quant_blocks.cuh")
    wide = "    return *reinterpret_cast<const uint32_t*>(p);"
    old = "    return ld16(p) | (ld16(p + 2) << 16);"
    assert old in dec

    def run(mode, decoders):
        src = tmp_path / f"{mode}.cu"
        src.write_text(prelude + decoders + _UBSAN_KERNEL + f"// {mode}\n")
        return subprocess.run([sys.executable, "-c", script, mode, str(src)], capture_output=True,
                              text=True, env=env, timeout=300)

    bad = run("wide", dec.replace(old, wide, 1))
    assert bad.returncode != 0 and "misaligned address" in bad.stderr, bad.stderr[-3000:]
    good = run("pieces", dec)
    assert good.returncode == 0 and "runtime error" not in good.stderr, good.stderr[-3000:]
    assert "EXACT True" in good.stdout, good.stdout


# ---- GPU only: effective weight bandwidth of the matvec kernels (prints; asserts nothing slow) ----

@pytest.mark.gpu
def test_gpu_matvec_bandwidth():
    """Times matvec_<type>_v<NV> on a W larger than L2 (random bytes: values do not matter for
    timing) and prints GB/s of weight bytes read. Writes JSON to $A2ATS_BENCH_JSON if set."""
    import json

    import cupy as cp
    from cuda_shim.gpu import GpuModule

    mod = GpuModule("quant_matvec").module
    n_out, n_in = 16384, 8192
    res = {}
    for t in TYPES:
        nbytes = n_out * row_bytes(t, n_in)
        W = cp.random.randint(0, 256, nbytes, dtype=cp.uint8)
        if t == "f32":      # finite values (random bytes may be NaN; keep timing clean anyway)
            W = cp.random.standard_normal(n_out * n_in, dtype=cp.float32).view(cp.uint8)
        for nv in NV_BUCKETS:
            x = cp.random.standard_normal((nv, n_in), dtype=cp.float32)
            y = cp.empty((nv, n_out), cp.float32)
            k = mod.get_function(f"matvec_{t}_v{nv}")
            rows = 4 * MV_ROWS_PER_WARP[nv]
            args = (W, x, y, i32(n_out), i32(n_in), i32(nv))
            grid = ((n_out + rows - 1) // rows,)
            for _ in range(3):
                k(grid, (128,), args)
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            reps = 20
            start.record()
            for _ in range(reps):
                k(grid, (128,), args)
            stop.record()
            stop.synchronize()
            us = cp.cuda.get_elapsed_time(start, stop) * 1e3 / reps
            res[f"matvec_{t}_v{nv}"] = {"us": round(us, 2), "GBps": round(nbytes / us / 1e3, 1),
                                        "n_out": n_out, "n_in": n_in, "n_vec": nv}
            print(f"matvec_{t}_v{nv}: {us:8.1f} us  {nbytes / us / 1e3:7.1f} GB/s")
        del W
    out = os.environ.get("A2ATS_BENCH_JSON")
    if out:
        Path(out).write_text(json.dumps(res, indent=1))
    assert all(np.isfinite(v["us"]) and v["us"] > 0 for v in res.values())
