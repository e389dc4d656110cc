"""Scatters along one dim, as routers use them, imported as one-hot comparisons.

DeepSeek-V3's router marks its chosen groups with ``zeros_like(x).scatter_(1, index, 1)``;
Llama 4's writes the top-k logits into a tensor of ``-inf`` with
``full_like(logits, -inf).scatter_(1, index, values)``. kiln has no scatter op: each index
entry is compared with every position along the scattered dim (a one-hot ``[..., k,
size, ...]``), and a position that any entry hits takes the written value. Where entries of
one row repeat an index, torch leaves the result undefined; here the largest of the values
written there wins (one of those torch may keep).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..ir import Value, dtypes, ops
from ..ir.shapes import dims_equal

if TYPE_CHECKING:
    from .aten import Conversion


def _like(value: float | None = None):
    def convert(cx: Conversion, x: Value, fill: Any = None, **kwargs: Any) -> Value:
        return ops.full(graph=cx.graph, shape=tuple(x.shape), value=float(value if fill is None else fill),
                        dtype=cx.result_dtype)
    return convert


def _hits(cx: Conversion, x: Value, dim: int, index: Value) -> Value:
    """float32 ``[..., k, size, ...]``: 1 where entry ``k`` of ``index`` points at the position."""
    rank = x.type.rank
    if rank != index.type.rank or any(i != dim and not dims_equal(a, b)
                                      for i, (a, b) in enumerate(zip(x.shape, index.shape))):
        raise NotImplementedError("scatter whose index differs from the tensor beyond the scattered dim")
    size = x.shape[dim]
    positions = ops.reshape(ops.arange(graph=cx.graph, end=size, dtype=index.dtype),
                            shape=(*[1] * (dim + 1), size, *[1] * (rank - dim - 1)))
    return ops.cast(ops.eq(ops.unsqueeze(index, dim=dim + 1), positions), dtype=dtypes.float32)


def _scatter_value(cx: Conversion, x: Value, dim: int, index: Value, value: Any) -> Value:
    """``x`` with ``value`` written where ``index`` points along ``dim``."""
    dim %= x.type.rank
    hits = _hits(cx, x, dim, index)
    chosen = ops.cast(ops.max(hits, dims=(dim,), keepdim=False), dtype=dtypes.bool_)
    return ops.where(chosen, cx.value(value, x.dtype), x)


def _scatter_src(cx: Conversion, x: Value, dim: int, index: Value, src: Value) -> Value:
    """``x`` with ``src[..., j, ...]`` written where ``index[..., j, ...]`` points along ``dim``."""
    dim %= x.type.rank
    if not dims_equal(src.shape[dim], index.shape[dim]) or src.type.rank != index.type.rank:
        raise NotImplementedError("scatter of a source shaped unlike its index")
    hits = ops.cast(_hits(cx, x, dim, index), dtype=dtypes.bool_)
    written = ops.where(hits, ops.unsqueeze(cx.value(src, x.dtype), dim=dim + 1), cx.value(float("-inf"), x.dtype))
    chosen = ops.cast(ops.max(ops.cast(hits, dtype=dtypes.float32), dims=(dim,), keepdim=False), dtype=dtypes.bool_)
    return ops.where(chosen, ops.max(written, dims=(dim,), keepdim=False), x)


SCATTER_CONVERTERS = {
    "aten.zeros_like.default": _like(0.0),
    "aten.ones_like.default": _like(1.0),
    "aten.full_like.default": _like(),
    "aten.scatter.value": _scatter_value,
    "aten.scatter.src": _scatter_src,
}
