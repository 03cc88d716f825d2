"""The backend seam: every numerical operation and buffer of the forward pass.

The forward pass (model/forward.py), the KV storage and the selection policies
are written once against this protocol; a backend (cpu.py: numpy + the native
library; cuda/: CuPy + RawKernels) implements it and declares what it can do in
`caps` (read it; never probe a backend for methods). Arrays a backend returns
are its own ("device arrays"); only to_host() gives numpy, and only logits
leave through it. Shapes: N stacked rows of a step, H query heads, G KV heads,
g = H // G query heads per KV head, d head dim, S sequences of a decode step.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Caps:
    """What a backend can do, declared once."""
    host_memory: bool           # its arrays are numpy arrays in host memory
    graphs: bool                # graph_step replays decode steps as CUDA graphs
    row_cache: float            # slots of its cache of retrieved rows per selected row (0: none,
                                # the store is read in place)
    tensor_types: frozenset     # the GGML type ids `matrix` can run
    f32_cache: bool             # keep_f32(m, keep): float32 copies of quantized weights
    fast_scan: bool = False     # select_fastscan / fastscan_pack: 4-bit codes scored by 8-bit LUTs
    rerank: bool = False        # rerank: a layer's exact re-rank of code selections in one call
    # the KV cache types its attention reads (llama.cpp's --cache-type-k/-v names): f32 / f16
    # (G, capacity, d) buffers; q8_0 / q4_0 uint8 (G, capacity, row_bytes) ggml blocks
    kv_types: frozenset = frozenset({"f32", "f16"})


class Matrix:
    """A (n_out, n_in) weight a backend holds in its GGUF encoding (raw: the backend's array
    of it); the backends' matrix classes add how they multiply."""

    def __init__(self, name: str, ggml_type: int, n_out: int, n_in: int, raw):
        self.name, self.ggml_type, self.n_out, self.n_in = name, int(ggml_type), int(n_out), int(n_in)
        self.raw = raw

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    @property
    def f32_nbytes(self) -> int:
        return self.n_out * self.n_in * 4


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
    caps: Caps

    @property
    def host(self) -> bool: ...                                 # caps.host_memory

    # -- buffers and weights --------------------------------------------------------
    def empty(self, shape, dtype): ...
    def matrix(self, name: str, ggml_type: int, n_out: int, n_in: int, raw): ...
    def matrix_from_array(self, name: str, a): ...              # float weights (tests, tiny models)
    def vector(self, a): ...
    def zeros(self, shape, dtype): ...
    def asarray(self, a): ...                                   # a host array's device copy
    def to_host(self, x): ...
    def memory_info(self): ...                                  # (free, total) bytes, or None (host)
    # caps.f32_cache only: keep_f32(m, keep) keeps (or not) m's float32 copy

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
    def argmax(self, logits): ...                               # (m, V) -> host (m,) int64, first on ties; -1: no finite max
    # caps.graphs only: graph_step(key, run, max_keys, rollback) runs run() as a CUDA graph

    def append_rows(self, dst: list, rows, src): ...             # decode KV append, (S, G, d)

    # -- attention --------------------------------------------------------------------
    def attention(self, q, k, v, q_pos, k_pos0: int, window, scale: float): ...
    def decode_attention(self, q, bufs: list, positions, window, scale: float): ...
    def sparse_attention(self, q, keys: list, values: list, idx, lens, scale: float,
                         seqs=None, layer=None): ...            # seqs/layer: the row caches used

    # -- what the backend holds per sequence (its row caches; caps.row_cache 0: nothing) --
    # seq: any hashable naming one sequence among every user of the backend
    def forget_rows(self, seq, n: int) -> None: ...             # rows of tokens >= n
    def release(self, seq) -> None: ...                         # everything held for seq
    def held_bytes(self, seq=None) -> int: ...                  # bytes held for seq (None: all)
    def estimate_held_bytes(self, layers, dtype) -> int: ...    # layers: (G, d, most selected rows)

    # -- selection: scoring, top-K, gather ---------------------------------------------
    def dot_scores(self, q, k): ...                             # (g, d) x (n, d) -> (g, n)
    def lut_lookup(self, lut, codes): ...                       # (g, M, C) x (M, n) -> (g, n)
    def quest_bounds(self, q, kmin, kmax): ...                  # (g, d) x (P, d) -> (g, P)
    def topk_union(self, scores, k: int): ...                   # (g, n) -> sorted union of top-k
    def build_lut(self, q, centroids): ...                      # (S,G,g,d) x (G,M,C,ds) -> (S,G,g,M,C)
    def select_topk(self, lut, codes: list, T, sinks: int, window: int, k: int): ...
    def group_matmul(self, q, W): ...                           # (S,G,g,d) x (G,d,e) -> (S,G,g,e)
    def code_assigner(self, books): ...                         # -> f(keys, codes, first): VQ codes
    # caps.fast_scan only: select_fastscan(lut, blocks: list, T, sinks, window, k) (select_topk
    # on 4-bit codes packed in blocks of 32 tokens, quantized scores), fastscan_pack(codes, blocks, first)
    # caps.rerank only: rerank(q (S,G,g,d), keys: list of host store (G, cap, d), idx, lens, T, sinks,
    # window, k) -> (idx, lens, candidates (S, G)): each head's top-k by q.k among the selected
    def gather(self, rows, idx): ...                            # host store rows -> (m, d)
