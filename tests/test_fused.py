"""native.fused (native/fused.c): RMS norm, RoPE from cached tables and the decode rows'
attention against float64 references on random inputs, the bits of the numpy functions they
replace, and their refusals of bad sizes and indices."""
import numpy as np
import pytest

from a2ats_lite import native
from a2ats_lite.errors import NativeError
from a2ats_lite.ops import rms_norm
from a2ats_lite.rope import Rope

fused = native.fused


def rms_ref(x, w, eps):
    x = x.astype(np.float64)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y if w is None else y * w.astype(np.float64)


@pytest.mark.parametrize("shape", [(1, 640), (7, 33), (3, 4, 256), (1, 1)])
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm(rng, shape, weighted):
    x = (rng.standard_normal(shape) * rng.uniform(0.01, 50)).astype(np.float32)
    w = rng.standard_normal(shape[-1]).astype(np.float32) if weighted else None
    got = fused.rms_norm(x, w, 1e-6)
    ref = rms_ref(x, w, 1e-6)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(got, rms_norm(x, w, 1e-6))       # the bits of ops.rms_norm
    y = x.copy()
    assert fused.rms_norm(y, w, 1e-6, out=y) is y                   # in place
    np.testing.assert_array_equal(y, got)


def test_rms_norm_native_sum(rng):
    """Without the caller's sums of squares the C side sums in double."""
    x = rng.standard_normal((5, 96)).astype(np.float32)
    w = rng.standard_normal(96).astype(np.float32)
    out = np.empty_like(x)
    f = native.ffi.from_buffer
    rc = native.lib.a2n_rms_norm(f("float[]", x), x.size, 5, 96, native.ffi.NULL, 0,
                                 f("float[]", w), 96, 1e-6, f("float[]", out), out.size)
    assert rc == 0
    np.testing.assert_allclose(out, rms_ref(x, w, 1e-6), rtol=2e-6, atol=2e-6)


def test_rms_norm_refuses_bad_sizes(rng):
    x = rng.standard_normal((2, 8)).astype(np.float32)
    with pytest.raises(NativeError):
        fused.rms_norm(x, np.ones(7, np.float32), 1e-6)
    with pytest.raises(NativeError):
        fused.rms_norm(x, None, 1e-6, out=np.empty((2, 9), np.float32))
    f, lib = native.ffi.from_buffer, native.lib
    out = np.empty_like(x)
    ss = np.ones(2, np.float32)
    assert lib.a2n_rms_norm(f("float[]", x), 15, 2, 8, native.ffi.NULL, 0, native.ffi.NULL, 0,
                            1e-6, f("float[]", out), 16) == -2
    assert lib.a2n_rms_norm(f("float[]", x), 16, 2, 8, f("float[]", ss), 1, native.ffi.NULL, 0,
                            1e-6, f("float[]", out), 16) == -2
    assert lib.a2n_rms_norm(f("float[]", x), 16, -1, 8, native.ffi.NULL, 0, native.ffi.NULL, 0,
                            1e-6, f("float[]", out), 16) == -4


def rope_ref(x, pos, rope):
    x = x.astype(np.float64)
    r = rope.rot
    ang = pos.astype(np.float64)[:, None] * rope.inv_freq()[None, :]      # (n, r/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    out = x.copy()
    if rope.pairing == "adjacent":
        a, b = x[..., 0:r:2], x[..., 1:r:2]
        out[..., 0:r:2], out[..., 1:r:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :r // 2], x[..., r // 2:r]
        out[..., :r // 2], out[..., r // 2:r] = a * c - b * s, a * s + b * c
    return out


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
@pytest.mark.parametrize("n_rot", [None, 32])
def test_rope(rng, pairing, n_rot):
    rope = Rope(head_dim=64, base=10000.0, pairing=pairing, n_rot=n_rot)
    tables = fused.RopeTables(rope)
    x = rng.standard_normal((6, 3, 64)).astype(np.float32)
    pos = rng.integers(0, 900, 6)                                          # grows the tables
    got = fused.rope(x, pos, tables)
    assert tables.rows > int(pos.max())
    np.testing.assert_allclose(got, rope_ref(x, pos, rope), rtol=0, atol=2e-4)
    np.testing.assert_array_equal(got, rope(x, pos))                  # the bits of Rope.__call__
    np.testing.assert_array_equal(fused.rope(x[:1], pos[:1], tables), got[:1])   # row by row


def test_rope_refuses_bad_positions(rng):
    tables = fused.RopeTables(Rope(head_dim=16))
    x = rng.standard_normal((2, 1, 16)).astype(np.float32)
    with pytest.raises(NativeError):
        fused.rope(x, np.array([0, -1]), tables)
    with pytest.raises(NativeError):
        fused.rope(x, np.array([0]), tables)
    tables.cover(3)
    f, lib = native.ffi.from_buffer, native.lib
    out = np.empty_like(x)
    pos = np.array([0, tables.rows], np.int64)                              # past the table
    assert lib.a2n_rope(f("float[]", x), 32, 2, 1, 16, 16, 0, f("float[]", tables.cos),
                        f("float[]", tables.sin), tables.rows * 8, tables.rows,
                        f("int64_t[]", pos), f("float[]", out), 32) == -3
    assert lib.a2n_rope(f("float[]", x), 32, 2, 1, 16, 15, 0, f("float[]", tables.cos),
                        f("float[]", tables.sin), tables.rows * 8, tables.rows,
                        f("int64_t[]", pos), f("float[]", out), 32) == -4      # odd rot


def attention_ref(q, K, V, lo, hi, scale):
    G, g, d = q.shape
    out = np.zeros((G, g, d))
    for k in range(G):
        s = scale * q[k].astype(np.float64) @ K[k, lo:hi].astype(np.float64).T    # (g, T)
        p = np.exp(s - s.max(1, keepdims=True))
        out[k] = (p / p.sum(1, keepdims=True)) @ V[k, lo:hi].astype(np.float64)
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention(rng, dtype, window):
    G, g, d, cap = 2, 3, 32, 40
    n_rows = [9, 17, 1]
    bufs, pos = [], []
    for i, n in enumerate(n_rows):
        K = rng.standard_normal((G, cap, d)).astype(dtype)
        V = rng.standard_normal((G, cap, d)).astype(dtype)
        bufs.append((K, V, 3 * i, n))
        pos.append(3 * i + n - 1)
    q = rng.standard_normal((len(n_rows), G, g, d)).astype(np.float32)
    got = fused.decode_attention(q, bufs, np.array(pos), window, 0.125)
    for s, (K, V, p0, n) in enumerate(bufs):
        lo = 0 if window is None else max(0, pos[s] - window + 1 - p0)
        ref = attention_ref(q[s], K, V, lo, pos[s] + 1 - p0, 0.125)
        np.testing.assert_allclose(got[s], ref, rtol=1e-4, atol=1e-4)
    # the numbers of native.attention for the same rows
    seq = np.arange(len(n_rows))
    lo = np.array([0 if window is None else max(0, p - window + 1 - b[2]) for p, b in zip(pos, bufs)])
    hi = np.array([p + 1 - b[2] for p, b in zip(pos, bufs)])
    full = native.attention(q.reshape(len(n_rows), G * g, d), [b[0][:, :b[3]] for b in bufs],
                            [b[1][:, :b[3]] for b in bufs], [b[2] for b in bufs], seq, lo, hi, 0.125)
    np.testing.assert_array_equal(got.reshape(full.shape), full)


def test_decode_attention_refuses(rng):
    K = np.zeros((1, 8, 32), np.float32)
    q = np.zeros((1, 1, 1, 32), np.float32)
    with pytest.raises(ValueError):                                       # position not cached
        fused.decode_attention(q, [(K, K, 0, 4)], np.array([4]), None, 1.0)
    with pytest.raises(NativeError):                                      # more rows than room
        fused.decode_attention(q, [(K, K, 0, 9)], np.array([3]), None, 1.0)
    with pytest.raises(NativeError):                                      # not contiguous
        fused.decode_attention(q, [(K[:, ::2], K, 0, 2)], np.array([1]), None, 1.0)


def gated_ref(g, u, act):
    g = g.astype(np.float64)
    if act == "silu":
        a = g / (1 + np.exp(-g))
    else:
        a = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
    return a * u.astype(np.float64)


@pytest.mark.parametrize("act", ["gelu_tanh", "silu"])
@pytest.mark.parametrize("shape", [(1, 2048), (5, 33), (2, 3, 64)])
def test_gated(rng, act, shape):
    from a2ats_lite.ops import gated_
    g = (rng.standard_normal(shape) * 4).astype(np.float32)
    u = rng.standard_normal(shape).astype(np.float32)
    got = fused.gated(g.copy(), u, act)
    ref = gated_ref(g, u, act)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_array_equal(got, gated_(g.copy(), u, act))        # the bits of ops.gated_
    g.reshape(-1)[:3] = [np.nan, np.inf, 30.0]                          # clipped cubic, NaN kept
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(fused.gated(g.copy(), u, act), gated_(g.copy(), u, act))


def test_gated_refuses(rng):
    g = np.zeros((2, 8), np.float32)
    with pytest.raises(NativeError):
        fused.gated(g, np.zeros((2, 7), np.float32), "silu")
    with pytest.raises(NativeError):
        fused.gated(g, g.copy(), "relu")
    f, lib = native.ffi.from_buffer, native.lib
    t = np.zeros(16, np.float32)
    assert lib.a2n_gate_pre(3, f("float[]", g), 16, f("float[]", t), 16) == -4       # act
    assert lib.a2n_gate_pre(1, f("float[]", g), 16, f("float[]", t), 15) == -2
    assert lib.a2n_gate_post(f("float[]", g), 16, f("float[]", t), 16, f("float[]", t), 8) == -2


def test_cpu_argmax_flags_unusable_rows(rng):
    """CPUBackend.argmax looks only at the picked entry: the first maximum, or -1 for a row
    with a NaN, a +inf or only -inf (the engine fails that row's request)."""
    from a2ats_lite.backend.cpu import CPUBackend
    x = rng.standard_normal((5, 300)).astype(np.float32)
    x[1, 5], x[1, 7] = np.nan, np.inf
    x[2] = -np.inf
    x[3, 9] = np.inf
    x[4, 3] = -np.inf
    x[4, 10] = x[4, 20] = x[4].max() + 1                                # a tie: the first
    assert CPUBackend().argmax(x).tolist() == [int(np.argmax(x[0])), -1, -1, -1, 10]
    assert CPUBackend().argmax(np.zeros((0, 4), np.float32)).shape == (0,)


@pytest.mark.parametrize("V", [1, 31, 32, 33, 1000, 262144])
def test_apply_bitmask(rng, V):
    """Bit t of the mask (llguidance's int32 words, little-endian bits) keeps token t, a 0 sets
    it to -inf, tokens past the mask's words too; float64 reference from the unpacked bits."""
    W = (V + 31) // 32 + int(rng.integers(0, 2)) - (V > 32 and rng.random() < 0.3)
    mask = rng.integers(-2**31, 2**31, size=W, dtype=np.int64).astype(np.int32)
    mask[::3] = -1                                                  # whole words allowed
    x = rng.standard_normal(V).astype(np.float32)
    got = x.copy()
    native.fused.apply_bitmask(got, mask)
    bits = np.unpackbits(mask.astype("<i4").view(np.uint8), bitorder="little")   # (32 W,)
    ref = x.astype(np.float64)
    n = min(V, 32 * W)
    ref[:n][bits[:n] == 0] = -np.inf
    ref[n:] = -np.inf
    np.testing.assert_array_equal(got, ref.astype(np.float32))


def test_apply_bitmask_refuses(rng):
    mask = np.full(2, -1, np.int32)
    with pytest.raises(NativeError, match="float32"):
        native.fused.apply_bitmask(np.zeros(40, np.float64), mask)
    with pytest.raises(NativeError, match="writable"):
        native.fused.apply_bitmask(np.zeros((2, 40), np.float32), mask)
