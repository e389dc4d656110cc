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
across the ranks too (``partition_experts``); otherwise those layers run replicated.
"""

from __future__ import annotations

from ..ir import Graph, verify
from .cleanup import eliminate_dead_code
from .manager import Pass
from .partition_experts import EXPERT_RULES
from .partition_rules import RULES
from .sharding import REPLICATED, PartitionError, Partitioner

__all__ = ["PartitionError", "partition", "partition_tensor_parallel"]


def partition_tensor_parallel(graph: Graph, ranks: int, strict: bool = False, expert_parallel: bool = False) -> int:
    """Rewrite ``graph`` in place into the program each of ``ranks`` ranks runs; return
    the number of collectives inserted. With ``strict``, refuse (``PartitionError``, with
    the reasons) a graph whose attention (or, with ``expert_parallel``, whose experts)
    cannot be split over the ranks."""
    if ranks < 1:
        raise PartitionError(f"tensor parallelism needs at least one rank, got {ranks}")
    if ranks == 1:
        return 0
    p = Partitioner(graph, ranks)
    rules = {**RULES, **EXPERT_RULES} if expert_parallel else RULES
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
    return sum(1 for n in graph.nodes if n.op in ("all_reduce", "all_gather"))


def partition(ranks: int, strict: bool = True, expert_parallel: bool = False) -> Pass:
    """The ``partition`` pass for ``ranks``-way tensor parallelism, the experts split across
    the ranks too with ``expert_parallel`` (run once, before fusion)."""
    return Pass("partition", lambda graph: partition_tensor_parallel(graph, ranks, strict, expert_parallel),
                f"{ranks}-way tensor parallelism{' with expert parallelism' if expert_parallel else ''}: "
                "sharded weights and the collectives between them", changes_signature=True)
