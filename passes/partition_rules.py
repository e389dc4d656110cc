"""How each op is sharded under tensor parallelism: ``RULES`` maps an op name to a rule.

A rule gets the ``Partitioner`` and the node, reads its operands' shardings, builds the
node's sharded form (asking ``p.operand(value, sharding)`` for each operand as it wants
it) and returns each result's new value and sharding, or ``None`` to let the op run
replicated. The rules, in short:

- elementwise ops, casts, norms over the last dim, rotary, slices and concatenations
  keep a split that is not along the axis they work on; ``add``/``sub`` of partial sums
  stay partial;
- ``reshape``, ``transpose``, ``permute``, ``(un)squeeze`` move the split to its new axis;
- ``linear`` with a replicated input and constant weight is column-parallel (its output
  split by features, in whole heads where a reshape into heads follows); with an input
  split by features, row-parallel (a partial sum, the bias added after the reduction);
- ``attention`` is split by heads; key/value heads fewer than the ranks are replicated
  on groups of ranks; heads that the ranks cannot share are a refusal;
- ``embedding`` with a constant table is vocabulary-parallel: each rank looks up the
  ids in its rows and contributes zeros elsewhere (a partial sum).
"""

from __future__ import annotations

from collections.abc import Callable

import sympy
import torch

from ..ir import Node, Value, ops
from .sharding import PARTIAL, REPLICATED, Partitioner, Sharding, Split
from .rewriter import Rule as Rewrite

ShardingRule = Callable[[Partitioner, Node], "list[tuple[Value, Sharding]] | None"]


def _out(p: Partitioner, node: Node, inputs, sharding: Sharding, attrs: dict | None = None):
    new = p.call(node.op, inputs, node.attrs if attrs is None else attrs, node.location)
    return [(r, sharding) for r in new.results]


def _first_split(p: Partitioner, node: Node, rank: int) -> Split | None:
    """The first operand split, moved to the result's axes (operands broadcast from the right)."""
    for v in node.inputs:
        s = None if v is None else p.sharding(v)
        if isinstance(s, Split):
            return Split(s.dim + rank - v.type.rank, s.parts)
    return None


def _aligned(v: Value, split: Split, rank: int) -> Sharding:
    """How operand ``v`` must be sharded to meet a result split as ``split`` (broadcast dims stay whole)."""
    dim = split.dim - (rank - v.type.rank)
    return REPLICATED if dim < 0 or v.shape[dim] == 1 else Split(dim, split.parts)


def elementwise(p: Partitioner, node: Node):
    """Broadcasting ops: the result is split as the first split operand; the others follow."""
    rank = node.results[0].type.rank
    shardings = [None if v is None else p.sharding(v) for v in node.inputs]
    if node.op in ("add", "sub") and all(s is PARTIAL for s in shardings):
        return _out(p, node, [p.operand(v, PARTIAL) for v in node.inputs], PARTIAL)
    split = _first_split(p, node, rank)
    if split is None:
        return None
    inputs = [None if v is None else p.operand(v, _aligned(v, split, rank)) for v in node.inputs]
    return _out(p, node, inputs, split)


def _last_axis_whole(p: Partitioner, node: Node):
    """Norms and rotary: only the first operand follows the split (weights stay whole)."""
    x = node.inputs[0]
    s = p.sharding(x)
    rank = x.type.rank
    if not isinstance(s, Split) or s.dim == rank - 1:
        return None
    others = [None if v is None else p.operand(v, _aligned(v, s, rank) if node.op == "rotary" else REPLICATED)
              for v in node.inputs[1:]]
    return _out(p, node, [p.operand(x, s), *others], s)


def _along(attr: str):
    """Ops that work along one axis (``attr``): a split on any other axis is kept."""
    def rule(p: Partitioner, node: Node):
        x = node.inputs[0]
        s = p.sharding(x)
        if not isinstance(s, Split) or node.attrs[attr] % x.type.rank == s.dim:
            return None
        rest = [p.operand(v, REPLICATED) for v in node.inputs[1:]]
        return _out(p, node, [p.operand(x, s), *rest], s)

    return rule


def concat(p: Partitioner, node: Node):
    split = _first_split(p, node, node.results[0].type.rank)
    if split is None or split.dim == node.attrs["dim"] % node.results[0].type.rank:
        return None
    return _out(p, node, [p.operand(v, split) for v in node.inputs], split)


def _local_shape(result: Value, split: Split) -> list:
    shape = list(result.shape)
    shape[split.dim] //= split.parts
    return shape


def reshape(p: Partitioner, node: Node):
    """A split moves to the result axis that starts at the same place in the flattened
    data (the same product of sizes before it), when that axis splits as evenly."""
    x, out = node.inputs[0], node.results[0]
    s = p.sharding(x)
    if not isinstance(s, Split):
        return None
    before = _product(x.shape[:s.dim])
    for dim in range(out.type.rank):
        if _product(out.shape[:dim]) == before and p.splittable(out.shape[dim], s.parts):
            split = Split(dim, s.parts)
            return _out(p, node, [p.operand(x, s)], split, {"shape": _local_shape(out, split)})
    return None


def _product(dims) -> sympy.Expr:
    total = sympy.Integer(1)
    for d in dims:
        total *= d
    return sympy.expand(total)


def _moved(mapping: Callable[[Node, int, int], int | None]):
    """Ops that only move axes: ``mapping(node, rank, dim)`` is the split's new axis."""
    def rule(p: Partitioner, node: Node):
        x = node.inputs[0]
        s = p.sharding(x)
        if not isinstance(s, Split):
            return None
        return _out(p, node, [p.operand(x, s)], Split(mapping(node, x.type.rank, s.dim), s.parts))

    return rule


def _transposed(node: Node, rank: int, dim: int) -> int:
    a, b = node.attrs["dim0"] % rank, node.attrs["dim1"] % rank
    return b if dim == a else a if dim == b else dim


def _permuted(node: Node, rank: int, dim: int) -> int:
    return [d % rank for d in node.attrs["dims"]].index(dim)


def _unsqueezed(node: Node, rank: int, dim: int) -> int:
    return dim + (dim >= node.attrs["dim"] % (rank + 1))


def _squeezed(node: Node, rank: int, dim: int) -> int:
    return dim - (dim > node.attrs["dim"] % rank)


def _head_units(value: Value) -> int:
    """How many whole units the last axis of ``value`` has: the heads of a reshape into
    [..., heads, head_dim] that follows (through a bias add), else its features."""
    features = value.shape[-1]
    for user in value.users:
        if user.op == "reshape":
            shape = user.results[0].shape
            if len(shape) == value.type.rank + 1 and isinstance(shape[-2], int) and shape[-2] * shape[-1] == features:
                return shape[-2]
        if user.op == "add" and user.results[0].shape[-1] == features:
            return _head_units(user.results[0])
    return features


def linear(p: Partitioner, node: Node):
    x, weight, bias = (node.inputs + [None])[:3]
    if not weight.is_constant or (bias is not None and not bias.is_constant):
        return None
    s = p.sharding(x)
    if isinstance(s, Split) and s.dim == x.type.rank - 1 and s.parts == p.ranks:
        partial = p.call("linear", [p.operand(x, s), p.operand(weight, Split(1, p.ranks))], {}, node.location)
        if bias is None:
            return [(partial.result, PARTIAL)]
        total = p.convert(partial.result, PARTIAL, REPLICATED)
        return [(p.call("add", [total, p.operand(bias, REPLICATED)]).result, REPLICATED)]
    if s is not REPLICATED:
        return None
    units = _head_units(node.results[0])
    parts = p.ranks if units % p.ranks == 0 else units if p.ranks % units == 0 and units != weight.shape[0] else None
    if parts is None:
        return None
    split = Split(0, parts)
    inputs = [p.operand(x, REPLICATED), p.operand(weight, split)] + ([p.operand(bias, split)] if bias else [])
    return _out(p, node, inputs, Split(x.type.rank - 1, parts))


def attention(p: Partitioner, node: Node):
    q, k, v = node.inputs[:3]
    heads, kv_heads = q.shape[1], k.shape[1]
    kv_parts = p.ranks if kv_heads % p.ranks == 0 else kv_heads if p.ranks % kv_heads == 0 else None
    if node.attrs["alibi_bias_max"] is not None:
        p.refusals.append(f"attention at {node.location or 'attention'} has ALiBi biases, whose slopes follow the "
                          "head index: it is not split by heads yet")
        return None
    if heads % p.ranks or kv_parts is None:
        p.refusals.append(f"attention at {node.location or 'attention'} has {heads} query and {kv_heads} key/value "
                          f"heads: the query heads must divide among {p.ranks} ranks, and the key/value heads "
                          "divide among them or divide the ranks")
        return None
    inputs = [p.operand(q, Split(1, p.ranks)), p.operand(k, Split(1, kv_parts)), p.operand(v, Split(1, kv_parts))]
    if node.inputs[3:]:
        mask = node.inputs[3]
        inputs.append(p.operand(mask, _aligned(mask, Split(1, p.ranks), 4)))
    return _out(p, node, inputs, Split(1, p.ranks))


def embedding(p: Partitioner, node: Node):
    """Vocabulary-parallel: rank r holds rows [r * n, (r + 1) * n) of the table."""
    ids, table = node.inputs
    if not table.is_constant or p.sharding(ids) is not REPLICATED or not p.splittable(table.shape[0], p.ranks):
        return None
    rows = table.shape[0] // p.ranks
    g = p.graph
    first = p.local_constant("vocab_start", torch.arange(p.ranks, dtype=ids.dtype.torch_dtype)[:, None] * rows)
    ids = p.operand(ids, REPLICATED)
    local = p.call("sub", [ids, first]).result
    zero = g.scalar(0, ids.dtype)
    inside = p.call("logical_and", [p.call("ge", [local, zero]).result,
                                    p.call("lt", [local, g.scalar(rows, ids.dtype)]).result]).result
    looked_up = p.call("embedding", [p.call("where", [inside, local, zero]).result,
                                     p.operand(table, Split(0, p.ranks))], {}, node.location).result
    mask = p.call("unsqueeze", [inside], {"dim": -1}).result
    out = p.call("where", [mask, looked_up, g.scalar(0, table.dtype)]).result
    return [(out, PARTIAL)]


_ELEMENTWISE = ("add sub mul div pow maximum minimum eq ne lt le gt ge logical_and logical_or logical_not neg abs "
                "exp log sqrt rsqrt reciprocal sin cos tanh erf sigmoid relu silu gelu clamp where cast").split()

RULES: dict[str, ShardingRule] = {
    **{op: elementwise for op in _ELEMENTWISE},
    "rms_norm": _last_axis_whole, "layer_norm": _last_axis_whole, "rotary": _last_axis_whole,
    "softmax": _along("dim"), "log_softmax": _along("dim"), "slice": _along("dim"), "split": _along("dim"),
    "index_select": _along("dim"), "concat": concat,
    "reshape": reshape, "transpose": _moved(_transposed), "permute": _moved(_permuted),
    "unsqueeze": _moved(_unsqueezed), "squeeze": _moved(_squeezed),
    "linear": linear, "attention": attention, "embedding": embedding,
}


# Selecting rows early (``select_logits``) through the collectives, which work token by token.
def _select_reduced(x, index, dim: int, ranks: int, group: str):
    return ops.index_select(ops.all_reduce(x, ranks=ranks, group=group), index, dim=dim)


def _reduced_selected(x, index, dim: int, ranks: int, group: str):
    return ops.all_reduce(ops.index_select(x, index, dim=dim), ranks=ranks, group=group)


def _select_gathered(x, index, dim: int, gathered: int, ranks: int, group: str):
    return ops.index_select(ops.all_gather(x, dim=gathered, ranks=ranks, group=group), index, dim=dim)


def _gathered_selected(x, index, dim: int, gathered: int, ranks: int, group: str):
    return ops.all_gather(ops.index_select(x, index, dim=dim), dim=gathered, ranks=ranks, group=group)


def _same_on_every_rank(m) -> bool:
    """The rows selected are the same on every rank (a graph input, not a rank's own cut)."""
    index = m["index"]
    return not index.is_constant or index.is_literal


def _other_axes(m) -> bool:
    rank = m["x"].type.rank
    return _same_on_every_rank(m) and m["dim"] % rank != m["gathered"] % rank


SELECTION_THROUGH_COLLECTIVES = [
    Rewrite(_select_reduced, _reduced_selected, when=_same_on_every_rank, name="select_before_all_reduce"),
    Rewrite(_select_gathered, _gathered_selected, when=_other_axes, name="select_before_all_gather"),
]
