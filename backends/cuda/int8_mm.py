"""``linear_w8a8`` (SmoothQuant's INT8 W8A8) through ``torch._int_mm``: each token of the
input rounded to INT8 by its own scale, INT8 x INT8 products summed in int32 by cuBLASLt,
then the token and channel scales applied in float32 and the result rounded once to the
input's dtype, as the registry's reference computes it.

``torch._int_mm`` on CUDA takes more than 16 rows and inner and output dims that are
multiples of 8: fewer rows (decode) are padded with zero rows, which add nothing and are
dropped; weights of other dims run the reference. The weight is passed transposed, a
column-major view (as torchao does), so nothing is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...ir import REGISTRY
from ...ir.opdefs.quantized import int8_token_scales, quantize_int8_tokens

MIN_ROWS = 17  # torch._int_mm on CUDA needs more than 16 rows
ALIGN = 8  # and inner and output dims that are multiples of 8


def int_mm_rows(rows: int) -> int:
    """The rows ``torch._int_mm`` is called with for ``rows`` tokens (at least ``MIN_ROWS``)."""
    return max(rows, MIN_ROWS)


def linear_w8a8(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """The ``linear_w8a8`` op: ``x [..., in]`` against an INT8 ``qweight [out, in]``."""
    out_features, in_features = qweight.shape
    if out_features % ALIGN or in_features % ALIGN:
        return REGISTRY["linear_w8a8"].reference(x, qweight, weight_scale, bias)
    x2 = x.reshape(-1, in_features)
    scale = int8_token_scales(x2)
    out = int_mm_codes(quantize_int8_tokens(x2, scale), scale, qweight, weight_scale, bias, x.dtype)
    return out.view(*x.shape[:-1], out_features)


def int_mm_codes(codes: torch.Tensor, scale: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """INT8 ``codes [m, k]`` (scaled per row by ``scale [m, 1]``) times the INT8 weight
    ``[n, k]`` (per channel), summed in int32 by ``torch._int_mm``, scaled and biased in
    float32, rounded once to ``out_dtype``; the dims must be multiples of ``ALIGN``."""
    rows = codes.shape[0]
    padded = int_mm_rows(rows)
    if padded != rows:
        codes = F.pad(codes, (0, 0, 0, padded - rows))
    product = torch._int_mm(codes, qweight.t())[:rows]
    out = product.float() * scale * weight_scale.float()
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)
