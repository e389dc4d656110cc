"""The text form: printing, parsing, round trips and parse errors with positions."""

import pytest
import torch
from hypothesis import given

from kiln.ir import Graph, MissingData, ParseError, interpret, parse, verify
from kiln.testing import graphs, graphs_with_inputs

TEXT = """graph @block(%x: f32[batch, seq, 8], %ids: i64[batch]) {
  %w = constant : f32[16, 8]
  %c = constant [0.5, -inf, nan, 2.0] : f32[4]
  %flag = constant [true, false] : bool[2]
  %0 = linear(%x, %w) : f32[batch, seq, 16]
  %q, %k = split(%0) {dim = -1, sizes = [8, 8]} : f32[batch, seq, 8], f32[batch, seq, 8]
  %1 = reshape(%q) {shape = [batch*seq, 2, 4]} : f32[batch*seq, 2, 4]
  %2 = gelu(%k) {approximate = "tanh"} : f32[batch, seq, 8] loc("model.layers.0.mlp")
  %3 = slice(%2) {dim = 1, start = 1} : f32[batch, seq - 1, 8]
  %4 = layer_norm(%3, none, none) : f32[batch, seq - 1, 8]
  return %1, %4
}
"""


def test_hand_written_text_round_trips():
    graph = parse(TEXT)
    verify(graph)
    again = str(graph)
    assert str(parse(again)) == again
    assert "loc(\"model.layers.0.mlp\")" in again and "%q, %k = split" in again
    assert isinstance(graph.constants["w"].data, MissingData)
    assert torch.isnan(graph.constants["c"].tensor()[2])


@given(graphs())
def test_print_parse_print_is_the_identity(graph):
    text = str(graph)
    assert str(parse(text)) == text


@given(graphs_with_inputs())
def test_parsed_graphs_compute_the_same(case):
    graph, inputs = case
    parsed = parse(str(graph))
    parsed.bind_constants({name: v.tensor() for name, v in graph.constants.items()
                           if isinstance(parsed.constants[name].data, MissingData)})
    verify(parsed)
    for a, b in zip(interpret(parsed, inputs), interpret(graph, inputs)):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("text, line, column, message", [
    ("", 1, 1, "empty text"),
    ("graph @g(%x: f32[4]) {\n  %0 = frobnicate(%x) : f32[4]\n  return %0\n}", 2, 8, "unknown op 'frobnicate'"),
    ("graph @g(%x: f32[4]) {\n  %0 = neg(%y) : f32[4]\n  return %0\n}", 2, 12, "unknown value %y"),
    ("graph @g(%x: f33[4]) {\n  return %x\n}", 1, 14, "unknown dtype 'f33'"),
    ("graph @g(%x: f32[4]) {\n  %0 = neg(%x) {dim = 1} : f32[4]\n  return %0\n}", 2, 17, "no attribute 'dim'"),
    ("graph @g(%x: f32[4]) {\n  %0 = gelu(%x) {approximate = fast} : f32[4]\n  return %0\n}", 2, 32,
     "bad value for attribute 'approximate'"),
    ("graph @g(%x: f32[4]) {\n  %0 = neg(%x) : f32[4]\n  %0 = neg(%x) : f32[4]\n  return %0\n}", 3, 3,
     "%0 is defined twice"),
    ("graph @g(%x: f32[4]) {\n  %0 = neg(%x) : f32[4]\n  return %0\n", 3, 12, "missing closing"),
    ("graph @g(%x: f32[4]) {\n  %0 = neg(%x) f32[4]\n}", 2, 16, "expected ':'"),
    ("graph @g(%x: f32[4]) {\n  %0 = neg(%x, %x) : f32[4]\n}", 2, 8, "takes operands (x), got 2"),
    ("graph @g(%x: f32[4]) {\n  %c = constant [1.0, x] : f32[2]\n}", 2, 17, "bad constant data"),
])
def test_parse_errors_name_line_and_column(text, line, column, message):
    with pytest.raises(ParseError) as info:
        parse(text)
    assert (info.value.line, info.value.column) == (line, column), str(info.value)
    assert message in str(info.value)


def test_parse_then_verify_reports_wrong_types():
    graph = parse("graph @g(%x: f32[4]) {\n  %0 = neg(%x) : f32[5]\n  return %0\n}")
    with pytest.raises(ValueError, match=r"result 0 is typed f32\[5\], the op gives f32\[4\]"):
        verify(graph)


def test_graph_names_and_empty_graph():
    g = Graph("empty")
    assert str(g) == "graph @empty() {\n  return \n}\n"
    assert str(parse(str(g))) == str(g)
