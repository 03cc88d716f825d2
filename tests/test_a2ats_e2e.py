"""A2ATS end to end on the default model: calibrate (small settings), then generate."""
import numpy as np
import pytest
from click.testing import CliRunner

from a2ats_lite import Runtime
from a2ats_lite.cli import main
from a2ats_lite.errors import SidecarError
from a2ats_lite.vq import Calibration


@pytest.fixture(scope="module")
def sidecar(default_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "small.a2ats"
    r = CliRunner().invoke(main, ["calibrate", str(default_model), "--tokens", "2048",
                                  "--doc-tokens", "1024", "--centroids", "64", "--iters", "3",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out


def test_calibrate_writes_a_sidecar_for_the_global_layers(sidecar, default_model):
    cal = Calibration.load(sidecar, model_path=default_model)
    assert sorted(cal.a2ats) == [(5, 0), (11, 0), (17, 0)]  # Gemma 3's full-attention layers
    assert cal.a2ats[(5, 0)].centroids.shape == (64, 256) and cal.params["n_centroids"] == 64


def test_a2ats_generation_with_full_budget_equals_dense(sidecar, default_model):
    cal = Calibration.load(sidecar, model_path=default_model)
    prompt = "The history of the river begins in the mountains, where snow melts each spring and"
    with Runtime(default_model, n_ctx=256, kv="dense") as rt:
        dense = rt.generate(prompt, max_tokens=12, temperature=0)
    with Runtime(default_model, n_ctx=256, kv="a2ats",
                 kv_params={"calib": cal, "budget": 256, "sinks": 2, "window": 4}) as rt:
        assert rt.generate(prompt, max_tokens=12, temperature=0) == dense


def test_a2ats_generation_with_small_budget_runs_retrieval(sidecar, default_model):
    cal = Calibration.load(sidecar, model_path=default_model)
    with Runtime(default_model, n_ctx=256, kv="a2ats",
                 kv_params={"calib": cal, "budget": 4, "sinks": 2, "window": 8}) as rt:
        from kvutil import Selections
        sel = Selections(rt.kv)
        seen = []
        orig = rt.kv.B.sparse_attention
        rt.kv.B.sparse_attention = lambda *a, **k: seen.append(1) or orig(*a, **k)
        out = rt.generate("word " * 40, max_tokens=6, temperature=0)
    assert isinstance(out, str) and seen  # the sparse path really ran
    # 2 sinks + 8 recent + 4 picks per query head (4 per KV head): fewer than its ~50 tokens
    assert sel and all(len(s) <= 2 + 8 + 4 * 4 < 41 for sels in sel.last.values() for s in sels)


def test_missing_sidecar_names_the_calibrate_command(default_model, tmp_path):
    r = CliRunner().invoke(main, ["generate", str(default_model), "-p", "x", "--kv", "vq",
                                  "-n", "2"], env={"HOME": str(tmp_path)})
    if (default_model.parent / (default_model.name + ".a2ats")).exists():
        pytest.skip("a sidecar exists next to the default model")
    assert r.exit_code == 2 and "a2ats-lite calibrate" in r.output


def test_sidecar_of_another_model_is_refused(sidecar, tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(SidecarError, match="another model file"):
        Calibration.load(sidecar, model_path=other)


def test_cli_generate_with_a_sidecar_file(sidecar, default_model):
    r = CliRunner().invoke(main, ["generate", str(default_model), "-p", "The river", "-n", "3",
                                  "--temp", "0", "-c", "128", "--kv", "a2ats", "--budget", "4",
                                  "--sidecar", str(sidecar)])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("The river") and len(r.stdout) > len("The river")
    r = CliRunner().invoke(main, ["generate", str(default_model), "-p", "x", "-n", "1",
                                  "--sidecar", str(sidecar)])
    assert r.exit_code == 2 and "--sidecar is for --kv a2ats or vq" in r.output
    r = CliRunner().invoke(main, ["generate", str(default_model), "-p", "x", "-n", "1", "--kv", "a2ats",
                                  "--sidecar", str(sidecar.parent / "missing.a2ats")])
    assert r.exit_code == 2 and r.output.startswith("error:") and "Traceback" not in r.output
