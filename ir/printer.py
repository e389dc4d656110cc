"""The text form of a graph, close in spirit to MLIR's generic form::

    graph @mlp(%x: f32[batch, 16]) {
      %w = constant : f32[32, 16]
      %one = constant [1.0] : f32[]
      %0 = linear(%x, %w) : f32[batch, 32]
      %1, %2 = split(%0) {dim = 1, sizes = [16, 16]} : f32[batch, 16], f32[batch, 16]
      return %1
    }

Attributes equal to their declared default are left out; literal constants (data in
memory, not lazily loaded weights) of at most ``INLINE_LIMIT`` elements carry their data. ``parser.parse`` reads this form back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from .dtypes import DType
from .registry import attr_equal
from .shapes import format_dim

if TYPE_CHECKING:  # the graph prints itself through this module
    from .graph import Graph, Node, Value

INLINE_LIMIT = 16


class Namer:
    """Gives every value of a graph a unique printed name: its own name, or a number."""

    def __init__(self, graph: Graph):
        self.names: dict[int, str] = {}
        taken: set[str] = set()
        counter = 0
        for value in graph.values():
            base = value.name if value.name and not value.name.isdigit() else None
            if base is None:
                while str(counter) in taken:
                    counter += 1
                base = str(counter)
                counter += 1
            name, i = base, 0
            while name in taken:
                name, i = f"{base}_{i}", i + 1
            taken.add(name)
            self.names[id(value)] = name

    def __call__(self, value: Value | None) -> str:
        if value is None:
            return "none"
        return "%" + self.names.get(id(value), "?")


def format_attr(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, DType):
        return value.name
    if isinstance(value, tuple):
        return "[" + ", ".join(format_attr(v) for v in value) + "]"
    return format_dim(value)


def format_float(x: float) -> str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)


def format_type(value: Value) -> str:
    return str(value.type) if value.type is not None else "?"


def format_node(node: Node, name: Namer) -> str:
    results = ", ".join(name(r) for r in node.results)
    inputs = list(node.inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    text = f"{results} = {node.op}({', '.join(name(v) for v in inputs)})"
    attrs = _non_default_attrs(node)
    if attrs:
        text += " {" + ", ".join(f"{k} = {format_attr(v)}" for k, v in attrs.items()) + "}"
    text += " : " + ", ".join(format_type(r) for r in node.results)
    if node.location:
        text += f" loc({json.dumps(node.location)})"
    return text


def _non_default_attrs(node: Node) -> dict[str, Any]:
    declared = node.graph.registry[node.op].attrs if node.op in node.graph.registry else {}
    out = {}
    for key, value in node.attrs.items():
        spec = declared.get(key)
        if spec is None or not spec.has_default or not attr_equal(spec.default, value):
            out[key] = value
    return out


def format_constant(value: Value, name: Namer) -> str:
    text = f"{name(value)} = constant"
    numel = value.type.static_numel if value.type is not None else None
    if numel is not None and numel <= INLINE_LIMIT and value.is_literal:
        text += " " + format_data(value.tensor())
    return f"{text} : {format_type(value)}"


def format_data(tensor: torch.Tensor) -> str:
    items: Iterable[Any] = tensor.reshape(-1).tolist()
    return "[" + ", ".join(format_attr(float(x) if tensor.is_floating_point() else x) for x in items) + "]"


def print_graph(graph: Graph) -> str:
    """The text form of ``graph``."""
    name = Namer(graph)
    params = ", ".join(f"{name(v)}: {format_type(v)}" for v in graph.inputs)
    lines = [f"graph @{graph.name}({params}) {{"]
    lines += ["  " + format_constant(v, name) for v in graph.constants.values()]
    lines += ["  " + format_node(n, name) for n in graph.nodes]
    lines.append("  return " + ", ".join(name(v) for v in graph.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
