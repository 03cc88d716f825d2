"""kernels/kv_write.cu on the CPU shim: the decode step's KV append of every sequence through
device tables (addresses, strides, rows), against numpy on fresh random rows; f16 rounding as
numpy's astype (round to nearest even); rows outside a buffer write nothing."""
from __future__ import annotations

import numpy as np
import pytest

from cuda_shim import shim_module




@pytest.mark.parametrize("dt", [np.float32, np.float16])
@pytest.mark.parametrize("G,d", [(1, 64), (4, 80), (2, 256)])
def test_write_rows_tab(rng, dt, G, d):
    caps = [5, 9, 1, 7]
    pads = [0, 3, 1, 0]                      # extra rows between heads (head stride > cap * d)
    bufs = [np.full((G, c + p, d), 7, dt) for c, p in zip(caps, pads)]
    rows = np.array([4, 0, 0, 7], np.int32)   # the last one is outside its buffer: not written
    S = len(caps)
    src = rng.standard_normal((S, G, d)).astype(np.float32)
    ptr = np.array([b.ctypes.data for b in bufs], np.uint64)
    hs = np.array([(c + p) * d for c, p in zip(caps, pads)], np.int64)
    kind = "f16" if dt == np.float16 else "f32"
    shim_module("kv_write").get_function(f"write_rows_tab_{kind}")(
        (S, G), (min(256, -(-d // 32) * 32),),
        (ptr, hs, np.array(caps, np.int32), rows, src, np.int32(G), np.int32(d)))
    for s, (b, c) in enumerate(zip(bufs, caps)):
        want = np.full_like(b, 7)
        if 0 <= rows[s] < c:
            want[:, rows[s]] = src[s].astype(dt)
        np.testing.assert_array_equal(b, want)
