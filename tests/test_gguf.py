"""The fast GGUF reader against gguf.GGUFReader, field by field, and its
behaviour on broken and hostile files."""
import os
import random
import signal
import struct
import time

import gguf
import numpy as np
import pytest

from a2ats_lite.errors import ModelError
from a2ats_lite.gguf import GGUFFile

VT = gguf.GGUFValueType


def write_sample(path, rng, version=3):
    """A small GGUF holding every metadata value type, nested arrays and a few tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_key_value("t.u8", int(rng.integers(0, 255)), VT.UINT8)
    w.add_key_value("t.i8", int(rng.integers(-128, 127)), VT.INT8)
    w.add_key_value("t.u16", int(rng.integers(0, 65535)), VT.UINT16)
    w.add_key_value("t.i16", int(rng.integers(-32768, 32767)), VT.INT16)
    w.add_key_value("t.u32", int(rng.integers(0, 2**32 - 1)), VT.UINT32)
    w.add_key_value("t.i32", int(rng.integers(-2**31, 2**31 - 1)), VT.INT32)
    w.add_key_value("t.u64", int(rng.integers(0, 2**63 - 1)) * 2 + 1, VT.UINT64)
    w.add_key_value("t.i64", -int(rng.integers(0, 2**62)), VT.INT64)
    w.add_key_value("t.f32", float(rng.standard_normal()), VT.FLOAT32)
    w.add_key_value("t.f64", float(rng.standard_normal()), VT.FLOAT64)
    w.add_key_value("t.bool", bool(rng.integers(0, 2)), VT.BOOL)
    w.add_key_value("t.str", "héllo wörld ✓ " + str(rng.integers(0, 1000)), VT.STRING)
    w.add_key_value("t.empty_str", "", VT.STRING)
    for name, vt, vals in [
        ("u8", VT.UINT8, rng.integers(0, 255, 7)), ("i8", VT.INT8, rng.integers(-128, 127, 7)),
        ("u16", VT.UINT16, rng.integers(0, 65535, 5)), ("i16", VT.INT16, rng.integers(-999, 999, 5)),
        ("u32", VT.UINT32, rng.integers(0, 2**32 - 1, 5)), ("i32", VT.INT32, rng.integers(-2**31, 2**31 - 1, 5)),
        ("u64", VT.UINT64, rng.integers(0, 2**62, 5)), ("i64", VT.INT64, rng.integers(-2**62, 2**62, 5)),
        ("f32", VT.FLOAT32, rng.standard_normal(9)), ("f64", VT.FLOAT64, rng.standard_normal(9)),
        ("bool", VT.BOOL, rng.integers(0, 2, 6).astype(bool)),
    ]:
        w.add_key_value(f"a.{name}", [v.item() for v in vals], VT.ARRAY, sub_type=vt)
    w.add_key_value("a.str", ["a", "", "☃ snow", "x" * int(rng.integers(1, 50))], VT.ARRAY)
    w.add_key_value("a.nested", [[1, 2, 3], [4, 5]], VT.ARRAY)
    w.add_key_value("a.nested_str", [["p", "q"], ["r"]], VT.ARRAY)
    w.add_tensor("w.f32", rng.standard_normal((4, 64)).astype(np.float32))
    w.add_tensor("w.f16", rng.standard_normal((3, 32)).astype(np.float16))
    w.add_tensor("w.i32", rng.integers(-9, 9, (5,)).astype(np.int32))
    q8 = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("w.q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        with open(path, "r+b") as f:
            f.seek(4)
            f.write(struct.pack("<I", version))
    return path


def normalize(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, list):
        return [normalize(x) for x in v]
    return v


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_gguf_reader_field_by_field(tmp_path, version, seed):
    path = write_sample(tmp_path / "s.gguf", np.random.default_rng(seed), version)
    ref = gguf.GGUFReader(str(path))
    with GGUFFile(path) as ours:
        assert ours.version == version
        ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
        assert set(ours.metadata) == set(ref_fields)
        for key, field in ref_fields.items():
            expect = field.contents()
            got = normalize(ours.metadata[key])
            if key.startswith("a.nested"):
                # GGUFReader flattens nested arrays; we keep the structure
                assert got == {"a.nested": [[1, 2, 3], [4, 5]], "a.nested_str": [["p", "q"], ["r"]]}[key]
                got = [x for sub in got for x in sub]
            if isinstance(expect, float) or (isinstance(expect, list) and expect and isinstance(expect[0], float)):
                np.testing.assert_array_equal(np.asarray(got, np.float64), np.asarray(expect, np.float64), err_msg=key)
            else:
                assert got == expect, key
        assert [t.name for t in ref.tensors] == list(ours.tensors)
        for t in ref.tensors:
            mine = ours.tensors[t.name]
            assert mine.ggml_type == int(t.tensor_type)
            assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            assert mine.offset == t.data_offset
            assert mine.nbytes == t.n_bytes
            assert bytes(ours.tensor_data(t.name)) == np.asarray(t.data).tobytes()
        np.testing.assert_array_equal(ours.tensor_array("w.f32"), ref.get_tensor(0).data)


def test_tensor_views_are_zero_copy(tmp_path):
    path = write_sample(tmp_path / "s.gguf", np.random.default_rng(3))
    with GGUFFile(path) as f:
        v = f.tensor_data("w.f32")
        assert not v.flags.owndata and not v.flags.writeable


@pytest.mark.parametrize("make, problem", [
    (lambda p: None, "no such file"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"NOTGGUF" + b"\0" * 64), "not a GGUF file"),
    (lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0)), "unsupported GGUF version 7"),
    (lambda p: p.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0)), "big-endian"),
    (lambda p: p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 2**60)), "truncated"),
])
def test_bad_files_name_the_file_and_problem(tmp_path, make, problem):
    p = tmp_path / "bad.gguf"
    make(p)
    with pytest.raises(ModelError) as e:
        GGUFFile(p)
    assert str(p) in str(e.value) and problem in str(e.value)


def test_tensor_outside_file_and_truncation(tmp_path):
    path = write_sample(tmp_path / "s.gguf", np.random.default_rng(4))
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])  # last tensor's data (136 bytes + padding) now runs past the end
    with pytest.raises(ModelError, match="outside the file"):
        GGUFFile(cut)


def test_default_model_opens_fast(default_model):
    t = time.perf_counter()
    with GGUFFile(default_model) as f:
        tokens = f.metadata["tokenizer.ggml.tokens"]
        assert len(tokens) == 262144 and tokens[2] == "<bos>"
        assert isinstance(f.metadata["tokenizer.ggml.scores"], np.ndarray)
        assert len(f.tensors) == 236 and f.arch == "gemma3"
    # generous bound: the requirement is < 1 s; this catches a regression to per-item parsing
    assert time.perf_counter() - t < 5


class _Timeout(Exception):
    pass


def _mutations(data: bytes, rng: random.Random):
    n = len(data)
    kind = rng.randrange(4)
    if kind == 0:  # truncation
        return data[: rng.randrange(0, n)]
    b = bytearray(data)
    if kind == 1:  # byte flips in the header region, where lengths and counts live
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(0, min(n, 2048))
            b[i] = rng.randrange(256)
    elif kind == 2:  # a huge u64 count or length at a random 8-byte window
        i = rng.randrange(4, min(n, 2048) - 8)
        b[i:i + 8] = struct.pack("<Q", rng.choice([2**63, 2**64 - 1, 2**40, 2**32 + 5, 10**12]))
    else:  # a huge u32 (types, dims counts)
        i = rng.randrange(4, min(n, 2048) - 4)
        b[i:i + 4] = struct.pack("<I", rng.choice([2**32 - 1, 2**31, 65536, 9, 13]))
    return bytes(b)


def test_fuzz_mutated_files_only_raise_model_error(tmp_path):
    base = write_sample(tmp_path / "base.gguf", np.random.default_rng(5)).read_bytes()
    rng = random.Random(1234)
    path = tmp_path / "fuzz.gguf"

    def alarm(*_):
        raise _Timeout()

    old = signal.signal(signal.SIGALRM, alarm)
    outcomes = {"ok": 0, "error": 0}
    try:
        for i in range(600):
            path.write_bytes(_mutations(base, rng))
            signal.alarm(5)
            try:
                with GGUFFile(path) as f:
                    for name in f.tensors:  # every accepted tensor must be readable in bounds
                        assert f.tensor_data(name).nbytes == f.tensors[name].nbytes
                outcomes["ok"] += 1
            except ModelError as e:
                assert str(path) in str(e)
                outcomes["error"] += 1
            except _Timeout:
                pytest.fail(f"mutation {i} hung the reader")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, old)
    assert outcomes["error"] > 100  # the mutations really do break files
    os.unlink(path)
