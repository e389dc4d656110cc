"""``NetworkBuilder``: an ``INetworkDefinition`` under construction from a kiln graph, with
the helpers every op lowering shares (constants, shape tensors for symbolic dims,
reshapes, broadcasting, elementwise and unary layers, casts, slices).

Symbolic dims become shape tensors: each symbol is read once from the shape of the first
graph input that has it as a bare dim, and an expression like ``num_seqs + 1`` is built
from those with elementwise layers. Every layer is named after the kiln node it lowers,
so that TensorRT's messages point at the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sympy
import torch

from ...ir import DType, Graph, Node, Value, dtypes
from ...ir.printer import Namer
from ..dims import build_dim
from .library import TensorRT


class LoweringError(ValueError):
    """A graph that cannot be lowered to a TensorRT network; names the node and why."""


_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f8e4m3": "fp8", "i64": "int64",
           "i32": "int32", "i8": "int8", "bool": "bool"}


def has_dtype(trt: TensorRT, dtype: DType) -> bool:
    """Whether TensorRT has a data type for kiln's ``dtype``."""
    return dtype.name in _DTYPES and hasattr(trt.module, _DTYPES[dtype.name])


def trt_dtype(trt: TensorRT, dtype: DType) -> Any:
    """The TensorRT data type of a kiln dtype."""
    if dtype.name not in _DTYPES or not hasattr(trt.module, _DTYPES[dtype.name]):
        raise LoweringError(f"dtype {dtype.name} has no TensorRT data type in {trt}")
    return getattr(trt.module, _DTYPES[dtype.name])


def trt_dims(shape: Sequence) -> tuple[int, ...]:
    """A kiln shape as TensorRT dims: -1 for every symbolic dim."""
    return tuple(d if isinstance(d, int) else -1 for d in shape)


def collecting_logger(trt: TensorRT) -> Any:
    """A TensorRT logger that keeps warnings and errors in ``.messages`` instead of printing
    them, so that a failed build can say why (and a good one stays quiet)."""

    class Logger(trt.module.ILogger):
        def __init__(self):
            trt.module.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.module.ILogger.Severity.WARNING:
                self.messages.append(f"{severity.name}: {msg}")

    return Logger()


class NetworkBuilder:
    """A TensorRT network being built from one kiln graph; ``tensors`` maps each kiln
    value lowered so far to its ``ITensor``."""

    def __init__(self, trt: TensorRT, graph: Graph):
        self.trt = trt
        m = trt.module
        self.logger = collecting_logger(trt)
        self.builder = m.Builder(self.logger)
        flags = 1 << int(m.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if trt.has("strongly_typed") else 0
        self.network = self.builder.create_network(flags)
        self.graph = graph
        self.tensors: dict[Value, Any] = {}
        self.weights: dict[str, torch.Tensor] = {}  # kept alive until the plan is built
        self._symbols: dict[sympy.Symbol, Any] = {}
        self._namer = Namer(graph)
        self._label = "graph"
        self._count = 0

    # naming and layers

    def layer(self, layer: Any) -> Any:
        """Name ``layer`` after the node being lowered and return it."""
        self._count += 1
        layer.name = f"{self._label}#{self._count}"
        return layer

    def out(self, layer: Any, index: int = 0) -> Any:
        return self.layer(layer).get_output(index)

    def lowering(self, node: Node | None) -> None:
        """Name the layers that follow after ``node`` (its op and first result, as printed)."""
        self._label = "graph" if node is None else f"{node.op}:{self._namer(node.results[0])}"

    # inputs, constants, symbols

    def add_input(self, value: Value) -> Any:
        tensor = self.network.add_input(value.name, trt_dtype(self.trt, value.dtype), trt_dims(value.shape))
        self.tensors[value] = tensor
        return tensor

    def bind_symbols(self) -> None:
        """Read every symbol that is a bare dim of some input off that input's shape."""
        for value in self.graph.inputs:
            for axis, dim in enumerate(value.shape):
                if isinstance(dim, sympy.Symbol) and dim not in self._symbols:
                    shape = self.out(self.network.add_shape(self.tensors[value]))
                    self._symbols[dim] = self.out(self.network.add_slice(shape, (axis,), (1,), (1,)))

    def add_constant(self, value: Value) -> Any:
        """A graph constant as a named constant layer (its name is its refit name)."""
        data = value.tensor().contiguous()
        self.weights[value.name] = data
        tensor = self.constant(data, value.name)
        self.tensors[value] = tensor
        return tensor

    def constant(self, data: torch.Tensor, name: str | None = None) -> Any:
        """A constant layer holding ``data`` (kept alive until the build)."""
        data = data.contiguous()
        key = name or f"_const{len(self.weights)}"
        self.weights.setdefault(key, data)
        kind = trt_dtype(self.trt, dtypes.dtype(data.dtype))
        weights = self.trt.module.Weights(kind, data.data_ptr(), data.numel())
        layer = self.network.add_constant(tuple(data.shape), weights)
        if name:
            layer.name = name
            self.network.set_weights_name(weights, name)
        else:
            self.layer(layer)
        return layer.get_output(0)

    def scalar(self, number: float, like: Any) -> Any:
        """``number`` as a constant of ``like``'s dtype and rank (all dims 1)."""
        dtype = self.torch_dtype(like)
        return self.constant(torch.full((1,) * len(like.shape), number, dtype=dtype))

    def trt_dtype_of(self, value: Value) -> Any:
        return trt_dtype(self.trt, value.dtype)

    def torch_dtype(self, tensor: Any) -> torch.dtype:
        names = {getattr(self.trt.module, v): k for k, v in _DTYPES.items() if hasattr(self.trt.module, v)}
        return dtypes.dtype(names[tensor.dtype]).torch_dtype

    def dim(self, expr: Any) -> Any:
        """A 1-element int64 tensor holding the dim ``expr`` (an int or a sympy expression)."""
        try:
            return build_dim(expr, lambda n: self.constant(torch.tensor([n], dtype=torch.int64)), self._symbol,
                             lambda a, b: self.elementwise("SUM", a, b), lambda a, b: self.elementwise("PROD", a, b))
        except ValueError as exc:
            raise LoweringError(str(exc)) from None

    def _symbol(self, symbol: sympy.Symbol) -> Any:
        if symbol not in self._symbols:
            raise LoweringError(f"symbol {symbol} is not a dim of any graph input")
        return self._symbols[symbol]

    def shape(self, dims: Sequence) -> Any:
        """A 1-D int64 shape tensor of ``dims``."""
        if all(isinstance(d, int) for d in dims):
            return self.constant(torch.tensor(list(dims), dtype=torch.int64).reshape(len(dims)))
        layer = self.network.add_concatenation([self.dim(d) for d in dims])
        layer.axis = 0
        return self.out(layer)

    # shared layers

    def reshape(self, x: Any, dims: Sequence) -> Any:
        """``x`` reshaped to the kiln shape ``dims`` (ints and symbols)."""
        layer = self.network.add_shuffle(x)
        layer.zero_is_placeholder = False
        if all(isinstance(d, int) for d in dims):
            layer.reshape_dims = tuple(dims)
        else:
            layer.set_input(1, self.shape(dims))
        return self.out(layer)

    def reshape_last(self, x: Any, dims: Sequence[int], replaced: int = 1) -> Any:
        """``x`` with its last ``replaced`` dims reshaped to the static ``dims`` (the leading dims kept)."""
        rank = len(x.shape)
        shape = self.out(self.network.add_shape(x))
        lead = self.out(self.network.add_slice(shape, (0,), (rank - replaced,), (1,)))
        layer = self.network.add_concatenation([lead, self.constant(torch.tensor(list(dims), dtype=torch.int64))])
        layer.axis = 0
        shuffle = self.network.add_shuffle(x)
        shuffle.zero_is_placeholder = False
        shuffle.set_input(1, self.out(layer))
        return self.out(shuffle)

    def permute(self, x: Any, order: Sequence[int]) -> Any:
        layer = self.network.add_shuffle(x)
        layer.first_transpose = tuple(order)
        return self.out(layer)

    def with_rank(self, x: Any, rank: int) -> Any:
        """``x`` with leading dims of 1 up to ``rank`` (numpy broadcasting made explicit)."""
        missing = rank - len(x.shape)
        if missing <= 0:
            return x
        shape = self.out(self.network.add_shape(x))
        ones = self.constant(torch.ones(missing, dtype=torch.int64))
        layer = self.network.add_concatenation([ones, shape])
        layer.axis = 0
        shuffle = self.network.add_shuffle(x)
        shuffle.zero_is_placeholder = False
        shuffle.set_input(1, self.out(layer))
        return self.out(shuffle)

    def elementwise(self, op: str, a: Any, b: Any) -> Any:
        rank = max(len(a.shape), len(b.shape))
        op_ = getattr(self.trt.module.ElementWiseOperation, op)
        return self.out(self.network.add_elementwise(self.with_rank(a, rank), self.with_rank(b, rank), op_))

    def unary(self, op: str, x: Any) -> Any:
        return self.out(self.network.add_unary(x, getattr(self.trt.module.UnaryOperation, op)))

    def activation(self, kind: str, x: Any) -> Any:
        return self.out(self.network.add_activation(x, getattr(self.trt.module.ActivationType, kind)))

    def cast(self, x: Any, dtype: DType) -> Any:
        kind = trt_dtype(self.trt, dtype)
        return x if x.dtype == kind else self.out(self.network.add_cast(x, kind))

    def slice(self, x: Any, dim: int, start: Any, size: Any, step: int = 1) -> Any:
        """``size`` elements of ``x`` along ``dim`` from ``start`` every ``step`` (dims may be symbolic)."""
        rank = len(x.shape)
        if isinstance(start, int) and isinstance(size, int) and all(d >= 0 for d in x.shape):
            sizes = list(x.shape)
            sizes[dim] = size
            starts = [0] * rank
            starts[dim] = start
            strides = [1] * rank
            strides[dim] = step
            return self.out(self.network.add_slice(x, tuple(starts), tuple(sizes), tuple(strides)))
        layer = self.network.add_slice(x, (0,) * rank, (1,) * rank, (1,) * rank)
        starts = torch.zeros(rank, dtype=torch.int64)
        strides = torch.ones(rank, dtype=torch.int64)
        strides[dim] = step
        start_t = self.constant(starts)
        if not (isinstance(start, int) and start == 0):
            one_hot = self.constant(torch.nn.functional.one_hot(torch.tensor(dim), rank).to(torch.int64))
            start_t = self.elementwise("PROD", one_hot, self.dim(start))
        shape = self.out(self.network.add_shape(x))
        pieces = [self.out(self.network.add_slice(shape, (i,), (1,), (1,))) if i != dim else self.dim(size)
                  for i in range(rank)]
        concat = self.network.add_concatenation(pieces)
        concat.axis = 0
        layer.set_input(1, start_t)
        layer.set_input(2, self.out(concat))
        layer.set_input(3, self.constant(strides))
        return self.out(layer)

    def axes_mask(self, dims: Sequence[int], rank: int) -> int:
        return sum(1 << (d % rank) for d in dims)
