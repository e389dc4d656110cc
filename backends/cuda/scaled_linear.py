"""``scaled_linear`` on the GPU: a W8A8 layer over activations that the norm before it
already quantized per token (``norm_quant.py``), so the GEMM reads the codes and scales
as they are. E4M3 codes go to ``torch._scaled_mm`` (bfloat16 outputs on FP8 tensor
cores, ``fp8.py``), INT8 codes to ``torch._int_mm`` (``int8_mm.py``); at every row count,
one GEMM call and nothing before it. Elsewhere (other devices or dtypes, INT8 dims that
``torch._int_mm`` refuses) the registry's reference runs.
"""

from __future__ import annotations

import torch

from ...ir import REGISTRY
from .fp8 import scaled_mm_codes
from .int8_mm import ALIGN, int_mm_codes


def _supported(codes: torch.Tensor, qweight: torch.Tensor, out_dtype: torch.dtype) -> bool:
    if codes.device.type != "cuda":
        return False
    if codes.dtype == torch.float8_e4m3fn:
        return out_dtype == torch.bfloat16
    return not (qweight.shape[0] % ALIGN or qweight.shape[1] % ALIGN)


def scaled_linear(codes: torch.Tensor, scales: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, *, dtype) -> torch.Tensor:
    """The ``scaled_linear`` op: ``codes [..., in]`` with ``scales [..., 1]`` against the
    weight codes ``[out, in]`` of the same dtype, in ``dtype``."""
    out_dtype = dtype.torch_dtype
    if not _supported(codes, qweight, out_dtype):
        return REGISTRY["scaled_linear"].reference(codes, scales, qweight, weight_scale, bias, dtype)
    n, k = qweight.shape
    codes2, scales2 = codes.reshape(-1, k), scales.reshape(-1, 1)
    matmul = scaled_mm_codes if codes.dtype == torch.float8_e4m3fn else int_mm_codes
    return matmul(codes2, scales2, qweight, weight_scale, bias, out_dtype).view(*codes.shape[:-1], n)
