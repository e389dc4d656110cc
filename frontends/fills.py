"""Tensors that a model allocates empty and then fills slice by slice.

Multi-head latent attention (DeepSeek-V2/V3 in transformers) builds its keys as
``k = x.new_empty(...); k[..., :nope].copy_(k_nope); k[..., nope:].copy_(k_rope)``. The
exported program keeps those writes as ``copy_`` into ``slice`` views of the empty tensor,
whose results nothing reads: the mutation is the point. The importer records the writes
into such a tensor (a ``Fill``) and, where the tensor is read, makes it the ``concat`` of
what was written, which is exact when the slices tile it along one dim. Any other use of
an empty tensor (a partial fill, a write into something else) is reported as unsupported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ir import TensorType, Value, ops
from ..ir.shapes import dims_equal

EMPTY_OPS = ("aten.new_empty.default", "aten.empty.memory_format")
COPY_OP = "aten.copy_.default"
SLICE_OP = "aten.slice.Tensor"


@dataclass
class Fill:
    """An empty tensor and the slices written into it so far."""

    type: TensorType
    pieces: list[tuple[int, Any, Any, Value]] = field(default_factory=list)  # (dim, start, end, source)
    value: Value | None = None  # once read

    def write(self, view: FillSlice, source: Value) -> None:
        """Record ``view.copy_(source)``."""
        if self.value is not None:
            raise NotImplementedError("a write into an empty tensor after it was read")
        self.pieces.append((view.dim, view.start, view.end, source))

    def read(self) -> Value:
        """The filled tensor: the concatenation of its slices along their dim."""
        if self.value is None:
            self.value = self._concat()
        return self.value

    def _concat(self) -> Value:
        dims = {dim for dim, *_ in self.pieces}
        if len(dims) != 1:
            raise NotImplementedError("an empty tensor not filled by slices along one dim")
        dim = dims.pop()
        parts, at = [], 0
        for _, start, end, source in sorted(self.pieces, key=lambda p: p[1]):
            if not dims_equal(start, at):
                raise NotImplementedError("an empty tensor whose slices leave a gap or overlap")
            shape = [end - start if i == dim else d for i, d in enumerate(self.type.shape)]
            source = source if source.dtype == self.type.dtype else ops.cast(source, dtype=self.type.dtype)
            parts.append(ops.expand(source, shape=tuple(shape)))
            at = end
        if not dims_equal(at, self.type.shape[dim]):
            raise NotImplementedError("an empty tensor filled only in part")
        return parts[0] if len(parts) == 1 else ops.concat(parts, dim=dim)


@dataclass(frozen=True)
class FillSlice:
    """A ``slice`` view of a ``Fill``: where a ``copy_`` writes."""

    fill: Fill
    dim: int
    start: Any
    end: Any


def slice_of(fill: Fill, dim: int = 0, start: Any = None, end: Any = None, step: int = 1) -> FillSlice:
    """The view ``aten.slice.Tensor(fill, dim, start, end, step)`` (unit steps only)."""
    rank, size = fill.type.rank, fill.type.shape[dim % fill.type.rank]
    if step != 1:
        raise NotImplementedError("a strided slice of an empty tensor")
    start = 0 if start is None else start
    end = size if end is None or (isinstance(end, int) and isinstance(size, int) and end > size) else end
    if isinstance(end, int) and end >= torch.iinfo(torch.int64).max:
        end = size
    return FillSlice(fill, dim % rank, start, end)


def view_base(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor a chain of ``slice`` views looks into."""
    while str(node.target) == SLICE_OP and isinstance(node.args[0], torch.fx.Node):
        node = node.args[0]
    return node
