"""Quantized ``linear`` layers on the GPU (the ops of ``ir/opdefs/quantized.py``).

Weight-only INT8 and INT4 are Triton kernels that read the weight in its stored bits and
dequantize it in registers, so a decode step reads a half or a quarter of the bf16
bytes:

- one row (batch-1 decode): a GEMV, a program per ``block_n`` output rows walking the
  input in tiles, multiply-adds in float32 and one reduction at the end;
- more rows: a tiled GEMM whose weight tiles are dequantized to the input's dtype
  before ``tl.dot``.

INT4 codes sit two a byte, the even input index in the low nibble: a tile of bytes meets
the input's even and odd elements separately, and each (row, group) has a scale and a
zero point. INT8's per-channel scale multiplies the accumulated row once.

FP8 (W8A8) scales each token of the input into E4M3 and multiplies on the tensor cores
with ``torch._scaled_mm``, the per-token and per-channel scales applied to its float32
accumulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...ir import REGISTRY
from ...ir.opdefs.quantized import fp8_token_scales, quantize_fp8


@dataclass(frozen=True)
class QuantGemvConfig:
    """GEMV launch parameters: output rows a program, input elements a tile, warps."""

    block_n: int = 16
    block_k: int = 256
    num_warps: int = 4


@dataclass(frozen=True)
class QuantGemmConfig:
    """GEMM launch parameters: the output tile, input elements a step, warps, stages."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class QuantLinearConfig:
    """Launch parameters of a weight-only quantized ``linear``: its GEMV and its GEMM."""

    gemv: QuantGemvConfig = QuantGemvConfig()
    gemm: QuantGemmConfig = QuantGemmConfig()


@triton.jit
def _int8_gemv_kernel(x, q, scale, bias, out, n, k, stride_q, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < k
        xv = tl.load(x + cols, mask=col_ok, other=0.0).to(tl.float32)
        codes = tl.load(q + rows.to(tl.int64)[:, None] * stride_q + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0)
        acc += codes.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, 1) * tl.load(scale + rows, mask=row_ok, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)


@triton.jit
def _int4_gemv_kernel(x, q, scales, zeros, bias, out, n, half_k, groups, group, stride_q, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_N, BLOCK_KH], tl.float32)
    for start in range(0, half_k, BLOCK_KH):
        pairs = start + tl.arange(0, BLOCK_KH)  # byte j holds input elements 2j and 2j+1
        pair_ok = pairs < half_k
        tile_ok = row_ok[:, None] & pair_ok[None, :]
        x_even = tl.load(x + 2 * pairs, mask=pair_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x + 2 * pairs + 1, mask=pair_ok, other=0.0).to(tl.float32)
        codes = tl.load(q + rows.to(tl.int64)[:, None] * stride_q + pairs[None, :], mask=tile_ok, other=0).to(tl.int32)
        at = rows.to(tl.int64)[:, None] * groups + (2 * pairs // group)[None, :]
        s = tl.load(scales + at, mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.load(zeros + at, mask=tile_ok, other=0).to(tl.int32)
        acc += (((codes & 0xF) - z).to(tl.float32) * x_even[None, :] + ((codes >> 4) - z).to(tl.float32)
                * x_odd[None, :]) * s
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)


@triton.jit
def _weight_only_gemm_kernel(x, q, scales, zeros, bias, out, m, n, k, stride_x, stride_q, stride_o, groups, group,
                             INT4: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n
    x_rows = x + rows.to(tl.int64)[:, None] * stride_x
    q_rows = q + cols.to(tl.int64)[:, None] * stride_q
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        if INT4:
            pairs = start // 2 + tl.arange(0, BLOCK_K // 2)
            pair_ok = 2 * pairs < k
            a_even = tl.load(x_rows + 2 * pairs[None, :], mask=row_ok[:, None] & pair_ok[None, :], other=0.0)
            a_odd = tl.load(x_rows + 2 * pairs[None, :] + 1, mask=row_ok[:, None] & pair_ok[None, :], other=0.0)
            tile_ok = col_ok[:, None] & pair_ok[None, :]
            codes = tl.load(q_rows + pairs[None, :], mask=tile_ok, other=0).to(tl.int32)
            at = cols.to(tl.int64)[:, None] * groups + (2 * pairs // group)[None, :]
            s = tl.load(scales + at, mask=tile_ok, other=0.0).to(tl.float32)
            z = tl.load(zeros + at, mask=tile_ok, other=0).to(tl.int32)
            w_even = (((codes & 0xF) - z).to(tl.float32) * s).to(a_even.dtype)
            w_odd = (((codes >> 4) - z).to(tl.float32) * s).to(a_odd.dtype)
            acc += tl.dot(a_even, tl.trans(w_even)) + tl.dot(a_odd, tl.trans(w_odd))
        else:
            ks = start + tl.arange(0, BLOCK_K)
            k_ok = ks < k
            a = tl.load(x_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            codes = tl.load(q_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0)
            acc += tl.dot(a, tl.trans(codes.to(a.dtype)))
    if not INT4:
        acc *= tl.load(scales + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _gemm(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
          bias: torch.Tensor | None, out: torch.Tensor, config: QuantGemmConfig) -> None:
    m, k = x2.shape
    n = qweight.shape[0]
    groups = scales.shape[1] if zeros is not None else 1
    block_m = max(16, min(config.block_m, triton.next_power_of_2(m)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, config.block_n))
    _weight_only_gemm_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, m, n, k,
        x2.stride(0), qweight.stride(0), out.stride(0), groups, k // groups, INT4=zeros is not None,
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages)


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, *,
                config: QuantLinearConfig | None = None) -> torch.Tensor:
    """The ``linear_int8`` op: the GEMV for one row, the GEMM for more."""
    n, k = qweight.shape
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    config = config or QuantLinearConfig()
    if x2.shape[0] == 1:
        _int8_gemv_kernel[(triton.cdiv(n, config.gemv.block_n),)](
            x2, qweight, scale, bias if bias is not None else scale, out, n, k, qweight.stride(0),
            HAS_BIAS=bias is not None, BLOCK_N=config.gemv.block_n, BLOCK_K=config.gemv.block_k,
            num_warps=config.gemv.num_warps)
    elif x2.shape[0]:
        _gemm(x2, qweight, scale, None, bias, out, config.gemm)
    return out.view(*x.shape[:-1], n)


def linear_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                bias: torch.Tensor | None = None, *, config: QuantLinearConfig | None = None) -> torch.Tensor:
    """The ``linear_int4`` op: the GEMV for one row, the GEMM for more."""
    n, half_k = qweight.shape
    x2 = _rows(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    groups = scales.shape[1]
    config = config or QuantLinearConfig()
    if x2.shape[0] == 1:
        _int4_gemv_kernel[(triton.cdiv(n, config.gemv.block_n),)](
            x2, qweight, scales, zeros, bias if bias is not None else scales, out, n, half_k, groups,
            2 * half_k // groups, qweight.stride(0), HAS_BIAS=bias is not None, BLOCK_N=config.gemv.block_n,
            BLOCK_KH=config.gemv.block_k // 2, num_warps=config.gemv.num_warps)
    elif x2.shape[0]:
        _gemm(x2, qweight, scales, zeros, bias, out, config.gemm)
    return out.view(*x.shape[:-1], n)


def linear_fp8(x: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
               input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The ``linear_fp8`` op: the input scaled into E4M3 per token (or by the static
    ``input_scale``), then ``torch._scaled_mm`` with both scales, for bfloat16 inputs on a
    GPU with FP8 tensor cores; the registry's reference elsewhere."""
    if x.dtype != torch.bfloat16 or x.device.type != "cuda":
        return REGISTRY["linear_fp8"].reference(x, qweight, weight_scale, input_scale, bias)
    x2 = _rows(x)
    scale = fp8_token_scales(x2) if input_scale is None else input_scale.float().expand(x2.shape[0], 1)
    out = torch._scaled_mm(quantize_fp8(x2, scale), qweight.t(), scale_a=scale.contiguous(),
                           scale_b=weight_scale.float()[None, :], out_dtype=x.dtype)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], qweight.shape[0])
