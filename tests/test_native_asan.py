"""Builds the native sources with AddressSanitizer + UBSan (`make asan`: AVX2 and
portable builds) and runs the C driver: valid calls, out-of-range indices,
short buffers, every type, on exactly-sized heap buffers."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                    reason="needs make and a C compiler")
def test_native_library_is_clean_under_asan():
    r = subprocess.run(["make", "-s", "asan"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    if r.returncode != 0 and "cannot find" in out and "asan" in out:
        pytest.skip("the compiler has no AddressSanitizer runtime")
    assert r.returncode == 0, out
    assert r.stdout.count("all native checks passed") == 2, out
    assert "ERROR: AddressSanitizer" not in out and "runtime error" not in out
