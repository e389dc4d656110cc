"""Reductions over axes (sum, mean, max, min, argmax) and softmax."""

from __future__ import annotations

import torch

from .. import dtypes
from ..registry import Attr, OpDef
from ..shapes import ShapeError, normalize_axis
from ..types import TensorType


def _reduced(x: TensorType, dims: tuple[int, ...], keepdim: bool) -> TensorType:
    if not dims:
        raise ShapeError("reduction needs at least one axis")
    axes = {normalize_axis(d, x.rank) for d in dims}
    if len(axes) != len(dims):
        raise ShapeError(f"repeated axis in {dims}")
    if keepdim:
        return x.with_shape([1 if i in axes else d for i, d in enumerate(x.shape)])
    return x.with_shape([d for i, d in enumerate(x.shape) if i not in axes])


def _float_reduction(x: TensorType, dims: tuple[int, ...], keepdim: bool) -> TensorType:
    if not x.dtype.is_float:
        raise ShapeError(f"expects a floating-point operand, got {x.dtype}")
    return _reduced(x, dims, keepdim)


def _numeric_reduction(x: TensorType, dims: tuple[int, ...], keepdim: bool) -> TensorType:
    if x.dtype.kind == "bool":
        raise ShapeError("expects a numeric operand, got bool")
    return _reduced(x, dims, keepdim)


def _argmax(x: TensorType, dim: int, keepdim: bool) -> TensorType:
    return _numeric_reduction(x, (dim,), keepdim).with_dtype(dtypes.int64)


def _softmax(x: TensorType, dim: int) -> TensorType:
    if not x.dtype.is_float:
        raise ShapeError(f"expects a floating-point operand, got {x.dtype}")
    normalize_axis(dim, x.rank)
    return x


_AXES = {"dims": Attr("ints"), "keepdim": Attr("bool", False)}


def _reduction(name: str, infer, reference, doc: str) -> OpDef:
    return OpDef(name, ("x",), infer, lambda x, dims, keepdim: reference(x, dims, keepdim),
                 attrs=_AXES, doc=doc)


OPS = [
    _reduction("sum", _numeric_reduction, lambda x, d, k: torch.sum(x, d, k), "sum over dims"),
    _reduction("mean", _float_reduction, lambda x, d, k: torch.mean(x, d, k), "mean over dims"),
    _reduction("max", _numeric_reduction, lambda x, d, k: torch.amax(x, d, k), "max over dims"),
    _reduction("min", _numeric_reduction, lambda x, d, k: torch.amin(x, d, k), "min over dims"),
    OpDef("argmax", ("x",), _argmax, lambda x, dim, keepdim: torch.argmax(x, dim, keepdim),
          attrs={"dim": Attr("int"), "keepdim": Attr("bool", False)},
          doc="index of the first maximum along dim"),
    OpDef("softmax", ("x",), _softmax, lambda x, dim: torch.softmax(x, dim),
          attrs={"dim": Attr("int")}, doc="softmax along dim"),
    OpDef("log_softmax", ("x",), _softmax, lambda x, dim: torch.log_softmax(x, dim),
          attrs={"dim": Attr("int")}, doc="log of softmax along dim"),
]
