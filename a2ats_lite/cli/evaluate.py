"""The `eval` command: compare KV policies on the same inputs (attention recall, oracle
overlap, tail perplexity, agreement with dense, passkey and needle retrieval) and print,
save or plot the table. The tasks themselves are a2ats_lite.evaluate.
"""
from __future__ import annotations

import sys

import click

from ..evaluate import TASKS
from .checks import _budget, _check_output, _csv, _require_matplotlib
from .errors import _fail, friendly_errors
from .options import CACHE_TYPES, KV_CHOICES, MODEL_ARG

MIN_EVAL_CTX = 64    # eval prompts need room for a needle, a question and the answer


@click.command("eval")
@MODEL_ARG
@click.option("--kv", "policies", default="dense,a2ats,quest,vq,window,oracle", show_default=True,
              callback=_csv(str), help="Comma-separated KV policies.")
@click.option("--ctx", "contexts", default="4096", show_default=True, callback=_csv(int),
              help="Comma-separated context lengths.")
@click.option("--budget", type=float, default=0.03, show_default=True,
              help="Retrieval budget: fraction of the context (<1) or token count.")
@click.option("--samples", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=16, show_default=True,
              help="Decode steps per sample (teacher-forced, then greedy).")
@click.option("--sidecar", type=click.Path(dir_okay=False), default=None,
              help="Calibration for a2ats/vq (default: MODEL.a2ats next to the model).")
@click.option("--tasks", default=",".join(TASKS), show_default=True, callback=_csv(str),
              help="Comma-separated tasks (recall also measures agreement with dense).")
@click.option("--rerank", type=click.IntRange(min=1), default=None,
              help="a2ats/vq: exact re-rank of rerank x budget code-picked candidates (1 = off; "
                   "default: the sidecar's).")
@click.option("--cache-type-k", "cache_type_k", type=click.Choice(CACHE_TYPES), default="f32",
              show_default=True, help="K cache type of every policy's cache (llama.cpp's names; "
                                      "f32 is eval's reference precision).")
@click.option("--cache-type-v", "cache_type_v", type=click.Choice(CACHE_TYPES), default=None,
              help="V cache type (default: the K type).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None)
@friendly_errors
def eval_cmd(model, policies, contexts, budget, samples, steps, sidecar, tasks, json_out, plot_out,
             rerank=None, cache_type_k="f32", cache_type_v=None):
    """Compare KV policies on the same inputs: attention recall, oracle overlap,
    tail perplexity, agreement with dense, passkey and RULER-style needle retrieval."""
    from tqdm import tqdm

    from .. import evaluate
    from ..runtime import Runtime

    if not policies:
        _fail(f"--kv needs at least one policy; choose from {', '.join(KV_CHOICES)}")
    bad = sorted(set(policies) - set(KV_CHOICES))
    if bad:
        raise click.BadParameter(f"unknown policy {bad[0]!r}; choose from {', '.join(KV_CHOICES)}")
    if not contexts:
        _fail("--ctx needs at least one context length")
    small = [c for c in contexts if c < MIN_EVAL_CTX]
    if small:
        _fail(f"--ctx {small[0]}: context lengths must be at least {MIN_EVAL_CTX} tokens")
    budget = _budget(budget)
    if not tasks:
        _fail(f"--tasks needs at least one task; choose from {', '.join(TASKS)}")
    bad = sorted(set(tasks) - set(TASKS))
    if bad:
        raise click.BadParameter(f"unknown task {bad[0]!r}; choose from {', '.join(TASKS)}")
    if json_out:
        _check_output(json_out, "--json")
    if plot_out:
        _check_output(plot_out, "--plot")
        _require_matplotlib()
    cache_type_v = cache_type_v or cache_type_k
    rt = Runtime(model, n_ctx=max(contexts) + 2 * steps + 8, sidecar=sidecar,
                 cache_type_k=cache_type_k, cache_type_v=cache_type_v)
    with rt:
        records = evaluate.run(rt, policies, contexts, budget,
                               samples, steps=steps, tasks=tasks, rerank=rerank,
                               cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                               progress=lambda it, desc: tqdm(it, desc=desc, file=sys.stderr))
    click.echo(evaluate.table(records))
    if json_out:
        evaluate.write_json(records, json_out, {"model": str(rt.model_path), "budget": budget,
                                                "samples": samples, "steps": steps, "tasks": tasks,
                                                "sidecar": sidecar, "rerank": rerank,
                                                "cache_type_k": cache_type_k,
                                                "cache_type_v": cache_type_v})
        click.echo(f"wrote {json_out}", err=True)
    if plot_out:
        evaluate.plot(records, plot_out)
        click.echo(f"wrote {plot_out}", err=True)
