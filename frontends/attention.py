"""Attention as one traced op: the ``kiln::attention`` torch custom op, and its
registration as an attention implementation of ``transformers``.

Exported through it, a Hugging Face decoder's attention arrives as a single node with
its scale, causality, sliding window and soft-capping as arguments: no mask subgraph,
no repeated key/value heads. Its eager implementation is kiln's reference attention.
"""

from __future__ import annotations

import torch

from ..ir.opdefs.nn import attention_reference

IMPLEMENTATION = "kiln"


@torch.library.custom_op("kiln::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              sliding_window: int, softcap: float) -> torch.Tensor:
    """Attention over [batch, heads, seq, head_dim]; 0 means no sliding window / soft-cap."""
    return attention_reference(q, k, v, None, scale, causal, sliding_window or None, softcap or None)


@attention.register_fake
def _(q, k, v, scale, causal, sliding_window, softcap):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _transformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    if attention_mask is not None:
        raise ValueError("kiln attention takes no attention mask: sequences are unpadded")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.kiln.attention(query, key, value, float(scale), bool(getattr(module, "is_causal", True)),
                                   int(sliding_window or 0), float(softcap or 0.0))
    return out.transpose(1, 2), None


def _no_mask(*args, **kwargs):
    return None  # causality and sliding windows are attributes of kiln's attention


def register_with_transformers() -> str:
    """Make ``attn_implementation="kiln"`` available to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _transformers_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)
    return IMPLEMENTATION
