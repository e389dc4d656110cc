"""Each cleanup rewrite and pass: IR text in, IR text out, the count of rewrites, and
interpreter results unchanged at two batch sizes."""

import textwrap

import pytest
import torch

from kiln.ir import FoldedData
from kiln.passes import CANONICAL_RULES, eliminate_common_subexpressions, eliminate_dead_code, fold_constants, rewrite
from kiln.testing import assert_preserves, graph_from_text, random_inputs


def _graph(body: str, inputs: str = "%x: f32[batch, 4, 6]"):
    return graph_from_text(f"graph @g({inputs}) {{\n{textwrap.dedent(body).strip()}\n}}\n")


def canonicalize(graph):
    counts = rewrite(graph, CANONICAL_RULES)
    eliminate_dead_code(graph)
    return counts


CASES = {
    "mul_one": ("%c = constant [1.0] : f32[]\n%0 = mul(%c, %x) : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "div_one": ("%c = constant [1.0, 1.0, 1.0, 1.0, 1.0, 1.0] : f32[6]\n"
                "%0 = div(%x, %c) : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "add_zero": ("%c = constant [0.0] : f32[]\n%0 = add(%x, %c) : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "sub_zero": ("%c = constant [0.0] : f32[]\n%0 = sub(%x, %c) : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "neg_neg": ("%0 = neg(%x) : f32[batch, 4, 6]\n%1 = neg(%0) : f32[batch, 4, 6]\nreturn %1", "return %x"),
    "transpose_transpose": ("%0 = transpose(%x) {dim0 = 1, dim1 = 2} : f32[batch, 6, 4]\n"
                            "%1 = transpose(%0) {dim0 = -1, dim1 = -2} : f32[batch, 4, 6]\nreturn %1",
                            "return %x"),
    "permute_permute": ("%0 = permute(%x) {dims = [2, 0, 1]} : f32[6, batch, 4]\n"
                        "%1 = permute(%0) {dims = [0, 2, 1]} : f32[6, 4, batch]\nreturn %1",
                        "%0 = permute(%x) {dims = [2, 1, 0]} : f32[6, 4, batch]\nreturn %0"),
    "identity_permute": ("%0 = permute(%x) {dims = [0, 1, 2]} : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "reshape_reshape": ("%0 = reshape(%x) {shape = [-1]} : f32[batch*24]\n"
                        "%1 = reshape(%0) {shape = [batch, 24]} : f32[batch, 24]\nreturn %1",
                        "%0 = reshape(%x) {shape = [batch, 24]} : f32[batch, 24]\nreturn %0"),
    "identity_reshape": ("%0 = reshape(%x) {shape = [batch, 4, -1]} : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "identity_expand": ("%0 = expand(%x) {shape = [-1, 4, 6]} : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "cast_cast": ("%0 = cast(%x) {dtype = f64} : f64[batch, 4, 6]\n"
                  "%1 = cast(%0) {dtype = f16} : f16[batch, 4, 6]\nreturn %1",
                  "%0 = cast(%x) {dtype = f16} : f16[batch, 4, 6]\nreturn %0"),
    "identity_cast": ("%0 = cast(%x) {dtype = f32} : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "squeeze_unsqueeze": ("%0 = unsqueeze(%x) {dim = 1} : f32[batch, 1, 4, 6]\n"
                          "%1 = squeeze(%0) {dim = 1} : f32[batch, 4, 6]\nreturn %1", "return %x"),
    "unsqueeze_squeeze": ("%0 = squeeze(%x) {dim = 1} : f32[batch, 6]\n"
                          "%1 = unsqueeze(%0) {dim = -2} : f32[batch, 1, 6]\nreturn %1",
                          "return %x", "%x: f32[batch, 1, 6]"),
    "full_slice": ("%0 = slice(%x) {dim = 1, end = 4} : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "concat_one": ("%0 = concat(%x) {dim = 2} : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "concat_empty_last": ("%e = slice(%x) {dim = 2, start = 6} : f32[batch, 4, 0]\n"
                          "%0 = concat(%x, %e) {dim = 2} : f32[batch, 4, 6]\nreturn %0", "return %x"),
    "concat_empty_first": ("%e = slice(%x) {dim = 1, end = 0} : f32[batch, 0, 6]\n"
                           "%0 = concat(%e, %x) {dim = -2} : f32[batch, 4, 6]\nreturn %0", "return %x"),
}


def test_every_rule_has_a_case():
    assert {rule.label for rule in CANONICAL_RULES} == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_canonical_rule(name):
    before, after, *inputs = CASES[name]
    graph = _graph(before, *inputs)
    for batch in (2, 5):
        result = assert_preserves(canonicalize, graph, random_inputs(graph, batch))
    assert rewrite(graph.clone(), CANONICAL_RULES)[name] >= 1
    expected = _graph(after, *inputs)
    assert str(result) == str(expected)


@pytest.mark.parametrize("body", [
    # lossy middle dtype: f32 -> f16 -> f32 is not the identity
    "%0 = cast(%x) {dtype = f16} : f16[batch, 4, 6]\n%1 = cast(%0) {dtype = f32} : f32[batch, 4, 6]\nreturn %1",
    # transposes of different axes do not cancel, though the type comes back
    "%0 = transpose(%x) {dim0 = 0, dim1 = 1} : f32[4, batch, 6]\n"
    "%1 = transpose(%0) {dim0 = 1, dim1 = 2} : f32[4, 6, batch]\nreturn %1",
    # a slice that starts late keeps its work even where the type looks whole
    "%0 = slice(%x) {dim = 2, start = 1} : f32[batch, 4, 5]\nreturn %0",
    # x * 2 is not x * 1
    "%c = constant [2.0] : f32[]\n%0 = mul(%x, %c) : f32[batch, 4, 6]\nreturn %0",
    # multiplying by ones of a larger shape broadcasts: the type changes, so it stays
    "%c = constant [1.0, 1.0] : f32[2, 1, 1, 1]\n%0 = mul(%x, %c) : f32[2, batch, 4, 6]\nreturn %0",
])
def test_rules_do_not_fire_where_they_would_be_wrong(body):
    graph = _graph(body)
    assert rewrite(graph, CANONICAL_RULES) == {}


def test_dead_code_elimination():
    graph = _graph("""
        %unused = constant [3.0] : f32[]
        %0 = neg(%x) : f32[batch, 4, 6]
        %1 = abs(%0) : f32[batch, 4, 6]
        %2 = relu(%x) : f32[batch, 4, 6]
        return %2""")
    result = assert_preserves(eliminate_dead_code, graph, random_inputs(graph, 3))
    assert result.op_counts() == {"relu": 1} and not result.constants
    assert eliminate_dead_code(graph) == 3


def test_common_subexpressions_merge_commutative_operands_and_constants():
    graph = _graph("""
        %a = constant [2.0] : f32[]
        %b = constant [2.0] : f32[]
        %n = constant [-0.0] : f32[]
        %0 = mul(%x, %a) : f32[batch, 4, 6]
        %1 = mul(%b, %x) : f32[batch, 4, 6]
        %2 = add(%0, %1) : f32[batch, 4, 6]
        %3 = softmax(%2) {dim = 1} : f32[batch, 4, 6]
        %4 = softmax(%2) {dim = 2} : f32[batch, 4, 6]
        %5 = add(%3, %4) : f32[batch, 4, 6]
        %6 = add(%5, %n) : f32[batch, 4, 6]
        return %6""")
    result = assert_preserves(eliminate_common_subexpressions, graph, random_inputs(graph, 3))
    assert result.op_counts() == {"mul": 1, "add": 3, "softmax": 2}
    assert set(result.constants) == {"a", "n"}  # -0.0 is not merged with anything


def test_constant_folding_is_lazy_and_exact():
    graph = _graph("""
        %w = constant : f32[6, 6]
        %s = constant [0.5] : f32[]
        %0 = transpose(%w) {dim0 = 0, dim1 = 1} : f32[6, 6]
        %1 = mul(%0, %s) : f32[6, 6]
        %2 = matmul(%x, %1) : f32[batch, 4, 6]
        %3 = arange() {end = 6} : i64[6]
        %4 = cast(%3) {dtype = f32} : f32[6]
        %5 = add(%2, %4) : f32[batch, 4, 6]
        return %5""")
    lazy = graph.clone()
    assert fold_constants(lazy) == 4
    folded = [v.data for v in lazy.constants.values() if isinstance(v.data, FoldedData)]
    assert len(folded) == 2 and not any(d._cache for d in folded)  # over the 6x6 weight: not computed yet
    assert torch.equal(lazy.constants["arange_cast"].tensor(), torch.arange(6.0))  # a small literal: computed
    result = assert_preserves(fold_constants, graph, random_inputs(graph, 2))
    assert result.op_counts() == {"matmul": 1, "add": 1}


def test_folding_skips_symbolic_results():
    graph = _graph("%0 = arange() {end = batch} : i64[batch]\n%1 = cast(%0) {dtype = f32} : f32[batch]\n"
                   "return %1", inputs="%x: f32[batch]")
    assert fold_constants(graph) == 0
