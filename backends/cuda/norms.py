"""Row normalizations of the cuda backend: ``rms_norm``, ``add_rms_norm`` and ``add_layer_norm``.

One Triton kernel serves all three; constexpr flags choose the residual add, RMS or layer
normalization, and the optional weight and bias. A program normalizes ``block_rows`` rows,
each row whole in one block of the next power of two of its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class NormConfig:
    """Launch parameters of the norm kernel: warps per program and rows per program."""

    num_warps: int = 4
    block_rows: int = 1


def norm_configs(hidden: int) -> list[NormConfig]:
    """Candidate configs for rows of ``hidden`` features, for a build-time tuner: power-of-two
    row counts (several rows only up to 8192 elements a program) and warp counts that give each
    thread at most 64 elements and each warp something to do."""
    block = triton.next_power_of_2(hidden)
    row_counts = [rows for rows in (1, 2, 4, 8, 16) if rows == 1 or rows * block <= 8192]
    return [NormConfig(warps, rows) for rows in row_counts for warps in (1, 2, 4, 8, 16)
            if 32 * warps <= max(rows * block, 32) and rows * block <= 32 * warps * 64]


def default_norm_config(rows: int, hidden: int) -> NormConfig:
    """Several short rows per program, and about one warp per 512 elements of a program."""
    block = triton.next_power_of_2(hidden)
    block_rows = min(max(1, 1024 // block), triton.next_power_of_2(rows))
    return NormConfig(num_warps=min(max(block_rows * block // 512, 1), 16), block_rows=block_rows)


@triton.jit
def rows_with_residual(x_ptr, res_ptr, sum_ptr, rows, n, x_stride, res_stride, HAS_RESIDUAL: tl.constexpr,
                       BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """A program's ``BLOCK_ROWS`` rows of x, each whole (with the residual added and the sum
    stored where ``HAS_RESIDUAL``; the sum is rounded to x's dtype, and that rounded sum is
    what is normalized, as in torch): (x, int64 row offsets, columns, mask)."""
    row = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    col = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (col < n)
    row = row.to(tl.int64)
    x = tl.load(x_ptr + row * x_stride + col, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + row * res_stride + col, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + row * n + col, x, mask=mask)
    return x, row, col, mask


@triton.jit(do_not_specialize=["rows"])  # one compilation for every row count
def _norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, sum_ptr, rows, n, x_stride, res_stride, eps,
                 HAS_RESIDUAL: tl.constexpr, LAYER_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    x, row, col, mask = rows_with_residual(x_ptr, res_ptr, sum_ptr, rows, n, x_stride, res_stride, HAS_RESIDUAL,
                                           BLOCK_ROWS, BLOCK)
    h = x.to(tl.float32)
    if LAYER_NORM:
        h = tl.where(mask, h - tl.sum(h, axis=1, keep_dims=True) / n, 0.0)
    h = h * tl.rsqrt(tl.sum(h * h, axis=1, keep_dims=True) / n + eps)
    if not LAYER_NORM:
        # RMSNorm rounds to x's dtype before the weight (as Llama does); layer norm rounds once.
        h = h.to(x.dtype).to(tl.float32)
    if HAS_WEIGHT:
        h = h * tl.load(w_ptr + col, mask=col < n).to(tl.float32)
    if HAS_BIAS:
        h = h + tl.load(b_ptr + col, mask=col < n).to(tl.float32)
    tl.store(out_ptr + row * n + col, h.to(out_ptr.dtype.element_ty), mask=mask)


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as [rows, n] with unit column stride: a view unless t's layout forbids one."""
    t = t.reshape(-1, n)
    return t if t.stride(1) == 1 else t.contiguous()


def _normalize(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
               bias: torch.Tensor | None, eps: float, layer_norm: bool,
               config: NormConfig | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the norm kernel: the normalized rows, and the sum x + residual where given."""
    n = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else None
    if x.numel() == 0:
        return out, total
    x2 = as_rows(x, n)
    res2 = as_rows(residual, n) if residual is not None else x2
    rows = x2.shape[0]
    config = config or default_norm_config(rows, n)
    _norm_kernel[(triton.cdiv(rows, config.block_rows),)](
        x2, res2, weight.contiguous() if weight is not None else x2,
        bias.contiguous() if bias is not None else x2, out, total if total is not None else out,
        rows, n, x2.stride(0), res2.stride(0), eps,
        HAS_RESIDUAL=residual is not None, LAYER_NORM=layer_norm, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, BLOCK_ROWS=config.block_rows, BLOCK=triton.next_power_of_2(n),
        num_warps=config.num_warps)
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, *, eps: float,
             config: NormConfig | None = None) -> torch.Tensor:
    """x / rms(x) over the last dim in float32, rounded to x's dtype, then times ``weight``."""
    return _normalize(x, None, weight, None, eps, False, config)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None, *,
                 eps: float, config: NormConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual, weight), x + residual), the sum taken in x's dtype."""
    return _normalize(x, residual, weight, None, eps, False, config)


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, *, eps: float,
                   config: NormConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual, weight, bias), x + residual), the sum taken in x's dtype."""
    return _normalize(x, residual, weight, bias, eps, True, config)
