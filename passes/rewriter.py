"""The declarative rewriter: ``Rule``s (pattern, replacement, optional constraint) applied
to a graph to a fixpoint by one entry point, ``rewrite(graph, rules)``.

A replacement is a plain function whose parameters name pattern variables; it builds
the new values with ``kiln.ir.ops`` and returns as many values as the pattern did. A
match is used only if its interior values are not used outside it, the constraint holds,
and the replacement's types equal the pattern outputs' types, so a rule cannot change a
graph's types; a replacement whose shape rules refuse its operands is not applied
either. Rules are indexed by the op of their first output: rules that cannot
match a node cost nothing there.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..ir import Graph, Node, Registry, ShapeError, Value
from .pattern import Match, Pattern, match_at, trace


class RewriteLimitError(RuntimeError):
    """Rules kept firing past the sweep bound (a rule undoes another, or grows the graph)."""


@dataclass(frozen=True, eq=False)
class Rule:
    """One rewrite: ``pattern`` -> ``replacement`` where ``when(match)`` holds."""

    pattern: Callable[..., Any]
    replacement: Callable[..., Any]
    when: Callable[[Match], bool] | None = None
    name: str = ""
    _traced: dict = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.name or getattr(self.pattern, "__name__", "rule")

    def traced(self, registry: Registry) -> Pattern:
        """The pattern traced over ``registry``, once, on first use."""
        key = id(registry)
        if key not in self._traced:
            pattern = trace(self.pattern, registry)
            bound = set(pattern.value_vars) | set(pattern.attr_vars)
            params = [p for p in inspect.signature(self.replacement).parameters.values()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            wanted = [p.name for p in params if p.name in bound or p.default is p.empty]
            unknown = set(wanted) - bound
            if unknown:
                raise TypeError(f"rule {self.label}: replacement takes {sorted(unknown)}, "
                                "which the pattern does not bind")
            self._traced[key] = (pattern, wanted)
        return self._traced[key][0]

    def apply_at(self, graph: Graph, node: Node) -> bool:
        """Rewrite the first valid match rooted at ``node``; return whether one was made."""
        pattern = self.traced(graph.registry)
        wanted = self._traced[id(graph.registry)][1]
        for match in match_at(pattern, node):
            if not _self_contained(graph, match):
                continue
            if self.when is not None and not self.when(match):
                continue
            if _replace(graph, match, self.replacement, match.bound(wanted)):
                return True
        return False


def _self_contained(graph: Graph, match: Match) -> bool:
    """Interior results (not pattern outputs) must have no users outside the match."""
    inside = {id(n) for n in match.nodes.values()}
    outputs = {id(v) for v in match.outputs}
    graph_outputs = {id(v) for v in graph.outputs}
    for node in match.nodes.values():
        for result in node.results:
            if id(result) in outputs:
                continue
            if id(result) in graph_outputs or any(id(u.node) not in inside for u in result.uses):
                return False
    return True


def _replace(graph: Graph, match: Match, replacement: Callable[..., Any], kwargs: dict[str, Any]) -> bool:
    inside = {id(n) for n in match.nodes.values()}
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    last_input = max((position[id(v.producer)] for v in match.values.values() if v.producer is not None),
                     default=-1)
    outside_uses = [position[id(u.node)] for v in match.outputs for u in v.uses if id(u.node) not in inside]
    if outside_uses and min(outside_uses) <= last_input:
        return False  # no single place for the replacement (a multi-output match)
    nodes_before, constants_before = len(graph.nodes), set(graph.constants)

    def undo() -> bool:
        added = graph.nodes[last_input + 1: last_input + 1 + len(graph.nodes) - nodes_before]
        for node in reversed(added):
            graph.erase_node(node)
        for name in set(graph.constants) - constants_before:
            del graph.constants[name]
        return False

    try:
        with graph.inserting_at(last_input + 1):
            out = replacement(**kwargs)
    except ShapeError:
        return undo()  # the replacement does not apply to these types
    new = list(out) if isinstance(out, (tuple, list)) else [out]
    same = all(a is b for a, b in zip(new, match.outputs))
    if same or len(new) != len(match.outputs) or not all(
            isinstance(n, Value) and n.type is not None and n.type.equivalent(o.type)
            for n, o in zip(new, match.outputs)):
        return undo()
    location = match.outputs[0].producer.location
    for node in graph.nodes[last_input + 1: last_input + 1 + len(graph.nodes) - nodes_before]:
        node.location = node.location or location  # the replacement stands where the matched ops came from
    for old, value in zip(match.outputs, new):
        if old is not value:
            old.replace_all_uses_with(value)
    for node in sorted(match.nodes.values(), key=lambda n: -position[id(n)]):
        if not any(r.uses or r in graph.outputs for r in node.results):
            graph.erase_node(node)
    return True


class Rewrites(Counter):
    """How many times each rule fired."""

    def __str__(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(self.items())) or "no rewrites"


def rewrite(graph: Graph, rules: Sequence[Rule] | Iterable[Rule], max_sweeps: int = 32) -> Rewrites:
    """Apply ``rules`` to ``graph`` in place until none fires; return the counts.

    Each sweep visits every node once and tries the rules indexed by its op. Raises
    ``RewriteLimitError`` if rules still fire after ``max_sweeps`` sweeps.
    """
    by_op: dict[str, list[Rule]] = {}
    for rule in rules:
        by_op.setdefault(rule.traced(graph.registry).anchor_op, []).append(rule)
    counts = Rewrites()
    for _ in range(max_sweeps):
        fired = Rewrites()
        for node in list(graph.nodes):
            if node.graph is not graph:
                continue  # erased by an earlier rewrite of this sweep
            for rule in by_op.get(node.op, ()):
                if rule.apply_at(graph, node):
                    fired[rule.label] += 1
                    break
        if not fired:
            return counts
        counts.update(fired)
    raise RewriteLimitError(f"rules did not reach a fixpoint in {max_sweeps} sweeps; rewrites made: {counts}")

