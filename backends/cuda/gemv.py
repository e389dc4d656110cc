"""A Triton GEMV for one-token ``linear`` (batch-1 decode), where a step is bound by
reading the weights once.

A program takes ``block_n`` rows of the weight and walks the whole row length in tiles of
``block_k``, multiplying by the input vector in float32 and reducing once at the end. It
is used only for the weight shapes where build-time tuning measured it faster than
cuBLAS on the target GPU (``tuning.py``); every other ``linear`` stays with cuBLAS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .configs import shape_key


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters: weight rows a program, row elements a tile, warps, pipeline stages."""

    block_n: int = 8
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3


def gemv_configs() -> list[GemvConfig]:
    """Candidate configurations for the tuner."""
    return [GemvConfig(block_n, block_k, warps) for block_n, block_k in ((4, 1024), (8, 512), (16, 256), (16, 512),
                                                                         (32, 256)) for warps in (4, 8)]


@triton.jit  # specialized on n, k and the stride being multiples of 16, as every LLM's are: 16-byte loads
def _gemv_kernel(x, w, bias, out, n, k, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < k
        xv = tl.load(x + cols, mask=col_ok, other=0.0).to(tl.float32)
        wv = tl.load(w + rows.to(tl.int64)[:, None] * stride_w + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0)
        acc += wv.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out + rows, y.to(out.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` for an ``x`` holding one row ([..., k] with one row in all)."""
    config = config or GemvConfig()
    n, k = weight.shape
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x.reshape(k), weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           config: Mapping[str, dict] | None = None) -> torch.Tensor:
    """The ``linear`` op: the GEMV for one row where tuning chose it for this weight shape
    (``config`` maps ``shape_key`` to its launch parameters), cuBLAS otherwise."""
    n, k = weight.shape
    chosen = (config or {}).get(shape_key(n, k))
    if chosen is None or x.numel() != k or weight.stride(1) != 1:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, GemvConfig(**chosen))
