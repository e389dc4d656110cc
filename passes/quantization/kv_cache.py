"""``fp8_kv_cache``: the paged step graph's key and value caches become E4M3, which
halves the bytes a token's cache takes and so doubles the sequences that fit.

``paged_attention`` (``ir/opdefs/paged.py``) stores keys and values saturated to E4M3
with a scale of 1 and reads them back into the queries' dtype; the pass only retypes the
cache inputs and infers the results' types again.
"""

from __future__ import annotations

from ...ir import Graph, dtypes
from ...ir.graph import infer_result_types


def fp8_kv_cache(graph: Graph) -> int:
    """Make every paged-attention cache input E4M3; return how many changed."""
    caches = {id(n.inputs[i]): n.inputs[i] for n in graph.nodes if n.op == "paged_attention" for i in (3, 4)}
    changed = [c for c in caches.values() if c.is_input and c.dtype != dtypes.float8_e4m3fn]
    for cache in changed:
        cache.type = cache.type.with_dtype(dtypes.float8_e4m3fn)
    if changed:
        for node in graph.nodes:
            for result, type_ in zip(node.results, infer_result_types(node.opdef, node.inputs, node.attrs)):
                result.type = type_
    return len(changed)
