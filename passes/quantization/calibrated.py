"""The calibrated schemes: ``int4_gptq``, ``int4_awq`` and ``w8a8_sq`` quantize the linear
layers with what one run of the unquantized graph on calibration text shows about their
inputs (``activations.py``).

Each runs in three steps over all layers at once: choose (GPTQ's Hessians; AWQ's and
SmoothQuant's per-channel scales, searched on the float weights), fold (the scales'
inverses into the ops that make the inputs, ``smoothing.py``), quantize (each layer's
weight, times its scales, into the scheme's op). Folding before any layer is rewritten
lets ``down_proj``'s scales go into ``up_proj``'s rows while ``up_proj`` is still a
``linear``. The quantized operands are computed here, not lazily: calibration has read
every weight anyway.

- ``int4_gptq`` and ``int4_awq`` give ``linear_int4`` (the layout and kernels of ``int4``);
- ``w8a8_sq`` gives ``linear_w8a8``: SmoothQuant's ``s_j = max|X_j|^alpha /
  max|W_j|^(1 - alpha)`` (``W_j`` over every layer reading the input) folded away, then
  INT8 weights per output channel; activations are rounded per token at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

from ...ir import Graph, Node
from ...ir.opdefs.quantized import quantized_linear_inputs
from .activations import LinearGroup, gather_statistics, linear_groups
from .awq import search_clipping, search_scales
from .config import QuantConfig
from .gptq import HessianFactor, gptq_quantize_int4
from .smoothing import fold_input_scale
from .weights import int4_group_size, quantize_int4, quantize_int8

AWQ_SAMPLE_TOKENS = 512  # input rows AWQ searches its scales and clipping on
AWQ_UNCLIPPED = ("q_proj", "k_proj")  # AutoAWQ leaves queries and keys unclipped: attention is not their MSE
_TINY = 1e-5


def replace_linear(graph: Graph, node: Node, op: str, operands: Sequence) -> Node:
    """Replace the ``linear`` ``node`` by ``op`` over its input, ``operands`` (absent optional
    ones left out) and its bias."""
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    with graph.inserting_before(node):
        new = graph.call(op, quantized_linear_inputs(op, node.inputs[0], list(operands), bias), location=node.location)
    node.result.replace_all_uses_with(new.result)
    graph.erase_node(node)
    return new


def quantize_calibrated(graph: Graph, config: QuantConfig, layers: Sequence[Node],
                        batches: Sequence[torch.Tensor]) -> int:
    """Quantize ``layers`` (``linear`` nodes over constant weights) of ``graph`` with
    ``config``'s calibrated scheme, calibrated on ``batches`` of token ids; return how many."""
    groups = linear_groups(layers)
    if not groups:
        return 0
    if config.scheme.startswith("int4"):
        for group in groups:
            try:
                _group_size(group, config)
            except ValueError as exc:
                raise ValueError(f"cannot quantize {group.layers[0].location or group.layers[0].inputs[1].name} "
                                 f"to {config.scheme}: {exc}; skip it with QuantConfig(skip=[...])") from None
    gather_statistics(graph, groups, batches, hessian=config.scheme == "int4_gptq",
                      sample_tokens=AWQ_SAMPLE_TOKENS if config.scheme == "int4_awq" else 0)
    chosen = [(group, _choose(group, config)) for group in groups]
    for group, scale in chosen:
        if scale is not None:
            fold_input_scale(graph, group, scale)
    quantize = {"int4_gptq": _gptq, "int4_awq": _awq, "w8a8_sq": _w8a8}[config.scheme]
    with tqdm(total=len(layers), desc="quantizing", unit="layer", disable=None, leave=False) as bar:
        for group, scale in chosen:
            for node in group.layers:
                weight = node.inputs[1].tensor().detach()
                scaled = weight if scale is None else (weight.float() * scale).to(weight.dtype)
                op, parts = quantize(scaled, group, scale, config, node)
                base = node.inputs[1].name.removesuffix(".weight")
                replace_linear(graph, node, op, [graph.add_constant(t, name=f"{base}.{suffix}")
                                                 for suffix, t in parts])
                bar.update(1)
    return len(layers)


def _group_size(group: LinearGroup, config: QuantConfig) -> int:
    return int4_group_size(group.input.shape[-1], config.group_size)


def _choose(group: LinearGroup, config: QuantConfig) -> torch.Tensor | None:
    """The input scales of ``group``'s layers (AWQ, SmoothQuant), or None where there are
    none (GPTQ: its Hessian factor then goes to ``group.factor``)."""
    if config.scheme == "w8a8_sq":
        return _smoothquant_scales(group, config.alpha)
    if config.scheme == "int4_awq":
        scale = search_scales(group.weights, group.stats.absmean, group.stats.sample, _group_size(group, config),
                              config.symmetric)
        return None if bool((scale == 1).all()) else scale  # plain round-to-nearest won
    group.factor = HessianFactor.of(group.stats.mean_hessian, config.act_order, config.damp)
    group.stats.hessian = None  # the factor is all GPTQ needs now
    return None


def _smoothquant_scales(group: LinearGroup, alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.abs().amax(dim=0) for w in group.weights]).amax(dim=0).clamp(min=_TINY)
    return (group.stats.absmax.clamp(min=_TINY).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=_TINY)


def _int4_parts(parts: tuple[torch.Tensor, ...]) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    return "linear_int4", list(zip(("qweight", "scales", "zeros"), parts))


def _gptq(weight, group, scale, config, node):
    return _int4_parts(gptq_quantize_int4(weight, group.factor, _group_size(group, config), config.symmetric))


def _awq(weight, group, scale, config, node):
    size = _group_size(group, config)
    if config.clip and not (node.location or "").endswith(AWQ_UNCLIPPED):
        sample = group.stats.sample if scale is None else group.stats.sample / scale
        weight = search_clipping(weight, sample, size, config.symmetric)
    return _int4_parts(quantize_int4(weight, size, config.symmetric))


def _w8a8(weight, group, scale, config, node):
    return "linear_w8a8", list(zip(("qweight", "weight_scale"), quantize_int8(weight)))
