"""Cleanup passes that are graph sweeps rather than local rewrites: dead-code
elimination, common-subexpression elimination and (lazy) constant folding."""

from __future__ import annotations

from typing import Any

import sympy
import torch

from ..ir import FoldedData, Graph, Node, TensorData, Value
from ..ir.printer import INLINE_LIMIT


def eliminate_dead_code(graph: Graph) -> int:
    """Remove nodes whose results nobody uses, and unused constants. All ops are pure."""
    live = {id(v) for v in graph.outputs}
    kept: list[Node] = []
    removed = 0
    for node in reversed(graph.nodes):
        if any(r.uses or id(r) in live for r in node.results):
            kept.append(node)
            continue
        node.drop_inputs()
        node.graph = None
        removed += 1
    graph.nodes = kept[::-1]
    return removed + graph.remove_unused_constants()


def _attr_key(value: Any) -> Any:
    if isinstance(value, float):
        return ("float", repr(value))  # distinguishes -0.0 and 0.0, equates NaNs
    if isinstance(value, tuple):
        return tuple(_attr_key(v) for v in value)
    return value


def _constant_key(value: Value) -> tuple | None:
    numel = value.type.static_numel
    if numel is None or numel > INLINE_LIMIT or not value.is_literal:
        return None
    data = value.tensor().contiguous().reshape(-1)
    return (value.type.dtype, value.type.shape, tuple(data.view(torch.uint8).tolist()))


def eliminate_common_subexpressions(graph: Graph) -> int:
    """Merge nodes of the same op, attributes and operands (either order for commutative
    ops), and small constants of the same type and bytes."""
    replaced = 0
    constants: dict[tuple, Value] = {}
    for value in list(graph.constants.values()):
        key = _constant_key(value)
        if key is None:
            continue
        if key in constants:
            value.replace_all_uses_with(constants[key])
            replaced += 1
        else:
            constants[key] = value
    seen: dict[tuple, Node] = {}
    for node in list(graph.nodes):
        operands = tuple(id(v) if v is not None else None for v in node.inputs)
        if node.opdef.commutative:
            operands = tuple(sorted(operands))
        key = (node.op, operands, tuple((k, _attr_key(v)) for k, v in node.attrs.items()))
        twin = seen.get(key)
        if twin is None:
            seen[key] = node
            continue
        for mine, theirs in zip(node.results, twin.results):
            mine.replace_all_uses_with(theirs)
        graph.erase_node(node)
        replaced += 1
    return replaced + graph.remove_unused_constants()


def fold_constants(graph: Graph) -> int:
    """Replace nodes whose operands are all constants (and whose results have static
    shapes) by constants. Results over weights are lazy: nothing is computed until their
    data is needed, so folding a transpose of an 8B model's weights costs no memory.
    Small results over literals are computed now and are literals themselves."""
    folded = 0
    for node in list(graph.nodes):
        if not all(v is None or v.is_constant for v in node.inputs):
            continue
        if not all(r.type.is_static for r in node.results) or _has_symbols(node.attrs.values()):
            continue
        opdef = node.opdef
        structured = opdef.structure([None if v is None else v.data for v in node.inputs])
        first = next((v.name for v in node.inputs if v is not None), None)
        name = f"{first}_{node.op}" if first else node.op
        literal = all(v is None or v.is_literal for v in node.inputs)
        for result in node.results:
            data = FoldedData(opdef.reference, structured, dict(node.attrs), result.result_index)
            if literal and result.type.static_numel <= INLINE_LIMIT:
                data = TensorData(data.materialize())
            constant = graph.add_constant(data, result.type, name)
            result.replace_all_uses_with(constant)
        graph.erase_node(node)
        folded += 1
    return folded


def _has_symbols(values: Any) -> bool:
    for value in values:
        if isinstance(value, tuple) and _has_symbols(value):
            return True
        if isinstance(value, sympy.Expr):
            return True
    return False
