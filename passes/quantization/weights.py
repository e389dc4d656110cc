"""Round-to-nearest weight quantizers: a float ``[out, in]`` weight to the stored operands
of a quantized linear op (``ir/opdefs/quantized.py`` says what each op computes).

- INT8: one scale per output channel, symmetric, codes in [-127, 127];
- INT4: one scale (and zero point) per output channel and group of ``group`` input
  features, codes 0..15 packed two a byte; symmetric keeps zero point 8 and codes in
  [1, 15]; asymmetric fits each group's [min, max] (widened to hold 0) onto 0..15;
- FP8: one scale per output channel mapping the row's absolute maximum onto 448.

Scales are float32, except INT4's group scales, which are kept in the model's dtype as
the GPTQ and AWQ formats keep them.
"""

from __future__ import annotations

import torch

from ...ir.opdefs.quantized import FP8_MAX, quantize_fp8

_TINY = 1e-12


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes ``i8[out, in]``, scale ``f32[out]``) with ``weight ~= codes * scale[:, None]``."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=_TINY)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(weight: torch.Tensor, group: int, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """(packed codes ``u8[out, in/2]``, scales ``[out, in/group]`` in the weight's dtype,
    zero points ``u8[out, in/group]``), with ``weight ~= (codes - zero) * scale`` per group."""
    out_features, in_features = weight.shape
    if in_features % group or group % 2:
        raise ValueError(f"INT4 groups of {group} do not divide {in_features} input features evenly")
    w = weight.float().reshape(out_features, in_features // group, group)
    scale, zero = int4_group_params(w, symmetric, weight.dtype)
    codes = int4_codes(w, scale[..., None], zero[..., None])
    return pack_int4_codes(codes.reshape(out_features, in_features)), scale, zero.to(torch.uint8)


def int4_group_params(w: torch.Tensor, symmetric: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale (in ``dtype``) and zero point (float, 0..15) of each group of the last dim
    of ``w``: symmetric keeps zero 8; asymmetric maps [min, max] (widened to hold 0) onto 0..15."""
    w = w.float()
    if symmetric:
        scale = (w.abs().amax(dim=-1) / 7).clamp(min=_TINY)
        zero = torch.full_like(scale, 8.0)
    else:
        low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=_TINY)
        zero = (-low / scale).round().clamp(0, 15)
    return _round_up(scale, dtype), zero  # as stored; never below the range's need, so nothing clips


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The INT4 codes (uint8, 0..15) of ``w`` for ``scale`` and ``zero`` (broadcast)."""
    return (w.float() / scale.float() + zero).round().clamp(0, 15).to(torch.uint8)


def _round_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, rounded up where rounding to nearest went down."""
    rounded = values.to(dtype)
    return torch.where(rounded.float() < values, torch.nextafter(rounded, torch.full_like(rounded, torch.inf)),
                       rounded)


def pack_int4_codes(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (``[out, in]``, in even) packed two a byte, the even index in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def quantize_fp8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes ``[out, in]``, scale ``f32[out]``) with ``weight ~= codes * scale[:, None]``."""
    scale = (weight.float().abs().amax(dim=1) / FP8_MAX).clamp(min=_TINY)
    return quantize_fp8(weight, scale[:, None]), scale


def int4_group_size(in_features: int, group_size: int) -> int:
    """``group_size`` where it divides ``in_features``, else the largest even divisor of
    ``in_features`` below it (a hidden size of 576 takes groups of 96 for 128)."""
    if in_features % 2:
        raise ValueError(f"INT4 packs two codes a byte: {in_features} input features is odd")
    for group in range(min(group_size, in_features), 1, -1):
        if in_features % group == 0 and group % 2 == 0:
            return group
    raise ValueError(f"no even INT4 group size up to {group_size} divides {in_features}")
