"""From the shared runtime flags (options.runtime_options) to what generate and chat run
with: the Runtime (_open_runtime) and the sampling options (_sampling), both checked so
that a bad combination fails before the model loads or anything is printed.
"""
from __future__ import annotations

import click

from ..kv.registry import needs_calibration
from .checks import _budget
from .errors import _fail, _warnings_to_stderr


def _open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed,
                  rerank=None):
    from ..runtime import Runtime
    if model and model_opt and model != model_opt:
        raise click.UsageError("give the model either as MODEL or with -m, not both")
    if budget is not None and kv == "dense":
        raise click.UsageError("--budget needs a retrieval --kv policy and a positive value")
    budget = _budget(budget)
    params = {} if budget is None else {"budget": budget}
    if rerank is not None:
        if not needs_calibration(kv):
            raise click.UsageError("--rerank is for --kv a2ats or vq")
        params["rerank"] = rerank
    if sidecar is not None and not needs_calibration(kv):
        raise click.UsageError("--sidecar is for --kv a2ats or vq")
    meta = click.get_current_context().meta
    with _warnings_to_stderr():
        return Runtime(model or model_opt, n_ctx=ctx_size, device=device, kv=kv, seed=seed,
                       n_batch=batch_size, kv_params=params, sidecar=sidecar, verbose=True,
                       kv_offload_dir=meta.get("kv_offload_dir"), **_cache_types())


def _cache_types() -> dict:
    """--cache-type-k / -v, which options.cache_type_options stored in the context's meta."""
    meta = click.get_current_context().meta
    return {"cache_type_k": meta.get("cache_type_k", "f16"),
            "cache_type_v": meta.get("cache_type_v", "f16")}


def _sampling(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed=None, grammar=None,
              grammar_file=None, json_schema=None, json_schema_file=None, **extra):
    """Generation options, validated now (SamplingParams and the constraint raise a
    one-line error) so a bad value fails before the model loads or anything is printed."""
    from ..sampling import SamplingParams
    opts = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, **extra)
    constraint = _constraint(grammar, grammar_file, json_schema, json_schema_file)
    if constraint is not None:
        opts["constraint"] = constraint
    SamplingParams(**opts, seed=seed)
    return opts


def _constraint(grammar, grammar_file, json_schema, json_schema_file):
    """The structured.Constraint the flags ask for (at most one of them), or None."""
    given = {"--grammar": grammar, "--grammar-file": grammar_file,
             "--json-schema": json_schema, "--json-schema-file": json_schema_file}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    if len(given) > 1:
        raise click.UsageError(f"give one of {', '.join(given)}")
    (flag, value), = given.items()
    text = value if isinstance(value, str) else value.read()
    from ..structured import Constraint
    try:
        if "grammar" in flag:
            return Constraint.from_grammar(text)
        return Constraint.from_json_schema(text)
    except ValueError as e:
        _fail(f"{flag}: {e}")
