"""Attention as one traced op: the ``kiln::attention`` torch custom op, and its
registration as an attention implementation of ``transformers``.

Exported through it, a Hugging Face decoder's attention arrives as a single node with
its scale, causality, sliding window, soft-capping and chunk size as arguments: no mask
subgraph, no repeated key/value heads. Its eager implementation is kiln's reference attention.

Models pass the sliding window to the attention interface; chunked local attention (Llama 4)
is a layer type instead: transformers builds a chunked mask for the layers that
``config.layer_types`` names ``"chunked_attention"``, of ``config.attention_chunk_size``
positions. kiln takes no mask, so the chunk size is read from the layer's config the same way.
"""

from __future__ import annotations

import torch

from ..ir.opdefs.nn import attention_reference

IMPLEMENTATION = "kiln"


@torch.library.custom_op("kiln::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              sliding_window: int, softcap: float, chunk_size: int) -> torch.Tensor:
    """Attention over [batch, heads, seq, head_dim]; 0 means no sliding window / soft-cap / chunks."""
    return attention_reference(q, k, v, None, scale, causal, sliding_window or None, softcap or None,
                               chunk_size=chunk_size or None)


@attention.register_fake
def _(q, k, v, scale, causal, sliding_window, softcap, chunk_size):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def chunk_size(module: torch.nn.Module) -> int:
    """The chunk of positions that ``module``'s layer attends within (0: no chunks), from
    its config's ``layer_types`` and ``attention_chunk_size``, as transformers' masks do."""
    config, layer = getattr(module, "config", None), getattr(module, "layer_idx", None)
    layer_types = getattr(config, "layer_types", None)
    if layer is None or not layer_types or layer_types[layer] != "chunked_attention":
        return 0
    size = getattr(config, "attention_chunk_size", None)
    if not size:
        raise ValueError(f"layer {layer} is a chunked attention layer, but the config has no attention_chunk_size")
    return int(size)


def _transformers_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, **kwargs):
    if attention_mask is not None:
        raise ValueError("kiln attention takes no attention mask: sequences are unpadded")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.kiln.attention(query, key, value, float(scale), bool(getattr(module, "is_causal", True)),
                                   int(sliding_window or 0), float(softcap or 0.0), chunk_size(module))
    return out.transpose(1, 2), None


def _no_mask(*args, **kwargs):
    return None  # causality, sliding windows and chunks are attributes of kiln's attention


def register_with_transformers() -> str:
    """Make ``attn_implementation="kiln"`` available to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _transformers_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)
    return IMPLEMENTATION
