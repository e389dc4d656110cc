"""How each kiln op becomes TensorRT layers: one function per op or family, called as
``fn(nb, node, *operands, **attrs)`` with the operands as ``ITensor``s (a variadic one as
a list, a missing optional one as ``None``). ``table.py`` says which function lowers
which op; the LLM ops (attention over the linear KV cache) are in ``llm_layers.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ...ir import Node, dtypes
from .network import NetworkBuilder


def binary(op: str, negate: bool = False):
    """``x op y`` as one elementwise layer (then NOT for ``ne``, ``le``, ``ge``)."""
    def lower(nb: NetworkBuilder, node: Node, x: Any, y: Any) -> Any:
        out = nb.elementwise(op, x, y)
        return nb.unary("NOT", out) if negate else out
    return lower


def unary(op: str):
    def lower(nb: NetworkBuilder, node: Node, x: Any) -> Any:
        return nb.unary(op, x)
    return lower


def activation(kind: str):
    def lower(nb: NetworkBuilder, node: Node, x: Any, **attrs: Any) -> Any:
        return nb.activation(kind, x)
    return lower


def rsqrt(nb: NetworkBuilder, node: Node, x: Any) -> Any:
    return nb.unary("RECIP", nb.unary("SQRT", x))


def log1p(nb: NetworkBuilder, node: Node, x: Any) -> Any:
    """log(1 + x) without losing small x: ``log(u) * x / (u - 1)`` for ``u = 1 + x``, and x
    itself where ``u`` rounds to 1 (Goldberg's formula)."""
    u = nb.elementwise("SUM", x, nb.scalar(1.0, x))
    step = nb.elementwise("SUB", u, nb.scalar(1.0, x))
    exact = nb.elementwise("DIV", nb.elementwise("PROD", nb.unary("LOG", u), x), step)
    rounded = nb.elementwise("EQUAL", u, nb.scalar(1.0, x))
    return nb.out(nb.network.add_select(rounded, x, exact))


def silu(nb: NetworkBuilder, node: Node, x: Any) -> Any:
    return nb.elementwise("PROD", x, nb.activation("SIGMOID", x))


def gelu(nb: NetworkBuilder, node: Node, x: Any, approximate: str) -> Any:
    return nb.activation("GELU_TANH" if approximate == "tanh" else "GELU_ERF", x)


def clamp(nb: NetworkBuilder, node: Node, x: Any, min: float | None, max: float | None) -> Any:
    if min is not None:
        x = nb.elementwise("MAX", x, nb.scalar(min, x))
    if max is not None:
        x = nb.elementwise("MIN", x, nb.scalar(max, x))
    return x


def where(nb: NetworkBuilder, node: Node, cond: Any, x: Any, y: Any) -> Any:
    rank = max(len(cond.shape), len(x.shape), len(y.shape))
    return nb.out(nb.network.add_select(nb.with_rank(cond, rank), nb.with_rank(x, rank), nb.with_rank(y, rank)))


def cast(nb: NetworkBuilder, node: Node, x: Any, dtype: Any) -> Any:
    return nb.cast(x, dtype)


def view(nb: NetworkBuilder, node: Node, x: Any, **attrs: Any) -> Any:
    """reshape, squeeze, unsqueeze: a shuffle to the result's shape."""
    return nb.reshape(x, node.results[0].shape)


def transpose(nb: NetworkBuilder, node: Node, x: Any, dim0: int, dim1: int) -> Any:
    order = list(range(len(x.shape)))
    order[dim0], order[dim1] = order[dim1], order[dim0]
    return nb.permute(x, order)


def permute(nb: NetworkBuilder, node: Node, x: Any, dims: tuple[int, ...]) -> Any:
    return nb.permute(x, [d % len(x.shape) for d in dims])


def expand(nb: NetworkBuilder, node: Node, x: Any, shape: tuple) -> Any:
    """A slice with stride 0 along the dims of 1 that grow."""
    target = node.results[0].shape
    x = nb.with_rank(x, len(target))
    source = node.inputs[0].shape
    source = (1,) * (len(target) - len(source)) + tuple(source)
    strides = tuple(0 if s == 1 and t != 1 else 1 for s, t in zip(source, target))
    layer = nb.network.add_slice(x, (0,) * len(target), (1,) * len(target), strides)
    layer.set_input(2, nb.shape(target))
    return nb.out(layer)


def slice_(nb: NetworkBuilder, node: Node, x: Any, dim: int, start: Any, end: Any, step: int) -> Any:
    size = node.results[0].shape[dim]
    if isinstance(start, int) and start < 0:
        start = node.inputs[0].shape[dim] + start
    return nb.slice(x, dim % len(x.shape), start, size, step)


def concat(nb: NetworkBuilder, node: Node, inputs: list, dim: int) -> Any:
    layer = nb.network.add_concatenation(inputs)
    layer.axis = dim % len(inputs[0].shape)
    return nb.out(layer)


def split(nb: NetworkBuilder, node: Node, x: Any, dim: int, sizes: tuple) -> tuple:
    dim %= len(x.shape)
    outs, start = [], 0
    for size in sizes:
        outs.append(nb.slice(x, dim, start, size))
        start = start + size
    return tuple(outs)


def matmul(nb: NetworkBuilder, node: Node, a: Any, b: Any) -> Any:
    """``torch.matmul``: a 1-D operand is a vector (TensorRT's VECTOR operation), the
    batch dims of the others broadcast."""
    ops = nb.trt.module.MatrixOperation
    rank = max(len(a.shape), len(b.shape), 2)
    op_a, op_b = (ops.VECTOR if len(t.shape) == 1 else ops.NONE for t in (a, b))
    a = a if op_a == ops.VECTOR else nb.with_rank(a, rank if op_b == ops.NONE else len(a.shape))
    b = b if op_b == ops.VECTOR else nb.with_rank(b, rank if op_a == ops.NONE else len(b.shape))
    return nb.out(nb.network.add_matrix_multiply(a, op_a, b, op_b))


def linear(nb: NetworkBuilder, node: Node, x: Any, weight: Any, bias: Any) -> Any:
    """``x @ weight.T (+ bias)``: the weight is read transposed, not copied."""
    ops = nb.trt.module.MatrixOperation
    if len(x.shape) == 1:
        out = nb.out(nb.network.add_matrix_multiply(weight, ops.NONE, x, ops.VECTOR))
    else:
        out = nb.out(nb.network.add_matrix_multiply(x, ops.NONE, nb.with_rank(weight, len(x.shape)), ops.TRANSPOSE))
    return out if bias is None else nb.elementwise("SUM", out, bias)


def conv(nb: NetworkBuilder, node: Node, x: Any, weight: Any, bias: Any, stride: tuple, padding: tuple,
         dilation: tuple, groups: int) -> Any:
    """The convolution layer, its kernel (and bias) given as tensors; a 1-D convolution
    runs as a 2-D one over a trailing dim of 1 (TensorRT's needs two spatial dims)."""
    kernel = tuple(node.inputs[1].shape)
    one_d = len(kernel) == 3
    if one_d:
        x, weight = (nb.reshape(t, (*shape, 1)) for t, shape in ((x, node.inputs[0].shape), (weight, kernel)))
        kernel, stride, padding, dilation = (*kernel, 1), (*stride, 1), (*padding, 0), (*dilation, 1)
    empty = nb.trt.module.Weights(nb.trt_dtype_of(node.inputs[1]))
    layer = nb.network.add_convolution_nd(x, kernel[0], kernel[2:], empty, empty)
    layer.set_input(1, weight)
    if bias is not None:
        layer.set_input(2, bias)
    layer.stride_nd, layer.padding_nd, layer.dilation_nd, layer.num_groups = stride, padding, dilation, groups
    out = nb.out(layer)
    return nb.reshape(out, node.results[0].shape) if one_d else out


def embedding(nb: NetworkBuilder, node: Node, ids: Any, weight: Any) -> Any:
    return nb.out(nb.network.add_gather(weight, ids, 0))


def index_select(nb: NetworkBuilder, node: Node, x: Any, index: Any, dim: int) -> Any:
    return nb.out(nb.network.add_gather(x, index, dim % len(x.shape)))


def gather(nb: NetworkBuilder, node: Node, x: Any, index: Any, dim: int) -> Any:
    layer = nb.network.add_gather_v2(x, index, nb.trt.module.GatherMode.ELEMENT)
    layer.axis = dim % len(x.shape)
    return nb.out(layer)


def reduce(op: str):
    def lower(nb: NetworkBuilder, node: Node, x: Any, dims: tuple[int, ...], keepdim: bool) -> Any:
        mask = nb.axes_mask(dims, len(x.shape))
        return nb.out(nb.network.add_reduce(x, getattr(nb.trt.module.ReduceOperation, op), mask, keepdim))
    return lower


def argmax(nb: NetworkBuilder, node: Node, x: Any, dim: int, keepdim: bool) -> Any:
    """Top-1 indices along ``dim`` (a vector is made a row first: TensorRT's needs two dims)."""
    rank = len(x.shape)
    axis = dim % rank + max(0, 2 - rank)
    layer = nb.network.add_topk(nb.with_rank(x, 2), nb.trt.module.TopKOperation.MAX, 1, 1 << axis)
    indices = nb.cast(nb.out(layer, 1), node.results[0].dtype)
    return indices if keepdim and rank >= 2 else nb.reshape(indices, node.results[0].shape)


def softmax(nb: NetworkBuilder, node: Node, x: Any, dim: int) -> Any:
    """Softmax along ``dim`` (a vector is made a row first: TensorRT's needs two dims)."""
    rank = len(x.shape)
    layer = nb.network.add_softmax(nb.with_rank(x, 2))
    layer.axes = nb.axes_mask([dim % rank + max(0, 2 - rank)], max(rank, 2))
    out = nb.out(layer)
    return out if rank >= 2 else nb.reshape(out, node.results[0].shape)


def log_softmax(nb: NetworkBuilder, node: Node, x: Any, dim: int) -> Any:
    return nb.unary("LOG", softmax(nb, node, x, dim))


def rms_norm_of(nb: NetworkBuilder, x: Any, weight: Any, eps: float) -> Any:
    """``x * rsqrt(mean(x^2) + eps)`` in float32, cast back, then scaled (as Llama rounds)."""
    kind = x.dtype
    wide = nb.cast(x, dtypes.float32)
    last = 1 << (len(x.shape) - 1)
    square = nb.elementwise("PROD", wide, wide)
    mean = nb.out(nb.network.add_reduce(square, nb.trt.module.ReduceOperation.AVG, last, True))
    inv = nb.unary("RECIP", nb.unary("SQRT", nb.elementwise("SUM", mean, nb.scalar(eps, mean))))
    normed = nb.elementwise("PROD", wide, inv)
    normed = normed if kind == wide.dtype else nb.out(nb.network.add_cast(normed, kind))
    return normed if weight is None else nb.elementwise("PROD", normed, weight)


def rms_norm(nb: NetworkBuilder, node: Node, x: Any, weight: Any, eps: float) -> Any:
    return rms_norm_of(nb, x, weight, eps)


def layer_norm_of(nb: NetworkBuilder, x: Any, weight: Any, bias: Any, eps: float) -> Any:
    """The native normalization layer over the last dim (scale 1 and bias 0 when absent)."""
    features = x.shape[-1]
    dtype = nb.torch_dtype(x)
    weight = weight if weight is not None else nb.constant(torch.ones(features, dtype=dtype))
    bias = bias if bias is not None else nb.constant(torch.zeros(features, dtype=dtype))
    rank = len(x.shape)
    layer = nb.network.add_normalization(x, nb.with_rank(weight, rank), nb.with_rank(bias, rank), 1 << (rank - 1))
    layer.epsilon = eps
    return nb.out(layer)


def layer_norm(nb: NetworkBuilder, node: Node, x: Any, weight: Any, bias: Any, eps: float) -> Any:
    return layer_norm_of(nb, x, weight, bias, eps)


def add_rms_norm(nb: NetworkBuilder, node: Node, x: Any, residual: Any, weight: Any, eps: float) -> tuple:
    total = nb.elementwise("SUM", x, residual)
    return rms_norm_of(nb, total, weight, eps), total


def add_layer_norm(nb: NetworkBuilder, node: Node, x: Any, residual: Any, weight: Any, bias: Any,
                   eps: float) -> tuple:
    total = nb.elementwise("SUM", x, residual)
    return layer_norm_of(nb, total, weight, bias, eps), total


def gated_activation(nb: NetworkBuilder, node: Node, x: Any, activation: str) -> Any:
    half = node.results[0].shape[-1]
    last = len(x.shape) - 1
    gate, up = nb.slice(x, last, 0, half), nb.slice(x, last, half, half)
    acts = {"silu": lambda t: silu(nb, node, t), "gelu": lambda t: nb.activation("GELU_ERF", t),
            "gelu_tanh": lambda t: nb.activation("GELU_TANH", t)}
    return nb.elementwise("PROD", acts[activation](gate), up)


def rotary_of(nb: NetworkBuilder, x: Any, cos: Any, sin: Any, rotated: int, interleaved: bool,
              head_dim: int) -> Any:
    """Rotary embedding of the first ``rotated`` features of ``x``'s last dim; the rest pass through."""
    last = len(x.shape) - 1
    head = nb.slice(x, last, 0, rotated) if rotated < head_dim else x
    if interleaved:
        even, odd = nb.slice(head, last, 0, rotated // 2, 2), nb.slice(head, last, 1, rotated // 2, 2)
        pairs = [nb.reshape_last(t, (rotated // 2, 1)) for t in (nb.unary("NEG", odd), even)]
        rotated_half = nb.reshape_last(concat(nb, None, pairs, -1), (rotated,), replaced=2)
    else:
        first, second = nb.slice(head, last, 0, rotated // 2), nb.slice(head, last, rotated // 2, rotated // 2)
        rotated_half = concat(nb, None, [nb.unary("NEG", second), first], -1)
    out = nb.elementwise("SUM", nb.elementwise("PROD", head, cos), nb.elementwise("PROD", rotated_half, sin))
    if rotated < head_dim:
        out = concat(nb, None, [out, nb.slice(x, last, rotated, head_dim - rotated)], -1)
    return out


def rotary(nb: NetworkBuilder, node: Node, x: Any, cos: Any, sin: Any, interleaved: bool) -> Any:
    return rotary_of(nb, x, cos, sin, node.inputs[1].shape[-1], interleaved, node.inputs[0].shape[-1])


def qkv_rotary(nb: NetworkBuilder, node: Node, qkv: Any, cos: Any, sin: Any, q_heads: int, kv_heads: int,
               head_dim: int, interleaved: bool) -> tuple:
    """The fused projection split into [tokens, heads, head_dim] q, k, v, with rotary on q and k."""
    tokens = node.results[0].shape[0]
    heads = nb.reshape(qkv, (tokens, q_heads + 2 * kv_heads, head_dim))
    q, k, v = (nb.slice(heads, 1, start, count)
               for start, count in ((0, q_heads), (q_heads, kv_heads), (q_heads + kv_heads, kv_heads)))
    cos_shape = node.inputs[1].shape
    rows = math.prod(cos_shape[:-2]) if len(cos_shape) > 2 else 1
    cos, sin = (nb.reshape(t, (rows, 1, cos_shape[-1])) for t in (cos, sin))
    q, k = (rotary_of(nb, t, cos, sin, cos_shape[-1], interleaved, head_dim) for t in (q, k))
    return q, k, v


def full(nb: NetworkBuilder, node: Node, shape: tuple, value: float, dtype: Any) -> Any:
    result = node.results[0]
    one = nb.constant(torch.full((1,) * len(result.shape), value, dtype=dtype.torch_dtype))
    layer = nb.network.add_slice(one, (0,) * len(result.shape), (1,) * len(result.shape), (0,) * len(result.shape))
    layer.set_input(2, nb.shape(result.shape))
    return nb.out(layer)


def arange(nb: NetworkBuilder, node: Node, end: Any, start: int, step: int, dtype: Any) -> Any:
    result = node.results[0]
    layer = nb.network.add_fill((1,), nb.trt.module.FillOperation.LINSPACE, nb.trt.module.int64)
    layer.set_input(0, nb.shape(result.shape))
    layer.set_input(1, nb.constant(torch.tensor(start, dtype=torch.int64)))
    layer.set_input(2, nb.constant(torch.tensor([step], dtype=torch.int64)))
    return nb.cast(nb.out(layer), dtype)


def scale_query(nb: NetworkBuilder, q: Any, scale: float | None, head_dim: int) -> Any:
    """q times the attention scale (1/sqrt(head_dim) unless given): TensorRT's attention
    layer computes softmax(q k^T) v and leaves the scaling to its inputs."""
    return nb.elementwise("PROD", q, nb.scalar(1 / math.sqrt(max(head_dim, 1)) if scale is None else scale, q))
