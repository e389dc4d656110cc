"""Constant data behind graph constants, held lazily.

A graph constant refers to a ``ConstantData``; nothing is read or computed until
``materialize()`` is called, so a graph of an 8B-parameter model costs no weight memory
while passes run. Constant folding produces ``FoldedData``, itself lazy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class ConstantData(Protocol):
    """Anything that can produce the tensor of a constant on demand."""

    def materialize(self) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class TensorData:
    """Data already in memory."""

    tensor: torch.Tensor

    def materialize(self) -> torch.Tensor:
        return self.tensor


@dataclass(frozen=True, eq=False)
class LazyData:
    """Data produced by a loader function when first needed (for example from safetensors)."""

    load: Callable[[], torch.Tensor]
    description: str = "lazy"

    def materialize(self) -> torch.Tensor:
        return self.load()


@dataclass(frozen=True, eq=False)
class FoldedData:
    """The result of an op applied to other constants, computed when materialized."""

    reference: Callable[..., Any]
    inputs: Sequence[Any]  # per operand: ConstantData, None, or a list of ConstantData
    attrs: Mapping[str, Any]
    result_index: int
    _cache: dict = field(default_factory=dict, repr=False)

    def materialize(self) -> torch.Tensor:
        if "value" not in self._cache:
            args = [_materialize_operand(x) for x in self.inputs]
            out = self.reference(*args, **self.attrs)
            self._cache["value"] = out[self.result_index] if isinstance(out, tuple) else out
        return self._cache["value"]


def _materialize_operand(operand: Any) -> Any:
    if operand is None:
        return None
    if isinstance(operand, list):
        return [x.materialize() for x in operand]
    return operand.materialize()


@dataclass(frozen=True, eq=False)
class MissingData:
    """A constant whose data is not available (for example a graph parsed from text)."""

    name: str

    def materialize(self) -> torch.Tensor:
        raise LookupError(
            f"constant %{self.name} has no data: the text form holds only its type; "
            "bind tensors with Graph.bind_constants({...})"
        )


@dataclass(frozen=True, eq=False)
class ShardData:
    """One rank's shard of other constant data: of ``parts`` equal chunks along ``dim``,
    rank ``rank`` of ``ranks`` holds chunk ``rank * parts // ranks`` (so with fewer parts
    than ranks, neighbouring ranks hold the same chunk: replicated key/value heads)."""

    source: ConstantData
    dim: int
    parts: int
    ranks: int
    rank: int = 0

    @property
    def chunk(self) -> int:
        return self.rank * self.parts // self.ranks

    def materialize(self) -> torch.Tensor:
        whole = self.source.materialize()
        size = whole.shape[self.dim] // self.parts
        return whole.narrow(self.dim, self.chunk * size, size).contiguous()


def for_rank(data: Any, rank: int) -> Any:
    """``data`` as rank ``rank`` sees it: every ``ShardData`` in it (also inside folded
    constants) takes that rank's chunk; data without shards is returned as it is."""
    if isinstance(data, ShardData):
        return ShardData(for_rank(data.source, rank), data.dim, data.parts, data.ranks, rank)
    if isinstance(data, FoldedData):
        inputs = [for_rank(x, rank) for x in data.inputs]
        if all(new is old for new, old in zip(inputs, data.inputs)):
            return data
        return FoldedData(data.reference, inputs, data.attrs, data.result_index)
    if isinstance(data, list):
        items = [for_rank(x, rank) for x in data]
        return data if all(new is old for new, old in zip(items, data)) else items
    return data
