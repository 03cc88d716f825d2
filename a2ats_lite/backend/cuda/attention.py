"""Dense attention of the CUDA backend over the KV cache's backend buffers, and the KV
append of decode rows (kernels attention_gtd.cu, kv_write.cu).

Attention reads the LayerBuffer views (G, T, d) of the KV cache in place (f32 or f16 K and V,
independently): flash decoding (split + combine) for one query row per sequence, a tiled
causal / sliding-window kernel for more rows of one sequence. The flash-decoding launch reads
every sequence's cache address, head stride and visible span from tables (data, so a CUDA
graph replays it); the sparse path (sparse.py) uses the same launch over gathered rows or
the row cache's slots.
"""
from __future__ import annotations

import numpy as np

from .common import KV_TYPES, allow_smem, block32, cdiv, f32, i32

GTD_DMAX = 256                      # attention_gtd.cu limits
GTD_PF_ROWS, GTD_PF_KEYS = 8, 32


class Attention:
    """The CUDA backend's part that attends the dense KV cache."""

    def _init_attention(self, decode_split_len: int | None) -> None:
        self.decode_split_len = decode_split_len

    def append_rows(self, dst, rows, src) -> None:
        """src (S, G, d) float32: row s into sequence s's (G, cap, d) buffer dst[s] at row
        rows[s], every sequence in one launch (kernels/kv_write.cu) through a table of
        addresses, head strides, capacities and rows (data, so a graph replays it)."""
        src = self._dev(src, np.float32)
        S, G, d = src.shape
        kinds = {np.dtype(b.dtype) for b in dst}
        if len(kinds) != 1 or next(iter(kinds)) not in KV_TYPES:
            raise ValueError(f"append_rows: buffers of one f16/f32 type needed, got {kinds}")
        dt = kinds.pop()
        for b in dst:
            if b.shape[0] != G or b.shape[2] != d or b.strides[1] != d * dt.itemsize \
                    or b.strides[2] != dt.itemsize:
                raise ValueError(f"append_rows: buffer {b.shape} does not take rows ({G}, {d})")
        rows = np.asarray(rows, dtype=np.int64)
        caps = np.array([b.shape[1] for b in dst], np.int32)
        if (rows < 0).any() or (rows >= caps).any():
            raise ValueError(f"append_rows: rows {rows.tolist()} outside buffers of {caps.tolist()}")
        ptr, hs, cap, row = self._h2d_pack(
            np.array([self._ptr(b) for b in dst], np.uint64),
            np.array([b.strides[0] // dt.itemsize for b in dst], np.int64), caps,
            rows.astype(np.int32))
        self._fn("kv_write", f"write_rows_tab_{KV_TYPES[dt]}")(
            (S, G), (block32(d),), (ptr, hs, cap, row, src, i32(G), i32(d)))

    def _kv_arg(self, a, what: str):
        """A cache view (G, T, d) as the kernel reads it: (array, head stride in elements)."""
        if self.on_gpu and isinstance(a, np.ndarray):   # host store rows (prefill of a
            a = self._upload(np.ascontiguousarray(a), what)   # retrieval layer): copied up
        dt = np.dtype(a.dtype)
        if dt not in KV_TYPES:
            a = self.xp.ascontiguousarray(a, dtype=np.float32)
            dt = np.dtype(np.float32)
        G, T, d = a.shape
        item = dt.itemsize
        s0, s1, s2 = a.strides
        if (s2 != item or s1 != d * item or s0 % item) and T > 0:
            a = self.xp.ascontiguousarray(a)
            s0 = a.strides[0]
        return a, s0 // item, KV_TYPES[dt]

    def attention(self, q, k, v, q_pos, k_pos0: int, window, scale: float):
        """Causal (+ sliding window) attention of one sequence's query rows over its cached
        K/V view, as CPUBackend.attention: q (n, H, d) post-RoPE; k, v (G, T, d) of positions
        k_pos0 .. k_pos0 + T - 1 (f32 or f16 each); q_pos (n,). Returns (n, H, d) float32."""
        q = self._dev(q, np.float32)
        n, H, d = q.shape
        G, T = k.shape[0], k.shape[1]
        if H % G or d > GTD_DMAX or tuple(v.shape[:2]) != (G, T) or k.shape[2] != d:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}: need H % G == 0, "
                             f"matching K/V and head_dim <= {GTD_DMAX}")
        pos = np.asarray(self.to_host(q_pos) if not isinstance(q_pos, (np.ndarray, list, tuple))
                         else q_pos, dtype=np.int64).reshape(-1)
        out = self._new((n, H, d), np.float32, "attention output")
        if n == 0:
            return out
        if len(pos) != n:
            raise ValueError(f"attention: {len(pos)} positions for {n} query rows")
        k_pos0 = int(k_pos0)
        lo = k_pos0 if window is None else max(k_pos0, int(pos.min()) - int(window) + 1)
        hi = int(pos.max()) + 1
        if hi > k_pos0 + T or k_pos0 >= hi or lo >= hi:
            raise ValueError(f"attention: no keys for positions {int(pos.min())}..{int(pos.max())} "
                             f"(cached {k_pos0}..{k_pos0 + T - 1})")
        kk, ks, kt = self._kv_arg(k, "K")
        vv, vs, vt = self._kv_arg(v, "V")
        suffix = f"k{kt}_v{vt}"
        win = 0 if window is None else int(window)
        if n == 1:
            return self._decode(q, [(kk, ks, vv, vs, lo - k_pos0, hi - k_pos0)], suffix,
                                scale).reshape(1, H, d)
        smem = self._prefill_smem(d, kk.dtype.itemsize, vv.dtype.itemsize)
        fn = self._fn("attention_gtd", f"attn_gtd_prefill_{suffix}")
        allow_smem(fn, smem)
        fn((cdiv(n, GTD_PF_ROWS), H), (128,),
           (q, kk, vv, self._h2d(pos, np.int32), out, i32(n), i32(H), i32(G),
            i32(d), np.int64(ks), np.int64(vs), i32(T), i32(k_pos0), i32(win), f32(scale)),
           shared_mem=smem)
        return out

    def decode_attention(self, q, bufs, positions, window, scale: float):
        """One decode query per sequence over its cached rows, read in place (as
        CPUBackend.decode_attention): q (S, G, g, d) post-RoPE; bufs per sequence
        (K, V (G, cap, d), pos0, n); positions (S,). -> (S, G, g, d) float32.
        One flash-decoding launch (+ combine) for every sequence: a device table of each
        sequence's K/V buffer address and head stride."""
        q = self._dev(q, np.float32)
        S, G, g, d = q.shape
        pos = np.asarray(self.to_host(positions) if not isinstance(positions, (np.ndarray, list, tuple))
                         else positions, dtype=np.int64).reshape(-1)
        if len(pos) != S or len(bufs) != S:
            raise ValueError(f"decode_attention: {S} queries, {len(pos)} positions, {len(bufs)} buffers")
        entries, suffix = [], None
        for (K, V, pos0, n), p in zip(bufs, pos):
            p, pos0, n = int(p), int(pos0), int(n)
            lo = pos0 if window is None else max(pos0, p - int(window) + 1)
            if not pos0 <= lo <= p < pos0 + n:
                raise ValueError(f"attention: no keys for position {p} (cached {pos0}..{pos0 + n - 1})")
            kk, ks, kt = self._kv_arg(K[:, :n], "K")
            vv, vs, vt = self._kv_arg(V[:, :n], "V")
            if suffix not in (None, f"k{kt}_v{vt}"):
                raise ValueError("decode_attention: every sequence's cache must have one K/V type")
            suffix = f"k{kt}_v{vt}"
            entries.append((kk, ks, vv, vs, lo - pos0, p + 1 - pos0))
        if not entries:
            return self._new((0, G, g, d), np.float32, "attention output")
        return self._decode(q.reshape(S, G * g, d), entries, suffix, scale).reshape(S, G, g, d)

    def _decode(self, q, entries, suffix: str, scale: float):
        """Flash decoding of one query row per sequence: q (S, H, d) contiguous; entries per
        sequence (K view, K head stride, V view, V head stride, j_lo, j_hi): the visible keys
        [j_lo, j_hi) of the view. -> (S, H, d) float32."""
        table = np.array([[self._ptr(e[0]), self._ptr(e[2])] for e in entries], dtype=np.uint64)
        strides = np.array([[e[1], e[3]] for e in entries], dtype=np.int64)
        spans = np.array([[e[4], e[5]] for e in entries], dtype=np.int32)
        out = self._decode_table(q, table, strides, spans, entries[0][0].shape[0], suffix, scale)
        # the views behind the pointer table must outlive the launches (numpy: synchronous;
        # cupy: the stream orders the frees after the kernels)
        del entries
        return out

    def _decode_table(self, q, table, strides, spans, G: int, suffix: str, scale: float,
                      rows=None):
        """The flash-decoding launch (+ combine) for one query row per sequence: q (S, H, d);
        per sequence its K and V device addresses table (S, 2) uint64, head strides (S, 2)
        int64 (elements) and visible keys spans (S, 2) int32 [j_lo, j_hi) of G KV heads.
        rows: (list (S, W) int32, n_rows (S,) int32): key j is row list[s, j] of the view
        (attn_gtd_decode_idx: the row cache's slots)."""
        S, H, d = q.shape
        nk = int((spans[:, 1] - spans[:, 0]).max())
        if self._rec.mode is not None:
            # a graph's grid cannot follow the context: splits cover the longest possible one
            # (the splits past a sequence's keys write empty partials)
            nk = max(nk, self._rec.max_keys)
        if nk <= 0:        # nothing visible anywhere (empty selections): zeros, as on the CPU
            out = self._new((S, H, d), np.float32, "attention output")
            self._fill(out, 0)
            return out
        split = int(self.decode_split_len or max(64, cdiv(nk, 128)))
        n_splits = cdiv(nk, split)
        # per-sequence device pointers, strides and spans (one upload): one launch for all
        k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi = self._h2d_pack(
            np.ascontiguousarray(table[:, 0], np.uint64), np.ascontiguousarray(table[:, 1], np.uint64),
            np.ascontiguousarray(strides[:, 0], np.int64), np.ascontiguousarray(strides[:, 1], np.int64),
            np.ascontiguousarray(spans[:, 0], np.int32), np.ascontiguousarray(spans[:, 1], np.int32))
        pm = self._new((S, H, n_splits), np.float32, "attention partials")
        pl = self._new((S, H, n_splits), np.float32, "attention partials")
        po = self._new((S, H, n_splits, d), np.float32, "attention partials")
        out = self._new((S, H, d), np.float32, "attention output")
        args = (q, k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi, pm, pl, po, i32(H), i32(G), i32(d),
                i32(split), f32(scale))
        name = f"attn_gtd_decode_{suffix}"
        if rows is not None:
            lst, n_rows = rows
            if lst.shape[0] != S or lst.shape[1] < int(spans[:, 1].max()):
                raise ValueError(f"decode attention: row lists {lst.shape} for {S} sequences "
                                 f"of up to {int(spans[:, 1].max())} keys")
            lst_d, n_d = self._h2d_pack(np.ascontiguousarray(lst, np.int32),
                                        np.ascontiguousarray(n_rows, np.int32))
            args += (lst_d, np.int64(lst.shape[1]), n_d, self._row_err_word())
            name = f"attn_gtd_decode_idx_{suffix}"
        self._fn("attention_gtd", name)((n_splits, H, S), (128,), args)
        self._fn("attention_gtd", "attn_gtd_combine")(
            (H, S), (block32(d),), (pm, pl, po, out, i32(d), i32(n_splits)))
        return out

    @staticmethod
    def _prefill_smem(d: int, k_item: int, v_item: int) -> int:
        """Dynamic shared memory of attn_gtd_prefill_* (see attention_gtd.cu)."""
        kbytes = GTD_PF_KEYS * (d + 1) * k_item
        kbytes = (kbytes + 3) & ~3
        total = 4 * GTD_PF_ROWS * d + kbytes + GTD_PF_KEYS * d * v_item
        return (total + 15) & ~15
