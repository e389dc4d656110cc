"""How each kiln op becomes standard ONNX ops: one function per op or family, called as
``fn(ob, node, *operands, **attrs)`` with operands as onnx-graphsurgeon tensors. The
table ``EXPORTS`` (in ``table.py``) says which function exports which op."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ...ir import Node, dtypes
from .builder import OnnxBuilder, onnx_dtype


def same(op: str, **fixed: Any):
    """A kiln op that is one ONNX op of the same operands."""
    def export(ob: OnnxBuilder, node: Node, *operands: Any) -> Any:
        return ob.op(op, list(operands), **fixed)
    return export


def negated(op: str):
    def export(ob: OnnxBuilder, node: Node, x: Any, y: Any) -> Any:
        return ob.op("Not", [ob.op(op, [x, y])])
    return export


def rsqrt(ob: OnnxBuilder, node: Node, x: Any) -> Any:
    return ob.op("Reciprocal", [ob.op("Sqrt", [x])])


def expm1(ob: OnnxBuilder, node: Node, x: Any) -> Any:
    return ob.op("Sub", [ob.op("Exp", [x]), ob.scalar(1.0, node.inputs[0].dtype)])


def log1p(ob: OnnxBuilder, node: Node, x: Any) -> Any:
    """log(1 + x) without losing small x: ``log(u) * x / (u - 1)`` for ``u = 1 + x``, and x
    itself where ``u`` rounds to 1 (Goldberg's formula)."""
    one = ob.scalar(1.0, node.inputs[0].dtype)
    u = ob.op("Add", [x, one])
    exact = ob.op("Div", [ob.op("Mul", [ob.op("Log", [u]), x]), ob.op("Sub", [u, one])])
    return ob.op("Where", [ob.op("Equal", [u, one]), x, exact])


def softplus(ob: OnnxBuilder, node: Node, x: Any, beta: float, threshold: float) -> Any:
    """log(1 + exp(beta x)) / beta, and x itself where beta x > threshold (as torch)."""
    dtype = node.inputs[0].dtype
    scaled = ob.op("Mul", [x, ob.scalar(beta, dtype)])
    smooth = ob.op("Div", [ob.op("Softplus", [scaled]), ob.scalar(beta, dtype)])
    return ob.op("Where", [ob.op("Greater", [scaled, ob.scalar(threshold, dtype)]), x, smooth])


def silu(ob: OnnxBuilder, node: Node, x: Any) -> Any:
    return ob.op("Mul", [x, ob.op("Sigmoid", [x])])


def gelu(ob: OnnxBuilder, node: Node, x: Any, approximate: str) -> Any:
    return ob.op("Gelu", [x], approximate=approximate)


def clamp(ob: OnnxBuilder, node: Node, x: Any, min: float | None, max: float | None) -> Any:
    dtype = node.inputs[0].dtype
    if min is not None:
        x = ob.op("Max", [x, ob.scalar(min, dtype)])
    if max is not None:
        x = ob.op("Min", [x, ob.scalar(max, dtype)])
    return x


def cast(ob: OnnxBuilder, node: Node, x: Any, dtype: Any) -> Any:
    return ob.cast(x, dtype)


def view(ob: OnnxBuilder, node: Node, x: Any, **attrs: Any) -> Any:
    """reshape, squeeze, unsqueeze: a Reshape to the result's shape."""
    return ob.reshape(x, node.results[0].shape)


def transpose(ob: OnnxBuilder, node: Node, x: Any, dim0: int, dim1: int) -> Any:
    order = list(range(len(node.inputs[0].shape)))
    order[dim0], order[dim1] = order[dim1], order[dim0]
    return ob.op("Transpose", [x], perm=order)


def permute(ob: OnnxBuilder, node: Node, x: Any, dims: tuple[int, ...]) -> Any:
    return ob.op("Transpose", [x], perm=[d % len(dims) for d in dims])


def expand(ob: OnnxBuilder, node: Node, x: Any, shape: tuple) -> Any:
    return ob.op("Expand", [x, ob.shape(node.results[0].shape)])


def slice_(ob: OnnxBuilder, node: Node, x: Any, dim: int, start: Any, end: Any, step: int) -> Any:
    size = node.inputs[0].shape[dim]
    if isinstance(end, int) and isinstance(size, int):
        end = min(end, size)
    elif isinstance(end, int) and end >= 2**62:
        end = size
    return ob.slice(x, dim, start, end, step)


def concat(ob: OnnxBuilder, node: Node, inputs: list, dim: int) -> Any:
    return ob.op("Concat", inputs, axis=dim)


def split(ob: OnnxBuilder, node: Node, x: Any, dim: int, sizes: tuple) -> tuple:
    return ob.op("Split", [x, ob.shape(sizes)], outputs=len(sizes), axis=dim)


def linear(ob: OnnxBuilder, node: Node, x: Any, weight: Any, bias: Any) -> Any:
    out = ob.op("MatMul", [x, ob.op("Transpose", [weight], perm=[1, 0])])
    return out if bias is None else ob.op("Add", [out, bias])


def conv(ob: OnnxBuilder, node: Node, x: Any, weight: Any, bias: Any, stride: tuple, padding: tuple,
         dilation: tuple, groups: int) -> Any:
    inputs = [x, weight] if bias is None else [x, weight, bias]
    return ob.op("Conv", inputs, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
                 group=groups)


def embedding(ob: OnnxBuilder, node: Node, ids: Any, weight: Any) -> Any:
    return ob.op("Gather", [weight, ids], axis=0)


def index_select(ob: OnnxBuilder, node: Node, x: Any, index: Any, dim: int) -> Any:
    return ob.op("Gather", [x, index], axis=dim)


def gather(ob: OnnxBuilder, node: Node, x: Any, index: Any, dim: int) -> Any:
    return ob.op("GatherElements", [x, index], axis=dim)


def reduce(op: str):
    def export(ob: OnnxBuilder, node: Node, x: Any, dims: tuple[int, ...], keepdim: bool) -> Any:
        return ob.op(op, [x, ob.ints(list(dims))], keepdims=int(keepdim))
    return export


def argmax(ob: OnnxBuilder, node: Node, x: Any, dim: int, keepdim: bool) -> Any:
    return ob.op("ArgMax", [x], axis=dim, keepdims=int(keepdim))


def softmax(op: str):
    def export(ob: OnnxBuilder, node: Node, x: Any, dim: int) -> Any:
        return ob.op(op, [x], axis=dim)
    return export


def rms_norm_of(ob: OnnxBuilder, x: Any, weight: Any, eps: float, dtype: Any, features: int) -> Any:
    """ONNX's ``RMSNormalization`` (opset 23) over the last dim, computed in float32."""
    weight = weight if weight is not None else ob.const(torch.ones(features, dtype=dtype.torch_dtype))
    return ob.op("RMSNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)


def rms_norm(ob: OnnxBuilder, node: Node, x: Any, weight: Any, eps: float) -> Any:
    value = node.inputs[0]
    return rms_norm_of(ob, x, weight, eps, value.dtype, value.shape[-1])


def layer_norm_of(ob: OnnxBuilder, x: Any, weight: Any, bias: Any, eps: float, dtype: Any, features: int) -> Any:
    weight = weight if weight is not None else ob.const(torch.ones(features, dtype=dtype.torch_dtype))
    inputs = [x, weight] if bias is None else [x, weight, bias]
    return ob.op("LayerNormalization", inputs, axis=-1, epsilon=eps)


def layer_norm(ob: OnnxBuilder, node: Node, x: Any, weight: Any, bias: Any, eps: float) -> Any:
    value = node.inputs[0]
    return layer_norm_of(ob, x, weight, bias, eps, value.dtype, value.shape[-1])


def add_rms_norm(ob: OnnxBuilder, node: Node, x: Any, residual: Any, weight: Any, eps: float) -> tuple:
    total = ob.op("Add", [x, residual])
    value = node.inputs[0]
    return rms_norm_of(ob, total, weight, eps, value.dtype, value.shape[-1]), total


def add_layer_norm(ob: OnnxBuilder, node: Node, x: Any, residual: Any, weight: Any, bias: Any, eps: float) -> tuple:
    total = ob.op("Add", [x, residual])
    value = node.inputs[0]
    return layer_norm_of(ob, total, weight, bias, eps, value.dtype, value.shape[-1]), total


def gated_activation(ob: OnnxBuilder, node: Node, x: Any, activation: str) -> Any:
    half = node.results[0].shape[-1]
    gate, up = ob.op("Split", [x, ob.ints([half, half])], outputs=2, axis=-1)
    act = {"silu": lambda t: silu(ob, node, t), "gelu": lambda t: ob.op("Gelu", [t]),
           "gelu_tanh": lambda t: ob.op("Gelu", [t], approximate="tanh")}[activation]
    return ob.op("Mul", [act(gate), up])


def rotary_of(ob: OnnxBuilder, x: Any, cos: Any, sin: Any, rotated: int, head_dim: int, interleaved: bool) -> Any:
    """Rotary embedding of the first ``rotated`` features of the last dim, in standard ops:
    kiln's cos and sin are full-width and may hold anything, which ONNX's
    ``RotaryEmbedding`` (a half-width cache) cannot take."""
    head, rest = (ob.op("Split", [x, ob.ints([rotated, head_dim - rotated])], outputs=2, axis=-1)
                  if rotated < head_dim else (x, None))
    if interleaved:
        even = ob.slice(head, -1, 0, rotated, 2)
        odd = ob.slice(head, -1, 1, rotated, 2)
        stacked = ob.op("Concat", [ob.op("Unsqueeze", [ob.op("Neg", [odd]), ob.ints([-1])]),
                                   ob.op("Unsqueeze", [even, ob.ints([-1])])], axis=-1)
        shape = ob.op("Shape", [head])
        turned = ob.op("Reshape", [stacked, shape])
    else:
        first, second = ob.op("Split", [head, ob.ints([rotated // 2, rotated // 2])], outputs=2, axis=-1)
        turned = ob.op("Concat", [ob.op("Neg", [second]), first], axis=-1)
    out = ob.op("Add", [ob.op("Mul", [head, cos]), ob.op("Mul", [turned, sin])])
    return out if rest is None else ob.op("Concat", [out, rest], axis=-1)


def rotary(ob: OnnxBuilder, node: Node, x: Any, cos: Any, sin: Any, interleaved: bool) -> Any:
    return rotary_of(ob, x, cos, sin, node.inputs[1].shape[-1], node.inputs[0].shape[-1], interleaved)


def qkv_rotary(ob: OnnxBuilder, node: Node, qkv: Any, cos: Any, sin: Any, q_heads: int, kv_heads: int,
               head_dim: int, interleaved: bool) -> tuple:
    tokens = node.results[0].shape[0]
    heads = ob.reshape(qkv, (tokens, q_heads + 2 * kv_heads, head_dim))
    q, k, v = ob.op("Split", [heads, ob.ints([q_heads, kv_heads, kv_heads])], outputs=3, axis=1)
    cos_shape = node.inputs[1].shape
    rows = math.prod(cos_shape[:-2]) if len(cos_shape) > 2 else 1
    cos, sin = (ob.reshape(t, (rows, 1, cos_shape[-1])) for t in (cos, sin))
    q, k = (rotary_of(ob, t, cos, sin, cos_shape[-1], head_dim, interleaved) for t in (q, k))
    return q, k, v


def full(ob: OnnxBuilder, node: Node, shape: tuple, value: float, dtype: Any) -> Any:
    one = ob.const(np.asarray(torch.tensor([value], dtype=dtype.torch_dtype).numpy()))
    return ob.op("Expand", [one, ob.shape(node.results[0].shape)])


def arange(ob: OnnxBuilder, node: Node, end: Any, start: int, step: int, dtype: Any) -> Any:
    scalar = ob.op("Squeeze", [ob.dim(end), ob.ints([0])])
    out = ob.op("Range", [ob.const(np.asarray(start, np.int64)), scalar, ob.const(np.asarray(step, np.int64))])
    return out if dtype == dtypes.int64 else ob.op("Cast", [out], to=onnx_dtype(dtype))
