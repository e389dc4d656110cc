"""Helpers for pass tests: give data to constants of parsed graphs, and assert that a
transformation preserves what the interpreter computes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..ir import Graph, MissingData, interpret, parse, verify


def bind_random_constants(graph: Graph, seed: int = 0) -> Graph:
    """Give random normal data to every constant that has none (as in a graph parsed
    from text); return the graph."""
    gen = torch.Generator().manual_seed(seed)
    graph.bind_constants({
        name: torch.randn(tuple(int(d) for d in v.shape), generator=gen).to(v.type.dtype.torch_dtype)
        for name, v in graph.constants.items() if isinstance(v.data, MissingData)
    })
    return graph


def graph_from_text(text: str, seed: int = 0) -> Graph:
    """Parse a graph written in kiln's text form, give random data to its constants that
    have none, and verify it: IR text in tests, ready to run."""
    graph = bind_random_constants(parse(text), seed)
    verify(graph)
    return graph


def random_inputs(graph: Graph, size: int, seed: int = 0) -> list[torch.Tensor]:
    """Random normal inputs for ``graph`` with every symbolic dim set to ``size``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(tuple(d if isinstance(d, int) else int(d.subs({s: size for s in d.free_symbols}))
                              for d in v.shape), generator=gen).to(v.type.dtype.torch_dtype)
            for v in graph.inputs]


def assert_preserves(transform: Callable[[Graph], Any], graph: Graph, inputs: Sequence[torch.Tensor],
                     rtol: float = 1e-5, atol: float = 1e-6) -> Graph:
    """Apply ``transform`` to a copy of ``graph``; check that the copy still verifies and
    that the interpreter gives the same outputs (within ``rtol``/``atol``, NaNs equal) on
    ``inputs``. Return the transformed copy for further checks."""
    verify(graph)
    expected = interpret(graph, inputs)
    result = graph.clone()
    transform(result)
    verify(result)
    actual = interpret(result, inputs)
    assert len(actual) == len(expected), f"{len(expected)} outputs became {len(actual)}"
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape and a.dtype == e.dtype, \
            f"output {i}: {e.dtype}{tuple(e.shape)} became {a.dtype}{tuple(a.shape)}"
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True,
                                   msg=lambda m, i=i: f"output {i} changed:\n{m}\n\nafter:\n{result}")
    return result
