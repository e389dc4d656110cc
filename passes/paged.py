"""Attention to paged attention: a causal LM's graph becomes the runtime's step graph.

The input graph is what the frontend imports for a causal LM: token ids ``i64[batch, seq]``
in, logits ``[batch, seq, vocab]`` out, causal ``attention`` ops over
``[batch, heads, seq, head_dim]``. The result takes a flattened batch:

    ids, positions, slot_mapping: i64[num_tokens]     query_start: i32[num_seqs + 1]
    context_lens: i32[num_seqs]                        block_tables: i32[num_seqs, max_blocks]       logits_indices: i64[num_logits]
    k_cache_<i>, v_cache_<i>: [num_blocks, block_size, kv_heads, head_dim] per attention layer
    latent_cache_<i>: [num_blocks, block_size, 1, rank + rope] per latent attention layer (instead)

and returns the logits of the tokens at ``logits_indices`` (``[num_logits, vocab]``;
usually each sequence's last token) followed by the updated caches. The rewrite
is a substitution, ``batch -> 1`` and ``seq -> num_tokens``: every op other than
attention works token by token, so it is unchanged; ``arange(seq)`` (the positions the
model made for itself) becomes the ``positions`` input; each attention becomes a
``paged_attention`` over its layer's caches, and each multi-head latent attention
(``mla_attention``) a ``paged_mla_attention`` over one cache of its latents and rotated keys.
The batch metadata is computed once per step, by the runtime, and shared by every layer.
"""

from __future__ import annotations

import sympy

from ..ir import Graph, TensorType, Value, dtypes, ops, sym
from ..ir.shapes import substitute_dims

TOKENS, SEQS, MAX_BLOCKS, BLOCKS, BLOCK_SIZE, LOGITS = (
    sym(n) for n in ("num_tokens", "num_seqs", "max_blocks", "num_blocks", "block_size", "num_logits"))
METADATA = ("positions", "slot_mapping", "query_start", "context_lens", "block_tables", "logits_indices")
ATTENTION_METADATA = ("slot_mapping", "query_start", "context_lens", "block_tables")  # paged_attention's operands
CACHE_OPERANDS = {"paged_attention": (3, 4), "paged_mla_attention": (4,)}  # which operands are KV caches


class PagedAttentionError(ValueError):
    """The graph is not a causal LM graph this pass can rewrite; says why."""


def _contract(graph: Graph) -> tuple[sympy.Symbol, sympy.Symbol]:
    if len(graph.inputs) != 1 or graph.inputs[0].type.rank != 2 or not graph.inputs[0].dtype.is_integer:
        raise PagedAttentionError(f"graph @{graph.name} must take token ids [batch, seq] as its only input")
    batch, seq = graph.inputs[0].shape
    if not all(isinstance(d, sympy.Symbol) for d in (batch, seq)):
        raise PagedAttentionError(f"token ids must have symbolic [batch, seq] dims, got {graph.inputs[0].type}")
    if not graph.outputs or graph.outputs[0].type.rank != 3:
        raise PagedAttentionError(f"graph @{graph.name} must return logits [batch, seq, vocab] first")
    for node in graph.nodes:
        if node.op == "attention" and (not node.attrs["causal"] or node.inputs[3:]):
            raise PagedAttentionError(f"attention at {node.location or node.op} must be causal and unmasked")
    if not any(node.op in ("attention", "mla_attention") for node in graph.nodes):
        written = next((n for n in graph.nodes if n.op == "softmax" and n.results[0].type.rank == 4), None)
        hint = "" if written is None else (
            f": the softmax at {written.location or 'softmax'} may be attention written out in a form the raise "
            "stage does not recognize (a mask or bias other than causal and ALiBi)")
        raise PagedAttentionError(f"graph @{graph.name} has no attention to page{hint}")
    return batch, seq


def _layer_caches(new: Graph, node, index: int) -> tuple[Value, Value]:
    k, v = node.inputs[1].type, node.inputs[2].type
    kv_heads, head_dim, value_dim = k.shape[1], k.shape[3], v.shape[3]
    return (new.add_input(f"k_cache_{index}", TensorType(k.dtype, (BLOCKS, BLOCK_SIZE, kv_heads, head_dim))),
            new.add_input(f"v_cache_{index}", TensorType(v.dtype, (BLOCKS, BLOCK_SIZE, kv_heads, value_dim))))


def _tokens_first(x: Value) -> Value:
    """[1, heads, num_tokens, dim] -> [num_tokens, heads, dim]."""
    return ops.reshape(ops.transpose(x, dim0=1, dim1=2), shape=(TOKENS, x.shape[1], x.shape[3]))


def _heads_first(x: Value) -> Value:
    """[num_tokens, heads, dim] -> [1, heads, num_tokens, dim]."""
    return ops.transpose(ops.reshape(x, shape=(1, TOKENS, x.shape[1], x.shape[2])), dim0=1, dim1=2)


def _latent_cache(new: Graph, node, index: int) -> Value:
    """A latent attention layer's one cache: each token's latent and rotated key, side by side."""
    latent, k_rope = node.inputs[1].type, node.inputs[2].type
    width = latent.shape[3] + k_rope.shape[3]
    return new.add_input(f"latent_cache_{index}", TensorType(latent.dtype, (BLOCKS, BLOCK_SIZE, 1, width)))


def page_attention(graph: Graph) -> int:
    """Rewrite ``graph`` in place into the paged step graph; return the number of
    attention ops paged (0 for a graph that is paged already)."""
    if any(node.op in CACHE_OPERANDS for node in graph.nodes):
        return 0
    batch, seq = _contract(graph)
    mapping = {batch: sympy.Integer(1), seq: TOKENS}
    new = Graph(graph.name, graph.registry)
    ids = new.add_input("ids", TensorType(graph.inputs[0].dtype, (TOKENS,)))
    meta = {
        "positions": new.add_input("positions", TensorType(dtypes.int64, (TOKENS,))),
        "slot_mapping": new.add_input("slot_mapping", TensorType(dtypes.int64, (TOKENS,))),
        "query_start": new.add_input("query_start", TensorType(dtypes.int32, (SEQS + 1,))),
        "context_lens": new.add_input("context_lens", TensorType(dtypes.int32, (SEQS,))),
        "block_tables": new.add_input("block_tables", TensorType(dtypes.int32, (SEQS, MAX_BLOCKS))),
        "logits_indices": new.add_input("logits_indices", TensorType(dtypes.int64, (LOGITS,))),
    }
    env: dict[int, Value] = {id(graph.inputs[0]): ops.reshape(ids, shape=(1, TOKENS))}
    for name, value in graph.constants.items():
        env[id(value)] = new.add_constant(value.data, value.type, name)
    caches: list[Value] = []
    layers = 0
    for node in graph.nodes:
        inputs = [None if v is None else env[id(v)] for v in node.inputs]
        attrs = {k: substitute_dims(v, mapping) for k, v in node.attrs.items()}
        before = len(new.nodes)
        if node.op == "arange" and attrs["end"] == TOKENS and attrs["start"] == 0 and attrs["step"] == 1:
            results = [ops.cast(meta["positions"], dtype=node.results[0].dtype)]
        elif node.op == "attention":
            k_cache, v_cache = _layer_caches(new, node, layers)
            q, k, v = (_tokens_first(x) for x in inputs[:3])
            out, k_cache, v_cache = ops.paged_attention(
                q, k, v, k_cache, v_cache, *(meta[n] for n in ATTENTION_METADATA),
                scale=attrs["scale"] if attrs["scale"] is not None else node.inputs[0].shape[3] ** -0.5,
                sliding_window=attrs["sliding_window"], softcap=attrs["softcap"],
                alibi_bias_max=attrs["alibi_bias_max"], chunk_size=attrs["chunk_size"])
            caches += [k_cache, v_cache]
            layers += 1
            results = [_heads_first(out)]
        elif node.op == "mla_attention":
            caches.append(_latent_cache(new, node, layers))
            out, caches[-1] = ops.paged_mla_attention(*(_tokens_first(x) for x in inputs[:3]), inputs[3], caches[-1],
                                                      *(meta[n] for n in ATTENTION_METADATA), scale=attrs["scale"])
            layers += 1
            results = [_heads_first(out)]
        else:
            results = new.call(node.op, inputs, attrs).results
        for created in new.nodes[before:]:
            created.location = node.location
        for old, result in zip(node.results, results):
            result.name = old.name
            env[id(old)] = result
    logits = env[id(graph.outputs[0])]
    selected = ops.index_select(logits, meta["logits_indices"], dim=1)
    new.set_outputs([ops.reshape(selected, shape=(LOGITS, logits.shape[2])), *caches])
    graph.take_contents(new)
    return layers
