"""ONNX models into kiln graphs: ``import_onnx(path_or_model)``.

Each ONNX node is converted by the table in ``onnx_ops.py`` into kiln ops. The shape
arithmetic that exporters leave in a graph (``Shape``, ``Gather``, ``Concat``, ... feeding
a ``Reshape``) is evaluated while importing: such values are *known*, numpy arrays whose
elements are ints or kiln dims (``batch``, ``2*seq``), and become reshape attributes, not
ops. A known array used as a tensor becomes a constant. Graph inputs keep their symbolic
dims by name. Ops without a converter are refused together, each by domain and name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import onnx
import torch
from onnx import numpy_helper

from ..ir import Graph, TensorType, sym
from .errors import FrontendError, UnsupportedOpsError
from .onnx_context import OnnxImport, kiln_dtype
from .onnx_ops import CONVERTERS

def _input_type(info: onnx.ValueInfoProto) -> TensorType:
    tensor = info.type.tensor_type
    dims = []
    for axis, dim in enumerate(tensor.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(dim.dim_value)
        elif dim.dim_param:
            dims.append(sym(dim.dim_param.replace(".", "_").replace("-", "_")))
        else:
            raise FrontendError(f"input {info.name} has an unnamed dynamic dim at axis {axis}: name it when exporting")
    return TensorType(kiln_dtype(tensor.elem_type), tuple(dims))


def import_onnx(model: str | os.PathLike | onnx.ModelProto, name: str | None = None) -> Graph:
    """The kiln graph of an ONNX model (a path or a loaded ``ModelProto``)."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(os.fspath(model))
    opset = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    unsupported: dict[str, list[str]] = {}
    for node in proto.graph.node:
        domain = node.domain or "ai.onnx"
        if domain != "ai.onnx" or node.op_type not in CONVERTERS:
            unsupported.setdefault(f"{domain}::{node.op_type}", []).append(node.name)
    if unsupported:
        raise UnsupportedOpsError(unsupported)
    graph = Graph(name or proto.graph.name or "onnx")
    cx = OnnxImport(graph)
    for init in proto.graph.initializer:
        cx.values[init.name] = numpy_helper.to_array(init)
    for info in proto.graph.input:
        if info.name not in cx.values:
            cx.values[info.name] = graph.add_input(info.name, _input_type(info))
    for node in proto.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        try:
            results = CONVERTERS[node.op_type](cx, list(node.input), attrs, opset["ai.onnx"])
        except FrontendError as exc:
            raise FrontendError(f"ONNX node {node.name or node.op_type} ({node.op_type}): {exc}") from None
        results = results if isinstance(results, (tuple, list)) else (results,)
        for out, value in zip(node.output, results):
            cx.values[out] = value
    graph.set_outputs([cx.tensor(o.name) for o in proto.graph.output])
    return graph


def unflatten_outputs(outputs: Sequence[torch.Tensor]) -> Any:
    """An imported ONNX model's outputs: one tensor, or a tuple of them."""
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
