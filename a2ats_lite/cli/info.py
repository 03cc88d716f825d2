"""The inspecting commands, which load no model: `info` (what a GGUF file holds) and
`tokenize` (a text's token ids).
"""
from __future__ import annotations

from collections import Counter

import click

from .checks import _model_path
from .errors import friendly_errors
from .options import MODEL_ARG


@click.command()
@MODEL_ARG
@friendly_errors
def info(model):
    """Print what a GGUF model file holds."""
    from ..config import ModelConfig
    from ..gguf import GGUFFile

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


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("text")
@click.option("--special", is_flag=True, help="Parse control tokens such as <bos> in TEXT.")
@click.option("--no-bos", is_flag=True, help="Do not add the BOS token.")
@friendly_errors
def tokenize(model, text, special, no_bos):
    """Print the token ids of TEXT, space-separated (like llama.cpp's tokenize tool)."""
    from ..tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(model)
    ids = tok.encode(text, add_bos=False if no_bos else None, special=special)
    click.echo(" ".join(str(i) for i in ids))
