"""`a2ats-lite` command line: info, tokenize, generate, chat, calibrate, eval, serve.

Every expected failure (bad model file, bad flag value, no GPU, context
overflow, ...) is one line `error: ...` on stderr and exit status 2, never a
traceback; flag values, output paths and optional dependencies are checked
before any work starts or any output is printed. Exit statuses:
  0    success
  2    an expected failure (the `error: ...` line)
  130  interrupted by Ctrl-C / SIGINT during generation (what was generated is
       printed, then `[interrupted]` on stderr), as shells expect (128 + SIGINT)
  141  stdout closed early (`... | head`): exit at once, silently, as `cat` does
       when SIGPIPE kills it (128 + SIGPIPE)

This file holds the click group `main` (the console entry point) and registers the
commands. One role per file: errors.py (failures -> exit statuses, warnings),
checks.py (flag and path checks), options.py (shared click options), runtime_args.py
(shared flags -> Runtime and sampling options), and one file per command group:
info.py (info, tokenize), generate.py, chat.py, calibrate.py, evaluate.py (eval),
serve.py. Imports run one way: this file -> commands -> runtime_args -> options,
checks -> errors.
"""
from __future__ import annotations

import click

from .calibrate import DEFAULT_CODES, DEFAULT_RERANK, calibrate
from .chat import chat
from .evaluate import eval_cmd
from .generate import generate
from .info import info, tokenize
from .serve import serve

__all__ = ["DEFAULT_CODES", "DEFAULT_RERANK", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="a2ats-lite")
def main():
    """llama.cpp-style GGUF runtime with A2ATS retrieval-based KV cache reduction."""


for _command in (info, tokenize, generate, chat, calibrate, eval_cmd, serve):
    main.add_command(_command)
del _command
