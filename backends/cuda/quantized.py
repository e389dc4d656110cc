"""Quantized ``linear`` layers on the GPU (the ops of ``ir/opdefs/quantized.py``): which
kernel runs a call, by the number of rows.

- ``linear_int8``, ``linear_int4``: one row (batch-1 decode), a GEMV over the stored bits
  (``quantized_gemv.py``); 2 to ``dequantize_from - 1`` rows, a Triton GEMM dequantizing
  weight tiles (``quantized_gemm.py``); from ``dequantize_from`` rows, the weight
  dequantized once and cuBLAS;
- ``linear_fp8``: one row, the same GEMV with the row rounded into E4M3 first; more rows,
  the rows quantized by one kernel, then ``torch._scaled_mm`` (``fp8.py``).

Launch parameters come per weight shape from build-time tuning (``tuning.py``): the
engine stores ``shape_key(n, k)`` -> the fields of a ``QuantLinearConfig``, which
``per_shape`` turns into the ``config`` the launchers take once, when the kernel table is
made (a decode step's launches must cost the host nothing more); shapes not tuned take
the defaults. Shapes that the GEMV does not fit (``integer_gemv_fits``: a hidden size of 576
takes INT4 groups of 96) go through the dequantized weight at every row count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ir import REGISTRY
from .configs import config_from_dict, shape_key
from .fp8 import scaled_mm
from .quantized_gemm import QuantGemmConfig, dequantize, weight_only_gemm
from .quantized_gemv import QuantGemvConfig, fp8_gemv, integer_gemv, integer_gemv_fits


@dataclass(frozen=True)
class QuantLinearConfig:
    """How a quantized ``linear`` of one weight shape runs: its GEMV, its GEMM, and the
    row count from which the weight is dequantized for cuBLAS instead."""

    gemv: QuantGemvConfig = QuantGemvConfig()
    gemm: QuantGemmConfig = QuantGemmConfig()
    dequantize_from: int = 512


_DEFAULT = QuantLinearConfig()
GEMV_OPS = ("linear_int8", "linear_int4", "linear_fp8")  # the ops launched here, each with a tuned GEMV
PerShape = Mapping[str, QuantLinearConfig]


def per_shape(stored: Mapping[str, Mapping]) -> dict[str, QuantLinearConfig]:
    """Weight shape -> configuration, from the fields an engine stores."""
    return {key: config_from_dict(QuantLinearConfig, fields) for key, fields in stored.items()}


def linear_config(config: PerShape | None, n: int, k: int) -> QuantLinearConfig:
    """The configuration for weight shape ``[n, k]``, or the defaults."""
    return config.get(shape_key(n, k), _DEFAULT) if config else _DEFAULT


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _weight_only(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, config: PerShape | None) -> torch.Tensor:
    x2 = _rows(x)
    rows, k = x2.shape
    n = qweight.shape[0]
    chosen = linear_config(config, n, k)
    kernels_fit = integer_gemv_fits(k, 0 if scales.dim() == 1 else k // scales.shape[1])
    if rows == 0:
        out = x2.new_empty((0, n))
    elif rows == 1 and kernels_fit:
        out = integer_gemv(x2, qweight, scales, zeros, bias, chosen.gemv)
    elif rows < chosen.dequantize_from and kernels_fit:
        out = weight_only_gemm(x2, qweight, scales, zeros, bias, chosen.gemm)
    else:
        out = F.linear(x2, dequantize(qweight, scales, zeros, x2.dtype), bias)
    return out.view(*x.shape[:-1], n)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zeros: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, *, config: PerShape | None = None) -> torch.Tensor:
    """The ``linear_int8`` op (float zero points with grouped scales, where given)."""
    return _weight_only(x, qweight, scale, zeros, bias, config)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None = None, *, config: PerShape | None = None) -> torch.Tensor:
    """The ``linear_int4`` op."""
    return _weight_only(x, qweight, scales, zeros, bias, config)


def linear_fp8(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
               config: PerShape | None = None) -> torch.Tensor:
    """The ``linear_fp8`` op: the GEMV for one row, ``torch._scaled_mm`` for more (bfloat16
    inputs on a GPU with FP8 tensor cores); the registry's reference elsewhere."""
    if x.device.type != "cuda" or x.dtype != torch.bfloat16:
        return REGISTRY["linear_fp8"].reference(x, qweight, weight_scale, input_scale, bias)
    x2 = _rows(x)
    n, k = qweight.shape
    if x2.shape[0] == 1:
        out = fp8_gemv(x2, qweight, weight_scale, input_scale, bias, linear_config(config, n, k).gemv)
    else:
        out = scaled_mm(x2, qweight, weight_scale, input_scale, bias)
    return out.view(*x.shape[:-1], n)
