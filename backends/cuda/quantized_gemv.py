"""One-row quantized ``linear`` (batch-1 decode), where a step is bound by reading the
weight's stored bits once.

A program takes ``block_n`` weight rows and walks the input dimension in tiles,
converting the codes to float32 in registers:

- Integer codes (``linear_int8``, ``linear_int4``, ``integer_gemv``) are read as int32
  words (four INT8 or eight 4-bit codes), and the input a word's codes take as one
  vector, split into columns in registers. Products accumulate per word; a per-channel
  scale multiplies the row's sum once, while with grouped scales (``group`` inputs each,
  a tile holding whole groups) each group's unscaled dot product is taken as the tile is
  read and ``scale * (dot - zero * sum(x over the group))`` is added. (Accumulating
  scaled products per element instead was measured slower at every Llama-3.1-8B shape on
  the H100.)
- E4M3 codes (``linear_fp8``, ``fp8_gemv``): the input row is first rounded into E4M3 with
  its own scale (or the static one) as the op's reference does, so the GEMV computes the
  op, not a weight-only approximation (multiplying by the scale's reciprocal: a code can
  differ from the reference's division only where the quotient lies within a float32
  rounding of an E4M3 rounding boundary); the hardware converts the codes.

Integer codes become floats without the int-to-float unit, which converts 16 values a
clock per multiprocessor on Hopper and capped the INT4 GEMV near 1.5 TB/s: a 4-bit code
moved to bits 16-19 and OR-ed into the bits of 128.0 is the float 128 + code, an 8-bit
one moved to bits 15-22 of 256.0 (its sign bit flipped) is 384 + code, and the constant
is taken away once a group, with the zero point (``_word_code_floats``): a code costs a
shift, a logic op and its multiply-add. The products stay exact in float32 (a bfloat16
input has 8 significant bits, the code plus constant 9). The multi-row GEMM converts its
codes with ``integer_floats``, an addition into 2^23's bits and a subtraction.
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
                ((4, 1024), (4, 2048), (8, 512), (8, 1024), (8, 2048), (16, 512), (16, 256), (32, 256))
                for warps in (4, 8)]
    return [QuantGemvConfig(block_n, 0, groups, warps) for block_n, groups in
            ((4, 8), (4, 16), (8, 4), (8, 8), (8, 16), (16, 2), (16, 4), (16, 8), (32, 1), (32, 2))
            for warps in (4, 8)]


_TWO_23 = tl.constexpr(8388608.0)  # 2^23: its float32 bits are 0x4B000000, with room for the code below them


@triton.jit
def integer_floats(codes, offset: tl.constexpr):
    """``codes`` (int32, ``-offset <= code < 2^23 - offset``) as exact float32 values:
    ``code + offset`` written into the mantissa of 2^23, then 2^23 + offset taken away."""
    return (codes + (0x4B000000 + offset)).to(tl.float32, bitcast=True) - (_TWO_23 + offset)


@triton.jit
def _word_code_floats(words, i: tl.constexpr, BITS: tl.constexpr):
    """Code ``i`` of each int32 word of ``32 // BITS`` codes as an exact float32 with
    ``_code_base(BITS)`` added: a 4-bit code moved to bits 16-19 of 128.0's bits is
    128 + code; an 8-bit one moved to bits 15-22 of 256.0's, its sign bit flipped, is
    384 + code. One shift and one logic op a value."""
    if BITS == 4:
        AT: tl.constexpr = 16
        BITS_OF_BASE: tl.constexpr = 0x43000000  # 128.0
    else:
        AT: tl.constexpr = 15
        BITS_OF_BASE: tl.constexpr = 0x43800000 | 0x400000  # 256.0, and the flip of the code's sign bit
    SHIFT: tl.constexpr = AT - BITS * i
    if SHIFT > 0:
        moved = words << SHIFT
    elif SHIFT < 0:
        moved = words >> -SHIFT
    else:
        moved = words
    return ((moved & (((1 << BITS) - 1) << AT)) ^ BITS_OF_BASE).to(tl.float32, bitcast=True)


@triton.jit
def _word_dots(packed, x_words, BITS: tl.constexpr, TILE: tl.constexpr):
    """Per word, the dot product of its codes (each with ``_word_code_floats``'s constant
    added) and their inputs, ``x_words`` ``[TILE, 32 // BITS]``: the input columns are split
    apart in registers, so the input is read with one vector load a word."""
    if BITS == 4:
        c0, c1 = tl.split(tl.reshape(x_words, [TILE, 2, 2, 2]))
        b00, b01 = tl.split(c0)
        b10, b11 = tl.split(c1)
        x0, x4 = tl.split(b00)
        x2, x6 = tl.split(b01)
        x1, x5 = tl.split(b10)
        x3, x7 = tl.split(b11)
        dots = _word_code_floats(packed, 0, 4) * x0[None, :]
        dots += _word_code_floats(packed, 1, 4) * x1[None, :]
        dots += _word_code_floats(packed, 2, 4) * x2[None, :]
        dots += _word_code_floats(packed, 3, 4) * x3[None, :]
        dots += _word_code_floats(packed, 4, 4) * x4[None, :]
        dots += _word_code_floats(packed, 5, 4) * x5[None, :]
        dots += _word_code_floats(packed, 6, 4) * x6[None, :]
        dots += _word_code_floats(packed, 7, 4) * x7[None, :]
    else:
        c0, c1 = tl.split(tl.reshape(x_words, [TILE, 2, 2]))
        x0, x2 = tl.split(c0)
        x1, x3 = tl.split(c1)
        dots = _word_code_floats(packed, 0, 8) * x0[None, :]
        dots += _word_code_floats(packed, 1, 8) * x1[None, :]
        dots += _word_code_floats(packed, 2, 8) * x2[None, :]
        dots += _word_code_floats(packed, 3, 8) * x3[None, :]
    return dots


@triton.jit
def _integer_gemv_kernel(x, q, scales, zeros, bias, out, n, words, stride_q, stride_s, BITS: tl.constexpr,
                         GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_N: tl.constexpr, TILE: tl.constexpr):
    PER_WORD: tl.constexpr = 32 // BITS  # code i of word w is input element PER_WORD * w + i
    BASE: tl.constexpr = 128.0 if BITS == 4 else 384.0  # what _word_code_floats adds to each code
    GROUP_WORDS: tl.constexpr = TILE if GROUP == 0 else GROUP // PER_WORD
    GROUPS_PER_TILE: tl.constexpr = TILE // GROUP_WORDS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    per_word = tl.zeros([BLOCK_N, TILE], tl.float32)  # per-channel scales: sums per word, reduced once
    x_per_word = tl.zeros([TILE], tl.float32)
    per_group = tl.zeros([BLOCK_N, GROUPS_PER_TILE], tl.float32)  # grouped scales: scaled sums per group
    for start in range(0, words, TILE):
        at = start + tl.arange(0, TILE)
        word_ok = at < words
        packed = tl.load(q + rows.to(tl.int64)[:, None] * stride_q + at[None, :],
                         mask=row_ok[:, None] & word_ok[None, :], other=0)
        x_words = tl.load(x + PER_WORD * at[:, None] + tl.arange(0, PER_WORD)[None, :], mask=word_ok[:, None],
                          other=0.0).to(tl.float32)
        dots = _word_dots(packed, x_words, BITS, TILE)
        x_sums = tl.sum(x_words, 1)
        if GROUP == 0:
            per_word += dots
            x_per_word += x_sums
        else:
            group_dots = tl.sum(tl.reshape(dots, [BLOCK_N, GROUPS_PER_TILE, GROUP_WORDS]), 2)
            group_x = tl.sum(tl.reshape(x_sums, [GROUPS_PER_TILE, GROUP_WORDS]), 1)
            groups = start // GROUP_WORDS + tl.arange(0, GROUPS_PER_TILE)
            at_group = rows.to(tl.int64)[:, None] * stride_s + groups[None, :]
            ok = row_ok[:, None] & (groups < words // GROUP_WORDS)[None, :]
            offset = tl.full([BLOCK_N, GROUPS_PER_TILE], BASE, tl.float32)
            if HAS_ZEROS:
                offset += tl.load(zeros + at_group, mask=ok, other=0).to(tl.float32)
            s = tl.load(scales + at_group, mask=ok, other=0.0).to(tl.float32)
            per_group += s * (group_dots - offset * group_x[None, :])
    if GROUP == 0:
        y = (tl.sum(per_word, 1) - BASE * tl.sum(x_per_word, 0)) * tl.load(scales + rows, mask=row_ok, other=0.0)
    else:
        y = tl.sum(per_group, 1)
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)


@triton.jit
def _fp8_gemv_kernel(x, q, scale, input_scale, bias, out, n, k, stride_q, STATIC_INPUT: tl.constexpr,
                     CODES_INPUT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    if STATIC_INPUT:
        x_scale = tl.load(input_scale).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, k, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            amax = tl.maximum(amax, tl.abs(tl.load(x + cols, mask=cols < k, other=0.0).to(tl.float32)))
        x_scale = tl.maximum(tl.max(amax, 0) / E4M3_MAX, MIN_SCALE)
    x_inverse = 1.0 / x_scale  # a multiply an element instead of a division, which takes a dozen issue slots
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < k
        xv = tl.load(x + cols, mask=col_ok, other=0.0).to(tl.float32)
        if not CODES_INPUT:  # E4M3 codes came in as they are; a float row is rounded here
            xv = tl.clamp(xv * x_inverse, -E4M3_MAX, E4M3_MAX).to(tl.float8e4nv).to(tl.float32)
        codes = tl.load(q + rows.to(tl.int64)[:, None] * stride_q + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += codes.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, 1) * tl.load(scale + rows, mask=row_ok, other=0.0) * x_scale
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)


def integer_gemv_fits(k: int, group: int) -> bool:
    """Whether ``integer_gemv`` takes ``k`` inputs with groups of ``group`` (0: per-channel
    scales): whole int32 words of codes, each within one group, so groups are a power of
    two of at least 8."""
    return k % 8 == 0 and (group == 0 or group >= 8 and group & (group - 1) == 0)


def integer_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bias: torch.Tensor | None, config: QuantGemvConfig) -> torch.Tensor:
    """``x @ ((codes - zeros) * scales).T + bias`` for one row of ``x``: INT8 codes
    (``qweight`` int8 ``[n, k]``) or packed 4-bit codes (uint8 ``[n, k / 2]``), with
    ``scales`` per output channel ``[n]`` or per group ``[n, groups]``, and zero points
    (``None``: none) of the grouped scales' shape, where ``integer_gemv_fits``."""
    bits = 4 if qweight.dtype == torch.uint8 else 8
    n = qweight.shape[0]
    k = qweight.shape[1] * 8 // bits
    group = 0 if scales.dim() == 1 else k // scales.shape[1]
    if bits == 8:
        tile = max(config.block_k, group) // 4
    else:
        tile = config.groups_per_tile * group // 8
    words = qweight.view(torch.int32)  # 32 // bits codes a word, read with one load
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _integer_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, words, scales, zeros if zeros is not None else scales, bias if bias is not None else scales, out, n,
        words.shape[1], words.stride(0), scales.stride(0), BITS=bits, GROUP=group, HAS_ZEROS=zeros is not None,
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, TILE=tile, num_warps=config.num_warps)
    return out


def fp8_gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, input_scale: torch.Tensor | None,
             bias: torch.Tensor | None, config: QuantGemvConfig, out_dtype: torch.dtype | None = None
             ) -> torch.Tensor:
    """``linear_fp8`` for one row of ``x``: the row rounded into E4M3 by its own (or the
    static) scale as the op's reference does, then ``x @ (codes * scale).T + bias`` over
    E4M3 codes with a scale per output channel. An E4M3 ``x`` (``scaled_linear``'s codes,
    quantized by the norm before it) is taken as it is, scaled by ``input_scale``; the
    result is in ``out_dtype`` (default: ``x``'s dtype)."""
    n, k = qweight.shape
    out = torch.empty((1, n), dtype=out_dtype or x.dtype, device=x.device)
    _fp8_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, qweight, scale, input_scale if input_scale is not None else scale, bias if bias is not None else scale,
        out, n, k, qweight.stride(0), STATIC_INPUT=input_scale is not None,
        CODES_INPUT=x.dtype == torch.float8_e4m3fn, HAS_BIAS=bias is not None, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, num_warps=config.num_warps)
    return out
