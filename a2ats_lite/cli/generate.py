"""The `generate` command: continue one prompt, streaming the text to stdout and the
timings to stderr; Ctrl-C keeps the text so far and exits 130.
"""
from __future__ import annotations

import sys

import click

from ..prompts import check_context
from . import runtime_args
from .errors import EXIT_INTERRUPTED, _fail, friendly_errors
from .options import MODEL_ARG, runtime_options


@click.command()
@MODEL_ARG
@runtime_options
@click.option("-p", "--prompt", default=None, help="Prompt text.")
@click.option("-f", "--file", "prompt_file", type=click.File("r", encoding="utf-8"), default=None,
              help="Read the prompt from a file.")
@click.option("-n", "--n-predict", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens to generate.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option("--no-echo", is_flag=True, help="Do not print the prompt before the continuation.")
@click.option("--truncate", is_flag=True,
              help="If the prompt does not fit -c, keep BOS and its last tokens (as llama.cpp).")
@friendly_errors
def generate(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed, prompt, prompt_file,
             n_predict, stop, ignore_eos, no_echo, truncate, rerank=None, **sampling):
    """Continue a prompt, streaming the text to stdout; timings go to stderr.
    Ctrl-C stops generation: the text so far is kept and the exit status is 130."""
    if prompt is None and prompt_file is None:
        raise click.UsageError("give a prompt with -p TEXT or -f FILE")
    opts = runtime_args._sampling(max_tokens=n_predict, stop=list(stop), ignore_eos=ignore_eos,
                                  seed=seed, **sampling)
    text = prompt if prompt is not None else prompt_file.read()
    # looked up on the module so tests can replace _open_runtime
    rt = runtime_args._open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar,
                                    device, seed, rerank)
    with rt:
        ids = rt.tokenize(text)
        if not ids:
            _fail("the prompt is empty")
        if not truncate:
            check_context(len(ids), rt.n_ctx)     # before the prompt is echoed
        if not no_echo:
            click.echo(text, nl=False)
        interrupted = False
        try:
            for piece in rt.stream(ids, truncate=truncate, **opts):
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            interrupted = True
        click.echo()
        if interrupted:
            click.echo("[interrupted]", err=True)
        click.echo(rt.timings.line(), err=True)
        if interrupted:
            sys.exit(EXIT_INTERRUPTED)
