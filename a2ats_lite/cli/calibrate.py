"""The `calibrate` command: train the A2ATS (and plain-VQ baseline) key codebooks on a
model and write the calibration sidecar the a2ats / vq KV policies read.
"""
from __future__ import annotations

import sys

import click

from .checks import _check_output, _model_path
from .errors import friendly_errors
from .options import MODEL_ARG

# calibrate's defaults, chosen by measurement (docs/a2ats.md): query-aware product codes,
# 8 subspaces of 256 centroids, and an exact re-rank of 4x the budget (the cheapest factor
# meeting the recall, needle and perplexity targets at 8K, 16K and 32K) recorded in the
# sidecar as the policy's default. `--codes 1x12` is the paper's layout.
DEFAULT_CODES = "8x8"
DEFAULT_RERANK = 4


@click.command()
@MODEL_ARG
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Calibration text file (repeatable); default: the offline corpus + random ids.")
@click.option("--tokens", type=click.IntRange(min=1024), default=81920, show_default=True,
              help="Calibration tokens (the paper's 80K; fewer is faster but worse).")
@click.option("--doc-tokens", type=click.IntRange(min=64), default=16384, show_default=True,
              help="Tokens per calibration document (the paper's 16K: the vq baseline's "
                   "post-RoPE codebook only knows the positions it saw).")
@click.option("--centroids", type=click.IntRange(min=2, max=65536), default=None,
              help="One codebook of this many centroids (the paper's layout; same as "
                   "--codes 1xBITS for a power of 2).")
@click.option("--codes", default=None,
              help="Code layout MxBITS: M query-aware product-quantization subspaces of "
                   "2^BITS centroids each (1x12: the paper's single 4096-entry codebook; "
                   "default " + DEFAULT_CODES + ").")
@click.option("--rerank", type=click.IntRange(1, 1024), default=None,
              help="Exact re-rank factor recorded in the sidecar as the a2ats/vq default "
                   "(default: " + str(DEFAULT_RERANK) + " with the default layout, else 1).")
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True,
              help="Most k-means iterations (stops earlier on convergence).")
@click.option("--wrope-b", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Sidecar path (default: MODEL.a2ats next to the model).")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def calibrate(model, texts, tokens, doc_tokens, centroids, codes, rerank, iters, wrope_b, output,
              seed):
    """Train the A2ATS (and plain-VQ baseline) key codebooks and write the sidecar."""
    from tqdm import tqdm

    from ..config import ModelConfig
    from ..corpus import documents
    from ..gguf import GGUFFile
    from ..model import Model
    from ..tokenizer import Tokenizer
    from ..vq import calibrate_model, parse_codes, sidecar_path

    if codes is not None and centroids is not None:
        raise click.UsageError("give --codes MxBITS or --centroids N, not both")
    if codes is None and centroids is None:
        codes = DEFAULT_CODES
        rerank = DEFAULT_RERANK if rerank is None else rerank
    if codes is not None:
        try:
            n_sub, bits = parse_codes(codes)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--codes") from None
        centroids, codes = 2 ** bits, f"{n_sub}x{bits}"
    path = _model_path(model)
    _check_output(output or sidecar_path(path), "-o/--output" if output else "sidecar",
                  file_must_be_writable=False)
    f = GGUFFile(path)
    tok = Tokenizer.from_gguf(f)
    m = Model.from_gguf(f, ModelConfig.from_gguf(f))
    if texts:
        ids = [i for t in texts for i in tok.encode(open(t, encoding="utf-8").read(), add_bos=False)]
        ids = ids[:tokens]
        bos = [tok.bos_id] if tok.bos_id is not None else []
        docs = [bos + ids[i:i + doc_tokens] for i in range(0, len(ids), doc_tokens)]
    else:
        docs = documents(tok, tokens, doc_tokens, seed=seed)
    n = sum(len(d) for d in docs)
    if n < centroids:
        raise click.UsageError(f"{n} calibration tokens are fewer than --centroids {centroids}")
    cal = calibrate_model(m, docs, path, n_centroids=centroids, iters=iters, b=wrope_b, seed=seed,
                          progress=lambda it, desc: tqdm(it, desc=desc, file=sys.stderr),
                          codes=codes)
    if rerank is not None and rerank != 1:
        cal.params["rerank"] = int(rerank)
    out = output or sidecar_path(path)
    cal.save(out)
    layout = f"codes {codes}: " if codes else ""
    if cal.params.get("rerank", 1) != 1:
        layout = f"re-rank {cal.params['rerank']}x, {layout}"
    click.echo(f"wrote {out} ({n} tokens, {len(cal.a2ats)} codebooks, {layout}"
               f"{centroids} centroids per subspace)")
