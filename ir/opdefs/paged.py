"""Attention over a paged KV cache, for a flattened batch of many sequences.

The batch is ``num_tokens`` new tokens of ``num_seqs`` sequences laid end to end:
sequence ``s`` owns tokens ``query_start[s]:query_start[s+1]`` and, after this step,
``context_lens[s]`` tokens in the cache, in the blocks listed by ``block_tables[s]``. The
new keys and values are written at ``slot_mapping`` (block * block_size + offset), then
each sequence's queries attend causally to its whole context: the last query of a
sequence sits at position ``context_lens[s] - 1``. One op thus serves prefill, chunked
prefill and decode of a mixed batch (with ALiBi's biases where ``alibi_bias_max`` is set,
from each query's and key's position in its sequence; only the keys of the query's own chunk
of positions where ``chunk_size`` is set). It returns the output and the updated caches; the
reference copies the caches, the fast kernels of later backends update them in place.

The caches hold the keys' and values' dtype, or E4M3 (``kv_cache_dtype="fp8"``): keys and
values are then stored saturated to E4M3's range with a scale of 1, as vLLM stores them
without calibrated scales, and read back into the queries' dtype.
"""

from __future__ import annotations

import torch

from .. import dtypes
from ..registry import Attr, OpDef
from ..shapes import ShapeError, dims_equal, normalize_dim, shapes_equal
from .nn import attention_reference, check_chunk_size
from .quantized import quantize_fp8


def _paged_attention(q, k, v, k_cache, v_cache, slot_mapping, query_start, context_lens, block_tables,
                     scale, sliding_window, softcap, alibi_bias_max=None, chunk_size=None):
    if q.rank != 3 or k.rank != 3 or v.rank != 3:
        raise ShapeError(f"q, k, v must be [num_tokens, heads, head_dim], got {q}, {k}, {v}")
    tokens, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    if not (dims_equal(k.shape[0], tokens) and shapes_equal(k.shape[:2], v.shape[:2])
            and dims_equal(k.shape[2], head_dim)):
        raise ShapeError(f"k {k} and v {v} do not fit q {q}")
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads == 0):
        raise ShapeError(f"query heads {heads} must be a static multiple of key/value heads {kv_heads}")
    for cache, new in ((k_cache, k), (v_cache, v)):
        if cache.rank != 4 or not shapes_equal(cache.shape[2:], new.shape[1:]) or \
                cache.dtype not in (new.dtype, dtypes.float8_e4m3fn):
            raise ShapeError(f"cache {cache} must be [num_blocks, block_size, {kv_heads}, ...] of {new.dtype} "
                             f"or {dtypes.float8_e4m3fn}")
    if alibi_bias_max is not None and alibi_bias_max <= 0:
        raise ShapeError(f"alibi_bias_max must be positive, got {alibi_bias_max}")
    check_chunk_size(chunk_size)
    if not shapes_equal(k_cache.shape[:2], v_cache.shape[:2]):
        raise ShapeError(f"key cache {k_cache} and value cache {v_cache} differ in blocks")
    if q.dtype != k.dtype or q.dtype != v.dtype or not q.dtype.is_float:
        raise ShapeError("q, k and v must share a floating-point dtype")
    seqs = context_lens.shape[0] if context_lens.rank == 1 else None
    if seqs is None or slot_mapping.rank != 1 or not dims_equal(slot_mapping.shape[0], tokens):
        raise ShapeError(f"slot_mapping {slot_mapping} must be [num_tokens] and context_lens {context_lens} [num_seqs]")
    if query_start.rank != 1 or not dims_equal(query_start.shape[0], normalize_dim(seqs + 1)):
        raise ShapeError(f"query_start {query_start} must be [num_seqs + 1]")
    if block_tables.rank != 2 or not dims_equal(block_tables.shape[0], seqs):
        raise ShapeError(f"block_tables {block_tables} must be [num_seqs, max_blocks]")
    for index in (slot_mapping, query_start, context_lens, block_tables):
        if not index.dtype.is_integer:
            raise ShapeError(f"batch metadata must be integers, got {index}")
    return q.with_shape((tokens, heads, v.shape[2])), k_cache, v_cache


def to_cache(x: torch.Tensor, cache_dtype: torch.dtype) -> torch.Tensor:
    """Keys or values as the cache stores them: as they are, or saturated to E4M3."""
    if cache_dtype == torch.float8_e4m3fn:
        return quantize_fp8(x, 1.0)
    return x


def paged_attention_reference(q, k, v, k_cache, v_cache, slot_mapping, query_start, context_lens, block_tables,
                              scale, sliding_window, softcap, alibi_bias_max=None, chunk_size=None):
    """Write the new keys and values, then run exact attention sequence by sequence."""
    block_size = k_cache.shape[1]
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping.long()] = to_cache(k, k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping.long()] = to_cache(v, v_cache.dtype)
    out = q.new_zeros((*q.shape[:2], v.shape[2]))
    for s in range(context_lens.shape[0]):
        start, end, length = int(query_start[s]), int(query_start[s + 1]), int(context_lens[s])
        if end == start:
            continue
        blocks = block_tables[s, : -(-length // block_size)].long()
        keys = k_cache[blocks].flatten(0, 1)[:length].to(q.dtype)
        values = v_cache[blocks].flatten(0, 1)[:length].to(q.dtype)
        out[start:end] = attention_reference(
            q[start:end].transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            None, scale, True, sliding_window, softcap, alibi_bias_max, chunk_size)[0].transpose(0, 1)
    return out, k_cache, v_cache


OPS = [
    OpDef("paged_attention",
          ("q", "k", "v", "k_cache", "v_cache", "slot_mapping", "query_start", "context_lens", "block_tables"),
          _paged_attention, paged_attention_reference,
          attrs={"scale": Attr("float", optional=True), "sliding_window": Attr("int", optional=True),
                 "softcap": Attr("float", optional=True), "alibi_bias_max": Attr("float", optional=True),
                 "chunk_size": Attr("int", optional=True)},
          results=3,
          doc="causal attention of a flattened mixed batch over a paged KV cache; returns the output "
              "[num_tokens, heads, head_dim] and the updated key and value caches"),
]
