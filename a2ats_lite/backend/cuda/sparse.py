"""Retrieval attention of the CUDA backend: decode queries over the rows a KV policy selected
from the host store (kernels attention_gtd.cu attn_gtd_decode[_idx], kv_write.cu put_rows).

Three ways, chosen by `sparse` ("auto": by measurement, PathChooser):
    host   the native library attends the selected rows in host memory; only the queries
           go down and the (S, G, g, d) output comes up
    gpu    the selected rows are gathered (native.gather_sel) into pinned staging in chunks,
           copied up on the copy stream (the gather of one chunk overlapping the copy of the
           last) and attended by the flash-decoding kernel, each (sequence, KV head) as one
           short sequence
    gpu + row cache   the backend keeps a RowCache (rowcache.py) per (sequence, layer): a step
           fetches only the rows its selection adds, writes them into free slots and attends
           through the slot lists. The caches are the backend's: created on first use,
           forgotten past a position by forget_rows, freed by release, counted by held_bytes.
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np

from ... import native
from .common import KV_TYPES, cdiv, i32
from .rowcache import RowCache, cache_slots

PUT_ROWS = 8                        # kv_write.cu put_rows: rows per block


def fetch_chunks(rows: np.ndarray, most: int, least: int) -> list[tuple[int, int]]:
    """[e0, e1) ranges of entries cutting sum(rows) into up to `most` chunks of about equal
    rows, each at least `least` rows (except a lone one); entries with rows fall in one."""
    total = int(rows.sum())
    n = max(1, min(most, total // max(1, least)))
    if total == 0:
        return []
    cum = np.cumsum(rows)
    cuts = np.searchsorted(cum, [total * i / n for i in range(1, n)], side="left") + 1
    edges = [0] + sorted({int(c) for c in cuts if 0 < c < len(rows)}) + [len(rows)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if rows[a:b].sum()]


class PathChooser:
    """sparse="auto": where a retrieval layer's decode attention runs, by measurement. Per
    kind of call (batch size and mean selected rows per (sequence, KV head), each rounded
    up to a power of two): one untimed call of the GPU path (it fills the row caches), then
    `trials` timed calls of it, `trials` of the host path, and from then on the path with
    the lower median time (choice: kind -> path)."""
    PATHS = ("gpu", "host")

    def __init__(self, trials: int = 3):
        self.trials = int(trials)
        self.times: dict = {}
        self.choice: dict = {}

    @staticmethod
    def key(S: int, lens: np.ndarray) -> tuple[int, int]:
        rows = float(lens.mean()) if lens.size else 0.0
        return 1 << max(0, S - 1).bit_length(), 1 << max(0, math.ceil(rows) - 1).bit_length()

    def next(self, key) -> tuple[str, bool]:
        """(path, whether to time it) for the next call of this kind."""
        if key in self.choice:
            return self.choice[key], False
        t = self.times.get(key)
        if t is None:
            self.times[key] = {p: [] for p in self.PATHS}
            return "gpu", False
        return ("gpu" if len(t["gpu"]) < self.trials else "host"), True

    def record(self, key, path: str, seconds: float) -> None:
        t = self.times[key]
        t[path].append(seconds)
        if all(len(v) >= self.trials for v in t.values()):
            self.choice[key] = min(self.PATHS, key=lambda p: statistics.median(t[p]))


class Sparse:
    """The CUDA backend's part that attends selected host-store rows and owns the row caches."""

    def _init_sparse(self, sparse: str, row_cache: float, fetch_chunks: int, chunk_rows: int) -> None:
        if sparse not in ("auto", "gpu", "host"):
            raise ValueError(f"sparse must be 'auto', 'gpu' or 'host', got {sparse!r}")
        self.sparse = sparse
        row_cache = float(row_cache)
        if not (row_cache == 0 or 1 <= row_cache < math.inf):
            raise ValueError(f"row_cache must be 0 (off) or >= 1 slots per selected row, got {row_cache}")
        self.row_cache = row_cache if sparse != "host" else 0.0
        self.chooser = PathChooser()        # sparse="auto": the path per kind of call
        self._clock = time.perf_counter
        self.fetch_stats = {"selected": 0, "fetched": 0}    # rows over (sequence, layer, head)
        self._row_err = None                # device error word of the row-cache kernels
        if int(fetch_chunks) < 1 or int(chunk_rows) < 1:
            raise ValueError(f"fetch_chunks and chunk_rows must be >= 1, got {fetch_chunks}, {chunk_rows}")
        self.fetch_chunks, self.chunk_rows = int(fetch_chunks), int(chunk_rows)
        self._row_caches: dict = {}         # sequence key -> {layer: RowCache}

    def sparse_attention(self, q, keys, values, idx, lens, scale: float, seqs=None, layer=None):
        """Decode queries over their selected rows of the host store (as CPUBackend's):
        q (S, G, g, d) post-RoPE; keys/values per sequence (G, cap, d) store arrays; idx
        (S, G, Kmax), lens (S, G). seqs (S keys naming the sequences) and layer: with a row
        cache, the cache of each (seqs[i], layer) (made on first use) is used, so only the
        rows it does not hold are gathered and copied. -> (S, G, g, d) float32."""
        if seqs is not None and layer is None:
            raise ValueError("sparse_attention: seqs given without their layer")
        idx = np.ascontiguousarray(self._host(idx), dtype=np.int64)
        lens = np.ascontiguousarray(self._host(lens), dtype=np.int32)
        path, key, timed = self.sparse, None, False
        if path == "auto":
            key = self.chooser.key(idx.shape[0], lens)
            path, timed = self.chooser.next(key)
        t0 = self._clock()
        self.fetch_stats["selected"] += int(lens.sum())
        if path == "host":          # only queries down and outputs up cross the bus
            with self._phase("attention"):
                out = native.sparse_attention(np.ascontiguousarray(self._host(q), dtype=np.float32),
                                              keys, values, idx, lens, scale)
                out = self._upload(out, "attention output")
        else:
            dt = np.dtype(keys[0].dtype)
            if dt not in KV_TYPES:
                raise ValueError(f"sparse_attention: store rows of type {dt}; expected f16 or f32")
            q = self._dev(q, np.float32)
            if seqs is not None and self.row_cache:
                caches = self._caches_of(seqs, layer, q.shape[1], q.shape[3], dt)
                out = self._sparse_cached(q, keys, values, idx, lens, caches, dt, scale)
            else:
                out = self._sparse_gathered(q, keys, values, idx, lens, dt, scale)
        if timed:
            self._sync()
            self.chooser.record(key, path, self._clock() - t0)
        return out

    def _sparse_gathered(self, q, keys, values, idx, lens, dt, scale: float):
        """sparse_attention without a row cache: every selected row fetched, attended from
        the gathered copy. q (S, G, g, d) on the device."""
        S, G, g, d = q.shape
        kmax = idx.shape[2]
        kd, vd = self._fetch(keys, values, idx, lens, d, dt)
        rows = np.arange(S * G, dtype=np.uint64) * np.uint64(kmax * d * dt.itemsize)
        out = self._attend_entries(q, np.uint64(self._ptr(kd)) + rows,
                                   np.uint64(self._ptr(vd)) + rows, lens, dt, scale)
        del kd, vd          # (stream-ordered frees, after the kernels)
        return out

    def _attend_entries(self, q, k_tab, v_tab, lens, dt, scale: float, rows=None):
        """Flash decoding with every (sequence, KV head) as one "sequence" of one KV head:
        q (S, G, g, d); k_tab / v_tab (S*G,) device addresses of each entry's K / V rows,
        lens (S, G) rows each; rows: (slot lists, slots per entry) to read them through
        (the row cache). -> (S, G, g, d) float32."""
        S, G, g, d = q.shape
        table = np.stack([k_tab, v_tab], 1)
        strides = np.zeros((S * G, 2), dtype=np.int64)      # one KV head per entry
        spans = np.stack([np.zeros(S * G, np.int32), lens.reshape(-1)], 1)
        with self._phase("attention"):
            out = self._decode_table(q.reshape(S * G, g, d), table, strides, spans, 1,
                                     f"k{KV_TYPES[dt]}_v{KV_TYPES[dt]}", scale, rows=rows)
        return out.reshape(S, G, g, d)

    def _fetch(self, keys, values, idx, lens, d: int, dt):
        """Rows idx[s, k, :lens[s, k]] of the host store -> device (S, G, Kmax, d) K and V of
        the store's dtype. In chunks of (sequence, KV head) entries: the native library
        gathers a chunk into pinned staging while the copy stream takes the previous chunk
        up (two staging buffers in turn)."""
        S, G, kmax = idx.shape
        flat = lens.reshape(-1)
        self.fetch_stats["fetched"] += int(flat.sum())
        kd = self._new((S, G, kmax, d), dt, "gathered keys")
        vd = self._new((S, G, kmax, d), dt, "gathered values")
        for e0, e1 in fetch_chunks(flat, self.fetch_chunks, self.chunk_rows):
            part = np.zeros_like(flat)
            part[e0:e1] = flat[e0:e1]
            slot, st = self._staging((2, S * G, kmax, d), dt)
            with self._phase("gather"):
                native.gather_sel(keys, values, idx, part.reshape(S, G),
                                  st[0].reshape(S, G, kmax, d), st[1].reshape(S, G, kmax, d))
            with self._phase("h2d"):
                self._copy_up(slot, st, (kd, vd), e0, e1)
        return kd, vd

    def _sparse_cached(self, q, keys, values, idx, lens, caches, dt, scale: float):
        """sparse_attention through the row caches: plan (hits keep their slots, misses
        take free ones), fetch the misses, write them into their slots (put_rows), then
        flash decoding over each (sequence, KV head)'s slot list in selection order (the
        same sums as over a gathered copy). q (S, G, g, d) on the device."""
        S, G, g, d = q.shape
        if len(caches) != S or len({id(c) for c in caches}) != S:
            raise ValueError(f"sparse_attention: {len(caches)} row caches for {S} sequences "
                             "(one per sequence, each once)")
        self._check_row_err()
        with self._phase("plan"):
            for s, c in enumerate(caches):
                if c.dtype != dt or c.G != G or c.d != d:
                    raise ValueError(f"sparse_attention: row cache {s} holds ({c.G}, {c.d}) "
                                     f"{c.dtype} rows, the store ({G}, {d}) {dt}")
                c.reserve(int(lens[s].max(initial=0)), self.row_cache, keys[s].shape[1])
            slots, miss_idx, miss_slot, miss_n = native.rowcache_plan(
                idx, lens, *[list(m) for m in zip(*(c.maps() for c in caches))])
        item = dt.itemsize
        heads = np.array([[c.n_slots * d * item * k for k in range(G)] for c in caches], np.uint64)
        k_tab = (np.array([self._ptr(c.k) for c in caches], np.uint64)[:, None] + heads).reshape(-1)
        v_tab = (np.array([self._ptr(c.v) for c in caches], np.uint64)[:, None] + heads).reshape(-1)
        caps = np.repeat(np.array([c.n_slots for c in caches], np.int32), G)
        m = int(miss_n.max(initial=0))
        if m:
            kd, vd = self._fetch(keys, values, np.ascontiguousarray(miss_idx[:, :, :m]), miss_n, d, dt)
            with self._phase("h2d"):
                kt, vt, cap_d, slot_d, n_d = self._h2d_pack(
                    k_tab, v_tab, caps, np.ascontiguousarray(miss_slot[:, :, :m]).reshape(-1),
                    miss_n.reshape(-1))
                self._fn("kv_write", f"put_rows_{KV_TYPES[dt]}")(
                    (S * G, cdiv(m, PUT_ROWS)), (128,),
                    (kd, vd, kt, vt, cap_d, slot_d, n_d, i32(m), i32(d), self._row_err_word()))
            del kd, vd
        out = self._attend_entries(q, k_tab, v_tab, lens, dt, scale,
                                   rows=(slots.reshape(S * G, -1), caps))
        del caches          # (the buffers behind the tables outlive the kernels: stream order)
        return out

    def _row_err_word(self):
        if self._row_err is None:
            self._row_err = self.xp.zeros(1, dtype=np.int32)
        return self._row_err

    def _check_row_err(self) -> None:
        """Raise if a row-cache kernel met an index it had to skip (a bookkeeping bug: the
        plan is checked on the host); read when the stream is idle anyway (after a select)."""
        if self._row_err is not None:
            e = int(self.to_host(self._row_err)[0])
            if e:
                self._row_err[...] = 0
                raise RuntimeError(f"row cache: kernel error flags {e} (1: attention slot, "
                                   "2: fill slot or count out of range)")

    # -- the row caches: one per (sequence, layer), this backend's memory ------------------
    def _caches_of(self, seqs, layer: int, G: int, d: int, dt) -> list:
        """The row cache of (seq, layer) for each of seqs, made on first use."""
        out = []
        for seq in seqs:
            by_layer = self._row_caches.setdefault(seq, {})
            c = by_layer.get(layer)
            if c is None:
                c = by_layer[layer] = RowCache(self, G, d, dt)
            out.append(c)
        return out

    def forget_rows(self, seq, n: int) -> None:
        """Forget seq's cached rows of tokens >= n (truncation, rollback): their positions
        will hold other rows."""
        for c in self._row_caches.get(seq, {}).values():
            c.truncate(n)

    def release(self, seq) -> None:
        """Free every row cache of seq."""
        self._row_caches.pop(seq, None)

    def held_bytes(self, seq=None) -> int:
        """Bytes of the row caches of seq (None: of every sequence)."""
        held = self._row_caches.values() if seq is None else [self._row_caches.get(seq, {})]
        return sum(c.nbytes() for by_layer in held for c in by_layer.values())

    def estimate_held_bytes(self, layers, dtype) -> int:
        """Bytes of one sequence's row caches at their largest: layers lists (n_kv_heads,
        head_dim, the most rows a selection of a KV head holds) of each retrieval layer;
        dtype the store's."""
        if not self.row_cache:
            return 0
        item = np.dtype(dtype).itemsize
        return sum(RowCache.estimate_bytes(G, d, cache_slots(sel, self.row_cache), item)
                   for G, d, sel in layers)
