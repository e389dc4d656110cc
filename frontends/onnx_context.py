"""What the ONNX importer's converters share: the dtype table and ``OnnxImport``, the
graph under construction with the values so far (``onnx.py`` drives the import,
``onnx_ops.py`` and ``onnx_shape_ops.py`` hold the converters)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from ..ir import Graph, Value, dtypes
from ..ir.shapes import normalize_dim
from .errors import FrontendError

_DTYPES = {onnx.TensorProto.FLOAT: "f32", onnx.TensorProto.FLOAT16: "f16", onnx.TensorProto.BFLOAT16: "bf16",
           onnx.TensorProto.DOUBLE: "f64", onnx.TensorProto.INT64: "i64", onnx.TensorProto.INT32: "i32",
           onnx.TensorProto.INT8: "i8", onnx.TensorProto.BOOL: "bool"}


def kiln_dtype(element_type: int) -> dtypes.DType:
    """The kiln dtype of an ONNX element type."""
    if element_type not in _DTYPES:
        raise FrontendError(f"ONNX element type {onnx.TensorProto.DataType.Name(element_type)} has no kiln dtype")
    return dtypes.dtype(_DTYPES[element_type])


@dataclass
class OnnxImport:
    """What a converter works with: the graph being built and the values so far, each a
    kiln ``Value`` or a known numpy array."""

    graph: Graph
    values: dict[str, Value | np.ndarray] = field(default_factory=dict)

    def known(self, name: str) -> np.ndarray | None:
        """The known value named ``name``, or None if it is computed at run time."""
        value = self.values.get(name)
        return value if isinstance(value, np.ndarray) else None

    def ints(self, name: str, what: str) -> list:
        """A known 1-D value as a list of ints and dims (for shapes, axes, sizes)."""
        value = self.known(name)
        if value is None:
            raise FrontendError(f"{what} ({name}) must be known when importing, but it is computed at run time")
        return [v if isinstance(v, int) or not isinstance(v, (np.integer, float)) else int(v)
                for v in np.atleast_1d(value).tolist()]

    def tensor(self, name: str) -> Value:
        """The value ``name`` as a kiln value (a known array becomes a constant)."""
        value = self.values[name]
        if isinstance(value, Value):
            return value
        if value.dtype == object:
            if not all(isinstance(normalize_dim(v), int) for v in value.flat):
                raise FrontendError(f"{name} holds symbolic dims {value.tolist()} and is used as a tensor")
            value = value.astype(np.int64)
        constant = self.graph.add_constant(torch.from_numpy(np.array(value)), name=_constant_name(self.graph, name))
        self.values[name] = constant
        return constant


def _constant_name(graph: Graph, name: str) -> str:
    base = name or "const"
    unique, i = base, 0
    while unique in graph.constants:
        unique, i = f"{base}_{i}", i + 1
    return unique
