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
