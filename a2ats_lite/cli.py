"""`a2ats-lite` command line: info, tokenize, generate, chat, calibrate, eval.

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
"""
from __future__ import annotations

import functools
import math
import os
import sys
from collections import Counter
from pathlib import Path

import click

from .errors import A2ATSError
from .evaluate import TASKS

MODEL_ARG = click.argument("model", required=False, type=click.Path(dir_okay=False))


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


EXIT_INTERRUPTED = 130    # 128 + SIGINT
EXIT_BROKEN_PIPE = 141    # 128 + SIGPIPE: what a shell reports for `cat` killed by it


def _broken_pipe() -> None:
    """stdout's reader went away: stop quietly. Later writes (and the interpreter's
    final flush) go to /dev/null so Python prints no 'Exception ignored' either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real fd (tests, embedded)
        pass
    sys.exit(EXIT_BROKEN_PIPE)


def friendly_errors(fn):
    """Turn the package's errors (and a few OS ones) into one line + exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            _broken_pipe()
        except KeyboardInterrupt:   # e.g. Ctrl-C while the model loads
            click.echo("\n[interrupted]", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except A2ATSError as e:
            _fail(str(e))
        except (OSError, ValueError) as e:
            _fail(str(e))
        except click.ClickException as e:  # usage errors found by the command itself
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code if e.exit_code else 2)
    return wrapper


def _budget(value, option: str = "--budget"):
    """A retrieval budget: a fraction in (0, 1) or a whole token count >= 1."""
    if value is None:
        return None
    if not math.isfinite(value) or value <= 0:
        _fail(f"{option} must be a positive fraction (<1) or token count (>=1), got {value:g}")
    if value >= 1:
        if value != int(value):
            _fail(f"{option} {value:g}: a budget of 1 or more is a token count and must be "
                  f"a whole number (or give a fraction below 1)")
        return int(value)
    return value


def _check_output(path, option: str, file_must_be_writable: bool = True) -> None:
    """Fail now (before the work) unless `path` can be written."""
    p = Path(path)
    if p.is_dir():
        _fail(f"{option} {path}: is a directory")
    parent = p.parent
    if not parent.is_dir():
        _fail(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        _fail(f"{option} {path}: directory {parent} is not writable")
    if file_must_be_writable and p.exists() and not os.access(p, os.W_OK):
        _fail(f"{option} {path}: file is not writable")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _fail("--plot needs matplotlib: pip install 'a2ats-lite[eval]' (or matplotlib)")


def _model_path(model):
    if model:
        return model
    from .default_model import default_model_path
    return str(default_model_path())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="a2ats-lite")
def main():
    """llama.cpp-style GGUF runtime with A2ATS retrieval-based KV cache reduction."""


@main.command()
@MODEL_ARG
@friendly_errors
def info(model):
    """Print what a GGUF model file holds."""
    from .config import ModelConfig
    from .gguf import GGUFFile

    path = _model_path(model)
    with GGUFFile(path) as f:
        md = f.metadata
        cfg = ModelConfig.from_gguf(f)
        n_params = sum(t.n_elements for t in f.tensors.values())
        types = Counter(t.type_name for t in f.tensors.values())
        rows = [
            ("file", f"{path} ({f.file_size / 2**20:.1f} MiB, GGUF v{f.version})"),
            ("name", md.get("general.name", "?")),
            ("architecture", cfg.arch),
            ("parameters", f"{n_params / 1e6:.1f} M"),
            ("tensor types", ", ".join(f"{k} x{v}" for k, v in types.most_common())),
            ("layers / embd / ff", f"{cfg.n_layer} / {cfg.n_embd} / {cfg.n_ff}"),
            ("heads / kv heads / head dim", f"{cfg.n_head} / {cfg.n_head_kv} / {cfg.head_dim}"),
            ("context length", str(cfg.n_ctx_train)),
            ("sliding window", f"{cfg.sliding_window} (every {cfg.swa_pattern}th layer global)"
             if cfg.sliding_window else "none"),
            ("rope", f"base {cfg.rope_base:g}, {cfg.rope_pairing} pairs, scaling {cfg.rope_scaling_type}"),
            ("tokenizer", f"{md.get('tokenizer.ggml.model', '?')} "
                          f"(pre {md.get('tokenizer.ggml.pre', '-')}), vocabulary {cfg.n_vocab}"),
            ("chat template", "present" if md.get("tokenizer.chat_template") else "none (plain fallback)"),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("text")
@click.option("--special", is_flag=True, help="Parse control tokens such as <bos> in TEXT.")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token.")
@friendly_errors
def tokenize(model, text, special, no_bos):
    """Print the token ids of TEXT, space-separated (like llama.cpp's tokenize tool)."""
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(model)
    ids = tok.encode(text, add_bos=False if no_bos else None, special=special)
    click.echo(" ".join(str(i) for i in ids))


def _kv_choices() -> list[str]:
    from .kv import POLICIES
    return sorted(POLICIES)


KV_CHOICES = _kv_choices()


def _meta(key):
    """An option stored in the click context (read by _open_runtime), not passed to the command."""
    def store(ctx, param, value):
        ctx.meta[key] = value
        return value
    return store


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
        click.option("--cache-type-k", type=click.Choice(["f16", "f32"]), default="f16",
                     show_default=True, expose_value=False, callback=_meta("cache_type_k"),
                     help="K cache storage type (llama.cpp's flag)."),
        click.option("--cache-type-v", type=click.Choice(["f16", "f32"]), default="f16",
                     show_default=True, expose_value=False, callback=_meta("cache_type_v"),
                     help="V cache storage type (a retrieval --kv keeps K and V in one type)."),
        click.option("--temp", type=click.FloatRange(min=0), default=0.8, show_default=True,
                     help="Temperature; 0 = greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True),
        click.option("--top-p", type=click.FloatRange(0, 1), default=0.95, show_default=True),
        click.option("--min-p", type=click.FloatRange(0, 1), default=0.05, show_default=True),
        click.option("--repeat-penalty", type=click.FloatRange(min=0), default=1.0, show_default=True),
        click.option("--repeat-last-n", type=click.IntRange(min=0), default=64, show_default=True),
        click.option("-s", "--seed", type=int, default=None, help="RNG seed (same seed, same output)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed,
                  rerank=None):
    from .runtime import Runtime
    if model and model_opt and model != model_opt:
        raise click.UsageError("give the model either as MODEL or with -m, not both")
    if budget is not None and kv == "dense":
        raise click.UsageError("--budget needs a retrieval --kv policy and a positive value")
    budget = _budget(budget)
    params = {} if budget is None else {"budget": budget}
    if rerank is not None:
        if kv not in ("a2ats", "vq"):
            raise click.UsageError("--rerank is for --kv a2ats or vq")
        params["rerank"] = rerank
    if sidecar is not None and kv not in ("a2ats", "vq"):
        raise click.UsageError("--sidecar is for --kv a2ats or vq")
    meta = click.get_current_context().meta
    return Runtime(model or model_opt, n_ctx=ctx_size, device=device, kv=kv, seed=seed,
                   n_batch=batch_size, kv_params=params, sidecar=sidecar, verbose=True,
                   cache_type_k=meta.get("cache_type_k", "f16"),
                   cache_type_v=meta.get("cache_type_v", "f16"))


def _sampling(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed=None, **extra):
    """Generation options, validated now (SamplingParams raises a one-line error) so a
    bad value fails before the model loads or anything is printed."""
    from .sampling import SamplingParams
    opts = dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, **extra)
    SamplingParams(**opts, seed=seed)
    return opts


@main.command()
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
    opts = _sampling(max_tokens=n_predict, stop=list(stop), ignore_eos=ignore_eos, seed=seed,
                     **sampling)
    text = prompt if prompt is not None else prompt_file.read()
    rt = _open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed,
                       rerank)
    with rt:
        ids = rt.tokenize(text)
        if len(ids) > rt.n_ctx - 1 and not truncate:
            _fail(f"prompt of {len(ids)} tokens does not fit the context size {rt.n_ctx} "
                  f"(raise -c, or pass --truncate to keep the last tokens)")
        if not ids:
            _fail("the prompt is empty")
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


@main.command()
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
    opts = _sampling(seed=seed, **sampling)
    rt = _open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed,
                       rerank)
    with rt:
        ChatSession(rt, system=system, max_tokens=n_predict, show_timings=timings,
                    sampling=opts, stop=_chat_stops(rt)).run()


def _chat_stops(rt) -> list[str]:
    """The stop strings of the model's chat format (the plain fallback needs some)."""
    if callable(getattr(rt, "chat_stop", None)):     # Runtime.chat_stop()
        return list(rt.chat_stop())
    from .chat import chat_stop_strings
    f = getattr(rt, "file", None)
    template = f.get("tokenizer.chat_template") if f is not None else None
    return chat_stop_strings(template)


# calibrate's defaults, chosen by measurement (README, "A2ATS on the CPU"): query-aware
# product codes, 8 subspaces of 256 centroids, and an exact re-rank of 3x the budget (the
# cheapest factor meeting the recall, needle and perplexity targets at 8K and 16K)
# recorded in the sidecar as the policy's default. `--codes 1x12` is the paper's layout.
DEFAULT_CODES = "8x8"
DEFAULT_RERANK = 3


@main.command()
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

    from .config import ModelConfig
    from .corpus import documents
    from .gguf import GGUFFile
    from .model import Model
    from .tokenizer import Tokenizer
    from .vq import calibrate_model, parse_codes, sidecar_path

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


MIN_EVAL_CTX = 64    # eval prompts need room for a needle, a question and the answer


def _csv(kind):
    def parse(ctx, param, value):
        try:
            return [kind(x.strip()) for x in value.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return parse


@main.command("eval")
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None)
@friendly_errors
def eval_cmd(model, policies, contexts, budget, samples, steps, sidecar, tasks, json_out, plot_out,
             rerank=None):
    """Compare KV policies on the same inputs: attention recall, oracle overlap,
    tail perplexity, agreement with dense, passkey and RULER-style needle retrieval."""
    from tqdm import tqdm

    from . import evaluate
    from .runtime import Runtime

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
    rt = Runtime(model, n_ctx=max(contexts) + 2 * steps + 8, sidecar=sidecar)
    with rt:
        records = evaluate.run(rt, policies, contexts, budget,
                               samples, steps=steps, tasks=tasks, rerank=rerank,
                               progress=lambda it, desc: tqdm(it, desc=desc, file=sys.stderr))
    click.echo(evaluate.table(records))
    if json_out:
        evaluate.write_json(records, json_out, {"model": str(rt.model_path), "budget": budget,
                                                "samples": samples, "steps": steps, "tasks": tasks,
                                                "sidecar": sidecar, "rerank": rerank})
        click.echo(f"wrote {json_out}", err=True)
    if plot_out:
        evaluate.plot(records, plot_out)
        click.echo(f"wrote {plot_out}", err=True)


@main.command()
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
@friendly_errors
def serve(model, model_opt, host, port, ctx_size, batch_size, kv, budget, sidecar, device, parallel,
          queue_size, api_key, max_body, alias, seed):
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
    if sidecar is not None and kv not in ("a2ats", "vq"):
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
    from .runtime import Runtime
    from .server import serve as run_server

    path = _model_path(model or model_opt)
    rt = Runtime(path, n_ctx=ctx_size, device=device, kv=kv, seed=seed, n_batch=batch_size,
                 kv_params={} if budget is None else {"budget": budget}, sidecar=sidecar,
                 verbose=True, max_seqs=parallel, cache_seqs=max(2, parallel))
    name = alias or Path(path).name

    def ready(server):
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"serving {name} ({kv} KV, context {rt.n_ctx}, {parallel} parallel) on "
                   f"http://{shown}:{port}/v1  (Ctrl-C stops)", err=True)

    with rt:
        run_server(rt, host, port, model_name=name, api_key=api_key, queue_size=queue_size,
                   max_body=max_body, on_ready=ready)
    click.echo("server stopped", err=True)


class ChatSession:
    """The interactive loop: keeps the conversation inside the context by dropping
    the oldest whole turns (a user message with the replies that follow it; the
    system message stays), so templates that require user/assistant alternation
    keep working. A failure in one turn (a template error, a message too long for
    the context) is reported on one line and the session goes on with the history
    unchanged. Ctrl-C stops the current reply; an interrupted or empty reply is not
    kept, and neither is the user message it answered."""

    def __init__(self, rt, system=None, max_tokens=512, show_timings=False, sampling=None,
                 stop=None):
        self.rt, self.system, self.max_tokens = rt, system, max_tokens
        self.show_timings, self.sampling = show_timings, dict(sampling or {})
        self.stop = list(stop or [])
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _head(self, messages) -> int:
        return 1 if messages and messages[0].get("role") == "system" else 0

    def _fit(self, messages: list[dict]) -> tuple[list[int], list[dict]]:
        """Prompt ids of the conversation and the messages they hold: the oldest whole
        turns dropped until the prompt plus room for a reply fits the context."""
        head = self._head(messages)
        room = min(self.max_tokens, self.rt.n_ctx // 2)
        while True:
            ids = self.rt.chat_prompt(messages)
            users = [i for i in range(head, len(messages)) if messages[i].get("role") == "user"]
            if len(ids) + room <= self.rt.n_ctx or len(users) <= 1:
                return ids, messages
            # drop the oldest turn: everything before the second user message
            messages = messages[:head] + messages[users[1]:]

    def run(self):
        click.echo("chat: /reset clears the conversation, /exit or Ctrl-D quits, "
                   "Ctrl-C stops a reply", err=True)
        while True:
            try:
                line = input("> ")
            except EOFError:
                click.echo()
                return
            except KeyboardInterrupt:
                click.echo()
                continue
            cmd = line.strip()
            if cmd == "/exit":
                return
            if cmd == "/reset":
                self.reset()
                click.echo("[conversation cleared]", err=True)
                continue
            if cmd:
                self.turn(line)

    def turn(self, line: str) -> str | None:
        """One exchange; returns the reply kept in the history, or None."""
        from .errors import A2ATSError
        try:
            ids, messages = self._fit(self.messages + [{"role": "user", "content": line}])
        except A2ATSError as e:        # e.g. the template refuses this conversation
            click.echo(f"error: {e}", err=True)
            return None
        if len(ids) >= self.rt.n_ctx:
            click.echo(f"error: this message alone ({len(ids)} tokens) does not fit the context "
                       f"({self.rt.n_ctx}); raise -c", err=True)
            return None
        reply, interrupted = "", False
        try:
            for piece in self.rt.stream(ids, max_tokens=self.max_tokens, stop=self.stop,
                                        **self.sampling):
                reply += piece
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            interrupted = True
            click.echo(" [stopped]", nl=False)
        except A2ATSError as e:
            click.echo()
            click.echo(f"error: {e}", err=True)
            return None
        click.echo()
        if self.show_timings:
            click.echo(self.rt.timings.line(), err=True)
        reply = reply.strip()
        if interrupted or not reply:
            if not interrupted:
                click.echo("[empty reply: not kept in the conversation]", err=True)
            return None
        self.messages = messages + [{"role": "assistant", "content": reply}]
        return reply


if __name__ == "__main__":
    main()
