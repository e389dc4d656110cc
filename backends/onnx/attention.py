"""Attention as ONNX's ``Attention`` (opset 23), for the plain ``attention`` op and for
``paged_attention`` over the runtime's KV cache (paged blocks or the linear layout).

The masks are built explicitly as booleans, so that their meaning is kiln's whatever an
ONNX runtime's causal alignment: a causal query attends to keys up to its own position,
counted so that the last query sits at the last key, and a sliding window keeps the last
``sliding_window`` of those. Soft-capping is the op's ``softcap`` (applied before masking).
ALiBi (``alibi_bias_max``) and chunked local attention (``chunk_size``) are refused before
export (``table.unexportable``).

``paged_attention`` writes the step's keys and values into the caches at ``slot_mapping``
(``ScatterND``), then makes each new token its own attention batch row: its query
``[num_tokens, heads, 1, dim]`` against its sequence's blocks gathered from the cache
``[num_tokens, kv_heads, max_blocks * block_size, dim]``, masked to its position. The
sequence of token t is the number of ``query_start[1:]`` entries <= t, and its position
``context_lens[seq] - query_start[seq + 1] + t``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from ...ir import Node
from .builder import OnnxBuilder

INT64 = TensorProto.INT64


def _attend(ob: OnnxBuilder, q: Any, k: Any, v: Any, mask: Any, scale: float | None, head_dim: int,
            softcap: float | None) -> Any:
    attrs = {"scale": 1 / math.sqrt(max(head_dim, 1)) if scale is None else scale}
    if softcap is not None:
        attrs["softcap"] = softcap
    return ob.op("Attention", [q, k, v, mask], **attrs)


def _allowed(ob: OnnxBuilder, keys: Any, position: Any, causal: bool, sliding_window: int | None) -> Any:
    """Which keys a query at ``position`` sees: ``keys <= position`` when causal, and
    ``keys > position - sliding_window`` with a window (broadcasting)."""
    conditions = [ob.op("LessOrEqual", [keys, position])] if causal else []
    if sliding_window is not None:
        start = ob.op("Sub", [position, ob.const(np.asarray(sliding_window, np.int64))])
        conditions.append(ob.op("Greater", [keys, start]))
    return conditions[0] if len(conditions) == 1 else ob.op("And", conditions)


def _range(ob: OnnxBuilder, length: Any) -> Any:
    """0 .. length-1 for a 1-element int64 tensor ``length``."""
    zero, one = ob.const(np.asarray(0, np.int64)), ob.const(np.asarray(1, np.int64))
    return ob.op("Range", [zero, ob.op("Squeeze", [length, ob.ints([0])]), one])


def attention(ob: OnnxBuilder, node: Node, q: Any, k: Any, v: Any, mask: Any, scale: float | None, causal: bool,
              sliding_window: int | None, softcap: float | None,
              alibi_bias_max: None = None, chunk_size: None = None) -> Any:
    """[batch, heads, seq, dim] attention, grouped-query heads."""
    if causal or sliding_window is not None:
        queries = ob.op("Shape", [q], start=-2, end=-1)
        keys = ob.op("Shape", [k], start=-2, end=-1)
        offset = ob.op("Sub", [keys, queries])
        position = ob.op("Unsqueeze", [ob.op("Add", [_range(ob, queries), offset]), ob.ints([1])])
        allowed = _allowed(ob, _range(ob, keys), position, causal, sliding_window)
        if mask is None:
            mask = allowed
        elif node.inputs[3].dtype.name == "bool":
            mask = ob.op("And", [mask, allowed])
        else:
            minus_inf = ob.scalar(-math.inf, node.inputs[3].dtype)
            mask = ob.op("Where", [allowed, mask, minus_inf])
    mask = mask if mask is not None else gs.Variable.empty()
    return _attend(ob, q, k, v, mask, scale, node.inputs[0].shape[-1], softcap)


def paged_attention(ob: OnnxBuilder, node: Node, q: Any, k: Any, v: Any, k_cache: Any, v_cache: Any,
                    slot_mapping: Any, query_start: Any, context_lens: Any, block_tables: Any,
                    scale: float | None, sliding_window: int | None, softcap: float | None,
                    alibi_bias_max: None = None, chunk_size: None = None) -> tuple:
    tokens, heads, head_dim = node.inputs[0].shape
    kv_heads = node.inputs[1].shape[1]
    index = ob.op("Unsqueeze", [slot_mapping, ob.ints([1])])
    caches = []
    for cache, new in ((k_cache, k), (v_cache, v)):
        rows = ob.op("Reshape", [cache, ob.ints([-1, kv_heads, head_dim])])
        written = ob.op("ScatterND", [rows, index, new])
        caches.append(ob.op("Reshape", [written, ob.op("Shape", [cache])]))
    token = _range(ob, ob.op("Shape", [q], start=0, end=1))
    ends = ob.op("Cast", [ob.op("Slice", [query_start, ob.ints([1]), ob.ints([2**62])])], to=INT64)
    later = ob.op("GreaterOrEqual", [ob.op("Unsqueeze", [token, ob.ints([1])]),
                                     ob.op("Unsqueeze", [ends, ob.ints([0])])])
    seq = ob.op("ReduceSum", [ob.op("Cast", [later], to=INT64), ob.ints([1])], keepdims=0)
    lengths = ob.op("Cast", [ob.op("Gather", [context_lens, seq], axis=0)], to=INT64)
    position = ob.op("Add", [ob.op("Sub", [lengths, ob.op("Gather", [ends, seq], axis=0)]), token])
    blocks = ob.op("Gather", [block_tables, seq], axis=0)  # [tokens, max_blocks]
    context = [ob.op("Transpose", [ob.op("Reshape", [ob.op("Gather", [c, blocks], axis=0),
                                                     ob.ints([0, -1, kv_heads, head_dim])])], perm=[0, 2, 1, 3])
               for c in caches]
    key_index = _range(ob, ob.op("Shape", [context[0]], start=2, end=3))
    allowed = _allowed(ob, ob.op("Unsqueeze", [key_index, ob.ints([0])]),
                       ob.op("Unsqueeze", [position, ob.ints([1])]), True, sliding_window)
    mask = ob.op("Unsqueeze", [allowed, ob.ints([1, 2])])
    # keys and values outside the context are zeroed: a cache slot nobody wrote may hold
    # anything, NaN included, and a masked NaN would still reach the output through 0 * NaN
    zero = ob.scalar(0.0, node.inputs[0].dtype)
    readable = ob.op("Unsqueeze", [allowed, ob.ints([1, 3])])
    keys, values = (ob.op("Where", [readable, c, zero]) for c in context)
    query = ob.op("Unsqueeze", [q, ob.ints([2])])
    out = _attend(ob, query, keys, values, mask, scale, head_dim, softcap)
    return ob.op("Squeeze", [out, ob.ints([2])]), caches[0], caches[1]
