"""``export_onnx``: a kiln graph as an ONNX model of standard ops (opset 23: ``Attention``
and ``RMSNormalization`` among them), built with onnx-graphsurgeon, cleaned up and
sorted by it, and checked with ``onnx.checker``. Ops ONNX cannot express are refused by
name before anything is written."""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnx
import onnx_graphsurgeon as gs

from ...ir import Graph
from ...ir.printer import Namer, format_node
from ..naming import output_names
from .builder import OnnxBuilder, OnnxExportError, _np_dtype, onnx_shape
from .table import EXPORTS, unexportable

OPSET = 23
IR_VERSION = 10  # what onnxruntime 1.2x reads; opset 23 needs at least 10
_EXTERNAL_DATA_BYTES = 1 << 30  # past this the weights go to a file beside the model (protobuf's 2 GiB limit)


class UnsupportedOpsError(OnnxExportError):
    """Nodes ONNX cannot express; ``problems`` lists (node text, reason)."""

    def __init__(self, graph: Graph, problems: list[tuple[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {text}: {reason}" for text, reason in problems)
        super().__init__(f"graph @{graph.name} cannot be exported to ONNX:\n{lines}")


def check_exportable(graph: Graph) -> None:
    """Raise ``UnsupportedOpsError`` naming every node ONNX cannot express."""
    name = Namer(graph)
    problems = [(format_node(node, name), reason) for node in graph.nodes if (reason := unexportable(node))]
    if problems:
        raise UnsupportedOpsError(graph, problems)


def export_onnx(graph: Graph, path: str | os.PathLike | None = None,
                output_names_: Sequence[str] | None = None) -> onnx.ModelProto:
    """The ONNX model of ``graph`` (inputs named as the graph's, symbolic dims by their
    names); written to ``path`` when given. ``output_names_`` names the outputs
    (default: their own names, else ``output_<i>``)."""
    check_exportable(graph)
    ob = OnnxBuilder(graph)
    for value in graph.inputs:
        ob.add_input(value)
    ob.bind_symbols()
    for value in graph.constants.values():
        if value.uses or value in graph.outputs:
            ob.add_constant(value)
    for node in graph.nodes:
        ob.lowering(node)
        operands = node.opdef.structure([None if v is None else ob.tensors[v] for v in node.inputs])
        results = EXPORTS[node.op](ob, node, *operands, **node.attrs)
        for value, tensor in zip(node.results, results if isinstance(results, tuple) else (results,)):
            ob.tensors[value] = tensor
    ob.lowering(None)
    names = list(output_names_ or output_names(graph))
    if len(names) != len(graph.outputs):
        raise ValueError(f"{len(names)} output names for {len(graph.outputs)} outputs")
    for value, name in zip(graph.outputs, names):
        out = gs.Variable(name, dtype=_np_dtype(value.dtype), shape=onnx_shape(value.shape))
        ob.onnx.layer(op="Identity", name=f"output_{name}", inputs=[ob.tensors[value]], outputs=[out])
        ob.onnx.outputs.append(out)
    ob.onnx.cleanup().toposort()
    model = gs.export_onnx(ob.onnx)
    model.ir_version = IR_VERSION
    del model.opset_import[:]
    model.opset_import.append(onnx.helper.make_opsetid("", OPSET))
    model.producer_name = "kiln"
    onnx.checker.check_model(model, full_check=model.ByteSize() < _EXTERNAL_DATA_BYTES)
    if path is not None:
        onnx.save(model, os.fspath(path), save_as_external_data=model.ByteSize() >= _EXTERNAL_DATA_BYTES)
    return model
