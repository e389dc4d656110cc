"""The export table: for each kiln op, the function that writes its ONNX ops. An op that
is not here, or a value whose dtype ONNX lacks, is refused by name before export."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...ir import Node
from . import attention as A
from . import ops as O
from .builder import _DTYPES

_SAME = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
         "minimum": "Min", "eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
         "ge": "GreaterOrEqual", "logical_and": "And", "logical_or": "Or", "logical_not": "Not", "neg": "Neg",
         "abs": "Abs", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "reciprocal": "Reciprocal", "sin": "Sin",
         "cos": "Cos", "tanh": "Tanh", "erf": "Erf", "sigmoid": "Sigmoid", "relu": "Relu", "where": "Where",
         "matmul": "MatMul", "floor": "Floor"}
_REDUCE = {"sum": "ReduceSum", "mean": "ReduceMean", "max": "ReduceMax", "min": "ReduceMin"}

EXPORTS: dict[str, Callable[..., Any]] = {
    **{op: O.same(onnx_op) for op, onnx_op in _SAME.items()},
    **{op: O.reduce(onnx_op) for op, onnx_op in _REDUCE.items()},
    "ne": O.negated("Equal"),
    "rsqrt": O.rsqrt, "expm1": O.expm1, "log1p": O.log1p, "softplus": O.softplus, "silu": O.silu, "gelu": O.gelu,
    "clamp": O.clamp, "cast": O.cast,
    "reshape": O.view, "squeeze": O.view, "unsqueeze": O.view, "transpose": O.transpose, "permute": O.permute,
    "expand": O.expand, "slice": O.slice_, "concat": O.concat, "split": O.split,
    "linear": O.linear, "conv": O.conv, "embedding": O.embedding, "index_select": O.index_select, "gather": O.gather,
    "argmax": O.argmax, "softmax": O.softmax("Softmax"), "log_softmax": O.softmax("LogSoftmax"),
    "rms_norm": O.rms_norm, "layer_norm": O.layer_norm, "add_rms_norm": O.add_rms_norm,
    "add_layer_norm": O.add_layer_norm, "gated_activation": O.gated_activation, "rotary": O.rotary,
    "qkv_rotary": O.qkv_rotary, "full": O.full, "arange": O.arange,
    "attention": A.attention, "paged_attention": A.paged_attention,
}


def unexportable(node: Node) -> str | None:
    """Why ``node`` cannot be exported to ONNX, or None when it can."""
    for value in (*node.inputs, *node.results):
        if value is not None and value.dtype.name not in _DTYPES:
            return f"dtype {value.dtype.name} has no ONNX element type"
    if node.op not in EXPORTS:
        return f"op {node.op} has no ONNX form"
    if node.attrs.get("alibi_bias_max") is not None:
        return f"{node.op} with ALiBi biases (alibi_bias_max) has no ONNX form yet"
    if node.attrs.get("chunk_size") is not None:
        return f"{node.op} with chunked local attention (chunk_size) has no ONNX form yet"
    return None
