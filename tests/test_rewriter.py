"""The pattern rewriter: matching (commutative, multi-output, attribute capture,
constraints), safety (interior uses, type preservation) and the fixpoint bound."""

import pytest
import torch

from kiln.ir import Graph, TensorType, interpret, ops, verify
from kiln.passes import AttrVar, RewriteLimitError, Rule, rewrite
from kiln.testing import assert_preserves, graph_from_text as _graph


def silu_pattern(x):
    return x * ops.sigmoid(x)


def silu(x):
    return ops.silu(x)


SILU_TWICE = """graph @g(%x: f32[batch, 8]) {
  %0 = sigmoid(%x) : f32[batch, 8]
  %1 = mul(%x, %0) : f32[batch, 8]
  %2 = sigmoid(%1) : f32[batch, 8]
  %3 = mul(%2, %1) : f32[batch, 8]
  return %3
}
"""


def test_commutative_match_counts_and_result():
    g = _graph(SILU_TWICE)
    x = torch.randn(3, 8)
    counts = rewrite(g, [Rule(silu_pattern, silu)])
    assert counts == {"silu_pattern": 2}
    assert g.op_counts() == {"silu": 2}
    torch.testing.assert_close(interpret(g, [x])[0], torch.nn.functional.silu(torch.nn.functional.silu(x)))
    verify(g)


def test_interior_values_used_elsewhere_block_the_match():
    g = _graph(SILU_TWICE.replace("return %3", "return %3, %0"))
    assert rewrite(g, [Rule(silu_pattern, silu)]) == {"silu_pattern": 1}  # only the outer one
    assert g.op_counts() == {"sigmoid": 1, "mul": 1, "silu": 1}


def test_attribute_capture_and_constraint():
    g = _graph("""graph @g(%x: f32[batch, 8]) {
  %0 = softmax(%x) {dim = -1} : f32[batch, 8]
  %1 = log(%0) : f32[batch, 8]
  %2 = softmax(%x) {dim = 0} : f32[batch, 8]
  %3 = log(%2) : f32[batch, 8]
  return %1, %3
}
""")

    def log_of_softmax(x, dim: int):
        return ops.log(ops.softmax(x, dim=dim))

    def fused(x, dim: int):
        return ops.log_softmax(x, dim=dim)

    rule = Rule(log_of_softmax, fused, when=lambda m: m["dim"] == -1)
    result = assert_preserves(lambda graph: rewrite(graph, [rule]), g, [torch.randn(3, 8)])
    assert result.op_counts() == {"log_softmax": 1, "softmax": 1, "log": 1}


def test_multi_output_pattern_fuses_two_projections():
    """Two linears that share an input become one linear and a split (the QKV shape)."""
    g = _graph("""graph @g(%x: f32[batch, 8]) {
  %wq = constant : f32[4, 8]
  %wk = constant : f32[6, 8]
  %0 = linear(%x, %wq) : f32[batch, 4]
  %1 = relu(%0) : f32[batch, 4]
  %2 = linear(%x, %wk) : f32[batch, 6]
  return %1, %2
}
""")

    def two_projections(x, a, b):
        return ops.linear(x, a), ops.linear(x, b)

    def one_projection(x, a, b):
        fused = ops.linear(x, ops.concat([a, b], dim=0))
        return ops.split(fused, dim=-1, sizes=(a.shape[0], b.shape[0]))

    rule = Rule(two_projections, one_projection, when=lambda m: m["a"].is_constant and m["b"].is_constant)
    result = assert_preserves(lambda graph: rewrite(graph, [rule]), g, [torch.randn(5, 8)])
    assert result.op_counts() == {"concat": 1, "linear": 1, "split": 1, "relu": 1}


def test_replacements_must_preserve_types():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (4, 4)))
    g.set_outputs([ops.transpose(x, dim0=0, dim1=1)])

    def transpose(x, a: int, b: int):
        return ops.transpose(x, dim0=a, dim1=b)

    def drop(x, a: int, b: int):
        return ops.reshape(x, shape=(16,))  # wrong type: must be refused

    assert rewrite(g, [Rule(transpose, drop)]) == {}
    assert g.op_counts() == {"transpose": 1} and len(g.constants) == 0


def test_rules_that_undo_each_other_hit_the_bound():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (4,)))
    g.set_outputs([ops.neg(x)])
    to_mul = Rule(lambda x: ops.neg(x), lambda x: x * -1.0, name="neg_to_mul")
    to_neg = Rule(lambda x: x * -1.0, lambda x: ops.neg(x), name="mul_to_neg")
    with pytest.raises(RewriteLimitError, match=r"5 sweeps; rewrites made: mul_to_neg: 2, neg_to_mul: 3"):
        rewrite(g, [to_mul, to_neg], max_sweeps=5)


def test_replacement_may_only_use_pattern_variables():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (4,)))
    g.set_outputs([ops.neg(x)])
    with pytest.raises(TypeError, match="replacement takes \\['y'\\]"):
        rewrite(g, [Rule(lambda x: ops.neg(x), lambda y: y)])


def test_patterns_are_traced_once_per_registry():
    calls = []

    def pattern(x):
        calls.append(1)
        return ops.neg(x)

    rule = Rule(pattern, lambda x: ops.abs(x))
    for _ in range(3):
        g = Graph("t")
        g.set_outputs([ops.neg(g.add_input("x", TensorType("f32", (2,))))])
        rewrite(g, [rule])
    assert calls == [1]


def test_attribute_variables_bind_consistently():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (2, 3, 4)))
    g.set_outputs([ops.transpose(ops.transpose(x, dim0=0, dim1=1), dim0=1, dim1=2)])

    def same_twice(x, a: int, b: int):
        return ops.transpose(ops.transpose(x, dim0=a, dim1=b), dim0=a, dim1=b)

    assert rewrite(g, [Rule(same_twice, lambda x: x)]) == {}
    assert isinstance(AttrVar("a"), AttrVar)


def test_a_replacement_whose_shape_rules_refuse_is_not_applied():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (4, 3)))
    g.set_outputs([ops.relu(x)])
    rule = Rule(lambda x: ops.relu(x), lambda x: ops.relu(ops.reshape(x, shape=(5, -1))))  # 12 into 5 rows
    assert rewrite(g, [rule]) == {}
    assert g.op_counts() == {"relu": 1} and not g.constants
    verify(g)
