"""Checks on flag values, output paths and optional dependencies, made before any work
starts or any output is printed; each failure is one `error: ...` line and exit 2.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import click

from .errors import _fail


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
    from ..default_model import default_model_path
    return str(default_model_path())


def _csv(kind):
    """A click callback parsing a comma-separated list of `kind` values."""
    def parse(ctx, param, value):
        try:
            return [kind(x.strip()) for x in value.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list, got {value!r}") from None
    return parse
