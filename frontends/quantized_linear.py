"""Linear weights that a checkpoint stores quantized, kept in their bits.

A loader that reads a quantized checkpoint (``prequantized.py`` for GPTQ, AWQ and FP8
safetensors, ``gguf.py`` for llama.cpp's files) hands the importer a ``QuantizedRef`` for
each quantized weight, under the model parameter's name. The constant it becomes is a
``QuantizedData``: materialized on its own it is the dequantized weight (so an embedding
table, or anything else that is not a ``linear``, reads plain floats), and
``use_quantized_weights`` rewrites each ``linear`` over it into the quantized op its
``QuantizedLinear`` names (``linear_int4``, ``linear_int8``, ``linear_fp8``), whose
operands are lazy constants repacked from the checkpoint's own layout. A ``permutation``
(GPTQ's activation order) gathers the input's features first, so that each group of the
weight's columns is contiguous.

The quantize stage rewrites only ``linear``, so these layers are never quantized twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..ir import ConstantData, Graph, LazyData, TensorType, dtypes
from ..ir.opdefs.quantized import dequantize_int4, dequantize_int8, quantized_linear_inputs


@dataclass(frozen=True)
class QuantizedLinear:
    """A linear layer's weight in a quantized op's form: the op, and its operands between
    the input and the bias as (name suffix, type, data or None for an absent optional one)."""

    op: str
    operands: tuple[tuple[str, TensorType, ConstantData | None], ...]
    permutation: torch.Tensor | None = None  # x's features are gathered in this order first

    def dequantize(self) -> torch.Tensor:
        """The float32 ``[out, in]`` weight these operands stand for, in the input's own order."""
        parts = [data.materialize() if data is not None else None for _, _, data in self.operands]
        weight = _DEQUANTIZE[self.op](*parts)
        if self.permutation is None:
            return weight
        restored = torch.empty_like(weight)
        restored[:, self.permutation] = weight
        return restored


_DEQUANTIZE: dict[str, Callable[..., torch.Tensor]] = {
    "linear_int4": lambda qweight, scales, zeros: dequantize_int4(qweight, scales, zeros),
    "linear_int8": lambda qweight, scale, zeros=None: dequantize_int8(qweight, scale, zeros),
    "linear_fp8": lambda qweight, scale, input_scale=None: qweight.float() * scale.float()[:, None],
}


@dataclass(frozen=True, eq=False)
class QuantizedData:
    """A quantized weight as a graph constant: it materializes dequantized, in ``dtype``."""

    linear: QuantizedLinear
    dtype: torch.dtype
    description: str

    def materialize(self) -> torch.Tensor:
        return self.linear.dequantize().to(self.dtype)


@dataclass(frozen=True)
class QuantizedRef:
    """A checkpoint's quantized weight as the importer sees it: the dequantized shape and
    where it lives; ``build(dtype)`` gives its ``QuantizedLinear`` for a model in ``dtype``."""

    shape: tuple[int, int]
    where: str
    describe: str
    build: Callable[[torch.dtype], QuantizedLinear]
    dtype: torch.dtype = torch.float32  # what it dequantizes to before the cast to the model's dtype

    def constant(self, dtype: torch.dtype) -> QuantizedData:
        """The graph constant for a model whose weights are ``dtype``."""
        return QuantizedData(self.build(dtype), dtype, self.describe)

    def load(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dequantized weight (in ``dtype``)."""
        weight = self.build(dtype or torch.float32).dequantize()
        return weight if dtype is None else weight.to(dtype)


class SharedParts:
    """Operands computed together (one repack of a checkpoint tensor gives codes, scales and
    zero points): the first asked for computes all, each is handed out once, so that nothing
    but their users keeps them."""

    def __init__(self, compute: Callable[[], tuple[torch.Tensor, ...]], description: str):
        self.compute, self.description = compute, description
        self.pending: dict[int, torch.Tensor] = {}

    def part(self, index: int) -> torch.Tensor:
        """The ``index``-th operand."""
        if index not in self.pending:
            self.pending = dict(enumerate(self.compute()))
        return self.pending.pop(index)

    def lazy(self, index: int) -> LazyData:
        """The ``index``-th operand as lazy constant data."""
        return LazyData(functools.partial(self.part, index), self.description)


def use_quantized_weights(graph: Graph) -> int:
    """Rewrite every ``linear`` over a ``QuantizedData`` constant into its quantized op;
    return how many were rewritten."""
    operands: dict[int, list] = {}
    rewritten = 0
    for node in list(graph.nodes):
        weight = node.inputs[1] if node.op == "linear" else None
        if weight is None or not isinstance(weight.data, QuantizedData):
            continue
        linear = weight.data.linear
        base = weight.name.removesuffix(".weight")
        with graph.inserting_before(node):
            if id(weight) not in operands:
                operands[id(weight)] = [None if data is None else graph.add_constant(data, type, f"{base}.{suffix}")
                                        for suffix, type, data in linear.operands]
            x = node.inputs[0]
            if linear.permutation is not None:
                order = graph.add_constant(linear.permutation,
                                           TensorType(dtypes.int64, tuple(linear.permutation.shape)),
                                           f"{base}.input_order")
                x = graph.call("index_select", [x, order], {"dim": -1}, location=node.location).result
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            new = graph.call(linear.op, quantized_linear_inputs(linear.op, x, operands[id(weight)], bias),
                             location=node.location)
        node.result.replace_all_uses_with(new.result)
        graph.erase_node(node)
        rewritten += 1
    return rewritten
