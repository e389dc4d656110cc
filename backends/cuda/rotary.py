"""The fused QKV split with rotary embedding of the cuda backend: ``qkv_rotary``.

The grid is (tokens, head blocks): the q heads, then the k heads, then the v heads, each
group cut into blocks of ``block_heads`` heads so that no block straddles two groups. A
q or k block rotates the first ``rotary_dim`` features of its heads and copies the rest; a v
block copies its heads. A rotated pair (i, i + r/2), or (2i, 2i + 1) when interleaved, is
read as two half-width loads, so that no register shuffles are needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .norms import as_rows


@dataclass(frozen=True)
class RotaryConfig:
    """Launch parameters of the rotary kernel: heads per program and warps per program."""

    block_heads: int = 1
    num_warps: int = 1


def rotary_configs(head_dim: int, kv_heads: int) -> list[RotaryConfig]:
    """Candidate configs for heads of ``head_dim`` features, for a build-time tuner: blocks of
    up to ``kv_heads`` heads (rounded up to a power of two), with 1 to 32 elements per thread."""
    block = triton.next_power_of_2(head_dim)
    heads = [h for h in (1, 2, 4, 8, 16) if h <= triton.next_power_of_2(kv_heads)]
    return [RotaryConfig(h, warps) for h in heads for warps in (1, 2, 4, 8)
            if 32 * warps <= max(h * block, 32) and h * block <= 32 * warps * 32]


def default_rotary_config(kv_heads: int, head_dim: int) -> RotaryConfig:
    """Blocks of as many heads as the kv heads rounded up to a power of two (up to 16 heads and
    2048 features) and one warp per 256 features, up to 4: on an H100, at 1 to 2048 tokens of
    Llama-3 8B and SmolLM2 shapes, within 5% of the best candidate."""
    block = triton.next_power_of_2(head_dim)
    heads = min(16, max(1, 2048 // block), triton.next_power_of_2(kv_heads))
    return RotaryConfig(block_heads=heads, num_warps=min(max(heads * block // 256, 1), 4))


@triton.jit
def _copy_heads(src, dst, heads, start, stop, HEAD_DIM: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Copy features [start, stop) of heads [0, heads) of a block, from src to dst."""
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    d = start + tl.arange(0, BLOCK)[None, :]
    mask = (h < heads) & (d < stop)
    tl.store(dst + h * HEAD_DIM + d, tl.load(src + h * HEAD_DIM + d, mask=mask), mask=mask)


@triton.jit
def _rotate_heads(src, dst, heads, cos, sin, cos_stride, sin_stride, HEAD_DIM: tl.constexpr,
                  ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                  HALF_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr):
    """Rotate the first ROTARY_DIM features of heads [0, heads) of a block, copy the rest."""
    h = tl.arange(0, BLOCK_HEADS)[:, None]
    i = tl.arange(0, HALF_BLOCK)[None, :]
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + ROTARY_DIM // 2
    in_half = i < ROTARY_DIM // 2
    mask = (h < heads) & in_half
    x1 = tl.load(src + h * HEAD_DIM + first, mask=mask)
    x2 = tl.load(src + h * HEAD_DIM + second, mask=mask)
    c1 = tl.load(cos + first * cos_stride, mask=in_half).to(tl.float32)
    c2 = tl.load(cos + second * cos_stride, mask=in_half).to(tl.float32)
    s1 = tl.load(sin + first * sin_stride, mask=in_half).to(tl.float32)
    s2 = tl.load(sin + second * sin_stride, mask=in_half).to(tl.float32)
    # x * cos + rotate(x) * sin with each product rounded to x's dtype, as torch's three ops do.
    dtype = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    o1 = (a1 * c1).to(dtype).to(tl.float32) - (a2 * s1).to(dtype).to(tl.float32)
    o2 = (a2 * c2).to(dtype).to(tl.float32) + (a1 * s2).to(dtype).to(tl.float32)
    tl.store(dst + h * HEAD_DIM + first, o1.to(dtype), mask=mask)
    tl.store(dst + h * HEAD_DIM + second, o2.to(dtype), mask=mask)
    if PASS_BLOCK > 0:
        _copy_heads(src, dst, heads, ROTARY_DIM, HEAD_DIM, HEAD_DIM, BLOCK_HEADS, PASS_BLOCK)


@triton.jit
def _qkv_rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, qkv_stride,
                       cos_token_stride, cos_stride, sin_token_stride, sin_stride,
                       Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                       ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                       HALF_BLOCK: tl.constexpr, PASS_BLOCK: tl.constexpr, HEAD_BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    q_blocks: tl.constexpr = (Q_HEADS + BLOCK_HEADS - 1) // BLOCK_HEADS
    kv_blocks: tl.constexpr = (KV_HEADS + BLOCK_HEADS - 1) // BLOCK_HEADS
    src = qkv_ptr + token * qkv_stride
    cos = cos_ptr + token * cos_token_stride
    sin = sin_ptr + token * sin_token_stride
    if block < q_blocks:
        head = block * BLOCK_HEADS
        _rotate_heads(src + head * HEAD_DIM, q_ptr + (token * Q_HEADS + head) * HEAD_DIM, Q_HEADS - head,
                      cos, sin, cos_stride, sin_stride, HEAD_DIM, ROTARY_DIM, INTERLEAVED, BLOCK_HEADS,
                      HALF_BLOCK, PASS_BLOCK)
    elif block < q_blocks + kv_blocks:
        head = (block - q_blocks) * BLOCK_HEADS
        _rotate_heads(src + (Q_HEADS + head) * HEAD_DIM, k_ptr + (token * KV_HEADS + head) * HEAD_DIM,
                      KV_HEADS - head, cos, sin, cos_stride, sin_stride, HEAD_DIM, ROTARY_DIM, INTERLEAVED,
                      BLOCK_HEADS, HALF_BLOCK, PASS_BLOCK)
    else:
        head = (block - q_blocks - kv_blocks) * BLOCK_HEADS
        _copy_heads(src + (Q_HEADS + KV_HEADS + head) * HEAD_DIM, v_ptr + (token * KV_HEADS + head) * HEAD_DIM,
                    KV_HEADS - head, 0, HEAD_DIM, HEAD_DIM, BLOCK_HEADS, HEAD_BLOCK)


def qkv_rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, q_heads: int, kv_heads: int,
               head_dim: int, interleaved: bool,
               config: RotaryConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``qkv`` [..., (q_heads + 2 kv_heads) * head_dim] into q, k and v [tokens, heads,
    head_dim] and rotate q and k by ``cos`` and ``sin``, which broadcast to [..., 1, rotary_dim]."""
    features = qkv.shape[-1]
    qkv2 = as_rows(qkv, features)
    tokens, rotary_dim = qkv2.shape[0], cos.shape[-1]
    q, k, v = (torch.empty((tokens, heads, head_dim), dtype=qkv.dtype, device=qkv.device)
               for heads in (q_heads, kv_heads, kv_heads))
    if tokens == 0:
        return q, k, v
    # A view wherever the layout allows one (always for [1, tokens, 1, r], transposed or not).
    cos2, sin2 = (t.expand(*qkv.shape[:-1], 1, rotary_dim).reshape(tokens, rotary_dim) for t in (cos, sin))
    config = config or default_rotary_config(kv_heads, head_dim)
    bh = config.block_heads
    grid = (tokens, triton.cdiv(q_heads, bh) + 2 * triton.cdiv(kv_heads, bh))
    passed = head_dim - rotary_dim
    _qkv_rotary_kernel[grid](
        qkv2, cos2, sin2, q, k, v, qkv2.stride(0), cos2.stride(0), cos2.stride(1), sin2.stride(0), sin2.stride(1),
        Q_HEADS=q_heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, ROTARY_DIM=rotary_dim, INTERLEAVED=interleaved,
        BLOCK_HEADS=bh, HALF_BLOCK=triton.next_power_of_2(max(rotary_dim // 2, 1)),
        PASS_BLOCK=triton.next_power_of_2(passed) if passed else 0,
        HEAD_BLOCK=triton.next_power_of_2(head_dim), num_warps=config.num_warps)
    return q, k, v
