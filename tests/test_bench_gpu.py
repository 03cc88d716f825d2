"""bench/bench_gpu.py on the CPU backend (--device cpu) on a tiny synthetic model, and
bench/gpu_check.sh where there is no GPU (it must say so and exit 0 without installing
anything). The GPU runs of both are for a lent device machine (see the script's header)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _load(name: str):
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, mod)
    spec.loader.exec_module(mod)
    return sys.modules[name]


@pytest.fixture(scope="module")
def bench():
    return _load("bench_gpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    synth = _load("make_synth_gguf")
    path = tmp_path_factory.mktemp("bench_gpu") / "tiny.gguf"
    synth.write_synth_gguf(path, "tiny", "q4_0", n_ctx=4096, n_vocab=300)
    return path


ARGS = ["--device", "cpu", "--contexts", "0", "64", "--batches", "1", "2", "--steps", "2",
        "--kv", "dense", "--prefill", "24", "--chunk", "8", "--prefill-reps", "1"]
CELL_FIELDS = {"kv", "context", "batch", "steps", "status", "message", "median_step_ms",
               "min_step_ms", "tok_s", "tok_s_per_seq", "weight_bytes_per_step",
               "kv_bytes_per_step", "gb_s", "kv_bytes_held", "fill_s", "peak_pool_bytes",
               "peak_pool_used_bytes", "peak_device_used_bytes", "host_max_rss_bytes"}


def test_bench_gpu_cpu_json(bench, tiny, tmp_path, monkeypatch, capsys):
    out_dir = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out_dir))
    out = tmp_path / "bench_gpu.json"
    assert bench.main(ARGS + ["--model", str(tiny), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "tiny.gguf" in text and "tok/s" in text

    data = json.loads(out.read_text())
    assert json.loads((out_dir / "bench_gpu.json").read_text()) == data     # $OUT copy
    assert data["bench"] == "bench_gpu" and "bench/bench_gpu.py" in data["command"]
    assert data["machine"]["device"] == "cpu" and data["machine"]["cpus"] >= 1
    s = data["settings"]
    assert (s["contexts"], s["batches"], s["steps"], s["warmup_steps"], s["kv"]) == \
        ([0, 64], [1, 2], 2, 2, ["dense"])
    assert data["skipped_models"] == [] and len(data["models"]) == 1

    m = data["models"][0]
    assert m["status"] == "ok" and m["model"] == "tiny.gguf" and m["n_layer"] == 2
    assert m["weight_bytes_per_step"] > 0 and m["load_s"] >= 0
    assert m["load_prefix_host_kv"] == "ok"
    assert [p["mode"] for p in m["prefill"]] == ["one step", "chunked"]
    for p in m["prefill"]:
        assert p["status"] == "ok" and p["tok_s"] > 0 and p["tokens"] == 24
    assert m["prefill"][1]["rows_per_step"] == 8

    cells = {(c["kv"], c["context"], c["batch"]): c for c in m["decode"]}
    assert set(cells) == {("dense", c, b) for c in (0, 64) for b in (1, 2)}
    for (kv, ctx, b), c in cells.items():
        assert CELL_FIELDS <= set(c), CELL_FIELDS - set(c)
        assert c["status"] == "ok" and c["message"] is None, c
        assert c["tok_s"] > 0 and c["gb_s"] > 0 and c["steps"] == 2
        assert 0 < c["min_step_ms"] <= c["median_step_ms"]
        assert c["tok_s"] == pytest.approx(b * 1e3 / c["median_step_ms"])
        assert c["weight_bytes_per_step"] == m["weight_bytes_per_step"]
        assert c["kv_bytes_per_step"] > 0 and c["kv_bytes_held"] > 0
        assert c["peak_pool_bytes"] is None and c["host_max_rss_bytes"] > 0   # no GPU pool
    # more context, more KV read; a batch of 2 reads twice one sequence's KV
    assert cells["dense", 64, 1]["kv_bytes_per_step"] > cells["dense", 0, 1]["kv_bytes_per_step"]
    assert cells["dense", 64, 2]["kv_bytes_per_step"] == 2 * cells["dense", 64, 1]["kv_bytes_per_step"]


def test_bench_gpu_failed_cells(bench, tiny, tmp_path, monkeypatch, capsys):
    """A cell that runs out of memory is recorded as "oom" with its message and the next
    cell runs; a missing model is skipped with one line."""
    from a2ats_lite.backend.cpu import CPUBackend

    monkeypatch.setattr(bench, "get_backend", lambda device, **options: CPUBackend())
    fill = bench.fill_sequence

    def failing_fill(model, kv, prefix):
        if prefix is not None and prefix.n == 64:
            raise MemoryError("fake: out of memory filling 64 tokens")
        return fill(model, kv, prefix)

    monkeypatch.setattr(bench, "fill_sequence", failing_fill)
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "b.json"
    missing = tmp_path / "absent.gguf"
    args = list(ARGS)
    assert bench.main(args + ["--model", str(missing), str(tiny), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "absent.gguf: skipped, not present" in text

    data = json.loads(out.read_text())
    assert [s["model"] for s in data["skipped_models"]] == ["absent.gguf"]
    m = data["models"][0]
    assert {c["kv"] for c in m["decode"]} == {"dense"} and len(m["decode"]) == 4
    for c in m["decode"]:
        if c["context"] == 64:
            assert c["status"] == "oom" and "fake: out of memory" in c["message"]
        else:
            assert c["status"] == "ok" and c["tok_s"] > 0


def test_bench_gpu_device_cuda_without_gpu(bench, tmp_path, capsys):
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is here")
    except Exception:
        pass
    assert bench.main(["--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "x.json").exists()


# -- gpu_check.sh --------------------------------------------------------------------------
def test_gpu_check_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", "-S", "warning", str(SCRIPT)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout


def _bin_without_gpu(tmp_path: Path, fake_smi: str | None = None) -> Path:
    """A PATH folder with only the few tools the script's start needs (no nvidia-smi), or a
    fake nvidia-smi that fails."""
    b = tmp_path / "bin"
    b.mkdir()
    for tool in ("dirname", "mkdir", "date", "timeout"):
        src = shutil.which(tool)
        assert src, tool
        (b / tool).symlink_to(src)
    if fake_smi is not None:
        (b / "nvidia-smi").write_text(fake_smi)
        (b / "nvidia-smi").chmod(0o755)
    return b


@pytest.mark.parametrize("smi", [None, "#!/bin/sh\necho 'No devices were found'\nexit 6\n"],
                         ids=["no-nvidia-smi", "nvidia-smi-lists-none"])
def test_gpu_check_without_gpu_exits_0(tmp_path, smi):
    out = tmp_path / "out"
    env = {"PATH": str(_bin_without_gpu(tmp_path, smi)), "OUT": str(out), "HOME": str(tmp_path),
           "PYTHON": "/nonexistent/python3"}
    bash = shutil.which("bash")
    before = set(os.listdir(ROOT))
    t0 = time.monotonic()
    r = subprocess.run([bash, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 20
    assert "no GPU" in r.stdout
    log = (out / "gpu_check.log").read_text()
    assert "no GPU" in log and "nothing installed" in log
    assert sorted(os.listdir(out)) == ["gpu_check.log"]
    assert set(os.listdir(ROOT)) == before              # no .venv-gpu, no models, nothing made
    lines = log.splitlines()
    assert lines[0][:4].isdigit() and lines[-1][:4].isdigit()      # timestamped (UTC) lines
    if smi is not None:
        assert "No devices were found" in log                      # what nvidia-smi said


def test_bench_gpu_a2ats_time_split(bench, tiny, tmp_path):
    """An a2ats cell reports its step's time split (LUT, top-K, attention over the host
    store), measured on untimed profiled steps."""
    out = tmp_path / "a2ats.json"
    args = ["--device", "cpu", "--contexts", "256", "--batches", "2", "--steps", "2",
            "--kv", "a2ats", "--prefill", "8", "--chunk", "8", "--prefill-reps", "1"]
    assert bench.main(args + ["--model", str(tiny), "--out", str(out)]) == 0
    (c,) = json.loads(out.read_text())["models"][0]["decode"]
    assert c["status"] == "ok" and c["tok_s"] > 0, c
    assert {"lut", "topk", "attention"} <= set(c["split_ms"]) and all(v > 0 for v in c["split_ms"].values())


def test_bench_rowcache_replay():
    """bench/bench_rowcache.py's replay of recorded selections through the row cache's
    bookkeeping: no cache fetches every selected row; a cache fetches the first step's rows
    only once, fewer with more slots, and holds the memory it says."""
    import numpy as np
    br = _load("bench_rowcache")
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    steps, d = [], 16
    prev = np.sort(rng.choice(500, 60, replace=False))
    for _ in range(20):                       # each step keeps ~80% of the last selection
        keep = rng.choice(prev, 48, replace=False)
        new = rng.choice(np.setdiff1d(np.arange(500), prev), 12, replace=False)
        prev = np.sort(np.concatenate([keep, new]))
        steps.append([prev])
    sel = {3: steps, 7: steps}
    none = br.replay(sel, 600, None, d)
    assert none["fetched_fraction"] == 1.0 and none["selected_rows_per_step"] == 2 * 60
    fr = [br.replay(sel, 600, f, d) for f in (1.0, 2.0)]
    # 1x: the cache holds the last selection, so exactly the 12 new rows are fetched
    assert fr[0]["fetched_rows_per_step"] == 2 * 12
    assert 0 < fr[1]["fetched_rows_per_step"] <= fr[0]["fetched_rows_per_step"]
    assert fr[1]["cache_mb"] > fr[0]["cache_mb"] > 0
    assert 0.75 < br.overlap(sel) < 0.85
