"""Multi-head latent attention (DeepSeek-V2/V3): attention whose keys and values are
decompressed from one small latent per token.

Each token keeps ``latent [rank]`` (its normalized compressed key/value, ``kv_lora_rank``)
and ``k_rope [rope]`` (one rotated key part shared by every head, ``qk_rope_head_dim``).
Head ``h``'s key is ``concat(latent @ W_k[h].T, k_rope)`` and its value ``latent @ W_v[h].T``,
where ``kv_b [heads * (nope + v_dim), rank]`` stacks, per head, ``W_k[h]`` (``nope`` rows)
then ``W_v[h]`` (``v_dim`` rows): transformers' ``kv_b_proj``. Queries are ``[.., heads,
nope + rope]`` (the unrotated part first).

- ``mla_attention``: causal attention of ``q [batch, heads, seq, nope + rope]`` over
  ``latent [batch, 1, seq, rank]`` and ``k_rope [batch, 1, seq, rope]`` (one latent head,
  as transformers views them).
- ``paged_mla_attention``: the same for a flattened mixed batch over a paged cache that
  holds only ``concat(latent, k_rope)`` per token: ``cache [num_blocks, block_size, 1,
  rank + rope]``, the memory saving that is the point of MLA. Batch metadata as for
  ``paged_attention``.

The references decompress the keys and values of the context, then attend exactly (the
oracle); the reference backend's kernel attends in the absorbed form over the latent cache
directly (``backends/mla.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import Attr, OpDef
from ..shapes import ShapeError, dims_equal, shapes_equal
from ..types import TensorType
from .nn import attention_reference
from .paged import _paged_attention


def mla_dims(q: TensorType, heads_axis: int, latent: TensorType, k_rope: TensorType,
             kv_b: TensorType) -> tuple[int, int, int]:
    """(heads, nope, v_dim) of a latent attention whose queries hold their heads along
    ``heads_axis``, after checking its operands' shapes."""
    heads, query_dim, rank, rope = q.shape[heads_axis], q.shape[-1], latent.shape[-1], k_rope.shape[-1]
    if not all(isinstance(d, int) for d in (heads, query_dim, rank, rope)) or kv_b.rank != 2:
        raise ShapeError(f"latent attention needs static heads and feature sizes, got q {q}, latent {latent}, "
                         f"k_rope {k_rope}, kv_b {kv_b}")
    nope, rows = query_dim - rope, kv_b.shape[0]
    if nope < 1 or not dims_equal(kv_b.shape[1], rank) or not isinstance(rows, int) or rows % heads \
            or rows // heads <= nope:
        raise ShapeError(f"kv_b {kv_b} must be [heads * (nope + v_dim), {rank}] for q {q} and k_rope {k_rope}")
    if len({q.dtype, latent.dtype, k_rope.dtype, kv_b.dtype}) != 1 or not q.dtype.is_float:
        raise ShapeError("q, latent, k_rope and kv_b must share a floating-point dtype")
    return heads, nope, rows // heads - nope


def _mla_attention(q, latent, k_rope, kv_b, scale):
    heads, _, v_dim = mla_dims(q, 1, latent, k_rope, kv_b)
    batch, seq = q.shape[0], q.shape[2]
    one_head = (batch, 1, seq)
    if q.rank != 4 or not (shapes_equal(latent.shape[:3], one_head) and shapes_equal(k_rope.shape[:3], one_head)):
        raise ShapeError(f"expects q [batch, heads, seq, dim], latent and k_rope [batch, 1, seq, dim]; "
                         f"got {q}, {latent}, {k_rope}")
    return q.with_shape((batch, heads, seq, v_dim))


def decompress(latent: torch.Tensor, k_rope: torch.Tensor, kv_b: torch.Tensor, heads: int,
               nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[..., heads, n, nope + rope]`` and values ``[..., heads, n, v_dim]`` from
    ``latent [..., 1, n, rank]`` and ``k_rope [..., 1, n, rope]``."""
    kv = F.linear(latent, kv_b).unflatten(-1, (heads, -1)).squeeze(-4).transpose(-3, -2)
    k_nope, values = kv[..., :nope], kv[..., nope:]
    keys = torch.cat([k_nope, k_rope.expand(*k_nope.shape[:-1], k_rope.shape[-1])], dim=-1)
    return keys, values


def mla_attention_reference(q, latent, k_rope, kv_b, scale):
    """Decompress every token's keys and values, then exact causal attention."""
    heads, nope = q.shape[1], q.shape[-1] - k_rope.shape[-1]
    keys, values = decompress(latent, k_rope, kv_b, heads, nope)
    return attention_reference(q, keys, values, None, scale, True, None, None)


def _paged_mla_attention(q, latent, k_rope, kv_b, cache, slot_mapping, query_start, context_lens, block_tables,
                         scale):
    heads, _, v_dim = mla_dims(q, 1, latent, k_rope, kv_b)
    if q.rank != 3 or latent.rank != 3 or k_rope.rank != 3 or latent.shape[1] != 1 or k_rope.shape[1] != 1:
        raise ShapeError(f"expects q [num_tokens, heads, dim], latent and k_rope [num_tokens, 1, dim]; "
                         f"got {q}, {latent}, {k_rope}")
    width = latent.shape[2] + k_rope.shape[2]
    if cache.rank != 4 or cache.shape[2:] != (1, width) or cache.dtype != latent.dtype:
        raise ShapeError(f"cache {cache} must be [num_blocks, block_size, 1, {width}] of {latent.dtype}")
    # the batch metadata's rules are paged_attention's, with the latent as a one-head key and value
    _paged_attention(latent, latent, latent, cache.with_shape((*cache.shape[:3], latent.shape[2])),
                     cache.with_shape((*cache.shape[:3], latent.shape[2])), slot_mapping, query_start,
                     context_lens, block_tables, scale, None, None)
    if not dims_equal(q.shape[0], latent.shape[0]) or not dims_equal(k_rope.shape[0], latent.shape[0]):
        raise ShapeError(f"q {q}, latent {latent} and k_rope {k_rope} must have the same tokens")
    return q.with_shape((q.shape[0], heads, v_dim)), cache


def paged_mla_attention_reference(q, latent, k_rope, kv_b, cache, slot_mapping, query_start, context_lens,
                                  block_tables, scale):
    """Write each token's latent and rotated key, then, sequence by sequence, decompress
    the context's keys and values and attend exactly."""
    block_size, rank = cache.shape[1], latent.shape[-1]
    cache = cache.clone()
    cache.view(-1, *cache.shape[2:])[slot_mapping.long()] = torch.cat([latent, k_rope], dim=-1)
    out = q.new_zeros((q.shape[0], q.shape[1], kv_b.shape[0] // q.shape[1] - (q.shape[2] - k_rope.shape[2])))
    for s in range(context_lens.shape[0]):
        start, end, length = int(query_start[s]), int(query_start[s + 1]), int(context_lens[s])
        if end == start:
            continue
        blocks = block_tables[s, : -(-length // block_size)].long()
        rows = cache[blocks].flatten(0, 1)[:length].transpose(0, 1)[None]  # [1, 1, length, rank + rope]
        out[start:end] = mla_attention_reference(q[start:end].transpose(0, 1)[None], rows[..., :rank],
                                                 rows[..., rank:], kv_b, scale)[0].transpose(0, 1)
    return out, cache


OPS = [
    OpDef("mla_attention", ("q", "latent", "k_rope", "kv_b"), _mla_attention, mla_attention_reference,
          attrs={"scale": Attr("float", optional=True)},
          doc="causal multi-head latent attention: keys and values decompressed from a per-token latent "
              "by kv_b, a rotated key part shared by every head"),
    OpDef("paged_mla_attention",
          ("q", "latent", "k_rope", "kv_b", "cache", "slot_mapping", "query_start", "context_lens", "block_tables"),
          _paged_mla_attention, paged_mla_attention_reference,
          attrs={"scale": Attr("float", optional=True)}, results=2,
          doc="multi-head latent attention of a flattened mixed batch over a paged cache of latents "
              "[num_blocks, block_size, 1, rank + rope]; returns the output and the updated cache"),
]
