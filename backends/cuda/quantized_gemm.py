"""Quantized ``linear`` over several rows: a Triton GEMM that dequantizes weight tiles in
registers, and, for long prefills, the weight dequantized once into the input's dtype
and multiplied by cuBLAS.

In the GEMM each weight tile is turned into the input's dtype before ``tl.dot``: INT4
codes (two a byte, even input index in the low nibble) are unpacked by interleaving the
low and high nibbles; INT8 codes are converted. Group scales and zero points (of INT4
codes, or of INT8 codes with grouped scales) are read per element of the tile (they hit
the cache); a per-channel INT8 scale multiplies the accumulator once. The dequantizing
kernel writes ``[n, k]`` in one pass; with many rows its cost (a read of the codes and a
write of the weight) is small next to the product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .quantized_gemv import integer_floats


@dataclass(frozen=True)
class QuantGemmConfig:
    """GEMM launch parameters: the output tile, input elements a step, warps, stages."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 4


@triton.jit
def _dequantized_tile(q, scales, zeros, cols, col_ok, start, k, stride_q, stride_s, group, BLOCK_K: tl.constexpr,
                      INT4: tl.constexpr, GROUPED: tl.constexpr, HAS_ZEROS: tl.constexpr, ALIGNED: tl.constexpr):
    """The weight's tile of rows ``cols`` and inputs ``start + [0, BLOCK_K)`` in float32
    (a per-channel INT8 scale left out), zero outside the weight. ``ALIGNED``: the tile
    lies inside one group, so each row has one scale and zero point in it."""
    ks = start + tl.arange(0, BLOCK_K)
    ok = col_ok[:, None] & (ks < k)[None, :]
    if INT4:
        pairs = start // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(q + cols.to(tl.int64)[:, None] * stride_q + pairs[None, :],
                         mask=col_ok[:, None] & (pairs < k // 2)[None, :], other=0).to(tl.int32)
        codes = integer_floats(tl.interleave(packed & 0xF, packed >> 4), 0)
    else:
        codes = integer_floats(tl.load(q + cols.to(tl.int64)[:, None] * stride_q + ks[None, :], mask=ok,
                                       other=0).to(tl.int32), 128)
    if GROUPED:
        if ALIGNED:
            at = (cols.to(tl.int64) * stride_s + start // group)[:, None]
            at_ok = col_ok[:, None]
        else:
            at = cols.to(tl.int64)[:, None] * stride_s + (ks // group)[None, :]
            at_ok = ok
        if HAS_ZEROS:
            codes -= tl.load(zeros + at, mask=at_ok, other=0).to(tl.float32)
        codes *= tl.load(scales + at, mask=at_ok, other=0.0).to(tl.float32)
    return tl.where(ok, codes, 0.0)


@triton.jit
def _weight_only_gemm_kernel(x, q, scales, zeros, bias, out, m, n, k, stride_x, stride_q, stride_s, stride_o, group,
                             INT4: tl.constexpr, GROUPED: tl.constexpr, HAS_ZEROS: tl.constexpr,
                             ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < m, cols < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        a = tl.load(x + rows.to(tl.int64)[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & (ks < k)[None, :],
                    other=0.0)
        w = _dequantized_tile(q, scales, zeros, cols, col_ok, start, k, stride_q, stride_s, group, BLOCK_K, INT4,
                              GROUPED, HAS_ZEROS, ALIGNED)
        acc += tl.dot(a, tl.trans(w.to(a.dtype)))
    if not GROUPED:
        acc *= tl.load(scales + cols, mask=col_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + rows.to(tl.int64)[:, None] * stride_o + cols[None, :], acc.to(out.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dequantize_kernel(q, scales, zeros, out, n, k, stride_q, stride_s, group, INT4: tl.constexpr,
                       GROUPED: tl.constexpr, HAS_ZEROS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < n
    w = _dequantized_tile(q, scales, zeros, cols, col_ok, tl.program_id(1) * BLOCK_K, k, stride_q, stride_s, group,
                          BLOCK_K, INT4, GROUPED, HAS_ZEROS, ALIGNED)
    if not GROUPED:
        w *= tl.load(scales + cols, mask=col_ok, other=0.0)[:, None]
    tl.store(out + cols.to(tl.int64)[:, None] * k + ks[None, :], w.to(out.dtype.element_ty),
             mask=col_ok[:, None] & (ks < k)[None, :])


def _layout(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, block_k: int) -> dict:
    """The kernels' description of a quantized weight read in tiles of ``block_k``
    inputs: code width, grouping, zero points, whether a tile lies inside one group."""
    int4 = qweight.dtype == torch.uint8
    k = qweight.shape[1] * (2 if int4 else 1)
    grouped = scales.dim() == 2
    group = k // scales.shape[1] if grouped else k
    return dict(k=k, group=group, INT4=int4, GROUPED=grouped, HAS_ZEROS=zeros is not None,
                ALIGNED=group % block_k == 0)


def _block_k(qweight: torch.Tensor, scales: torch.Tensor, wanted: int) -> int:
    """``wanted``, or a group's size where groups are smaller and a power of two, so that
    every tile lies inside one group."""
    k = qweight.shape[1] * (2 if qweight.dtype == torch.uint8 else 1)
    group = k // scales.shape[1] if scales.dim() == 2 else k
    return group if group < wanted and group & (group - 1) == 0 and group >= 16 else wanted


def weight_only_gemm(x2: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bias: torch.Tensor | None, config: QuantGemmConfig) -> torch.Tensor:
    """``x2 @ dequantize(weight).T + bias`` for a 2-D ``x2`` of any number of rows."""
    m = x2.shape[0]
    n = qweight.shape[0]
    block_k = _block_k(qweight, scales, config.block_k)
    layout = _layout(qweight, scales, zeros, block_k)
    k = layout.pop("k")
    out = torch.empty((m, n), dtype=x2.dtype, device=x2.device)
    block_m = max(16, min(config.block_m, triton.next_power_of_2(m)))
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, config.block_n))
    _weight_only_gemm_kernel[grid](
        x2, qweight, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, m, n,
        k, x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0), **layout, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor:
    """The ``[n, k]`` weight in ``dtype`` that the stored codes, scales (and zero points)
    stand for."""
    n = qweight.shape[0]
    block_n, block_k = 32, _block_k(qweight, scales, 128)
    layout = _layout(qweight, scales, zeros, block_k)
    k = layout.pop("k")
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight, scales, zeros if zeros is not None else scales, out, n, k, qweight.stride(0), scales.stride(0),
        **layout, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
