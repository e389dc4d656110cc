"""Passes and the ``PassManager`` that runs a pipeline of them.

A ``Pass`` is a name and a function that edits a graph in place and returns how many
changes it made. The manager runs passes in order (and, with ``until_stable``, repeats
the whole list until a round changes nothing), optionally verifies after each pass
(debug mode), dumps the IR after the passes named in ``dump_after``, and records the
time and node counts of each pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from ..ir import Graph, VerificationError, verify
from .rewriter import Rule, rewrite


@dataclass(frozen=True)
class Pass:
    """A named in-place graph transformation that returns its number of changes.

    ``changes_signature`` marks passes that change the graph's inputs and outputs (such
    as paging attention): they cannot be checked by running the graph before and after
    on the same inputs, and are tested on the models they are made for. ``once`` marks
    stages that decide from the graph as imported (quantization names layers that later
    fusions merge): a pipeline run to a fixpoint runs them in its first round only."""

    name: str
    run: Callable[[Graph], int]
    doc: str = ""
    changes_signature: bool = False
    once: bool = False

    def __call__(self, graph: Graph) -> int:
        return self.run(graph)


def rewrite_pass(name: str, rules: Sequence[Rule], doc: str = "") -> Pass:
    """A pass that applies ``rules`` with the rewriter to a fixpoint."""
    rules = tuple(rules)
    return Pass(name, lambda graph: sum(rewrite(graph, rules).values()), doc)


class PassError(RuntimeError):
    """A pass left the graph invalid; names the pass."""


@dataclass(frozen=True)
class PassRecord:
    """What one pass did: changes, wall time, node counts before and after."""

    name: str
    changes: int
    seconds: float
    nodes_before: int
    nodes_after: int
    round: int = 1


class PassManager:
    """Runs ``passes`` in order on a graph; with ``until_stable``, repeats them until a
    round makes no change (at most ``max_rounds`` rounds)."""

    def __init__(self, passes: Sequence[Pass], *, until_stable: bool = False, max_rounds: int = 8,
                 debug: bool = False, dump_after: Collection[str] = (),
                 dump: Callable[[str, Graph], None] | None = None):
        unknown = set(dump_after) - {p.name for p in passes}
        if unknown:
            raise ValueError(f"cannot dump after {sorted(unknown)}: not in this pipeline "
                             f"({', '.join(p.name for p in passes)})")
        self.passes = list(passes)
        self.rounds = max_rounds if until_stable else 1
        self.debug = debug
        self.dump_after = set(dump_after)
        self.dump = dump or (lambda name, graph: print(f"// after {name}\n{graph}"))

    def run(self, graph: Graph) -> list[PassRecord]:
        """Run the passes on ``graph`` in place; return one record per pass run."""
        records: list[PassRecord] = []
        for round_ in range(1, self.rounds + 1):
            changes = 0
            for p in self.passes:
                if p.once and round_ > 1:
                    continue
                record = self._run_one(p, graph, round_)
                records.append(record)
                changes += record.changes
            if not changes:
                break
        return records

    def _run_one(self, p: Pass, graph: Graph, round_: int) -> PassRecord:
        before = len(graph.nodes)
        start = time.perf_counter()
        changes = p.run(graph)
        seconds = time.perf_counter() - start
        if self.debug:
            try:
                verify(graph)
            except VerificationError as exc:
                raise PassError(f"pass {p.name} left an invalid graph: {exc}") from exc
        if p.name in self.dump_after and (round_ == 1 or changes):
            self.dump(p.name if round_ == 1 else f"{p.name} (round {round_})", graph)
        return PassRecord(p.name, changes, seconds, before, len(graph.nodes), round_)


def format_records(records: Sequence[PassRecord]) -> str:
    """A small table of pass records, for ``kiln ir --timing`` and logs."""
    lines = [f"{'pass':<20} {'round':>5} {'changes':>8} {'nodes':>13} {'ms':>9}"]
    for r in records:
        lines.append(f"{r.name:<20} {r.round:>5} {r.changes:>8} {r.nodes_before:>6}->{r.nodes_after:<6} "
                     f"{r.seconds * 1e3:>9.2f}")
    return "\n".join(lines)
