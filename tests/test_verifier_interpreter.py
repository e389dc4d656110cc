"""The verifier accepts what the builder makes and names what is wrong with the rest;
the interpreter binds symbols, checks inputs and names the failing node."""

import pytest
import torch
from hypothesis import given, settings

from kiln.ir import REGISTRY, Graph, InterpreterError, ShapeError, TensorType, VerificationError, interpret, ops, parse, sym, verify
from kiln.testing import CORRUPTIONS, GENERATORS, corrupted_graphs, graphs


@given(graphs())
def test_every_generated_graph_verifies(graph):
    verify(graph)


@given(corrupted_graphs())
def test_every_corruption_is_reported_by_name(case):
    graph, name, phrase = case
    with pytest.raises(VerificationError) as info:
        verify(graph)
    assert phrase in str(info.value), f"{name}: {info.value}"


def test_corruptions_cover_each_kind_of_malformation():
    assert set(CORRUPTIONS) == {"wrong_result_type", "use_before_definition", "dangling_use", "unknown_op",
                                "bad_attribute", "missing_operand", "defined_twice", "foreign_output",
                                "unbound_symbol"}


def test_verifier_names_the_node_and_its_location():
    graph = parse('graph @g(%x: f32[4]) {\n  %0 = neg(%x) : f32[5] loc("layers.3.mlp")\n  return %0\n}')
    with pytest.raises(VerificationError, match=r'node `%0 = neg\(%x\) : f32\[5\] loc\("layers.3.mlp"\)`: result 0 is typed f32\[5\]'):
        verify(graph)


def test_interpreter_binds_and_checks_symbols():
    b = sym("batch")
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (b, 4)))
    y = g.add_input("y", TensorType("f32", (b + 1, 4)))
    g.set_outputs([ops.concat([x, y], dim=0)])
    out = interpret(g, {"x": torch.ones(2, 4), "y": torch.zeros(3, 4)})[0]
    assert out.shape == (5, 4)
    with pytest.raises(ShapeError, match=r"got size 4 where batch \+ 1 = 3"):
        interpret(g, [torch.ones(2, 4), torch.zeros(4, 4)])
    with pytest.raises(ShapeError, match="got dtype torch.float16"):
        interpret(g, [torch.ones(2, 4, dtype=torch.float16), torch.zeros(3, 4)])
    with pytest.raises(ShapeError, match="missing inputs: y"):
        interpret(g, {"x": torch.ones(2, 4)})


def test_interpreter_names_the_failing_node():
    g = Graph("t")
    x = g.add_input("x", TensorType("i64", (3,)))
    table = g.add_constant(torch.randn(4, 2), name="table")
    g.set_outputs([ops.embedding(x, table)])
    with pytest.raises(InterpreterError, match=r"node `%0 = embedding\(%x, %table\)"):
        interpret(g, [torch.tensor([0, 1, 9])])


def test_interpreter_catches_a_wrong_shape_rule():
    from kiln.ir import REGISTRY, OpDef

    liar = OpDef("liar", ("x",), lambda x: x, lambda x: torch.cat([x, x]), doc="wrong on purpose")
    g = Graph("t", REGISTRY.extended([liar]))
    x = g.add_input("x", TensorType("f32", (2,)))
    g.set_outputs([ops.liar(x)])
    with pytest.raises(InterpreterError, match=r"reference gave torch.float32 \(4,\), the type says f32\[2\]"):
        interpret(g, [torch.ones(2)])


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_each_generator_makes_values(name):
    made = []

    def probe(draft):
        value = GENERATORS[name](draft)
        made.append(value is not None)
        return value

    _ops_made(generators=("unary",), extra_generators={"probe": probe})
    assert any(made), f"generator {name} never made a value"


def test_generators_reach_every_op_of_the_registry():
    seen = set()
    for name in GENERATORS:  # each alone and beside another: two derandomized draws of its choices
        seen |= _ops_made(generators=(name,)) | _ops_made(generators=(name, "unary"))
    assert seen == set(REGISTRY.names()), sorted(set(REGISTRY.names()) - seen)


def _ops_made(**kwargs) -> set[str]:
    seen: set[str] = set()

    @settings(max_examples=40, derandomize=True, database=None)
    @given(graphs(**kwargs))
    def collect(graph):
        seen.update(graph.op_counts())

    collect()
    return seen
