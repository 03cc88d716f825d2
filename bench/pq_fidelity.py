"""Model-free fidelity of each code layout on recorded calibration q/k (pq_sweep.py record):
per document, the last queries' top-K by the approximate WRoPE score vs by the exact one
(R_b q).k (the `wrope` ablation's choice). In-sample (the codebooks saw these keys): it
flatters the layouts with many centroids per key (1x12), so use it for ranking only.

python bench/pq_fidelity.py /tmp/pq/samples.npz /tmp/pq/1x12.a2ats /tmp/pq/4x8.a2ats ...
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from a2ats_lite.vq import Calibration  # noqa: E402
from pq_sweep import MODEL, _model  # noqa: E402


def main(samples, sidecars, n_q=32, budget=0.03, layer=None):
    z = np.load(samples)
    layers = sorted({int(n.split(".")[1]) for n in z.files})
    attn = _model(MODEL)[0].attn_layers
    for path in sidecars:
        cal = Calibration.load(path)
        rec = []
        for i in layers if layer is None else [layer]:
            q, k, pos = z[f"q.{i}"], z[f"k.{i}"][:, 0], z[f"pos.{i}"]
            starts = list(np.flatnonzero(pos == 0)) + [len(pos)]
            cb = cal.a2ats[(i, 0)]
            khat = cb.approx_keys(cb.assign_codes(k))
            for a, b in zip(starts[:-1], starts[1:]):
                if b - a < 1024:
                    continue
                qq = q[b - n_q:b].astype(np.float64)            # (n, H, d)
                qt = attn[i].rope(qq.astype(np.float32), np.full(len(qq), cal.params["b"])).reshape(
                    len(qq) * qq.shape[1], -1).astype(np.float64)
                ex, ap = qt @ k[a:b - n_q].T, qt @ khat[a:b - n_q].T
                K = int(np.ceil(budget * (b - a)))
                te = np.argpartition(-ex, K, 1)[:, :K]
                ta = np.argpartition(-ap, K, 1)[:, :K]
                rec.append(np.mean([len(np.intersect1d(x, y)) / K for x, y in zip(te, ta)]))
        print(f"{Path(path).stem:>8} codes={cal.params.get('codes', '1x?')} "
              f"top-3% overlap with exact WRoPE: {np.mean(rec):.3f} ({len(rec)} doc x layer)")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
