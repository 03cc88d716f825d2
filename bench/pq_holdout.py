"""Out-of-sample fidelity of code layouts on recorded q/k (pq_sweep.py record): codebooks
(a2ats, query-aware) trained on every document but the last prose one, then on that
held-out document: per query (its last 32 positions, every query head) the share of the
exact WRoPE top-3% ((R_b q).k, the `wrope` ablation's choice) that the approximate
score's top-3% keeps, and the same with an r x K shortlist re-ranked exactly.

python bench/pq_holdout.py /tmp/pq/samples.npz 1x12 4x8 8x8 16x8
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from a2ats_lite.vq import parse_codes, train_codebook  # noqa: E402
from pq_sweep import MODEL, _model  # noqa: E402


def main(samples, layouts, n_q=32, budget=0.03, b=2048, iters=10):
    z = np.load(samples)
    layers = sorted({int(n.split(".")[1]) for n in z.files})
    attn = _model(MODEL)[0].attn_layers
    for codes in layouts:
        M, bits = parse_codes(codes)
        t0, res = time.time(), {1: [], 2: [], 4: []}
        for i in layers:
            q, k, pos = z[f"q.{i}"], z[f"k.{i}"][:, 0].astype(np.float64), z[f"pos.{i}"]
            starts = list(np.flatnonzero(pos == 0)) + [len(pos)]
            docs = [(a, e) for a, e in zip(starts[:-1], starts[1:]) if e - a >= 2048]
            a, e = docs[-1]                       # the last long (prose) document: held out
            train = np.r_[0:a, e:len(pos)]
            qt_all = attn[i].rope(q[train], np.full(len(train), b)).reshape(-1, k.shape[1])
            cb = train_codebook(k[train], qt_all, 2 ** bits, iters=iters, n_subspaces=M)
            khat = cb.approx_keys(cb.assign_codes(k[a:e]))
            qt = attn[i].rope(q[e - n_q:e], np.full(n_q, b)).reshape(-1, k.shape[1]).astype(np.float64)
            cand = slice(0, e - a - n_q)
            ex, ap = qt @ k[a:e][cand].T, qt @ khat[cand].T
            K = int(np.ceil(budget * (e - a)))
            te = np.argpartition(-ex, K, 1)[:, :K]
            for r in res:
                ta = np.argpartition(-ap, r * K, 1)[:, :r * K]
                if r > 1:      # exact re-rank of the shortlist
                    ta = np.take_along_axis(ta, np.argsort(-np.take_along_axis(ex, ta, 1), 1)[:, :K], 1)
                res[r].append(np.mean([len(np.intersect1d(x, y)) / K for x, y in zip(te, ta)]))
        print(f"{codes:>5}: held-out top-3% overlap with exact WRoPE "
              + ", ".join(f"r={r} {np.mean(v):.3f}" for r, v in res.items())
              + f"  (train {time.time() - t0:.0f} s, {len(res[1])} layers)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
