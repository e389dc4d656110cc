"""Fused ops that the fusion passes produce: a residual add with RMSNorm or LayerNorm, a gated
activation over a fused gate/up projection (SwiGLU, GeGLU), and the split of a fused QKV
projection into heads with rotary embedding applied to q and k."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Attr, OpDef
from ..shapes import ShapeError, broadcast_shapes, shapes_equal
from ..types import TensorType
from .nn import rms_norm_reference, rotary_reference

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


def _qkv_rotary(qkv: TensorType, cos: TensorType, sin: TensorType, q_heads: int, kv_heads: int,
                head_dim: int, interleaved: bool) -> tuple[TensorType, ...]:
    if not qkv.dtype.is_float or qkv.rank < 1 or cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise ShapeError(f"expects floating-point qkv, cos and sin of one dtype; got {qkv}, {cos}, {sin}")
    if min(q_heads, kv_heads, head_dim) < 1 or qkv.shape[-1] != (q_heads + 2 * kv_heads) * head_dim:
        raise ShapeError(f"qkv {qkv} does not hold {q_heads} + 2 x {kv_heads} heads of {head_dim}")
    rotated = cos.shape[-1]
    if not shapes_equal(cos.shape, sin.shape) or not isinstance(rotated, int) or rotated % 2 or rotated > head_dim:
        raise ShapeError(f"cos {cos} and sin {sin} must have one shape with an even last dim <= {head_dim}")
    per_head = qkv.shape[:-1] + (1, rotated)
    if not shapes_equal(broadcast_shapes(per_head, cos.shape), per_head):
        raise ShapeError(f"cos {cos} does not broadcast to the heads of {qkv}")
    tokens = qkv.with_shape(qkv.shape[:-1]).numel
    return tuple(qkv.with_shape((tokens, heads, head_dim)) for heads in (q_heads, kv_heads, kv_heads))


def _qkv_rotary_reference(qkv, cos, sin, q_heads, kv_heads, head_dim, interleaved):
    heads = qkv.unflatten(-1, (q_heads + 2 * kv_heads, head_dim))
    q, k, v = heads.split((q_heads, kv_heads, kv_heads), dim=-2)
    q, k = (rotary_reference(x, cos, sin, interleaved) for x in (q, k))
    return tuple(x.reshape(-1, *x.shape[-2:]) for x in (q, k, v))


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
    OpDef("qkv_rotary", ("qkv", "cos", "sin"), _qkv_rotary, _qkv_rotary_reference,
          attrs={"q_heads": Attr("int"), "kv_heads": Attr("int"), "head_dim": Attr("int"),
                 "interleaved": Attr("bool", False)}, results=3,
          doc="a fused QKV projection [..., (q_heads + 2 kv_heads) * head_dim] split into q, k and v "
              "[tokens, heads, head_dim], with rotary embedding applied to q and k (cos and sin "
              "broadcast to [..., 1, rotary_dim])"),
]
