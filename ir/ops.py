"""Call ops as Python functions to build graphs: ``ops.add(x, y)``, ``ops.rms_norm(h, w, eps=1e-5)``.

Any name resolves to the op of that name in the registry of the graph the operands
belong to, so user-registered ops work the same way. Python numbers among the operands
become 0-d constants of the operands' dtype. Ops without tensor operands (``full``,
``arange``) take the graph as ``graph=``. Pattern and replacement functions of the
rewriter are written with these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import dtypes
from .constants import TensorData
from .graph import Graph, GraphError, Value


def call(op: str, *operands: Any, graph: Graph | None = None, location: str | None = None,
         **attrs: Any) -> Any:
    """Append a node of ``op`` to the operands' graph; return its result (or results)."""
    values = [v for v in _flatten(operands) if isinstance(v, Value)]
    graph = graph or (values[0].graph if values else None)
    if graph is None:
        raise GraphError(f"{op} has no tensor operand: pass graph=")
    scalar_dtype = _scalar_dtype(values)
    flat: list[Value | None] = []
    for operand in operands:
        if isinstance(operand, (list, tuple)):
            flat.extend(_as_value(x, graph, scalar_dtype) for x in operand)
        else:
            flat.append(_as_value(operand, graph, scalar_dtype))
    node = graph.call(op, flat, attrs, location)
    return node.results[0] if len(node.results) == 1 else tuple(node.results)


def _flatten(operands: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for x in operands:
        out.extend(x if isinstance(x, (list, tuple)) else [x])
    return out


def _scalar_dtype(values: list[Value]) -> dtypes.DType | None:
    typed = [v.type.dtype for v in values if v.type is not None]
    for dt in typed:
        if dt.kind != "bool":
            return dt
    return typed[0] if typed else None


def _as_value(x: Any, graph: Graph, dtype: dtypes.DType | None) -> Value | None:
    if x is None or isinstance(x, Value):
        return x
    if isinstance(x, (bool, int, float)):
        if graph.typed:
            return graph.scalar(x, dtype or dtypes.float32)
        return graph.add_constant(TensorData(torch.tensor(x)), type=None, name="c")  # type: ignore[arg-type]
    raise GraphError(f"cannot use {x!r} as an operand")


def __getattr__(name: str) -> Any:
    if name.startswith("_"):
        raise AttributeError(name)

    def op_function(*operands: Any, **attrs: Any) -> Any:
        return call(name, *operands, **attrs)

    op_function.__name__ = op_function.__qualname__ = name
    from .opdefs import REGISTRY

    if name in REGISTRY:
        op = REGISTRY[name]
        params = ", ".join([*op.operands, *op.attrs])
        op_function.__doc__ = f"{name}({params}): {op.doc}"
    return op_function
