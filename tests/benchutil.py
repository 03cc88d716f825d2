"""The bench/ scripts as modules for their tests, and a tiny synthetic model to run them on."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_bench(name: str):
    """bench/<name>.py as module `name`, loaded once (kept in sys.modules: dataclasses and
    the benches' own imports of each other look it up there)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def write_tiny(path: Path) -> Path:
    """The tiny q4_0 synthetic model (4096 context, 300 tokens) at path."""
    load_bench("make_synth_gguf").write_synth_gguf(path, "tiny", "q4_0", n_ctx=4096, n_vocab=300)
    return path
