"""Targeted corruptions of valid graphs, for testing that the verifier rejects each kind
of malformation with a message that names it."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from ..ir import Graph, Node, TensorType, Value, dtypes, sym
from .strategies import Draw, graphs


def _pick(draw: Draw, nodes: list[Node]) -> Node | None:
    return draw(st.sampled_from(nodes)) if nodes else None


def _wrong_result_type(graph: Graph, draw: Draw) -> str | None:
    node = _pick(draw, graph.nodes)
    if node is None:
        return None
    result = node.results[0]
    if result.type.rank and draw(st.booleans()):
        shape = list(result.type.shape)
        shape[-1] = shape[-1] + 7
        result.type = result.type.with_shape(shape)
    else:
        other = dtypes.int32 if result.type.dtype != dtypes.int32 else dtypes.float16
        result.type = result.type.with_dtype(other)
    return "is typed"


def _use_before_definition(graph: Graph, draw: Draw) -> str | None:
    users = [n for n in graph.nodes if any(v is not None and v.producer is not None for v in n.inputs)]
    node = _pick(draw, users)
    if node is None:
        return None
    producer = next(v.producer for v in node.inputs if v is not None and v.producer is not None)
    graph.nodes.remove(node)
    graph.nodes.insert(graph.nodes.index(producer), node)
    return "before it is defined"


def _dangling_use(graph: Graph, draw: Draw) -> str | None:
    used = [n for n in graph.nodes if any(r.uses for r in n.results)]
    node = _pick(draw, used)
    if node is None:
        return None
    graph.nodes.remove(node)
    return "not in the graph"


def _unknown_op(graph: Graph, draw: Draw) -> str | None:
    node = _pick(draw, graph.nodes)
    if node is None:
        return None
    node.op = "no_such_op"
    return "unknown op 'no_such_op'"


def _bad_attribute(graph: Graph, draw: Draw) -> str | None:
    node = _pick(draw, [n for n in graph.nodes if n.attrs])
    if node is None:
        return None
    key = draw(st.sampled_from(sorted(node.attrs)))
    node.attrs[key] = object()
    return f"attribute {key!r}"


def _missing_operand(graph: Graph, draw: Draw) -> str | None:
    node = _pick(draw, [n for n in graph.nodes if n.inputs and not n.opdef.is_variadic
                        and not n.opdef.operand_specs[len(n.inputs) - 1].optional])
    if node is None:
        return None
    last = len(node.inputs) - 1
    dropped = node.inputs[last]
    dropped.uses = [u for u in dropped.uses if not (u.node is node and u.index == last)]
    node.inputs[last] = None
    return "is missing"


def _defined_twice(graph: Graph, draw: Draw) -> str | None:
    if len(graph.nodes) < 2:
        return None
    first, second = draw(st.permutations(graph.nodes))[:2]
    second.results.append(first.results[0])
    return "defined twice"


def _foreign_output(graph: Graph, draw: Draw) -> str | None:
    stranger = Graph("other").add_input("y", TensorType(dtypes.float32, (1,)))
    graph.outputs.append(stranger)
    return "is not defined in the graph"


def _unbound_symbol(graph: Graph, draw: Draw) -> str | None:
    node = _pick(draw, graph.nodes)
    if node is None:
        return None
    result: Value = node.results[0]
    result.type = TensorType(result.type.dtype, (sym("unbound_dim"),) + result.type.shape)
    return "bound by no graph input"


CORRUPTIONS: dict[str, Callable[[Graph, Draw], str | None]] = {
    "wrong_result_type": _wrong_result_type,
    "use_before_definition": _use_before_definition,
    "dangling_use": _dangling_use,
    "unknown_op": _unknown_op,
    "bad_attribute": _bad_attribute,
    "missing_operand": _missing_operand,
    "defined_twice": _defined_twice,
    "foreign_output": _foreign_output,
    "unbound_symbol": _unbound_symbol,
}


@st.composite
def corrupted_graphs(draw: Draw) -> tuple[Graph, str, str]:
    """A random graph with one corruption: (graph, corruption name, a phrase the
    verifier's message must contain)."""
    graph = draw(graphs())
    name = draw(st.sampled_from(sorted(CORRUPTIONS)))
    expected = CORRUPTIONS[name](graph, draw)
    if expected is None:  # not applicable to this graph: fall back to one that always is
        name, expected = "foreign_output", _foreign_output(graph, draw)
    return graph, name, expected
