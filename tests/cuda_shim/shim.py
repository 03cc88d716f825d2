"""Run the project's CUDA kernels on the CPU, with CuPy's RawKernel call shape (tests only).

    from cuda_shim import ShimModule          # tests/ is on sys.path under pytest
    mod = ShimModule("rmsnorm")               # kernels/rmsnorm.cu (+ common.cuh), or full text
    k = mod.get_function("rmsnorm_f32")
    k((n_rows,), (128,), (x, w, out, np.int32(n), np.float32(eps)), shared_mem=0)

The text compiled is exactly a2ats_lite.backend.nvrtc.load_source(name) (what NVRTC compiles),
with comments removed and two rewrites of shared-memory declarations: ``extern __shared__ T
name[];`` becomes a pointer to the launch's dynamic shared buffer, and every other
``__shared__`` array is followed by a poison object (refilled with 0xFF at every block start). It is built by ``g++ -std=c++20 -O1 -pthread -include cuda_shim.h`` into a
shared library cached under $A2ATS_SHIM_CACHE (default /tmp/a2ats_cuda_shim-UID), keyed by a
hash of the text, the header and the flags, and loaded with ctypes. See cuda_shim.h for the
execution model (blocks in sequence, one OS thread per CUDA thread, barriers, shuffles).

Arguments are checked as the GPU would see them: pointers must be numpy arrays
(their data pointer is passed, as CuPy passes ``a.data.ptr``); scalars must be numpy scalars whose byte size equals the
kernel parameter's and whose kind (integer / floating) matches. A Python int or float is an
error (CuPy would pass it as long long / double and the kernel would read garbage).

Sanitizers: A2ATS_SHIM_SAN=thread builds with -fsanitize=thread; A2ATS_SHIM_SAN=address with
-fsanitize=address,undefined -fno-sanitize-recover=all (each its own cache entry). The python
process must then have the runtime preloaded (not instrumented itself):
    LD_PRELOAD=$(g++ -print-file-name=libtsan.so) A2ATS_SHIM_SAN=thread python -m pytest ...
    LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 A2ATS_SHIM_SAN=address ...
(`make cuda-san` does both).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cuda_shim.h"
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ("-std=c++20", "-O1", "-pthread", "-fPIC", "-shared", "-fno-gnu-unique",
              "-Wno-unknown-pragmas")
SAN_FLAGS = {
    "": (),
    "thread": ("-fsanitize=thread", "-g", "-fno-omit-frame-pointer"),
    "address": ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-g",
                "-fno-omit-frame-pointer"),
}
SAN_RUNTIME = {"thread": "libtsan", "address": "libasan"}
MAX_DYNAMIC_SMEM_DEFAULT = 48 * 1024     # without the opt-in attribute (as on the GPU)
MAX_DYNAMIC_SMEM_OPTIN = 227 * 1024      # sm_90's opt-in limit per block

_LAUNCH_LOCK = threading.Lock()          # one launch at a time: the shim's block state is global
_GEN_VERSION = "4"                       # bump when the wrapper generator changes


def cache_dir() -> Path:
    d = Path(os.environ.get("A2ATS_SHIM_CACHE") or
             Path(tempfile.gettempdir()) / f"a2ats_cuda_shim-{os.getuid()}")
    d.mkdir(parents=True, exist_ok=True)
    return d


def sanitizer() -> str:
    """The sanitizer mode from $A2ATS_SHIM_SAN: '', 'thread' or 'address'."""
    san = os.environ.get("A2ATS_SHIM_SAN", "").strip().lower()
    if san in ("", "0", "none", "off"):
        return ""
    if san in ("tsan",):
        san = "thread"
    if san in ("asan", "ubsan"):
        san = "address"
    if san not in SAN_FLAGS:
        raise ValueError(f"A2ATS_SHIM_SAN={san!r}: use 'thread' or 'address'")
    return san


# ---- source handling --------------------------------------------------------------------------

_COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def _keep_newlines(m) -> str:      # comments out, line numbers kept (for #line / reports)
    return "\n" * m.group(0).count("\n") or " "
_KERNEL_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)')
_DYN_SMEM_RE = re.compile(
    r"extern\s+__shared__\s+((?:__align__\s*\(\s*\d+\s*\)\s*)?)([\w\s]+?)\s*(\w+)\s*\[\s*\]\s*;")


_STATIC_SMEM_RE = re.compile(
    r"(__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?[^;={}()]*?\b(\w+)\s*(?:\[[^\]]*\]\s*)*;)")


def _rewrite_shared(text: str) -> str:
    """The shim's only source rewrites: ``extern __shared__ T name[];`` -> a pointer into the
    launch's dynamic buffer; every other ``__shared__ ... name[..];`` gets a following
    ``shim::SharedPoison`` object that poisons the array at the start of every block."""
    def dyn(m):
        typ, name = " ".join(m.group(2).split()), m.group(3)
        return f"{typ}* const {name} = reinterpret_cast<{typ}*>(::shim::dyn_smem);"

    def static(m):
        name = m.group(2)
        return f"{m.group(1)} ::shim::SharedPoison _shim_poison_{name}(&{name}, sizeof({name}));"
    return _STATIC_SMEM_RE.sub(static, _DYN_SMEM_RE.sub(dyn, text))


@dataclass(frozen=True)
class Param:
    type: str     # C type as written, without __restrict__ and the name
    name: str
    pointer: bool


def parse_kernels(text: str) -> dict[str, list[Param]]:
    """{kernel name: [Param...]} for every ``extern "C" __global__ void name(...)`` in text."""
    out: dict[str, list[Param]] = {}
    clean = _COMMENT_RE.sub(" ", text)
    for m in _KERNEL_RE.finditer(clean):
        name, plist = m.group(1), m.group(2).strip()
        params: list[Param] = []
        if plist and plist != "void":
            for raw in plist.split(","):
                decl = " ".join(raw.replace("__restrict__", " ").split())
                pm = re.match(r"^(.*?[\s\*&])(\w+)$", decl)
                if not pm:
                    raise ValueError(f"kernel {name}: cannot parse parameter {raw.strip()!r}")
                typ = pm.group(1).strip()
                params.append(Param(typ, pm.group(2), "*" in typ))
        if name in out:
            raise ValueError(f"kernel {name} defined twice")
        out[name] = params
    return out


def _wrappers(kernels: dict[str, list[Param]]) -> str:
    lines = ["\n// ---- generated by tests/cuda_shim/shim.py ----", '#line 1 "shim_launch_wrappers"',
             "#include <type_traits>"]
    for name, params in kernels.items():
        call = ", ".join(f"*({p.type}*)a[{i}]" for i, p in enumerate(params))
        lines.append(
            f'extern "C" int __shim_launch_{name}(unsigned gx, unsigned gy, unsigned gz, '
            f"unsigned bx, unsigned by, unsigned bz, unsigned long smem, void** a) {{\n"
            f"  (void)a;\n"
            f"  return shim::launch(dim3(gx, gy, gz), dim3(bx, by, bz), smem, "
            f"[a]() {{ {name}({call}); }});\n}}")
        sig = [str(len(params))]
        for p in params:
            t = f"std::remove_cv_t<{p.type}>"
            sig.append(f"(int)sizeof({t})")
            sig.append(f"(std::is_pointer_v<{t}> ? 0 : std::is_integral_v<{t}> ? 1 : 2)")
        lines.append(f'extern "C" const int __shim_sig_{name}[] = {{{", ".join(sig)}}};')
    return "\n".join(lines) + "\n"


def _resolve_source(source: str) -> tuple[str, str]:
    """(text, label): a kernel name ('rmsnorm' / 'rmsnorm.cu') or a full source text."""
    if "\n" not in source and re.fullmatch(r"[\w.]+", source):
        from a2ats_lite.backend.nvrtc import load_source
        return load_source(source), source
    return source, "inline"


def build(text: str, san: str | None = None, label: str = "inline") -> Path:
    """Compile kernel text (+ generated launch wrappers) into a cached .so; return its path."""
    san = sanitizer() if san is None else san
    kernels = parse_kernels(text)
    if not kernels:
        raise ValueError(f'{label}: no extern "C" __global__ kernels found')
    full = _rewrite_shared(_COMMENT_RE.sub(_keep_newlines, text)) + _wrappers(kernels)
    flags = BASE_FLAGS + SAN_FLAGS[san]
    key = hashlib.sha256("\0".join(
        [_GEN_VERSION, HEADER.read_text(), full, CXX, " ".join(flags)]).encode()).hexdigest()[:24]
    d = cache_dir()
    safe = re.sub(r"[^A-Za-z0-9_]", "_", label)
    so = d / f"{safe}-{san or 'plain'}-{key}.so"
    if so.is_file():
        return so
    src = d / f"{so.stem}.cpp"          # kept beside the .so: sanitizer reports point into it
    tmp_src = d / f"{so.stem}.{os.getpid()}.cpp"
    tmp_src.write_text(full)
    os.replace(tmp_src, src)
    tmp = d / f"{so.stem}.{os.getpid()}.tmp.so"
    cmd = [CXX, *flags, "-include", str(HEADER), "-x", "c++", str(src), "-o", str(tmp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"shim build of {label} failed ({' '.join(cmd)}):\n{r.stderr}")
    os.replace(tmp, so)
    return so


def _check_runtime(san: str) -> None:
    if not san:
        return
    lib = SAN_RUNTIME[san]
    if lib not in os.environ.get("LD_PRELOAD", ""):
        raise RuntimeError(
            f"A2ATS_SHIM_SAN={san} needs the sanitizer runtime preloaded into python: "
            f"LD_PRELOAD=$(g++ -print-file-name={lib}.so)"
            + (" ASAN_OPTIONS=detect_leaks=0" if san == "address" else "")
            + " (or run `make cuda-san`)")


# ---- modules and kernels ----------------------------------------------------------------------

def _dims(v, what: str) -> tuple[int, int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v),)
    v = tuple(int(x) for x in v)
    if not 1 <= len(v) <= 3 or any(x < 1 for x in v):
        raise ValueError(f"{what} must be 1 to 3 positive ints, got {v}")
    return v + (1,) * (3 - len(v))


class ShimKernel:
    """One kernel; call it like cupy.RawKernel: ``k(grid, block, args, shared_mem=0)``.

    grid/block: int or tuple of up to 3 ints. args: tuple matching the kernel signature:
    numpy arrays for pointer parameters (the data pointer is passed, as CuPy passes a view's
    data.ptr; outputs are written in place),
    numpy scalars (np.int32/np.uint32/np.int64/np.float32 ...) of the exact byte size and
    kind for value parameters. shared_mem: bytes of ``extern __shared__`` memory (at most
    48 KiB unless ``max_dynamic_shared_size_bytes`` is raised, as on the GPU).
    """

    def __init__(self, module: "ShimModule", name: str, params: list[Param]):
        self.module, self.name, self.params = module, name, params
        self._fn = getattr(module._lib, f"__shim_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_ulong, ctypes.c_void_p]
        n = len(params)
        sig = (ctypes.c_int * (1 + 2 * n)).in_dll(module._lib, f"__shim_sig_{name}")
        assert sig[0] == n
        self.sizes = [sig[1 + 2 * i] for i in range(n)]
        self.kinds = [("pointer", "integer", "floating")[sig[2 + 2 * i]] for i in range(n)]
        self.max_dynamic_shared_size_bytes = MAX_DYNAMIC_SMEM_DEFAULT

    @property
    def num_params(self) -> int:
        return len(self.params)

    def _arg(self, i: int, a):
        p, size, kind = self.params[i], self.sizes[i], self.kinds[i]
        where = f"{self.name} argument {i} ({p.type} {p.name})"
        if kind == "pointer":
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{where}: expects a numpy array (device pointer), got {type(a).__name__}")
            return ctypes.c_void_p(a.ctypes.data), a
        if isinstance(a, (bool, np.bool_)) or not isinstance(a, np.generic):
            raise TypeError(f"{where}: expects a numpy scalar of {size} bytes "
                            f"(e.g. numpy.int32(...)/numpy.float32(...)), got {type(a).__name__}: "
                            "a Python int/float is passed as 8-byte long long/double")
        if a.dtype.itemsize != size:
            raise TypeError(f"{where}: {a.dtype} has {a.dtype.itemsize} bytes, the kernel takes {size}")
        is_int = np.issubdtype(a.dtype, np.integer)
        if (kind == "integer") != is_int or not (is_int or np.issubdtype(a.dtype, np.floating)):
            raise TypeError(f"{where}: {a.dtype} passed where the kernel takes a {kind} value")
        buf = (ctypes.c_char * size).from_buffer_copy(a.tobytes())
        return buf, None

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        g, b = _dims(grid, "grid"), _dims(block, "block")
        if b[0] * b[1] * b[2] > 1024 or b[2] > 64:
            raise ValueError(f"{self.name}: block {b} has more than 1024 threads (or z > 64)")
        if g[1] > 65535 or g[2] > 65535 or g[0] > 2**31 - 1:
            raise ValueError(f"{self.name}: grid {g} out of range")
        shared_mem = int(shared_mem)
        if not 0 <= shared_mem <= min(self.max_dynamic_shared_size_bytes, MAX_DYNAMIC_SMEM_OPTIN):
            raise ValueError(f"{self.name}: shared_mem={shared_mem} exceeds "
                             f"max_dynamic_shared_size_bytes={self.max_dynamic_shared_size_bytes}")
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        holders, keep = [], []
        for i, a in enumerate(args):
            h, k = self._arg(i, a)
            holders.append(h)
            keep.append(k)
        argv = (ctypes.c_void_p * max(1, len(holders)))(
            *[ctypes.addressof(h) for h in holders] or [None])
        with _LAUNCH_LOCK:
            rc = self._fn(*g, *b, shared_mem, argv)
        if rc != 0:
            raise RuntimeError(f"{self.name}: shim launch failed with code {rc} (grid {g}, block {b})")


class ShimModule:
    """A kernel source compiled for the CPU shim (the analogue of cupy.RawModule).

    source: a kernel name ("rmsnorm" -> kernels/common.cuh + kernels/rmsnorm.cu, the same
    text as a2ats_lite.backend.nvrtc.load_source) or a complete source text (must already
    contain the prelude if it uses it). san: None (from $A2ATS_SHIM_SAN), '', 'thread' or
    'address'. Attributes: path (the cached .so), kernels ({name: [Param]}), text.
    """

    def __init__(self, source: str, san: str | None = None):
        self.text, self.label = _resolve_source(source)
        self.san = sanitizer() if san is None else san
        _check_runtime(self.san)
        self.kernels = parse_kernels(self.text)
        self.path = build(self.text, self.san, self.label)
        self._lib = ctypes.CDLL(str(self.path))
        self._fns: dict[str, ShimKernel] = {}

    def get_function(self, name: str) -> ShimKernel:
        if name not in self.kernels:
            raise KeyError(f"{self.label}: no kernel {name!r} (has {sorted(self.kernels)})")
        if name not in self._fns:
            self._fns[name] = ShimKernel(self, name, self.kernels[name])
        return self._fns[name]
