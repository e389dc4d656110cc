"""RMSNorm that emits its output quantized per token, for the W8A8 layers it feeds: the
CUDA kernels of ``rms_norm_quant`` and ``add_rms_norm_quant``
(``ir/opdefs/quantized_activations.py``).

One program normalizes ``block_rows`` rows, each whole in one block (``norms.py``'s
layout): the residual add (rounded to the input's dtype, stored), the normalization in
float32 rounded to the input's dtype, the weight, the product rounded again (the norm's
output as ``rms_norm`` gives it), then each row's absolute maximum, its scale (onto 448
for E4M3, 127 for INT8) and its codes. The activation is written once, in 8 bits, where
the unfused graph wrote it in 16 and read it back to quantize it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ir.opdefs.quantized import FP8_MAX, INT8_MAX
from .norms import NormConfig, as_rows, default_norm_config, rows_with_residual

MIN_SCALE = tl.constexpr(1e-12)  # the reference's scale for an all-zero token
_ROUNDING = tl.constexpr(12582912.0)  # 1.5 * 2^23: adding and taking it away rounds to the nearest even integer
CODE_MAX = {torch.float8_e4m3fn: FP8_MAX, torch.int8: INT8_MAX}


@triton.jit(do_not_specialize=["rows"])  # one compilation for every row count
def _norm_quant_kernel(x_ptr, res_ptr, w_ptr, codes_ptr, scales_ptr, sum_ptr, rows, n, x_stride, res_stride, eps,
                       HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, INT8: tl.constexpr,
                       CODE_MAX: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    x, row, col, mask = rows_with_residual(x_ptr, res_ptr, sum_ptr, rows, n, x_stride, res_stride, HAS_RESIDUAL,
                                           BLOCK_ROWS, BLOCK)
    h = x.to(tl.float32)
    h = (h * tl.rsqrt(tl.sum(h * h, axis=1, keep_dims=True) / n + eps)).to(x.dtype).to(tl.float32)
    if HAS_WEIGHT:
        h = (h * tl.load(w_ptr + col, mask=col < n, other=0.0).to(tl.float32)).to(x.dtype).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(h), axis=1, keep_dims=True) / CODE_MAX, MIN_SCALE)
    v = tl.clamp(h / scale, -CODE_MAX, CODE_MAX)
    if INT8:
        codes = ((v + _ROUNDING) - _ROUNDING).to(tl.int8)
    else:
        codes = v.to(tl.float8e4nv)
    tl.store(codes_ptr + row * n + col, codes, mask=mask)
    tl.store(scales_ptr + row, scale, mask=row < rows)


def _normalize_quantize(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                        qdtype, config: NormConfig | None) -> tuple[torch.Tensor, ...]:
    """Launch the kernel: (codes, float32 scales ``[..., 1]``) and the sum x + residual where given."""
    code_dtype = qdtype.torch_dtype
    if code_dtype not in CODE_MAX:
        raise ValueError(f"the norm quantizes activations to E4M3 or INT8, not {qdtype}")
    n = x.shape[-1]
    codes = torch.empty(x.shape, dtype=code_dtype, device=x.device)
    scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    if x.numel() == 0:
        return codes, scales, total
    x2 = as_rows(x, n)
    res2 = as_rows(residual, n) if residual is not None else x2
    rows = x2.shape[0]
    config = config or default_norm_config(rows, n)
    _norm_quant_kernel[(triton.cdiv(rows, config.block_rows),)](
        x2, res2, weight.contiguous() if weight is not None else x2, codes, scales,
        total if total is not None else x2, rows, n, x2.stride(0), res2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, INT8=code_dtype == torch.int8,
        CODE_MAX=CODE_MAX[code_dtype], BLOCK_ROWS=config.block_rows, BLOCK=triton.next_power_of_2(n),
        num_warps=config.num_warps)
    return codes, scales, total


def rms_norm_quant(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float, qdtype,
                   config: NormConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``rms_norm_quant`` op: (codes in ``qdtype``, float32 scales ``[..., 1]``)."""
    codes, scales, _ = _normalize_quantize(x, None, weight, eps, qdtype, config)
    return codes, scales


def add_rms_norm_quant(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float,
                       qdtype, config: NormConfig | None = None) -> tuple[torch.Tensor, ...]:
    """The ``add_rms_norm_quant`` op: (codes, scales, x + residual), the sum in x's dtype."""
    return _normalize_quantize(x, residual, weight, eps, qdtype, config)
