"""The offloaded KV store: exact rows back (float rows as written, q8_0 / q4_0 rows as
ggml's reference quantizers and formulas give them, every K/V type pair), bounds checks,
nothing left on disk."""
import gc
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from a2ats_lite import native
from a2ats_lite.errors import ContextOverflowError, NativeError
from a2ats_lite.kv.store import KVStore

from test_kv_quant import REFERENCE, decode64, values

TYPES = ["f32", "f16", "q8_0", "q4_0"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows(rng, n, G=2, d=16):
    return (rng.standard_normal((n, G, d)).astype(np.float32),
            rng.standard_normal((n, G, d)).astype(np.float32))


@pytest.mark.parametrize("spill", [False, True])
def test_append_and_gather_return_exact_rows(tmp_path, spill):
    rng = np.random.default_rng(0)
    st = KVStore(3, 2, 16, capacity=3000, spill_dir=tmp_path if spill else None)
    k, v = rows(rng, 2500)
    st.append(1, k[:300], v[:300])
    for t in range(300, 310):             # per-token appends, like decode
        st.append(1, k[t:t + 1], v[t:t + 1])
    st.append(1, k[310:], v[310:])        # crosses the spill file's reservation chunks
    idx = rng.choice(2500, 50, replace=False)
    for g in range(2):
        gk, gv = st.gather(1, g, idx)
        np.testing.assert_array_equal(gk, k[idx, g])
        np.testing.assert_array_equal(gv, v[idx, g])
        np.testing.assert_array_equal(st.gather_keys(1, g, idx[::-1]), k[idx[::-1], g])
    np.testing.assert_array_equal(st.keys(1), k)
    np.testing.assert_array_equal(st.values(1), v)
    assert st.n.tolist() == [0, 2500, 0] and st.nbytes_used == 2500 * 2 * 2 * 16 * 4
    st.close()


def test_layers_and_heads_do_not_overlap():
    rng = np.random.default_rng(1)
    st = KVStore(2, 3, 8, capacity=64)
    k0, v0 = rows(rng, 40, 3, 8)
    k1, v1 = rows(rng, 64, 3, 8)
    st.append(0, k0, v0)
    st.append(1, k1, v1)                  # fills layer 1 to capacity
    np.testing.assert_array_equal(st.keys(0), k0)
    np.testing.assert_array_equal(st.values(1), v1)
    st.close()


def test_truncate_then_append_overwrites():
    rng = np.random.default_rng(2)
    st = KVStore(1, 2, 16, capacity=100)
    k, v = rows(rng, 30)
    st.append(0, k, v)
    st.truncate(0, 20)
    k2, v2 = rows(rng, 5)
    st.append(0, k2, v2)
    np.testing.assert_array_equal(st.keys(0), np.concatenate([k[:20], k2]))
    with pytest.raises(NativeError, match="out of range"):
        st.gather(0, 0, [25])


def test_gather_refuses_rows_not_yet_stored():
    st = KVStore(1, 1, 8, capacity=100)
    st.append(0, np.ones((10, 1, 8), np.float32), np.ones((10, 1, 8), np.float32))
    with pytest.raises(NativeError, match="row index 10 out of range"):
        st.gather(0, 0, [3, 10])
    with pytest.raises(NativeError, match="out of range"):
        st.gather(0, 0, [-1])


def test_capacity_overflow_and_bad_rows_are_clear():
    st = KVStore(1, 1, 8, capacity=4)
    with pytest.raises(ContextOverflowError, match="capacity 4"):
        st.append(0, np.ones((5, 1, 8), np.float32), np.ones((5, 1, 8), np.float32))
    with pytest.raises(ValueError, match="rows must be"):
        st.append(0, np.ones((2, 2, 8), np.float32), np.ones((2, 2, 8), np.float32))
    st.close()
    with pytest.raises(ValueError, match="closed"):
        st.gather(0, 0, [0])
    st.close()   # idempotent


def test_spill_files_never_left_behind(tmp_path):
    # unlinked from the start, so nothing exists to leave behind: after close, after an
    # exception inside a with block, after garbage collection without close
    st = KVStore(2, 1, 64, capacity=4096, spill_dir=tmp_path)
    st.append(0, np.ones((100, 1, 64), np.float32), np.ones((100, 1, 64), np.float32))
    assert os.listdir(tmp_path) == []
    st.close()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        with KVStore(2, 1, 64, capacity=4096, spill_dir=tmp_path) as st2:
            st2.append(1, np.ones((7, 1, 64), np.float32), np.ones((7, 1, 64), np.float32))
            raise RuntimeError("boom")
    assert st2.data is None and os.listdir(tmp_path) == []
    st3 = KVStore(2, 1, 64, capacity=4096, spill_dir=tmp_path)
    st3.append(0, np.ones((9, 1, 64), np.float32), np.ones((9, 1, 64), np.float32))
    del st3
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_spill_file_gone_even_after_sigkill(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time, numpy as np
        sys.path.insert(0, {ROOT!r})
        from a2ats_lite.kv.store import KVStore
        st = KVStore(2, 1, 64, capacity=4096, spill_dir={str(tmp_path)!r})
        st.append(0, np.ones((500, 1, 64), np.float32), np.ones((500, 1, 64), np.float32))
        print("ready", flush=True)
        time.sleep(60)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        assert os.listdir(tmp_path) == []
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    assert os.listdir(tmp_path) == []


def test_spill_dir_missing_is_an_os_error(tmp_path):
    with pytest.raises(OSError):
        KVStore(1, 1, 8, capacity=16, spill_dir=tmp_path / "nope")


def _overcommit_mode():
    try:
        return open("/proc/sys/vm/overcommit_memory").read().strip()
    except OSError:
        return None


@pytest.mark.skipif(not sys.platform.startswith("linux") or _overcommit_mode() == "2",
                    reason="MAP_NORESERVE needs Linux without strict overcommit")
def test_capacity_larger_than_ram_costs_nothing_up_front():
    # Llama-8B shape at 128K: 32 layers x 8 heads x 128 dims x 2 x 4 B x 131072 = 32 GiB of
    # address space, more than this machine's RAM; only touched pages become memory
    st = KVStore(32, 8, 128, capacity=131072)
    k = np.full((3, 8, 128), 2.0, np.float32)
    st.append(31, k, -k)
    gk, gv = st.gather(31, 7, [2])
    assert gk.sum() == 256 and gv.sum() == -256
    st.close()


# ---------------------------------------------------------------- quantized rows
def held64(x, t):
    """float64 (..., d) values a store of type t holds for float32 rows x (..., d): f32 / f16
    as cast, q8_0 / q4_0 by ggml's reference quantizer (emulated) and decoding formula."""
    if t in ("f32", "f16"):
        return x.astype(np.float32 if t == "f32" else np.float16).astype(np.float64)
    blocks = REFERENCE[t](x.reshape(-1, 32))
    return decode64(blocks, t)[0].reshape(x.shape)


@pytest.mark.parametrize("kt", TYPES)
@pytest.mark.parametrize("vt", TYPES)
def test_every_type_pair_round_trips(rng, kt, vt):
    """Rows gathered (gather, gather_keys, rows, keys, values) are exactly the values the types
    hold for what was written; arrays() holds the blocks ggml writes; stored() copies them."""
    G, d, n = 2, 64, 70
    st = KVStore(2, G, d, capacity=96, dtype=kt, dtype_v=vt)
    k, v = values(rng, (n, G, d)), values(rng, (n, G, d))
    st.append(1, k[:50], v[:50])
    for t in range(50, n):                       # per-token appends, like decode
        st.append(1, k[t:t + 1], v[t:t + 1])
    hk, hv = held64(k, kt), held64(v, vt)        # (n, G, d) float64
    idx = rng.choice(n, 23, replace=False)
    for g in range(G):
        gk, gv = st.gather(1, g, idx)
        assert gk.shape == gv.shape == (23, d)
        assert np.array_equal(gk.astype(np.float64), hk[idx, g])
        assert np.array_equal(gv.astype(np.float64), hv[idx, g])
        assert np.array_equal(st.gather_keys(1, g, idx[::-1]).astype(np.float64), hk[idx[::-1], g])
        rk, rv = st.rows(1, g, 5, 9)
        assert np.array_equal(rv.astype(np.float64), hv[5:9, g])
    assert np.array_equal(st.keys(1).astype(np.float64), hk)
    assert np.array_equal(st.values(1).astype(np.float64), hv)
    K, V = st.arrays(1)
    assert K.shape == (G, 96, native.kv_row_width(kt, d)) and V.shape[2] == native.kv_row_width(vt, d)
    for a, x, t in ((K, k, kt), (V, v, vt)):
        if t in REFERENCE:                       # the bytes of ggml's blocks, row by row
            want = REFERENCE[t](x.transpose(1, 0, 2).reshape(-1, 32)).reshape(G, n, -1)
            assert np.array_equal(a[:, :n], want)
    sk, sv = st.stored(1, 40)
    assert np.array_equal(sk, K[:, :40]) and np.array_equal(sv, V[:, :40])
    with pytest.raises(ValueError, match="holds 70 rows"):
        st.stored(1, 71)
    with pytest.raises(NativeError, match="out of range"):
        st.gather(1, 0, [3, n])
    with pytest.raises(NativeError, match="out of range"):
        st.gather_keys(1, 1, [-1])
    with pytest.raises(NativeError, match="out of range"):
        st.gather(0, 0, [0])                     # layer 0 holds nothing yet
    row = {"f32": 4 * d, "f16": 2 * d, "q8_0": d // 32 * 34, "q4_0": d // 32 * 18}
    assert st.nbytes_used == n * G * (row[kt] + row[vt])
    st.close()


@pytest.mark.parametrize("kt,vt", [("q8_0", "q4_0"), ("q4_0", "f32")])
def test_quantized_store_in_a_spill_file(tmp_path, rng, kt, vt):
    """A spill file holding blocks: rows across the reservation chunks come back as written,
    layers do not overlap, and nothing is left in the directory."""
    G, d = 2, 32
    st = KVStore(3, G, d, capacity=2600, spill_dir=tmp_path, dtype=kt, dtype_v=vt)
    k, v = values(rng, (2500, G, d)), values(rng, (2500, G, d))
    st.append(2, k, v)
    st.append(0, k[:10], v[:10])
    st.append(1, -k[:7], -v[:7])
    assert os.listdir(tmp_path) == []
    idx = rng.choice(2500, 60, replace=False)
    for g in range(G):
        gk, gv = st.gather(2, g, idx)
        assert np.array_equal(gk.astype(np.float64), held64(k[idx, g], kt))
        assert np.array_equal(gv.astype(np.float64), held64(v[idx, g], vt))
    assert np.array_equal(st.values(0).astype(np.float64), held64(v[:10], vt))
    assert np.array_equal(st.keys(1).astype(np.float64), held64(-k[:7], kt))
    st.close()
    assert os.listdir(tmp_path) == []


def test_block_rows_need_whole_blocks():
    with pytest.raises(ValueError, match="multiple of 32"):
        KVStore(1, 1, 48, capacity=16, dtype="q8_0")
    with pytest.raises(ValueError, match="row type"):
        KVStore(1, 1, 64, capacity=16, dtype="q5_1")
    with pytest.raises(ValueError, match="float32, float16, q8_0 or q4_0"):
        KVStore(1, 1, 64, capacity=16, dtype=np.int8)
