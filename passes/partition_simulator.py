"""The simulated multi-rank interpreter: every rank of a partitioned graph, in one process.

Each rank runs the interpreter on its own thread over its own copy of the graph, whose
constants hold that rank's shards (``for_rank``) and whose collectives meet at a
``SimulatedGroup``: every rank deposits its tensor, and each computes the collective's
exact result from all of them (``collective.SIMULATED``: sums in rank order, so every
rank gets the same bits). The expert-parallel all-to-all ops (``moe_all_to_all``) run
their exchange (``moe_all_to_all.EXCHANGED``) over a ``SimulatedExchange``: each of its
steps is a round of the same deposit-and-read. A rank that fails breaks the group, so the
others stop instead of waiting; the first failure is raised.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping, Sequence

import torch

from ..ir import Graph, Registry, for_rank, interpret
from ..ir.opdefs.collective import SIMULATED
from ..ir.opdefs.moe_all_to_all import EXCHANGED, OneRank

TIMEOUT_S = 60.0


class SimulatedGroup:
    """``ranks`` simulated ranks that exchange tensors at each collective."""

    def __init__(self, ranks: int):
        self.ranks = ranks
        self._barrier = threading.Barrier(ranks, timeout=TIMEOUT_S)
        self._slots: list[object] = [None] * ranks

    def collective(self, op: str, rank: int, x: torch.Tensor, **attrs) -> torch.Tensor:
        """Rank ``rank``'s result of collective ``op`` once every rank has brought its ``x``
        (a collective over a group of one rank is each rank's own)."""
        if attrs["ranks"] == 1:
            return SIMULATED[op]([x], **attrs)[0]
        if attrs["ranks"] != self.ranks:
            raise ValueError(f"{op} over {attrs['ranks']} ranks in a simulated group of {self.ranks}")
        return SIMULATED[op](self.exchange(rank, x), **attrs)[rank]

    def exchange(self, rank: int, item: object) -> list:
        """Every rank's ``item``, in rank order, once every rank has brought its own."""
        self._slots[rank] = item
        self._barrier.wait()
        items = list(self._slots)
        self._barrier.wait()  # every rank has read the slots before any rank reuses them
        return items

    def abort(self) -> None:
        self._barrier.abort()


class SimulatedExchange:
    """Rank ``rank``'s side of the all-to-all exchanges of ``group`` (an ``Exchange``)."""

    def __init__(self, group: SimulatedGroup, rank: int):
        self.group, self.rank, self.ranks = group, rank, group.ranks

    def counts(self, send: Sequence[int]) -> list[int]:
        return [sent[self.rank] for sent in self.group.exchange(self.rank, list(send))]

    def all_to_all(self, x: torch.Tensor, send: Sequence[int], receive: Sequence[int]) -> torch.Tensor:
        pieces = self.group.exchange(self.rank, torch.split(x, list(send)))
        got = [sent[self.rank] for sent in pieces]
        if [len(g) for g in got] != list(receive):
            raise ValueError(f"rank {self.rank} expected {list(receive)} rows, got {[len(g) for g in got]}")
        return torch.cat(got)

    def all_gather(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return torch.cat(self.group.exchange(self.rank, x))


def rank_graph(graph: Graph, rank: int, group: SimulatedGroup) -> Graph:
    """A copy of ``graph`` as rank ``rank`` runs it: its constants' shards, its collectives
    bound to ``group``."""
    def bound(op: str):
        if op in EXCHANGED:
            return lambda *args, ranks, **attrs: EXCHANGED[op](
                OneRank() if ranks == 1 else SimulatedExchange(group, rank), *args, ranks=ranks, **attrs)
        return lambda x, **attrs: group.collective(op, rank, x, **attrs)

    registry = Registry([dataclasses.replace(op, reference=bound(op.name)) if op.name in SIMULATED or op.name in
                         EXCHANGED else op for op in graph.registry])
    copy = graph.clone()
    copy.registry = registry
    for value in copy.constants.values():
        value.data = for_rank(value.data, rank)
    return copy


def simulate_ranks(graph: Graph, ranks: int, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                   rank_inputs: Sequence[Mapping[str, torch.Tensor]] | None = None) -> list[list[torch.Tensor]]:
    """Run the partitioned ``graph`` on each of ``ranks`` ranks with the same ``inputs``
    (plus, by name, each rank's own ``rank_inputs[rank]``: what a pipeline stage received
    from the same rank of the stage before); return every rank's outputs."""
    group = SimulatedGroup(ranks)
    graphs = [rank_graph(graph, r, group) for r in range(ranks)]
    results: list[list[torch.Tensor] | None] = [None] * ranks
    errors: list[BaseException | None] = [None] * ranks

    def run(rank: int) -> None:
        try:
            with torch.no_grad():
                feed = inputs if rank_inputs is None else {**inputs, **rank_inputs[rank]}
                results[rank] = interpret(graphs[rank], feed)
        except BaseException as exc:  # noqa: BLE001 - reported below, after the other ranks stop
            errors[rank] = exc
            group.abort()

    threads = [threading.Thread(target=run, args=(r,), name=f"rank-{r}") for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [(r, e) for r, e in enumerate(errors) if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if failed or any(e is not None for e in errors):
        rank, error = (failed or [(r, e) for r, e in enumerate(errors) if e is not None])[0]
        raise RuntimeError(f"simulated rank {rank} of {ranks} failed: {error}") from error
    return results
