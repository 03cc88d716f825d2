"""Kernel sources and an NVRTC compile that needs no GPU (and no driver).

Every kernel lives in ``a2ats_lite/backend/kernels/NAME.cu`` and is compiled as ONE text:
``kernels/common.cuh`` (typedefs instead of <stdint.h>, __half helpers, warp/block reductions)
followed by ``NAME.cu``, joined with ``#line`` markers so that compiler messages name the right
file and line. :func:`load_source` builds that text; the CUDA backend hands it to
``cupy.RawModule(code=...)``, :func:`compile_cubin` hands it to NVRTC exactly as RawModule
would (for CI: warnings, registers, shared memory, spills), and the CPU shim
(tests/cuda_shim) compiles the very same string with g++.

Each ``.cu`` file states per kernel budgets in comments that tests/test_cuda_compile.py holds::

    // budget: rmsnorm_f32 registers<=64 smem<=1024

:func:`budgets` parses them. Kernels are ``extern "C" __global__`` (no name mangling).

Pinned CuPy internals: :func:`compile_cubin` calls ``cupy._core.core.assemble_cupy_compiler_options``
and ``cupy.cuda.nvrtc`` (createProgram/compileProgram/getCUBIN/getProgramLog). They are not public
API; the versions are pinned in pyproject's ``cuda-test`` extra (cupy-cuda12x==14.2.0,
nvidia-cuda-nvrtc-cu12==12.9.86). Keep every use of them inside this module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
PRELUDE = "common.cuh"

# CuPy itself appends '-ftz=true' to every NVRTC compile (cupy/cuda/compiler.py,
# _compile_with_cache_cuda), then '-arch=sm_XX' and '--device-as-default-execution-space'.
# compile_cubin adds the same; pass only YOUR options to cupy.RawModule(options=...).
RAWMODULE_OPTIONS = ("-ftz=true",)


def kernel_names() -> list[str]:
    """Names (without .cu) of every kernel source in the kernels directory, sorted."""
    return sorted(p.stem for p in KERNEL_DIR.glob("*.cu"))


def load_source(name: str) -> str:
    """The complete text of kernel source ``name``: common.cuh + NAME.cu.

    ``name`` is a file stem ("rmsnorm") or a file name ("rmsnorm.cu"). The result is what
    both NVRTC (cupy.RawModule(code=...)) and the CPU shim compile: one string, no #include
    of project files, with ``#line`` directives so errors point at the original file/line.
    """
    stem = name[:-3] if name.endswith(".cu") else name
    path = KERNEL_DIR / f"{stem}.cu"
    if not path.is_file():
        raise FileNotFoundError(f"no kernel source {path}")
    prelude = (KERNEL_DIR / PRELUDE).read_text()
    return (f'#line 1 "{PRELUDE}"\n{prelude}\n' + _inline(path.read_text(), f"{stem}.cu"))


_INCLUDE_RE = re.compile(r'^#include "(\w+\.cuh)"[^\n]*$', re.M)


def _inline(text: str, name: str) -> str:
    """text with each `#include "X.cuh"` line (a file beside the kernels) replaced by that
    file, with #line markers: NVRTC and the shim get one self-contained string."""
    out, pos = [f'#line 1 "{name}"\n'], 0
    for m in _INCLUDE_RE.finditer(text):
        inc = KERNEL_DIR / m.group(1)
        if not inc.is_file():
            raise FileNotFoundError(f"{name}: no kernel header {inc}")
        line = text.count("\n", 0, m.end()) + 2
        out += [text[pos:m.start()], f'#line 1 "{m.group(1)}"\n', inc.read_text(),
                f'\n#line {line} "{name}"\n']
        pos = m.end() + 1
    out.append(text[pos:] + "\n")
    return "".join(out)


_BUDGET_RE = re.compile(r"//\s*budget:\s*(\w+)\s+(.*)")
_BUDGET_ITEM_RE = re.compile(r"(registers|smem|spill)\s*<=\s*(\d+)")


def budgets(text: str) -> dict[str, dict[str, int]]:
    """Parse ``// budget: KERNEL registers<=N smem<=M`` comments.

    Returns {kernel: {"registers": N, "smem": M}} (only the keys that are stated).
    ``smem`` is the STATIC shared memory ptxas reports; dynamic shared memory is a launch
    argument and is checked by the caller.
    """
    out: dict[str, dict[str, int]] = {}
    for m in _BUDGET_RE.finditer(text):
        items = dict((k, int(v)) for k, v in _BUDGET_ITEM_RE.findall(m.group(2)))
        out.setdefault(m.group(1), {}).update(items)
    return out


@dataclass
class CompileResult:
    """What NVRTC produced for one source and one architecture.

    cubin: the SASS binary (loadable by cupy.RawModule / cuModuleLoadData on that arch).
    log: NVRTC's program log (warnings and the ptxas -v report).
    registers / smem / spill_stores / spill_loads / stack: per kernel (mangled == plain names
    for extern "C"), from the ``-Xptxas=-v`` lines. smem is static shared memory in bytes.
    warnings: log lines that are compiler warnings (anything with "warning" outside the ptxas
    info report).
    """
    cubin: bytes
    log: str
    arch: str
    options: tuple
    registers: dict[str, int] = field(default_factory=dict)
    smem: dict[str, int] = field(default_factory=dict)
    spill_stores: dict[str, int] = field(default_factory=dict)
    spill_loads: dict[str, int] = field(default_factory=dict)
    stack: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def kernels(self) -> list[str]:
        return sorted(self.registers)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel source; .log holds NVRTC's full program log."""

    def __init__(self, msg: str, log: str = ""):
        super().__init__(msg)
        self.log = log


_FUNC_RE = re.compile(r"Function properties for (\w+)")
_STACK_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY_RE = re.compile(r"Compiling entry function '(\w+)'")
_USED_RE = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(log: str, res: CompileResult) -> None:
    """Fill res.registers/smem/spills/stack/warnings from an -Xptxas=-v log."""
    cur = None
    for line in log.splitlines():
        m = _ENTRY_RE.search(line) or _FUNC_RE.search(line)
        if m:
            cur = m.group(1)
            continue
        m = _STACK_RE.search(line)
        if m and cur is not None:
            res.stack[cur] = int(m.group(1))
            res.spill_stores[cur] = int(m.group(2))
            res.spill_loads[cur] = int(m.group(3))
            continue
        m = _USED_RE.search(line)
        if m and cur is not None:
            res.registers[cur] = int(m.group(1))
            res.smem[cur] = int(m.group(2) or 0)
            continue
        low = line.lower()
        if "warning" in low and "ptxas info" not in low:
            res.warnings.append(line.strip())


def compile_cubin(source: str, name: str = "kernel.cu", arch: str = "sm_80",
                  options=()) -> CompileResult:
    """Compile ``source`` with NVRTC to a cubin for ``arch``, exactly as cupy.RawModule would.

    Options passed to NVRTC: ``cupy._core.core.assemble_cupy_compiler_options(options)`` +
    ``('-ftz=true', f'-arch={arch}', '--device-as-default-execution-space', '-Xptxas=-v')``.
    Needs only the cupy-cuda12x and nvidia-cuda-nvrtc-cu12 wheels (no GPU, no driver).

    source: full kernel text (use :func:`load_source`). name: the file name NVRTC reports.
    arch: "sm_80", "sm_86", "sm_89", "sm_90", ... options: extra user options (as RawModule's
    ``options=``). Raises :class:`KernelCompileError` (with the NVRTC log) on compile errors.
    """
    from cupy._core import core as _core   # pinned internal name
    from cupy.cuda import nvrtc

    opts = tuple(_core.assemble_cupy_compiler_options(tuple(options))) + RAWMODULE_OPTIONS + (
        f"-arch={arch}", "--device-as-default-execution-space", "-Xptxas=-v")
    prog = nvrtc.createProgram(source, name, (), ())
    try:
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise KernelCompileError(f"NVRTC failed for {name} ({arch}):\n{log}", log) from e
        log = nvrtc.getProgramLog(prog)
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    res = CompileResult(cubin=cubin, log=log, arch=arch, options=opts)
    parse_ptxas(log, res)
    return res


def compile_kernel(name: str, arch: str = "sm_80", options=()) -> CompileResult:
    """compile_cubin(load_source(name), f"{name}.cu", arch, options)."""
    stem = name[:-3] if name.endswith(".cu") else name
    return compile_cubin(load_source(stem), f"{stem}.cu", arch, options)
