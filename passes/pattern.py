"""Patterns: plain Python functions over kiln ops, traced into small untyped graphs, and
the matcher that finds them in a graph.

In a pattern function, a parameter without an annotation (or annotated ``Value``) is a
value variable that matches any value; a parameter annotated with a Python type
(``eps: float``) is an attribute variable that captures an attribute, or one element of a
list attribute (``sizes=(q, k, v)``). A number in the
pattern matches a constant whose every element equals it. Commutative ops match either
operand order; a pattern may return several values (a multi-output pattern).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ir import AttrPlaceholder, Graph, Node, Registry, Value
from ..ir.registry import attr_equal

SPLAT_LIMIT = 4096


@dataclass(frozen=True)
class AttrVar(AttrPlaceholder):
    """Stands for an attribute value in a pattern; binds to the matched node's value."""

    name: str


@dataclass(frozen=True)
class Pattern:
    """A traced pattern: its graph, value and attribute variables, and outputs."""

    graph: Graph
    value_vars: tuple[str, ...]
    attr_vars: tuple[str, ...]

    @property
    def outputs(self) -> list[Value]:
        return self.graph.outputs

    @property
    def anchor_op(self) -> str:
        return self.outputs[0].producer.op


def trace(fn: Callable[..., Any], registry: Registry) -> Pattern:
    """Trace ``fn`` into a pattern graph over ``registry``'s ops."""
    graph = Graph(f"pattern_{getattr(fn, '__name__', 'fn')}", registry, typed=False)
    args: dict[str, Any] = {}
    value_vars, attr_vars = [], []
    for param in inspect.signature(fn, eval_str=True).parameters.values():
        if param.annotation in (inspect.Parameter.empty, Value, "Value"):
            args[param.name] = graph.add_input(param.name, None)
            value_vars.append(param.name)
        else:
            args[param.name] = AttrVar(param.name)
            attr_vars.append(param.name)
    out = fn(**args)
    outputs = list(out) if isinstance(out, (tuple, list)) else [out]
    for value in outputs:
        if not isinstance(value, Value) or value.producer is None:
            raise TypeError(f"pattern {graph.name} must return op results, got {value!r}")
    graph.set_outputs(outputs)
    return Pattern(graph, tuple(value_vars), tuple(attr_vars))


@dataclass
class Match:
    """A match of a pattern: what each variable bound to, and the graph nodes covered."""

    values: dict[str, Value] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    nodes: dict[int, Node] = field(default_factory=dict)  # id(pattern node) -> graph node
    outputs: list[Value] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        return self.attrs[name]

    def bound(self, names) -> dict[str, Any]:
        return {n: self[n] for n in names}

    def _copy(self) -> Match:
        return Match(dict(self.values), dict(self.attrs), dict(self.nodes), list(self.outputs))


def is_splat(value: Value, number: float) -> bool:
    """Whether ``value`` is a small literal constant whose every element equals ``number``.
    Weights are never read: a rewrite must not depend on their values."""
    if not value.is_literal or value.type is None:
        return False
    numel = value.type.static_numel
    if numel is None or numel > SPLAT_LIMIT:
        return False
    return bool(torch.all(value.tensor() == number))


def match_at(pattern: Pattern, node: Node) -> Iterator[Match]:
    """Every match of ``pattern`` whose first output is a result of ``node``."""
    first = pattern.outputs[0]
    if node.op != first.producer.op or first.result_index >= len(node.results):
        return
    for state in _value(first, node.results[first.result_index], Match()):
        state.outputs = [node.results[first.result_index]]
        yield from _rest(pattern.outputs[1:], state)


def _rest(outputs: list[Value], state: Match) -> Iterator[Match]:
    if not outputs:
        yield state
        return
    pattern_value = outputs[0]
    for candidate in _candidates(pattern_value, state):
        for found in _value(pattern_value, candidate, state):
            found.outputs = state.outputs + [candidate]
            yield from _rest(outputs[1:], found)


def _candidates(pattern_value: Value, state: Match) -> list[Value]:
    """Graph values that could match a further output: results of same-op nodes reached
    from the values the match has bound so far in at most as many steps as the pattern
    value is ops deep."""
    producer = pattern_value.producer
    frontier = [*state.values.values(), *[r for n in state.nodes.values() for r in n.results]]
    seen_nodes: set[int] = set()
    found: dict[int, Value] = {}
    for _ in range(_height(pattern_value)):
        users = [u for v in frontier for u in v.users if id(u) not in seen_nodes]
        seen_nodes.update(id(u) for u in users)
        for user in users:
            if user.op == producer.op and pattern_value.result_index < len(user.results):
                result = user.results[pattern_value.result_index]
                found.setdefault(id(result), result)
        frontier = [r for u in users for r in u.results]
    return list(found.values())


def _height(value: Value) -> int:
    """The number of ops on the longest path from a pattern input up to ``value``."""
    if value.producer is None:
        return 0
    return 1 + max((_height(v) for v in value.producer.inputs if v is not None), default=0)


def _value(pv: Value, gv: Value, state: Match) -> Iterator[Match]:
    if pv.is_input:
        bound = state.values.get(pv.name)
        if bound is None:
            new = state._copy()
            new.values[pv.name] = gv
            yield new
        elif bound is gv:
            yield state
        return
    if pv.is_constant:
        if is_splat(gv, pv.tensor().item()):
            yield state
        return
    pnode, gnode = pv.producer, gv.producer
    if gnode is None or gnode.op != pnode.op or gv.result_index != pv.result_index:
        return
    if id(pnode) in state.nodes:
        if state.nodes[id(pnode)] is gnode:
            yield state
        return
    if any(n is gnode for n in state.nodes.values()) or len(gnode.inputs) != len(pnode.inputs):
        return
    new = state._copy()
    for key, want in pnode.attrs.items():
        if not _bind_attr(want, gnode.attrs.get(key), new.attrs):
            return
    new.nodes[id(pnode)] = gnode
    orders = [list(gnode.inputs)]
    if gnode.opdef.commutative:
        orders.append(list(reversed(gnode.inputs)))
    for order in orders:
        yield from _inputs(list(pnode.inputs), order, new)


def _bind_attr(want: Any, have: Any, bound: dict[str, Any]) -> bool:
    """Match attribute ``have`` against ``want``, binding attribute variables (also those
    inside a tuple) in ``bound``; whether it matched."""
    if isinstance(want, AttrVar):
        if want.name in bound and not attr_equal(bound[want.name], have):
            return False
        bound[want.name] = have
        return True
    if isinstance(want, tuple) and any(isinstance(w, AttrVar) for w in want):
        return (isinstance(have, tuple) and len(have) == len(want)
                and all(_bind_attr(w, h, bound) for w, h in zip(want, have)))
    return attr_equal(want, have)


def _inputs(pins: list[Value | None], gins: list[Value | None], state: Match) -> Iterator[Match]:
    if not pins:
        yield state
        return
    pv, gv = pins[0], gins[0]
    if pv is None or gv is None:
        if pv is None and gv is None:
            yield from _inputs(pins[1:], gins[1:], state)
        return
    for found in _value(pv, gv, state):
        yield from _inputs(pins[1:], gins[1:], found)
