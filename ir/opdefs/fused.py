"""Fused ops that the fusion passes produce: a residual add with RMSNorm or LayerNorm, and a gated
activation over a fused gate/up projection (SwiGLU, GeGLU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Attr, OpDef
from ..shapes import ShapeError, shapes_equal
from ..types import TensorType
from .nn import rms_norm_reference

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def _add_rms_norm(x: TensorType, residual: TensorType, weight: TensorType | None, eps: float):
    if x.dtype != residual.dtype or not shapes_equal(x.shape, residual.shape):
        raise ShapeError(f"x {x} and residual {residual} must have one type")
    if not x.dtype.is_float or x.rank == 0:
        raise ShapeError(f"expects a floating-point input with a last dim, got {x}")
    if weight is not None and (weight.rank != 1 or not shapes_equal(weight.shape, x.shape[-1:])
                               or weight.dtype != x.dtype):
        raise ShapeError(f"weight {weight} does not match the last dim of {x}")
    return x, x


def _add_rms_norm_reference(x, residual, weight, eps):
    total = x + residual
    return rms_norm_reference(total, weight, eps), total


def _add_layer_norm(x: TensorType, residual: TensorType, weight: TensorType | None, bias: TensorType | None,
                    eps: float):
    if bias is not None:
        _add_rms_norm(x, residual, bias, eps)
    return _add_rms_norm(x, residual, weight, eps)


def _add_layer_norm_reference(x, residual, weight, bias, eps):
    total = x + residual
    return F.layer_norm(total, (total.shape[-1],), weight, bias, eps), total


def _gated(x: TensorType, activation: str) -> TensorType:
    if not x.dtype.is_float or x.rank == 0 or not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
        raise ShapeError(f"expects a floating-point input with an even, static last dim, got {x}")
    return x.with_shape(x.shape[:-1] + (x.shape[-1] // 2,))


def _gated_reference(x: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]
    return act(gate) * up


OPS = [
    OpDef("add_rms_norm", ("x", "residual", "weight?"), _add_rms_norm, _add_rms_norm_reference,
          attrs={"eps": Attr("float", 1e-6)}, results=2,
          doc="(rms_norm(x + residual, weight), x + residual): the residual add of a block and the next norm"),
    OpDef("add_layer_norm", ("x", "residual", "weight?", "bias?"), _add_layer_norm, _add_layer_norm_reference,
          attrs={"eps": Attr("float", 1e-5)}, results=2,
          doc="(layer_norm(x + residual, weight, bias), x + residual)"),
    OpDef("gated_activation", ("x",), _gated, _gated_reference,
          attrs={"activation": Attr("str", "silu", choices=ACTIVATIONS)},
          doc="activation(x[..., :n]) * x[..., n:] for a fused gate/up projection of 2n features"),
]
