"""Activations quantized by the op that makes them, and the linear layer that reads them.

W8A8 layers (``linear_fp8`` with dynamic scales, ``linear_w8a8``) round their input per
token themselves. Where that input is an RMSNorm's output, the norm can emit the codes
and scales instead (TensorRT-LLM's norm-quant fusion), so the activation is written once,
in 8 bits, and no separate quantizing kernel runs:

- ``rms_norm_quant(x, weight?)``: ``rms_norm`` rounded per token into ``qdtype``
  (``float8_e4m3fn``: each token's absolute maximum onto 448, E4M3 rounding; ``int8``:
  onto 127, rounded to the nearest integer), giving ``(codes [..., n], scales f32 [..., 1])``;
- ``add_rms_norm_quant(x, residual, weight?)``: ``add_rms_norm`` so quantized, giving
  ``(codes, scales, x + residual)``;
- ``scaled_linear(codes, scales, qweight, weight_scale, bias?)``: ``codes @ qweight.T``
  (E4M3 products in float32, INT8 products summed exactly) times the token and channel
  scales, plus ``bias``, rounded once to ``dtype`` (vLLM's ``cutlass_scaled_mm``).

Each reference is the composition of the unfused ops' references, so a norm followed by
a W8A8 layer and its fused form give the same bits.
"""

from __future__ import annotations

import torch

from .. import dtypes
from ..registry import Attr, OpDef
from ..shapes import ShapeError, dims_equal, shapes_equal
from ..types import TensorType
from .fused import _add_rms_norm, _add_rms_norm_reference
from .nn import rms_norm_reference
from .quantized import fp8_token_scales, int8_token_scales, quantize_fp8, quantize_int8_tokens, scaled_product

# activation code dtype -> (the per-token scales of a float tensor, the codes for given scales)
TOKEN_QUANTIZERS = {
    dtypes.float8_e4m3fn: (fp8_token_scales, quantize_fp8),
    dtypes.int8: (int8_token_scales, quantize_int8_tokens),
}
CODE_DTYPES = tuple(TOKEN_QUANTIZERS)


def quantize_tokens(x: torch.Tensor, qdtype: dtypes.DType) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes of ``x`` in ``qdtype``, float32 scales ``[..., 1]``), one scale per token."""
    token_scales, quantize = TOKEN_QUANTIZERS[qdtype]
    scales = token_scales(x)
    return quantize(x, scales), scales


def _codes_and_scales(x: TensorType, qdtype) -> tuple[TensorType, TensorType]:
    if qdtype not in CODE_DTYPES:
        raise ShapeError(f"activations are quantized to {' or '.join(map(str, CODE_DTYPES))}, not {qdtype}")
    return TensorType(qdtype, x.shape), TensorType(dtypes.float32, x.shape[:-1] + (1,))


def _rms_norm_quant(x: TensorType, weight: TensorType | None, eps: float, qdtype) -> tuple[TensorType, ...]:
    normed, _ = _add_rms_norm(x, x, weight, eps)
    return _codes_and_scales(normed, qdtype)


def _rms_norm_quant_reference(x, weight, eps, qdtype):
    return quantize_tokens(rms_norm_reference(x, weight, eps), qdtype)


def _add_rms_norm_quant(x: TensorType, residual: TensorType, weight: TensorType | None, eps: float,
                        qdtype) -> tuple[TensorType, ...]:
    _, total = _add_rms_norm(x, residual, weight, eps)
    return (*_codes_and_scales(x, qdtype), total)


def _add_rms_norm_quant_reference(x, residual, weight, eps, qdtype):
    normed, total = _add_rms_norm_reference(x, residual, weight, eps)
    return (*quantize_tokens(normed, qdtype), total)


def _scaled_linear(codes: TensorType, scales: TensorType, qweight: TensorType, weight_scale: TensorType,
                   bias: TensorType | None, dtype) -> TensorType:
    if codes.dtype not in CODE_DTYPES or codes.rank < 1 or qweight.dtype != codes.dtype or qweight.rank != 2:
        raise ShapeError(f"scaled_linear needs E4M3 or INT8 codes [..., in] and a weight [out, in] of the same "
                         f"dtype, got {codes} and {qweight}")
    if not dims_equal(codes.shape[-1], qweight.shape[1]):
        raise ShapeError(f"input features {codes.shape[-1]} do not match weight {qweight}")
    if scales.dtype != dtypes.float32 or not shapes_equal(scales.shape, codes.shape[:-1] + (1,)):
        raise ShapeError(f"the token scales must be f32{list(codes.shape[:-1]) + [1]}, got {scales}")
    if weight_scale.dtype != dtypes.float32 or weight_scale.rank != 1 \
            or not dims_equal(weight_scale.shape[0], qweight.shape[0]):
        raise ShapeError(f"the weight scales must be f32[{qweight.shape[0]}] (one per output channel), "
                         f"got {weight_scale}")
    if not dtype.is_float or dtype in CODE_DTYPES:
        raise ShapeError(f"scaled_linear computes a floating-point output, not {dtype}")
    if bias is not None and (bias.rank != 1 or bias.dtype != dtype or not dims_equal(bias.shape[0], qweight.shape[0])):
        raise ShapeError(f"bias {bias} does not match weight {qweight} and output dtype {dtype}")
    return TensorType(dtype, codes.shape[:-1] + (qweight.shape[0],))


def _scaled_linear_reference(codes, scales, qweight, weight_scale, bias, dtype):
    return scaled_product(codes, scales, qweight, weight_scale, bias).to(dtype.torch_dtype)


_QDTYPE = {"qdtype": Attr("dtype")}
OPS = [
    OpDef("rms_norm_quant", ("x", "weight?"), _rms_norm_quant, _rms_norm_quant_reference,
          attrs={"eps": Attr("float", 1e-6), **_QDTYPE}, results=2,
          doc="rms_norm(x, weight) rounded per token into qdtype (E4M3 or INT8): (codes, f32 scales [..., 1])"),
    OpDef("add_rms_norm_quant", ("x", "residual", "weight?"), _add_rms_norm_quant, _add_rms_norm_quant_reference,
          attrs={"eps": Attr("float", 1e-6), **_QDTYPE}, results=3,
          doc="add_rms_norm with its normalized output rounded per token into qdtype: (codes, scales, x + residual)"),
    OpDef("scaled_linear", ("codes", "scales", "qweight", "weight_scale", "bias?"), _scaled_linear,
          _scaled_linear_reference, attrs={"dtype": Attr("dtype")},
          doc="(codes @ qweight.T) * scales * weight_scale + bias in float32, rounded to dtype: a W8A8 linear "
              "over activations quantized per token by the op that made them"),
]
