"""Click options shared by several commands: the MODEL argument, the runtime flags every
model-running command takes (model, context, KV policy, sampling, structured output, in
llama.cpp's spellings) and the --cache-type-k / -v pair.
"""
from __future__ import annotations

import click

MODEL_ARG = click.argument("model", required=False, type=click.Path(dir_okay=False))


def _kv_choices() -> list[str]:
    from ..kv import POLICIES
    return sorted(POLICIES)


KV_CHOICES = _kv_choices()
CACHE_TYPES = ["f16", "f32", "q8_0", "q4_0"]   # llama.cpp's --cache-type-k/-v names we store


def _meta(key):
    """An option stored in the click context (read by _open_runtime), not passed to the command."""
    def store(ctx, param, value):
        ctx.meta[key] = value
        return value
    return store


def cache_type_options() -> list:
    """--cache-type-k / -v (generate, chat, serve): stored in the context's meta."""
    return [
        click.option("--cache-type-k", type=click.Choice(CACHE_TYPES), default="f16",
                     show_default=True, expose_value=False, callback=_meta("cache_type_k"),
                     help="K cache storage type (llama.cpp's flag; q8_0 / q4_0: CPU only)."),
        click.option("--cache-type-v", type=click.Choice(CACHE_TYPES), default="f16",
                     show_default=True, expose_value=False, callback=_meta("cache_type_v"),
                     help="V cache storage type (llama.cpp's flag; q8_0 / q4_0: CPU only)."),
    ]


def _with(options):
    """A decorator applying click options in order."""
    def apply(fn):
        for o in reversed(options):
            fn = o(fn)
        return fn
    return apply


def runtime_options(fn):
    """Flags shared by every command that runs the model (llama.cpp spellings)."""
    opts = [
        click.option("-m", "--model", "model_opt", type=click.Path(dir_okay=False),
                     help="Model file (same as the MODEL argument)."),
        click.option("-c", "--ctx-size", type=click.IntRange(min=16), default=None,
                     help="Context size in tokens (default: the model's training context)."),
        click.option("-b", "--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Prompt tokens processed per prefill chunk."),
        click.option("--kv", type=click.Choice(KV_CHOICES), default="dense", show_default=True,
                     help="KV cache policy."),
        click.option("--budget", type=float, default=None,
                     help="Retrieval budget: fraction of the context (<1) or token count (>=1)."),
        click.option("--sidecar", type=click.Path(dir_okay=False), default=None,
                     help="Calibration for --kv a2ats/vq (default: MODEL.a2ats next to the model)."),
        click.option("--rerank", type=click.IntRange(min=1), default=None,
                     help="--kv a2ats/vq: pick rerank x budget tokens by the codes, keep the "
                          "budget's best by exact q.k (1 = off; default: the sidecar's)."),
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
        click.option("--kv-offload-dir", type=click.Path(file_okay=False), default=None,
                     expose_value=False, callback=_meta("kv_offload_dir"),
                     help="A retrieval --kv keeps its full K/V store in an unlinked file here "
                          "(contexts beyond RAM)."),
        *cache_type_options(),
        # sampling values are range-checked once, by SamplingParams (_sampling), as for the
        # Python API and the server
        click.option("--temp", type=float, default=0.8, show_default=True,
                     help="Temperature in [0, 2]; 0 = greedy."),
        click.option("--top-k", type=int, default=40, show_default=True, help="<= 0: off."),
        click.option("--top-p", type=float, default=0.95, show_default=True, help="In [0, 1]."),
        click.option("--min-p", type=float, default=0.05, show_default=True, help="In [0, 1]."),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True),
        click.option("--repeat-last-n", type=int, default=64, show_default=True,
                     help="-1: the whole history; 0: off."),
        click.option("-s", "--seed", type=int, default=None, help="RNG seed (same seed, same output)."),
        # structured output (llama.cpp's flags)
        click.option("--grammar", default=None, help="GBNF grammar the output must follow."),
        click.option("--grammar-file", type=click.File("r", encoding="utf-8"), default=None,
                     help="Read the GBNF grammar from a file."),
        click.option("-j", "--json-schema", default=None,
                     help="JSON schema (text) the output must follow."),
        click.option("-jf", "--json-schema-file", type=click.File("r", encoding="utf-8"),
                     default=None, help="Read the JSON schema from a file."),
    ]
    return _with(opts)(fn)
