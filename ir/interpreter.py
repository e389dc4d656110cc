"""The interpreter: runs any verified graph with the ops' reference implementations.

It is the oracle of every pass test. Symbols are bound from the input tensors' shapes;
symbolic attributes are evaluated under those bindings; each result is checked against
its declared type, so a wrong shape rule shows up where it happens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sympy
import torch

from .graph import Graph, Value
from .printer import Namer, format_node
from .shapes import ShapeError, evaluate_dim, evaluate_shape


class InterpreterError(RuntimeError):
    """Running the graph failed; says at which node and why."""


def bind_symbols(graph: Graph, tensors: Sequence[torch.Tensor]) -> dict[sympy.Symbol, int]:
    """Bind the graph's symbols from the input tensors' shapes; check every input type."""
    env: dict[sympy.Symbol, int] = {}
    deferred = []
    for value, tensor in zip(graph.inputs, tensors):
        if tensor.dim() != value.type.rank:
            raise ShapeError(f"input %{value.name} is {value.type}, got shape {tuple(tensor.shape)}")
        if tensor.dtype != value.type.dtype.torch_dtype:
            raise ShapeError(f"input %{value.name} is {value.type}, got dtype {tensor.dtype}")
        for dim, size in zip(value.type.shape, tensor.shape):
            if isinstance(dim, sympy.Symbol) and dim not in env:
                env[dim] = int(size)
            else:
                deferred.append((value, dim, int(size)))
    for value, dim, size in deferred:
        if evaluate_dim(dim, env) != size:
            raise ShapeError(f"input %{value.name} is {value.type}, got size {size} where {dim} = "
                             f"{evaluate_dim(dim, env)}")
    return env


def interpret(graph: Graph, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
              check_types: bool = True, constants: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Run ``graph`` on ``inputs`` (in order, or by input name); return its outputs.

    ``constants`` supplies already materialized constant data by name (the rest is
    materialized from each constant's data on the way)."""
    if isinstance(inputs, Mapping):
        missing = [v.name for v in graph.inputs if v.name not in inputs]
        if missing:
            raise ShapeError(f"missing inputs: {', '.join(missing)}")
        inputs = [inputs[v.name] for v in graph.inputs]
    if len(inputs) != len(graph.inputs):
        raise ShapeError(f"graph @{graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env = bind_symbols(graph, inputs)
    tensors: dict[int, torch.Tensor] = {id(v): t for v, t in zip(graph.inputs, inputs)}
    for name, value in graph.constants.items():
        if value.uses or value in graph.outputs:
            tensors[id(value)] = constants[name] if constants and name in constants else value.tensor()
    last_use = _last_uses(graph)
    for index, node in enumerate(graph.nodes):
        opdef = node.opdef
        try:
            args = opdef.structure([None if v is None else tensors[id(v)] for v in node.inputs])
            attrs = {k: _evaluate_attr(v, opdef.attrs[k].kind, env) for k, v in node.attrs.items()}
            out = opdef.reference(*args, **attrs)
        except Exception as exc:  # noqa: BLE001 - any failure is reported with its node
            raise InterpreterError(f"{_where(graph, node)}: {type(exc).__name__}: {exc}") from exc
        results = out if isinstance(out, tuple) else (out,)
        if len(results) != len(node.results):
            raise InterpreterError(f"{_where(graph, node)}: reference gave {len(results)} results")
        for value, tensor in zip(node.results, results):
            if check_types:
                _check(graph, node, value, tensor, env)
            tensors[id(value)] = tensor
        for value in node.inputs:
            if value is not None and last_use.get(id(value)) == index:
                tensors.pop(id(value), None)
    return [tensors[id(v)] for v in graph.outputs]


def _last_uses(graph: Graph) -> dict[int, int]:
    keep = {id(v) for v in graph.outputs}
    last: dict[int, int] = {}
    for index, node in enumerate(graph.nodes):
        for value in node.inputs:
            if value is not None and id(value) not in keep:
                last[id(value)] = index
    return last


def _evaluate_attr(value, kind: str, env: Mapping[sympy.Symbol, int]):
    if kind == "dim" and value is not None:
        return evaluate_dim(value, env)
    if kind == "dims" and value is not None:
        return evaluate_shape(value, env)
    return value


def _check(graph: Graph, node, value: Value, tensor: torch.Tensor, env) -> None:
    want = evaluate_shape(value.type.shape, env)
    if tuple(tensor.shape) != want or tensor.dtype != value.type.dtype.torch_dtype:
        raise InterpreterError(f"{_where(graph, node)}: reference gave {tensor.dtype} "
                               f"{tuple(tensor.shape)}, the type says {value.type} = {list(want)}")


def _where(graph: Graph, node) -> str:
    return f"node `{format_node(node, Namer(graph))}`"
