"""FP8 (E4M3) activations for ``linear_fp8`` over several rows: one Triton kernel rounds
each token into E4M3 with its own scale (its absolute maximum onto 448), then
``torch._scaled_mm`` multiplies on the FP8 tensor cores and applies the per-token and
per-channel scales to its float32 accumulator.

The quantizing kernel reads a row once and writes its codes and its scale: what took a
chain of eager kernels (abs, max, divide, clamp, cast) is one launch per layer input.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ir.opdefs.quantized import FP8_MAX

E4M3_MAX = tl.constexpr(FP8_MAX)
MIN_SCALE = tl.constexpr(1e-12)  # the reference's scale for an all-zero token (ir/opdefs/quantized.py)


@triton.jit
def _quantize_rows_kernel(x, codes, scales, static_scale, k, stride_x, stride_c, STATIC: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < k
    v = tl.load(x + row.to(tl.int64) * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(static_scale).to(tl.float32)
    else:
        scale = tl.maximum(tl.max(tl.abs(v), 0) / E4M3_MAX, MIN_SCALE)
    q = tl.clamp(v / scale, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv)
    tl.store(codes + row.to(tl.int64) * stride_c + cols, q, mask=ok)
    tl.store(scales + row, scale)


def quantize_rows(x2: torch.Tensor, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes of ``x2`` ``[m, k]``, float32 scales ``[m, 1]``): each row scaled by its
    own absolute maximum over 448, or by ``static_scale`` where given."""
    m, k = x2.shape
    codes = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    scales = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x2, codes, scales, static_scale if static_scale is not None else scales, k,
                                x2.stride(0), codes.stride(0), STATIC=static_scale is not None, BLOCK=block,
                                num_warps=min(16, max(4, block // 1024)))
    return codes, scales


def scaled_mm(x2: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
              bias: torch.Tensor | None) -> torch.Tensor:
    """``linear_fp8`` over the rows of ``x2`` on the FP8 tensor cores."""
    codes, scales = quantize_rows(x2, input_scale)
    return scaled_mm_codes(codes, scales, qweight, weight_scale, bias, x2.dtype)


def scaled_mm_codes(codes: torch.Tensor, scales: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """E4M3 ``codes [m, k]`` (scaled per row by ``scales [m, 1]``, or one scalar) times the
    E4M3 weight ``[n, k]`` (per channel) on the FP8 tensor cores, in ``out_dtype``."""
    out = torch._scaled_mm(codes, qweight.t(), scale_a=scales, scale_b=weight_scale.float()[None, :],
                           out_dtype=out_dtype)
    return out if bias is None else out.add_(bias)
