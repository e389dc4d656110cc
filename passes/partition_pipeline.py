"""Pipeline parallelism: a graph cut into ``pp`` stages balanced by a cost model.

Each node costs the time a roofline model gives it on the target: the bytes of the
weights it reads at memory bandwidth plus its FLOPs (linear and matmul, for ``tokens``
tokens a step) at the tensor-core rate. A cut may go before any node where the fewest
values cross (between two layers: the hidden state and the residual, and the rotary
tables every layer shares); among those, an exact dynamic program picks the ``pp - 1``
cuts that minimize the costliest stage.

Each stage is a graph of its own: it takes the step's inputs it uses and the values
that cross into it (named ``boundary_<k>``), and returns the values that cross out,
then the original outputs it computes (the last stage: the logits; every stage: its
layers' KV caches). ``run_stages`` runs them in order (each over its tensor-parallel
ranks in the simulated interpreter when ``tp`` > 1), and ``pipeline_schedule`` says how
much of a pipelined step the stages idle (the bubble) for a number of micro-batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import torch

from ..ir import Graph, Node, Value, interpret, verify
from ..ir.shapes import static_numel
from .sharding import PartitionError

MAX_CROSSING = 2  # activations that may cross a cut: the hidden state and the residual
H100_FLOPS, H100_BYTES_PER_S = 790e12, 3.0e12  # measured bf16 dense rate and HBM bandwidth (docs/benchmarks.md)


@dataclass(frozen=True)
class CostModel:
    """Seconds per node: weight bytes at ``bytes_per_s`` plus FLOPs at ``flops`` for ``tokens`` tokens."""

    tokens: int = 256
    flops: float = H100_FLOPS
    bytes_per_s: float = H100_BYTES_PER_S

    def node_seconds(self, node: Node) -> float:
        weights = sum(_bytes(v) for v in dict.fromkeys(x for x in node.inputs if x is not None and x.is_constant))
        flops = 0.0
        if node.op in ("linear", "matmul"):
            out = node.results[0]
            inner = node.inputs[0].shape[-1]
            per_token = _static(out.shape[-1]) * _static(inner) * 2
            flops = per_token * self.tokens
        return weights / self.bytes_per_s + flops / self.flops


def _static(dim) -> int:
    return dim if isinstance(dim, int) else 1


def _bytes(value: Value) -> int:
    numel = static_numel(value.shape)
    return 0 if numel is None else numel * value.dtype.torch_dtype.itemsize


@dataclass
class PipelineStages:
    """A graph cut into stages: each stage's graph, and where each original output comes out."""

    stages: list[Graph]
    crossing_in: list[list[str]]  # per stage, the names of the values it takes from the stage before
    outputs: list[tuple[int, int]]  # per original output: (stage, index among that stage's outputs)
    seconds: list[float]  # each stage's cost


def split_pipeline(graph: Graph, pp: int, cost: CostModel | None = None) -> PipelineStages:
    """Cut ``graph`` into ``pp`` stages (see the module docstring); ``PartitionError`` when
    it has fewer places to cut than stages asked."""
    if pp < 1:
        raise PartitionError(f"pipeline parallelism needs at least one stage, got {pp}")
    cost = cost or CostModel()
    seconds = [cost.node_seconds(n) for n in graph.nodes]
    cheap = _recomputable(graph)
    crossing = [[v for v in values if id(v) not in cheap] for values in _crossing(graph)]
    candidates = [i for i in range(1, len(graph.nodes)) if 1 <= len(crossing[i]) <= MAX_CROSSING]
    if len(candidates) < pp - 1:
        raise PartitionError(f"graph @{graph.name} has {len(candidates)} places to cut between its layers; "
                             f"{pp} stages need {pp - 1}")
    cuts = _balanced_cuts(seconds, candidates, pp)
    bounds = [0, *cuts, len(graph.nodes)]
    return _build(graph, bounds, crossing, cheap, [sum(seconds[a:b]) for a, b in zip(bounds, bounds[1:])])


def _recomputable(graph: Graph) -> set[int]:
    """Results computed from the step's inputs without a weight matrix (the rotary tables,
    say): each stage recomputes those it needs rather than receive them."""
    cheap: set[int] = set()
    for node in graph.nodes:
        if all(v is None or v.is_input or id(v) in cheap or (v.is_constant and v.type.rank < 2)
               for v in node.inputs):
            cheap.update(id(r) for r in node.results)
    return cheap


def _crossing(graph: Graph) -> list[list[Value]]:
    """Per node position i: the node results defined before i and used by a node at or after i."""
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    last_use: dict[int, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            if v is not None and v.producer is not None:
                last_use[id(v)] = i
    out, live = [], []
    for i, node in enumerate(graph.nodes):
        live = [v for v in live if last_use.get(id(v), -1) >= i]
        out.append(list(live))
        live += [r for r in node.results if id(r) in last_use and last_use[id(r)] > position[id(node)]]
    return out


def _balanced_cuts(seconds: Sequence[float], candidates: Sequence[int], pp: int) -> list[int]:
    """The ``pp - 1`` cut positions among ``candidates`` that minimize the costliest stage (exact DP)."""
    prefix = [0.0]
    for s in seconds:
        prefix.append(prefix[-1] + s)
    points = [0, *candidates, len(seconds)]

    @cache
    def best(end: int, stages: int) -> tuple[float, tuple[int, ...]]:
        """Cheapest max-stage cost of nodes [0, points[end]) in ``stages`` stages, and its cuts."""
        if stages == 1:
            return prefix[points[end]], ()
        options = []
        for k in range(stages - 1, end):
            worst, cuts = best(k, stages - 1)
            options.append((max(worst, prefix[points[end]] - prefix[points[k]]), cuts + (points[k],)))
        return min(options)

    return list(best(len(points) - 1, pp)[1])


def _build(graph: Graph, bounds: list[int], crossing: list[list[Value]], cheap: set[int],
           seconds: list[float]) -> PipelineStages:
    stages, crossing_in, where = [], [], {}
    for s, (start, end) in enumerate(zip(bounds, bounds[1:])):
        incoming = crossing[start] if start else []
        leaving = crossing[end] if end < len(graph.nodes) else []
        stage = Graph(f"{graph.name}_stage{s}", graph.registry)
        mapping: dict[int, Value] = {}
        nodes = _with_recomputed(graph.nodes[:start], graph.nodes[start:end], cheap)
        used = {id(v) for n in nodes for v in n.inputs if v is not None}
        for v in graph.inputs:
            if id(v) in used:
                mapping[id(v)] = stage.add_input(v.name, v.type)
        for k, v in enumerate(incoming):
            mapping[id(v)] = stage.add_input(f"boundary_{k}", v.type)
        for name, v in graph.constants.items():
            if id(v) in used:
                mapping[id(v)] = stage.add_constant(v.data, v.type, name)
        for node in nodes:
            new = stage.call(node.op, [None if v is None else mapping[id(v)] for v in node.inputs], node.attrs,
                             node.location, [r.type for r in node.results])
            for old, result in zip(node.results, new.results):
                result.name = old.name
                mapping[id(old)] = result
        outputs = [mapping[id(v)] for v in leaving]
        for index, v in enumerate(graph.outputs):
            if v.producer is not None and start <= graph.index_of(v.producer) < end:
                where[index] = (s, len(outputs))
                outputs.append(mapping[id(v)])
        stage.set_outputs(outputs)
        verify(stage)
        stages.append(stage)
        crossing_in.append([f"boundary_{k}" for k in range(len(incoming))])
    return PipelineStages(stages, crossing_in, [where[i] for i in range(len(graph.outputs))], seconds)


def _with_recomputed(before: list[Node], nodes: list[Node], cheap: set[int]) -> list[Node]:
    """``nodes``, preceded by the earlier cheap nodes whose results they need (transitively)."""
    needed = {id(v) for n in nodes for v in n.inputs if v is not None and id(v) in cheap}
    taken = []
    for node in reversed(before):
        if any(id(r) in needed for r in node.results):
            taken.append(node)
            needed |= {id(v) for v in node.inputs if v is not None and id(v) in cheap}
    return taken[::-1] + nodes


def run_stages(split: PipelineStages, inputs: Mapping[str, torch.Tensor], tp: int = 1) -> list[torch.Tensor]:
    """The original graph's outputs, running the stages in order (over ``tp`` simulated
    ranks each), each stage's boundary outputs feeding the next stage."""
    from .partition_simulator import simulate_ranks

    carried: list[list[torch.Tensor]] = [[] for _ in range(tp)]  # per rank: what the last stage handed on
    results = []
    for s, (stage, names) in enumerate(zip(split.stages, split.crossing_in)):
        step = {v.name: inputs[v.name] for v in stage.inputs if v.name not in names}
        own = [dict(zip(names, values)) for values in carried]
        outputs = [interpret(stage, {**step, **own[0]})] if tp == 1 else simulate_ranks(stage, tp, step, own)
        carried = [out[:len(split.crossing_in[s + 1])] if s + 1 < len(split.stages) else [] for out in outputs]
        results.append(outputs[0])
    return [results[s][k] for s, k in split.outputs]


def pipeline_schedule(stage_seconds: Sequence[float], microbatches: int) -> tuple[float, float]:
    """(makespan, bubble fraction) of one step cut into ``microbatches`` equal micro-batches
    flowing through the stages (each stage takes its share of the step per micro-batch,
    a micro-batch enters a stage when the stage is free and the previous stage is done)."""
    if microbatches < 1:
        raise ValueError(f"at least one micro-batch, got {microbatches}")
    share = [s / microbatches for s in stage_seconds]
    done = [0.0] * len(share)
    for _ in range(microbatches):
        ready = 0.0
        for s, seconds in enumerate(share):
            done[s] = max(done[s], ready) + seconds
            ready = done[s]
    makespan = done[-1]
    busy = sum(stage_seconds)
    return makespan, 1.0 - busy / (len(share) * makespan) if makespan else 0.0

