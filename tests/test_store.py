"""The offloaded KV store: exact rows back, bounds checks, nothing left on disk."""
import os

import numpy as np
import pytest

from a2ats_lite.errors import ContextOverflowError, NativeError
from a2ats_lite.kv.store import KVStore


@pytest.mark.parametrize("spill", [False, True])
def test_append_and_gather_return_exact_rows(tmp_path, spill):
    rng = np.random.default_rng(0)
    st = KVStore(3, 2, 16, capacity=1000, spill_dir=tmp_path if spill else None)
    k = rng.standard_normal((700, 2, 16)).astype(np.float32)
    v = rng.standard_normal((700, 2, 16)).astype(np.float32)
    st.append(1, k[:300], v[:300])
    st.append(1, k[300:], v[300:])
    idx = rng.choice(700, 50, replace=False)
    gk, gv = st.gather(1, idx)
    np.testing.assert_array_equal(gk, k[idx])
    np.testing.assert_array_equal(gv, v[idx])
    np.testing.assert_array_equal(st.keys(1), k)
    assert st.n.tolist() == [0, 700, 0]
    st.close()


def test_gather_refuses_rows_not_yet_stored():
    st = KVStore(1, 1, 8, capacity=100)
    st.append(0, np.ones((10, 1, 8), np.float32), np.ones((10, 1, 8), np.float32))
    with pytest.raises(NativeError, match="row index 10 out of range"):
        st.gather(0, [3, 10])


def test_capacity_overflow_is_clear():
    st = KVStore(1, 1, 8, capacity=4)
    with pytest.raises(ContextOverflowError, match="capacity 4"):
        st.append(0, np.ones((5, 1, 8), np.float32), np.ones((5, 1, 8), np.float32))


def test_spill_files_never_left_behind(tmp_path):
    st = KVStore(2, 1, 64, capacity=4096, spill_dir=tmp_path)
    st.append(0, np.ones((100, 1, 64), np.float32), np.ones((100, 1, 64), np.float32))
    assert os.listdir(tmp_path) == []       # unlinked from the start
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        pass
    st.close()
    assert os.listdir(tmp_path) == []


def test_large_capacity_costs_no_memory_up_front():
    # 64K tokens x 18 layers x 256 dims x 2 x 4 B = 2.4 GB of address space, untouched
    st = KVStore(18, 1, 256, capacity=65536)
    st.append(5, np.ones((3, 1, 256), np.float32), np.ones((3, 1, 256), np.float32))
    assert st.gather(5, [2])[0].sum() == 256
    st.close()
