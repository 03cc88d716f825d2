"""The `serve` command: check the flags and the listen address, load the Runtime and run
the OpenAI-compatible HTTP server (a2ats_lite.server) on it until Ctrl-C.
"""
from __future__ import annotations

from pathlib import Path

import click

from ..kv.registry import needs_calibration
from .checks import _budget, _model_path
from .errors import _fail, _warnings_to_stderr, friendly_errors
from .options import KV_CHOICES, MODEL_ARG, _with, cache_type_options
from .runtime_args import _cache_types


@click.command()
@MODEL_ARG
@click.option("-m", "--model", "model_opt", type=click.Path(dir_okay=False),
              help="Model file (same as the MODEL argument).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 exposes the server).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("-c", "--ctx-size", type=click.IntRange(min=16), default=None,
              help="Context size in tokens (default: the model's training context).")
@click.option("-b", "--batch-size", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most tokens per engine step (prefill chunks + decode rows).")
@click.option("--kv", type=click.Choice(KV_CHOICES), default="dense", show_default=True,
              help="KV cache policy.")
@click.option("--budget", type=float, default=None,
              help="Retrieval budget: fraction of the context (<1) or token count (>=1).")
@click.option("--sidecar", type=click.Path(dir_okay=False), default=None,
              help="Calibration for --kv a2ats/vq (default: MODEL.a2ats next to the model).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--parallel", type=click.IntRange(min=1, max=256), default=4, show_default=True,
              help="Most sequences decoding together (live requests).")
@click.option("--queue-size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests waiting for a slot before the server answers 503.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY'.")
@click.option("--max-body", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
              help="Largest request body in bytes (413 above).")
@click.option("--alias", default=None, help="Model id reported by the API (default: the file name).")
@click.option("-s", "--seed", type=int, default=None,
              help="Default RNG seed for requests that send none.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Browser origin allowed to call the API (repeatable; '*': any). Off by default.")
@click.option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds for a request's headers to arrive before the connection is closed.")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds for a request's body to arrive (408 after).")
@click.option("--max-connections", type=click.IntRange(min=1), default=256, show_default=True,
              help="Open connections and requests at once; beyond it requests get 503.")
@click.option("--kv-offload-dir", type=click.Path(file_okay=False), default=None,
              help="A retrieval --kv keeps its full K/V store in an unlinked file here.")
@_with(cache_type_options())
@friendly_errors
def serve(model, model_opt, host, port, ctx_size, batch_size, kv, budget, sidecar, device, parallel,
          queue_size, api_key, max_body, alias, seed, cors_origins, header_timeout, body_timeout,
          max_connections, kv_offload_dir):
    """OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models,
    /health, /metrics) on the continuous-batching engine. Ctrl-C stops it."""
    import socket

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        _fail("serve needs starlette and uvicorn: pip install 'a2ats-lite[server]'")
    if model and model_opt and model != model_opt:
        raise click.UsageError("give the model either as MODEL or with -m, not both")
    if budget is not None and kv == "dense":
        raise click.UsageError("--budget needs a retrieval --kv policy and a positive value")
    budget = _budget(budget)
    if sidecar is not None and not needs_calibration(kv):
        raise click.UsageError("--sidecar is for --kv a2ats or vq")
    if api_key is not None and not api_key.strip():
        raise click.UsageError("--api-key must not be empty")
    if not host.strip():
        raise click.UsageError("--host must not be empty")
    try:     # fail now, not after loading the model, if the address cannot be used
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except (OSError, OverflowError) as e:
        _fail(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}")
    from ..runtime import Runtime
    from ..server import serve as run_server

    path = _model_path(model or model_opt)
    with _warnings_to_stderr():
        rt = Runtime(path, n_ctx=ctx_size, device=device, kv=kv, seed=seed, n_batch=batch_size,
                     kv_params={} if budget is None else {"budget": budget}, sidecar=sidecar,
                     verbose=True, max_seqs=parallel, cache_seqs=max(2, parallel),
                     kv_offload_dir=kv_offload_dir, **_cache_types())
    name = alias or Path(path).name

    def ready(server):
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"serving {name} ({kv} KV, context {rt.n_ctx}, {parallel} parallel) on "
                   f"http://{shown}:{port}/v1  (Ctrl-C stops)", err=True)

    with rt:
        run_server(rt, host, port, model_name=name, api_key=api_key, queue_size=queue_size,
                   max_body=max_body, on_ready=ready, header_timeout=header_timeout,
                   body_timeout=body_timeout, max_connections=max_connections,
                   cors_origins=list(cors_origins) or None)
    click.echo("server stopped", err=True)
