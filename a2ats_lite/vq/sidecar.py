"""The calibration sidecar: Calibration (codebooks per (layer, KV head) plus parameters)
and its file format, written atomically and read defensively.

One .npz per model (MODEL.a2ats), holding per (layer, kv head) both codebooks and L
(KIND.LAYER.HEAD.L; M = 1: .C, key-space centroids (C, d); M > 1: .P0 ... .P{M-1},
k'-space centroids (C, d / M) each), the parameters (b, w, s, n_centroids, codes =
"MxBITS" when calibrate recorded a layout; sidecars without it are M = 1; scan = "fast" for
a layout fast-scan scores, else absent or "exact") and the model
file's fingerprint (sha256 over its size, first MiB and last MiB: cheap, and any
re-quantization or different model changes it). A sidecar is untrusted input: only
the expected members are read, each after its declared dtype and shape were checked
against SIDECAR_LIMITS.
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import stat
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SidecarError
from .codebook import FAST_SCAN_MAX_M, Codebook, fast_scan_layout, parse_codes

SIDECAR_VERSION = 1
REQUIRED_PARAMS = ("b", "w", "s", "n_centroids")

# what a sidecar may hold: anything beyond is refused before it is read
SIDECAR_LIMITS = {
    "max_param": 1 << 20,          # b, w, s
    "max_centroids": 65536,        # codes are uint16
    "max_dim": 4096,               # key (head) dimension
    "max_members": 1 << 16,        # (layers x kv heads x 2 kinds x (1 + subspaces)) + 3
    "max_bytes": 8 << 30,          # all arrays together, uncompressed
    "params_chars": 1 << 16,       # meta.params text
    "fingerprint_chars": 256,
}
_MEMBER = re.compile(r"(a2ats|vq)\.(\d{1,5})\.(\d{1,5})\.([CL]|P\d{1,4})")
_META_MEMBERS = ("meta.version", "meta.fingerprint", "meta.params")


def fingerprint(model_path) -> str:
    """Cheap identity of a model file: sha256 of its size, first MiB and last MiB."""
    p = Path(model_path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def sidecar_path(model_path) -> Path:
    return Path(str(model_path) + ".a2ats")


def load_sidecar_for(model_path, path=None) -> Calibration:
    """The calibration at path (default: next to the model file), checked against the model."""
    return Calibration.load(path or sidecar_path(model_path), model_path=model_path)


@dataclass
class Calibration:
    """Codebooks per (layer, KV head) for A2ATS and the plain-VQ ablation, plus parameters."""
    params: dict                                    # b, w, s, n_centroids, and how it was made
    fingerprint: str                                # of the model file (fingerprint())
    a2ats: dict = field(default_factory=dict)       # (layer, kv_head) -> Codebook (pre-RoPE keys)
    vq: dict = field(default_factory=dict)          # (layer, kv_head) -> Codebook (post-RoPE, L = I)

    def save(self, path) -> None:
        """Write atomically: a temp file in the same directory, fsync, os.replace. An
        interrupted save leaves the old sidecar (or none), never half a file."""
        arrays = {"meta.version": np.array(SIDECAR_VERSION),
                  "meta.fingerprint": np.array(self.fingerprint),
                  "meta.params": np.array(repr(sorted(self.params.items())))}
        for kind, books in (("a2ats", self.a2ats), ("vq", self.vq)):
            for (layer, head), cb in books.items():
                if cb.sub is None:
                    arrays[f"{kind}.{layer}.{head}.C"] = np.asarray(cb.centroids)
                else:       # product codes: one member per subspace, k' space
                    for m in range(cb.M):
                        arrays[f"{kind}.{layer}.{head}.P{m}"] = np.asarray(cb.sub[m])
                arrays[f"{kind}.{layer}.{head}.L"] = np.asarray(cb.L)
        path = Path(path)
        if not path.parent.is_dir():
            raise SidecarError(f"{path}: cannot write the sidecar: directory {path.parent} "
                               f"does not exist")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:    # name the sidecar, not the temporary file
            raise SidecarError(f"{path}: cannot write the sidecar ({e.strerror or e})") from None
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path, model_path=None) -> "Calibration":
        """Read a sidecar; with model_path, check it was made for that model file.
        Missing, corrupted, incomplete, implausible or mismatched -> SidecarError
        naming the file. Only the expected members are read, each after its declared
        dtype and shape were checked (see SIDECAR_LIMITS); unknown members are refused."""
        path = Path(path)
        try:
            arrays = _read_sidecar(path)
        except FileNotFoundError:
            hint = f" {model_path}" if model_path is not None else " MODEL"
            raise SidecarError(f"{path}: no calibration sidecar; make one with "
                               f"`a2ats-lite calibrate{hint}`") from None
        except SidecarError as e:
            raise SidecarError(f"{path}: {e}") from None
        except OSError as e:
            if e.errno is None:  # zipfile/numpy format errors that subclass OSError
                raise SidecarError(f"{path}: corrupted calibration sidecar ({e})") from None
            raise SidecarError(f"{path}: cannot read the calibration sidecar "
                               f"({e.strerror or e})") from None
        except Exception as e:  # zip / npy format errors of a corrupted file
            raise SidecarError(f"{path}: corrupted calibration sidecar ({type(e).__name__}: {e})"
                               ) from None
        try:
            cal = cls._from_arrays(arrays)
        except SidecarError as e:
            raise SidecarError(f"{path}: {e}") from None
        except (KeyError, ValueError, IndexError, TypeError, SyntaxError, RecursionError,
                MemoryError) as e:
            raise SidecarError(f"{path}: corrupted calibration sidecar (missing or bad {e})"
                               ) from None
        if model_path is not None and cal.fingerprint != fingerprint(model_path):
            raise SidecarError(f"sidecar {path} was made for another model file; run "
                               f"`a2ats-lite calibrate {model_path}`")
        return cal

    @classmethod
    def _from_arrays(cls, arrays: dict) -> "Calibration":
        """Build and validate a Calibration from the sidecar's arrays (name -> array)."""
        def bad(what):
            return SidecarError(f"corrupted calibration sidecar ({what})")

        for key in ("meta.version", "meta.fingerprint", "meta.params"):
            if key not in arrays:
                raise bad(f"no {key}")
        v = np.asarray(arrays["meta.version"])
        if v.shape != () or v.dtype.kind not in "iu":
            raise bad(f"meta.version must be an integer, got {v.dtype} {v.shape}")
        version = int(v)
        if version != SIDECAR_VERSION:
            raise SidecarError(f"sidecar format version {version}, this build reads "
                               f"{SIDECAR_VERSION}; recalibrate")
        fp, text = np.asarray(arrays["meta.fingerprint"]), np.asarray(arrays["meta.params"])
        if fp.shape != () or fp.dtype.kind != "U" or text.shape != () or text.dtype.kind != "U":
            raise bad("meta.fingerprint and meta.params must be strings")
        text = str(text)
        if len(text) > SIDECAR_LIMITS["params_chars"]:
            raise bad(f"meta.params longer than {SIDECAR_LIMITS['params_chars']} characters")
        try:
            items = ast.literal_eval(text)   # literals only: no code runs
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            raise bad("meta.params is not a list of (name, value) pairs") from None
        if not isinstance(items, list) or not all(
                isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) for it in items):
            raise bad("meta.params is not a list of (name, value) pairs")
        params = dict(items)
        missing = [p for p in REQUIRED_PARAMS if p not in params]
        if missing:
            raise bad(f"no parameter {missing[0]!r}")
        for name in REQUIRED_PARAMS:
            hi = SIDECAR_LIMITS["max_centroids"] if name == "n_centroids" else SIDECAR_LIMITS["max_param"]
            val = params[name]
            if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= hi:
                raise bad(f"parameter {name}={val!r:.40} must be an integer in [1, {hi}]")
        if "rerank" in params:        # the re-rank factor calibrate recommends (policy default)
            val = params["rerank"]
            if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= 1024:
                raise bad(f"parameter rerank={val!r:.40} must be an integer in [1, 1024]")
        n_centroids = params["n_centroids"]
        M = 1                         # no 'codes' parameter: the paper's layout (.C members)
        if "codes" in params:
            try:
                M, bits = parse_codes(params["codes"]) if isinstance(params["codes"], str) \
                    else (None, None)
            except ValueError:
                M = None
            if M is None:
                raise bad(f"parameter codes={params['codes']!r:.40} must be a string MxBITS")
            if 2 ** bits != n_centroids:
                raise bad(f"parameter codes={params['codes']} needs n_centroids={2 ** bits}, "
                          f"the parameters say n_centroids={n_centroids}")
        if "scan" in params:          # how the policy scores the codes (fast: 4-bit fast-scan)
            if params["scan"] not in ("exact", "fast"):
                raise bad(f"parameter scan={params['scan']!r:.40} must be 'exact' or 'fast'")
            if params["scan"] == "fast" and not fast_scan_layout(M, n_centroids):
                raise bad(f"parameter scan='fast' needs 4-bit codes in an even number of at most "
                          f"{FAST_SCAN_MAX_M} subspaces, the layout is {M} x {n_centroids} "
                          f"centroids")
        cal = cls(params=params, fingerprint=str(fp))
        found: dict = {}
        for key in arrays:
            if key.startswith("meta."):
                continue
            m = _MEMBER.fullmatch(key)
            if m is None:
                raise bad(f"unexpected member {key!r}")
            found.setdefault((m[1], int(m[2]), int(m[3])), {})[m[4]] = arrays[key]
        dims = set()
        for (kind, layer, head), pair in sorted(found.items()):
            where = f"codebook {kind} layer {layer} head {head}"
            if "L" not in pair:
                raise bad(f"{where}: missing L")
            L = pair["L"]
            subs = sorted(k for k in pair if k.startswith("P"))
            if M == 1:
                if subs:
                    raise bad(f"{where}: subspace member {subs[0]} in a 1-subspace layout")
                if "C" not in pair:
                    raise bad(f"{where}: missing C")
                C = pair["C"]
                if C.ndim != 2 or C.dtype.kind != "f" or L.dtype.kind != "f" or C.shape[1] == 0 \
                        or L.shape != (C.shape[1], C.shape[1]):
                    raise bad(f"bad {where}: C {C.dtype} {C.shape}, L {L.dtype} {L.shape}")
                n_got, blocks = C.shape[0], [C]
            else:
                if "C" in pair:
                    raise bad(f"{where}: a key-space C in a {params['codes']} product layout")
                want = [f"P{i}" for i in range(M)]
                if set(subs) != set(want):
                    gone = sorted(set(want) - set(subs), key=lambda n: int(n[1:]))
                    raise bad(f"{where}: missing subspace {gone[0]}" if gone else
                              f"{where}: subspace {sorted(set(subs) - set(want))[0]} beyond "
                              f"codes={params['codes']}")
                blocks = [pair[f"P{i}"] for i in range(M)]
                ds = blocks[0].shape[1] if blocks[0].ndim == 2 else 0
                if L.dtype.kind != "f" or L.ndim != 2 or L.shape[0] != L.shape[1] or any(
                        P.ndim != 2 or P.dtype.kind != "f" or P.shape != blocks[0].shape
                        for P in blocks) or ds == 0 or M * ds != L.shape[0]:
                    raise bad(f"bad {where}: {M} subspaces of {[P.shape for P in blocks][:4]} "
                              f"do not split L {L.dtype} {L.shape} (need M * dsub == head dim)")
                n_got = blocks[0].shape[0]
            if n_got != n_centroids:
                raise bad(f"{where}: {n_got} centroids, the parameters say n_centroids="
                          f"{n_centroids}")
            if not (all(np.isfinite(P).all() for P in blocks) and np.isfinite(L).all()):
                raise bad(f"{where}: NaN or infinite values")
            if np.triu(L, 1).any() or not np.all(np.diag(L) != 0):
                raise bad(f"{where}: L is not a lower-triangular factor with a non-zero "
                          f"diagonal")
            dims.add(L.shape[0])
            book = Codebook(pair["C"], L) if M == 1 else Codebook(None, L, np.stack(blocks))
            (cal.a2ats if kind == "a2ats" else cal.vq)[(layer, head)] = book
        if not cal.a2ats:
            raise bad("no codebooks")
        if len(dims) != 1:
            raise bad(f"codebooks of different key sizes {sorted(dims)}")
        if cal.vq and set(cal.vq) != set(cal.a2ats):
            raise bad("the vq codebooks do not cover the same (layer, head) pairs as a2ats")
        return cal


def _check_member(name: str, shape: tuple, dtype: np.dtype) -> None:
    """Refuse an unexpected dtype or shape for a member before reading its data."""
    lim = SIDECAR_LIMITS
    if dtype.hasobject:
        raise SidecarError(f"corrupted calibration sidecar ({name} holds Python objects)")
    if name == "meta.version":
        ok = shape == () and dtype.kind in "iu" and dtype.itemsize <= 8
    elif name in ("meta.fingerprint", "meta.params"):
        n = lim["fingerprint_chars"] if name == "meta.fingerprint" else lim["params_chars"]
        ok = shape == () and dtype.kind == "U" and dtype.itemsize <= 4 * n
    else:
        m = _MEMBER.fullmatch(name)
        if m is None:
            raise SidecarError(f"corrupted calibration sidecar (unexpected member {name!r})")
        ok = (dtype.kind == "f" and dtype.itemsize in (2, 4, 8) and len(shape) == 2
              and 1 <= shape[1] <= lim["max_dim"]
              and (1 <= shape[0] <= lim["max_centroids"] if m[4] != "L" else shape[0] == shape[1]))
    if not ok:
        raise SidecarError(f"corrupted calibration sidecar ({name}: unexpected {dtype} array "
                           f"of shape {shape})")


def _read_header(fp):
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise SidecarError(f"corrupted calibration sidecar (unsupported .npy version {version})")


def _read_sidecar(path: Path) -> dict:
    """The sidecar's arrays by name, reading only expected, plausible members."""
    # O_NONBLOCK + fstat: a FIFO or device is refused instead of blocking the reader
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SidecarError("not a regular file, not a calibration sidecar")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            z = zipfile.ZipFile(f)
        except zipfile.BadZipFile:
            raise SidecarError("corrupted calibration sidecar: not a valid sidecar "
                               "(not an npz/zip file)") from None
        with z:
            infos = z.infolist()
            if len(infos) > SIDECAR_LIMITS["max_members"]:
                raise SidecarError(f"corrupted calibration sidecar ({len(infos)} members)")
            plan, total = {}, 0
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise SidecarError(f"corrupted calibration sidecar (unexpected member "
                                       f"{info.filename!r})")
                name = info.filename[:-4]
                if name in plan:
                    raise SidecarError(f"corrupted calibration sidecar (duplicate member {name!r})")
                if name not in _META_MEMBERS and _MEMBER.fullmatch(name) is None:
                    raise SidecarError(f"corrupted calibration sidecar (unexpected member "
                                       f"{info.filename!r})")
                with z.open(info) as fp:
                    shape, fortran, dtype = _read_header(fp)
                    _check_member(name, shape, dtype)
                    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    if info.file_size != fp.tell() + nbytes:
                        raise SidecarError(f"corrupted calibration sidecar ({name}: member size "
                                           f"{info.file_size} does not match its {dtype} "
                                           f"{shape} header)")
                total += nbytes
                if total > SIDECAR_LIMITS["max_bytes"]:
                    raise SidecarError(f"corrupted calibration sidecar (more than "
                                       f"{SIDECAR_LIMITS['max_bytes']} bytes of arrays)")
                plan[name] = (info, shape, fortran, dtype, nbytes)
            arrays = {}
            for name, (info, shape, fortran, dtype, nbytes) in plan.items():
                with z.open(info) as fp:
                    _read_header(fp)
                    buf = bytearray(nbytes)
                    view, got = memoryview(buf), 0
                    while got < nbytes:
                        n = fp.readinto(view[got:])
                        if not n:
                            raise SidecarError(f"corrupted calibration sidecar ({name} is "
                                               f"truncated)")
                        got += n
                a = np.frombuffer(buf, dtype=dtype)
                arrays[name] = (a.reshape(shape[::-1]).T if fortran else a.reshape(shape))
            return arrays
