"""Expert parallelism: the sharding rules of mixture-of-experts ops when a partitioning
splits experts across its ranks (``partition_tensor_parallel(..., expert_parallel=True)``).

Under plain tensor parallelism a ``moe`` runs replicated: every rank holds every expert.
With expert parallelism rank ``r`` of ``n`` holds experts ``[r * E/n, (r + 1) * E/n)`` (their
stacked ``gate_up`` and ``down`` split along the experts), and:

- every rank routes every token (the router's logits are replicated, and routing is
  cheap): ``moe`` becomes ``moe_route`` then ``moe_experts``; ``moe_experts`` (a router left
  as primitive ops, as DeepSeek-V3's) takes the routing as it is;
- the rank's own experts run on the (token, choice) pairs routed to them: expert ids are
  made local by subtracting the rank's first expert, and a choice of another rank's expert
  gets weight 0 (it adds nothing, also where the weight scales the expert's input: a gated
  MLP without biases maps 0 to 0; its id is clamped into range);
- each rank's result is a partial sum over its experts, reduced once (``all_reduce``)
  where a replicated value is needed, as a row-parallel linear's is.

That is the default dispatch, ``"all_reduce"``: no token crosses ranks, because the step's
activations are replicated on every rank of a tensor-parallel group. With
``"all_to_all"`` each rank routes only its share of the tokens and sends each choice's row
to the rank owning the expert: ``moe`` becomes ``moe_all_to_all`` and ``moe_experts``
``moe_experts_all_to_all`` (collectives over the group, ``ir/opdefs/moe_all_to_all.py``),
whose results are replicated; a rank's experts then run only on the rows chosen for them.
"""

from __future__ import annotations

import torch

from ..ir import Node, Value
from .sharding import PARTIAL, REPLICATED, Partitioner, Split

EXPERT_ATTRS = ("activation", "weigh_inputs")  # the experts' attributes, not the routing's


def _local_choices(p: Partitioner, weights: Value, indices: Value, experts: int) -> tuple[Value, Value]:
    """The routing restricted to the rank's experts: local ids, and weight 0 for the others."""
    per_rank = experts // p.ranks
    first = p.local_constant("expert_start", torch.arange(p.ranks, dtype=torch.int64)[:, None] * per_rank)
    local = p.call("sub", [indices, first]).result
    zero = p.graph.scalar(0, indices.dtype)
    mine = p.call("logical_and", [p.call("ge", [local, zero]).result,
                                  p.call("lt", [local, p.graph.scalar(per_rank, indices.dtype)]).result]).result
    weights = p.call("where", [mine, weights, p.graph.scalar(0, weights.dtype)]).result
    return weights, p.call("where", [mine, local, zero]).result


def _splits_experts(p: Partitioner, gate_up: Value, down: Value) -> bool:
    experts = gate_up.shape[0]
    if not (gate_up.is_constant and down.is_constant and p.splittable(experts, p.ranks)):
        p.refusals.append(f"{experts} experts do not split among {p.ranks} ranks")
        return False
    return True


def _local_experts(p: Partitioner, node: Node, x: Value, weights: Value, indices: Value, gate_up: Value,
                   down: Value) -> list:
    weights, indices = _local_choices(p, weights, indices, gate_up.shape[0])
    split = Split(0, p.ranks)
    out = p.call("moe_experts", [p.operand(x, REPLICATED), weights, indices, p.operand(gate_up, split),
                                 p.operand(down, split)], {k: node.attrs[k] for k in EXPERT_ATTRS}, node.location)
    return [(out.result, PARTIAL)]


def moe_experts(p: Partitioner, node: Node):
    """The rank's experts over the routing computed before them."""
    x, weights, indices, gate_up, down = node.inputs
    if not _splits_experts(p, gate_up, down):
        return None
    return _local_experts(p, node, x, p.operand(weights, REPLICATED), p.operand(indices, REPLICATED), gate_up, down)


def moe(p: Partitioner, node: Node):
    """Routing on every rank (``moe_route``), then the rank's experts."""
    x, logits, gate_up, down, *bias = node.inputs
    if not _splits_experts(p, gate_up, down):
        return None
    attrs = {k: v for k, v in node.attrs.items() if k not in EXPERT_ATTRS}
    route = p.call("moe_route", [p.operand(logits, REPLICATED), *(p.operand(b, REPLICATED) for b in bias)], attrs,
                   node.location)
    weights, indices = route.results
    return _local_experts(p, node, x, weights, indices, gate_up, down)


def _whole_router(p: Partitioner, logits: Value) -> Value:
    """The router's logits on every rank: a linear of constant weights that the tensor-parallel
    rules split by columns is computed again whole (its ``tokens x hidden x experts`` products
    cost less than gathering its columns); any other value is converted as usual."""
    node = logits.producer
    if node is None or node.op != "linear" or not isinstance(p.sharding(logits), Split) \
            or not all(v is None or v.is_constant for v in node.inputs[1:]):
        return p.operand(logits, REPLICATED)
    inputs = [None if v is None else p.operand(v, REPLICATED) for v in node.inputs]
    return p.call("linear", inputs, node.attrs, node.location).result


def _exchanged(p: Partitioner, node: Node, op: str, experts_at: int, router_at: int | None = None):
    """``node`` as ``op``: its experts (``gate_up``, ``down`` at ``experts_at``) split, the
    router's logits (at ``router_at``) computed whole, its other operands and its result
    replicated."""
    gate_up, down = node.inputs[experts_at:experts_at + 2]
    if not _splits_experts(p, gate_up, down):
        return None

    def operand(index: int, value: Value | None) -> Value | None:
        if value is None:
            return None
        if index in (experts_at, experts_at + 1):
            return p.operand(value, Split(0, p.ranks))
        return _whole_router(p, value) if index == router_at else p.operand(value, REPLICATED)

    inputs = [operand(i, v) for i, v in enumerate(node.inputs)]
    out = p.call(op, inputs, {**node.attrs, "ranks": p.ranks}, node.location)
    return [(out.result, REPLICATED)]


def moe_all_to_all(p: Partitioner, node: Node):
    """``moe`` whose tokens go to their experts' ranks and back (``moe_all_to_all``)."""
    return _exchanged(p, node, "moe_all_to_all", experts_at=2, router_at=1)


def moe_experts_all_to_all(p: Partitioner, node: Node):
    """``moe_experts`` whose tokens go to their experts' ranks and back (``moe_experts_all_to_all``)."""
    return _exchanged(p, node, "moe_experts_all_to_all", experts_at=3)


DISPATCHES = ("all_reduce", "all_to_all")
EXPERT_RULES = {"all_reduce": {"moe": moe, "moe_experts": moe_experts},
                "all_to_all": {"moe": moe_all_to_all, "moe_experts": moe_experts_all_to_all}}


def check_dispatch(expert_dispatch: str, ep: int | None = None) -> None:
    """Refuse an ``expert_dispatch`` that is not one of ``DISPATCHES`` (naming them), or,
    given the expert-parallel degree ``ep``, an all-to-all without expert parallelism."""
    if expert_dispatch not in DISPATCHES:
        raise ValueError(f"expert_dispatch must be one of {', '.join(map(repr, DISPATCHES))}, got {expert_dispatch!r}")
    if ep == 1 and expert_dispatch == "all_to_all":
        raise ValueError("expert_dispatch='all_to_all' sends tokens to the ranks that hold their experts: it needs "
                         "expert parallelism (ep equal to tp, above 1), got ep=1")
