"""How far is each runtime from ../shared/reference (llama.cpp's logits for the default model)?

    python bench/compare_reference.py [--reference DIR] [--out bench/results/reference.json]

Rows: our forward pass (quantized layers, the default; and float32 layers), and, when
llama-cpp-python is importable, llama.cpp itself on THIS machine with and without
flash attention. Columns: positions whose argmax differs from the reference's, the mean
KL(reference || row) over the 256 listed ids plus one bucket for the rest (what
tests/test_model.py checks), and the largest |logit difference| on the listed ids.

Why it exists: llama.cpp quantizes every activation to 8 bits before each product, so
its logits move by ~0.1-1 with the SIMD code path of the machine that ran it, and a few
near-tied positions flip. Comparing llama.cpp with its own reference shows how much of
the disagreement is ours and how much is the reference's hardware.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from a2ats_lite.evaluate import top_k_kl  # noqa: E402
from a2ats_lite.gguf import GGUFFile  # noqa: E402
from a2ats_lite.kv import make_kv_cache  # noqa: E402
from a2ats_lite.model import Model  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def compare(ref, names, logits_of) -> dict:
    """logits_of(tokens, positions) -> (m, n_vocab) float32; the figures against ref."""
    swaps, kls, dmax, n = 0, [], 0.0, 0
    for name in names:
        toks, pos = ref[name + ".tokens"], ref[name + ".positions"]
        ours = np.asarray(logits_of(toks, pos), dtype=np.float32)
        top_ids, top_logits, lse = ref[name + ".top_ids"], ref[name + ".top_logits"], ref[name + ".logsumexp"]
        kls.append(top_k_kl(top_ids, top_logits, lse, ours))
        swaps += int((ours.argmax(1) != top_ids[:, 0]).sum())
        dmax = max(dmax, float(np.abs(top_logits - np.take_along_axis(ours, top_ids, 1)).max()))
        n += len(pos)
    return dict(argmax_differs=swaps, positions=n, mean_kl=float(np.concatenate(kls).mean()),
                max_abs_logit_diff=dmax)


def ours(model_path, f32_layers):
    model = Model.from_gguf(GGUFFile(model_path), f32_layers=f32_layers)

    def logits_of(toks, pos):
        kv = make_kv_cache("dense", model.attn_layers, len(toks))
        return model.forward([toks], [kv.add_sequence()], kv, logits=[pos])[0]
    return logits_of


def llama_cpp(model_path, flash_attn):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    n = os.cpu_count()
    llm = Llama(model_path=str(model_path), n_ctx=2048, n_batch=512, logits_all=True, verbose=False,
                flash_attn=flash_attn, n_threads=n, n_threads_batch=n)

    def logits_of(toks, pos):
        llm.reset()
        llm.eval([int(t) for t in toks])
        return np.array(llm.scores[:len(toks)], dtype=np.float32)[pos]
    return logits_of


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--reference", type=Path, default=ROOT.parent / "shared" / "reference")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reference.json")
    a = ap.parse_args(argv)
    npz = a.reference / "gemma3-270m-q4_k_m.npz"
    if not npz.is_file() or not a.model.is_file():
        print(f"need {npz} and {a.model} (make model)", file=sys.stderr)
        return 2
    ref = np.load(npz)
    names = list(json.loads((a.reference / "prompts.json").read_text()))
    rows = {"a2ats-lite (quantized layers)": ours(a.model, False),
            "a2ats-lite (float32 layers)": ours(a.model, True),
            "llama.cpp here, no flash attn": llama_cpp(a.model, False),
            "llama.cpp here, flash attn": llama_cpp(a.model, True)}
    results = {}
    print(f"{'runtime':<32} {'argmax differs':>15} {'mean KL':>9} {'max |dlogit|':>13}")
    for label, fn in rows.items():
        if fn is None:
            print(f"{label:<32} {'(llama-cpp-python not installed)':>39}")
            continue
        r = results[label] = compare(ref, names, fn)
        print(f"{label:<32} {r['argmax_differs']:>8} of {r['positions']:<4} {r['mean_kl']:>9.5f} "
              f"{r['max_abs_logit_diff']:>13.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
