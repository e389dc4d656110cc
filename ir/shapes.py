"""Symbolic shapes: dimensions are ints or sympy expressions over positive-integer symbols.

A symbol is made with ``sym("batch")``; every kiln symbol is a positive integer, so the
same name always means the same sympy object. Helpers here compare, broadcast, print and
parse dimensions; shape rules of ops are written with them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any, Union

import sympy

Dim = Union[int, sympy.Expr]
Shape = tuple[Dim, ...]


class ShapeError(ValueError):
    """A shape rule does not hold for the given operand types or attributes."""


@cache
def sym(name: str) -> sympy.Symbol:
    """The kiln symbol called ``name`` (a positive integer)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"invalid symbol name {name!r}")
    return sympy.Symbol(name, integer=True, positive=True)


def normalize_dim(dim: Dim) -> Dim:
    """Return ints as ints and constant sympy expressions as ints."""
    if isinstance(dim, bool):
        raise ShapeError(f"a dimension cannot be a bool: {dim!r}")
    if isinstance(dim, int):
        return dim
    if isinstance(dim, sympy.Expr):
        dim = sympy.expand(dim)
        if dim.is_Integer:
            return int(dim)
        if not dim.is_number:
            return dim
    raise ShapeError(f"not a dimension: {dim!r}")


def substitute_dims(value: Any, mapping: dict) -> Any:
    """``value`` (a dim, a shape or any attribute value) with ``mapping``'s symbols replaced."""
    if isinstance(value, tuple):
        return tuple(substitute_dims(v, mapping) for v in value)
    if isinstance(value, sympy.Expr):
        return normalize_dim(value.xreplace(mapping))
    return value


def normalize_shape(shape: Iterable[Dim]) -> Shape:
    return tuple(normalize_dim(d) for d in shape)


def dims_equal(a: Dim, b: Dim) -> bool:
    """Whether two dimensions are provably equal for every value of their symbols."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def shapes_equal(a: Sequence[Dim], b: Sequence[Dim]) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def product(dims: Iterable[Dim]) -> Dim:
    return normalize_dim(sympy.Mul(*[sympy.sympify(d) for d in dims]))


def broadcast_shapes(a: Sequence[Dim], b: Sequence[Dim]) -> Shape:
    """Numpy broadcasting of two shapes; symbolic dims must match exactly or meet a 1."""
    rank = max(len(a), len(b))
    a = (1,) * (rank - len(a)) + tuple(a)
    b = (1,) * (rank - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if dims_equal(x, y) or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise ShapeError(f"cannot broadcast {format_shape(a)} with {format_shape(b)}")
    return tuple(out)


def normalize_axis(axis: int, rank: int) -> int:
    """Map a possibly negative axis into [0, rank)."""
    if not -rank <= axis < max(rank, 1):
        raise ShapeError(f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def free_symbols(shape: Iterable[Dim]) -> set[sympy.Symbol]:
    found: set[sympy.Symbol] = set()
    for d in shape:
        if isinstance(d, sympy.Expr):
            found |= d.free_symbols
    return found


def evaluate_dim(dim: Dim, env: Mapping[sympy.Symbol, int]) -> int:
    """The concrete value of ``dim`` under the symbol bindings ``env``."""
    if isinstance(dim, int):
        return dim
    value = dim.xreplace({s: sympy.Integer(v) for s, v in env.items()})
    if not value.is_Integer:
        missing = ", ".join(sorted(str(s) for s in value.free_symbols))
        raise ShapeError(f"dimension {dim} depends on unbound symbols: {missing}")
    return int(value)


def evaluate_shape(shape: Iterable[Dim], env: Mapping[sympy.Symbol, int]) -> tuple[int, ...]:
    return tuple(evaluate_dim(d, env) for d in shape)


def format_dim(dim: Dim) -> str:
    return str(dim) if isinstance(dim, int) else sympy.sstr(dim, order="lex").replace(" ", "")


def format_shape(shape: Iterable[Dim]) -> str:
    return "[" + ", ".join(format_dim(d) for d in shape) + "]"


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DIM_TEXT = re.compile(r"[A-Za-z0-9_+\-*/() ]+")


def parse_dim(text: str) -> Dim:
    """Parse a printed dimension: ``16``, ``batch``, ``batch*seq``, ``seq+1``."""
    text = text.strip()
    if not text or not _DIM_TEXT.fullmatch(text):
        raise ShapeError(f"invalid dimension {text!r}")
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    local = {name: sym(name) for name in _IDENTIFIER.findall(text)}
    try:
        expr = sympy.parse_expr(text, local_dict=local, evaluate=True)
    except (SyntaxError, TypeError, sympy.SympifyError) as exc:
        raise ShapeError(f"invalid dimension {text!r}: {exc}") from None
    return normalize_dim(expr)


def static_numel(shape: Iterable[Dim]) -> int | None:
    """The element count if every dim is an int, else None."""
    dims = list(shape)
    if all(isinstance(d, int) for d in dims):
        return math.prod(dims)
    return None
