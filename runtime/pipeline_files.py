"""The files of a pipeline-parallel engine: one graph, executor and weights file per stage.

An engine of ``pp`` > 1 stages keeps the whole graph (``graph.kiln``, with its
executor; it gives the model's cache layout and vocabulary, and its constants have no
file) and, for each stage ``s`` of ``split_pipeline``:

    graph.stage<s>.kiln                 the stage's graph
    executor.stage<s>.py                the executor generated from it
    weights.stage<s>.safetensors        its constants (weights.stage<s>.rank<r>.safetensors
                                        per tensor-parallel rank)

so that each rank reads only its own stage's weights. A stage's graph takes the step's
inputs it uses, the values that cross into it (``boundary_<k>``) and its layers' caches,
and returns the values that cross out, then the logits (the last stage) and its caches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..ir import Graph, Value, for_rank, parse, verify
from ..passes.partition_pipeline import split_pipeline
from .executor import generate_executor

BOUNDARY = "boundary_"
CACHE_PREFIXES = ("k_cache_", "v_cache_")


class StageLoadError(ValueError):
    """A stage of a pipeline-parallel engine that cannot be loaded; says why."""


def graph_file(stage: int) -> str:
    return f"graph.stage{stage}.kiln"


def executor_file(stage: int) -> str:
    return f"executor.stage{stage}.py"


def weights_file(stage: int, tp_rank: int, tp: int) -> str:
    """Stage ``stage``'s weights file for tensor-parallel rank ``tp_rank`` of ``tp``."""
    return f"weights.stage{stage}.safetensors" if tp == 1 else f"weights.stage{stage}.rank{tp_rank}.safetensors"


def stage_files(pp: int, tp: int) -> list[str]:
    """Every file the stages of an engine of ``pp`` stages and ``tp`` ranks each need."""
    return [name for s in range(pp) for name in
            (graph_file(s), executor_file(s), *(weights_file(s, r, tp) for r in range(tp)))]


@dataclass(frozen=True)
class Stage:
    """One pipeline stage as a rank runs it: its graph (constants bound for that rank)
    and its executor's source."""

    index: int
    last: bool
    graph: Graph
    executor_source: str

    @property
    def boundary_in(self) -> list[Value]:
        """The values this stage receives from the one before, in order."""
        return [v for v in self.graph.inputs if v.name.startswith(BOUNDARY)]

    @property
    def cache_inputs(self) -> list[Value]:
        """Its layers' KV caches (none for a stage without attention)."""
        return [v for v in self.graph.inputs if v.name.startswith(CACHE_PREFIXES)]

    @property
    def boundary_out(self) -> int:
        """How many of its outputs (the first ones) go to the next stage: all but the
        logits (last stage) and its caches."""
        return len(self.graph.outputs) - len(self.cache_inputs) - (1 if self.last else 0)

    def step_inputs(self) -> list[str]:
        """The step's integer inputs (ids, positions...) this stage takes."""
        return [v.name for v in self.graph.inputs if not v.name.startswith((BOUNDARY, *CACHE_PREFIXES))]


def _constants(graph: Graph, tp_rank: int | None) -> dict[str, torch.Tensor]:
    return {name: (v.tensor() if tp_rank is None else for_rank(v.data, tp_rank).materialize()).contiguous()
            for name, v in graph.constants.items() if v.uses or v in graph.outputs}


def pipeline_files(graph: Graph, pp: int, tp: int, backend: str,
                   version: str) -> tuple[dict[str, str], dict[str, Mapping[str, torch.Tensor]]]:
    """The text files (graph and executor) and the weights files of each stage of
    ``graph`` cut into ``pp`` stages, its constants sharded over ``tp`` ranks."""
    split = split_pipeline(graph, pp)
    texts: dict[str, str] = {}
    weights: dict[str, Mapping[str, torch.Tensor]] = {}
    for s, stage in enumerate(split.stages):
        texts[graph_file(s)] = str(stage)
        texts[executor_file(s)] = generate_executor(stage, backend, version)
        for r in range(tp):
            weights[weights_file(s, r, tp)] = _constants(stage, r if tp > 1 else None)
    return texts, weights


def read_stage(root: str | Path, stage: int, pp: int, tp_rank: int, tp: int, backend: str, version: str) -> Stage:
    """Stage ``stage`` of the engine in ``root`` (its files' hashes already checked by
    ``read_engine``), with tensor-parallel rank ``tp_rank``'s weights; refuse an executor
    that is not the one kiln generates for the stage's graph."""
    root = Path(root)
    if not 0 <= stage < pp or not 0 <= tp_rank < tp:
        raise StageLoadError(f"engine {root} has {pp} stages of {tp} ranks; there is no stage {stage} rank {tp_rank}")
    graph = parse((root / graph_file(stage)).read_text())
    weights = load_file(str(root / weights_file(stage, tp_rank, tp)))
    missing = [n for n, v in graph.constants.items() if (v.uses or v in graph.outputs) and n not in weights]
    if missing:
        raise StageLoadError(f"{root / weights_file(stage, tp_rank, tp)} lacks constants {missing[:5]}")
    graph.bind_constants({n: weights[n] for n in graph.constants if n in weights})
    verify(graph)
    source = (root / executor_file(stage)).read_text()
    if source != generate_executor(graph, backend, version):
        raise StageLoadError(f"{root / executor_file(stage)} is not the executor kiln generates for "
                             f"{graph_file(stage)}")
    return Stage(stage, stage == pp - 1, graph, source)
