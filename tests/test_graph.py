"""Graph building and editing: use lists, replacement, erasure, cloning, lazy constants."""

import pytest
import torch

from kiln.ir import Graph, GraphError, LazyData, TensorType, interpret, ops, verify
from kiln.passes import pipeline_manager


def test_uses_follow_edits(graph_with_input):
    g, x = graph_with_input
    w = ops.abs(x)
    y = ops.neg(x)
    z = y + y
    assert [u.index for u in y.uses] == [0, 1] and y.users == [z.producer]
    y.replace_all_uses_with(w)
    assert not y.uses and [u.index for u in w.uses] == [0, 1]
    g.set_outputs([z])
    g.erase_node(y.producer)
    with pytest.raises(GraphError, match="still used"):
        g.erase_node(w.producer)
    verify(g)


def test_replacing_an_output_updates_the_graph_outputs(graph_with_input):
    g, x = graph_with_input
    y = ops.neg(x)
    g.set_outputs([y])
    z = ops.abs(x)
    y.replace_all_uses_with(z)
    assert g.outputs == [z]


def test_values_of_another_graph_are_refused(graph_with_input):
    g, x = graph_with_input
    other = Graph("other")
    y = other.add_input("y", x.type)
    with pytest.raises(GraphError, match="another graph"):
        ops.add(x, y)
    with pytest.raises(GraphError, match="another graph"):
        g.set_outputs([y])


def test_inserting_before_keeps_topological_order(graph_with_input):
    g, x = graph_with_input
    y = ops.neg(x)
    g.set_outputs([y])
    with g.inserting_before(y.producer):
        z = ops.abs(x)
    assert [n.op for n in g.nodes] == ["abs", "neg"]
    y.producer.set_input(0, z)
    verify(g)


def test_clone_is_independent(graph_with_input):
    g, x = graph_with_input
    g.set_outputs([ops.silu(x) * 1.0])
    copy = g.clone()
    pipeline_manager("cleanup").run(copy)
    assert len(g.nodes) == 2 and len(copy.nodes) == 1
    assert str(g) != str(copy)
    verify(g)
    verify(copy)


def test_weights_stay_lazy_through_passes_and_printing(batch):
    loads = []

    def load():
        loads.append(1)
        return torch.ones(4096, 4096)

    g = Graph("big")
    x = g.add_input("x", TensorType("f32", (batch, 4096)))
    w = g.add_constant(LazyData(load), TensorType("f32", (4096, 4096)), name="w")
    wt = ops.transpose(ops.transpose(w, dim0=0, dim1=1), dim0=0, dim1=1)
    g.set_outputs([ops.linear(x, ops.transpose(wt, dim0=0, dim1=1))])
    pipeline_manager("cleanup", debug=True).run(g)
    text = str(g)
    assert loads == [] and "%w_transpose = constant :" in text and "= transpose(" not in text
    out = interpret(g, [torch.ones(1, 4096)])[0]
    assert loads == [1] and out.shape == (1, 4096)


def test_bind_constants_checks_types():
    g = Graph("t")
    g.add_constant(torch.zeros(2, 3), name="w")
    with pytest.raises(GraphError, match="has no constant %v"):
        g.bind_constants({"v": torch.zeros(1)})
    with pytest.raises(GraphError, match=r"constant %w is f32\[2, 3\]"):
        g.bind_constants({"w": torch.zeros(3, 2)})
