"""Shared test set-up: hypothesis profiles (``HYPOTHESIS_PROFILE=ci`` in CI) and helpers."""

import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    # Triton kernels run on the CPU under Triton's interpreter (set before any kernel is defined).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kiln.ir import Graph, TensorType, sym
from kiln.testing import register_profiles

register_profiles()
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config, items):
    """Skip ``@pytest.mark.gpu`` tests where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def batch():
    return sym("batch")


@pytest.fixture
def graph_with_input(batch):
    """A graph with one f32[batch, 4, 6] input, returned as (graph, input)."""
    g = Graph("t")
    return g, g.add_input("x", TensorType("f32", (batch, 4, 6)))


@pytest.fixture(scope="session")
def bundled_engine():
    """The bundled tiny Llama, built once per test process (limits kept small)."""
    import kiln
    from hf_models import BUNDLED

    return kiln.compile(str(BUNDLED), max_batch_size=16, max_seq_len=256, max_num_tokens=256)


@pytest.fixture(scope="session")
def bundled_tp2_engine():
    """The bundled tiny Llama split over two tensor-parallel ranks (same limits)."""
    import kiln
    from hf_models import BUNDLED

    return kiln.compile(str(BUNDLED), max_batch_size=16, max_seq_len=256, max_num_tokens=256, tp=2)


@pytest.fixture(scope="session")
def saved_engine(bundled_engine, tmp_path_factory):
    """The bundled engine saved to a directory."""
    path = tmp_path_factory.mktemp("engine") / "tiny.kiln"
    bundled_engine.save(path)
    return path
