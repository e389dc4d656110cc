"""The lowering table: for each kiln op, the function that builds its TensorRT layers,
what those layers are, and the native TensorRT feature they need (probed on the module
at hand). An op that is not here, that needs a feature the module lacks, or whose
attributes ask for something TensorRT cannot do, is refused by name before any build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...ir import Node
from . import layers as L
from . import llm_layers
from .library import TensorRT
from .network import has_dtype


@dataclass(frozen=True)
class OpLowering:
    """How one kiln op is lowered: ``lower(nb, node, *operands, **attrs)``, the layers it
    makes (for people), the native feature it needs, and a check of the node's attributes
    that returns why it cannot be lowered (or None)."""

    lower: Callable[..., Any]
    layers: str
    native: str | None = None
    refuse: Callable[[Node], str | None] | None = None


def _no_window_or_softcap(node: Node) -> str | None:
    asked = [name for name in ("sliding_window", "softcap") if node.attrs.get(name) is not None]
    if node.attrs.get("alibi_bias_max") is not None:
        asked.append("ALiBi biases (alibi_bias_max)")
    if node.attrs.get("chunk_size") is not None:
        asked.append("chunked local attention (chunk_size)")
    if node.op == "attention" and node.attrs["causal"] and len(node.inputs) > 3 and node.inputs[3] is not None:
        asked.append("causal mask together with a mask operand")
    return f"TensorRT's attention layer has no {' or '.join(asked)}" if asked else None


_BINARY = {"add": "SUM", "sub": "SUB", "mul": "PROD", "div": "DIV", "pow": "POW", "maximum": "MAX",
           "minimum": "MIN", "eq": "EQUAL", "lt": "LESS", "gt": "GREATER", "logical_and": "AND",
           "logical_or": "OR"}
_NEGATED = {"ne": "EQUAL", "le": "GREATER", "ge": "LESS"}
_UNARY = {"neg": "NEG", "abs": "ABS", "exp": "EXP", "log": "LOG", "sqrt": "SQRT", "reciprocal": "RECIP",
          "sin": "SIN", "cos": "COS", "erf": "ERF", "logical_not": "NOT", "floor": "FLOOR"}
_ACTIVATIONS = {"tanh": "TANH", "sigmoid": "SIGMOID", "relu": "RELU"}
_REDUCE = {"sum": "SUM", "mean": "AVG", "max": "MAX", "min": "MIN"}

LOWERINGS: dict[str, OpLowering] = {
    **{op: OpLowering(L.binary(t), f"elementwise {t}") for op, t in _BINARY.items()},
    **{op: OpLowering(L.binary(t, negate=True), f"elementwise {t}, unary NOT") for op, t in _NEGATED.items()},
    **{op: OpLowering(L.unary(t), f"unary {t}") for op, t in _UNARY.items()},
    **{op: OpLowering(L.activation(t), f"activation {t}") for op, t in _ACTIVATIONS.items()},
    **{op: OpLowering(L.reduce(t), f"reduce {t}") for op, t in _REDUCE.items()},
    "rsqrt": OpLowering(L.rsqrt, "unary SQRT, RECIP"),
    "log1p": OpLowering(L.log1p, "elementwise, unary LOG, select"),
    "silu": OpLowering(L.silu, "activation SIGMOID, elementwise PROD"),
    "gelu": OpLowering(L.gelu, "activation GELU_ERF or GELU_TANH"),
    "clamp": OpLowering(L.clamp, "elementwise MAX, MIN"),
    "where": OpLowering(L.where, "select"),
    "cast": OpLowering(L.cast, "cast"),
    "reshape": OpLowering(L.view, "shuffle"),
    "squeeze": OpLowering(L.view, "shuffle"),
    "unsqueeze": OpLowering(L.view, "shuffle"),
    "transpose": OpLowering(L.transpose, "shuffle"),
    "permute": OpLowering(L.permute, "shuffle"),
    "expand": OpLowering(L.expand, "slice (stride 0)"),
    "slice": OpLowering(L.slice_, "slice"),
    "concat": OpLowering(L.concat, "concatenation"),
    "split": OpLowering(L.split, "slice"),
    "matmul": OpLowering(L.matmul, "matrix multiply"),
    "linear": OpLowering(L.linear, "matrix multiply (weight transposed), elementwise SUM"),
    "conv": OpLowering(L.conv, "convolution"),
    "embedding": OpLowering(L.embedding, "gather"),
    "index_select": OpLowering(L.index_select, "gather"),
    "gather": OpLowering(L.gather, "gather (element mode)"),
    "argmax": OpLowering(L.argmax, "top-k"),
    "softmax": OpLowering(L.softmax, "softmax"),
    "log_softmax": OpLowering(L.log_softmax, "softmax, unary LOG"),
    "rms_norm": OpLowering(L.rms_norm, "reduce AVG, unary SQRT and RECIP, elementwise, casts"),
    "layer_norm": OpLowering(L.layer_norm, "normalization", native="normalization"),
    "add_rms_norm": OpLowering(L.add_rms_norm, "elementwise SUM, then as rms_norm"),
    "add_layer_norm": OpLowering(L.add_layer_norm, "elementwise SUM, normalization", native="normalization"),
    "gated_activation": OpLowering(L.gated_activation, "slice, activation, elementwise PROD"),
    "rotary": OpLowering(L.rotary, "slice, concatenation, elementwise"),
    "qkv_rotary": OpLowering(L.qkv_rotary, "shuffle, slice, concatenation, elementwise"),
    "full": OpLowering(L.full, "constant, slice (stride 0)"),
    "arange": OpLowering(L.arange, "fill LINSPACE"),
    "attention": OpLowering(llm_layers.attention, "attention", native="attention", refuse=_no_window_or_softcap),
    "paged_attention": OpLowering(llm_layers.paged_attention, "scatter, gather, attention", native="attention",
                                  refuse=_no_window_or_softcap),
}


# Registered ops with no TensorRT lowering yet, each refused by name with the reason.
NOT_LOWERED = {
    "all_reduce": "tensor-parallel TensorRT networks (add_dist_collective) are not built yet",
    "all_gather": "tensor-parallel TensorRT networks (add_dist_collective) are not built yet",
    "moe": "mixture-of-experts layers are not lowered to TensorRT yet",
    "moe_experts": "mixture-of-experts layers are not lowered to TensorRT yet",
    "moe_route": "mixture-of-experts layers are not lowered to TensorRT yet",
    "moe_all_to_all": "expert-parallel TensorRT networks are not built yet",
    "moe_experts_all_to_all": "expert-parallel TensorRT networks are not built yet",
    "topk": "top-k routing is lowered only inside moe, which TensorRT does not take yet",
    "expm1": "not lowered to TensorRT yet",
    "softplus": "not lowered to TensorRT yet",
    "linear_int8": "quantized linears are not lowered to TensorRT yet (add_dynamic_quantize_v2 and dequantize layers)",
    "linear_int4": "quantized linears are not lowered to TensorRT yet (add_dynamic_quantize_v2 and dequantize layers)",
    "linear_fp8": "quantized linears are not lowered to TensorRT yet (add_dynamic_quantize_v2 and dequantize layers)",
    "mla_attention": "multi-head latent attention is not lowered to TensorRT yet (its native attention takes keys "
                     "and values of one shape, not a latent cache)",
    "paged_mla_attention": "multi-head latent attention is not lowered to TensorRT yet (its native attention takes "
                           "keys and values of one shape, not a latent cache)",
    "linear_w8a8": "quantized linears are not lowered to TensorRT yet (add_dynamic_quantize_v2 and dequantize layers)",
    "rms_norm_quant": "quantized activations are not lowered to TensorRT yet (add_dynamic_quantize_v2)",
    "add_rms_norm_quant": "quantized activations are not lowered to TensorRT yet (add_dynamic_quantize_v2)",
    "scaled_linear": "quantized linears are not lowered to TensorRT yet (dequantize layers)",
}


def unlowerable(node: Node, trt: TensorRT) -> str | None:
    """Why ``node`` cannot be lowered with ``trt``, or None when it can."""
    entry = LOWERINGS.get(node.op)
    for value in (*node.inputs, *node.results):
        if value is not None and not has_dtype(trt, value.dtype):
            return f"dtype {value.dtype.name} has no TensorRT data type"
    if entry is None:
        reason = NOT_LOWERED.get(node.op)
        return f"op {node.op} has no TensorRT lowering" + (f": {reason}" if reason else "")
    if entry.native is not None and not trt.has(entry.native):
        return f"op {node.op} needs TensorRT's native {entry.native} layer, which {trt} lacks"
    return entry.refuse(node) if entry.refuse is not None else None
