"""Ops that create tensors from attributes alone: full and arange."""

from __future__ import annotations

import torch

from .. import dtypes
from ..registry import Attr, OpDef
from ..shapes import Dim, ShapeError, normalize_dim
from ..types import TensorType


def _full(shape: tuple[Dim, ...], value: float, dtype: dtypes.DType) -> TensorType:
    if dtype.is_packed:
        raise ShapeError("full cannot make i4 tensors")
    return TensorType(dtype, shape)


def _arange(end: Dim, start: int, step: int, dtype: dtypes.DType) -> TensorType:
    if step == 0:
        raise ShapeError("arange step cannot be 0")
    if dtype.kind == "bool" or dtype.is_packed:
        raise ShapeError(f"arange cannot make {dtype} tensors")
    if step == 1:
        length = normalize_dim(end - start)
    elif isinstance(end, int):
        length = max(0, -(-(end - start) // step))
    else:
        raise ShapeError("a symbolic arange end needs step 1")
    return TensorType(dtype, (length,))


OPS = [
    OpDef("full", (), _full,
          lambda shape, value, dtype: torch.full(shape, value, dtype=dtype.torch_dtype),
          attrs={"shape": Attr("dims"), "value": Attr("float"), "dtype": Attr("dtype")},
          doc="a tensor of one value"),
    OpDef("arange", (), _arange,
          lambda end, start, step, dtype: torch.arange(start, end, step, dtype=dtype.torch_dtype),
          attrs={"end": Attr("dim"), "start": Attr("int", 0), "step": Attr("int", 1),
                 "dtype": Attr("dtype", dtypes.int64)},
          doc="start, start+step, ... below end (iota)"),
]
