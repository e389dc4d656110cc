"""The op registry: every op is declared once, as data, and checked when declared.

An ``OpDef`` names the op's operands (``"x"``; ``"bias?"`` optional; ``"inputs*"``
variadic), its typed attributes, a shape-and-dtype rule ``infer`` and a torch
``reference`` implementation. Both callables are invoked as
``f(*operands, **attrs)``, a variadic operand arriving as one list and a missing
optional one as ``None``. The verifier, interpreter, printer, parser, rewriter and
backends all read these declarations; nothing else describes an op.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sympy

from .dtypes import dtype as to_dtype
from .shapes import normalize_dim, normalize_shape

_MISSING: Any = object()
_OP_NAME = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*")
_IDENT = re.compile(r"[a-z_][a-z0-9_]*")

ATTR_KINDS = ("int", "float", "bool", "str", "ints", "dim", "dims", "dtype")


class DeclarationError(TypeError):
    """An op declaration is malformed."""


class UnknownOpError(LookupError):
    """An op name is not in the registry."""


class AttrError(TypeError):
    """An attribute value does not fit its declaration."""


@dataclass(frozen=True)
class Attr:
    """A typed attribute: its kind, an optional default, and allowed choices for strings."""

    kind: str
    default: Any = _MISSING
    optional: bool = False
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ATTR_KINDS:
            raise DeclarationError(f"attribute kind {self.kind!r} is not one of {ATTR_KINDS}")
        if self.choices and self.kind != "str":
            raise DeclarationError("only string attributes take choices")
        if self.optional and self.default is _MISSING:
            object.__setattr__(self, "default", None)
        if self.has_default and self.default is not None:
            object.__setattr__(self, "default", self.coerce(self.default, "default"))

    @property
    def has_default(self) -> bool:
        return self.default is not _MISSING

    def coerce(self, value: Any, name: str) -> Any:
        """Check ``value`` against this declaration and return its canonical form."""
        if value is None:
            if self.optional:
                return None
            raise AttrError(f"attribute {name!r} is required and cannot be none")
        try:
            out = _COERCERS[self.kind](value)
        except (TypeError, ValueError) as exc:
            raise AttrError(f"attribute {name!r} expects {self.kind}, got {value!r}: {exc}") from None
        if self.choices and out not in self.choices:
            raise AttrError(f"attribute {name!r} must be one of {self.choices}, got {out!r}")
        return out


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, sympy.Integer)):
        raise TypeError("not an int")
    return int(v)


def _float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError("not a number")
    return float(v)


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("not a bool")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("not a string")
    return v


def _ints(v: Any) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise TypeError("not a sequence")
    return tuple(_int(x) for x in v)


def _dims(v: Any) -> tuple:
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise TypeError("not a sequence")
    return normalize_shape(v)


_COERCERS: dict[str, Callable[[Any], Any]] = {
    "int": _int, "float": _float, "bool": _bool, "str": _str, "ints": _ints,
    "dim": normalize_dim, "dims": _dims, "dtype": to_dtype,
}


@dataclass(frozen=True)
class OperandSpec:
    """One declared operand: ``x``, optional ``bias?`` or variadic ``inputs*``."""

    name: str
    optional: bool = False
    variadic: bool = False

    @classmethod
    def parse(cls, text: str) -> OperandSpec:
        optional, variadic = text.endswith("?"), text.endswith("*")
        name = text.rstrip("?*")
        if not _IDENT.fullmatch(name):
            raise DeclarationError(f"invalid operand name {text!r}")
        return cls(name, optional, variadic)


@dataclass(frozen=True, eq=False)
class OpDef:
    """The single declaration of an op. See the module docstring for the conventions."""

    name: str
    operands: tuple[str, ...]
    infer: Callable[..., Any]
    reference: Callable[..., Any]
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    results: int | Callable[[Mapping[str, Any]], int] = 1
    commutative: bool = False
    doc: str = ""
    operand_specs: tuple[OperandSpec, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not _OP_NAME.fullmatch(self.name):
            raise DeclarationError(f"invalid op name {self.name!r}")
        specs = tuple(OperandSpec.parse(o) for o in self.operands)
        object.__setattr__(self, "operand_specs", specs)
        names = [s.name for s in specs] + list(self.attrs)
        if len(set(names)) != len(names):
            raise DeclarationError(f"op {self.name}: operand and attribute names must be unique: {names}")
        if any(s.variadic for s in specs[:-1]):
            raise DeclarationError(f"op {self.name}: only the last operand may be variadic")
        seen_optional = False
        for s in specs:
            if s.optional and s.variadic:
                raise DeclarationError(f"op {self.name}: operand {s.name} cannot be optional and variadic")
            if seen_optional and not s.optional:
                raise DeclarationError(f"op {self.name}: required operand {s.name} follows an optional one")
            seen_optional |= s.optional
        for attr_name, attr in self.attrs.items():
            if not _IDENT.fullmatch(attr_name) or not isinstance(attr, Attr):
                raise DeclarationError(f"op {self.name}: attribute {attr_name!r} must be a named Attr")
        if self.commutative and (len(specs) != 2 or any(s.optional or s.variadic for s in specs)):
            raise DeclarationError(f"op {self.name}: only ops of two plain operands can be commutative")
        for role in ("infer", "reference"):
            self._check_callable(role, getattr(self, role))

    def _check_callable(self, role: str, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise DeclarationError(f"op {self.name}: {role} is not callable")
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):
            return  # builtins without signatures are checked when first called
        try:
            signature.bind(*[None] * len(self.operands), **{a: None for a in self.attrs})
        except TypeError as exc:
            raise DeclarationError(
                f"op {self.name}: {role} cannot be called as f({', '.join(self.operands)}"
                f"{', ' if self.attrs else ''}{', '.join(f'{a}=' for a in self.attrs)}): {exc}"
            ) from None

    @property
    def is_variadic(self) -> bool:
        return bool(self.operand_specs) and self.operand_specs[-1].variadic

    def arity_ok(self, count: int) -> bool:
        """Whether ``count`` flat inputs fit the declared operands."""
        required = sum(1 for s in self.operand_specs if not s.optional and not s.variadic)
        if self.is_variadic:
            return count >= required
        return required <= count <= len(self.operand_specs)

    def structure(self, flat: Sequence[Any]) -> list[Any]:
        """Group flat inputs per declared operand: a list for the variadic one, None for missing."""
        if not self.arity_ok(len(flat)):
            raise TypeError(f"op {self.name} takes operands ({', '.join(self.operands)}), got {len(flat)}")
        out: list[Any] = []
        for i, spec in enumerate(self.operand_specs):
            if spec.variadic:
                out.append(list(flat[i:]))
            else:
                out.append(flat[i] if i < len(flat) else None)
        return out

    def result_count(self, attrs: Mapping[str, Any]) -> int:
        """How many results a node of this op with ``attrs`` has."""
        return self.results(attrs) if callable(self.results) else self.results

    def complete_attrs(self, given: Mapping[str, Any],
                       placeholders: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validate ``given`` attributes and fill in defaults, in declaration order.

        ``placeholders`` (used by pattern graphs) are taken as they are, unchecked.
        """
        placeholders = placeholders or {}
        unknown = (set(given) | set(placeholders)) - set(self.attrs)
        if unknown:
            raise AttrError(f"op {self.name} has no attribute {', '.join(repr(u) for u in sorted(unknown))}")
        out = {}
        for name, attr in self.attrs.items():
            if name in placeholders:
                out[name] = placeholders[name]
            elif name in given:
                out[name] = attr.coerce(given[name], name)
            elif attr.has_default:
                out[name] = attr.default
            else:
                raise AttrError(f"op {self.name} needs attribute {name!r}")
        return out

    def __repr__(self) -> str:
        return f"OpDef({self.name})"


class Registry:
    """A set of op declarations, looked up by name."""

    def __init__(self, ops: Iterable[OpDef] = ()):
        self._ops: dict[str, OpDef] = {}
        for op in ops:
            self.register(op)

    def register(self, op: OpDef) -> OpDef:
        if not isinstance(op, OpDef):
            raise DeclarationError(f"expected an OpDef, got {op!r}")
        if op.name in self._ops:
            raise DeclarationError(f"op {op.name!r} is already registered")
        self._ops[op.name] = op
        return op

    def extended(self, ops: Iterable[OpDef]) -> Registry:
        """A new registry holding these ops and ``ops``."""
        return Registry([*self._ops.values(), *ops])

    def __getitem__(self, name: str) -> OpDef:
        try:
            return self._ops[name]
        except KeyError:
            raise UnknownOpError(f"unknown op {name!r}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def __iter__(self) -> Iterator[OpDef]:
        return iter(self._ops.values())

    def __len__(self) -> int:
        return len(self._ops)

    def names(self) -> list[str]:
        return sorted(self._ops)


def attr_equal(a: Any, b: Any) -> bool:
    """Attribute equality that treats NaN floats and equal symbolic dims as equal."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(attr_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, sympy.Expr) or isinstance(b, sympy.Expr):
        return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0
    return type(a) is type(b) and a == b
