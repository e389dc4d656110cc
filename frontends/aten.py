"""The one place that knows ATen: how each ATen op that torch.export leaves becomes kiln ops.

``CONVERTERS`` maps an op's name as torch prints it (``aten.linear.default``) to a function
``(cx, *args, **kwargs) -> Value | tuple``; tensor arguments arrive as kiln values and
symbolic sizes as kiln dims. ``cx`` (a ``Conversion``) knows the dtype torch computed for
the node's result, so converters follow torch's type promotion by casting operands to it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..ir import DType, Graph, Value, dtypes, ops
from ..ir.shapes import broadcast_shapes
from .scatter import SCATTER_CONVERTERS

Converter = Callable[..., Any]


@dataclass
class Conversion:
    """What a converter may know about the node it converts."""

    graph: Graph
    result_dtype: DType | None  # of the (first) result, from torch's fake tensor
    location: str | None

    def value(self, x: Any, dtype: DType | None = None) -> Value:
        """``x`` as a kiln value of ``dtype`` (a Python number becomes a 0-d constant)."""
        dtype = dtype or self.result_dtype or dtypes.float32
        if isinstance(x, Value):
            return x if x.dtype == dtype else ops.cast(x, dtype=dtype)
        return self.graph.scalar(x, dtype)

    def promote(self, *args: Any) -> list[Value]:
        """Operands cast to the dtype torch promotes them to (for comparisons)."""
        tensors = [a for a in args if isinstance(a, Value)]
        common = tensors[0].dtype
        for t in tensors[1:]:
            common = dtypes.dtype(torch.promote_types(common.torch_dtype, t.dtype.torch_dtype))
        if any(isinstance(a, float) for a in args) and not common.is_float:
            common = dtypes.float32
        return [self.value(a, common) for a in args]


def _arithmetic(op: str) -> Converter:
    def convert(cx: Conversion, x: Any, y: Any, alpha: float = 1) -> Value:
        if alpha != 1:
            y = ops.mul(cx.value(y), cx.value(alpha))
        return ops.call(op, cx.value(x), cx.value(y))
    return convert


def _compare(op: str) -> Converter:
    def convert(cx: Conversion, x: Any, y: Any) -> Value:
        return ops.call(op, *cx.promote(x, y))
    return convert


def _unary(op: str) -> Converter:
    return lambda cx, x: ops.call(op, cx.value(x))


def _identity(cx: Conversion, x: Value, *args: Any, **kwargs: Any) -> Value:
    return x


def _cast(cx: Conversion, x: Value, *args: Any, **kwargs: Any) -> Value:
    return cx.value(x)


def _pow(cx: Conversion, x: Any, exponent: Any) -> Value:
    return ops.pow(cx.value(x), cx.value(exponent))


def _reduce(op: str) -> Converter:
    def convert(cx: Conversion, x: Value, dims: Sequence[int] | int | None = None, keepdim: bool = False,
                dtype: Any = None) -> Value:
        if dims is None or (isinstance(dims, Sequence) and not dims):
            dims = tuple(range(x.type.rank))
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        return cx.value(ops.call(op, cx.value(x) if op == "mean" else x, dims=dims, keepdim=keepdim))
    return convert


def _slice(cx: Conversion, x: Value, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> Value:
    from ..ir.opdefs.shape import END

    return ops.slice(x, dim=dim, start=0 if start is None else start, end=END if end is None else end, step=step)


def _softmax(cx: Conversion, x: Value, dim: int, *rest: Any, **kwargs: Any) -> Value:
    return cx.value(ops.softmax(cx.value(x), dim=dim))


def _sdpa(cx: Conversion, q: Value, k: Value, v: Value, attn_mask: Value | None = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Value:
    return ops.attention(q, k, v, attn_mask, scale=scale, causal=is_causal)


def _kiln_attention(cx: Conversion, q: Value, k: Value, v: Value, scale: float, causal: bool,
                    sliding_window: int, softcap: float, chunk_size: int) -> Value:
    return ops.attention(q, k, v, scale=scale, causal=causal, sliding_window=sliding_window or None,
                         softcap=softcap or None, chunk_size=chunk_size or None)


def _layer_norm(cx: Conversion, x: Value, shape: Sequence[int], weight: Value | None = None,
                bias: Value | None = None, eps: float = 1e-5, *rest: Any) -> Value:
    if len(shape) != 1:
        raise NotImplementedError("layer_norm over more than the last dim")
    return ops.layer_norm(x, weight, bias, eps=eps)


def _native_layer_norm(cx: Conversion, x: Value, shape: Sequence[int], weight: Value | None,
                       bias: Value | None, eps: float) -> tuple[Value, Value, Value]:
    """Core ATen's layer norm, with the mean and reciprocal std it also returns."""
    out = _layer_norm(cx, x, shape, weight, bias, eps)
    mean = ops.mean(x, dims=(-1,), keepdim=True)
    centered = ops.sub(x, mean)
    variance = ops.mean(ops.mul(centered, centered), dims=(-1,), keepdim=True)
    return out, mean, ops.rsqrt(ops.add(variance, cx.value(eps)))


def _matmul(cx: Conversion, a: Value, b: Value) -> Value:
    """``a @ w.T`` of a 2-D constant ``w`` is a ``linear`` (Falcon's layers); else a matmul."""
    source = b.producer
    if source is not None and source.op == "permute" and source.attrs["dims"] == (1, 0) \
            and source.inputs[0].is_constant:
        return ops.linear(a, source.inputs[0])
    return ops.matmul(a, b)


def _addmm(cx: Conversion, bias: Value, a: Value, b: Value, beta: float = 1, alpha: float = 1) -> Value:
    if beta != 1 or alpha != 1:
        raise NotImplementedError("addmm with alpha or beta other than 1")
    return ops.add(ops.matmul(a, b), bias)


def _split(cx: Conversion, x: Value, split: int | Sequence[Any], dim: int = 0) -> tuple[Value, ...]:
    size = x.shape[dim]
    sizes = split if isinstance(split, Sequence) else \
        [split] * (size // split) + ([size % split] if size % split else [])
    return ops.split(x, dim=dim, sizes=tuple(sizes))


def _chunk(cx: Conversion, x: Value, chunks: int, dim: int = 0) -> tuple[Value, ...]:
    size = x.shape[dim]
    step = -(-size // chunks)
    return _split(cx, x, step, dim)


def _arange(cx: Conversion, *args: Any, **kwargs: Any) -> Value:
    start, end, step = (0, args[0], 1) if len(args) == 1 else (*args, 1)[:3]
    return ops.arange(graph=cx.graph, end=end, start=start, step=step, dtype=cx.result_dtype)


def _full(cx: Conversion, size: Sequence[Any], value: Any, **kwargs: Any) -> Value:
    return ops.full(graph=cx.graph, shape=tuple(size), value=float(value), dtype=cx.result_dtype)


def _filled(value: float) -> Converter:
    return lambda cx, size, **kwargs: ops.full(graph=cx.graph, shape=tuple(size), value=value,
                                               dtype=cx.result_dtype)


def _where(cx: Conversion, cond: Value, x: Any, y: Any) -> Value:
    return ops.where(cond, cx.value(x), cx.value(y))


def _masked_fill(cx: Conversion, x: Value, mask: Value, value: Any) -> Value:
    return ops.where(mask, cx.value(value), x)


def _getitem(cx: Conversion, values: Sequence[Value], index: int) -> Value:
    return values[index]


def _view(cx: Conversion, x: Value, shape: Sequence[Any]) -> Value:
    return ops.reshape(x, shape=tuple(shape))


def _flatten(cx: Conversion, x: Value, start: int = 0, end: int = -1) -> Value:
    rank = x.type.rank
    start, end = start % rank, end % rank
    return ops.reshape(x, shape=(*x.shape[:start], -1, *x.shape[end + 1:]))


def _unflatten(cx: Conversion, x: Value, dim: int, sizes: Sequence[Any]) -> Value:
    dim %= x.type.rank
    return ops.reshape(x, shape=(*x.shape[:dim], *sizes, *x.shape[dim + 1:]))


def _select(cx: Conversion, x: Value, dim: int, index: int) -> Value:
    dim %= x.type.rank
    if index < 0:
        if not isinstance(x.shape[dim], int):
            raise NotImplementedError("select of a negative index along a symbolic dim")
        index += x.shape[dim]
    return ops.squeeze(ops.slice(x, dim=dim, start=index, end=index + 1), dim=dim)


def _t(cx: Conversion, x: Value) -> Value:
    return ops.transpose(x, dim0=0, dim1=1) if x.type.rank == 2 else x


def _expand(cx: Conversion, x: Value, sizes: Sequence[Any], **kwargs: Any) -> Value:
    return ops.expand(x, shape=tuple(sizes))


def _squeeze(cx: Conversion, x: Value, dim: Any = None) -> Value:
    dims = range(x.type.rank) if dim is None else ([dim] if isinstance(dim, int) else dim)
    for d in sorted((d % x.type.rank for d in dims), reverse=True):
        if x.shape[d] == 1:
            x = ops.squeeze(x, dim=d)
    return x


def _stack(cx: Conversion, tensors: Sequence[Value], dim: int = 0) -> Value:
    rank = tensors[0].type.rank + 1
    return ops.concat([ops.unsqueeze(cx.value(t), dim=dim % rank) for t in tensors], dim=dim % rank)


def _repeat_interleave(cx: Conversion, x: Value, repeats: int, dim: int | None = None, **kwargs: Any) -> Value:
    if not isinstance(repeats, int):
        raise NotImplementedError("repeat_interleave with a tensor of repeats")
    if dim is None:
        x, dim = ops.reshape(x, shape=(-1,)), 0
    dim %= x.type.rank
    shape = list(x.shape)
    tiled = ops.expand(ops.unsqueeze(x, dim=dim + 1), shape=(*shape[:dim + 1], repeats, *shape[dim + 1:]))
    return ops.reshape(tiled, shape=(*shape[:dim], shape[dim] * repeats, *shape[dim + 1:]))


def _cumsum(cx: Conversion, x: Value, dim: int, dtype: Any = None) -> Value:
    """Counting along a mask of ones (OPT's positions when no tokens are padded) is
    ``arange + 1``; another cumulative sum is a product with a triangle of ones, fit for the
    short position bookkeeping it serves (Falcon's mask counts sequence starts this way)."""
    source = x.producer
    while source is not None and source.op == "cast":
        source = source.inputs[0].producer
    dim %= x.type.rank
    if source is None or source.op != "full" or source.attrs["value"] != 1.0:
        return _cumsum_by_triangle(cx, x, dim)
    counts = ops.add(ops.arange(graph=cx.graph, end=x.shape[dim], dtype=cx.result_dtype), cx.value(1))
    along = [x.shape[dim] if i == dim else 1 for i in range(x.type.rank)]
    return ops.expand(ops.reshape(counts, shape=tuple(along)), shape=x.shape)


def _cumsum_by_triangle(cx: Conversion, x: Value, dim: int) -> Value:
    positions = ops.arange(graph=cx.graph, end=x.shape[dim], dtype=dtypes.int64)
    upper = ops.le(ops.unsqueeze(positions, dim=1), ops.unsqueeze(positions, dim=0))  # [j, i]: j <= i
    last = x.type.rank - 1
    moved = ops.transpose(cx.value(x, dtypes.float32), dim0=dim, dim1=last)  # counts stay exact below 2**24
    summed = ops.matmul(moved, cx.value(upper, dtypes.float32))
    return cx.value(ops.transpose(summed, dim0=dim, dim1=last))


def _topk(cx: Conversion, x: Value, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> tuple:
    if not largest:
        raise NotImplementedError("topk of the smallest values")
    return ops.topk(x, k=k, dim=dim)  # always sorted, which is one valid order when torch was not asked to sort


def _max_dim(cx: Conversion, x: Value, dim: int, keepdim: bool = False) -> tuple[Value, Value]:
    """The largest values along ``dim`` and their indices (DeepSeek-V2's group scores, PhiMoE's router)."""
    return ops.max(x, dims=(dim,), keepdim=keepdim), ops.argmax(x, dim=dim, keepdim=keepdim)


def _kiln_experts(cx: Conversion, x: Value, weights: Value, indices: Value, gate_up: Value, down: Value,
                  activation: str) -> Value:
    return ops.moe_experts(x, weights, indices, gate_up, down, activation=activation)


def _clamp(cx: Conversion, x: Value, min: float | None = None, max: float | None = None) -> Value:
    return ops.clamp(x, min=min, max=max)


def _clamp_tensor(cx: Conversion, x: Value, min: Value | None = None, max: Value | None = None) -> Value:
    """``x`` clamped by tensors (PhiMoE's router: ``scores.abs().clamp(min=threshold)``)."""
    if min is not None:
        x = ops.maximum(*cx.promote(x, min))
    if max is not None:
        x = ops.minimum(*cx.promote(x, max))
    return x


def _gelu(cx: Conversion, x: Value, approximate: str = "none") -> Value:
    return ops.gelu(x, approximate=approximate)


def _baddbmm(cx: Conversion, bias: Value, a: Value, b: Value, beta: float = 1, alpha: float = 1) -> Value:
    """``beta * bias + alpha * (a @ b)`` (BLOOM's attention scores with their ALiBi bias)."""
    product = ops.matmul(a, b)
    if alpha != 1:
        product = ops.mul(product, cx.value(alpha))
    return ops.add(product, bias if beta == 1 else ops.mul(bias, cx.value(beta)))


def _repeat(cx: Conversion, x: Value, repeats: Sequence[Any]) -> Value:
    """Tile ``x``: each dim ``i`` repeated ``repeats[i]`` times (leading repeats add dims)."""
    x = ops.reshape(x, shape=(*[1] * (len(repeats) - x.type.rank), *x.shape))
    tiled = ops.expand(ops.reshape(x, shape=tuple(d for size in x.shape for d in (1, size))),
                       shape=tuple(d for pair in zip(repeats, x.shape) for d in pair))
    return ops.reshape(tiled, shape=tuple(r * size for r, size in zip(repeats, x.shape)))


def _diff(cx: Conversion, x: Value, n: int = 1, dim: int = -1, prepend: Value | None = None,
          append: Value | None = None) -> Value:
    """``x[1:] - x[:-1]`` along ``dim``, after ``prepend`` and before ``append``."""
    from ..ir.opdefs.shape import END

    if n != 1 or x.dtype.kind == "bool":
        raise NotImplementedError("diff of order other than 1, or of booleans")
    whole = ops.concat([cx.value(t) for t in (prepend, x, append) if t is not None], dim=dim)
    return ops.sub(ops.slice(whole, dim=dim, start=1, end=END), ops.slice(whole, dim=dim, start=0, end=-1))


def _index(cx: Conversion, x: Value, indices: Sequence[Value | None]) -> Value:
    """Advanced indexing in the two forms Falcon uses: ``x[..., [i, j]]``, constant indices
    along one dim (its multi-query key and value heads), an ``index_select``; and
    ``x[rows, cols]`` of a 2-D ``x`` by two broadcasting index tensors (its mask reads each
    batch row's positions so), the rows looked up, then a gather of the columns."""
    along = [d for d, i in enumerate(indices) if i is not None]
    if len(along) == 1 and indices[along[0]].type.rank == 1 and indices[along[0]].is_constant \
            and isinstance(x.shape[along[0]], int):
        dim = along[0]
        index = cx.graph.add_constant(indices[dim].tensor() % x.shape[dim], name="index")
        return ops.index_select(x, index, dim=dim)
    if x.type.rank != 2 or len(indices) != 2 or any(i is None or not i.dtype.is_integer for i in indices):
        raise NotImplementedError("indexing other than by constants along one dim, or a 2-D tensor by two "
                                  "integer index tensors")
    shape = broadcast_shapes(*(i.shape for i in indices))
    rows, cols = (ops.expand(ops.reshape(i, shape=(*[1] * (len(shape) - i.type.rank), *i.shape)), shape=shape)
                  for i in indices)
    picked = ops.gather(ops.embedding(rows, x), ops.unsqueeze(cols, dim=-1), dim=-1)
    return ops.squeeze(picked, dim=-1)


def _conv(spatial: int) -> Converter:
    def convert(cx: Conversion, x: Value, weight: Value, bias: Value | None = None, stride: Any = 1,
                padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Value:
        if isinstance(padding, str):
            raise NotImplementedError(f"conv padding {padding!r} (kiln takes explicit padding)")
        per_dim = [tuple(a) if isinstance(a, (list, tuple)) else (a,) * spatial for a in (stride, padding, dilation)]
        return ops.conv(x, weight, bias, stride=per_dim[0], padding=per_dim[1], dilation=per_dim[2], groups=groups)
    return convert


def _bitwise_not(cx: Conversion, x: Value) -> Value:
    if x.dtype != dtypes.bool_:
        raise NotImplementedError("bitwise_not of integers")
    return ops.logical_not(x)


CONVERTERS: dict[str, Converter] = {
    **{f"aten.{name}.Tensor": _arithmetic(name) for name in ("add", "sub", "mul", "div", "maximum", "minimum")},
    **{f"aten.{name}.Scalar": _arithmetic(name) for name in ("add", "sub", "mul", "div")},
    **{f"aten.{name}.{kind}": _compare(name) for name in ("eq", "ne", "lt", "le", "gt", "ge")
       for kind in ("Tensor", "Scalar")},
    "aten.logical_and.default": lambda cx, x, y: ops.logical_and(x, y),
    "aten.logical_or.default": lambda cx, x, y: ops.logical_or(x, y),
    "aten.logical_not.default": lambda cx, x: ops.logical_not(x),
    "aten.__and__.Tensor": lambda cx, x, y: ops.logical_and(x, y),
    "aten.__or__.Tensor": lambda cx, x, y: ops.logical_or(x, y),
    **{f"aten.{name}.default": _unary(name) for name in
       ("neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "erf", "sigmoid",
        "relu", "silu", "expm1", "log1p", "floor")},
    "aten.softplus.default": lambda cx, x, beta=1.0, threshold=20.0: ops.softplus(x, beta=beta, threshold=threshold),
    "aten.min.other": lambda cx, x, y: ops.minimum(*cx.promote(x, y)),
    "aten.max.other": lambda cx, x, y: ops.maximum(*cx.promote(x, y)),
    "aten.gelu.default": _gelu,
    "aten.square.default": lambda cx, x: ops.mul(x, x),
    "aten.pow.Tensor_Scalar": _pow,
    "aten.pow.Tensor_Tensor": _pow,
    "aten.clamp.default": _clamp,
    "aten.clamp.Tensor": _clamp_tensor,
    "aten.where.self": _where,
    "aten.masked_fill.Scalar": _masked_fill,
    "aten.to.dtype": _cast,
    "aten.to.device": _cast,
    "aten.to.dtype_layout": _cast,
    "aten._to_copy.default": _cast,
    "aten.type_as.default": _cast,
    **{f"aten.{name}.default": _identity for name in
       ("alias", "clone", "contiguous", "detach", "lift_fresh_copy", "dropout")},
    "aten.view.default": _view,
    "aten.reshape.default": _view,
    "aten._unsafe_view.default": _view,
    "aten.flatten.using_ints": _flatten,
    "aten.unflatten.int": _unflatten,
    "aten.select.int": _select,
    "aten.transpose.int": lambda cx, x, a, b: ops.transpose(x, dim0=a, dim1=b),
    "aten.t.default": _t,
    "aten.permute.default": lambda cx, x, dims: ops.permute(x, dims=tuple(dims)),
    "aten.expand.default": _expand,
    "aten.slice.Tensor": _slice,
    "aten.cat.default": lambda cx, tensors, dim=0: ops.concat([cx.value(t) for t in tensors], dim=dim),
    "aten.stack.default": _stack,
    "aten.repeat_interleave.self_int": _repeat_interleave,
    "aten.split.Tensor": _split,
    "aten.split_with_sizes.default": _split,
    "aten.chunk.default": _chunk,
    "aten.unsqueeze.default": lambda cx, x, dim: ops.unsqueeze(x, dim=dim),
    "aten.squeeze.dim": _squeeze,
    "aten.squeeze.dims": _squeeze,
    "aten.squeeze.default": _squeeze,
    "aten.linear.default": lambda cx, x, weight, bias=None: ops.linear(x, weight, bias),
    **{f"aten.conv{n}d.default": _conv(n) for n in (1, 2, 3)},
    "aten.matmul.default": _matmul,
    "aten.mm.default": _matmul,
    "aten.bmm.default": _matmul,
    "aten.addmm.default": _addmm,
    "aten.embedding.default": lambda cx, weight, ids, *rest: ops.embedding(ids, weight),
    "aten.index_select.default": lambda cx, x, dim, index: ops.index_select(x, index, dim=dim),
    "aten.gather.default": lambda cx, x, dim, index, **kw: ops.gather(x, index, dim=dim),
    "aten.mean.dim": _reduce("mean"),
    "aten.mean.default": _reduce("mean"),
    "aten.sum.dim_IntList": _reduce("sum"),
    "aten.sum.default": _reduce("sum"),
    "aten.amax.default": _reduce("max"),
    "aten.amin.default": _reduce("min"),
    "aten.argmax.default": lambda cx, x, dim, keepdim=False: ops.argmax(x, dim=dim, keepdim=keepdim),
    "aten.softmax.int": _softmax,
    "aten._softmax.default": _softmax,
    "aten.log_softmax.int": lambda cx, x, dim, *rest: ops.log_softmax(x, dim=dim),
    "aten.layer_norm.default": _layer_norm,
    "aten.native_layer_norm.default": _native_layer_norm,
    "aten.scaled_dot_product_attention.default": _sdpa,
    "kiln.attention.default": _kiln_attention,
    "kiln.experts.default": _kiln_experts,
    "aten.topk.default": _topk,
    "aten.max.dim": _max_dim,
    "aten.cumsum.default": _cumsum,
    "aten.arange.default": _arange,
    "aten.arange.start": _arange,
    "aten.arange.start_step": _arange,
    "aten.full.default": _full,
    "aten.zeros.default": _filled(0.0),
    "aten.ones.default": _filled(1.0),
    "<built-in function getitem>": _getitem,
    str(operator.getitem): _getitem,
    # written-out attention with an ALiBi bias (BLOOM, MPT) and a materialized mask
    "aten.where.ScalarOther": _where,
    "aten.where.ScalarSelf": _where,
    "aten.baddbmm.default": _baddbmm,
    "aten.repeat.default": _repeat,
    "aten.pow.Scalar": _pow,
    "aten.concat.default": lambda cx, tensors, dim=0: ops.concat([cx.value(t) for t in tensors], dim=dim),
    # Falcon: its mask counts sequence starts along the positions; FalconLinear's weight.T
    "aten.diff.default": _diff,
    "aten.index.Tensor": _index,
    "aten.new_ones.default": lambda cx, x, size, **kwargs: ops.full(graph=cx.graph, shape=tuple(size), value=1.0,
                                                                    dtype=cx.result_dtype),
    "aten.numpy_T.default": lambda cx, x: ops.permute(x, dims=tuple(reversed(range(x.type.rank)))),
    # routers: DeepSeek-V3's mask of the chosen groups, Llama 4's scores of the chosen experts
    "aten.bitwise_not.default": _bitwise_not,
    **SCATTER_CONVERTERS,
}

# Nodes that only assert facts torch already checked while tracing.
IGNORED = {
    "aten._assert_tensor_metadata.default", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
    "aten._assert_async.msg", "aten.sym_constrain_range.default",
}
