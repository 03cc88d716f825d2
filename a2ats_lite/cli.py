"""`a2ats-lite` command line: info, tokenize, generate, chat, calibrate, eval.

Every expected failure (bad model file, bad flag value, no GPU, context
overflow, ...) is one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import functools
import sys
from collections import Counter

import click

from .errors import A2ATSError
from .evaluate import TASKS

MODEL_ARG = click.argument("model", required=False, type=click.Path(dir_okay=False))


def _fail(msg: str) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def friendly_errors(fn):
    """Turn the package's errors (and a few OS ones) into one line + exit 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except A2ATSError as e:
            _fail(str(e))
        except (OSError, ValueError) as e:
            _fail(str(e))
    return wrapper


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
    from .kv import base
    from .kv import dense  # noqa: F401
    try:
        from .kv import retrieval  # noqa: F401
    except ImportError:
        pass
    return sorted(base.POLICIES)


KV_CHOICES = _kv_choices()


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
        click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True),
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


def _open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed):
    from .runtime import Runtime
    if model and model_opt and model != model_opt:
        raise click.UsageError("give the model either as MODEL or with -m, not both")
    if budget is not None and (kv == "dense" or budget <= 0):
        raise click.UsageError("--budget needs a retrieval --kv policy and a positive value")
    params = {} if budget is None else {"budget": int(budget) if budget >= 1 else budget}
    if sidecar is not None and kv not in ("a2ats", "vq"):
        raise click.UsageError("--sidecar is for --kv a2ats or vq")
    return Runtime(model or model_opt, n_ctx=ctx_size, device=device, kv=kv, seed=seed,
                   n_batch=batch_size, kv_params=params, sidecar=sidecar, verbose=True)


def _sampling(temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, **extra):
    return dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, **extra)


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
@friendly_errors
def generate(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed, prompt, prompt_file,
             n_predict, stop, ignore_eos, no_echo, **sampling):
    """Continue a prompt, streaming the text to stdout; timings go to stderr."""
    if prompt is None and prompt_file is None:
        raise click.UsageError("give a prompt with -p TEXT or -f FILE")
    text = prompt if prompt is not None else prompt_file.read()
    rt = _open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed)
    with rt:
        if not no_echo:
            click.echo(text, nl=False)
        try:
            for piece in rt.stream(text, **_sampling(max_tokens=n_predict, stop=list(stop),
                                                     ignore_eos=ignore_eos, **sampling)):
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo("\n[interrupted]", err=True)
        click.echo()
        click.echo(rt.timings.line(), err=True)


@main.command()
@MODEL_ARG
@runtime_options
@click.option("--system", default=None, help="System message.")
@click.option("-n", "--n-predict", type=click.IntRange(min=1), default=512, show_default=True,
              help="Most tokens per reply.")
@click.option("--timings", is_flag=True, help="Print a timing line after each reply.")
@friendly_errors
def chat(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed, system, n_predict,
         timings, **sampling):
    """Interactive chat. /reset clears the conversation, /exit or Ctrl-D quits,
    Ctrl-C stops the current reply."""
    rt = _open_runtime(model, model_opt, ctx_size, batch_size, kv, budget, sidecar, device, seed)
    with rt:
        ChatSession(rt, system=system, max_tokens=n_predict, show_timings=timings,
                    sampling=_sampling(**sampling)).run()


@main.command()
@MODEL_ARG
@click.option("--text", "texts", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Calibration text file (repeatable); default: the offline corpus + random ids.")
@click.option("--tokens", type=click.IntRange(min=1024), default=81920, show_default=True,
              help="Calibration tokens (the paper's 80K; fewer is faster but worse).")
@click.option("--doc-tokens", type=click.IntRange(min=64), default=16384, show_default=True,
              help="Tokens per calibration document (the paper's 16K: the vq baseline's "
                   "post-RoPE codebook only knows the positions it saw).")
@click.option("--centroids", type=click.IntRange(min=2, max=65536), default=4096, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=50, show_default=True,
              help="Most k-means iterations (stops earlier on convergence).")
@click.option("--wrope-b", type=click.IntRange(min=1), default=2048, show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Sidecar path (default: MODEL.a2ats next to the model).")
@click.option("--seed", type=int, default=0, show_default=True)
@friendly_errors
def calibrate(model, texts, tokens, doc_tokens, centroids, iters, wrope_b, output, seed):
    """Train the A2ATS (and plain-VQ baseline) key codebooks and write the sidecar."""
    from tqdm import tqdm

    from .config import ModelConfig
    from .corpus import documents
    from .gguf import GGUFFile
    from .model import Model
    from .tokenizer import Tokenizer
    from .vq import calibrate_model, sidecar_path

    path = _model_path(model)
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
                          progress=lambda it, desc: tqdm(it, desc=desc, file=sys.stderr))
    out = output or sidecar_path(path)
    cal.save(out)
    click.echo(f"wrote {out} ({n} tokens, {len(cal.a2ats)} codebooks of {centroids} centroids)")


def _csv(kind):
    def parse(ctx, param, value):
        try:
            return [kind(x) for x in value.split(",") if x]
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
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None)
@friendly_errors
def eval_cmd(model, policies, contexts, budget, samples, steps, sidecar, tasks, json_out, plot_out):
    """Compare KV policies on the same inputs: attention recall, oracle overlap,
    tail perplexity, agreement with dense, passkey and RULER-style needle retrieval."""
    from tqdm import tqdm

    from . import evaluate
    from .runtime import Runtime

    bad = sorted(set(policies) - set(KV_CHOICES))
    if bad:
        raise click.BadParameter(f"unknown policy {bad[0]!r}; choose from {', '.join(KV_CHOICES)}")
    if budget <= 0:
        raise click.BadParameter("--budget must be positive")
    bad = sorted(set(tasks) - set(TASKS))
    if bad:
        raise click.BadParameter(f"unknown task {bad[0]!r}; choose from {', '.join(TASKS)}")
    rt = Runtime(model, n_ctx=max(contexts) + 2 * steps + 8, sidecar=sidecar)
    with rt:
        records = evaluate.run(rt, policies, contexts, int(budget) if budget >= 1 else budget,
                               samples, steps=steps, tasks=tasks,
                               progress=lambda it, desc: tqdm(it, desc=desc, file=sys.stderr))
    click.echo(evaluate.table(records))
    if json_out:
        evaluate.write_json(records, json_out, {"model": str(rt.model_path), "budget": budget,
                                                "samples": samples, "steps": steps, "tasks": tasks,
                                                "sidecar": sidecar})
        click.echo(f"wrote {json_out}", err=True)
    if plot_out:
        evaluate.plot(records, plot_out)
        click.echo(f"wrote {plot_out}", err=True)


class ChatSession:
    """The interactive loop: keeps the conversation inside the context by
    dropping the oldest turns, and survives Ctrl-C during a reply."""

    def __init__(self, rt, system=None, max_tokens=512, show_timings=False, sampling=None):
        self.rt, self.system, self.max_tokens = rt, system, max_tokens
        self.show_timings, self.sampling = show_timings, sampling or {}
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _fit(self) -> list[int]:
        """Prompt ids of the conversation, oldest turns dropped until a reply fits."""
        head = 1 if self.system else 0
        while True:
            ids = self.rt.chat_prompt(self.messages)
            if len(ids) + min(self.max_tokens, self.rt.n_ctx // 2) <= self.rt.n_ctx \
                    or len(self.messages) - head <= 1:
                return ids
            del self.messages[head]

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

    def turn(self, line: str):
        self.messages.append({"role": "user", "content": line})
        ids = self._fit()
        if len(ids) >= self.rt.n_ctx:
            self.messages.pop()
            click.echo(f"error: this message alone ({len(ids)} tokens) does not fit the context "
                       f"({self.rt.n_ctx}); raise -c", err=True)
            return
        reply = ""
        try:
            for piece in self.rt.stream(ids, max_tokens=self.max_tokens, **self.sampling):
                reply += piece
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        click.echo()
        self.messages.append({"role": "assistant", "content": reply})
        if self.show_timings:
            click.echo(self.rt.timings.line(), err=True)


if __name__ == "__main__":
    main()
