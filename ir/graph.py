"""``Value``, ``Node`` and ``Graph``: the SSA graph that every part of kiln works on.

A ``Graph`` has typed inputs, named constants (lazy data, see ``constants.py``), nodes
in topological order and outputs. Nodes are created with ``Graph.call`` (or the
functions of ``kiln.ir.ops``), which checks attributes against the op's declaration and
infers result types from its shape rule. Each value knows its uses, so rewrites can
redirect them in O(uses).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .constants import ConstantData, TensorData
from .dtypes import DType, dtype as to_dtype, float32
from .printer import print_graph
from .registry import OpDef, Registry
from .shapes import ShapeError
from .types import TensorType

class GraphError(ValueError):
    """A graph was built or edited inconsistently."""


class AttrPlaceholder:
    """Base of objects that stand for an attribute in an untyped (pattern) graph."""


@dataclass(eq=False)
class Use:
    """One use of a value: operand ``index`` of ``node``."""

    node: Node
    index: int


class Value:
    """An SSA value: a graph input, a constant, or a result of a node."""

    __slots__ = ("graph", "type", "name", "producer", "result_index", "data", "uses")

    def __init__(self, graph: Graph, type: TensorType | None, name: str | None = None,
                 producer: Node | None = None, result_index: int = 0,
                 data: ConstantData | None = None):
        self.graph = graph
        self.type = type
        self.name = name
        self.producer = producer
        self.result_index = result_index
        self.data = data
        self.uses: list[Use] = []

    @property
    def is_constant(self) -> bool:
        return self.data is not None

    @property
    def is_literal(self) -> bool:
        """A constant whose data is already in memory (a number or small tensor written in
        the program), as opposed to a weight loaded lazily. Passes may read literals."""
        return isinstance(self.data, TensorData)

    @property
    def is_input(self) -> bool:
        return self.producer is None and self.data is None

    @property
    def users(self) -> list[Node]:
        """The distinct nodes that use this value, in order of first use."""
        return list(dict.fromkeys(use.node for use in self.uses))

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def shape(self) -> tuple:
        return self.type.shape

    def tensor(self) -> torch.Tensor:
        """The data of a constant."""
        if self.data is None:
            raise GraphError(f"{self!r} is not a constant")
        return self.data.materialize()

    def replace_all_uses_with(self, other: Value) -> None:
        """Make every use of this value, graph outputs included, use ``other`` instead."""
        for use in list(self.uses):
            use.node.set_input(use.index, other)
        self.graph.outputs = [other if v is self else v for v in self.graph.outputs]

    def _binary(self, op: str, other: Any, reverse: bool = False) -> Value:
        return call(op, other, self) if reverse else call(op, self, other)

    def __add__(self, other: Any) -> Value: return self._binary("add", other)
    def __radd__(self, other: Any) -> Value: return self._binary("add", other, True)
    def __sub__(self, other: Any) -> Value: return self._binary("sub", other)
    def __rsub__(self, other: Any) -> Value: return self._binary("sub", other, True)
    def __mul__(self, other: Any) -> Value: return self._binary("mul", other)
    def __rmul__(self, other: Any) -> Value: return self._binary("mul", other, True)
    def __truediv__(self, other: Any) -> Value: return self._binary("div", other)
    def __rtruediv__(self, other: Any) -> Value: return self._binary("div", other, True)
    def __matmul__(self, other: Any) -> Value: return self._binary("matmul", other)

    def __neg__(self) -> Value:
        return call("neg", self)

    def __repr__(self) -> str:
        kind = "const" if self.is_constant else "input" if self.is_input else self.producer.op
        return f"Value(%{self.name or '?'}: {self.type}, {kind})"


class Node:
    """An op applied to inputs, with attributes and one or more result values."""

    __slots__ = ("graph", "op", "inputs", "attrs", "results", "location")

    def __init__(self, graph: Graph, op: str, inputs: Sequence[Value | None],
                 attrs: Mapping[str, Any], location: str | None = None):
        self.graph = graph
        self.op = op
        self.inputs: list[Value | None] = []
        self.attrs = dict(attrs)
        self.results: list[Value] = []
        self.location = location
        for value in inputs:
            self._append_input(value)

    @property
    def opdef(self) -> OpDef:
        return self.graph.registry[self.op]

    @property
    def result(self) -> Value:
        """The single result of a one-result node."""
        if len(self.results) != 1:
            raise GraphError(f"node {self.op} has {len(self.results)} results")
        return self.results[0]

    def _append_input(self, value: Value | None) -> None:
        if value is not None:
            if value.graph is not self.graph:
                raise GraphError(f"{value!r} belongs to another graph")
            value.uses.append(Use(self, len(self.inputs)))
        self.inputs.append(value)

    def set_input(self, index: int, value: Value) -> None:
        if value.graph is not self.graph:
            raise GraphError(f"{value!r} belongs to another graph")
        old = self.inputs[index]
        if old is not None:
            old.uses = [u for u in old.uses if not (u.node is self and u.index == index)]
        value.uses.append(Use(self, index))
        self.inputs[index] = value

    def drop_inputs(self) -> None:
        """Remove this node's uses of its inputs (before erasing it)."""
        for index, value in enumerate(self.inputs):
            if value is not None:
                value.uses = [u for u in value.uses if not (u.node is self and u.index == index)]

    def __repr__(self) -> str:
        return f"Node({self.op})"


def infer_result_types(opdef: OpDef, inputs: Sequence[Value | None],
                       attrs: Mapping[str, Any]) -> tuple[TensorType, ...]:
    """Apply ``opdef``'s shape rule to the types of ``inputs``; raise ShapeError naming the op."""
    types = [None if v is None else v.type for v in inputs]
    try:
        out = opdef.infer(*opdef.structure(types), **attrs)
    except (ShapeError, TypeError, ValueError, IndexError) as exc:
        raise ShapeError(f"{opdef.name}: {exc}") from None
    return out if isinstance(out, tuple) else (out,)


class Graph:
    """A function in kiln's IR: inputs, constants, nodes in topological order, outputs."""

    def __init__(self, name: str = "main", registry: Registry | None = None, typed: bool = True):
        if registry is None:
            from .opdefs import REGISTRY as registry
        self.name = name
        self.registry = registry
        self.typed = typed
        self.inputs: list[Value] = []
        self.constants: dict[str, Value] = {}
        self.nodes: list[Node] = []
        self.outputs: list[Value] = []
        self._insert_at: int | None = None

    # -- building -------------------------------------------------------------------
    def add_input(self, name: str, type: TensorType | None) -> Value:
        if any(v.name == name for v in self.inputs):
            raise GraphError(f"graph @{self.name} already has an input %{name}")
        value = Value(self, type, name)
        self.inputs.append(value)
        return value

    def add_constant(self, data: torch.Tensor | ConstantData, type: TensorType | None = None,
                     name: str | None = None) -> Value:
        """Add a named constant; ``type`` defaults to the tensor's own type."""
        if isinstance(data, torch.Tensor):
            type = type or TensorType(to_dtype(data.dtype), tuple(data.shape))
            data = TensorData(data)
        if type is None and self.typed:
            raise GraphError("a lazy constant needs its type")
        name = self._fresh_constant_name(name or "c")
        value = Value(self, type, name, data=data)
        self.constants[name] = value
        return value

    def scalar(self, number: float | int | bool, dtype: DType | str) -> Value:
        """A 0-d constant of ``dtype``."""
        dtype = to_dtype(dtype)
        return self.add_constant(torch.tensor(number, dtype=dtype.torch_dtype), TensorType(dtype, ()))

    def _fresh_constant_name(self, base: str) -> str:
        if base not in self.constants:
            return base
        i = 0
        while f"{base}_{i}" in self.constants:
            i += 1
        return f"{base}_{i}"

    def call(self, op: str, inputs: Sequence[Value | None], attrs: Mapping[str, Any] | None = None,
             location: str | None = None, result_types: Sequence[TensorType] | None = None) -> Node:
        """Create a node of ``op`` at the insertion point; infer its result types."""
        opdef = self.registry[op]
        inputs = list(inputs)
        while inputs and inputs[-1] is None and not opdef.is_variadic:
            inputs.pop()  # canonical form: missing trailing optional operands are left out
        if not opdef.arity_ok(len(inputs)):
            raise GraphError(f"op {op} takes operands ({', '.join(opdef.operands)}), got {len(inputs)}")
        attrs = self._complete_attrs(opdef, attrs or {})
        if result_types is None:
            if self.typed:
                result_types = infer_result_types(opdef, inputs, attrs)
            else:
                result_types = (None,) * opdef.result_count(attrs)
        node = Node(self, op, inputs, attrs, location)
        node.results = [Value(self, t, producer=node, result_index=i) for i, t in enumerate(result_types)]
        if self._insert_at is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(self._insert_at, node)
            self._insert_at += 1
        return node

    def _complete_attrs(self, opdef: OpDef, attrs: Mapping[str, Any]) -> dict[str, Any]:
        if self.typed:
            return opdef.complete_attrs(attrs)
        held = {k: v for k, v in attrs.items() if isinstance(v, AttrPlaceholder)
                or (isinstance(v, tuple) and any(isinstance(e, AttrPlaceholder) for e in v))}
        return opdef.complete_attrs({k: v for k, v in attrs.items() if k not in held}, held)

    def set_outputs(self, values: Iterable[Value]) -> None:
        values = list(values)
        for v in values:
            if v.graph is not self:
                raise GraphError(f"output {v!r} belongs to another graph")
        self.outputs = values

    @contextmanager
    def inserting_at(self, index: int) -> Iterator[None]:
        """New nodes go at position ``index`` (in order) while the context is open."""
        saved, self._insert_at = self._insert_at, index
        try:
            yield
        finally:
            self._insert_at = saved

    def inserting_before(self, node: Node):
        """New nodes go right before ``node`` while the context is open."""
        return self.inserting_at(self.index_of(node))

    # -- editing ----------------------------------------------------------------------
    def index_of(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise GraphError(f"{node!r} is not in graph @{self.name}")

    def erase_node(self, node: Node) -> None:
        """Remove a node whose results are no longer used."""
        for r in node.results:
            if r.uses or any(o is r for o in self.outputs):
                raise GraphError(f"cannot erase {node.op}: its result is still used")
        node.drop_inputs()
        self.nodes.pop(self.index_of(node))
        node.graph = None  # marks the node as erased

    def remove_unused_constants(self) -> int:
        used = [k for k, v in self.constants.items() if v.uses or any(o is v for o in self.outputs)]
        removed = len(self.constants) - len(used)
        self.constants = {k: self.constants[k] for k in used}
        return removed

    def bind_constants(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Give data to constants by name (for graphs parsed from text)."""
        for name, tensor in tensors.items():
            if name not in self.constants:
                raise GraphError(f"graph @{self.name} has no constant %{name}")
            value = self.constants[name]
            if tuple(tensor.shape) != tuple(value.shape) or to_dtype(tensor.dtype).torch_dtype != value.dtype.torch_dtype:
                raise GraphError(f"constant %{name} is {value.type}, got {tuple(tensor.shape)} {tensor.dtype}")
            value.data = TensorData(tensor)

    def clone(self) -> Graph:
        """A structural copy; constant data objects are shared, not copied."""
        g = Graph(self.name, self.registry, self.typed)
        mapping: dict[int, Value] = {}
        for v in self.inputs:
            mapping[id(v)] = g.add_input(v.name, v.type)
        for name, v in self.constants.items():
            new = Value(g, v.type, name, data=v.data)
            g.constants[name] = new
            mapping[id(v)] = new
        for node in self.nodes:
            inputs = [None if v is None else mapping[id(v)] for v in node.inputs]
            new_node = g.call(node.op, inputs, node.attrs, node.location,
                              result_types=[r.type for r in node.results])
            for old, new in zip(node.results, new_node.results):
                new.name = old.name
                mapping[id(old)] = new
        g.outputs = [mapping[id(v)] for v in self.outputs]
        return g

    def take_contents(self, other: Graph) -> None:
        """Become ``other`` (for passes that rebuild a graph): take its inputs, constants,
        nodes and outputs, which then belong to this graph object."""
        for value in other.values():
            value.graph = self
        for node in other.nodes:
            node.graph = self
        self.name, self.registry, self.typed = other.name, other.registry, other.typed
        self.inputs, self.constants, self.nodes, self.outputs = other.inputs, other.constants, other.nodes, other.outputs

    def values(self) -> Iterator[Value]:
        """Every value: inputs, constants, then node results in order."""
        yield from self.inputs
        yield from self.constants.values()
        for node in self.nodes:
            yield from node.results

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def __str__(self) -> str:
        return print_graph(self)

    def __repr__(self) -> str:
        return f"Graph(@{self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes)"


# ops as Python calls (``ir.ops`` gives them names) ---------------------------------------

def call(op: str, *operands: Any, graph: Graph | None = None, location: str | None = None,
         **attrs: Any) -> Any:
    """Append a node of ``op`` to the operands' graph; return its result (or results)."""
    values = [v for v in _flatten(operands) if isinstance(v, Value)]
    graph = graph or (values[0].graph if values else None)
    if graph is None:
        raise GraphError(f"{op} has no tensor operand: pass graph=")
    scalar_dtype = _scalar_dtype(values)
    flat: list[Value | None] = []
    for operand in operands:
        if isinstance(operand, (list, tuple)):
            flat.extend(_as_value(x, graph, scalar_dtype) for x in operand)
        else:
            flat.append(_as_value(operand, graph, scalar_dtype))
    node = graph.call(op, flat, attrs, location)
    return node.results[0] if len(node.results) == 1 else tuple(node.results)


def _flatten(operands: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for x in operands:
        out.extend(x if isinstance(x, (list, tuple)) else [x])
    return out


def _scalar_dtype(values: list[Value]) -> DType | None:
    typed = [v.type.dtype for v in values if v.type is not None]
    for dt in typed:
        if dt.kind != "bool":
            return dt
    return typed[0] if typed else None


def _as_value(x: Any, graph: Graph, dtype: DType | None) -> Value | None:
    if x is None or isinstance(x, Value):
        return x
    if isinstance(x, (bool, int, float)):
        if graph.typed:
            return graph.scalar(x, dtype or float32)
        return graph.add_constant(TensorData(torch.tensor(x)), type=None, name="c")  # type: ignore[arg-type]
    raise GraphError(f"cannot use {x!r} as an operand")
