"""Where does a2ats lose attention recall against the oracle? WRoPE vs quantization.

    python bench/ablate_a2ats.py [--centroids 256 1024 4096] [--contexts 8192 16384]
                                 [--calib-tokens 81920] [--doc-tokens 16384] [--steps 32]

One dense prefill of the evaluation text records, for the full-attention layers, the
pre-RoPE queries and keys of every position. For the last --steps query positions of
each context, every selector picks its top-K (3% of the context per query head, union
over the GQA group, plus sinks and the local window) from the SAME dense queries, and
the table shows the attention recall of that selection (share of the exact softmax mass
it holds, mean over steps, layers and query heads):

    oracle      exact top-K of q.k: the ceiling
    wrope       (R_b q).k on exact pre-RoPE keys: a2ats without quantization
    wrope-bN    the same with b = N (--sweep-b): how much the choice of b matters
    a2ats-C     (R_b q).C[code] with a query-aware codebook of C centroids, trained here on
                the same calibration samples for every C (what `calibrate` does)

The gap oracle -> wrope is the cost of the WRoPE approximation; wrope -> a2ats-C is the
cost of quantizing keys to log2(C) bits. Writes bench/results/ablate_a2ats.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from a2ats_lite import Runtime  # noqa: E402
from a2ats_lite.corpus import documents, natural_text  # noqa: E402
from a2ats_lite.evaluate import attention_recall  # noqa: E402
from a2ats_lite.kv import make_kv_cache  # noqa: E402
from a2ats_lite.vq import QKRecorder, train_codebook  # noqa: E402


def record(rt, docs, full):
    """Pre-RoPE (queries, keys) per full-attention layer over docs (dense prefills)."""
    kv = make_kv_cache("dense", rt.model.attn_layers, max(len(d) for d in docs))
    rec = QKRecorder(full)
    kv.observers.append(rec)
    for doc in docs:
        seq = kv.add_sequence()
        rt.model.forward([np.asarray(doc)], [seq], kv, logits="none")
        kv.remove_sequence(seq)
    return ({i: np.concatenate(rec.queries[i]) for i in full},
            {i: np.concatenate(rec.keys[i]) for i in full})


def top_union(scores, K):
    """scores (heads, n): union over heads of each head's top-K indices."""
    return np.unique(np.argpartition(-scores, K - 1, axis=1)[:, :K])


def recall(q_rot, k_rot, L, t, chosen, sinks, window):
    """Mean over query heads of the softmax mass of query t on sinks + window + chosen."""
    idx = np.concatenate([np.arange(sinks), np.arange(t + 1 - window, t + 1), chosen])
    return attention_recall(q_rot, k_rot[:t + 1], idx, L.scale)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--centroids", type=int, nargs="*", default=[256, 1024, 4096])
    ap.add_argument("--sweep-b", type=int, nargs="*", default=[],
                    help="also score wrope (no quantization) with these relative positions b")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--calib-tokens", type=int, default=81920)
    ap.add_argument("--doc-tokens", type=int, default=16384)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--b", type=int, default=2048)
    ap.add_argument("--sinks", type=int, default=8)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ablate_a2ats.json")
    a = ap.parse_args(argv)

    T = max(a.contexts)
    rt = Runtime(a.model, n_ctx=max(T, a.doc_tokens + 1))
    layers = rt.model.attn_layers
    full = [L.index for L in layers if L.window is None]
    books = {}                                   # (C, layer, kv head) -> Codebook
    t0 = time.perf_counter()
    cq, ck = record(rt, documents(rt.tokenizer, a.calib_tokens, a.doc_tokens), full) \
        if a.centroids else ({}, {})
    if a.centroids:
        print(f"calibration samples: {len(ck[full[0]])} tokens ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    for C in a.centroids:
        t0 = time.perf_counter()
        for i in full:
            L = layers[i]
            for g in range(L.n_kv_heads):
                q = cq[i][:, g * L.group:(g + 1) * L.group]
                q_tilde = L.rope(q, np.full(len(q), a.b)).reshape(-1, L.head_dim)
                books[(C, i, g)] = train_codebook(ck[i][:, g], q_tilde, C, a.iters, 0, 1e-4)
        print(f"codebooks of {C} centroids: {time.perf_counter() - t0:.0f} s", flush=True)
    del cq, ck

    text = rt.tokenizer.encode(natural_text("eval"), add_bos=False)
    eq, ek = record(rt, [[rt.tokenizer.bos_id] + text[:T - 1]], full)
    sweep = [b for b in a.sweep_b if b != a.b]
    selectors = ["oracle", "wrope"] + [f"wrope-b{b}" for b in sweep] + [f"a2ats-{C}" for C in a.centroids]
    acc = {(s, ctx): [] for s in selectors for ctx in a.contexts}
    for i in full:
        L = layers[i]
        pos = np.arange(T)
        q_rot_all = L.rope(eq[i], pos)                                  # (T, H, d)
        k_rot_all = L.rope(ek[i], pos)                                  # (T, G, d)
        for g in range(L.n_kv_heads):
            heads = slice(g * L.group, (g + 1) * L.group)
            k_pre, k_rot = ek[i][:, g], k_rot_all[:, g]
            codes = {C: books[(C, i, g)].assign(k_pre) for C in a.centroids}
            for ctx in a.contexts:
                for t in range(ctx - a.steps, ctx):
                    lo, hi = a.sinks, t + 1 - a.window                  # scored candidates [lo, hi)
                    K = int(a.budget) if a.budget >= 1 else max(1, math.ceil(a.budget * (t + 1)))
                    q_pre, q_rot = eq[i][t, heads], q_rot_all[t, heads]
                    q_b = L.rope(q_pre[None], [a.b])[0]                 # (group, d): R_b q
                    cand = {"oracle": q_rot @ k_rot[lo:hi].T, "wrope": q_b @ k_pre[lo:hi].T}
                    for b in sweep:
                        cand[f"wrope-b{b}"] = L.rope(q_pre[None], [b])[0] @ k_pre[lo:hi].T
                    for C in a.centroids:
                        lut = q_b @ books[(C, i, g)].centroids.T        # (group, C)
                        cand[f"a2ats-{C}"] = lut[:, codes[C][lo:hi]]
                    for name, sc in cand.items():
                        chosen = top_union(sc, K) + lo
                        acc[(name, ctx)].append(recall(q_rot, k_rot, L, t, chosen, a.sinks, a.window))

    res = {f"{s}@{ctx}": float(np.mean(v)) for (s, ctx), v in acc.items()}
    print(f"\nattention recall, {a.steps} query positions x {len(full)} layers per context, "
          f"budget {a.budget}, b={a.b}")
    print(f"{'selector':<12}" + "".join(f"{c:>10}" for c in a.contexts))
    for s in selectors:
        print(f"{s:<12}" + "".join(f"{res[f'{s}@{c}']:>10.3f}" for c in a.contexts))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                          for k, v in vars(a).items()}, "recall": res}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
