"""Query-aware product-quantization sweep (issue: a2ats loses needles to 12-bit VQ).

  record   dense prefills of the calibration corpus, recording pre-RoPE q/k once (npz)
  train    codebooks of each layout from the recorded samples -> one sidecar per layout
  eval     every variant (a2ats with a sidecar and a re-rank factor) on the same prompts:
           one dense prefill per prompt serves all of them (evaluate.run's variants)

python bench/pq_sweep.py record --tokens 16384 --doc-tokens 4096 -o /tmp/pq/samples.npz
python bench/pq_sweep.py train /tmp/pq/samples.npz --codes 1x12,2x12,4x8,8x8 --iters 10 \
    --out-dir /tmp/pq
python bench/pq_sweep.py eval --ctx 8192 --samples 1 \
    --variant a2ats-1x12=/tmp/pq/1x12.a2ats --variant a2ats-4x8-r4=/tmp/pq/4x8.a2ats:4
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def _model(path):
    from a2ats_lite.config import ModelConfig
    from a2ats_lite.gguf import GGUFFile
    from a2ats_lite.model import Model
    from a2ats_lite.tokenizer import Tokenizer
    f = GGUFFile(path)
    return Model.from_gguf(f, ModelConfig.from_gguf(f)), Tokenizer.from_gguf(f)


def record(a):
    from a2ats_lite.corpus import documents
    from a2ats_lite.vq import record_samples
    m, tok = _model(a.model)
    t0 = time.time()
    docs = documents(tok, a.tokens, a.doc_tokens, seed=a.seed)
    q, k, pos = record_samples(m, docs)
    arrays = {}
    for i in q:
        arrays[f"q.{i}"], arrays[f"k.{i}"], arrays[f"pos.{i}"] = q[i], k[i], pos[i]
    np.savez(a.output, **arrays)
    print(f"recorded {sum(len(d) for d in docs)} tokens in {time.time() - t0:.1f} s -> {a.output}")


def train(a):
    from a2ats_lite.vq import calibrate_from_samples, fingerprint
    m, _ = _model(a.model)
    z = np.load(a.samples)
    layers = sorted({int(n.split(".")[1]) for n in z.files})
    q = {i: z[f"q.{i}"] for i in layers}
    k = {i: z[f"k.{i}"] for i in layers}
    pos = {i: z[f"pos.{i}"] for i in layers}
    fp = fingerprint(a.model)
    for codes in a.codes.split(","):
        t0 = time.time()
        cal = calibrate_from_samples(m.attn_layers, q, k, pos, model_fingerprint=fp,
                                     iters=a.iters, b=2048, seed=0, codes=codes)
        dt = time.time() - t0
        if not a.with_vq:
            cal.vq = {}
        out = Path(a.out_dir) / f"{codes}.a2ats"
        cal.save(out)
        print(json.dumps({"codes": codes, "train_s": round(dt, 1), "sidecar": str(out),
                          "tokens": cal.params["tokens"]}), flush=True)


def evaluate_variants(a):
    from a2ats_lite import evaluate
    from a2ats_lite.runtime import Runtime
    from a2ats_lite.vq import Calibration
    class Lazy(dict):       # sidecars load on first use: they may still be training
        def get(self, key, default=None):
            v = dict.get(self, key, default)
            if v is not None and isinstance(v[1].get("calib"), str):
                v[1]["calib"] = Calibration.load(v[1]["calib"], model_path=a.model)
            return v

    variants = Lazy()
    for spec in a.variant:
        label, rest = spec.split("=", 1)
        path, _, r = rest.partition(":")
        r, _, budget = r.partition(":")
        policy = "vq" if label.startswith("vq") else "a2ats"
        variants[label] = (policy, {"calib": path, "rerank": int(r or 1)})
        if budget:
            variants[label][1]["budget"] = float(budget)
    for p in a.kv.split(","):
        if p:
            variants[p] = (p, {})
    rt = Runtime(str(a.model), n_ctx=max(a.ctx) + 2 * a.steps + 8)
    t0 = time.time()
    with rt:
        recs = evaluate.run(rt, list(variants), a.ctx, a.budget, a.samples, steps=a.steps,
                            tasks=a.tasks.split(","), variants=variants, seed=a.seed)
    print(evaluate.table(recs))
    print(f"eval took {time.time() - t0:.0f} s", file=sys.stderr)
    if a.json:
        evaluate.write_json(recs, a.json, {"variants": a.variant, "kv": a.kv, "ctx": a.ctx,
                                           "samples": a.samples, "budget": a.budget,
                                           "steps": a.steps})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(MODEL))
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--tokens", type=int, default=16384)
    r.add_argument("--doc-tokens", type=int, default=4096)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("-o", "--output", required=True)
    t = sub.add_parser("train")
    t.add_argument("samples")
    t.add_argument("--codes", default="1x12,4x8")
    t.add_argument("--iters", type=int, default=10)
    t.add_argument("--out-dir", required=True)
    t.add_argument("--with-vq", action="store_true")
    e = sub.add_parser("eval")
    e.add_argument("--variant", action="append", default=[],
                   help="LABEL=SIDECAR[:RERANK[:BUDGET]]")
    e.add_argument("--kv", default="dense,oracle,wrope")
    e.add_argument("--ctx", type=lambda s: [int(x) for x in s.split(",")], default=[8192])
    e.add_argument("--samples", type=int, default=1)
    e.add_argument("--budget", type=float, default=0.03)
    e.add_argument("--tasks", default="recall,niah_single,niah_multikey")
    e.add_argument("--json", default=None)
    e.add_argument("--seed", type=int, default=0, help="needle prompts' seed (evaluate.run)")
    e.add_argument("--steps", type=int, default=16,
                   help="recall: teacher-forced tail tokens (and as many greedy steps)")
    a = ap.parse_args()
    {"record": record, "train": train, "eval": evaluate_variants}[a.cmd](a)


if __name__ == "__main__":
    main()
