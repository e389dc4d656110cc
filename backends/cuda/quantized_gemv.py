"""One-row quantized ``linear`` (batch-1 decode), where a step is bound by reading the
weight's stored bits once.

A program takes ``block_n`` weight rows and walks the input dimension in tiles,
converting the codes to float32 in registers:

- 8-bit codes (``linear_int8``'s INT8, ``linear_fp8``'s E4M3): products accumulate per
  element and reduce once; a per-channel scale multiplies the row's sum, grouped scales
  (``group`` inputs each) multiply each group's partial sum. For ``linear_fp8`` the input
  row is first rounded into E4M3 with its own scale (or the static one) exactly as the
  op's reference does, so the GEMV computes the op, not a weight-only approximation.
- 4-bit codes (``linear_int4``): a tile holds ``groups_per_tile`` whole groups; each
  group's dot product of codes and input is taken unscaled as the tile is read, then
  ``scale * (dot - zero * sum(x over the group))`` is added, so the per-element work is a
  nibble extraction and one multiply-add. (Accumulating scaled products per element and
  reducing once at the end, as the 8-bit GEMV does, was measured slower at every
  Llama-3.1-8B shape on the H100.)

Integer codes become floats without the int-to-float unit, which converts 16 values a
clock per multiprocessor on Hopper and capped the INT4 GEMV near 1.5 TB/s: a code below
2^23 OR-ed into the bits of 2^23 is the float 2^23 + code, and one subtraction leaves the
code (``integer_floats``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fp8 import E4M3_MAX, MIN_SCALE


@dataclass(frozen=True)
class QuantGemvConfig:
    """Launch parameters: weight rows a program, input elements a tile (8-bit codes) or
    whole groups a tile (4-bit codes), warps."""

    block_n: int = 8
    block_k: int = 512
    groups_per_tile: int = 4
    num_warps: int = 4


def gemv_candidates(bits: int) -> list[QuantGemvConfig]:
    """The configurations build-time tuning times for codes of ``bits`` bits."""
    if bits == 8:
        return [QuantGemvConfig(block_n, block_k, 1, warps) for block_n, block_k in
                ((4, 1024), (8, 512), (8, 1024), (16, 512), (16, 256), (32, 256)) for warps in (4, 8)]
    return [QuantGemvConfig(block_n, 0, groups, warps) for block_n, groups in
            ((4, 8), (8, 4), (8, 8), (16, 2), (16, 4), (32, 1), (32, 2)) for warps in (4, 8)]


_TWO_23 = tl.constexpr(8388608.0)  # 2^23: its float32 bits are 0x4B000000, with room for the code below them


@triton.jit
def integer_floats(codes, offset: tl.constexpr):
    """``codes`` (int32, ``-offset <= code < 2^23 - offset``) as exact float32 values:
    ``code + offset`` written into the mantissa of 2^23, then 2^23 + offset taken away."""
    return (codes + (0x4B000000 + offset)).to(tl.float32, bitcast=True) - (_TWO_23 + offset)


@triton.jit
def _w8_gemv_kernel(x, q, scale, input_scale, bias, out, n, k, stride_q, stride_s,
                    FP8_CODES: tl.constexpr, FP8_INPUT: tl.constexpr, STATIC_INPUT: tl.constexpr, GROUP: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    x_scale = 1.0
    if FP8_INPUT:
        if STATIC_INPUT:
            x_scale = tl.load(input_scale).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK_K], tl.float32)
            for start in range(0, k, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                amax = tl.maximum(amax, tl.abs(tl.load(x + cols, mask=cols < k, other=0.0).to(tl.float32)))
            x_scale = tl.maximum(tl.max(amax, 0) / E4M3_MAX, MIN_SCALE)
    if GROUP == 0:
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K // GROUP], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < k
        xv = tl.load(x + cols, mask=col_ok, other=0.0).to(tl.float32)
        if FP8_INPUT:
            xv = tl.clamp(xv / x_scale, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv).to(tl.float32)
        codes = tl.load(q + rows.to(tl.int64)[:, None] * stride_q + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        if FP8_CODES:
            weights = codes.to(tl.float32)
        else:
            weights = integer_floats(codes.to(tl.int32), 128)
        products = weights * xv[None, :]
        if GROUP == 0:
            acc += products
        else:
            groups = start // GROUP + tl.arange(0, BLOCK_K // GROUP)
            s = tl.load(scale + rows.to(tl.int64)[:, None] * stride_s + groups[None, :],
                        mask=row_ok[:, None] & (groups < k // GROUP)[None, :], other=0.0)
            acc += tl.sum(tl.reshape(products, [BLOCK_N, BLOCK_K // GROUP, GROUP]), 2) * s
    y = tl.sum(acc, 1)
    if GROUP == 0:
        y *= tl.load(scale + rows, mask=row_ok, other=0.0)
    if FP8_INPUT:
        y *= x_scale
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)


@triton.jit
def _int4_gemv_kernel(x, q, scales, zeros, bias, out, n, half_k, stride_q, stride_s, HAS_BIAS: tl.constexpr,
                               BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUPS_PER_TILE: tl.constexpr):
    HALF: tl.constexpr = GROUP // 2  # bytes a group
    TILE: tl.constexpr = GROUPS_PER_TILE * HALF
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_N, GROUPS_PER_TILE], tl.float32)
    for start in range(0, half_k, TILE):
        pairs = start + tl.arange(0, TILE)  # byte j holds input elements 2j (low nibble) and 2j+1
        pair_ok = pairs < half_k
        x_even = tl.load(x + 2 * pairs, mask=pair_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x + 2 * pairs + 1, mask=pair_ok, other=0.0).to(tl.float32)
        codes = tl.load(q + rows.to(tl.int64)[:, None] * stride_q + pairs[None, :],
                        mask=row_ok[:, None] & pair_ok[None, :], other=0).to(tl.int32)
        products = integer_floats(codes & 0xF, 0) * x_even[None, :] + integer_floats(codes >> 4, 0) * x_odd[None, :]
        dots = tl.sum(tl.reshape(products, [BLOCK_N, GROUPS_PER_TILE, HALF]), 2)
        x_sums = tl.sum(tl.reshape(x_even + x_odd, [GROUPS_PER_TILE, HALF]), 1)
        groups = start // HALF + tl.arange(0, GROUPS_PER_TILE)
        at = rows.to(tl.int64)[:, None] * stride_s + groups[None, :]
        ok = row_ok[:, None] & (groups < half_k // HALF)[None, :]
        s = tl.load(scales + at, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(zeros + at, mask=ok, other=0).to(tl.float32)
        acc += s * (dots - z * x_sums[None, :])
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)


def is_power_of_two(value: int) -> bool:
    """Whether ``value`` is a positive power of two (the GEMVs' group sizes must be)."""
    return value > 0 and value & (value - 1) == 0


def w8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
            config: QuantGemvConfig, *, fp8_input: bool = False, input_scale: torch.Tensor | None = None
            ) -> torch.Tensor:
    """``x @ (codes * scale).T + bias`` for one row of ``x`` and 8-bit codes (INT8 or
    E4M3), ``scale`` per output channel ``[n]`` or per group ``[n, groups]``; with
    ``fp8_input`` the row is first rounded into E4M3 by its own (or the static) scale."""
    n, k = qweight.shape
    group = 0 if scale.dim() == 1 else k // scale.shape[1]
    block_k = config.block_k if group == 0 else max(config.block_k, group)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _w8_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, qweight, scale, input_scale if input_scale is not None else scale, bias if bias is not None else scale,
        out, n, k, qweight.stride(0), scale.stride(0), FP8_CODES=qweight.dtype == torch.float8_e4m3fn,
        FP8_INPUT=fp8_input, STATIC_INPUT=input_scale is not None, GROUP=group, HAS_BIAS=bias is not None,
        BLOCK_N=config.block_n, BLOCK_K=block_k, num_warps=config.num_warps)
    return out


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              bias: torch.Tensor | None, config: QuantGemvConfig) -> torch.Tensor:
    """``x @ ((codes - zeros) * scales).T + bias`` for one row of ``x`` and packed 4-bit
    codes in groups of a power-of-two size."""
    n, half_k = qweight.shape
    group = 2 * half_k // scales.shape[1]
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _int4_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, qweight, scales, zeros, bias if bias is not None else scales, out, n, half_k, qweight.stride(0),
        scales.stride(0), HAS_BIAS=bias is not None, BLOCK_N=config.block_n, GROUP=group,
        GROUPS_PER_TILE=config.groups_per_tile, num_warps=config.num_warps)
    return out
