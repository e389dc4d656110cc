"""The ``quantize`` stage: every ``linear`` over a constant weight becomes the scheme's
quantized op, its weight replaced by lazily computed codes and scales.

It runs after ``raise`` and before ``fuse`` (DESIGN.md's order), once (fusions later
merge the layers it names), so the fusions then concatenate quantized projections
(``fusion.py``). Weights stay lazy: quantizing an 8B
model's graph reads nothing until the engine materializes its constants. The LM head
(the ``linear`` a graph output reaches through its first operands) is kept unless asked,
and so is every layer that ``QuantConfig.skip`` names. FP8 with static activation scales
then calibrates them (``calibration.py``); the calibrated schemes (GPTQ, AWQ, SmoothQuant)
quantize from what a run on calibration text shows (``calibrated.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from ...ir import ConstantData, Graph, LazyData, Node, TensorType, Value, dtypes
from ...ir.opdefs.quantized import QUANTIZED_LINEARS
from ..manager import Pass
from .calibrated import quantize_calibrated, replace_linear
from .calibration import calibrate_fp8_inputs
from .config import CALIBRATED, QuantConfig
from .weights import int4_group_size, quantize_fp8_weight, quantize_int4, quantize_int8

# A quantized weight's operands: (name suffix, type) for each, given the weight's type and config.
Layout = Callable[[TensorType, QuantConfig], list[tuple[str, TensorType]]]
Quantizer = Callable[[torch.Tensor, QuantConfig], tuple[torch.Tensor, ...]]


def _int8_layout(w: TensorType, config: QuantConfig):
    return [("qweight", TensorType(dtypes.int8, w.shape)), ("scale", TensorType(dtypes.float32, (w.shape[0],)))]


def _int4_layout(w: TensorType, config: QuantConfig):
    out_features, in_features = w.shape
    groups = (out_features, in_features // int4_group_size(in_features, config.group_size))
    return [("qweight", TensorType(dtypes.uint8, (out_features, in_features // 2))),
            ("scales", TensorType(w.dtype, groups)), ("zeros", TensorType(dtypes.uint8, groups))]


def _fp8_layout(w: TensorType, config: QuantConfig):
    return [("qweight", TensorType(dtypes.float8_e4m3fn, w.shape)),
            ("weight_scale", TensorType(dtypes.float32, (w.shape[0],)))]


def _int4(weight: torch.Tensor, config: QuantConfig):
    return quantize_int4(weight, int4_group_size(weight.shape[1], config.group_size), config.symmetric)


# scheme -> (op, the operands' layout, the quantizer)
SCHEME_OPS: dict[str, tuple[str, Layout, Quantizer]] = {
    "int8": ("linear_int8", _int8_layout, lambda w, config: quantize_int8(w)),
    "int4": ("linear_int4", _int4_layout, _int4),
    "fp8": ("linear_fp8", _fp8_layout, lambda w, config: quantize_fp8_weight(w)),
}


def lm_heads(graph: Graph) -> list[Node]:
    """The linear layers that produce the graph's outputs: found from each output by
    following first operands (softcapping, scaling, casts) to a linear."""
    heads = []
    for value in graph.outputs:
        node = value.producer
        while node is not None and node.op not in ("linear", *QUANTIZED_LINEARS) and node.inputs:
            node = node.inputs[0].producer if node.inputs[0] is not None else None
        if node is not None and node.op in ("linear", *QUANTIZED_LINEARS):
            heads.append(node)
    return heads


def eligible_linears(graph: Graph, config: QuantConfig) -> list[Node]:
    """The ``linear`` nodes over constant weights that ``config`` quantizes."""
    kept = set() if config.lm_head else {id(n) for n in lm_heads(graph)}
    return [node for node in graph.nodes if node.op == "linear" and node.inputs[1] is not None
            and node.inputs[1].is_constant and id(node) not in kept and not config.skips(node.location)]


def quantize_linears(graph: Graph, config: QuantConfig, calibration: Sequence[torch.Tensor] = ()) -> int:
    """Rewrite every eligible ``linear`` of ``graph`` into ``config``'s quantized op; return
    how many were rewritten. The calibrated schemes run ``graph`` on ``calibration``, batches
    of the token ids it takes (``calibrated.py``)."""
    if config.scheme in CALIBRATED:
        return quantize_calibrated(graph, config, eligible_linears(graph, config), calibration)
    op, layout, quantizer = SCHEME_OPS[config.scheme]
    rewritten = 0
    for node in eligible_linears(graph, config):
        weight = node.inputs[1]
        try:
            parts = layout(weight.type, config)
        except ValueError as exc:
            raise ValueError(f"cannot quantize {node.location or weight.name} to {config.scheme}: {exc}; "
                             "skip it with QuantConfig(skip=[...])") from None
        operands = _quantized_operands(graph, weight, parts, lambda w: quantizer(w, config))
        replace_linear(graph, node, op, operands)  # FP8: no static input scale without calibration
        rewritten += 1
    return rewritten


class _QuantizedWeight:
    """The parts of one quantized weight (codes, scales, zero points), computed together
    when the first is asked for and each handed out once: nothing keeps them but their
    users (an engine's weights, a fused concatenation), and asked again they are computed
    again."""

    def __init__(self, source: ConstantData, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]):
        self.source, self.quantize = source, quantize
        self.pending: dict[int, torch.Tensor] = {}

    def part(self, index: int) -> torch.Tensor:
        if index not in self.pending:
            with torch.no_grad():  # a model's parameters would make the scales keep float32 copies alive
                self.pending = dict(enumerate(self.quantize(self.source.materialize().detach())))
        return self.pending.pop(index)


def _quantized_operands(graph: Graph, weight: Value, parts: list[tuple[str, TensorType]],
                        quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> list[Value]:
    """Lazy constants for the quantized weight's parts."""
    quantized = _QuantizedWeight(weight.data, quantize)
    base = weight.name.removesuffix(".weight")
    return [graph.add_constant(LazyData(functools.partial(quantized.part, i), f"{suffix} of {weight.name}"), type,
                               f"{base}.{suffix}")
            for i, (suffix, type) in enumerate(parts)]


def quantize_pass(config: QuantConfig, calibration: Sequence[torch.Tensor] = ()) -> Pass:
    """The ``quantize`` pass for ``config``; static activation scales and the calibrated
    schemes are calibrated on ``calibration``, batches of token ids the graph takes."""
    if config.calibrated and not calibration:
        raise ValueError(f"{'static activation scales' if config.activations == 'static' else config.scheme} "
                         "need calibration text")

    def run(graph: Graph) -> int:
        rewritten = quantize_linears(graph, config, calibration)
        if config.activations == "static":
            calibrate_fp8_inputs(graph, calibration)
        return rewritten

    return Pass("quantize", run,
                f"linear layers to {config.scheme} ({', '.join(config.skip) or 'nothing'} skipped)", once=True)
