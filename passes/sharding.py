"""The machinery of the tensor-parallel rewrite (``partition.py``): shardings
(``REPLICATED``, ``Split``, ``PARTIAL``) and the ``Partitioner`` that builds the rank's
graph value by value, converting operands between shardings. The per-op rules
(``partition_rules.py``) are written against it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ir import Graph, Node, ShardData, TensorData, TensorType, Value, dtype
from ..ir.shapes import Dim


class PartitionError(ValueError):
    """The graph cannot be split as asked; says where and why."""


@dataclass(frozen=True)
class Split:
    """Split along ``dim`` into ``parts`` equal chunks (rank r holds chunk r * parts // ranks)."""

    dim: int
    parts: int


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


REPLICATED = _Marker("REPLICATED")  # every rank holds the whole value
PARTIAL = _Marker("PARTIAL")  # every rank holds a term of a sum
Sharding = Split | _Marker


class Partitioner:
    """The state of one partitioning: the graph being built, each old value's new value
    and sharding, and the reasons an op that must be split could not be (``refusals``)."""

    def __init__(self, source: Graph, ranks: int):
        self.source = source
        self.ranks = ranks
        self.graph = Graph(source.name, source.registry)
        self.refusals: list[str] = []
        self._values: dict[int, tuple[Value, Sharding]] = {}
        self._constants: dict[tuple[int, Sharding], Value] = {}
        for value in source.inputs:
            self._values[id(value)] = (self.graph.add_input(value.name, value.type), REPLICATED)

    def sharding(self, old: Value) -> Sharding:
        """How ``old``'s new value is sharded (constants start replicated)."""
        return REPLICATED if old.is_constant else self._values[id(old)][1]

    def bind(self, old: Value, new: Value, sharding: Sharding) -> None:
        new.name = old.name
        self._values[id(old)] = (new, sharding)

    def call(self, op: str, inputs: Sequence[Value | None], attrs: dict | None = None,
             location: str | None = None) -> Node:
        return self.graph.call(op, inputs, attrs, location)

    def operand(self, old: Value, want: Sharding) -> Value:
        """``old``'s new value, sharded as ``want``."""
        if old.is_constant:
            return self._constant(old, want)
        value, have = self._values[id(old)]
        return self.convert(value, have, want)

    def convert(self, value: Value, have: Sharding, want: Sharding) -> Value:
        """``value`` (sharded as ``have``) resharded as ``want``, with collectives or a cut."""
        if have == want:
            return value
        if want is PARTIAL:
            raise PartitionError("nothing is converted to a partial sum")
        if have is PARTIAL:
            value = self.call("all_reduce", [value], {"ranks": self.ranks}).result
        elif isinstance(have, Split):
            value = self._gather(value, have)
        return value if want is REPLICATED else self._cut(value, want)

    def splittable(self, size: Dim, parts: int) -> bool:
        """Whether a dim of ``size`` splits into ``parts`` chunks that ranks can hold."""
        return isinstance(size, int) and size % parts == 0 and (self.ranks % parts == 0)

    def local_constant(self, name: str, rows: torch.Tensor) -> Value:
        """A constant whose rank ``r`` holds row ``r`` of ``rows`` (one row per rank)."""
        data = ShardData(TensorData(rows), 0, self.ranks, self.ranks)
        shape = (1, *rows.shape[1:])
        return self.graph.add_constant(data, TensorType(dtype(rows.dtype), shape), name)

    def _constant(self, old: Value, want: Sharding) -> Value:
        key = (id(old), want)
        if key not in self._constants:
            if want is REPLICATED:
                data, type_ = old.data, old.type
            else:
                data = ShardData(old.data, want.dim, want.parts, self.ranks)
                shape = list(old.shape)
                shape[want.dim] //= want.parts
                type_ = old.type.with_shape(shape)
            self._constants[key] = self.graph.add_constant(data, type_, old.name)
        return self._constants[key]

    def _gather(self, value: Value, have: Split) -> Value:
        gathered = self.call("all_gather", [value], {"dim": have.dim, "ranks": self.ranks}).result
        copies = self.ranks // have.parts
        if copies == 1:
            return gathered
        # Ranks holding the same chunk gathered it `copies` times: keep the first of each.
        shape = list(gathered.shape)
        chunk = shape[have.dim] // self.ranks
        grouped = shape[:have.dim] + [have.parts, copies, chunk] + shape[have.dim + 1:]
        x = self.call("reshape", [gathered], {"shape": grouped}).result
        x = self.call("slice", [x], {"dim": have.dim + 1, "start": 0, "end": 1}).result
        return self.call("reshape", [x], {"shape": shape[:have.dim] + [have.parts * chunk] + shape[have.dim + 1:]}).result

    def _cut(self, value: Value, want: Split) -> Value:
        size = value.shape[want.dim]
        if not self.splittable(size, want.parts):
            raise PartitionError(f"cannot cut dim {want.dim} of {value.type} into {want.parts} parts")
        chunk = size // want.parts
        rows = torch.stack([torch.arange(chunk) + (r * want.parts // self.ranks) * chunk for r in range(self.ranks)])
        index = self.local_constant("rank_index", rows)
        flat = self.call("reshape", [index], {"shape": [chunk]}).result
        return self.call("index_select", [value, flat], {"dim": want.dim}).result

    def replicated_copy(self, node: Node) -> None:
        """``node`` run as it is, on replicated operands (any op, exactly)."""
        inputs = [None if v is None else self.operand(v, REPLICATED) for v in node.inputs]
        new = self.call(node.op, inputs, node.attrs, node.location)
        for old, result in zip(node.results, new.results):
            self.bind(old, result, REPLICATED)
