"""Quantized linear layers: the ops the ``quantize`` stage rewrites ``linear`` into.

Each carries its weight in its stored form and its scales (and zero points) as operands,
and computes ``x @ dequantize(weight).T + bias`` in float32, rounded once to ``x``'s dtype:

- ``linear_int8``: weight-only INT8, ``w = q * scale[n]`` with one f32 scale per output
  channel (``[out]``) or ``w = q * scale[n, group]`` with one per output channel and group
  of input features (``[out, groups]``, GGUF's Q8_0, Q6_K and Q5_0); grouped scales may come
  with f32 zero points of their shape, ``w = (q - zero) * scale`` (GGUF's Q5_1 and Q5_K, whose
  ``w = d * q + m`` gives ``zero = -m / d``);
- ``linear_int4``: weight-only INT4 in groups along the input dim, two 4-bit codes a byte
  (even input index in the low nibble), ``w = (q - zero) * scale`` per (row, group); the
  group size is ``in_features / scales.shape[1]``; a symmetric scheme stores zero 8; the
  zero points are ``u8`` codes, or floats (f32 or the input's dtype) where the format
  stores an offset instead (GGUF's Q4_1 and Q4_K: ``w = d * q + m``, so ``zero = -m / d``);
- ``linear_fp8``: W8A8 with E4M3 weights scaled per output channel; the input is scaled
  into E4M3 per token from its own absolute maximum (dynamic) or by one calibrated
  ``input_scale`` (static), and the product is scaled back by both;
- ``linear_w8a8``: W8A8 INT8 (SmoothQuant's weights, smoothed beforehand): INT8 weights
  per output channel, the input rounded to INT8 per token from its absolute maximum,
  the integer products summed exactly and scaled back by both scales.

The references here are the oracle that every backend's kernels are tested against.
"""

from __future__ import annotations

import torch

from .. import dtypes
from ..registry import OpDef
from ..shapes import ShapeError, dims_equal
from ..types import TensorType

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
_MIN_SCALE = 1e-12  # an all-zero row or token gets this scale, not a division by zero


def _check_input(name: str, x: TensorType, weight: TensorType, in_features, bias: TensorType | None) -> TensorType:
    if not x.dtype.is_float or x.rank < 1:
        raise ShapeError(f"{name} needs a floating-point input [..., in], got {x}")
    if not dims_equal(x.shape[-1], in_features):
        raise ShapeError(f"input features {x.shape[-1]} do not match weight {weight}")
    if bias is not None and (bias.rank != 1 or bias.dtype != x.dtype or not dims_equal(bias.shape[0], weight.shape[0])):
        raise ShapeError(f"bias {bias} does not match weight {weight} and input {x}")
    return x.with_shape(x.shape[:-1] + (weight.shape[0],))


def _check_channel_scale(scale: TensorType, weight: TensorType) -> None:
    if scale.dtype != dtypes.float32 or scale.rank != 1 or not dims_equal(scale.shape[0], weight.shape[0]):
        raise ShapeError(f"the scales must be f32[{weight.shape[0]}] (one per output channel), got {scale}")


def _check_groups(groups, in_features, even: bool) -> None:
    if not isinstance(groups, int) or groups < 1 or in_features % groups or (even and (in_features // groups) % 2):
        kind = "even groups" if even else "equal groups"
        raise ShapeError(f"{groups} groups do not divide {in_features} input features into {kind}")


def _linear_int8(x: TensorType, qweight: TensorType, scale: TensorType, zeros: TensorType | None,
                 bias: TensorType | None) -> TensorType:
    if qweight.dtype != dtypes.int8 or qweight.rank != 2:
        raise ShapeError(f"linear_int8 needs an i8[out, in] weight, got {qweight}")
    if scale.rank == 2:
        if scale.dtype != dtypes.float32 or not dims_equal(scale.shape[0], qweight.shape[0]):
            raise ShapeError(f"grouped scales must be f32[{qweight.shape[0]}, groups], got {scale}")
        _check_groups(scale.shape[1], qweight.shape[1], even=False)
    else:
        _check_channel_scale(scale, qweight)
    if zeros is not None and (scale.rank != 2 or zeros.dtype != dtypes.float32 or zeros.shape != scale.shape):
        raise ShapeError(f"linear_int8's zero points must be f32 of the grouped scales' shape, got {zeros} "
                         f"with scales {scale}")
    return _check_input("linear_int8", x, qweight, qweight.shape[1], bias)


def _linear_int4(x: TensorType, qweight: TensorType, scales: TensorType, zeros: TensorType,
                 bias: TensorType | None) -> TensorType:
    if qweight.dtype != dtypes.uint8 or qweight.rank != 2 or not isinstance(qweight.shape[1], int):
        raise ShapeError(f"linear_int4 needs a u8[out, in/2] weight (two codes a byte), got {qweight}")
    in_features = 2 * qweight.shape[1]
    if scales.rank != 2 or scales.dtype != x.dtype or not dims_equal(scales.shape[0], qweight.shape[0]):
        raise ShapeError(f"the scales must be [out, groups] in the input's dtype {x.dtype}, got {scales}")
    _check_groups(scales.shape[1], in_features, even=True)
    if zeros.dtype not in (dtypes.uint8, dtypes.float32, x.dtype) or not zeros.shape == scales.shape:
        raise ShapeError(f"the zero points must be u8, f32 or {x.dtype} of the scales' shape {scales.shape}, "
                         f"got {zeros}")
    return _check_input("linear_int4", x, qweight, in_features, bias)


def _linear_fp8(x: TensorType, qweight: TensorType, weight_scale: TensorType, input_scale: TensorType | None,
                bias: TensorType | None) -> TensorType:
    if qweight.dtype != dtypes.float8_e4m3fn or qweight.rank != 2:
        raise ShapeError(f"linear_fp8 needs an f8e4m3[out, in] weight, got {qweight}")
    _check_channel_scale(weight_scale, qweight)
    if input_scale is not None and (input_scale.dtype != dtypes.float32 or input_scale.rank != 0):
        raise ShapeError(f"the static input scale must be an f32 scalar, got {input_scale}")
    return _check_input("linear_fp8", x, qweight, qweight.shape[1], bias)


def unpack_int4_codes(qweight: torch.Tensor) -> torch.Tensor:
    """The 4-bit codes (0..15, uint8) of a packed ``[out, in/2]`` byte weight, as ``[out, in]``."""
    return torch.stack([qweight & 0xF, qweight >> 4], dim=-1).flatten(-2)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """The float32 ``[out, in]`` weight that ``linear_int4``'s operands stand for."""
    out_features, groups = scales.shape
    codes = unpack_int4_codes(qweight).view(out_features, groups, -1).float()
    return ((codes - zeros.float()[..., None]) * scales.float()[..., None]).view(out_features, -1)


def _linear_float32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.float() @ weight.T
    return (out if bias is None else out + bias.float()).to(x.dtype)


def dequantize_int8(qweight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 ``[out, in]`` weight that ``linear_int8``'s operands stand for (scales per
    output channel ``[out]`` or per channel and group ``[out, groups]``, the latter with or
    without zero points)."""
    scale = scale.float().reshape(qweight.shape[0], -1, 1)
    codes = qweight.float().view(qweight.shape[0], scale.shape[1], -1)
    if zeros is not None:
        codes = codes - zeros.float()[..., None]
    return (codes * scale).view(qweight.shape)


def _linear_int8_reference(x, qweight, scale, zeros, bias):
    return _linear_float32(x, dequantize_int8(qweight, scale, zeros), bias)


def _linear_int4_reference(x, qweight, scales, zeros, bias):
    return _linear_float32(x, dequantize_int4(qweight, scales, zeros), bias)


def fp8_token_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) scales that map each token's absolute maximum onto E4M3's
    largest value, float32, shaped ``[..., 1]``."""
    return (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=_MIN_SCALE)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to E4M3 (saturating at its largest finite value)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def scaled_product(codes: torch.Tensor, scale: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """``(codes @ qweight.T) * scale * weight_scale + bias`` in float32: the W8A8 product of
    activation codes (E4M3, or INT8 whose integer products are summed exactly, as an int32
    accumulator does; float64 holds them) and weight codes of the same dtype."""
    if codes.dtype == torch.int8:
        product = (codes.double() @ qweight.double().T).float()
    else:
        product = codes.float() @ qweight.float().T
    out = product * scale * weight_scale
    return out if bias is None else out + bias.float()


def _linear_fp8_reference(x, qweight, weight_scale, input_scale, bias):
    scale = fp8_token_scales(x) if input_scale is None else input_scale.float()
    return scaled_product(quantize_fp8(x, scale), scale, qweight, weight_scale, bias).to(x.dtype)


INT8_MAX = 127.0


def _linear_w8a8(x: TensorType, qweight: TensorType, weight_scale: TensorType, bias: TensorType | None) -> TensorType:
    if qweight.dtype != dtypes.int8 or qweight.rank != 2:
        raise ShapeError(f"linear_w8a8 needs an i8[out, in] weight, got {qweight}")
    _check_channel_scale(weight_scale, qweight)
    return _check_input("linear_w8a8", x, qweight, qweight.shape[1], bias)


def int8_token_scales(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dim) scales that map each token's absolute maximum onto 127,
    float32, shaped ``[..., 1]``."""
    return (x.float().abs().amax(dim=-1, keepdim=True) / INT8_MAX).clamp(min=_MIN_SCALE)


def quantize_int8_tokens(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to the nearest integer in [-127, 127], int8."""
    return (x.float() / scale).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def _linear_w8a8_reference(x, qweight, weight_scale, bias):
    scale = int8_token_scales(x)
    return scaled_product(quantize_int8_tokens(x, scale), scale, qweight, weight_scale, bias).to(x.dtype)


OPS = [
    OpDef("linear_int8", ("x", "qweight", "scale", "zeros?", "bias?"), _linear_int8, _linear_int8_reference,
          doc="x @ ((qweight - zero) * scale[n(, group)]).T + bias: weight-only INT8, per output channel (or "
              "group, with optional f32 zero points)"),
    OpDef("linear_int4", ("x", "qweight", "scales", "zeros", "bias?"), _linear_int4, _linear_int4_reference,
          doc="x @ ((q - zero) * scale).T + bias: weight-only INT4 in groups, two codes a byte"),
    OpDef("linear_fp8", ("x", "qweight", "weight_scale", "input_scale?", "bias?"), _linear_fp8, _linear_fp8_reference,
          doc="FP8 W8A8: x scaled into E4M3 per token (or by a static input_scale), E4M3 weight per channel"),
    OpDef("linear_w8a8", ("x", "qweight", "weight_scale", "bias?"), _linear_w8a8, _linear_w8a8_reference,
          doc="INT8 W8A8 (SmoothQuant): x rounded to INT8 per token, INT8 weight per channel, int32 products"),
]

# The quantized forms of ``linear``; each takes the input first and ``bias`` last.
QUANTIZED_LINEARS = tuple(op.name for op in OPS)
_WEIGHT_OPERANDS = {op.name: len(op.operands) - 2 for op in OPS}  # between the input and the bias


def quantized_linear_inputs(op: str, x, weight_operands: list, bias) -> list:
    """The inputs of quantized linear ``op``: ``x``, its weight operands (the optional ones
    not given left absent) and ``bias``."""
    missing = _WEIGHT_OPERANDS[op] - len(weight_operands)
    if missing < 0:
        raise ValueError(f"{op} takes {_WEIGHT_OPERANDS[op]} weight operands, got {len(weight_operands)}")
    return [x, *weight_operands, *[None] * missing, bias]
