"""The networkx view, topological order and DOT output."""

from kiln.ir import Graph, TensorType, ops, to_dot, to_networkx, topological_order


def test_dataflow_view_and_order():
    g = Graph("t")
    x = g.add_input("x", TensorType("f32", (4,)))
    a = ops.neg(x)
    b = ops.abs(x)
    c = a + b
    g.set_outputs([c])
    view = to_networkx(g)
    assert view.number_of_nodes() == 4 and view.number_of_edges() == 4
    assert view.nodes[2]["op"] == "add"
    g.nodes.reverse()
    assert [n.op for n in topological_order(g)] == ["abs", "neg", "add"]
    dot = to_dot(g)
    assert dot.startswith('digraph "t"') and '"%x" -> n' in dot and "out0" in dot
