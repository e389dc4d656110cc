"""What each backend's kernels cannot do yet, checked before an engine is built.

A backend's kernel table covers ops; an op's attribute can still ask for something a
kernel does not implement (the CUDA attention kernels have no ALiBi biases). Such a graph
is refused before building, with the feature, the op and its location named, instead of
failing at the first step. ``tolerate_unset_attributes`` (applied by the runtime's
``load_executor`` to whatever kernels it binds) lets kernels written before an attribute
existed keep serving graphs that leave it unset.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from ..ir import Graph, Registry
from .reference import Kernel

# backend -> op -> attribute -> the feature it asks for, as users know it
UNSUPPORTED_ATTRIBUTES: dict[str, dict[str, dict[str, str]]] = {
    "cuda": {"paged_attention": {"alibi_bias_max": "ALiBi attention biases"}},
}


class UnsupportedFeatureError(ValueError):
    """The graph asks for something the chosen backend's kernels do not implement."""


def check_backend_support(graph: Graph, backend: str, target: str) -> None:
    """Refuse ``graph`` if it sets an attribute that ``backend``'s kernels cannot honour."""
    problems = []
    for node in graph.nodes:
        for attr, feature in UNSUPPORTED_ATTRIBUTES.get(backend, {}).get(node.op, {}).items():
            if node.attrs.get(attr) is not None:
                problems.append(f"{feature} ({node.op} at {node.location or node.op}, {attr}={node.attrs[attr]})")
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise UnsupportedFeatureError(f"target {target!r} cannot build this model: its {backend} kernels have no "
                                      f"{problems[0]}{more}; target 'cpu' serves it")


def tolerate_unset_attributes(kernels: Mapping[str, Kernel], registry: Registry) -> dict[str, Kernel]:
    """``kernels`` where each kernel that lacks a parameter for some of its op's attributes
    is wrapped to drop those attributes when they are unset (``None``); set ones reach the
    kernel and fail there, which ``check_backend_support`` prevents at build time."""
    adapted = dict(kernels)
    for op, kernel in kernels.items():
        if op not in registry:
            continue
        try:
            parameters = inspect.signature(kernel).parameters
        except (TypeError, ValueError):
            continue  # a builtin without a signature: it takes what the executor passes or fails there
        if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            continue
        missing = frozenset(registry[op].attrs) - frozenset(parameters)
        if missing:
            adapted[op] = _dropping(kernel, missing)
    return adapted


def _dropping(kernel: Kernel, names: frozenset[str]) -> Kernel:
    def call(*args, **attrs):
        for name in names:
            if name in attrs and attrs[name] is None:
                del attrs[name]
        return kernel(*args, **attrs)
    return call
