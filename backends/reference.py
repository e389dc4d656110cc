"""The reference backend's kernels: torch ops on any device.

Every op runs its registry reference implementation, except where the runtime needs
something the oracle does not give: ``paged_attention`` (and ``paged_mla_attention``, in
``mla.py``) writes the new keys and values
into the caches in place (the oracle copies them, which is right for a pure graph and
ruinous for a cache of gigabytes) and attends all sequences of a step in one batched
call over their padded contexts; the creation ops make their tensors on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..ir import REGISTRY
from ..ir.opdefs.nn import alibi_slopes
from ..ir.opdefs.paged import to_cache
from .mla import paged_mla_attention

Kernel = Callable[..., Any]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, query_start: torch.Tensor,
                    context_lens: torch.Tensor, block_tables: torch.Tensor, scale: float | None,
                    sliding_window: int | None, softcap: float | None, alibi_bias_max: float | None = None,
                    chunk_size: int | None = None):
    """Write k and v at ``slot_mapping`` (in place; saturated to E4M3 in an FP8 cache), then
    run causal attention of every sequence's queries over its whole context, all
    sequences in one batched call (ALiBi's biases, where asked, join the mask; so does the
    chunk of positions each query may see, where ``chunk_size`` is set)."""
    block_size = k_cache.shape[1]
    for cache, new in ((k_cache, k), (v_cache, v)):
        rows, fresh = cache.view(-1, *cache.shape[2:]), to_cache(new, cache.dtype)
        if cache.dtype == torch.float8_e4m3fn:  # torch has no index_copy_ for float8 on the CPU: copy bytes
            rows, fresh = rows.view(torch.uint8), fresh.view(torch.uint8)
        rows.index_copy_(0, slot_mapping, fresh)
    device = q.device
    q_lens = (query_start[1:] - query_start[:-1]).long()
    lengths = context_lens.long()
    max_q, max_ctx = int(q_lens.max()), int(lengths.max())
    seqs = torch.arange(len(q_lens), device=device).repeat_interleave(q_lens)
    offsets = torch.arange(q.shape[0], device=device) - query_start[:-1].long()[seqs]
    padded = q.new_zeros((len(q_lens), max_q, *q.shape[1:]))
    padded[seqs, offsets] = q
    keys_at = torch.arange(max_ctx, device=device)
    slots = block_tables[:, keys_at // block_size].long() * block_size + keys_at % block_size
    keys = k_cache.view(-1, *k_cache.shape[2:])[slots].to(q.dtype)
    values = v_cache.view(-1, *v_cache.shape[2:])[slots].to(q.dtype)
    query_pos = (lengths - q_lens)[:, None] + torch.arange(max_q, device=device)
    allowed = (keys_at <= query_pos[..., None]) & (keys_at < lengths[:, None, None])
    if sliding_window is not None:
        allowed &= query_pos[..., None] - keys_at < sliding_window
    if chunk_size is not None:
        allowed &= query_pos[..., None] // chunk_size == keys_at // chunk_size
    mask = allowed[:, None]
    if alibi_bias_max is not None:
        distance = (keys_at - query_pos[..., None]).float()[:, None]  # [seqs, 1, max_q, max_ctx]
        bias = alibi_slopes(q.shape[1], alibi_bias_max).to(device)[:, None, None] * distance
        mask = bias.masked_fill(~mask, float("-inf")).to(q.dtype if softcap is None else torch.float32)
    out = _attend(padded.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), mask,
                  scale if scale is not None else q.shape[-1] ** -0.5, softcap)
    return out.transpose(1, 2)[seqs, offsets], k_cache, v_cache


def _attend(q, k, v, allowed, scale: float, softcap: float | None) -> torch.Tensor:
    """Attention under ``allowed``: a bool mask, or an additive float one (-inf where masked)."""
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    probs = (scores + allowed if allowed.dtype.is_floating_point else scores.masked_fill(~allowed, float("-inf")))
    probs = probs.softmax(-1)
    return (probs @ v.float()).to(q.dtype)


def reference_kernels(device: torch.device | str = "cpu") -> dict[str, Kernel]:
    """Every registered op's kernel for ``device``, by op name."""
    device = torch.device(device)
    kernels: dict[str, Kernel] = {op.name: op.reference for op in REGISTRY}
    kernels["paged_attention"] = paged_attention
    kernels["paged_mla_attention"] = paged_mla_attention
    kernels["full"] = lambda shape, value, dtype: torch.full(shape, value, dtype=dtype.torch_dtype, device=device)
    kernels["arange"] = lambda end, start, step, dtype: torch.arange(start, end, step, dtype=dtype.torch_dtype,
                                                                     device=device)
    return kernels
