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
