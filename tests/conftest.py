import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# fixtures copied from the team's shared/ (vocab test vectors, llama.cpp reference logits,
# real chat templates) with their licences; A2ATS_SHARED points elsewhere if needed
SHARED = Path(os.environ.get("A2ATS_SHARED", ROOT / "tests" / "data"))
DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def _has_gpu() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if any("gpu" in item.keywords for item in items) and not _has_gpu():
        skip = pytest.mark.skip(reason="no CUDA GPU / CuPy on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model() -> Path:
    if not DEFAULT_MODEL.is_file():
        pytest.skip(f"default model missing: run `make model` ({DEFAULT_MODEL})")
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"test data directory not found at {SHARED}")
    return SHARED


@pytest.fixture
def rng():
    """Fresh random inputs each run (the seed printed; pin one with A2ATS_TEST_SEED=N)."""
    import numpy as np
    seed = int(os.environ.get("A2ATS_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"A2ATS_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(params=["shim", pytest.param("gpu", marks=pytest.mark.gpu)])
def kmod(request):
    """kmod(source_name).get_function(kernel)(grid, block, args): the kernels on the CPU shim,
    or through cupy.RawModule on a GPU (`pytest -m gpu`; skipped where there is no GPU)."""
    from cuda_shim import gpu_module, shim_module
    return shim_module if request.param == "shim" else gpu_module


@pytest.fixture(params=["simd", "scalar"])
def kernels(request):
    """Runs the test with the native library's AVX2 kernels, then with its portable C code."""
    from a2ats_lite import native
    want = request.param == "simd"
    before = native.simd()
    if want and not native.simd(True):
        pytest.skip("library compiled without AVX2")
    native.simd(want)
    yield request.param
    native.simd(before)
