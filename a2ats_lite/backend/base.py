"""The backend seam: every numerical operation and buffer of the forward pass.

The forward pass (model/forward.py), the KV storage and the selection policies
are written once against this protocol; a backend (cpu.py: numpy + the native
library; cuda.py: CuPy + RawKernels) implements it. Arrays a backend returns
are its own ("device arrays"); only to_host() gives numpy, and only logits
leave through it. Shapes: N stacked rows of a step, H query heads, G KV heads,
g = H // G query heads per KV head, d head dim, S sequences of a decode step.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Protocol


def phase(profile: dict | None, name: str, sync=None):
    """A context adding the time of its body to profile[name] (a backend's retrieval phases,
    for benchmarks); sync() runs on both sides (a device's queue). profile None: nothing."""
    return nullcontext() if profile is None else _timed(profile, name, sync)


@contextmanager
def _timed(profile: dict, name: str, sync):
    if sync is not None:
        sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if sync is not None:
            sync()
        profile[name] = profile.get(name, 0.0) + time.perf_counter() - t0


class Backend(Protocol):
    name: str
    # slots of the row cache of retrieved rows (kv/rowcache.py) per selected row, 0: no
    # cache (the host backend reads the store in place)
    row_cache: float

    # -- buffers and weights --------------------------------------------------------
    def empty(self, shape, dtype): ...
    def matrix(self, name: str, ggml_type: int, n_out: int, n_in: int, raw): ...
    def matrix_from_array(self, name: str, a): ...              # float weights (tests, tiny models)
    def vector(self, a): ...
    def zeros(self, shape, dtype): ...
    def asarray(self, a): ...                                   # a host array's device copy
    def to_host(self, x): ...
    def memory_info(self): ...                                  # (free, total) bytes, or None (host)

    # -- the forward pass -----------------------------------------------------------
    def embed(self, w, ids, scale: float): ...                  # (N,) -> (N, n_embd)
    def matmul(self, w, x, bias=None): ...                      # (N, n_in) -> (N, n_out)
    def rms_norm(self, x, w, eps: float): ...                   # over the last axis
    def rope(self, x, positions, rope): ...                     # (N, h, d) -> new (N, h, d)
    def gated(self, gate, up, act: str): ...                    # act(gate) * up, in place on gate
    def softcap(self, x, cap: float): ...
    def add(self, x, y): ...                                    # x += y, returns x
    def scale(self, x, s: float): ...                           # a scaled copy
    def take_rows(self, x, rows): ...
    def argmax(self, logits): ...                               # (m, V) -> host (m,) int64, first on ties

    def append_rows(self, dst: list, rows, src): ...             # decode KV append, (S, G, d)

    # -- attention --------------------------------------------------------------------
    def attention(self, q, k, v, q_pos, k_pos0: int, window, scale: float): ...
    def decode_attention(self, q, bufs: list, positions, window, scale: float): ...
    def sparse_attention(self, q, keys: list, values: list, idx, lens, scale: float,
                         cached=None): ...                      # cached: RowCache per sequence

    # -- selection: scoring, top-K, gather ---------------------------------------------
    def dot_scores(self, q, k): ...                             # (g, d) x (n, d) -> (g, n)
    def lut_lookup(self, lut, codes): ...                       # (g, M, C) x (M, n) -> (g, n)
    def quest_bounds(self, q, kmin, kmax): ...                  # (g, d) x (P, d) -> (g, P)
    def topk_union(self, scores, k: int): ...                   # (g, n) -> sorted union of top-k
    def build_lut(self, q, centroids): ...                      # (S,G,g,d) x (G,M,C,ds) -> (S,G,g,M,C)
    def select_topk(self, lut, codes: list, T, sinks: int, window: int, k: int): ...
    def group_matmul(self, q, W): ...                           # (S,G,g,d) x (G,d,e) -> (S,G,g,e)
    def code_assigner(self, books): ...                         # -> f(keys, codes, first): VQ codes
    def gather(self, rows, idx): ...                            # host store rows -> (m, d)
