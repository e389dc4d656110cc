"""Tensor parallelism as a graph rewrite: one graph in, the program every rank runs out.

The pass walks the graph in order and gives each value a *sharding*: ``REPLICATED``
(every rank holds all of it), ``Split(dim, parts)`` (rank ``r`` holds chunk
``r * parts // ranks`` of ``parts`` along ``dim``; fewer parts than ranks replicate each
chunk on a group of ranks, as key/value heads are when there are fewer than ranks) or
``PARTIAL`` (every rank holds a term; the value is their sum). How each op's operands
and results may be sharded is declared per op in ``partition_rules.RULES``, not per
model; an op without a rule runs replicated. Where a rule wants an operand sharded
otherwise than it is, the pass converts it:

- a constant is sharded lazily (``ShardData``: each rank's engine holds its chunk);
- a replicated activation is cut with an ``index_select`` of the rank's indices;
- a split value becomes replicated by ``all_gather``, a partial one by ``all_reduce``.

The result is one graph whose types are each rank's (local) shapes; ranks differ only in
their constants' data (``kiln.ir.for_rank``). Column- then row-parallel linears (QKV and
gate/up by columns, o_proj and down_proj by rows), attention split by heads,
vocabulary-parallel embedding and LM head all follow from the rules. With
``strict=True`` a graph whose attention cannot be split over ``ranks`` is refused with the
reason. With ``expert_parallel=True`` the experts of mixture-of-experts layers are split
across the ranks too (``partition_experts``; ``expert_dispatch`` chooses how the tokens
meet them: ``"all_reduce"`` or ``"all_to_all"``); otherwise those layers run replicated.
"""

from __future__ import annotations

from ..ir import Graph, verify
from .cleanup import eliminate_dead_code
from .manager import Pass
from .partition_experts import EXPERT_RULES, check_dispatch
from .partition_rules import RULES
from .sharding import REPLICATED, PartitionError, Partitioner

__all__ = ["PartitionError", "partition", "partition_tensor_parallel"]

COLLECTIVES = ("all_reduce", "all_gather", "moe_all_to_all", "moe_experts_all_to_all")


def partition_tensor_parallel(graph: Graph, ranks: int, strict: bool = False, expert_parallel: bool = False,
                              expert_dispatch: str = "all_reduce") -> int:
    """Rewrite ``graph`` in place into the program each of ``ranks`` ranks runs; return
    the number of collectives inserted. With ``strict``, refuse (``PartitionError``, with
    the reasons) a graph whose attention (or, with ``expert_parallel``, whose experts)
    cannot be split over the ranks. ``expert_dispatch`` (with ``expert_parallel``):
    ``"all_reduce"`` (every rank runs its experts on every token routed to them, and the
    partial sums are reduced) or ``"all_to_all"`` (each rank's share of the tokens goes to
    the experts' ranks and back, ``moe_all_to_all``)."""
    check_dispatch(expert_dispatch)
    if ranks < 1:
        raise PartitionError(f"tensor parallelism needs at least one rank, got {ranks}")
    if ranks == 1:
        return 0
    p = Partitioner(graph, ranks)
    rules = {**RULES, **EXPERT_RULES[expert_dispatch]} if expert_parallel else RULES
    for node in graph.nodes:
        rule = rules.get(node.op)
        results = rule(p, node) if rule is not None else None
        if results is None:
            p.replicated_copy(node)
        else:
            for old, (new, sharding) in zip(node.results, results):
                p.bind(old, new, sharding)
    p.graph.set_outputs(p.operand(v, REPLICATED) for v in graph.outputs)
    if strict and p.refusals:
        raise PartitionError(f"graph @{graph.name} cannot be split over {ranks} ranks: "
                             + "; ".join(dict.fromkeys(p.refusals)))
    graph.take_contents(p.graph)
    eliminate_dead_code(graph)
    verify(graph)
    return sum(1 for n in graph.nodes if n.op in COLLECTIVES)


def partition(ranks: int, strict: bool = True, expert_parallel: bool = False,
              expert_dispatch: str = "all_reduce") -> Pass:
    """The ``partition`` pass for ``ranks``-way tensor parallelism, the experts split across
    the ranks too with ``expert_parallel`` (their tokens dispatched by ``expert_dispatch``),
    run once, before fusion."""
    check_dispatch(expert_dispatch)
    experts = f" with expert parallelism ({expert_dispatch})" if expert_parallel else ""
    return Pass("partition",
                lambda graph: partition_tensor_parallel(graph, ranks, strict, expert_parallel, expert_dispatch),
                f"{ranks}-way tensor parallelism{experts}: "
                "sharded weights and the collectives between them", changes_signature=True)
