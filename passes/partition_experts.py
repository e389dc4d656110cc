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

No token crosses ranks here because the step's activations are replicated on every rank
of a tensor-parallel group: each rank already holds every token its experts need. An
``all_to_all`` dispatch pays off where attention is data-parallel (tokens split across
ranks); kiln's step graphs are not, yet.
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


EXPERT_RULES = {"moe": moe, "moe_experts": moe_experts}
