"""Shared test set-up: hypothesis profiles (``HYPOTHESIS_PROFILE=ci`` in CI) and helpers."""

import os

import pytest
from hypothesis import settings

from kiln.ir import Graph, TensorType, sym
from kiln.testing import register_profiles

register_profiles()
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


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
def saved_engine(bundled_engine, tmp_path_factory):
    """The bundled engine saved to a directory."""
    path = tmp_path_factory.mktemp("engine") / "tiny.kiln"
    bundled_engine.save(path)
    return path
