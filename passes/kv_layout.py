"""The KV-cache layout a backend needs, fixed in the step graph's types.

The paged step graph leaves ``block_size`` and ``max_blocks`` symbolic, so it serves any
paged layout. A TensorRT that offers only linear per-slot caches (TensorRT-RTX's
``KVCacheMode.LINEAR``) needs each sequence's cache in one contiguous slot: that is the
paged layout with one block per sequence, ``block_size = max_seq_len``. The
``linear_kv_cache`` pass writes this into the graph (``max_blocks -> 1``,
``block_size -> max_seq_len``, ``num_blocks -> num_slots``), so the backend and the
runtime read the layout off the graph: ``block_tables[i, 0]`` is sequence i's slot and
``slot_mapping`` indexes ``slot * max_seq_len + position``.
"""

from __future__ import annotations

import sympy

from ..ir import Graph, sym
from ..ir.graph import infer_result_types
from ..ir.shapes import substitute_dims
from .paged import BLOCK_SIZE, BLOCKS, CACHE_OPERANDS, MAX_BLOCKS

MAX_SEQ_LEN, SLOTS = sym("max_seq_len"), sym("num_slots")


def specialize(graph: Graph, mapping: dict) -> None:
    """Replace symbols in ``graph``'s input types and attributes by ``mapping`` (to other
    expressions or to numbers) and infer every result type again, in place."""
    for value in graph.inputs:
        value.type = value.type.with_shape(substitute_dims(value.shape, mapping))
    for node in graph.nodes:
        node.attrs = {k: substitute_dims(v, mapping) for k, v in node.attrs.items()}
        for result, type_ in zip(node.results, infer_result_types(node.opdef, node.inputs, node.attrs)):
            result.type = type_


def linear_kv_cache(graph: Graph) -> int:
    """Give the paged step graph linear per-slot caches; return how many caches changed
    (0 when there is no paged attention or the layout is linear already)."""
    caches = [n.inputs[i] for n in graph.nodes for i in CACHE_OPERANDS.get(n.op, ())]
    if not caches or any(c.shape[1] != BLOCK_SIZE for c in caches):
        return 0
    specialize(graph, {MAX_BLOCKS: sympy.Integer(1), BLOCK_SIZE: MAX_SEQ_LEN, BLOCKS: SLOTS})
    return len(caches)
