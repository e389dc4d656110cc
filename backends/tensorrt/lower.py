"""``lower``: a kiln graph (the ``tensorrt`` pipeline's step graph, or any graph whose ops
the table covers) becomes a TensorRT ``INetworkDefinition``.

Every node is checked against the lowering table first, so a graph with an op TensorRT
cannot express is refused before a single layer is made, with each such node named.
"""

from __future__ import annotations

from ...ir import Graph
from ...ir.printer import Namer, format_node
from .library import TensorRT, find_tensorrt
from ..naming import output_names
from .network import LoweringError, NetworkBuilder, trt_dtype
from .table import LOWERINGS, unlowerable


class UnsupportedOpsError(LoweringError):
    """Nodes whose ops TensorRT cannot express; ``problems`` lists (node text, reason)."""

    def __init__(self, graph: Graph, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {text}: {reason}" for text, reason in problems)
        super().__init__(f"graph @{graph.name} cannot be lowered to TensorRT:\n{lines}")


def check_lowerable(graph: Graph, trt: TensorRT) -> None:
    """Raise ``UnsupportedOpsError`` naming every node that ``trt`` cannot lower."""
    name = Namer(graph)
    problems = [(format_node(node, name), reason) for node in graph.nodes
                if (reason := unlowerable(node, trt)) is not None]
    if problems:
        raise UnsupportedOpsError(graph, problems)


def lower(graph: Graph, trt: TensorRT | None = None) -> NetworkBuilder:
    """The TensorRT network of ``graph``: inputs and outputs named as the graph's, one
    named constant layer per weight, layers named after their nodes."""
    trt = trt or find_tensorrt()
    check_lowerable(graph, trt)
    nb = NetworkBuilder(trt, graph)
    for value in graph.inputs:
        nb.add_input(value)
    nb.bind_symbols()
    for value in graph.constants.values():
        if value.uses:
            nb.add_constant(value)
    for node in graph.nodes:
        nb.lowering(node)
        operands = node.opdef.structure([None if v is None else nb.tensors[v] for v in node.inputs])
        try:
            results = LOWERINGS[node.op].lower(nb, node, *operands, **node.attrs)
        except LoweringError:
            raise
        except Exception as exc:
            raise LoweringError(f"lowering `{format_node(node, Namer(graph))}` failed: {exc}") from exc
        results = results if isinstance(results, tuple) else (results,)
        for value, tensor in zip(node.results, results):
            if tensor.dtype != trt_dtype(trt, value.dtype):
                raise LoweringError(f"lowering `{format_node(node, Namer(graph))}` gave {tensor.dtype}, "
                                    f"not {value.dtype.name}")
            nb.tensors[value] = tensor
    nb.lowering(None)
    for value, name in zip(graph.outputs, output_names(graph)):
        tensor = nb.tensors[value]
        if tensor.is_network_input or tensor.is_network_output or value.producer is None:
            tensor = nb.out(nb.network.add_identity(tensor))
        tensor.name = name
        nb.network.mark_output(tensor)
    return nb
