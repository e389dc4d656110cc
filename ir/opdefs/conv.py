"""Convolution over 1, 2 or 3 spatial dims (``[batch, channels, *spatial]``), with
stride, symmetric zero padding, dilation and groups, as ``torch.nn.functional.conv*d``."""

from __future__ import annotations

import torch.nn.functional as F

from ..registry import Attr, OpDef
from ..shapes import ShapeError, dims_equal
from ..types import TensorType


def _conv(x: TensorType, weight: TensorType, bias: TensorType | None, stride: tuple[int, ...],
          padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> TensorType:
    spatial = x.rank - 2
    if not 1 <= spatial <= 3 or weight.rank != x.rank:
        raise ShapeError(f"conv takes [batch, channels, *spatial] of 1 to 3 spatial dims and a weight of the same "
                         f"rank, got {x} and {weight}")
    if x.dtype != weight.dtype or not x.dtype.is_float or (bias is not None and bias.dtype != x.dtype):
        raise ShapeError(f"conv expects floating-point operands of one dtype, got {x} and {weight}")
    if any(len(a) != spatial for a in (stride, padding, dilation)):
        raise ShapeError(f"stride {stride}, padding {padding} and dilation {dilation} need {spatial} values each")
    if groups < 1 or min(stride + dilation) < 1 or min(padding) < 0:
        raise ShapeError("groups, stride and dilation must be positive and padding not negative")
    if any(isinstance(d, int) and d < 1 for d in (*x.shape[1:], *weight.shape)):
        raise ShapeError(f"conv needs non-empty channels, spatial dims and kernel, got {x} and {weight}")
    out_channels, per_group = weight.shape[:2]
    if not isinstance(out_channels, int) or out_channels % groups or not dims_equal(x.shape[1], per_group * groups):
        raise ShapeError(f"weight {weight} does not fit {x.shape[1]} input channels in {groups} groups")
    kernel = weight.shape[2:]
    if not all(isinstance(k, int) for k in kernel):
        raise ShapeError(f"the kernel must be static, got {weight}")
    sizes = tuple((d + 2 * p - s_dil * (k - 1) - 1) // s + 1
                  for d, p, s_dil, k, s in zip(x.shape[2:], padding, dilation, kernel, stride))
    if any(isinstance(d, int) and d < 1 for d in sizes):
        raise ShapeError(f"the kernel {kernel} does not fit the input {x} with padding {padding}")
    if bias is not None and (bias.rank != 1 or not dims_equal(bias.shape[0], out_channels)):
        raise ShapeError(f"bias {bias} does not match {out_channels} output channels")
    return x.with_shape((x.shape[0], out_channels, *sizes))


def conv_reference(x, weight, bias, stride, padding, dilation, groups):
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    return conv(x, weight, bias, stride, padding, dilation, groups)


OPS = [
    OpDef("conv", ("x", "weight", "bias?"), _conv, conv_reference,
          attrs={"stride": Attr("ints"), "padding": Attr("ints"), "dilation": Attr("ints"),
                 "groups": Attr("int", 1)},
          doc="N-d convolution of [batch, channels, *spatial] by weight [out, in / groups, *kernel]"),
]
