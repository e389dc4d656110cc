"""The executor: readable Python generated from a final graph with jinja2, one line per
node, calling the backend's kernels in order. It is kept in the engine directory, and
``load_executor`` runs only source that ``generate_executor`` gives for the engine's graph.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

import jinja2
import sympy
import torch

from ..backends.support import tolerate_unset_attributes
from ..ir import REGISTRY, DType, Graph, Value
from ..ir.printer import Namer
from ..ir.shapes import format_dim

Step = Callable[..., list[torch.Tensor]]


class ExecutorError(RuntimeError):
    """The executor source is not what kiln generates for the engine's graph."""


def _template() -> jinja2.Template:
    text = resources.files("kiln.runtime").joinpath("templates/executor.py.jinja").read_text()
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.from_string(text)


def _identifier(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name)
    if not base or base[0].isdigit() or keyword.iskeyword(base):
        base = f"x_{base}"
    candidate, n = base, 1
    while candidate in taken:
        candidate, n = f"{base}_{n}", n + 1
    taken.add(candidate)
    return candidate


def render_attr(value: Any) -> str:
    """A Python expression for an attribute value; symbolic dims name the step's locals."""
    if isinstance(value, tuple):
        return "(" + ", ".join(render_attr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, DType):
        return f'dtype("{value.name}")'
    if isinstance(value, sympy.Expr):
        return format_dim(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f'float("{value}")'
    return repr(value)


def generate_executor(graph: Graph, backend: str, version: str) -> str:
    """The executor source for ``graph``."""
    taken: set[str] = set()
    names: dict[int, str] = {}
    inputs = []
    for value in graph.inputs:
        names[id(value)] = _identifier(value.name, taken)
        inputs.append(names[id(value)])
    used = {s for node in graph.nodes for v in node.attrs.values() for s in _free_symbols(v)}
    symbols = []
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape):
            if dim in used and str(dim) not in taken:
                taken.add(str(dim))
                symbols.append(f"{dim} = {names[id(value)]}.shape[{axis}]")
    constants = []
    for index, (name, value) in enumerate(graph.constants.items()):
        if value.uses or value in graph.outputs:
            names[id(value)] = _identifier(f"w{index}", taken)
            constants.append((names[id(value)], name))
    ops = sorted({node.op for node in graph.nodes})
    taken.update(ops)
    namer = Namer(graph)
    outputs = {id(v) for v in graph.outputs}
    last_use = {id(v): i for i, node in enumerate(graph.nodes) for v in node.inputs if v is not None}
    body = []
    for index, node in enumerate(graph.nodes):
        for result in node.results:
            used = result.uses or id(result) in outputs
            names[id(result)] = _identifier(f"v{namer.names[id(result)]}", taken) if used else "_"
        args = []
        for spec, operand in zip(node.opdef.operand_specs, node.opdef.structure(list(node.inputs))):
            if spec.variadic:
                args.append("[" + ", ".join(names[id(v)] for v in operand) + "]")
            else:
                args.append("None" if operand is None else names[id(operand)])
        args += [f"{k}={render_attr(v)}" for k, v in node.attrs.items()]
        targets = ", ".join(names[id(r)] for r in node.results)
        location = f"  # {node.location}" if node.location else ""
        body.append(f"{targets} = {node.op}({', '.join(args)}){location}")
        dead = [names[id(v)] for v in _unique(node.inputs) if v is not None and v.producer is not None
                and last_use[id(v)] == index and id(v) not in outputs]
        if dead:
            body.append(f"del {', '.join(dead)}")
    return _template().render(name=graph.name, version=version, backend=backend, ops=ops, constants=constants,
                              inputs=inputs, symbols=symbols, body=body,
                              outputs=[names[id(v)] for v in graph.outputs])


def _free_symbols(value: Any) -> set:
    if isinstance(value, tuple):
        return set().union(*(_free_symbols(v) for v in value))
    return set(value.free_symbols) if isinstance(value, sympy.Expr) else set()


def _unique(values: list[Value | None]) -> list[Value | None]:
    seen: dict[int, Value | None] = {}
    for value in values:
        seen.setdefault(id(value), value)
    return list(seen.values())


def load_executor(source: str, filename: str, weights: Mapping[str, torch.Tensor],
                  kernels: Mapping[str, Callable[..., Any]]) -> Step:
    """Compile the executor ``source`` and bind it to ``weights`` and ``kernels`` (those
    written before one of their op's attributes existed get it only when it is set)."""
    namespace: dict[str, Any] = {"__name__": "kiln_executor"}
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - source is kiln's own, checked by the caller
    return namespace["bind"](weights, tolerate_unset_attributes(kernels, REGISTRY))
