"""What the calibrated schemes learn from running the model on text: statistics of the
input of each quantizable linear layer, gathered with the interpreter.

Layers that read one value (Q, K and V; gate and up) form a ``LinearGroup`` and share
its ``InputStatistics``: the per-channel absolute maximum (SmoothQuant) and mean
(AWQ), the Hessian ``2 X^T X / n`` of the layers' least-squares error (GPTQ), and a
sample of input rows (AWQ's scale and clipping search). Statistics are accumulated
batch by batch; no activation is kept beyond the sample. They are taken on the
unquantized graph, in one run over the calibration text (not layer by layer on the
already quantized model, as the GPTQ and AWQ papers' code does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ...ir import Graph, Node, Value, interpret


@dataclass
class InputStatistics:
    """Running statistics of one linear input of ``features`` channels."""

    features: int
    with_hessian: bool = False
    rows: int = 0
    absmax: torch.Tensor = field(init=False)
    abssum: torch.Tensor = field(init=False)
    hessian: torch.Tensor | None = field(init=False, default=None)
    samples: list[torch.Tensor] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.absmax = torch.zeros(self.features)
        self.abssum = torch.zeros(self.features, dtype=torch.float64)
        if self.with_hessian:
            self.hessian = torch.zeros(self.features, self.features)

    def add(self, x: torch.Tensor, sample_rows: int) -> None:
        """Accumulate the rows of ``x`` (``[..., features]``), keeping ``sample_rows`` evenly spaced ones."""
        x = x.detach().reshape(-1, self.features).float().cpu()
        self.rows += x.shape[0]
        magnitude = x.abs()
        self.absmax = torch.maximum(self.absmax, magnitude.amax(dim=0))
        self.abssum += magnitude.sum(dim=0, dtype=torch.float64)
        if self.hessian is not None:
            self.hessian += 2 * x.T @ x
        if sample_rows:
            step = max(1, x.shape[0] // sample_rows)
            self.samples.append(x[::step][:sample_rows].clone())

    @property
    def absmean(self) -> torch.Tensor:
        """The mean absolute value of each channel."""
        return (self.abssum / max(self.rows, 1)).float()

    @property
    def mean_hessian(self) -> torch.Tensor:
        """``2 X^T X / n`` over every row seen."""
        if self.hessian is None:
            raise ValueError("these statistics were gathered without the Hessian")
        return self.hessian / max(self.rows, 1)

    @property
    def sample(self) -> torch.Tensor:
        """The kept input rows, ``[rows, features]``."""
        return torch.cat(self.samples) if self.samples else torch.zeros(0, self.features)


@dataclass
class LinearGroup:
    """The quantizable linear layers that read one value, and that value's statistics."""

    input: Value
    layers: list[Node]
    stats: InputStatistics | None = None
    factor: Any = None  # what a scheme derives from the statistics for all the layers (GPTQ's HessianFactor)

    @property
    def weights(self) -> list[torch.Tensor]:
        """The layers' float weights, ``[out, in]`` each."""
        return [n.inputs[1].tensor().detach().float() for n in self.layers]


def linear_groups(layers: Sequence[Node]) -> list[LinearGroup]:
    """``layers`` grouped by the value they read, in graph order."""
    groups: dict[int, LinearGroup] = {}
    for node in layers:
        groups.setdefault(id(node.inputs[0]), LinearGroup(node.inputs[0], [])).layers.append(node)
    return list(groups.values())


def gather_statistics(graph: Graph, groups: Sequence[LinearGroup], batches: Sequence[torch.Tensor],
                      hessian: bool = False, sample_tokens: int = 0) -> None:
    """Run ``graph`` with the interpreter on each of ``batches`` (its inputs' token ids) and
    give each group the statistics of its input; ``sample_tokens`` rows are kept in all."""
    if not batches:
        raise ValueError("calibrated quantization needs calibration text")
    for group in groups:
        group.stats = InputStatistics(group.input.type.shape[-1], hessian)
    per_batch = math.ceil(sample_tokens / len(batches)) if sample_tokens else 0
    outputs = graph.outputs
    graph.outputs = [g.input for g in groups]
    try:
        constants = {name: v.tensor() for name, v in graph.constants.items() if v.uses or v in graph.outputs}
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="text", disable=None, leave=False):
                for group, x in zip(groups, interpret(graph, [batch], check_types=False, constants=constants)):
                    group.stats.add(x, per_batch)
    finally:
        graph.outputs = outputs
