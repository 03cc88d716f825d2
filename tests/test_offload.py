"""--kv-offload-dir / Runtime(kv_offload_dir=...): a retrieval policy's full K/V store in an
unlinked file of the directory, and nothing left there after close, an exception or SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from a2ats_lite.cli import main
from a2ats_lite.runtime import Runtime

KV = dict(kv="quest", kv_params={"budget": 16})      # a retrieval policy without a sidecar


def _mapped_from(d: Path) -> list[str]:
    """This process's mappings of files that lived in d (unlinked: '(deleted)')."""
    return [ln for ln in Path("/proc/self/maps").read_text().splitlines() if str(d) in ln]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_store_lives_in_the_dir_and_nothing_is_left(default_model, tmp_path):
    with Runtime(default_model, n_ctx=512, kv_offload_dir=tmp_path, **KV) as rt:
        out = rt.generate("Once upon a time", max_tokens=4, temperature=0)
        assert out
        rt.generate("Once upon a time there", max_tokens=2, temperature=0)
        maps = _mapped_from(tmp_path)
        assert maps and all("(deleted)" in ln for ln in maps)     # the store is that file
        assert list(tmp_path.iterdir()) == []                    # unlinked at once
    assert _mapped_from(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_an_exception_mid_generation_leaves_nothing(default_model, tmp_path):
    with Runtime(default_model, n_ctx=512, kv_offload_dir=tmp_path, **KV) as rt:
        it = rt.stream("Once upon a time", max_tokens=50, temperature=0)
        next(it)
        with pytest.raises(RuntimeError):
            it.throw(RuntimeError("the caller gave up"))
        assert rt.kv.nbytes() == 0
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leaves_nothing(default_model, tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from a2ats_lite.runtime import Runtime
        rt = Runtime({str(default_model)!r}, n_ctx=512, kv_offload_dir={str(tmp_path)!r},
                     kv="quest", kv_params={{"budget": 16}})
        it = rt.stream("Once upon a time", max_tokens=500, temperature=0, ignore_eos=True)
        next(it)
        print("ready", flush=True)
        for _ in it:
            time.sleep(0.05)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    assert list(tmp_path.iterdir()) == []


def test_bad_offload_dirs_are_one_error(default_model, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Runtime(default_model, kv_offload_dir=tmp_path / "nope", **KV)
    with pytest.raises(ValueError, match="retrieval KV policy"):
        Runtime(default_model, kv_offload_dir=tmp_path)          # dense keeps K/V in memory
    r = CliRunner().invoke(main, ["generate", str(default_model), "-p", "x", "-n", "1",
                                  "--kv", "quest", "--kv-offload-dir", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "does not exist" in r.stderr and "Traceback" not in r.output
