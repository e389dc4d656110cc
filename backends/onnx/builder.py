"""``OnnxBuilder``: an ONNX graph under construction from a kiln graph, built with
onnx-graphsurgeon, with the helpers every op's export shares (constants, shape tensors
for symbolic dims, casts, slices).

Symbolic dims stay symbolic: inputs declare them by name (``num_tokens``), and where an
op needs one as a value it is read once off the first graph input that has it as a bare
dim (``Shape`` with start and end), expressions like ``num_seqs + 1`` built with ``Add``
and ``Mul``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import sympy
import torch

from ...ir import DType, Graph, Node, Value
from ...ir.printer import Namer
from ..dims import build_dim


class OnnxExportError(ValueError):
    """A graph that cannot be exported to ONNX; names the node and why."""


_DTYPES = {"f32": onnx.TensorProto.FLOAT, "f16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16,
           "f64": onnx.TensorProto.DOUBLE, "f8e4m3": onnx.TensorProto.FLOAT8E4M3FN, "i64": onnx.TensorProto.INT64,
           "i32": onnx.TensorProto.INT32, "i8": onnx.TensorProto.INT8, "bool": onnx.TensorProto.BOOL}


def onnx_dtype(dtype: DType) -> int:
    """The ONNX element type of a kiln dtype."""
    if dtype.name not in _DTYPES:
        raise OnnxExportError(f"dtype {dtype.name} has no ONNX element type")
    return _DTYPES[dtype.name]


def onnx_shape(shape: Sequence) -> list:
    """A kiln shape as ONNX dims: ints, and symbols by name (an expression as its text)."""
    return [d if isinstance(d, int) else str(d) for d in shape]


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    """A tensor's data as numpy (bfloat16 through ml_dtypes, which onnx reads)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class OnnxBuilder:
    """The ONNX graph of one kiln graph; ``tensors`` maps kiln values to gs tensors."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.onnx = gs.Graph(name=graph.name)
        self.tensors: dict[Value, gs.Tensor] = {}
        self._symbols: dict[sympy.Symbol, gs.Tensor] = {}
        self._namer = Namer(graph)
        self._label = "graph"

    def lowering(self, node: Node | None) -> None:
        """Name the nodes that follow after ``node``."""
        self._label = "graph" if node is None else f"{node.op}_{self._namer(node.results[0])[1:]}"

    def op(self, op: str, inputs: Sequence[Any], outputs: int = 1, **attrs: Any) -> Any:
        """Add an ONNX node; return its output (or outputs, when ``outputs > 1``)."""
        made = self.onnx.layer(op=op, name=f"{self._label}_{op}_{len(self.onnx.nodes)}",
                               inputs=[self.const(x) if isinstance(x, (np.ndarray, torch.Tensor)) else x
                                       for x in inputs],
                               outputs=[f"{self._label}_{op}"] * outputs, attrs=attrs)
        return made[0] if outputs == 1 else tuple(made)

    def const(self, data: np.ndarray | torch.Tensor, name: str | None = None) -> gs.Constant:
        array = numpy_of(data) if isinstance(data, torch.Tensor) else np.asarray(data)
        name = name or f"const_{len(self.onnx.nodes)}_{id(array)}"
        return gs.Constant(name, array)

    def ints(self, values: Sequence[int]) -> gs.Constant:
        return self.const(np.asarray(values, dtype=np.int64))

    def scalar(self, number: float, dtype: DType) -> gs.Constant:
        return self.const(torch.tensor(number, dtype=dtype.torch_dtype))

    def add_input(self, value: Value) -> gs.Variable:
        variable = gs.Variable(value.name, dtype=_np_dtype(value.dtype),
                               shape=onnx_shape(value.shape))
        self.onnx.inputs.append(variable)
        self.tensors[value] = variable
        return variable

    def add_constant(self, value: Value) -> gs.Constant:
        tensor = self.const(value.tensor(), value.name)
        self.tensors[value] = tensor
        return tensor

    def bind_symbols(self) -> None:
        for value in self.graph.inputs:
            for axis, dim in enumerate(value.shape):
                if isinstance(dim, sympy.Symbol) and dim not in self._symbols:
                    self._symbols[dim] = self.op("Shape", [self.tensors[value]], start=axis, end=axis + 1)

    def dim(self, expr: Any) -> Any:
        """A 1-element int64 tensor holding the dim ``expr``."""
        try:
            return build_dim(expr, lambda n: self.ints([n]), self._symbol,
                             lambda a, b: self.op("Add", [a, b]), lambda a, b: self.op("Mul", [a, b]))
        except ValueError as exc:
            raise OnnxExportError(str(exc)) from None

    def _symbol(self, symbol: sympy.Symbol) -> Any:
        if symbol not in self._symbols:
            raise OnnxExportError(f"symbol {symbol} is not a dim of any graph input")
        return self._symbols[symbol]

    def shape(self, dims: Sequence) -> Any:
        """A 1-D int64 shape tensor of the kiln dims ``dims``."""
        if all(isinstance(d, int) for d in dims):
            return self.ints(list(dims))
        return self.op("Concat", [self.dim(d) for d in dims], axis=0)

    def reshape(self, x: Any, dims: Sequence) -> Any:
        return self.op("Reshape", [x, self.shape(dims)])

    def cast(self, x: Any, dtype: DType) -> Any:
        return self.op("Cast", [x], to=onnx_dtype(dtype))

    def slice(self, x: Any, dim: int, start: Any, end: Any, step: int = 1) -> Any:
        return self.op("Slice", [x, self.dim(start), self.dim(end), self.ints([dim]), self.ints([step])])


def _np_dtype(dtype: DType):
    return onnx.helper.tensor_dtype_to_np_dtype(onnx_dtype(dtype))
