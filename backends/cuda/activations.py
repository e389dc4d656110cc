"""The gated activation of the cuda backend: ``act(x[..., :n]) * x[..., n:]`` for a fused
gate/up projection (SwiGLU, GeGLU).

A program handles ``block`` columns of one row, so that a single long row (a decode step's
intermediate of 14336) is spread over many programs; the grid is (rows, column blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...ir.opdefs.fused import ACTIVATIONS
from .norms import as_rows

_MIN_PROGRAMS = 264  # two per multiprocessor of an H100


@dataclass(frozen=True)
class GatedConfig:
    """Launch parameters of the gated activation: columns per program and warps per program."""

    block: int = 1024
    num_warps: int = 4


def gated_configs(n: int) -> list[GatedConfig]:
    """Candidate configs for rows of ``n`` output features, for a build-time tuner: blocks of
    256 columns up to the row, with 1 to 32 elements per thread."""
    top = max(256, triton.next_power_of_2(n))
    blocks = [b for b in (256, 512, 1024, 2048, 4096, 8192) if b <= top]
    return [GatedConfig(block, warps) for block in blocks for warps in (1, 2, 4, 8, 16)
            if 32 * warps <= block <= 32 * warps * 32]


def default_gated_config(rows: int, n: int) -> GatedConfig:
    """Blocks of up to 1024 columns, smaller while that leaves the GPU short of programs."""
    block = min(triton.next_power_of_2(n), 1024)
    while block > 256 and rows * triton.cdiv(n, block) < _MIN_PROGRAMS:
        block //= 2
    return GatedConfig(block=block, num_warps=min(max(block // 256, 1), 8))


@triton.jit
def _activate(x, ACTIVATION: tl.constexpr):
    """The activation of float32 ``x``, by torch's formulas."""
    if ACTIVATION == "silu":
        return x / (1.0 + tl.exp(-x))
    elif ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        # 0.5 x (1 + tanh(y)) = x sigmoid(2y), y = sqrt(2 / pi) (x + 0.044715 x^3)
        y = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return x / (1.0 + tl.exp(-2.0 * y))


@triton.jit
def _gated_kernel(x_ptr, out_ptr, n, x_stride, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = col < n
    gate = tl.load(x_ptr + row * x_stride + col, mask=mask)
    up = tl.load(x_ptr + row * x_stride + n + col, mask=mask)
    # Round the activation to x's dtype before the product, as torch's two ops do.
    act = _activate(gate.to(tl.float32), ACTIVATION).to(gate.dtype)
    tl.store(out_ptr + row * n + col, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def gated_activation(x: torch.Tensor, *, activation: str,
                     config: GatedConfig | None = None) -> torch.Tensor:
    """``activation(x[..., :n]) * x[..., n:]``, ``activation`` one of silu, gelu, gelu_tanh."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    n = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = as_rows(x, 2 * n)
    rows = x2.shape[0]
    config = config or default_gated_config(rows, n)
    _gated_kernel[(rows, triton.cdiv(n, config.block))](
        x2, out, n, x2.stride(0), ACTIVATION=activation, BLOCK=config.block, num_warps=config.num_warps)
    return out
