"""The `chat` command: the interactive chat REPL on one Runtime. The REPL itself (turns,
/reset, history trimming, stop strings) is a2ats_lite.chat.ChatSession; this file turns
the flags into one.
"""
from __future__ import annotations

import click

from . import runtime_args
from .errors import friendly_errors
from .options import MODEL_ARG, runtime_options


@click.command()
@MODEL_ARG
@runtime_options
@click.option("--system", default=None, help="System message.")
@click.option("-n", "--n-predict", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most tokens per reply.")
@click.option("--timings", is_flag=True, help="Print a timing line after each reply.")
@friendly_errors
def chat(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed, system, n_predict,
         timings, rerank=None, **sampling):
    """Interactive chat. /reset clears the conversation, /exit or Ctrl-D quits,
    Ctrl-C stops the current reply."""
    from ..chat import ChatSession, session_stops

    opts = runtime_args._sampling(seed=seed, **sampling)
    # looked up on the module so tests can replace _open_runtime
    rt = runtime_args._open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar,
                                    device, seed, rerank)
    with rt:
        ChatSession(rt, system=system, max_tokens=n_predict, show_timings=timings,
                    sampling=opts, stop=session_stops(rt)).run()
