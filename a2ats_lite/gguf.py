"""Fast GGUF reader: struct + numpy over an mmap, zero-copy tensor views.

gguf.GGUFReader builds Python objects per array item (~109 s for a 262K
vocabulary on 2 cores); this parser builds numeric arrays with one
numpy.frombuffer each and string arrays with one pass, so the default model
opens in well under a second. GGUF files are untrusted: every length and
count is checked against the bytes that remain before anything is allocated,
and every problem is a ModelError naming the file.

Layout (v2/v3, little-endian):
    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value_type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims] (innermost first), u32 type, u64 offset)
    padding to general.alignment | tensor data (offsets relative to here)
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelError

# GGUF metadata value types -> numpy dtype for the fixed-size ones
_SCALAR = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
    4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("<u1"),
    10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8"),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9
_MAX_DEPTH = 4        # nested arrays deeper than this are not real metadata
_MAX_DIMS = 4         # GGML_MAX_DIMS

GGML_TYPE_NAMES = {t.value: t.name for t in GGMLQuantizationType}
GGML_TYPE_IDS = {name: t for t, name in GGML_TYPE_NAMES.items()}
GGML_F32, GGML_F16 = GGML_TYPE_IDS["F32"], GGML_TYPE_IDS["F16"]
# type id -> (elements per block, bytes per block)
GGML_BLOCK = {t.value: v for t, v in GGML_QUANT_SIZES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple          # numpy order (outermost first): a weight is (n_out, n_in)
    offset: int           # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, str(self.ggml_type))

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buf, path):
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, problem: str):
        raise ModelError(self.path, problem)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            self.fail(f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                      f"file has {self.end}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def u32(self, what): return self.unpack("<I", what)
    def u64(self, what): return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return _decode(raw)

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        self.need(count * dtype.itemsize, what)
        a = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return a


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        # Some vocabularies hold raw byte pieces; keep them round-trippable.
        return raw.decode("utf-8", errors="surrogateescape")


def _read_value(cur: _Cursor, vtype: int, key: str, depth: int = 0):
    if vtype in _SCALAR:
        v = cur.array(_SCALAR[vtype], 1, f"value of {key}")[0]
        return bool(v) if vtype == _BOOL else v.item()
    if vtype == _STRING:
        return cur.string(f"string value of {key}")
    if vtype == _ARRAY:
        if depth >= _MAX_DEPTH:
            cur.fail(f"metadata {key}: arrays nested deeper than {_MAX_DEPTH}")
        etype = cur.u32(f"array type of {key}")
        count = cur.u64(f"array length of {key}")
        if etype in _SCALAR:
            a = cur.array(_SCALAR[etype], count, f"array {key} ({count} items)")
            return a.astype(bool) if etype == _BOOL else a
        if etype == _STRING:
            return _read_strings(cur, count, key)
        if etype == _ARRAY:
            # each nested array needs at least 12 header bytes
            cur.need(count * 12, f"nested array {key} ({count} items)")
            return [_read_value(cur, _ARRAY, key, depth + 1) for _ in range(count)]
        cur.fail(f"metadata {key}: unknown array element type {etype}")
    cur.fail(f"metadata {key}: unknown value type {vtype}")


def _read_strings(cur: _Cursor, count: int, key: str) -> list[str]:
    cur.need(count * 8, f"string array {key} ({count} items)")  # every item has a u64 length
    buf, pos, end, out = cur.buf, cur.pos, cur.end, []
    unpack = struct.Struct("<Q").unpack_from
    for _ in range(count):
        if pos + 8 > end:
            cur.pos = pos
            cur.need(8, f"string array {key}")
        (n,) = unpack(buf, pos)
        pos += 8
        if pos + n > end:
            cur.pos = pos
            cur.need(n, f"string array {key}")
        out.append(_decode(bytes(buf[pos:pos + n])))
        pos += n
    cur.pos = pos
    return out


class GGUFFile:
    """An open GGUF file: metadata, tensor index and zero-copy tensor data."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; anything that is
            # not a regular file (FIFO, device, socket, directory) is refused below
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise ModelError(self.path, "no such file") from None
        except IsADirectoryError:
            raise ModelError(self.path, "is a directory, not a GGUF file") from None
        except OSError as e:
            raise ModelError(self.path, f"cannot open: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise ModelError(self.path, "is a directory, not a GGUF file")
            if not stat.S_ISREG(st.st_mode):
                raise ModelError(self.path, "not a regular file (a FIFO, device or socket), "
                                            "not a GGUF file")
            size = st.st_size
            if size == 0:
                raise ModelError(self.path, "empty file, not a GGUF file")
            self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelError(self.path, f"cannot map: {e.strerror or e}") from None
        finally:
            os.close(fd)
        self._buf = memoryview(self._mm)
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing ---------------------------------------------------------
    def _parse(self) -> None:
        cur = _Cursor(self._buf, self.path)
        if len(self._buf) < 4 or bytes(self._buf[:4]) != b"GGUF":
            cur.fail("not a GGUF file (bad magic)")
        cur.pos = 4
        self.version = cur.u32("version")
        if self.version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", self.version))[0]
            hint = " (big-endian GGUF files are not supported)" if swapped in (2, 3) else ""
            cur.fail(f"unsupported GGUF version {self.version}{hint}; supported: 2, 3")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # each kv needs >= 12 bytes, each tensor info >= 24: refuse absurd counts before looping
        cur.need(n_kv * 12, f"{n_kv} metadata entries")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            vtype = cur.u32(f"value type of {key}")
            if key in self.metadata:
                cur.fail(f"duplicate metadata key {key!r}")
            self.metadata[key] = _read_value(cur, vtype, key)
        cur.need(n_tensors * 24, f"{n_tensors} tensor infos")
        infos = [self._read_tensor_info(cur) for _ in range(n_tensors)]
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            cur.fail(f"general.alignment must be a power of two, got {align!r}")
        self.alignment = align
        self.data_offset = -(-cur.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, gtype, rel in infos:
            self.tensors[name] = self._check_tensor(cur, name, dims, gtype, rel)

    def _read_tensor_info(self, cur: _Cursor):
        name = cur.string("tensor name")
        n_dims = cur.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            cur.fail(f"tensor {name}: {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
        dims = [cur.u64(f"dimension of {name}") for _ in range(n_dims)]
        gtype = cur.u32(f"type of {name}")
        rel = cur.u64(f"offset of {name}")
        return name, dims, gtype, rel

    def _check_tensor(self, cur, name, dims, gtype, rel) -> TensorInfo:
        if name in self.tensors:
            cur.fail(f"duplicate tensor name {name!r}")
        if gtype not in GGML_BLOCK:
            cur.fail(f"tensor {name}: unknown ggml type {gtype}")
        block, tsize = GGML_BLOCK[gtype]
        if any(d <= 0 or d > 1 << 40 for d in dims):
            cur.fail(f"tensor {name}: invalid shape {dims}")
        n = 1
        for d in dims:
            n *= d
        if dims[0] % block:
            cur.fail(f"tensor {name}: row length {dims[0]} is not a multiple of the "
                     f"{GGML_TYPE_NAMES[gtype]} block size {block}")
        nbytes = n // block * tsize
        if rel % self.alignment:
            cur.fail(f"tensor {name}: data offset {rel} is not aligned to {self.alignment}")
        start = self.data_offset + rel
        if start + nbytes > len(self._buf):
            cur.fail(f"tensor {name}: data [{start}, {start + nbytes}) lies outside the file "
                     f"({len(self._buf)} bytes); the file is truncated or corrupt")
        return TensorInfo(name, gtype, tuple(int(d) for d in reversed(dims)), start, nbytes)

    # -- access ----------------------------------------------------------
    @property
    def arch(self) -> str:
        a = self.metadata.get("general.architecture")
        if not isinstance(a, str):
            raise ModelError(self.path, "metadata has no general.architecture")
        return a

    @property
    def file_size(self) -> int:
        return len(self._buf)

    def tensor_data(self, name: str) -> np.ndarray:
        """Raw bytes of a tensor as a zero-copy read-only uint8 view of the mmap."""
        try:
            t = self.tensors[name]
        except KeyError:
            raise ModelError(self.path, f"tensor {name!r} not found") from None
        return np.frombuffer(self._buf, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def tensor_array(self, name: str) -> np.ndarray:
        """Zero-copy typed view for unquantized tensors (F32/F16/I32 ...), numpy shape."""
        t = self.tensors[name]
        dtypes = {0: "<f4", 1: "<f2", 24: "<i1", 25: "<i2", 26: "<i4", 27: "<i8", 28: "<f8"}
        if t.ggml_type not in dtypes:
            raise ModelError(self.path, f"tensor {name} is {t.type_name}; dequantize it instead")
        return self.tensor_data(name).view(dtypes[t.ggml_type]).reshape(t.shape)

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)

    def close(self) -> None:
        """Unmap the file. Tensor views still alive keep the mapping until they die."""
        buf, self._buf = getattr(self, "_buf", None), None
        if buf is None:
            return
        try:
            buf.release()
            self._mm.close()
        except BufferError:
            pass  # exported zero-copy views: the mapping is freed with the last of them

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.tensors)} tensors)"
