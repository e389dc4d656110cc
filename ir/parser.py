"""Read the text form written by ``printer.print_graph`` back into a ``Graph``.

Errors are ``ParseError`` with the line and column of the problem. The parser builds
exactly what the text says (result types included); ``verify`` checks it afterwards.
Constants printed without data are given ``MissingData`` until ``bind_constants``.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from .constants import MissingData, TensorData
from .dtypes import dtype as to_dtype
from .graph import Graph, Value
from .registry import Attr, AttrError, Registry, UnknownOpError
from .shapes import ShapeError, parse_dim
from .types import TensorType

_NAME = re.compile(r"%([A-Za-z0-9_.]+)")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


class ParseError(ValueError):
    """The text is not a valid graph; says where."""

    def __init__(self, message: str, line: int, column: int):
        super().__init__(f"line {line}, column {column}: {message}")
        self.line, self.column = line, column


class _Cursor:
    """A position in one line of text."""

    def __init__(self, text: str, line: int):
        self.text, self.line, self.pos = text, line, 0

    def error(self, message: str, pos: int | None = None) -> ParseError:
        return ParseError(message, self.line, (self.pos if pos is None else pos) + 1)

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def peek(self, literal: str) -> bool:
        self.skip()
        return self.text.startswith(literal, self.pos)

    def accept(self, literal: str) -> bool:
        if self.peek(literal):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str) -> None:
        if not self.accept(literal):
            found = self.text[self.pos:self.pos + 12] or "end of line"
            raise self.error(f"expected {literal!r}, found {found!r}")

    def match(self, pattern: re.Pattern[str], what: str) -> str:
        self.skip()
        m = pattern.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}")
        self.pos = m.end()
        return m.group(m.lastindex or 0)

    def balanced(self, stops: str) -> tuple[str, int]:
        """Text up to the first of ``stops`` outside brackets, parentheses and strings."""
        self.skip()
        start, depth, quoted = self.pos, 0, False
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if quoted:
                if ch == "\\":
                    self.pos += 1
                elif ch == '"':
                    quoted = False
            elif ch == '"':
                quoted = True
            elif ch in "[(":
                depth += 1
            elif ch in "])" and depth:
                depth -= 1
            elif depth == 0 and ch in stops:
                break
            self.pos += 1
        return self.text[start:self.pos].strip(), start

    def at_end(self) -> bool:
        self.skip()
        return self.pos >= len(self.text)


def _split_top(text: str) -> list[str]:
    """Split a bracket body at commas that are not nested."""
    cursor = _Cursor(text, 0)
    items = []
    while not cursor.at_end():
        item, _ = cursor.balanced(",")
        items.append(item)
        cursor.accept(",")
    return items


def _parse_type(cursor: _Cursor) -> TensorType:
    cursor.skip()
    start = cursor.pos
    name = cursor.match(re.compile(r"([A-Za-z0-9_]+)\["), "a type like f32[4, n]")
    cursor.pos -= 1
    cursor.expect("[")
    body, body_at = cursor.balanced("]")
    cursor.expect("]")
    try:
        return TensorType(to_dtype(name), [parse_dim(d) for d in _split_top(body)])
    except (TypeError, ShapeError) as exc:
        raise cursor.error(str(exc), start) from None


def _scalar(text: str) -> Any:
    if text in ("true", "false"):
        return text == "true"
    if text in ("inf", "-inf", "nan"):
        return float(text)
    return float(text) if re.search(r"[.eE]", text) else int(text)


def _parse_attr(text: str, spec: Attr) -> Any:
    if text == "none":
        return None
    if spec.kind in ("ints", "dims"):
        if not (text.startswith("[") and text.endswith("]")):
            raise ValueError(f"expected a list, got {text!r}")
        items = _split_top(text[1:-1])
        return tuple(int(i) if spec.kind == "ints" else parse_dim(i) for i in items)
    if spec.kind == "dim":
        return parse_dim(text)
    if spec.kind == "str":
        return json.loads(text)
    if spec.kind == "dtype":
        return to_dtype(text)
    return _scalar(text)


def _parse_data(cursor: _Cursor, type: TensorType) -> torch.Tensor:
    start = cursor.pos
    cursor.expect("[")
    body, _ = cursor.balanced("]")
    cursor.expect("]")
    try:
        items = [_scalar(x) for x in _split_top(body)]
        shape = tuple(int(d) for d in type.shape)
        return torch.tensor(items, dtype=type.dtype.torch_dtype).reshape(shape)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise cursor.error(f"bad constant data for {type}: {exc}", start) from None


class _GraphParser:
    def __init__(self, text: str, registry: Registry | None):
        self.lines = text.splitlines()
        self.registry = registry
        self.values: dict[str, Value] = {}
        self.graph: Graph | None = None

    def parse(self) -> Graph:
        body = [(i + 1, line.split("//")[0]) for i, line in enumerate(self.lines)]
        body = [(n, line) for n, line in body if line.strip()]
        if not body:
            raise ParseError("empty text: expected 'graph @name(...) {'", 1, 1)
        self._header(_Cursor(*reversed(body[0])))
        closed = False
        for number, line in body[1:]:
            if closed:
                raise ParseError("text after the closing '}'", number, 1)
            cursor = _Cursor(line, number)
            if cursor.accept("}"):
                closed = True
            elif cursor.peek("return"):
                self._return(cursor)
            else:
                self._statement(cursor)
        if not closed:
            raise ParseError("missing closing '}'", body[-1][0], len(body[-1][1]) + 1)
        return self.graph

    def _header(self, cursor: _Cursor) -> None:
        cursor.expect("graph")
        cursor.expect("@")
        name = cursor.match(_IDENT, "a graph name")
        self.graph = Graph(name, self.registry)
        cursor.expect("(")
        while not cursor.accept(")"):
            at = cursor.pos
            value_name = cursor.match(_NAME, "an input like %x")
            cursor.expect(":")
            self._define(value_name, self.graph.add_input(value_name, _parse_type(cursor)), cursor, at)
            if not cursor.peek(")"):
                cursor.expect(",")
        cursor.expect("{")

    def _define(self, name: str, value: Value, cursor: _Cursor, at: int) -> None:
        if name in self.values:
            raise cursor.error(f"%{name} is defined twice", at)
        self.values[name] = value

    def _use(self, cursor: _Cursor) -> Value | None:
        if cursor.accept("none"):
            return None
        at = cursor.pos
        name = cursor.match(_NAME, "a value like %x")
        if name not in self.values:
            raise cursor.error(f"unknown value %{name}", at)
        return self.values[name]

    def _statement(self, cursor: _Cursor) -> None:
        at = cursor.pos
        names = [cursor.match(_NAME, "a result like %0")]
        while cursor.accept(","):
            names.append(cursor.match(_NAME, "a result like %0"))
        cursor.expect("=")
        if cursor.accept("constant"):
            self._constant(cursor, names, at)
        else:
            self._node(cursor, names, at)

    def _constant(self, cursor: _Cursor, names: list[str], at: int) -> None:
        if len(names) != 1:
            raise cursor.error("a constant defines one value", at)
        name = names[0]
        data_at = cursor.pos if cursor.peek("[") else None
        if data_at is not None:
            cursor.balanced(":")  # the data is read once its type is known
        cursor.expect(":")
        type = _parse_type(cursor)
        self._end(cursor)
        data = MissingData(name)
        if data_at is not None:
            cursor.pos = data_at
            data = TensorData(_parse_data(cursor, type))
        value = self.graph.add_constant(data, type, name)
        if value.name != name:
            raise cursor.error(f"%{name} is defined twice", at)
        self._define(name, value, cursor, at)

    def _node(self, cursor: _Cursor, names: list[str], at: int) -> None:
        op_at = cursor.pos
        op = cursor.match(_IDENT, "an op name")
        try:
            opdef = self.graph.registry[op]
        except UnknownOpError:
            raise cursor.error(f"unknown op {op!r}", op_at) from None
        cursor.expect("(")
        inputs: list[Value | None] = []
        while not cursor.accept(")"):
            inputs.append(self._use(cursor))
            if not cursor.peek(")"):
                cursor.expect(",")
        if not opdef.arity_ok(len(inputs)):
            raise cursor.error(f"{op} takes operands ({', '.join(opdef.operands)}), got {len(inputs)}", op_at)
        attrs = self._attrs(cursor, opdef) if cursor.peek("{") else {}
        cursor.expect(":")
        types = [_parse_type(cursor)]
        while cursor.accept(","):
            types.append(_parse_type(cursor))
        location = None
        if cursor.accept("loc("):
            text, _ = cursor.balanced(")")
            location = json.loads(text)
            cursor.expect(")")
        self._end(cursor)
        if len(types) != len(names):
            raise cursor.error(f"{len(names)} results but {len(types)} types", at)
        try:
            node = self.graph.call(op, inputs, attrs, location, result_types=types)
        except (AttrError, ValueError) as exc:
            raise cursor.error(str(exc), op_at) from None
        for name, value in zip(names, node.results):
            value.name = None if name.isdigit() else name
            self._define(name, value, cursor, at)

    def _attrs(self, cursor: _Cursor, opdef) -> dict[str, Any]:
        cursor.expect("{")
        attrs: dict[str, Any] = {}
        while not cursor.accept("}"):
            key_at = cursor.pos
            key = cursor.match(_IDENT, "an attribute name")
            if key not in opdef.attrs:
                raise cursor.error(f"op {opdef.name} has no attribute {key!r}", key_at)
            cursor.expect("=")
            text, value_at = cursor.balanced(",}")
            try:
                attrs[key] = _parse_attr(text, opdef.attrs[key])
            except (ValueError, TypeError, ShapeError) as exc:
                raise cursor.error(f"bad value for attribute {key!r}: {exc}", value_at) from None
            if not cursor.peek("}"):
                cursor.expect(",")
        return attrs

    def _return(self, cursor: _Cursor) -> None:
        cursor.expect("return")
        outputs = []
        while not cursor.at_end():
            value = self._use(cursor)
            if value is None:
                raise cursor.error("a graph cannot return none")
            outputs.append(value)
            if not cursor.at_end():
                cursor.expect(",")
        self.graph.set_outputs(outputs)

    @staticmethod
    def _end(cursor: _Cursor) -> None:
        if not cursor.at_end():
            raise cursor.error(f"unexpected {cursor.text[cursor.pos:cursor.pos + 12]!r}")


def parse(text: str, registry: Registry | None = None) -> Graph:
    """Parse the text form of one graph."""
    return _GraphParser(text, registry).parse()
