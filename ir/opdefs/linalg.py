"""Matrix products and table lookups: matmul, linear, embedding, gather, index_select."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Attr, OpDef
from ..shapes import ShapeError, broadcast_shapes, dims_equal, normalize_axis
from ..types import TensorType


def _float_same(*types: TensorType) -> None:
    if len({t.dtype for t in types}) != 1 or not types[0].dtype.is_float:
        raise ShapeError("expects floating-point operands of one dtype, got " + ", ".join(str(t) for t in types))


def _integer_index(t: TensorType) -> None:
    if not t.dtype.is_integer:
        raise ShapeError(f"indices must be integers, got {t.dtype}")


def _matmul(a: TensorType, b: TensorType) -> TensorType:
    _float_same(a, b)
    if a.rank == 0 or b.rank == 0:
        raise ShapeError("matmul operands need at least one dim")
    a_shape = (1,) + a.shape if a.rank == 1 else a.shape
    b_shape = b.shape + (1,) if b.rank == 1 else b.shape
    if not dims_equal(a_shape[-1], b_shape[-2]):
        raise ShapeError(f"contraction dims differ: {a} @ {b}")
    batch = broadcast_shapes(a_shape[:-2], b_shape[:-2])
    out = batch + ((a_shape[-2],) if a.rank > 1 else ()) + ((b_shape[-1],) if b.rank > 1 else ())
    return a.with_shape(out)


def _linear(x: TensorType, weight: TensorType, bias: TensorType | None) -> TensorType:
    _float_same(x, weight, *([bias] if bias else []))
    if weight.rank != 2 or x.rank < 1:
        raise ShapeError(f"linear needs weight [out, in] and input [..., in], got {x} and {weight}")
    if not dims_equal(x.shape[-1], weight.shape[1]):
        raise ShapeError(f"input features {x.shape[-1]} do not match weight {weight}")
    if bias is not None and (bias.rank != 1 or not dims_equal(bias.shape[0], weight.shape[0])):
        raise ShapeError(f"bias {bias} does not match weight {weight}")
    return x.with_shape(x.shape[:-1] + (weight.shape[0],))


def _embedding(ids: TensorType, weight: TensorType) -> TensorType:
    _integer_index(ids)
    if weight.rank != 2:
        raise ShapeError(f"embedding table must be 2-D, got {weight}")
    return weight.with_shape(ids.shape + (weight.shape[1],))


def _gather(x: TensorType, index: TensorType, dim: int) -> TensorType:
    _integer_index(index)
    normalize_axis(dim, x.rank)
    if index.rank != x.rank:
        raise ShapeError(f"gather index {index} must have the rank of {x}")
    return x.with_shape(index.shape)


def _index_select(x: TensorType, index: TensorType, dim: int) -> TensorType:
    _integer_index(index)
    if index.rank != 1:
        raise ShapeError(f"index_select index must be 1-D, got {index}")
    axis = normalize_axis(dim, x.rank)
    shape = list(x.shape)
    shape[axis] = index.shape[0]
    return x.with_shape(shape)


OPS = [
    OpDef("matmul", ("a", "b"), _matmul, torch.matmul, doc="a @ b with batch broadcasting"),
    OpDef("linear", ("x", "weight", "bias?"), _linear, F.linear,
          doc="x @ weight.T + bias, weight as [out_features, in_features]"),
    OpDef("embedding", ("ids", "weight"), _embedding, F.embedding, doc="rows of weight at ids"),
    OpDef("gather", ("x", "index"), _gather, lambda x, index, dim: torch.gather(x, dim, index),
          attrs={"dim": Attr("int")}, doc="x[..., index[...], ...] elementwise along dim"),
    OpDef("index_select", ("x", "index"), _index_select,
          lambda x, index, dim: torch.index_select(x, dim, index),
          attrs={"dim": Attr("int")}, doc="whole slices of x at 1-D index along dim"),
]
