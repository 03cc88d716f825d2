"""The backends' declared capabilities (backend/base.py Caps) and what reads them: the model
refuses, at load, a tensor type the chosen backend cannot run, naming the tensor, its type and
the backend; the CPU backend runs every type its native library decodes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cuda_shim import ShimModule

from a2ats_lite import native
from a2ats_lite.backend.cpu import CPUBackend
from a2ats_lite.backend.cuda import KERNEL_TYPES, CUDABackend
from a2ats_lite.errors import ModelError
from a2ats_lite.gguf import GGML_TYPE_IDS, GGUFFile
from a2ats_lite.model import Model


def test_declared_caps():
    cpu, cuda = CPUBackend(), CUDABackend(xp=np, loader=ShimModule, sparse="host", graphs=False)
    assert cpu.caps.tensor_types == frozenset(native.SUPPORTED_TYPES)
    assert cpu.caps.host_memory and cpu.host and cpu.caps.f32_cache
    assert not cpu.caps.graphs and cpu.caps.row_cache == 0
    assert cuda.caps.tensor_types == frozenset(KERNEL_TYPES)
    assert not cuda.caps.host_memory and not cuda.host and not cuda.caps.f32_cache
    assert not cuda.caps.graphs and cuda.caps.row_cache == 0          # sparse="host": no cache
    on = CUDABackend(xp=np, loader=ShimModule)
    assert on.caps.graphs and on.caps.row_cache == 1.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cpu.caps.graphs = True


def test_cpu_backend_loads_the_default_model(default_model):
    """Every tensor type of the default model is one the CPU backend runs (nothing it ran
    before is refused now)."""
    f = GGUFFile(default_model)
    used = {t.ggml_type for t in f.tensors.values()}
    assert used <= CPUBackend().caps.tensor_types
    m = Model.from_gguf(f, backend=CPUBackend())
    assert m.w.token_embd.ggml_type in used


@pytest.mark.parametrize("backend, type_name", [
    (lambda: CUDABackend(xp=np, loader=ShimModule), "Q2_K"),     # the C library decodes it
    (CPUBackend, "IQ4_NL"),
])
def test_model_refuses_types_the_backend_cannot_run(default_model, backend, type_name):
    """A tensor of a type outside the chosen backend's caps is a ModelError at load naming
    the tensor, its type and the backend (before any weight is handed to the backend)."""
    B = backend()
    t = GGML_TYPE_IDS[type_name]
    assert t not in B.caps.tensor_types
    f = GGUFFile(default_model)
    name = "token_embd.weight"               # the first tensor loaded
    f.tensors[name] = dataclasses.replace(f.tensors[name], ggml_type=t)
    with pytest.raises(ModelError, match=f"tensor {name} has type {type_name}, which the "
                                         f"{B.name} backend cannot run; it runs: F32, F16"):
        Model.from_gguf(f, backend=B)


def test_a_fake_backend_without_a_type_refuses_it(default_model):
    """Caps decide, not the native library: a backend declaring fewer types refuses the
    default model's embedding type."""
    f = GGUFFile(default_model)
    t = f.tensors["token_embd.weight"]

    class Narrow(CPUBackend):
        name = "narrow"
        caps = dataclasses.replace(CPUBackend().caps,
                                   tensor_types=CPUBackend().caps.tensor_types - {t.ggml_type})
    with pytest.raises(ModelError, match=f"token_embd.weight has type {t.type_name}, which the "
                                         "narrow backend cannot run"):
        Model.from_gguf(f, backend=Narrow())
