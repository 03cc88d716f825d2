"""Every CUDA kernel source compiles with NVRTC exactly as cupy.RawModule would, on every
architecture we ship for, with no warning, no spill, and within its declared budgets.

No GPU or driver is needed (only the cupy-cuda12x and nvidia-cuda-nvrtc-cu12 wheels of the
``cuda-test`` extra). Budgets come from ``// budget: KERNEL registers<=N smem<=M`` comments in
each .cu file (a2ats_lite.backend.nvrtc.budgets); every extern "C" kernel must declare one.
"""
from __future__ import annotations

import re

import pytest

pytest.importorskip("cupy")

from a2ats_lite.backend import nvrtc  # noqa: E402

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
SOURCES = nvrtc.kernel_names()
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(')


def _declared_kernels(text: str) -> set[str]:
    text = re.sub(r"//[^\n]*|/\*.*?\*/", " ", text, flags=re.S)
    return set(_KERNEL_RE.findall(text))


_cache: dict = {}


def _compile(name: str, arch: str) -> nvrtc.CompileResult:
    key = (name, arch)
    if key not in _cache:
        _cache[key] = nvrtc.compile_kernel(name, arch)
    return _cache[key]


def test_sources_found():
    assert SOURCES, f"no .cu files under {nvrtc.KERNEL_DIR}"
    for mine in ("rmsnorm", "rope", "act", "argmax", "attention_gtd"):
        assert mine in SOURCES


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", SOURCES)
def test_compiles_clean_within_budget(name, arch):
    text = nvrtc.load_source(name)
    res = _compile(name, arch)
    assert res.cubin, "empty cubin"
    assert not res.warnings, f"{name}.cu ({arch}) compiler warnings:\n" + "\n".join(res.warnings)
    declared = _declared_kernels(text)
    assert declared, f"{name}.cu declares no extern \"C\" __global__ kernel"
    assert declared <= set(res.registers), (declared, res.registers)
    spills = {k: v for k, v in res.spill_stores.items() if v}
    assert not spills, f"{name}.cu ({arch}) spill stores: {spills}\n{res.log}"
    budgets = nvrtc.budgets(text)
    missing = declared - set(budgets)
    assert not missing, f"{name}.cu: kernels without a '// budget:' line: {sorted(missing)}"
    over = []
    for k in sorted(declared):
        b = budgets[k]
        if "registers" in b and res.registers[k] > b["registers"]:
            over.append(f"{k}: {res.registers[k]} registers > {b['registers']}")
        if "smem" in b and res.smem[k] > b["smem"]:
            over.append(f"{k}: {res.smem[k]} bytes static smem > {b['smem']}")
    assert not over, f"{name}.cu ({arch}) over budget: " + "; ".join(over)


def test_compile_error_is_reported_with_log():
    bad = nvrtc.load_source("rmsnorm").replace("float ss = 0.0f;", "float ss = 0.0f", 1)
    with pytest.raises(nvrtc.KernelCompileError) as ei:
        nvrtc.compile_cubin(bad, "rmsnorm.cu", "sm_80")
    assert "rmsnorm.cu(" in ei.value.log and "error" in ei.value.log


def test_warning_is_caught():
    src = nvrtc.load_source("rmsnorm").replace("float ss = 0.0f;", "float ss = 0.0f; int unused_var;", 1)
    res = nvrtc.compile_cubin(src, "rmsnorm.cu", "sm_80")
    assert any("unused_var" in w for w in res.warnings), res.log


def test_budget_parser():
    b = nvrtc.budgets("// budget: k1 registers<=64 smem<=1024\n//budget: k2 registers<=32\n")
    assert b == {"k1": {"registers": 64, "smem": 1024}, "k2": {"registers": 32}}
