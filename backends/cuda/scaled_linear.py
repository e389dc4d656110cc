"""``scaled_linear`` on the GPU: a W8A8 layer over activations that the norm before it
already quantized per token (``norm_quant.py``), so the GEMM reads the codes and scales
as they are. E4M3 codes go to ``torch._scaled_mm`` (bfloat16 outputs on FP8 tensor
cores, ``fp8.py``), INT8 codes to ``torch._int_mm`` (``int8_mm.py``): one GEMM call and
nothing before it. One row of E4M3 codes (batch-1 decode) runs the FP8 GEMV over the
codes and the row's scale as they are (``quantized_gemv.py``), tuned per weight shape.
Elsewhere (other devices or dtypes, INT8 dims that ``torch._int_mm`` refuses) the
registry's reference runs.
"""

from __future__ import annotations

import torch

from ...ir import REGISTRY
from .fp8 import scaled_mm_codes
from .int8_mm import ALIGN, int_mm_codes
from .quantized import PerShape, linear_config
from .quantized_gemv import fp8_gemv


def _supported(codes: torch.Tensor, qweight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    if codes.device.type != "cuda":
        return False
    if codes.dtype == torch.float8_e4m3fn:
        return out_dtype == torch.bfloat16
    return not (qweight.shape[0] % ALIGN or qweight.shape[1] % ALIGN)


def scaled_linear(codes: torch.Tensor, scales: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, *, dtype, config: PerShape | None = None) -> torch.Tensor:
    """The ``scaled_linear`` op: ``codes [..., in]`` with ``scales [..., 1]`` against the
    weight codes ``[out, in]`` of the same dtype, in ``dtype``; one row of E4M3 codes runs
    the FP8 GEMV with the weight shape's tuned ``config``."""
    out_dtype = dtype.torch_dtype
    if not _supported(codes, qweight, out_dtype):
        return REGISTRY["scaled_linear"].reference(codes, scales, qweight, weight_scale, bias, dtype)
    n, k = qweight.shape
    codes2, scales2 = codes.reshape(-1, k), scales.reshape(-1, 1)
    if codes2.shape[0] == 1 and codes.dtype == torch.float8_e4m3fn:
        out = fp8_gemv(codes2, qweight, weight_scale, scales2, bias, linear_config(config, n, k).gemv, out_dtype)
    else:
        matmul = scaled_mm_codes if codes.dtype == torch.float8_e4m3fn else int_mm_codes
        out = matmul(codes2, scales2, qweight, weight_scale, bias, out_dtype)
    return out.view(*codes.shape[:-1], n)
