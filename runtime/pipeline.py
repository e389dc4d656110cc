"""Pipeline-parallel steps: a step's sequences cut into micro-batches that flow through
the stages, one process per rank on torch.distributed.

Ranks are laid out as TensorRT-LLM lays them out, tensor parallelism inside a node and
pipeline parallelism across: global rank ``stage * tp + tp_rank`` (``Layout``). Rank 0
(stage 0, tensor-parallel rank 0) serves. Every rank gets the step's inputs (broadcast
by ``distributed``) and cuts the step's sequences into the same micro-batches
(``split_microbatches``: consecutive sequences, balanced by tokens; each sequence's
tokens stay together, so the micro-batches are independent). A rank's ``StageRunner``
runs the micro-batches in turn: it receives the values that cross into its stage from
the same tensor-parallel rank of the stage before, runs its executor over its layers'
caches, and sends the values that cross out to the next stage without waiting for them
to arrive (``isend``), so that stage 0 runs micro-batch 1 while stage 1 runs
micro-batch 0. The last stage's first rank sends each micro-batch's logits to rank 0.
Each rank counts the seconds its executor runs; ``PipelineStats`` compares them with
rank 0's wall time of the steps: the bubble measured, next to ``pipeline_schedule``'s.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sympy
import torch
import torch.distributed as dist

from ..ir import Value
from ..ir.shapes import evaluate_shape
from ..passes.partition_pipeline import pipeline_schedule
from .executor import Step
from .pipeline_files import Stage

TOKEN_INPUTS = ("ids", "positions", "slot_mapping")
SEQUENCE_INPUTS = ("context_lens", "block_tables")
LOGITS_TAG = 7  # a micro-batch's messages are tagged 8 * index + k: k < 7 for boundary values, 7 for the logits


@dataclass(frozen=True)
class Layout:
    """``tp`` tensor-parallel ranks in each of ``pp`` stages: rank ``base + stage * tp +
    tp_rank``. ``base`` (the head, which gets the logits) is 0 for the engine's ranks, and
    the first rank of a disaggregated prefill worker for its ranks."""

    tp: int = 1
    pp: int = 1
    base: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def stage(self, rank: int) -> int:
        return (rank - self.base) // self.tp

    def tp_rank(self, rank: int) -> int:
        return (rank - self.base) % self.tp

    def rank(self, stage: int, tp_rank: int) -> int:
        return self.base + stage * self.tp + tp_rank

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank(stage, r) for r in range(self.tp)]


def split_microbatches(inputs: Mapping[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """A step's inputs cut into at most ``count`` micro-batches of consecutive sequences,
    each of about the same number of tokens (at least one sequence each); their logits,
    concatenated, are the step's."""
    starts = inputs["query_start"].tolist()
    seqs = len(starts) - 1
    count = max(1, min(count, seqs))
    if count == 1:
        return [dict(inputs)]
    bounds = [0]
    for k in range(1, count):
        bounds.append(bisect.bisect_left(starts, starts[-1] * k / count, bounds[-1] + 1, seqs - (count - k)))
    bounds.append(seqs)
    logits = inputs["logits_indices"]
    batches = []
    for a, b in zip(bounds, bounds[1:]):
        first, end = starts[a], starts[b]
        batch = {name: inputs[name][first:end] for name in TOKEN_INPUTS}
        batch.update({name: inputs[name][a:b] for name in SEQUENCE_INPUTS})
        batch["query_start"] = inputs["query_start"][a:b + 1] - first
        batch["logits_indices"] = logits[(logits >= first) & (logits < end)] - first
        batches.append(batch)
    return batches


def _tag(microbatch: int, k: int) -> int:
    return 8 * microbatch + k


class StageRunner:
    """One rank's part of each step: its stage's executor ``step`` over its ``caches``,
    fed by the stage before and feeding the stage after (see the module docstring).
    ``step_inputs`` are the whole graph's step inputs, whose shapes give the sizes of the
    values a micro-batch brings; ``logits`` is (vocab, dtype) of the whole graph's logits."""

    def __init__(self, stage: Stage, layout: Layout, rank: int, step: Step, caches: dict[str, torch.Tensor],
                 step_inputs: Sequence[Value], logits: tuple[int, torch.dtype], device: torch.device):
        if stage.boundary_out >= LOGITS_TAG or len(stage.boundary_in) >= LOGITS_TAG:
            raise ValueError(f"stage {stage.index} exchanges more than {LOGITS_TAG - 1} values with its neighbours")
        self.stage, self.layout, self.rank = stage, layout, rank
        self.step, self.caches, self.device = step, caches, device
        self._symbols = [(v.name, v.shape) for v in step_inputs]
        self._logits = logits
        self.busy_s = 0.0  # seconds the executor ran, over every step
        tp_rank = layout.tp_rank(rank)
        self._previous = layout.rank(stage.index - 1, tp_rank) if stage.index else None
        self._next = None if stage.last else layout.rank(stage.index + 1, tp_rank)
        self._last_first = layout.rank(layout.pp - 1, 0)  # the rank that sends the logits to the head
        self._head = layout.base

    def run(self, inputs: Mapping[str, torch.Tensor], microbatches: int) -> torch.Tensor | None:
        """Run one step's micro-batches through this rank's stage; the head (rank 0) gets
        the step's logits (other ranks None)."""
        batches = split_microbatches(inputs, microbatches)
        receiving = self.rank == self._head and not self.stage.last
        incoming = [self._post_logits(i, batch) for i, batch in enumerate(batches)] if receiving else []
        sending, logits = [], []
        for i, batch in enumerate(batches):
            crossing = self._receive(i, batch) if self._previous is not None else {}
            start = time.perf_counter()
            outputs = self.step(**{name: batch[name] for name in self.stage.step_inputs()}, **crossing, **self.caches)
            self.busy_s += time.perf_counter() - start
            if self._next is not None:
                sending += [dist.isend(outputs[k].contiguous(), self._next, tag=_tag(i, k))
                            for k in range(self.stage.boundary_out)]
            elif self.rank == self._head:
                logits.append(outputs[0])
            elif self.rank == self._last_first and len(outputs[0]):
                sending.append(dist.isend(outputs[0].contiguous(), self._head, tag=_tag(i, LOGITS_TAG)))
        for work in sending:
            work.wait()
        if self.rank != self._head:
            return None
        for work, _ in filter(None, incoming):
            work.wait()
        if receiving:
            vocab, dtype = self._logits
            logits = [torch.empty(0, vocab, dtype=dtype, device=self.device) if slot is None else slot[1]
                      for slot in incoming]
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def _post_logits(self, index: int, batch: Mapping[str, torch.Tensor]):
        """The head's receive of micro-batch ``index``'s logits (None when it has none), posted up front."""
        rows = len(batch["logits_indices"])
        if not rows:
            return None
        tensor = torch.empty(rows, self._logits[0], dtype=self._logits[1], device=self.device)
        return dist.irecv(tensor, self._last_first, tag=_tag(index, LOGITS_TAG)), tensor

    def _receive(self, index: int, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The values micro-batch ``index`` brings from the stage before, sized by its inputs."""
        env = {dim: size for name, shape in self._symbols for dim, size in zip(shape, batch[name].shape)
               if isinstance(dim, sympy.Symbol)}
        values = {}
        for k, value in enumerate(self.stage.boundary_in):
            tensor = torch.empty(evaluate_shape(value.shape, env), dtype=value.dtype.torch_dtype, device=self.device)
            dist.recv(tensor, self._previous, tag=_tag(index, k))
            values[value.name] = tensor
        return values


@dataclass(frozen=True)
class PipelineStats:
    """What the steps so far cost: rank 0's wall time in them, each stage's executor time
    (its first rank's), and the micro-batches per step (on average)."""

    steps: int
    wall_s: float
    stage_busy_s: tuple[float, ...]
    microbatches: float

    @property
    def bubble(self) -> float:
        """The fraction of the stages' time in the steps that they idled (measured)."""
        if not self.wall_s:
            return 0.0
        return 1.0 - sum(self.stage_busy_s) / (len(self.stage_busy_s) * self.wall_s)

    @property
    def predicted_bubble(self) -> float:
        """The bubble ``pipeline_schedule`` gives for the stages' measured times and the
        mean number of micro-batches (rounded): communication and rank 0's own work between
        micro-batches are not in it."""
        if not self.steps:
            return 0.0
        return pipeline_schedule(self.stage_busy_s, max(1, round(self.microbatches)))[1]
