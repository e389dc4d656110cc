"""Attention as TensorRT's native attention layer (``add_attention_v2``), for the plain
``attention`` op and for ``paged_attention`` over the linear per-slot KV cache that the
``tensorrt`` pipeline's graph declares. ALiBi (``alibi_bias_max``) and chunked local
attention (``chunk_size``) are refused before lowering (``table.unlowerable``).

TensorRT-RTX 1.7 builds its attention layer only for padded ``[batch, heads, seq, dim]``
inputs here (the packed, ``cu_seqlens`` form has no kernel for a build without a GPU and
no decomposition), while kiln's step graph is a flattened mixed batch. So each new token
is its own attention batch row: a query of length 1 against its sequence's whole cache
slot, masked to ``positions + 1`` keys by the layer's per-row key lengths. Before that,
the step's keys and values are scattered into the caches at ``slot_mapping``
(``slot * max_seq_len + position``). For decode steps (one token per sequence) this is
exactly the batched decode attention; a prefill reads its slot once per token.
"""

from __future__ import annotations

from typing import Any

from ...ir import Node, dtypes
from .layers import scale_query
from .network import NetworkBuilder


def _attend(nb: NetworkBuilder, q: Any, k: Any, v: Any, causal: bool, key_lengths: Any = None,
            mask: Any = None) -> Any:
    trt = nb.trt.module
    kind = trt.CausalMaskKind.LOWER_RIGHT if causal else trt.CausalMaskKind.NONE
    layer = nb.network.add_attention_v2(q, k, v, trt.AttentionNormalizationOp.SOFTMAX, kind)
    if key_lengths is not None:
        layer.key_value_lengths = key_lengths
    if mask is not None:
        layer.mask = mask
    return nb.out(layer)


def attention(nb: NetworkBuilder, node: Node, q: Any, k: Any, v: Any, mask: Any, scale: float | None,
              causal: bool, sliding_window: int | None, softcap: float | None,
              alibi_bias_max: None = None, chunk_size: None = None) -> Any:
    """[batch, heads, seq, dim] attention, grouped-query heads, causal aligned to the last query."""
    q = scale_query(nb, q, scale, node.inputs[0].shape[-1])
    return _attend(nb, q, k, v, causal, mask=None if mask is None else nb.with_rank(mask, 4))


def _write_cache(nb: NetworkBuilder, cache: Any, new: Any, slots: Any, cache_shape: tuple, new_shape: tuple) -> Any:
    """``cache`` [num_slots, max_seq_len, kv_heads, dim] with ``new`` [num_tokens, kv_heads,
    dim] written at the flat positions ``slots``."""
    rows = nb.reshape(cache, (cache_shape[0] * cache_shape[1], *cache_shape[2:]))
    index = nb.reshape(slots, (new_shape[0], 1))
    written = nb.out(nb.network.add_scatter(rows, index, new, nb.trt.module.ScatterMode.ND))
    return nb.reshape(written, cache_shape)


def _per_token(nb: NetworkBuilder, cache: Any, slot_of_token: Any) -> Any:
    """Each token's cache slot as [num_tokens, kv_heads, max_seq_len, dim]."""
    return nb.permute(nb.out(nb.network.add_gather(cache, slot_of_token, 0)), (0, 2, 1, 3))


def paged_attention(nb: NetworkBuilder, node: Node, q: Any, k: Any, v: Any, k_cache: Any, v_cache: Any,
                    slot_mapping: Any, query_start: Any, context_lens: Any, block_tables: Any,
                    scale: float | None, sliding_window: int | None, softcap: float | None,
                    alibi_bias_max: None = None, chunk_size: None = None) -> tuple:
    q_type, k_type, cache_type = node.inputs[0], node.inputs[1], node.inputs[3]
    tokens, heads, head_dim = q_type.shape
    k_cache = _write_cache(nb, k_cache, k, slot_mapping, cache_type.shape, k_type.shape)
    v_cache = _write_cache(nb, v_cache, v, slot_mapping, cache_type.shape, k_type.shape)
    slot_len = nb.dim(cache_type.shape[1])
    slot_of_token = nb.elementwise("FLOOR_DIV", slot_mapping, slot_len)
    position = nb.elementwise("SUB", slot_mapping, nb.elementwise("PROD", slot_of_token, slot_len))
    key_lengths = nb.cast(nb.elementwise("SUM", position, nb.scalar(1, position)), dtypes.int32)
    query = nb.reshape(scale_query(nb, q, scale, head_dim), (tokens, heads, 1, head_dim))
    out = _attend(nb, query, _per_token(nb, k_cache, slot_of_token), _per_token(nb, v_cache, slot_of_token),
                  causal=False, key_lengths=key_lengths)
    return nb.reshape(out, node.results[0].shape), k_cache, v_cache
