"""Calibration: train both codebooks of every (full-attention layer, KV head) from
pre-RoPE queries and keys recorded while the model prefills documents.

The only vq module that runs the model (codebooks, k-means and the sidecar format
do not import it).
"""
from __future__ import annotations

import numpy as np

from .codebook import fast_scan_layout, parse_codes, train_codebook
from .sidecar import Calibration, fingerprint


def calibrate_from_samples(layers, queries: dict, keys: dict, positions: dict, *,
                           model_fingerprint: str = "", n_centroids: int = 4096,
                           iters: int = 300, tol: float = 1e-4, b: int = 2048, w: int = 64,
                           s: int = 8, seed: int = 0, progress=None, codes: str | None = None,
                           **extra_params) -> Calibration:
    """Train both codebooks of every (full-attention layer, KV head) from recorded samples.

    layers: the model's AttnLayer list. Per full-attention layer index i:
      queries[i] (N, n_heads, d)    pre-RoPE queries
      keys[i]    (M, n_kv_heads, d) pre-RoPE keys, at positions[i] (M,)
    a2ats: H from q~ = R_b q pooled over the GQA group's query heads, k-means on
    k_pre @ L. vq (ablation): plain k-means on post-RoPE keys rope(k_pre, positions).
    codes "MxBITS" (recorded in the parameters): M subspaces of 2**BITS centroids each
    (n_centroids is then 2**BITS); None: one codebook of n_centroids (the paper's). Layouts
    fast-scan can score (4-bit codes, M even) record scan="fast" unless extra_params say
    otherwise."""
    M = 1
    if codes is not None:
        M, bits = parse_codes(codes)
        n_centroids = 2 ** bits
        extra_params["codes"] = f"{M}x{bits}"
        if fast_scan_layout(M, n_centroids):
            extra_params.setdefault("scan", "fast")
    full = [L.index for L in layers if L.window is None and L.index in keys]
    if not full:
        raise ValueError("no full-attention layer samples to calibrate")
    n_tok = int(sum(len(keys[i]) for i in full) // len(full))
    cal = Calibration(params=dict(b=int(b), w=int(w), s=int(s), n_centroids=int(n_centroids),
                                  iters=int(iters), tol=float(tol), seed=int(seed), tokens=n_tok,
                                  **extra_params),
                      fingerprint=model_fingerprint)
    jobs = [(i, g) for i in full for g in range(layers[i].n_kv_heads)]
    for i, g in progress(jobs, desc="training codebooks") if progress else jobs:
        L = layers[i]
        k_pre = np.asarray(keys[i], dtype=np.float32)                         # (M, G, d)
        q_pre = np.asarray(queries[i], dtype=np.float32)[:, g * L.group:(g + 1) * L.group]
        if len(k_pre) < n_centroids:
            raise ValueError(f"layer {i}: {len(k_pre)} calibration keys are fewer than "
                             f"{n_centroids} centroids")
        q_tilde = L.rope(q_pre, np.full(len(q_pre), b)).reshape(-1, L.head_dim)  # R_b q, pooled
        k_rot = L.rope(k_pre[:, g:g + 1], np.asarray(positions[i]))[:, 0]       # (M, d)
        cal.a2ats[(i, g)] = train_codebook(k_pre[:, g], q_tilde, n_centroids, iters, seed, tol,
                                           n_subspaces=M)
        cal.vq[(i, g)] = train_codebook(k_rot, None, n_centroids, iters, seed, tol, n_subspaces=M)
    return cal


class QKRecorder:
    """A KV cache observer recording the pre-RoPE keys (with positions) and queries of
    the full-attention layers during dense prefills."""

    def __init__(self, full):
        self.keys = {i: [] for i in full}      # layer -> [(n, G, d) pre-RoPE keys]
        self.pos = {i: [] for i in full}
        self.queries = {i: [] for i in full}   # layer -> [(n, H, d) pre-RoPE queries]

    def on_write(self, layer, seq, positions, k_pre, v):
        if layer in self.keys:
            self.keys[layer].append(np.array(k_pre))
            self.pos[layer].append(np.array(positions))

    def on_query(self, layer, seq, positions, q_pre):
        if layer in self.queries:
            self.queries[layer].append(np.array(q_pre))


def record_samples(model, docs: list[list[int]], progress=None):
    """Dense prefills of docs recording the pre-RoPE q/k of every full-attention layer
    -> (queries, keys, positions), each layer -> array (calibrate_from_samples's input)."""
    layers = model.attn_layers
    full = [L.index for L in layers if L.window is None]
    from ..kv import make_kv_cache
    kv = make_kv_cache("dense", layers, max(len(d) for d in docs), backend=model.B)
    rec = QKRecorder(full)
    kv.observers.append(rec)
    for doc in progress(docs, desc="collecting q/k") if progress else docs:
        seq = kv.add_sequence()
        try:
            model.forward([np.asarray(doc)], [seq], kv, logits="none")
        finally:
            kv.remove_sequence(seq)
    cat = lambda d: {i: np.concatenate(d[i]) for i in full}  # noqa: E731
    return cat(rec.queries), cat(rec.keys), cat(rec.pos)


def calibrate_model(model, docs: list[list[int]], model_path, n_centroids=4096, iters=300,
                    b=2048, w=64, s=8, seed=0, tol=1e-4, progress=None,
                    codes: str | None = None) -> Calibration:
    """Run the model over docs (dense prefill) recording pre-RoPE q/k of every
    full-attention layer, then calibrate_from_samples (codes: "MxBITS", see there)."""
    q, k, pos = record_samples(model, docs, progress)
    return calibrate_from_samples(model.attn_layers, q, k, pos,
                                  model_fingerprint=fingerprint(model_path),
                                  n_centroids=n_centroids, iters=iters, tol=tol, b=b, w=w, s=s,
                                  seed=seed, progress=progress, codes=codes)
