"""The reference backend's multi-head latent attention over a paged latent cache, in the
absorbed form.

The cache holds ``concat(latent, k_rope)`` per token (``[num_blocks, block_size, 1, rank +
rope]``). Rather than decompressing every cached token into per-head keys and values (the
registry's reference, ``ir/opdefs/mla.py``), each query absorbs the key half of ``kv_b``:
``q_nope . (W_k[h] latent) = (q_nope W_k[h]) . latent``, so the query becomes ``concat(q_nope
W_k[h], q_rope)`` of width ``rank + rope`` and the cache rows are the keys as they are, one
key head shared by all query heads. The values are the latents themselves (the cache rows'
first ``rank`` features), and the output is brought back to each head's ``v_dim`` by the
value half of ``kv_b``: ``(p . latent) W_v[h]^T``. The step reads ``rank + rope`` numbers per
cached token instead of ``heads * (nope + rope + v_dim)``; it is exact math, and equal to
the decompressed form up to float rounding (tested against it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_mla_attention(q: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, kv_b: torch.Tensor,
                        cache: torch.Tensor, slot_mapping: torch.Tensor, query_start: torch.Tensor,
                        context_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Write each token's latent and rotated key at ``slot_mapping`` (in place), then attend
    every sequence's queries over its context in the absorbed form, all sequences in one
    batched call."""
    tokens, heads, query_dim = q.shape
    rank, rope = latent.shape[-1], k_rope.shape[-1]
    nope = query_dim - rope
    rows = cache.view(-1, *cache.shape[2:])
    rows.index_copy_(0, slot_mapping, torch.cat([latent, k_rope], dim=-1))
    weights = kv_b.view(heads, -1, rank)  # per head: nope key rows, then v_dim value rows
    w_key, w_value = weights[:, :nope], weights[:, nope:]
    absorbed = torch.cat([torch.einsum("thn,hnr->thr", q[..., :nope], w_key), q[..., nope:]], dim=-1)

    block_size, device = cache.shape[1], q.device
    q_lens = (query_start[1:] - query_start[:-1]).long()
    lengths = context_lens.long()
    max_q, max_ctx = int(q_lens.max()), int(lengths.max())
    seqs = torch.arange(len(q_lens), device=device).repeat_interleave(q_lens)
    offsets = torch.arange(tokens, device=device) - query_start[:-1].long()[seqs]
    padded = absorbed.new_zeros((len(q_lens), max_q, heads, rank + rope))
    padded[seqs, offsets] = absorbed
    keys_at = torch.arange(max_ctx, device=device)
    slots = block_tables[:, keys_at // block_size].long() * block_size + keys_at % block_size
    in_context = keys_at < lengths[:, None]
    # slots past a sequence's length hold whatever was there (even NaN): zeros, so masked keys add nothing
    keys = rows[slots].to(q.dtype).masked_fill(~in_context[..., None, None], 0).transpose(1, 2)
    query_pos = (lengths - q_lens)[:, None] + torch.arange(max_q, device=device)
    allowed = (keys_at <= query_pos[..., None]) & in_context[:, None]
    out = F.scaled_dot_product_attention(padded.transpose(1, 2), keys, keys[..., :rank], attn_mask=allowed[:, None],
                                         scale=scale if scale is not None else query_dim ** -0.5, enable_gqa=True)
    per_token = out.transpose(1, 2)[seqs, offsets]  # [tokens, heads, rank]
    return torch.einsum("thr,hvr->thv", per_token, w_value), cache
