"""The fused mixture-of-experts of the cuda backend: routing in torch ops, then two grouped
GEMMs over the (token, choice) pairs sorted by expert.

Alignment (all on the device, no size read back): each pair's row goes to its expert's run
of rows, each run padded to a multiple of ``block_m``, so that a block of ``block_m`` rows
belongs to one expert. The number of blocks is bounded by ``cdiv(pairs, block_m) +
experts``, a static size, so a decode step stays capturable in a CUDA graph; blocks past the
last run hold only padding rows (-1) and store nothing.

The first kernel multiplies a block's rows of x by its expert's gate and up rows and writes
``act(gate) * up``; the second multiplies that by the expert's down projection, scales each
row by its routing weight (float32), and writes it to its pair's row. The pairs of a token
are then summed in float32, as the registry's reference does. With ``weigh_inputs`` (Llama
4) the routing weight moves to the first kernel instead: each row of x is scaled by it (both
in x's dtype, as the reference rounds) as it is loaded, and the second kernel scales nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...ir.opdefs.moe import route
from .activations import _activate


@dataclass(frozen=True)
class MoeConfig:
    """Launch parameters of both grouped GEMMs: rows per block, output columns and reduction
    depth per step, and warps per program."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4


def align(indices: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair index of each padded row (-1 for padding), ``[blocks * block_m]``, and the
    expert of each block (``experts`` for blocks past the last run), ``[blocks]``."""
    flat = indices.reshape(-1)
    pairs = flat.numel()
    blocks = triton.cdiv(pairs, block_m) + experts
    counts = torch.zeros(experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    start, padded_start = torch.cumsum(counts, 0) - counts, padded_end - padded
    order = torch.argsort(flat, stable=True)
    chosen = flat[order]
    slots = padded_start[chosen] + torch.arange(pairs, device=flat.device) - start[chosen]
    rows = torch.full((blocks * block_m,), -1, dtype=torch.int64, device=flat.device).scatter_(0, slots, order)
    block_starts = torch.arange(blocks, device=flat.device) * block_m
    return rows, torch.searchsorted(padded_end, block_starts, right=True)


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, rows_ptr, experts_ptr, routing_ptr, out_ptr, hidden, inter, top_k, num_experts,
                    x_stride, ACTIVATION: tl.constexpr, WEIGH_INPUTS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(experts_ptr + block)
    if expert < num_experts:
        rows = tl.load(rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows >= 0
        tokens = tl.where(valid, rows // top_k, 0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        weights = w_ptr + expert.to(tl.int64) * (2 * inter * hidden)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if WEIGH_INPUTS:  # the routing weight in x's dtype, as the reference casts it
            routing = tl.load(routing_ptr + rows, mask=valid, other=0.0).to(x_ptr.dtype.element_ty).to(tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + tokens[:, None] * x_stride + ks[None, :],
                        mask=valid[:, None] & (ks[None, :] < hidden), other=0.0)
            if WEIGH_INPUTS:
                a = (a.to(tl.float32) * routing[:, None]).to(x_ptr.dtype.element_ty)
            w_mask = (ks[:, None] < hidden) & (cols[None, :] < inter)
            w_gate = tl.load(weights + cols[None, :] * hidden + ks[:, None], mask=w_mask, other=0.0)
            w_up = tl.load(weights + (inter + cols[None, :]) * hidden + ks[:, None], mask=w_mask, other=0.0)
            gate += tl.dot(a, w_gate)
            up += tl.dot(a, w_up)
        dtype = out_ptr.dtype.element_ty
        # Round as the reference does: each projection, then the activation, to x's dtype.
        act = _activate(gate.to(dtype).to(tl.float32), ACTIVATION).to(dtype)
        out = (act.to(tl.float32) * up.to(dtype).to(tl.float32)).to(dtype)
        offsets = (block * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * inter + cols[None, :]
        tl.store(out_ptr + offsets, out, mask=valid[:, None] & (cols[None, :] < inter))


@triton.jit
def _down_kernel(h_ptr, w_ptr, rows_ptr, experts_ptr, routing_ptr, out_ptr, hidden, inter, num_experts,
                 WEIGH_INPUTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    block = tl.program_id(0)
    expert = tl.load(experts_ptr + block)
    if expert < num_experts:
        rows = tl.load(rows_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows >= 0
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        weights = w_ptr + expert.to(tl.int64) * (hidden * inter)
        padded = block * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(h_ptr + padded[:, None] * inter + ks[None, :],
                        mask=valid[:, None] & (ks[None, :] < inter), other=0.0)
            w = tl.load(weights + cols[None, :] * inter + ks[:, None],
                        mask=(ks[:, None] < inter) & (cols[None, :] < hidden), other=0.0)
            acc += tl.dot(a, w)
        out = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
        if not WEIGH_INPUTS:  # inputs already weighed leave the outputs as they are
            out = out * tl.load(routing_ptr + rows, mask=valid, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + tl.where(valid, rows, 0)[:, None] * hidden + cols[None, :], out,
                 mask=valid[:, None] & (cols[None, :] < hidden))


def moe_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor, *, activation: str, weigh_inputs: bool = False,
                config: MoeConfig | None = None) -> torch.Tensor:
    """The registry's ``moe_experts`` as two grouped GEMMs over pairs sorted by expert, the
    routing weights on the experts' outputs (or, with ``weigh_inputs``, on their inputs)."""
    config = config or MoeConfig()
    tokens, top_k = indices.shape
    experts, hidden, inter = down.shape
    if tokens == 0:
        return torch.empty_like(x)
    x, gate_up, down = x.contiguous(), gate_up.contiguous(), down.contiguous()
    rows, block_experts = align(indices, experts, config.block_m)
    blocks = block_experts.numel()
    routing = weights.reshape(-1).contiguous()
    launch = dict(WEIGH_INPUTS=weigh_inputs, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                  BLOCK_K=config.block_k, num_warps=config.num_warps)
    activated = torch.empty((blocks * config.block_m, inter), dtype=x.dtype, device=x.device)
    _gate_up_kernel[(blocks, triton.cdiv(inter, config.block_n))](
        x, gate_up, rows, block_experts, routing, activated, hidden, inter, top_k, experts, x.stride(0),
        ACTIVATION=activation, **launch)
    pairs = torch.empty((tokens * top_k, hidden), dtype=torch.float32, device=x.device)
    _down_kernel[(blocks, triton.cdiv(hidden, config.block_n))](
        activated, down, rows, block_experts, routing, pairs, hidden, inter, experts, **launch)
    return pairs.view(tokens, top_k, hidden).sum(1).to(x.dtype)


def moe(x: torch.Tensor, router_logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        correction_bias: torch.Tensor | None, *, top_k: int, scoring: str, normalize: bool, scale: float,
        num_groups: int, topk_groups: int, activation: str, jitter_eps: float = 0.0, weigh_inputs: bool = False,
        config: MoeConfig | None = None) -> torch.Tensor:
    """The registry's ``moe``: its routing (torch ops), then ``moe_experts``."""
    weights, indices = route(router_logits, correction_bias, top_k, scoring, normalize, scale, num_groups,
                             topk_groups, jitter_eps)
    return moe_experts(x, weights, indices, gate_up, down, activation=activation, weigh_inputs=weigh_inputs,
                       config=config)
